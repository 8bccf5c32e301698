//! Running an op in a temporary folder the way the engine does (plan, then run), for unit tests
//! of ops and for integration tests of other crates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{CancelFlag, Input, Metrics, Op, OpError, Progress, RunContext};

/// One run of one op: params, inputs, seed and CPUs, into a fresh output folder.
pub struct OpRun {
    params: Value,
    inputs: BTreeMap<String, Input>,
    seed: u64,
    cpus: usize,
    workspace: Option<PathBuf>,
    out: Option<PathBuf>,
    cancel: CancelFlag,
    progress: Progress,
}

/// What a run produced. The temporary folders live as long as this value.
pub struct RunOutput {
    pub result: Result<Metrics, OpError>,
    pub log: String,
    pub out_dir: PathBuf,
    _temp: Vec<tempfile::TempDir>,
}

impl RunOutput {
    /// The metrics of a run that must have succeeded (panics with the error otherwise).
    pub fn metrics(&self) -> &Metrics {
        match &self.result {
            Ok(m) => m,
            Err(e) => panic!("the op failed: {e}\nlog:\n{}", self.log),
        }
    }
}

impl OpRun {
    pub fn new(params: Value) -> Self {
        Self {
            params,
            inputs: BTreeMap::new(),
            seed: 3,
            cpus: 1,
            workspace: None,
            out: None,
            cancel: CancelFlag::new(),
            progress: Progress::silent(),
        }
    }

    /// The flag the run polls (raise it from another thread to stop the op).
    pub fn cancel(mut self, flag: &CancelFlag) -> Self {
        self.cancel = flag.clone();
        self
    }

    /// Where the op's progress lines go.
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// Input `name` is the one result folder `dir`.
    pub fn input(mut self, name: &str, dir: impl Into<PathBuf>) -> Self {
        self.inputs.insert(name.to_string(), Input::One(dir.into()));
        self
    }

    /// Input `name` as the engine would hand it.
    pub fn input_as(mut self, name: &str, input: Input) -> Self {
        self.inputs.insert(name.to_string(), input);
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn cpus(mut self, cpus: usize) -> Self {
        self.cpus = cpus;
        self
    }

    /// Runs in `dir` as the workspace (default: a fresh temporary folder).
    pub fn workspace(mut self, dir: &Path) -> Self {
        self.workspace = Some(dir.to_path_buf());
        self
    }

    /// Writes into `dir` (created if missing; default: a fresh temporary folder).
    pub fn out(mut self, dir: &Path) -> Self {
        self.out = Some(dir.to_path_buf());
        self
    }

    /// Validates the params as the planner does (a param error is the result), then runs.
    pub fn run(self, op: &dyn Op) -> RunOutput {
        let mut temp = Vec::new();
        let mut folder = |given: Option<PathBuf>| match given {
            Some(dir) => {
                std::fs::create_dir_all(&dir).expect("cannot create the test folder");
                dir
            }
            None => {
                let dir = tempfile::tempdir().expect("cannot create a temporary folder");
                let path = dir.path().to_path_buf();
                temp.push(dir);
                path
            }
        };
        let workspace = folder(self.workspace);
        let out_dir = folder(self.out);
        let mut log = Vec::new();
        let result = match op.plan(&self.params) {
            Err(e) => Err(OpError::Params(e)),
            Ok(_) => {
                let mut ctx = RunContext {
                    inputs: &self.inputs,
                    out_dir: &out_dir,
                    workspace: &workspace,
                    seed: self.seed,
                    cpus: self.cpus,
                    cancel: &self.cancel,
                    progress: &self.progress,
                    log: &mut log,
                };
                op.run(&self.params, &mut ctx)
            }
        };
        RunOutput {
            result,
            log: String::from_utf8_lossy(&log).into_owned(),
            out_dir,
            _temp: temp,
        }
    }
}
