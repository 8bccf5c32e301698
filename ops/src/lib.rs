//! Stage implementations for `engine`.
//!
//! An [`Op`] is the unit of computation a pipeline stage names with `op:`. This crate holds the
//! trait, the [`Registry`] of built-in ops and the ops themselves. It knows nothing of planning,
//! scheduling or how results are cached: the engine hands an op a [`RunContext`] (typed params,
//! input artifacts as read-only directories, a fresh output directory, a metrics sink, a progress
//! reporter, a seed, a cancellation flag and a CPU allotment) and captures what it writes.

pub mod arch;
mod children;
pub mod ml;
pub mod nas;
mod op;
pub mod oplearn;
pub mod pde;
mod registry;
mod shell;
pub mod supervisor;

pub use children::kill_all_children;
pub use op::{
    parse_params, CancelFlag, Input, Metrics, Op, OpError, ParamError, Progress, RunContext,
};
pub use registry::Registry;
pub use shell::{input_var, ShellOp, ShellParams, PROGRESS_MARKER};
