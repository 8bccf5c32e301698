//! Running a [`Plan`]: cache lookups, parallel execution of stale stages, atomic recording.
//!
//! The scheduler (`scheduler.rs`) decides what runs: a stage becomes *ready* when every
//! upstream stage has a result; it is then keyed (its inputs' output trees are known), looked
//! up, and either reused or handed to an [`Executor`] within its capacity (the `-j` CPU budget
//! for [`LocalExecutor`]). Workers run the op in a scratch folder, move its output into the
//! store and record the run in one transaction, so a kill at any point leaves no partial
//! record.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cache::Cache;

pub use crate::error::ExecError;
use crate::executor::{Executor, LocalExecutor};
pub use crate::outcome::{RunSummary, StageReport, StageStatus};
use crate::plan::Plan;
use crate::progress::Display;
pub use crate::scheduler::RunOptions;
use crate::scheduler::Scheduler;

/// Runs every stale stage of `plan` on this machine. `interrupt` is raised by Ctrl-C.
pub fn run(
    plan: &Plan,
    cache: &Arc<Cache>,
    options: &RunOptions,
    interrupt: &AtomicBool,
    display: &mut dyn Display,
) -> Result<RunSummary, ExecError> {
    let mut executor = LocalExecutor::new(cache.clone(), options.jobs);
    run_with(plan, cache, options, interrupt, display, &mut executor)
}

/// As [`run`], with stages started by `executor`.
pub fn run_with(
    plan: &Plan,
    cache: &Arc<Cache>,
    options: &RunOptions,
    interrupt: &AtomicBool,
    display: &mut dyn Display,
    executor: &mut dyn Executor,
) -> Result<RunSummary, ExecError> {
    Scheduler::new(plan, cache, options, display, executor)?.run(interrupt)
}
