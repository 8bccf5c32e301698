//! The ML ops: datasets (`data.*`), `train` and `evaluate`, on the layers, models and training
//! library of [`nn`].
//!
//! Datasets and checkpoints are ordinary stage outputs: a dataset is a folder of safetensors
//! splits plus `meta.json` ([`dataset`]); a checkpoint is `weights.safetensors` + `model.json`
//! ([`nn::train::save_checkpoint`]). Files an op writes hold only deterministic content
//! (no timings), so equal inputs and seed give byte-identical outputs and downstream early
//! cutoff works; timings go to metrics and the log.

mod digits;
mod evaluate;
mod readers;
mod synthetic;
mod train;

pub use digits::DigitsOp;
pub use evaluate::EvaluateOp;
pub use readers::{Cifar10Op, ImportOp, MnistOp};
pub use synthetic::{render_shape, SyntheticImagesOp};
pub use train::{LrProbeOp, TrainOp};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ParamError;

/// Where a stage computes (`device:` param of `train` and `evaluate`). A build computes on one
/// device: the CPU, or with the `cuda` feature GPU 0; the other value is refused with a fix.
/// Left out, it is the build's device (so the same pipeline runs on either build; set it, or
/// `engine run --device`, to make the device part of the stage's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The host CPU (a build without the `cuda` feature).
    Cpu,
    /// GPU 0 (a build with the `cuda` feature).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oplearn::{dataset::PdeDatasetOp, icl::InContextOp, pretrain::PretrainMaskOp};
    use crate::Op;

    #[test]
    fn every_param_is_documented_and_the_training_ops_take_a_device() {
        let ops: [(&dyn Op, bool); 11] = [
            (&TrainOp, true),
            (&LrProbeOp, true),
            (&EvaluateOp, true),
            (&SyntheticImagesOp, false),
            (&DigitsOp, false),
            (&Cifar10Op, false),
            (&MnistOp, false),
            (&ImportOp, false),
            (&PdeDatasetOp, false),
            (&PretrainMaskOp, false),
            (&InContextOp, false),
        ];
        for (op, device) in ops {
            let rows = op.params_doc();
            assert!(!rows.is_empty(), "{}", op.name());
            for row in &rows {
                assert!(
                    !row.doc.is_empty(),
                    "{}: `{}` has no doc",
                    op.name(),
                    row.path
                );
            }
            assert_eq!(op.takes_device(), device, "{}", op.name());
        }
        let train = TrainOp.params_doc();
        let row = |path: &str| train.iter().find(|r| r.path == path).unwrap();
        assert_eq!(row("lr").kind, "number | \"arch_aware\" (optional)");
        assert_eq!(row("batch_size").default, Some(serde_json::json!(64)));
        assert_eq!(row("data").default, Some(serde_json::json!("data")));
        // An optional block's own fields (params_doc lists them only for a required block).
        let from = crate::params_doc::of::<train::ModelFrom>();
        assert_eq!(from.len(), 2);
        assert!(
            from.iter().all(|r| !r.doc.is_empty() && r.required),
            "{from:?}"
        );
        assert_eq!(
            row("optimizer").default,
            Some(
                serde_json::json!({"kind": "sgd", "momentum": 0.9, "nesterov": false,
                                    "weight_decay": 0.0})
            )
        );
    }
}
