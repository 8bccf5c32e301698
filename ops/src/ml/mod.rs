//! The ML ops: datasets (`data.*`), `train` and `evaluate`, on the layers, models and training
//! library of [`nn`].
//!
//! Datasets and checkpoints are ordinary stage outputs: a dataset is a folder of safetensors
//! splits plus `meta.json` ([`dataset`]); a checkpoint is `weights.safetensors` + `model.json`
//! ([`nn::train::save_checkpoint`]). Files an op writes hold only deterministic content
//! (no timings), so equal inputs and seed give byte-identical outputs and downstream early
//! cutoff works; timings go to metrics and the log.

pub mod dataset;
mod evaluate;
mod readers;
mod synthetic;
mod train;

pub use evaluate::EvaluateOp;
pub use readers::{Cifar10Op, ImportOp, MnistOp};
pub use synthetic::{render_shape, SyntheticImagesOp};
pub(crate) use train::write_metrics;
pub use train::{LrProbeOp, TrainOp, METRICS_FILE};

use serde::Deserialize;

use crate::{OpError, ParamError};

pub(crate) fn fail(message: impl Into<String>) -> OpError {
    OpError::Failed(message.into())
}

/// A layer or model error as a stage failure.
pub(crate) fn nn(e: nn::NnError) -> OpError {
    fail(e.to_string())
}

/// Where a stage computes (`device:` param of `train` and `evaluate`). A build computes on one
/// device: the CPU, or with the `cuda` feature GPU 0; the other value is refused with a fix.
/// Left out, it is the build's device (so the same pipeline runs on either build; set it, or
/// `engine run --device`, to make the device part of the stage's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cpu,
    Cuda,
}

impl Default for Device {
    fn default() -> Self {
        if cfg!(feature = "cuda") {
            Device::Cuda
        } else {
            Device::Cpu
        }
    }
}

impl Device {
    /// Refuses devices this build cannot use.
    pub(crate) fn check(self) -> Result<(), ParamError> {
        match (self, cfg!(feature = "cuda")) {
            (Device::Cpu, false) | (Device::Cuda, true) => Ok(()),
            (Device::Cuda, false) => Err(ParamError::new(
                "device",
                "this engine was built without CUDA (the `cuda` feature): its layers run on \
                 the CPU only",
            )
            .with_fix(
                "use `device: cpu`, or build with `cargo build --release -p engine --features \
                 cuda` (needs the CUDA toolkit)",
            )),
            (Device::Cpu, true) => Err(ParamError::new(
                "device",
                "this engine was built with the `cuda` feature: its layers run on the GPU only",
            )
            .with_fix("use `device: cuda`, or a build without the `cuda` feature for the CPU")),
        }
    }
}

/// An independent stream of randomness for one purpose of one stage (SplitMix64 of the stage
/// seed and a stream number), so that e.g. weight init and shuffling do not share draws.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The one folder of input `name` (a list input is refused).
pub(crate) fn one_input<'a>(
    ctx: &'a crate::RunContext<'_>,
    name: &str,
) -> Result<&'a std::path::Path, OpError> {
    match ctx.input(name)? {
        crate::Input::One(p) => Ok(p),
        crate::Input::Many { .. } => Err(fail(format!(
            "input '{name}' selects several stages; point it at one (`stage` or `stage[k=v]`)"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Running an op in a temporary folder, as the engine would.

    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use crate::{CancelFlag, Input, LegacyOp as Op, Metrics, OpError, Progress, RunContext};

    pub fn run_op(
        op: &dyn Op,
        params: serde_json::Value,
        inputs: &[(&str, &Path)],
        workspace: &Path,
        out: &Path,
        seed: u64,
    ) -> Result<Metrics, OpError> {
        op.validate(&params)?;
        let inputs: BTreeMap<String, Input> = inputs
            .iter()
            .map(|(n, p)| (n.to_string(), Input::One(PathBuf::from(p))))
            .collect();
        std::fs::create_dir_all(out).map_err(|e| OpError::io("out", e))?;
        let cancel = CancelFlag::new();
        let progress = Progress::silent();
        let mut log = Vec::new();
        let mut ctx = RunContext {
            params: &params,
            inputs: &inputs,
            out_dir: out,
            workspace,
            seed,
            cpus: 1,
            cancel: &cancel,
            progress: &progress,
            log: &mut log,
            metrics: Metrics::new(),
        };
        op.run(&mut ctx)?;
        Ok(ctx.metrics)
    }
}
