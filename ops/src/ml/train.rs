//! `train`: fits a model built from a `model:` block on a dataset input.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dataset::{read_meta, read_split, DatasetMeta, Split, Targets, Task};
use super::{derive_seed, fail, nn, one_input, Device};
use crate::arch::lr::{predict_lr, LrPrediction};
use crate::arch::{ArchAwareInit, Cell, CellKind};
use crate::{parse_params, Metrics, Op, OpError, ParamError, RunContext};
use nn::from_vec;
use nn::layers::ForwardCtx;
use nn::models::InputShape;
use nn::train::{
    evaluate, load_weights, save_checkpoint, train_step, EvalReport, LossKind, Optimizer,
    OptimizerSpec, ParamGroup, Schedule, Target, WEIGHTS_FILE,
};
use nn::VarBuilder;
use nn::{
    collect_params, open_device, Dev, Init, InitScheme, Model, ModelSpec, NnError, VarianceHook,
};

/// The input name under which a checkpoint to start from is found.
pub const INIT_INPUT: &str = "init";
pub const HISTORY_FILE: &str = "history.json";
/// The final metrics (flat name -> number, no timings) for downstream ops and scripts.
pub const METRICS_FILE: &str = "metrics.json";
/// What `lr: arch_aware` / `init: arch_aware` computed: the LR formula's terms and the
/// variance each layer was drawn with.
pub const HPARAMS_FILE: &str = "hparams.json";

/// Trains a model; outputs a checkpoint (`weights.safetensors`, `model.json`) and
/// `history.json`, and reports final metrics.
pub struct TrainOp;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnDivergence {
    /// A non-finite loss fails the stage.
    #[default]
    Stop,
    /// A non-finite loss ends training; the stage succeeds with metric `diverged = 1`.
    Record,
}

/// `lr:` a number, or `arch_aware` (arch-aware-hparams.md §3, from the model's own cell and
/// `base_lr`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum LrChoice {
    Fixed(f64),
    #[default]
    ArchAware,
}

/// `init:` the base scheme alone, or the architecture-aware variances on top of it (§2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum InitChoice {
    #[default]
    Default,
    ArchAware,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// The model; or `model_from`, a model listed by an upstream stage.
    #[serde(default)]
    model: Option<ModelSpec>,
    #[serde(default)]
    model_from: Option<ModelFrom>,
    /// Progressive re-tokenization of a `vit` model (asvit.md §4): `[epoch, factor]` pairs, from
    /// `epoch` on the tokenizer runs at stride 4 factor and dilation factor. Starts at epoch 1,
    /// ends at factor 1.
    #[serde(default)]
    retokenize: Vec<(usize, usize)>,
    /// Name of the dataset input.
    #[serde(default = "default_data")]
    data: String,
    #[serde(default = "default_optimizer")]
    optimizer: OptimizerSpec,
    /// A number or `arch_aware`; resolved into `lr_choice` by [`Params::parse`].
    #[serde(rename = "lr")]
    lr_raw: Value,
    #[serde(skip)]
    lr_choice: LrChoice,
    /// eta_base for `lr: arch_aware`: the maximal LR of the base network.
    #[serde(default)]
    base_lr: Option<f64>,
    /// The base network's cell for `lr: arch_aware` (default per kind, see `hparams.arch_aware`).
    #[serde(default)]
    base_topology: Option<String>,
    #[serde(default)]
    init: InitChoice,
    /// The name of an input holding a `search` result: its chosen cell (`choice.digits` of
    /// `search.json`) is the `nb201` model's cell, so a search's pick trains without knowing
    /// it when the pipeline is written. `model.cell` is then left out.
    #[serde(default)]
    cell_from: Option<String>,
    #[serde(default = "Schedule::constant")]
    schedule: Schedule,
    epochs: usize,
    #[serde(default = "default_batch")]
    batch_size: usize,
    /// Default: cross_entropy for classification, mse for regression.
    #[serde(default)]
    loss: Option<LossKind>,
    /// Maximum global gradient norm.
    #[serde(default)]
    clip: Option<f64>,
    /// Evaluate on the val split every k epochs (and after the last); 0: only after the last.
    #[serde(default = "one")]
    eval_every: usize,
    #[serde(default)]
    on_divergence: OnDivergence,
    /// Checkpoint tensor name pattern -> model parameter pattern (one `*` each, or none);
    /// with a map only matching tensors load, without one every tensor loads by its name.
    #[serde(default)]
    init_map: BTreeMap<String, String>,
    /// Parameter-name prefixes that are not updated.
    #[serde(default)]
    freeze: Vec<String>,
    /// Per-prefix learning-rate multipliers.
    #[serde(default)]
    param_groups: Vec<ParamGroup>,
    /// Train on the first N samples of the training split only (the split is already a seeded
    /// permutation, so this is a fixed random subset, the same for every training seed).
    #[serde(default)]
    samples: Option<usize>,
    #[serde(default)]
    init_scheme: InitScheme,
    #[serde(default)]
    device: Device,
}

/// `model_from:` entry `index` of the `models.json` list that the stage behind input `input`
/// wrote (a `vit` search or a `scale` family).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFrom {
    input: String,
    index: usize,
}

/// The list a `model_from` input holds (`[{label, model}, ...]`).
pub const MODELS_FILE: &str = crate::nas::vit_space::MODELS_FILE;

fn read_model_from(ctx: &RunContext<'_>, from: &ModelFrom) -> Result<ModelSpec, OpError> {
    let dir = one_input(ctx, &from.input)?;
    let path = dir.join(MODELS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        OpError::io(
            format!(
                "model_from: input `{}` has no readable {MODELS_FILE} ({}); point it at a                  `search` (space: vit) or `scale` stage",
                from.input,
                path.display()
            ),
            e,
        )
    })?;
    let list: Vec<Value> = serde_json::from_slice(&bytes).map_err(|e| {
        fail(format!(
            "{}: not a JSON list of models: {e}",
            path.display()
        ))
    })?;
    let Some(entry) = list.get(from.index) else {
        return Err(fail(format!(
            "model_from.index {} is out of range: input `{}` lists {} models (0..={})",
            from.index,
            from.input,
            list.len(),
            list.len().saturating_sub(1)
        )));
    };
    let spec = entry.get("model").cloned().unwrap_or(Value::Null);
    ModelSpec::from_json(spec).map_err(|e| fail(format!("{}[{}]: {e}", path.display(), from.index)))
}

/// The re-tokenization factor of `epoch` (1 without a schedule).
fn token_factor(schedule: &[(usize, usize)], epoch: usize) -> usize {
    schedule
        .iter()
        .rev()
        .find(|(e, _)| *e <= epoch)
        .map_or(1, |(_, d)| *d)
}

fn default_data() -> String {
    "data".into()
}
fn default_optimizer() -> OptimizerSpec {
    OptimizerSpec::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    }
}
fn default_batch() -> usize {
    64
}
fn one() -> usize {
    1
}

fn config_error(e: NnError) -> ParamError {
    match e {
        NnError::InvalidConfig { field, message } => ParamError::new(field, message),
        other => ParamError::new("", other.to_string()),
    }
}

/// `Some(capture)` when `name` matches `pattern` (at most one `*`).
fn match_pattern<'a>(pattern: &str, name: &'a str) -> Option<&'a str> {
    match pattern.split_once('*') {
        None => (pattern == name).then_some(""),
        Some((pre, suf)) => name.strip_prefix(pre)?.strip_suffix(suf),
    }
}

/// The model parameter that checkpoint tensor `name` loads into (`None`: skipped). The most
/// specific pattern (longest literal text) wins.
fn map_name(map: &BTreeMap<String, String>, name: &str) -> Option<String> {
    if map.is_empty() {
        return Some(name.to_string());
    }
    map.iter()
        .filter_map(|(from, to)| match_pattern(from, name).map(|cap| (from.len(), to, cap)))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, to, cap)| to.replacen('*', cap, 1))
}

/// The cell of a DAG model, with its kind, kernel size q (for the LR's q factor) and width.
fn model_cell(model: &ModelSpec) -> Option<(CellKind, &str, Option<usize>, Option<usize>)> {
    match model {
        ModelSpec::MlpDag(s) => Some((CellKind::Mlp, &s.topology, None, Some(s.width))),
        ModelSpec::CnnDag(s) => Some((CellKind::Cnn, &s.topology, Some(s.kernel), Some(s.width))),
        ModelSpec::Nb201(s) => Some((CellKind::Nb201, &s.cell, None, None)),
        _ => None,
    }
}

fn arch_error(e: crate::arch::ArchError) -> ParamError {
    let e: ParamError = e.into();
    let path = if e.path == "topology" {
        "model".to_string()
    } else {
        e.path.clone()
    };
    ParamError::new(path, e.message)
}

/// A cell that stands in for `model.cell` while the params are checked before the `cell_from`
/// input exists; it is replaced before anything is built.
const CELL_FROM_PLACEHOLDER: &str = "0_00_100";

impl Params {
    fn parse(params: &Value) -> Result<Self, ParamError> {
        let mut p: Params = match params.get("cell_from") {
            Some(Value::String(_)) => {
                let mut params = params.clone();
                let model = params.get_mut("model").and_then(Value::as_object_mut);
                match model {
                    Some(m) if m.get("kind").and_then(Value::as_str) == Some("nb201") => {
                        if m.contains_key("cell") {
                            return Err(ParamError::new(
                                "model.cell",
                                "the cell comes from the `cell_from` input",
                            )
                            .with_fix("remove `model.cell` or `cell_from`"));
                        }
                        m.insert("cell".into(), Value::from(CELL_FROM_PLACEHOLDER));
                    }
                    _ => {
                        return Err(ParamError::new(
                            "cell_from",
                            "only an `nb201` model takes its cell from a search",
                        )
                        .with_fix("use `model: {kind: nb201, ...}` without `cell`"))
                    }
                }
                parse_params(&params)?
            }
            _ => parse_params(params)?,
        };
        p.device.check()?;
        match (&p.model, &p.model_from) {
            (Some(m), None) => p.check_model(m)?,
            (None, Some(from)) => {
                if from.input.is_empty() || from.input == p.data {
                    return Err(ParamError::new(
                        "model_from.input",
                        format!(
                            "'{}' must name an input other than the dataset `{}`",
                            from.input, p.data
                        ),
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(ParamError::new(
                    "model_from",
                    "give either `model` or `model_from`, not both",
                ))
            }
            (None, None) => return Err(ParamError::new(
                "model",
                "missing: give `model` or `model_from`",
            )
            .with_fix(
                "e.g. `model_from: {input: family, index: 0}` with `inputs: {family: scale}`",
            )),
        }
        if !p.retokenize.is_empty() {
            let r = &p.retokenize;
            if r[0].0 != 1 {
                return Err(ParamError::new(
                    "retokenize",
                    format!(
                        "starts at epoch {}; the first entry must be epoch 1",
                        r[0].0
                    ),
                ));
            }
            for (i, &(e, d)) in r.iter().enumerate() {
                if d == 0 {
                    return Err(ParamError::new(
                        format!("retokenize.{i}"),
                        "factor must be at least 1",
                    ));
                }
                if e > p.epochs || (i > 0 && e <= r[i - 1].0) {
                    return Err(ParamError::new(
                        format!("retokenize.{i}"),
                        format!(
                            "epoch {e}: epochs must increase and stay within 1..={}",
                            p.epochs
                        ),
                    ));
                }
            }
            if r[r.len() - 1].1 != 1 {
                return Err(ParamError::new(
                    "retokenize",
                    "must end at factor 1 (training finishes, and is evaluated, at full token resolution)",
                )
                .with_fix("append `[EPOCH, 1]`"));
            }
        }
        let arch_aware_asked = matches!(p.lr_raw, Value::String(ref s) if s == "arch_aware")
            || p.init == InitChoice::ArchAware;
        if p.model_from.is_some() && arch_aware_asked {
            return Err(ParamError::new(
                "model_from",
                "`arch_aware` needs the model's cell at planning time; give `model` instead",
            ));
        }
        p.lr_choice = match &p.lr_raw {
            Value::String(s) if s == "arch_aware" => LrChoice::ArchAware,
            v => match v.as_f64() {
                Some(lr) if lr >= 0.0 && lr.is_finite() => LrChoice::Fixed(lr),
                Some(lr) => return Err(ParamError::new("lr", format!("{lr} must be >= 0"))),
                None => {
                    return Err(ParamError::new(
                        "lr",
                        format!("{v} is neither a learning rate nor `arch_aware`"),
                    )
                    .with_fix("write a number (`lr: 0.05`) or `lr: arch_aware` with `base_lr`"))
                }
            },
        };
        let arch_aware = p.lr_choice == LrChoice::ArchAware || p.init == InitChoice::ArchAware;
        if arch_aware && p.model.as_ref().and_then(model_cell).is_none() {
            return Err(ParamError::new(
                "model.kind",
                format!(
                    "`arch_aware` needs a DAG model (mlp_dag, cnn_dag, nb201), not {}",
                    p.model.as_ref().map_or("model_from", ModelSpec::kind)
                ),
            ));
        }
        if p.lr_choice == LrChoice::ArchAware {
            let Some(base_lr) = p.base_lr else {
                return Err(ParamError::new(
                    "base_lr",
                    "`lr: arch_aware` needs `base_lr`, the maximal LR of the base network",
                ));
            };
            if !(base_lr > 0.0 && base_lr.is_finite()) {
                return Err(ParamError::new(
                    "base_lr",
                    format!("{base_lr} must be a positive learning rate"),
                ));
            }
            p.arch_lr().map_err(arch_error)?;
        } else if p.base_lr.is_some() || p.base_topology.is_some() {
            return Err(ParamError::new(
                "base_lr",
                "`base_lr` / `base_topology` only apply with `lr: arch_aware`",
            ));
        }
        if p.epochs == 0 {
            return Err(ParamError::new("epochs", "must be at least 1"));
        }
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "must be at least 1"));
        }
        if let Some(c) = p.clip {
            if !(c > 0.0 && c.is_finite()) {
                return Err(ParamError::new("clip", format!("{c} must be positive")));
            }
        }
        if p.samples == Some(0) {
            return Err(ParamError::new("samples", "must be at least 1"));
        }
        p.optimizer.validate().map_err(config_error)?;
        p.schedule.validate().map_err(config_error)?;
        for (from, to) in &p.init_map {
            let stars = (from.matches('*').count(), to.matches('*').count());
            if stars.0 > 1 || stars.0 != stars.1 {
                return Err(ParamError::new(
                    format!("init_map.{from}"),
                    format!("'{from}' -> '{to}': use one `*` on both sides (`encoder.*: backbone.*`) or none"),
                ));
            }
        }
        if p.freeze.iter().any(String::is_empty) {
            return Err(ParamError::new(
                "freeze",
                "an empty prefix would freeze everything",
            ));
        }
        Ok(p)
    }

    /// These params with `model.cell` set to the cell the `cell_from` input's search chose.
    fn with_searched_cell(&self, ctx: &RunContext<'_>, input: &str) -> Result<Self, OpError> {
        let dir = one_input(ctx, input)?;
        let path = dir.join(crate::nas::SEARCH_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            OpError::io(
                format!(
                    "input `{input}` ({}): cannot read search.json; is it a `search` stage?",
                    path.display()
                ),
                e,
            )
        })?;
        let search: Value = serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("{}: not valid JSON: {e}", path.display())))?;
        let Some(cell) = search["choice"]["digits"].as_str() else {
            return Err(fail(format!(
                "{}: no `choice.digits`; is input `{input}` a `search` result?",
                path.display()
            )));
        };
        let mut p = self.clone();
        match &mut p.model {
            Some(ModelSpec::Nb201(s)) => s.cell = cell.to_string(),
            Some(other) => {
                return Err(fail(format!(
                    "cell_from needs an nb201 model, not {}",
                    other.kind()
                )))
            }
            None => return Err(fail("cell_from needs an nb201 `model`")),
        }
        if let Some(m) = &p.model {
            m.check().map_err(nn)?;
        }
        if p.lr_choice == LrChoice::ArchAware {
            p.arch_lr().map_err(|e| fail(format!("cell {cell}: {e}")))?;
        }
        Ok(p)
    }

    /// The inputs these params read: the dataset, `init` with an `init_map`, `model_from`'s and
    /// `cell_from`'s.
    fn inputs(self) -> Vec<String> {
        let mut v = vec![self.data];
        if !self.init_map.is_empty() {
            v.push(INIT_INPUT.to_string());
        }
        if let Some(from) = self.model_from {
            v.push(from.input);
        }
        v.extend(self.cell_from);
        v
    }

    /// The spec's own checks, and that a `retokenize` schedule has a `vit` to act on.
    fn check_model(&self, m: &ModelSpec) -> Result<(), ParamError> {
        m.check().map_err(|e| match e {
            NnError::InvalidSpec { field, message } => ParamError::new(field, message),
            other => ParamError::new("model", other.to_string()),
        })?;
        if !self.retokenize.is_empty() && !matches!(m, ModelSpec::Vit(_)) {
            return Err(ParamError::new(
                "retokenize",
                format!(
                    "re-tokenization changes a vit tokenizer; the model is {}",
                    m.kind()
                ),
            ));
        }
        Ok(())
    }

    /// These params with `model_from` resolved to `spec`.
    fn with_model(&self, spec: ModelSpec) -> Result<Self, OpError> {
        self.check_model(&spec).map_err(|e| {
            fail(format!(
                "model_from ({}): `{}`: {}",
                self.model_from.as_ref().map_or("", |f| f.input.as_str()),
                e.path,
                e.message
            ))
        })?;
        Ok(Self {
            model: Some(spec),
            model_from: None,
            ..self.clone()
        })
    }

    /// arch-aware-hparams.md §3 for this stage's own cell: eta* from `base_lr`.
    fn arch_lr(&self) -> Result<LrPrediction, crate::arch::ArchError> {
        let Some((kind, topology, kernel, _)) = self.model.as_ref().and_then(model_cell) else {
            return Err(crate::arch::ArchError::invalid(
                "model.kind",
                "not a DAG model",
            ));
        };
        let base_lr = self.base_lr.unwrap_or(f64::NAN);
        let kernel = kernel.filter(|_| kind.has_kernel());
        predict_lr(
            kind,
            topology,
            self.base_topology.as_deref(),
            base_lr,
            kernel,
        )
        .map(|(pred, _, _)| pred)
    }
}

/// Batch data as tensors: `(batch, c, h, w)` and the target.
fn batch_tensors(
    dev: &Dev,
    split: Split,
    input: InputShape,
) -> Result<(nn::Tensor4<f32>, Target<f32>), NnError> {
    let n = split.n;
    let x = from_vec(dev, split.x, (n, input.channels, input.height, input.width))?;
    let target = match split.y {
        Targets::Labels(l) => Target::Labels(l),
        Targets::Values(v) => {
            let per = v.len().checked_div(n).unwrap_or(0);
            Target::Values(from_vec(dev, v, (n, per))?)
        }
    };
    Ok((x, target))
}

pub(crate) fn input_shape(meta: &DatasetMeta) -> InputShape {
    InputShape {
        channels: meta.shape[0],
        height: meta.shape[1],
        width: meta.shape[2],
    }
}

/// The loss for `meta`'s task (or `chosen`) and a check that the model's outputs fit the task.
pub(crate) fn loss_for(
    model: &Model<f32>,
    meta: &DatasetMeta,
    chosen: Option<LossKind>,
) -> Result<LossKind, OpError> {
    let out = model.output_shape();
    match meta.task {
        Task::Classification => {
            let classes = meta.classes.unwrap_or(0);
            if out != [classes] {
                return Err(fail(format!(
                    "the model outputs {out:?} per sample but the dataset has {classes} classes; \
                     set `classes: {classes}` in the model"
                )));
            }
        }
        Task::Regression => {
            // Targets are compared flattened: an MLP's `classes` outputs can fit a [1, 1, F] field.
            let want = meta.target_shape.unwrap_or([1, 1, 1]);
            if out.iter().product::<usize>() != want.iter().product::<usize>() {
                return Err(fail(format!(
                    "the model outputs {out:?} per sample but the dataset's targets are {want:?}"
                )));
            }
        }
    }
    Ok(chosen.unwrap_or(match meta.task {
        Task::Classification => LossKind::CrossEntropy,
        Task::Regression => LossKind::Mse,
    }))
}

/// Evaluates `model` on `split` in eval mode.
pub(crate) fn evaluate_split(
    model: &mut Model<f32>,
    split: &Split,
    kind: LossKind,
    batch_size: usize,
) -> Result<EvalReport, OpError> {
    let dev = open_device().map_err(nn)?;
    let (x, target) = batch_tensors(&dev, split.clone(), model.input_shape()).map_err(nn)?;
    evaluate(model, &x, &target, kind, batch_size).map_err(nn)
}

/// `prefix_loss`, `prefix_accuracy` / `prefix_rel_l2`.
pub(crate) fn report_metrics(prefix: &str, r: &EvalReport) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert(format!("{prefix}loss"), r.loss);
    if let Some(a) = r.accuracy {
        m.insert(format!("{prefix}accuracy"), a);
    }
    if let Some(e) = r.relative_l2 {
        m.insert(format!("{prefix}rel_l2"), e);
    }
    m
}

/// One line of `history.json`.
#[derive(Debug, Clone, Serialize)]
struct EpochRecord {
    epoch: usize,
    steps: u64,
    lr: f64,
    train_loss: f64,
    /// `vit`: stage-1 tokens per image this epoch (re-tokenization changes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_factor: Option<usize>,
    #[serde(flatten)]
    val: BTreeMap<String, f64>,
}

fn load_init(
    model: &mut Model<f32>,
    dir: &Path,
    map: &BTreeMap<String, String>,
) -> Result<Vec<String>, OpError> {
    let loaded = load_weights(model, &dir.join(WEIGHTS_FILE), |n| map_name(map, n)).map_err(nn)?;
    if loaded.is_empty() {
        return Err(fail(format!(
            "init_map {map:?} matched no tensor of the `init` checkpoint; its names look like \
             `stem.weight`, `cells.0.edges.1.conv.weight`"
        )));
    }
    Ok(loaded)
}

/// Variance one layer's weights were drawn with (`init: arch_aware`).
#[derive(Clone, Debug, Serialize)]
struct DrawnLayer {
    layer: String,
    fan_in: usize,
    /// `None`: the layer kept the base scheme (e.g. NB201 reduction blocks).
    variance: Option<f64>,
}

/// The architecture-aware hook, recording what it was asked so the stage can report the
/// variances it actually used.
struct RecordingHook {
    inner: ArchAwareInit,
    drawn: Mutex<Vec<DrawnLayer>>,
}

impl VarianceHook for RecordingHook {
    fn weight_variance(&self, layer: &str, fan_in: usize, fan_out: usize) -> Option<f64> {
        let v = self.inner.weight_variance(layer, fan_in, fan_out);
        if let Ok(mut drawn) = self.drawn.lock() {
            // Weights and biases both ask; record each layer once.
            if !drawn.iter().any(|d| d.layer == layer) {
                drawn.push(DrawnLayer {
                    layer: layer.to_string(),
                    fan_in,
                    variance: v,
                });
            }
        }
        v
    }
}

/// What a training run is for: a full `train` stage, or one `lr.probe` epoch (no checkpoint,
/// no evaluation, divergence recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Train,
    Probe,
}

/// Writes the metrics (without timings, which would make equal runs differ) as `metrics.json`.
pub(crate) fn write_metrics(dir: &Path, metrics: &Metrics) -> Result<(), OpError> {
    let flat: BTreeMap<&str, f64> = metrics
        .iter()
        .filter(|(k, v)| v.is_finite() && !k.ends_with("time_s"))
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    let path = dir.join(METRICS_FILE);
    let json = serde_json::to_vec_pretty(&flat).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| OpError::io(path.display().to_string(), e))
}

/// Trains per `p` and fills `ctx.metrics`; writes history, metrics and (for `train`) the
/// checkpoint into the stage's output folder.
fn fit(ctx: &mut RunContext<'_>, p: &Params, purpose: Purpose) -> Result<(), OpError> {
    let started = Instant::now();
    let searched;
    let p = match &p.cell_from {
        Some(input) => {
            searched = p.with_searched_cell(ctx, input)?;
            if let Some(ModelSpec::Nb201(s)) = &searched.model {
                let _ = writeln!(ctx.log, "cell {} from input `{input}`", s.cell);
            }
            &searched
        }
        None => p,
    };
    let resolved;
    let p = match &p.model_from {
        Some(from) => {
            let spec = read_model_from(ctx, from)?;
            let _ = writeln!(
                ctx.log,
                "model_from: entry {} of input `{}`: {}",
                from.index,
                from.input,
                serde_json::to_string(&spec).unwrap_or_default()
            );
            resolved = p.with_model(spec)?;
            &resolved
        }
        None => p,
    };
    let Some(spec) = p.model.as_ref() else {
        return Err(fail("no model: give `model` or `model_from`"));
    };
    let data = one_input(ctx, &p.data)?.to_path_buf();
    let meta = read_meta(&data)?;
    let mut train = read_split(&data, &meta, "train")?;
    if let Some(n) = p.samples {
        train = train.head(n);
    }
    if train.n == 0 {
        return Err(fail("the training split is empty"));
    }
    let (val, test) = match purpose {
        Purpose::Train => (
            read_split(&data, &meta, "val")?,
            read_split(&data, &meta, "test")?,
        ),
        Purpose::Probe => (train.head(0), train.head(0)),
    };
    let dev = open_device().map_err(nn)?;
    let input = input_shape(&meta);
    let mut init = Init::new(p.init_scheme);
    let mut hparams = serde_json::Map::new();
    let base_lr = match p.lr_choice {
        LrChoice::Fixed(lr) => lr,
        LrChoice::ArchAware => {
            let pred = p.arch_lr()?;
            let _ = writeln!(
                ctx.log,
                "lr: arch_aware = {:.6} ({:.4} x base_lr {}; {} path(s), sum L^3 {} vs base {})",
                pred.lr,
                pred.lr_ratio,
                p.base_lr.unwrap_or_default(),
                pred.num_paths,
                pred.sum_l3,
                pred.base_sum_l3
            );
            ctx.metrics.insert("lr_ratio".into(), pred.lr_ratio);
            ctx.metrics
                .insert("num_paths".into(), pred.num_paths as f64);
            ctx.metrics.insert("sum_L3".into(), pred.sum_l3);
            hparams.insert(
                "lr".into(),
                serde_json::json!({
                    "rule": "arch_aware: eta* = base_lr * sqrt(sum_base L^3 / sum L_p^3) * (q_base / q)",
                    "base_lr": p.base_lr,
                    "base_topology": p.base_topology,
                    "prediction": pred,
                }),
            );
            pred.lr
        }
    };
    ctx.metrics.insert("lr".into(), base_lr);
    let hook = match (p.init, model_cell(spec)) {
        (InitChoice::ArchAware, Some((kind, topology, _, _))) => {
            let cell = Cell::parse(kind, "model", topology)?;
            let hook = Arc::new(RecordingHook {
                inner: ArchAwareInit { cell },
                drawn: Mutex::new(Vec::new()),
            });
            init = init.with_hook(hook.clone());
            Some(hook)
        }
        _ => None,
    };
    ctx.metrics.insert(
        "init_arch_aware".into(),
        if hook.is_some() { 1.0 } else { 0.0 },
    );
    let vb = VarBuilder::new(&dev, &init, derive_seed(ctx.seed, 10));
    let mut model = Model::<f32>::build(spec, input, vb).map_err(nn)?;
    if let (ModelSpec::Vit(v), false) = (spec, p.retokenize.is_empty()) {
        for &(epoch, d) in &p.retokenize {
            v.grids(input.height, d).map_err(|e| {
                fail(format!(
                    "retokenize: factor {d} (from epoch {epoch}) does not fit: {e}"
                ))
            })?;
        }
    }
    if let Some(hook) = hook {
        let drawn = hook.drawn.lock().map(|d| d.clone()).unwrap_or_default();
        let hooked = drawn.iter().filter(|d| d.variance.is_some()).count();
        let _ = writeln!(
            ctx.log,
            "init: arch_aware drew {hooked} of {} layers by the path rule",
            drawn.len()
        );
        ctx.metrics
            .insert("init_arch_aware_layers".into(), hooked as f64);
        hparams.insert(
            "init".into(),
            serde_json::json!({
                "rule": "cell edge s->t: Var = 2 / (d_in(s) * fan_in) (source in-degree); \
                         stem 2 / fan_in; readout 4 / fan_in^2; other layers: init_scheme",
                "layers": drawn,
            }),
        );
    }
    if !hparams.is_empty() {
        let path = ctx.out_dir.join(HPARAMS_FILE);
        let json = serde_json::to_vec_pretty(&hparams).map_err(|e| fail(e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| OpError::io(path.display().to_string(), e))?;
    }
    let kind = loss_for(&model, &meta, p.loss)?;

    if ctx.inputs.contains_key(INIT_INPUT) {
        let dir = one_input(ctx, INIT_INPUT)?.to_path_buf();
        let loaded = load_init(&mut model, &dir, &p.init_map)?;
        let _ = writeln!(ctx.log, "init: loaded {} tensors", loaded.len());
        ctx.metrics
            .insert("init_tensors".into(), loaded.len() as f64);
    }
    let names: Vec<String> = collect_params(&model).into_iter().map(|(n, _)| n).collect();
    let mut groups = p.param_groups.clone();
    for prefix in &p.freeze {
        if !names.iter().any(|n| n.starts_with(prefix.as_str())) {
            return Err(fail(format!(
                "freeze prefix '{prefix}' matches no parameter; names look like {:?}",
                names.iter().take(4).collect::<Vec<_>>()
            )));
        }
        groups.push(ParamGroup {
            prefix: prefix.clone(),
            lr_multiplier: 0.0,
        });
    }
    let mut opt = Optimizer::new(p.optimizer.clone(), groups).map_err(nn)?;

    let bs = p.batch_size;
    let steps_per_epoch = train.n.div_ceil(bs) as u64;
    let total_steps = steps_per_epoch * p.epochs as u64;
    let eval_bs = bs.max(128);
    let mut shuffle = StdRng::seed_from_u64(derive_seed(ctx.seed, 11));
    let mut fctx = ForwardCtx::train(derive_seed(ctx.seed, 12));
    let mut history = Vec::new();
    let mut step = 0u64;
    let mut diverged = None;
    let mut last_report = Instant::now();
    let mut last_val = BTreeMap::new();
    let _ = writeln!(
            ctx.log,
            "{} ({} trainable) on {} samples of {:?}: {} epochs x {steps_per_epoch} steps, loss {kind:?}",
            spec.kind(),
            model.num_trainable(),
            train.n,
            meta.shape,
            p.epochs
        );
    // (token factor, seconds of training steps) per finished epoch.
    let mut epoch_times: Vec<(usize, f64)> = Vec::new();
    'epochs: for epoch in 1..=p.epochs {
        let factor = token_factor(&p.retokenize, epoch);
        let tokens = match model.vit_mut() {
            Some(vit) => {
                if vit.token_factor() != factor {
                    vit.set_token_factor(factor).map_err(nn)?;
                    let _ = writeln!(ctx.log, "epoch {epoch}: tokenizer factor {factor}");
                }
                Some(vit.tokens_per_image(input.height))
            }
            None => None,
        };
        let epoch_started = Instant::now();
        let mut order: Vec<usize> = (0..train.n).collect();
        order.shuffle(&mut shuffle);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut lr = base_lr;
        for chunk in order.chunks(bs) {
            ctx.check_cancelled()?;
            let (x, target) = batch_tensors(&dev, train.gather(chunk), input).map_err(nn)?;
            lr = p.schedule.lr_at(base_lr, step, total_steps);
            match train_step(
                &mut model, &mut opt, x, &target, kind, lr, p.clip, &mut fctx, step,
            ) {
                Ok(r) => {
                    loss_sum += r.loss * chunk.len() as f64;
                    seen += chunk.len();
                }
                Err(NnError::NonFiniteLoss { step, value }) => {
                    let _ = writeln!(ctx.log, "epoch {epoch} step {step}: loss {value}");
                    if p.on_divergence == OnDivergence::Stop {
                        return Err(fail(format!(
                            "loss became {value} at step {step} (epoch {epoch}, lr {lr:.3e}): \
                                 training diverged; lower `lr`, set `clip`, or set \
                                 `on_divergence: record` to record it as a result"
                        )));
                    }
                    diverged = Some(step);
                    break 'epochs;
                }
                Err(e) => return Err(nn(e)),
            }
            step += 1;
            if last_report.elapsed() > Duration::from_secs(1) {
                ctx.progress.report(&format!(
                    "epoch {epoch}/{} step {step}/{total_steps} loss {:.4}",
                    p.epochs,
                    loss_sum / seen.max(1) as f64
                ));
                last_report = Instant::now();
            }
        }
        epoch_times.push((factor, epoch_started.elapsed().as_secs_f64()));
        let train_loss = loss_sum / seen.max(1) as f64;
        let due = epoch == p.epochs || (p.eval_every > 0 && epoch % p.eval_every == 0);
        let mut val_metrics = BTreeMap::new();
        if due && val.n > 0 {
            let r = evaluate_split(&mut model, &val, kind, eval_bs)?;
            val_metrics = report_metrics("val_", &r);
            last_val = val_metrics.clone();
        }
        let shown: String = val_metrics
            .iter()
            .map(|(k, v)| format!(" {k} {v:.4}"))
            .collect();
        let line = format!("epoch {epoch}/{} loss {train_loss:.4}{shown}", p.epochs);
        ctx.progress.report(&line);
        let _ = writeln!(ctx.log, "{line} lr {lr:.3e}");
        history.push(EpochRecord {
            epoch,
            steps: step,
            lr,
            train_loss,
            tokens,
            token_factor: tokens.map(|_| factor),
            val: val_metrics,
        });
    }

    if purpose == Purpose::Train {
        save_checkpoint(&model, ctx.out_dir).map_err(nn)?;
    }
    let path = ctx.out_dir.join(HISTORY_FILE);
    let json = serde_json::to_vec_pretty(&history).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| OpError::io(path.display().to_string(), e))?;

    let m = &mut ctx.metrics;
    if let Some(last) = history.last() {
        m.insert("train_loss".into(), last.train_loss);
    }
    m.insert("epochs".into(), history.len() as f64);
    if let ModelSpec::Vit(v) = spec {
        // Multiply-accumulates per image at full token resolution (ViT papers' "FLOPs").
        if let Ok(macs) = v.macs(input.channels, input.height, 1) {
            m.insert("macs".into(), macs as f64);
            // The forward compute of the epochs run, as a fraction of the same epochs at
            // factor 1: the machine-independent side of the saving.
            if !p.retokenize.is_empty() && !epoch_times.is_empty() {
                let run: f64 = epoch_times
                    .iter()
                    .map(|(d, _)| v.macs(input.channels, input.height, *d).unwrap_or(macs) as f64)
                    .sum();
                m.insert(
                    "retokenize_macs_fraction".into(),
                    run / (macs as f64 * epoch_times.len() as f64),
                );
            }
        }
    }
    if let (Some(first), Some(last)) = (
        history.first().and_then(|r| r.tokens),
        history.last().and_then(|r| r.tokens),
    ) {
        m.insert("tokens_first_epoch".into(), first as f64);
        m.insert("tokens_last_epoch".into(), last as f64);
    }
    // Wall time of the training steps (evaluation excluded). With re-tokenization, the fixed
    // schedule is estimated as every epoch costing the mean of the epochs run at factor 1
    // (the schedule ends there); saved = estimate - measured. Timings stay out of metrics.json.
    let train_time: f64 = epoch_times.iter().map(|(_, t)| t).sum();
    m.insert("train_time_s".into(), train_time);
    if !p.retokenize.is_empty() {
        let full: Vec<f64> = epoch_times
            .iter()
            .filter(|(d, _)| *d == 1)
            .map(|(_, t)| *t)
            .collect();
        if !full.is_empty() {
            let estimate = full.iter().sum::<f64>() / full.len() as f64 * epoch_times.len() as f64;
            m.insert("retokenize_fixed_estimate_time_s".into(), estimate);
            m.insert("retokenize_saved_time_s".into(), estimate - train_time);
        }
    }
    m.insert("steps".into(), step as f64);
    m.insert("params".into(), model.num_trainable() as f64);
    m.insert(
        "diverged".into(),
        if diverged.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(s) = diverged {
        m.insert("diverged_step".into(), s as f64);
    } else {
        m.extend(last_val);
        if test.n > 0 {
            let r = evaluate_split(&mut model, &test, kind, eval_bs)?;
            m.extend(report_metrics("test_", &r));
        }
    }
    write_metrics(ctx.out_dir, &ctx.metrics)?;
    ctx.metrics
        .insert("wall_time_s".into(), started.elapsed().as_secs_f64());
    Ok(())
}

impl Op for TrainOp {
    fn name(&self) -> &'static str {
        "train"
    }
    /// 2: `lr: arch_aware`, `init: arch_aware`; writes `metrics.json` (and `hparams.json`).
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "trains a `model:` on a dataset input; outputs a checkpoint, history.json and metrics.json"
    }
    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        Params::parse(params).map(|_| ())
    }
    fn required_inputs(&self, params: &Value) -> Vec<String> {
        Params::parse(params)
            .map(Params::inputs)
            .unwrap_or_default()
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let p = Params::parse(ctx.params)?;
        fit(ctx, &p, Purpose::Train)
    }
}

/// `lr.probe`: one learning rate of an empirical maximal-LR grid search
/// (arch-aware-hparams.md §3: the maximal LR is the one with the smallest training loss after
/// one epoch). The params are `train`'s, with `epochs` defaulting to 1; divergence is always
/// recorded (`diverged = 1`, no `train_loss`), never a failure. No checkpoint and no evaluation
/// are written: the result is `metrics.json` (`lr`, `train_loss`, `diverged`) and
/// `history.json`. One probe per stage, so a grid is a matrix over `lr` whose points are cached
/// one by one and a grid can be refined by adding values; `lr.pick` reads them.
pub struct LrProbeOp;

impl LrProbeOp {
    fn params(params: &Value) -> Result<Params, ParamError> {
        let Value::Object(map) = params else {
            return Err(ParamError::new("", "params must be a mapping"));
        };
        for fixed in ["on_divergence", "eval_every", "init_map", "freeze"] {
            if map.contains_key(fixed) {
                return Err(ParamError::new(
                    fixed,
                    "is fixed by lr.probe (divergence is recorded, nothing is evaluated, no \
                     checkpoint is loaded)",
                ));
            }
        }
        let mut map = map.clone();
        map.entry("epochs").or_insert(Value::from(1));
        map.insert("on_divergence".into(), Value::from("record"));
        map.insert("eval_every".into(), Value::from(0));
        Params::parse(&Value::Object(map))
    }
}

impl Op for LrProbeOp {
    fn name(&self) -> &'static str {
        "lr.probe"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "trains one epoch at one LR (a `train` model spec) and records the final training loss; \
         divergence recorded, not failed; a grid is a matrix over `lr`, read by `lr.pick`"
    }
    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        Self::params(params).map(|_| ())
    }
    fn required_inputs(&self, params: &Value) -> Vec<String> {
        Self::params(params).map(Params::inputs).unwrap_or_default()
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let p = Self::params(ctx.params)?;
        fit(ctx, &p, Purpose::Probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::dataset::{write_dataset, Split, Targets};
    use crate::ml::testing::run_op;
    use crate::ml::EvaluateOp;
    use serde_json::json;

    #[test]
    fn init_map_patterns() {
        let map: BTreeMap<String, String> = [
            ("encoder.*".to_string(), "backbone.*".to_string()),
            ("encoder.head.*".to_string(), "skip.*".to_string()),
            ("stem.weight".to_string(), "stem.weight".to_string()),
        ]
        .into();
        assert_eq!(
            map_name(&map, "encoder.0.w").as_deref(),
            Some("backbone.0.w")
        );
        assert_eq!(map_name(&map, "encoder.head.b").as_deref(), Some("skip.b"));
        assert_eq!(
            map_name(&map, "stem.weight").as_deref(),
            Some("stem.weight")
        );
        assert_eq!(map_name(&map, "stem.bias"), None);
        assert_eq!(map_name(&BTreeMap::new(), "a.b").as_deref(), Some("a.b"));
        let bad = json!({"model": {"kind": "mlp_dag", "topology": "2", "width": 2, "classes": 2},
            "lr": 0.1, "epochs": 1, "init_map": {"a.*": "b"}});
        assert!(TrainOp.validate(&bad).is_err());
        let bad_cell = json!({"model": {"kind": "cnn_dag", "topology": "2_1x", "width": 2, "classes": 2},
            "lr": 0.1, "epochs": 1});
        assert_eq!(
            TrainOp.validate(&bad_cell).unwrap_err().path,
            "model.topology"
        );
        // A build takes its own device and refuses the other one, naming the fix.
        let on = |device: &str| {
            json!({"model": {"kind": "mlp_dag", "topology": "2", "width": 2, "classes": 2},
                "lr": 0.1, "epochs": 1, "device": device})
        };
        let (other, own) = if cfg!(feature = "cuda") {
            ("cpu", "cuda")
        } else {
            ("cuda", "cpu")
        };
        TrainOp.validate(&on(own)).unwrap();
        let e = TrainOp.validate(&on(other)).unwrap_err();
        assert_eq!(e.path, "device");
        let fix = e.fix.clone().unwrap_or_default();
        assert!(fix.contains(&format!("device: {own}")), "{e:?}");
    }

    /// A periodic n x n field f solved through a screened Poisson equation (1 - Laplacian / 2) u
    /// = f in integer wave numbers k, with a naive 2-D DFT: u_hat(k) = f_hat(k) / (1 + |k|^2 / 2).
    fn smooth(f: &[f64], n: usize) -> Vec<f64> {
        use std::f64::consts::PI;
        let freq = |k: usize| {
            if k <= n / 2 {
                k as f64
            } else {
                k as f64 - n as f64
            }
        };
        let mut re = vec![0.0; n * n];
        let mut im = vec![0.0; n * n];
        for k1 in 0..n {
            for k2 in 0..n {
                for x1 in 0..n {
                    for x2 in 0..n {
                        let a = -2.0 * PI * ((k1 * x1) as f64 + (k2 * x2) as f64) / n as f64;
                        re[k1 * n + k2] += f[x1 * n + x2] * a.cos();
                        im[k1 * n + k2] += f[x1 * n + x2] * a.sin();
                    }
                }
            }
        }
        let mut u = vec![0.0; n * n];
        for k1 in 0..n {
            for k2 in 0..n {
                let k2sum = freq(k1).powi(2) + freq(k2).powi(2);
                let g = 1.0 / (1.0 + 0.5 * k2sum);
                for x1 in 0..n {
                    for x2 in 0..n {
                        let a = 2.0 * PI * ((k1 * x1) as f64 + (k2 * x2) as f64) / n as f64;
                        u[x1 * n + x2] += g
                            * (re[k1 * n + k2] * a.cos() - im[k1 * n + k2] * a.sin())
                            / (n * n) as f64;
                    }
                }
            }
        }
        u
    }

    #[test]
    fn fno_learns_a_screened_poisson_solve_through_the_ops() {
        use rand::Rng;
        let n = 8;
        let mut rng = StdRng::seed_from_u64(4);
        let mut make = |count: usize| {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for _ in 0..count {
                // f: a few random low-frequency modes.
                let f: Vec<f64> = {
                    let c: Vec<f64> = (0..8).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    (0..n * n)
                        .map(|i| {
                            let (a, b) = ((i / n) as f64, (i % n) as f64);
                            let w = 2.0 * std::f64::consts::PI / n as f64;
                            c[0] * (w * a).sin()
                                + c[1] * (w * b).cos()
                                + c[2] * (w * (a + b)).sin()
                                + c[3] * (2.0 * w * a).cos()
                                + c[4] * (2.0 * w * b).sin()
                                + c[5] * (w * (a - b)).cos()
                                + c[6] * (3.0 * w * a).sin()
                                + c[7]
                        })
                        .collect()
                };
                let u = smooth(&f, n);
                x.extend(f.iter().map(|v| *v as f32));
                y.extend(u.iter().map(|v| *v as f32));
            }
            Split {
                n: count,
                x,
                y: Targets::Values(y),
            }
        };
        let splits = [make(96), make(32), make(0)];
        let ws = tempfile::tempdir().unwrap();
        let data = ws.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let meta = DatasetMeta {
            task: Task::Regression,
            classes: None,
            shape: [1, n, n],
            target_shape: Some([1, n, n]),
            samples: BTreeMap::new(),
            source: "test".into(),
            normalization: None,
        };
        write_dataset(&data, meta, &splits).unwrap();
        let params = json!({
            "model": {"kind": "fno2d", "width": 6, "modes": [3, 3], "layers": 2, "head_width": 16},
            "optimizer": {"kind": "adamw", "weight_decay": 0.0},
            "lr": 0.01, "epochs": 40, "batch_size": 16,
            "schedule": {"kind": "cosine"}, "eval_every": 0,
        });
        let out = ws.path().join("fno");
        let m = run_op(&TrainOp, params, &[("data", &data)], ws.path(), &out, 1).unwrap();
        // Stated threshold: below 5% relative L2 on held-out fields (measured: 1.9%).
        assert!(m["val_rel_l2"] < 0.05, "{m:?}");
        let ev = ws.path().join("ev");
        let e = run_op(
            &EvaluateOp,
            json!({"split": "val"}),
            &[("model", &out), ("data", &data)],
            ws.path(),
            &ev,
            0,
        )
        .unwrap();
        assert!(
            (e["rel_l2"] - m["val_rel_l2"]).abs() < 1e-6,
            "{e:?} vs {m:?}"
        );
    }

    /// A tiny classification set: 60 images of 1 x 8 x 8 from the synthetic generator.
    fn tiny_images(ws: &Path) -> std::path::PathBuf {
        let data = ws.join("images");
        let params = json!({"samples": 60, "size": 8, "val_fraction": 0.2, "test_fraction": 0.0});
        run_op(&crate::ml::SyntheticImagesOp, params, &[], ws, &data, 1).unwrap();
        data
    }

    fn small_cnn(extra: Value) -> Value {
        let mut p = json!({
            "model": {"kind": "cnn_dag", "topology": "2", "width": 3, "classes": 10},
            "lr": 0.05, "epochs": 2, "batch_size": 16,
        });
        if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        p
    }

    fn tiny_vit() -> Value {
        json!({"kind": "vit", "kernels": [4], "splits": [1], "expansions": [2], "heads": 1,
               "hidden": 8, "classes": 10})
    }

    #[test]
    fn vit_retokenization_changes_the_token_count_and_trains() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        let out = ws.path().join("retok");
        let params = json!({
            "model": tiny_vit(), "lr": 0.05, "epochs": 3, "batch_size": 16,
            "retokenize": [[1, 2], [2, 1]],
        });
        let m = run_op(&TrainOp, params, &[("data", &data)], ws.path(), &out, 1).unwrap();
        let history: Vec<Value> =
            serde_json::from_slice(&std::fs::read(out.join(HISTORY_FILE)).unwrap()).unwrap();
        // 8 x 8 images: stride 8, dilation 2 -> 1 token; then stride 4 -> 2 x 2 tokens.
        let tokens: Vec<u64> = history
            .iter()
            .map(|r| r["tokens"].as_u64().unwrap())
            .collect();
        assert_eq!(tokens, [1, 4, 4]);
        assert_eq!(
            (m["tokens_first_epoch"], m["tokens_last_epoch"]),
            (1.0, 4.0)
        );
        let spec = match ModelSpec::from_json(tiny_vit()).unwrap() {
            ModelSpec::Vit(v) => v,
            other => panic!("{other:?}"),
        };
        let full = spec.macs(1, 8, 1).unwrap() as f64;
        assert_eq!(m["macs"], full);
        // One epoch at factor 2, two at factor 1.
        let want = (spec.macs(1, 8, 2).unwrap() as f64 + 2.0 * full) / (3.0 * full);
        assert!(
            (m["retokenize_macs_fraction"] - want).abs() < 1e-12,
            "{m:?}"
        );
        assert!(m["retokenize_macs_fraction"] < 1.0);
        assert!(
            m["train_loss"].is_finite() && m["val_accuracy"] >= 0.0,
            "{m:?}"
        );
        assert!(m["retokenize_fixed_estimate_time_s"] > 0.0, "{m:?}");
        let saved = m["retokenize_saved_time_s"];
        let want = m["retokenize_fixed_estimate_time_s"] - m["train_time_s"];
        assert!((saved - want).abs() < 1e-9, "{m:?}");

        // Without a schedule: the same tokens every epoch, no saving recorded.
        let plain = json!({"model": tiny_vit(), "lr": 0.05, "epochs": 2, "batch_size": 16});
        let m = run_op(
            &TrainOp,
            plain,
            &[("data", &data)],
            ws.path(),
            &ws.path().join("p"),
            1,
        )
        .unwrap();
        assert_eq!(
            (m["tokens_first_epoch"], m["tokens_last_epoch"]),
            (4.0, 4.0)
        );
        assert!(!m.contains_key("retokenize_saved_time_s"));

        // A factor whose tokenizer span exceeds the image is refused before training.
        let big =
            json!({"model": tiny_vit(), "lr": 0.05, "epochs": 2, "retokenize": [[1, 4], [2, 1]]});
        let e = run_op(
            &TrainOp,
            big,
            &[("data", &data)],
            ws.path(),
            &ws.path().join("b"),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("factor 4"), "{e}");
    }

    #[test]
    fn model_from_takes_an_entry_of_an_upstream_models_list() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        let family = ws.path().join("family");
        std::fs::create_dir(&family).unwrap();
        let other = json!({"kind": "mlp_dag", "topology": "2", "width": 4, "classes": 10});
        std::fs::write(
            family.join("models.json"),
            serde_json::to_vec(
                &json!([{"label": "a", "model": other}, {"label": "b", "model": tiny_vit()}]),
            )
            .unwrap(),
        )
        .unwrap();
        let from = json!({"model_from": {"input": "family", "index": 1}, "lr": 0.05, "epochs": 1});
        assert_eq!(TrainOp.required_inputs(&from), ["data", "family"]);
        let a = ws.path().join("a");
        run_op(
            &TrainOp,
            from,
            &[("data", &data), ("family", &family)],
            ws.path(),
            &a,
            3,
        )
        .unwrap();
        let b = ws.path().join("b");
        let direct = json!({"model": tiny_vit(), "lr": 0.05, "epochs": 1});
        run_op(&TrainOp, direct, &[("data", &data)], ws.path(), &b, 3).unwrap();
        assert_eq!(
            std::fs::read(a.join(WEIGHTS_FILE)).unwrap(),
            std::fs::read(b.join(WEIGHTS_FILE)).unwrap()
        );
        let bad = json!({"model_from": {"input": "family", "index": 2}, "lr": 0.05, "epochs": 1});
        let e = run_op(
            &TrainOp,
            bad,
            &[("data", &data), ("family", &family)],
            ws.path(),
            &ws.path().join("c"),
            3,
        )
        .unwrap_err();
        assert!(e.to_string().contains("lists 2 models"), "{e}");
        // Re-tokenizing the MLP entry is refused once the entry is known.
        let mlp = json!({"model_from": {"input": "family", "index": 0}, "lr": 0.05, "epochs": 2,
                         "retokenize": [[1, 2], [2, 1]]});
        let e = run_op(
            &TrainOp,
            mlp,
            &[("data", &data), ("family", &family)],
            ws.path(),
            &ws.path().join("d"),
            3,
        )
        .unwrap_err();
        assert!(e.to_string().contains("retokenize"), "{e}");
    }

    #[test]
    fn model_and_retokenize_params_are_checked() {
        let path = |v: Value| TrainOp.validate(&v).unwrap_err().path;
        let cnn = json!({"kind": "cnn_dag", "topology": "2", "width": 3, "classes": 10});
        assert_eq!(path(json!({"lr": 0.1, "epochs": 2})), "model");
        assert_eq!(
            path(
                json!({"model": tiny_vit(), "model_from": {"input": "f", "index": 0}, "lr": 0.1, "epochs": 2})
            ),
            "model_from"
        );
        assert_eq!(
            path(json!({"model": cnn, "lr": 0.1, "epochs": 2, "retokenize": [[1, 2], [2, 1]]})),
            "retokenize"
        );
        let vit = |r: Value| json!({"model": tiny_vit(), "lr": 0.1, "epochs": 3, "retokenize": r});
        assert_eq!(path(vit(json!([[2, 2], [3, 1]]))), "retokenize");
        assert_eq!(path(vit(json!([[1, 2], [2, 2]]))), "retokenize");
        assert_eq!(path(vit(json!([[1, 2], [4, 1]]))), "retokenize.1");
        assert_eq!(path(vit(json!([[1, 0], [2, 1]]))), "retokenize.0");
        assert!(TrainOp.validate(&vit(json!([[1, 2], [3, 1]]))).is_ok());
    }

    #[test]
    fn same_seed_gives_identical_weights_and_another_seed_does_not() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        let run = |name: &str, seed: u64| {
            let out = ws.path().join(name);
            run_op(
                &TrainOp,
                small_cnn(json!({})),
                &[("data", &data)],
                ws.path(),
                &out,
                seed,
            )
            .unwrap();
            (
                std::fs::read(out.join(WEIGHTS_FILE)).unwrap(),
                std::fs::read(out.join(HISTORY_FILE)).unwrap(),
            )
        };
        let (a, b, c) = (run("a", 7), run("b", 7), run("c", 8));
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
        let history: Vec<Value> = serde_json::from_slice(&a.1).unwrap();
        assert_eq!(history.len(), 2);
        assert!(history[1]["val_accuracy"].is_number(), "{history:?}");
    }

    #[test]
    fn init_map_loads_and_freeze_keeps_weights() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        let first = ws.path().join("first");
        run_op(
            &TrainOp,
            small_cnn(json!({})),
            &[("data", &data)],
            ws.path(),
            &first,
            1,
        )
        .unwrap();
        let second = ws.path().join("second");
        let params = small_cnn(json!({"init_map": {"stem*": "stem*"}, "freeze": ["stem."]}));
        assert_eq!(TrainOp.required_inputs(&params), ["data", "init"]);
        let m = run_op(
            &TrainOp,
            params,
            &[("data", &data), ("init", &first)],
            ws.path(),
            &second,
            2,
        )
        .unwrap();
        // stem.weight, stem_bn.{weight, bias, running_mean, running_var}.
        assert_eq!(m["init_tensors"], 5.0);
        let read = |dir: &Path| {
            let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
            let f = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let names = ["stem.weight", "edges.0.conv.weight"];
            names.map(|n| f.tensor(n).unwrap().data().to_vec())
        };
        let (a, b) = (read(&first), read(&second));
        assert_eq!(a[0], b[0], "the frozen, loaded stem is unchanged");
        assert_ne!(a[1], b[1]);
        let bad = small_cnn(json!({"freeze": ["nothing.here"]}));
        let err = run_op(
            &TrainOp,
            bad,
            &[("data", &data)],
            ws.path(),
            &ws.path().join("x"),
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("matches no parameter"), "{err}");
    }

    #[test]
    fn divergence_stops_or_is_recorded() {
        let ws = tempfile::tempdir().unwrap();
        let data = ws.path().join("reg");
        std::fs::create_dir(&data).unwrap();
        let n = 32;
        let split = |n: usize| Split {
            n,
            x: (0..n * 4).map(|v| (v % 7) as f32).collect(),
            y: Targets::Values((0..n * 2).map(|v| (v % 3) as f32).collect()),
        };
        let meta = DatasetMeta {
            task: Task::Regression,
            classes: None,
            shape: [1, 2, 2],
            target_shape: Some([1, 1, 2]),
            samples: BTreeMap::new(),
            source: "test".into(),
            normalization: None,
        };
        write_dataset(&data, meta, &[split(n), split(4), split(0)]).unwrap();
        let params = |mode: &str| {
            json!({
                "model": {"kind": "mlp_dag", "topology": "2", "width": 8, "classes": 2},
                "optimizer": {"kind": "sgd", "momentum": 0.9},
                "lr": 1e8, "epochs": 20, "batch_size": 8, "on_divergence": mode,
            })
        };
        let err = run_op(
            &TrainOp,
            params("stop"),
            &[("data", &data)],
            ws.path(),
            &ws.path().join("a"),
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("training diverged"), "{err}");
        let m = run_op(
            &TrainOp,
            params("record"),
            &[("data", &data)],
            ws.path(),
            &ws.path().join("b"),
            0,
        )
        .unwrap();
        assert_eq!(m["diverged"], 1.0);
        assert!(
            m["steps"] < 160.0 && m.contains_key("diverged_step"),
            "{m:?}"
        );
        assert!(ws.path().join("b").join(WEIGHTS_FILE).exists());
    }

    #[test]
    fn arch_aware_lr_and_init_come_from_the_models_own_cell() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        let out = ws.path().join("aware");
        let params = json!({
            "model": {"kind": "mlp_dag", "topology": "2_21_112", "width": 16, "classes": 10},
            "lr": "arch_aware", "base_lr": 0.4, "init": "arch_aware",
            "epochs": 1, "batch_size": 16,
        });
        let m = run_op(&TrainOp, params, &[("data", &data)], ws.path(), &out, 1).unwrap();
        // Paths of "2_21_112": d = 2, 1, 2, 0 -> L = 5, 4, 5, 3 (sum L^3 = 341); base "1": 27.
        let want = 0.4 * (27.0f64 / 341.0).sqrt();
        assert!((m["lr"] - want).abs() < 1e-12, "{m:?}");
        assert_eq!(m["num_paths"], 4.0);
        assert_eq!(m["init_arch_aware"], 1.0);
        let history: Vec<Value> =
            serde_json::from_slice(&std::fs::read(out.join(HISTORY_FILE)).unwrap()).unwrap();
        assert!((history[0]["lr"].as_f64().unwrap() - want).abs() < 1e-12);
        let written: BTreeMap<String, f64> =
            serde_json::from_slice(&std::fs::read(out.join(METRICS_FILE)).unwrap()).unwrap();
        assert_eq!(written["lr"], m["lr"]);
        assert_eq!(written["val_accuracy"], m["val_accuracy"]);
        assert!(!written.contains_key("wall_time_s"), "{written:?}");
        let hp: Value =
            serde_json::from_slice(&std::fs::read(out.join(HPARAMS_FILE)).unwrap()).unwrap();
        let var = |name: &str| {
            hp["init"]["layers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["layer"] == name)
                .and_then(|l| l["variance"].as_f64())
        };
        // 8 x 8 images -> the stem's fan-in is 64; edge 5 (2 -> 3) reads node 2 (in-degree 2).
        assert_eq!(var("stem"), Some(2.0 / 64.0));
        assert_eq!(var("edges.0"), Some(2.0 / 16.0));
        assert_eq!(var("edges.5"), Some(2.0 / 32.0));
        assert_eq!(var("readout"), Some(4.0 / 256.0));

        // The same stage with a fixed LR and the default init: one line each changes recipe.
        let plain = json!({
            "model": {"kind": "mlp_dag", "topology": "2_21_112", "width": 16, "classes": 10},
            "lr": 0.05, "epochs": 1, "batch_size": 16,
        });
        let out2 = ws.path().join("plain");
        let m2 = run_op(&TrainOp, plain, &[("data", &data)], ws.path(), &out2, 1).unwrap();
        assert_eq!((m2["lr"], m2["init_arch_aware"]), (0.05, 0.0));
        assert!(!out2.join(HPARAMS_FILE).exists());
    }

    #[test]
    fn arch_aware_params_are_checked() {
        let mlp = json!({"kind": "mlp_dag", "topology": "2_02_002", "width": 4, "classes": 2});
        let e = TrainOp
            .validate(&json!({"model": mlp, "lr": "arch_aware", "epochs": 1}))
            .unwrap_err();
        assert_eq!(e.path, "base_lr");
        let e = TrainOp
            .validate(&json!({"model": mlp, "lr": "fast", "epochs": 1}))
            .unwrap_err();
        assert_eq!(e.path, "lr");
        let e = TrainOp
            .validate(&json!({"model": mlp, "lr": 0.1, "base_lr": 0.1, "epochs": 1}))
            .unwrap_err();
        assert_eq!(e.path, "base_lr");
        let fno =
            json!({"kind": "fno2d", "width": 4, "modes": [2, 2], "layers": 1, "head_width": 4});
        let e = TrainOp
            .validate(&json!({"model": fno, "lr": 0.1, "init": "arch_aware", "epochs": 1}))
            .unwrap_err();
        assert_eq!(e.path, "model.kind");
        // A CNN's kernel enters the LR: k = 5 scales by 3/5.
        let cnn = json!({"kind": "cnn_dag", "topology": "2_02_002", "width": 4, "kernel": 5, "classes": 2});
        let p =
            Params::parse(&json!({"model": cnn, "lr": "arch_aware", "base_lr": 1.0, "epochs": 1}))
                .unwrap();
        let want = (27.0f64 / 216.0).sqrt() * 0.6;
        assert!((p.arch_lr().unwrap().lr - want).abs() < 1e-12);
        let nb = json!({"kind": "nb201", "cell": "3_33_333", "channels": 4, "classes": 2});
        let p =
            Params::parse(&json!({"model": nb, "lr": "arch_aware", "base_lr": 0.46, "epochs": 1}))
                .unwrap();
        assert!((p.arch_lr().unwrap().lr - 0.46 / 126.0f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn cell_from_trains_the_cell_a_search_chose() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        // A search result choosing "1_11_042": two skip edges into node 2 (once a dfdx panic).
        let search = ws.path().join("search");
        std::fs::create_dir_all(&search).unwrap();
        std::fs::write(
            search.join(crate::nas::SEARCH_FILE),
            json!({"choice": {"digits": "1_11_042"}}).to_string(),
        )
        .unwrap();
        let model = json!({"kind": "nb201", "channels": 2, "cells_per_stage": 1, "classes": 10});
        let params = json!({
            "model": model, "cell_from": "search", "lr": "arch_aware", "base_lr": 0.46,
            "base_topology": "0_00_100", "epochs": 1, "batch_size": 16,
        });
        assert_eq!(TrainOp.required_inputs(&params), vec!["data", "search"]);
        let out = ws.path().join("out");
        let inputs = [("data", data.as_path()), ("search", search.as_path())];
        let m = run_op(&TrainOp, params.clone(), &inputs, ws.path(), &out, 0).unwrap();
        // Paths 0-1-3 (skip, pool; L = 1), 0-2-3 (skip, conv1x1; L = 2), 0-1-2-3 (L = 2):
        // sum L^3 = 17 against the base's 1.
        assert!((m["lr"] - 0.46 / 17f64.sqrt()).abs() < 1e-12, "{m:?}");
        assert!(m["train_loss"].is_finite());
        let spec: Value =
            serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
        assert!(spec.to_string().contains("1_11_042"), "{spec}");

        let e = TrainOp
            .validate(
                &json!({"model": {"kind": "nb201", "cell": "3_33_333", "classes": 2},
                "cell_from": "search", "lr": 0.1, "epochs": 1}),
            )
            .unwrap_err();
        assert_eq!(e.path, "model.cell");
        let mlp = json!({"kind": "mlp_dag", "topology": "2", "width": 4, "classes": 2});
        let e = TrainOp
            .validate(&json!({"model": mlp, "cell_from": "search", "lr": 0.1, "epochs": 1}))
            .unwrap_err();
        assert_eq!(e.path, "cell_from");
        // An input that is not a search result is a clear error.
        let inputs = [("data", data.as_path()), ("search", data.as_path())];
        let e = run_op(
            &TrainOp,
            params,
            &inputs,
            ws.path(),
            &ws.path().join("x"),
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("search.json"), "{e}");
    }

    #[test]
    fn lr_probe_records_loss_or_divergence_without_a_checkpoint() {
        let ws = tempfile::tempdir().unwrap();
        let data = tiny_images(ws.path());
        let probe = |lr: f64, name: &str| {
            let out = ws.path().join(name);
            let params = json!({
                "model": {"kind": "mlp_dag", "topology": "2_02_002", "width": 16, "classes": 10},
                "optimizer": {"kind": "sgd", "momentum": 0.0}, "lr": lr, "batch_size": 8,
            });
            let m = run_op(&LrProbeOp, params, &[("data", &data)], ws.path(), &out, 2).unwrap();
            let written: BTreeMap<String, f64> =
                serde_json::from_slice(&std::fs::read(out.join(METRICS_FILE)).unwrap()).unwrap();
            assert!(!out.join(WEIGHTS_FILE).exists());
            (m, written)
        };
        let (m, w) = probe(0.01, "small");
        assert_eq!((m["epochs"], m["diverged"], m["lr"]), (1.0, 0.0, 0.01));
        assert!(m["train_loss"].is_finite() && w["train_loss"] == m["train_loss"]);
        assert!(
            !m.contains_key("val_loss"),
            "a probe evaluates nothing: {m:?}"
        );
        let (m, w) = probe(1e9, "huge");
        assert_eq!(m["diverged"], 1.0);
        assert!(
            !w.contains_key("train_loss") && w["diverged"] == 1.0,
            "{w:?}"
        );
        let e = LrProbeOp
            .validate(&json!({
                "model": {"kind": "mlp_dag", "topology": "2", "width": 4, "classes": 2},
                "lr": 0.1, "on_divergence": "stop",
            }))
            .unwrap_err();
        assert_eq!(e.path, "on_divergence");
    }
}
