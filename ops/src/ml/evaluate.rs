//! `evaluate`: a checkpoint's metrics on one split of a dataset.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::train::{evaluate_split, loss_for, report_metrics};
use super::Device;
use crate::dataset::{read_meta, read_split};
use crate::fail;
use crate::{Count, OpError, Outputs, ParamError, RunContext, TypedOp, METRICS_FILE};
use nn::open_device;
use nn::train::{load_checkpoint, LossKind};

/// Loads the checkpoint input, evaluates it in eval mode (running BatchNorm statistics) on a
/// split of the dataset input, reports `loss` and `accuracy` or `rel_l2` (plus `samples`), and
/// writes them to `metrics.json`.
pub struct EvaluateOp;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateParams {
    /// Name of the checkpoint input (a `train` stage's output).
    pub checkpoint: String,
    /// Name of the dataset input.
    pub data: String,
    /// The split to evaluate on: `train`, `val` or `test`.
    pub split: String,
    /// Samples per forward pass.
    pub batch_size: Count,
    /// `cross_entropy`, `mse` or `sum_of_squares`; default: cross_entropy for classification,
    /// mse for regression.
    pub loss: Option<LossKind>,
    /// Where to compute: `cpu`, or `cuda` in a build with the `cuda` feature (default: the
    /// build's device).
    pub device: Device,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        Self {
            checkpoint: "model".into(),
            data: "data".into(),
            split: "test".into(),
            batch_size: Count(256),
            loss: None,
            device: Device::default(),
        }
    }
}

impl TypedOp for EvaluateOp {
    const NAME: &'static str = "evaluate";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "evaluates a checkpoint input on a split of a dataset input";
    type Params = EvaluateParams;
    type Config = EvaluateParams;

    fn resolve(p: EvaluateParams) -> Result<EvaluateParams, ParamError> {
        p.device.check()?;
        if !crate::dataset::SPLITS.contains(&p.split.as_str()) {
            return Err(
                ParamError::new("split", format!("'{}' is not a split", p.split))
                    .with_fix("use train, val or test"),
            );
        }
        Ok(p)
    }
    fn required_inputs(p: &EvaluateParams) -> Vec<String> {
        vec![p.checkpoint.clone(), p.data.clone()]
    }
    fn run(
        &self,
        p: &EvaluateParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let ck = ctx.one_input(&p.checkpoint)?.to_path_buf();
        let data = ctx.one_input(&p.data)?.to_path_buf();
        let mut model = load_checkpoint::<f32>(&open_device()?, &ck)?;
        let meta = read_meta(&data)?;
        if model.input_shape() != super::train::input_shape(&meta) {
            return Err(fail(format!(
                "the checkpoint takes inputs of {:?} but the dataset's samples are {:?}",
                model.input_shape(),
                meta.shape
            )));
        }
        let kind = loss_for(&model, &meta, p.loss)?;
        let split = read_split(&data, &meta, &p.split)?;
        if split.n == 0 {
            return Err(fail(format!("split '{}' of the dataset is empty", p.split)));
        }
        ctx.check_cancelled()?;
        let report = evaluate_split(&mut model, &split, kind, p.batch_size.get())?;
        out.metrics_from(report_metrics("", &report));
        out.metric("samples", split.n as f64);
        // Every value as it came (a NaN loss is written as null, not left out), unlike the
        // filtered metrics file of `train`: readers tell a diverged model from a missing metric.
        out.write_json(METRICS_FILE, out.metrics())?;
        let _ = writeln!(
            ctx.log,
            "{} on {} samples of '{}': {:?}",
            model.spec().kind(),
            split.n,
            p.split,
            out.metrics()
        );
        Ok(())
    }
}
