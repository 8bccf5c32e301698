//! Architecture-aware hyperparameters, connectivity (NNGP) analysis and NAS re-ranking
//! (arXiv 2402.17440, 2205.05662; `docs/methods/arch-aware.md` and
//! `docs/methods/connectivity.md`).
//!
//! Everything here is training-free arithmetic on a cell's DAG (parsed by
//! [`nn::models::topology::Dag`]) or on finished `train` results:
//! - [`paths`]: the input->output paths of a cell, d_p, P, effective depth and width;
//! - [`lr`]: the maximal-LR path formula and the per-layer init variances (plus an init hook);
//! - [`nngp`]: the NNGP kernel through a cell and the bounds on its smallest eigenvalue;
//! - [`filter`]: the acceptance box on effective depth / width over a search space;
//! - [`stats`]: Kendall's tau-b and Pearson's r.
//!
//! Ops: `hparams.arch_aware`, `nngp.connectivity`, `rerank`, `lr.pick` (`lr.probe` shares
//! `train`'s loop, so it lives and is registered with `train`). This module uses no other op
//! family: `ml` depends on it (the arch-aware learning rate and init), not the reverse.

mod connectivity_op;
mod error;
pub mod filter;
mod hparams_op;
pub mod lr;
mod lr_pick_op;
pub mod nngp;
pub mod paths;
mod rerank_op;
pub mod stats;

use std::sync::Arc;

use crate::Registry;

pub use connectivity_op::{ConnectivityParams, NngpConnectivityOp};
pub use error::ArchError;
pub use hparams_op::{ArchAwareHparamsOp, ArchAwareParams};
pub use lr::{ArchAwareInit, LrPrediction};
pub use lr_pick_op::{GridPoint, LrPickOp, LrPickParams};
pub use paths::{Cell, CellKind, CellPath, PathProxies};
pub use rerank_op::{RerankOp, RerankParams};

/// Adds this module's ops to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(Arc::new(ArchAwareHparamsOp));
    registry.register(Arc::new(NngpConnectivityOp));
    registry.register(Arc::new(RerankOp));
    registry.register(Arc::new(LrPickOp));
}

#[cfg(test)]
mod tests {
    use crate::Op;

    #[test]
    fn every_param_is_documented() {
        let ops: [&dyn Op; 4] = [
            &super::ArchAwareHparamsOp,
            &super::NngpConnectivityOp,
            &super::RerankOp,
            &super::LrPickOp,
        ];
        for op in ops {
            let rows = op.params_doc();
            assert!(rows.iter().all(|r| !r.doc.is_empty()), "{rows:#?}");
            assert_eq!(rows.is_empty(), op.name() == "lr.pick", "{}", op.name());
        }
    }
}
