//! `evaluate`: a checkpoint's metrics on one split of a dataset.

use serde::Deserialize;
use serde_json::Value;

use super::dataset::{read_meta, read_split};
use super::train::{evaluate_split, loss_for, report_metrics};
use super::{fail, nn, one_input, Device};
use crate::{parse_params, LegacyOp as Op, OpError, ParamError, RunContext};
use nn::open_device;
use nn::train::{load_checkpoint, LossKind};

pub const METRICS_FILE: &str = "metrics.json";

/// Loads the checkpoint input, evaluates it in eval mode (running BatchNorm statistics) on a
/// split of the dataset input, reports `loss` and `accuracy` or `rel_l2` (plus `samples`), and
/// writes them to `metrics.json`.
pub struct EvaluateOp;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Name of the checkpoint input (a `train` stage's output).
    #[serde(default = "default_checkpoint")]
    checkpoint: String,
    /// Name of the dataset input.
    #[serde(default = "default_data")]
    data: String,
    #[serde(default = "default_split")]
    split: String,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default)]
    loss: Option<LossKind>,
    #[serde(default)]
    device: Device,
}

fn default_checkpoint() -> String {
    "model".into()
}
fn default_data() -> String {
    "data".into()
}
fn default_split() -> String {
    "test".into()
}
fn default_batch() -> usize {
    256
}

impl Params {
    fn parse(params: &Value) -> Result<Self, ParamError> {
        let p: Params = parse_params(params)?;
        p.device.check()?;
        if !super::dataset::SPLITS.contains(&p.split.as_str()) {
            return Err(
                ParamError::new("split", format!("'{}' is not a split", p.split))
                    .with_fix("use train, val or test"),
            );
        }
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "must be at least 1"));
        }
        Ok(p)
    }
}

impl Op for EvaluateOp {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "evaluates a checkpoint input on a split of a dataset input"
    }
    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        Params::parse(params).map(|_| ())
    }
    fn required_inputs(&self, params: &Value) -> Vec<String> {
        Params::parse(params)
            .map(|p| vec![p.checkpoint, p.data])
            .unwrap_or_default()
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let p = Params::parse(ctx.params)?;
        let ck = one_input(ctx, &p.checkpoint)?.to_path_buf();
        let data = one_input(ctx, &p.data)?.to_path_buf();
        let mut model = load_checkpoint::<f32>(&open_device().map_err(nn)?, &ck).map_err(nn)?;
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
        let report = evaluate_split(&mut model, &split, kind, p.batch_size)?;
        let mut metrics = report_metrics("", &report);
        metrics.insert("samples".into(), split.n as f64);
        let path = ctx.out_dir.join(METRICS_FILE);
        let json = serde_json::to_vec_pretty(&metrics).map_err(|e| fail(e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| OpError::io(path.display().to_string(), e))?;
        let _ = writeln!(
            ctx.log,
            "{} on {} samples of '{}': {metrics:?}",
            model.spec().kind(),
            split.n,
            p.split
        );
        ctx.metrics.extend(metrics);
        Ok(())
    }
}
