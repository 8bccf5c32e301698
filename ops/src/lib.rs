//! Stage implementations for `engine`.
//!
//! An [`Op`] is the unit of computation a pipeline stage names with `op:`. This crate holds the
//! trait, the [`Registry`] of built-in ops and the ops themselves. It knows nothing of planning,
//! scheduling or how results are cached.
//!
//! Every op is one [`TypedOp`]: a `Params` type (serde parses it, schemars documents it from
//! the same definition, see [`params_doc`]), a `resolve` into the config `run` uses, and `run`,
//! which gets a [`RunContext`] (input artifacts as read-only directories, a progress reporter,
//! a seed, a cancellation flag and a CPU allotment) and [`Outputs`] (the fresh output folder
//! and the metrics sink). The engine sees them through the object-safe [`Op`].

pub mod arch;
mod children;
pub mod dataset;
pub mod ml;
pub mod nas;
mod op;
pub mod oplearn;
mod outputs;
pub mod params_doc;
pub mod pde;
mod registry;
pub mod seed;
mod shell;
pub mod supervisor;
pub mod testing;

pub use children::kill_all_children;
pub use op::{
    fail, parse_params, CancelFlag, Input, Metrics, Op, OpError, OpPlan, ParamError, Progress,
    RunContext, TypedOp,
};
pub use outputs::{read_json, write_json, write_metrics, Label, Outputs, METRICS_FILE};
pub use params_doc::{Count, ParamDoc};
pub use registry::Registry;
pub use shell::{input_var, ShellOp, ShellParams, PROGRESS_MARKER};
