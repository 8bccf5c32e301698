//! The contract between the engine and a stage implementation.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::outputs::Outputs;
use crate::params_doc::ParamDoc;

/// A stage implementation as the engine sees it. Every built-in op implements it through the
/// blanket impl over [`TypedOp`]; nothing implements it by hand, so params are parsed in one
/// place ([`TypedOp::Params`] through [`parse_params`]) and documented from the same type.
pub trait Op: Send + Sync {
    /// The name pipelines use after `op:`.
    fn name(&self) -> &'static str;
    /// Bumped whenever the op's results for the same params and inputs could change; it is part
    /// of every stage key, so bumping it invalidates exactly this op's cached results.
    fn version(&self) -> u32;
    /// One line for `--help`-style listings and "did you mean" messages.
    fn summary(&self) -> &'static str;
    /// Every param the op accepts, with its type, default and doc, from the type that parses it.
    fn params_doc(&self) -> Vec<ParamDoc>;
    /// Whether the op takes a top-level `device` param (then `--device` fills it in).
    fn takes_device(&self) -> bool {
        self.params_doc().iter().any(|p| p.path == "device")
    }
    /// Parses and validates params without running anything, and says what the planner needs:
    /// unknown keys and wrong types are errors that name the offending field.
    fn plan(&self, params: &Value) -> Result<OpPlan, ParamError>;
    /// Does the work and returns the stage's metrics. Must write results only under
    /// `ctx.out_dir` (and the declared `outs`).
    fn run(&self, params: &Value, ctx: &mut RunContext<'_>) -> Result<Metrics, OpError>;
}

/// What the planner learns from an op's validated params.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpPlan {
    /// Workspace-relative files or folders whose *content* is part of the stage key.
    pub deps: Vec<String>,
    /// Workspace-relative paths the op writes outside its output folder; the engine captures
    /// them into the stored result and puts them back after a cache hit.
    pub outs: Vec<String>,
    /// Input names the stage must declare under `inputs:`.
    pub required_inputs: Vec<String>,
}

/// One op, defined once: its params type (serde + schemars, a doc comment on every field), a
/// `resolve` that turns validated params into the config `run` uses, and `run`.
///
/// The blanket `impl<T: TypedOp> Op for T` parses params with [`parse_params`], resolves them
/// (at plan time and again, identically, where the stage runs: a Slurm job gets the params as
/// JSON), and hands `run` the config and an [`Outputs`] for its artifacts and metrics.
pub trait TypedOp: Send + Sync + 'static {
    const NAME: &'static str;
    const VERSION: u32;
    const SUMMARY: &'static str;
    /// The params as written in the pipeline; `#[serde(deny_unknown_fields)]`.
    type Params: DeserializeOwned + JsonSchema;
    /// What `run` needs, with every check done.
    type Config: Send + Sync;

    /// Checks what serde cannot (ranges, combinations) and builds the config.
    fn resolve(params: Self::Params) -> Result<Self::Config, ParamError>;
    /// Input names the stage must declare.
    fn required_inputs(_config: &Self::Config) -> Vec<String> {
        Vec::new()
    }
    /// See [`OpPlan::deps`].
    fn deps(_config: &Self::Config) -> Vec<String> {
        Vec::new()
    }
    /// See [`OpPlan::outs`].
    fn outs(_config: &Self::Config) -> Vec<String> {
        Vec::new()
    }
    fn run(
        &self,
        config: &Self::Config,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError>;

    /// Parses and resolves raw params: the one way every op reads them.
    fn config(params: &Value) -> Result<Self::Config, ParamError> {
        Self::resolve(parse_params(params)?)
    }
}

impl<T: TypedOp> Op for T {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn version(&self) -> u32 {
        T::VERSION
    }
    fn summary(&self) -> &'static str {
        T::SUMMARY
    }
    fn params_doc(&self) -> Vec<ParamDoc> {
        crate::params_doc::of::<T::Params>()
    }
    fn plan(&self, params: &Value) -> Result<OpPlan, ParamError> {
        let config = T::config(params)?;
        Ok(OpPlan {
            deps: T::deps(&config),
            outs: T::outs(&config),
            required_inputs: T::required_inputs(&config),
        })
    }
    fn run(&self, params: &Value, ctx: &mut RunContext<'_>) -> Result<Metrics, OpError> {
        let config = T::config(params)?;
        let mut out = Outputs::new(ctx.out_dir);
        TypedOp::run(self, &config, ctx, &mut out)?;
        Ok(out.into_metrics())
    }
}

/// An upstream result handed to a stage, as read-only directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// `inputs: {name: stage}` or `stage[k=v]`.
    One(PathBuf),
    /// `inputs: {name: "stage[*]"}`: every selected instance, labelled by its matrix values
    /// (`p=2,q=a`), in plan order. `dir` holds one entry per item, named by its label.
    Many {
        dir: PathBuf,
        items: Vec<(String, PathBuf)>,
    },
}

impl Input {
    /// The one directory a tool can be pointed at: the result itself, or the folder holding
    /// one entry per item.
    pub fn root(&self) -> &Path {
        match self {
            Input::One(p) => p,
            Input::Many { dir, .. } => dir,
        }
    }

    /// Every directory this input covers, in order.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Input::One(p) => vec![p.as_path()],
            Input::Many { items, .. } => items.iter().map(|(_, p)| p.as_path()).collect(),
        }
    }
}

/// Metric name -> value, flat. Non-finite values are allowed (a diverged loss is a result).
pub type Metrics = BTreeMap<String, f64>;

/// Shared flag raised by the engine on Ctrl-C or timeout; long-running ops poll it.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Op-reported progress ("epoch 3/10 loss 0.41"), shown beside the running stage.
#[derive(Clone)]
pub struct Progress(Arc<dyn Fn(&str) + Send + Sync>);

impl Progress {
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
    /// A reporter that drops everything (tests, non-interactive callers).
    pub fn silent() -> Self {
        Self::new(|_| {})
    }
    pub fn report(&self, message: &str) {
        (self.0)(message)
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Everything one run of one stage gets.
pub struct RunContext<'a> {
    /// Upstream results by the local names of the stage's `inputs:`.
    pub inputs: &'a BTreeMap<String, Input>,
    /// A fresh, empty directory; everything in it becomes the stage's output.
    pub out_dir: &'a Path,
    /// The folder holding the pipeline file; `deps`/`outs` are relative to it.
    pub workspace: &'a Path,
    /// Deterministic per stage instance, part of the stage key.
    pub seed: u64,
    /// CPUs the scheduler allotted (`resources.cpus`, default 1).
    pub cpus: usize,
    pub cancel: &'a CancelFlag,
    pub progress: &'a Progress,
    /// The stage log; stored with the result.
    pub log: &'a mut dyn Write,
}

impl RunContext<'_> {
    pub fn input(&self, name: &str) -> Result<&Input, OpError> {
        self.inputs
            .get(name)
            .ok_or_else(|| OpError::MissingInput(name.to_string()))
    }

    /// The one result folder of input `name`; a list input (`stage[*]`) is an error.
    pub fn one_input(&self, name: &str) -> Result<&Path, OpError> {
        match self.input(name)? {
            Input::One(dir) => Ok(dir),
            Input::Many { .. } => Err(OpError::Failed(format!(
                "input '{name}' selects several stages; point it at one (`stage` or `stage[k=v]`)"
            ))),
        }
    }

    /// A rayon pool of the stage's `cpus` threads, for ops that score or compute in parallel
    /// (the engine gives each stage its share of the machine, not the global pool).
    pub fn thread_pool(&self) -> Result<rayon::ThreadPool, OpError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.cpus.max(1))
            .build()
            .map_err(|e| OpError::Failed(format!("cannot start {} threads: {e}", self.cpus)))
    }

    /// Returns `Err(Cancelled)` once the engine asked the stage to stop.
    pub fn check_cancelled(&self) -> Result<(), OpError> {
        if self.cancel.is_cancelled() {
            Err(OpError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A param that failed validation: `path` is dotted from the params root (`model.width`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub path: String,
    pub message: String,
    /// How to fix it, when the op knows.
    pub fix: Option<String>,
}

impl ParamError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            fix: None,
        }
    }
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("invalid params at '{}': {}", .0.path, .0.message)]
    Params(#[from] ParamError),
    #[error("the stage has no input named '{0}'; declare it under `inputs:`")]
    MissingInput(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A layer, model or training error (a non-finite loss, a shape mismatch, a bad checkpoint).
    #[error(transparent)]
    Nn(#[from] nn::NnError),
    /// An architecture-analysis error (a malformed cell, a rank-deficient kernel).
    #[error(transparent)]
    Arch(#[from] crate::arch::ArchError),
    #[error("{0}")]
    Failed(String),
}

impl OpError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        OpError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A stage failure with a message for people (an op-specific condition no typed error names).
pub fn fail(message: impl Into<String>) -> OpError {
    OpError::Failed(message.into())
}

/// Deserialises params into an op's typed struct; the error names the offending field's path.
/// Typed param structs use `#[serde(deny_unknown_fields)]` so unknown keys are errors too.
pub fn parse_params<T: DeserializeOwned>(params: &Value) -> Result<T, ParamError> {
    serde_path_to_error::deserialize(params).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ParamError::new(path, err.into_inner().to_string())
    })
}
