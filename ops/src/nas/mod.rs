//! Training-free architecture search (TE-NAS / TEG-NAS, arXiv 2108.11939;
//! `docs/methods/training-free-nas.md`): proxy networks, indicators, rank-sum combination,
//! search algorithms and the `search` / `indicators.correlate` ops; As-ViT's ViT space, length
//! distortion and `scale` growth loop (arXiv 2202.11921).

mod correlate_op;
pub mod indicators;
mod linalg;
pub mod net;
pub mod probes;
pub mod rank;
mod scale_op;
pub mod search;
mod search_op;
pub mod search_params;
pub mod space;
pub mod vit_space;

use std::sync::Arc;

use crate::Registry;

pub use correlate_op::{CorrelateOp, CorrelateParams, CORRELATE_FILE};
pub use scale_op::{ScaleOp, ScaleParams, FAMILY_FILE};
pub use search_op::{SearchOp, SEARCH_FILE};
pub use search_params::{SearchConfig, SearchParams};

/// Adds this module's ops to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(Arc::new(SearchOp));
    registry.register(Arc::new(CorrelateOp));
    registry.register(Arc::new(ScaleOp));
}

#[cfg(test)]
mod tests;
