//! Architecture-aware hyperparameters, connectivity (NNGP) analysis and NAS re-ranking
//! (arXiv 2402.17440, 2205.05662; `../shared/papers/arch-aware-hparams.md` and
//! `../shared/papers/connectivity-convergence.md`).
//!
//! Everything here is training-free arithmetic on a cell's DAG (parsed by
//! [`nn::models::topology::Dag`]) or on finished `train` results:
//! - [`paths`]: the input->output paths of a cell, d_p, P, effective depth and width;
//! - [`lr`]: the maximal-LR path formula and the per-layer init variances (plus an init hook);
//! - [`nngp`]: the NNGP kernel through a cell and the bounds on its smallest eigenvalue;
//! - [`filter`]: the acceptance box on effective depth / width over a search space;
//! - [`stats`]: Kendall's tau-b and Pearson's r.
//!
//! Ops: `hparams.arch_aware`, `nngp.connectivity`, `rerank`, `lr.pick`; and `lr.probe` (it
//! shares `train`'s loop, so it lives in [`crate::ml`]) is registered here beside `lr.pick`.

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

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::{OpError, Registry};

pub use connectivity_op::{ConnectivityParams, NngpConnectivityOp};
pub use error::ArchError;
pub use hparams_op::{ArchAwareHparamsOp, ArchAwareParams};
pub use lr::{ArchAwareInit, LrPrediction};
pub use lr_pick_op::{GridPoint, LrPickOp, LrPickParams};
pub use paths::{Cell, CellKind, CellPath, PathProxies};
pub use rerank_op::{RerankOp, RerankParams};

/// Adds this module's ops to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(Arc::new(crate::Legacy(ArchAwareHparamsOp)));
    registry.register(Arc::new(crate::Legacy(NngpConnectivityOp)));
    registry.register(Arc::new(crate::Legacy(RerankOp)));
    registry.register(Arc::new(crate::ml::LrProbeOp));
    registry.register(Arc::new(crate::Legacy(LrPickOp)));
}

/// Writes `value` as pretty JSON to `dir/name`.
fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<(), OpError> {
    let path = dir.join(name);
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| OpError::Failed(format!("cannot encode {name}: {e}")))?;
    std::fs::write(&path, text)
        .map_err(|e| OpError::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::path::Path;

    use serde_json::Value;

    use crate::{CancelFlag, Input, LegacyOp as Op, Metrics, OpError, Progress, RunContext};

    /// Runs `op` with `params` and `inputs` into `out`; returns the result, metrics and log.
    pub fn run_op(
        op: &dyn Op,
        params: Value,
        inputs: BTreeMap<String, Input>,
        out: &Path,
    ) -> (Result<(), OpError>, Metrics, String) {
        let ws = tempfile::tempdir().unwrap();
        let cancel = CancelFlag::new();
        let progress = Progress::silent();
        let mut log = Vec::new();
        let mut ctx = RunContext {
            params: &params,
            inputs: &inputs,
            out_dir: out,
            workspace: ws.path(),
            seed: 3,
            cpus: 1,
            cancel: &cancel,
            progress: &progress,
            log: &mut log,
            metrics: Metrics::new(),
        };
        let result = op.run(&mut ctx);
        let metrics = ctx.metrics.clone();
        (result, metrics, String::from_utf8_lossy(&log).into_owned())
    }
}
