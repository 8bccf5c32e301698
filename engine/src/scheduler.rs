//! The scheduler: one [`Scheduler`] holds a run's state and is updated by a small method per
//! [`Event`] (Ctrl-C, a stage finished, a tick), after a pass over what needs no waiting:
//! ready stages keyed and looked up, queued stages started, other processes' claims
//! re-checked.
//!
//! A stage becomes *ready* when every upstream stage has a result. What is ready at once is
//! keyed and looked up as one batch (`reuse::prepare`), then handled in plan order, so results
//! and messages do not depend on thread timing: reused, parked behind a stage of this run with
//! the same key, or claimed for this process (across processes, with heartbeats) and queued.
//! Queued stages start, in plan order, while the executor has capacity. A failure skips
//! exactly the failed stage's descendants and, without `--keep-going`, stops new starts.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::{unix_now, Cache, CacheLock, ClaimOwner, ClaimState, Hash};
use ops::Metrics;
use serde_json::Value;

use crate::error::ExecError;
use crate::executor::Executor;
use crate::heartbeat::Heartbeat;
use crate::node_keys::{node_doc, DepHashes};
use crate::outcome::{Outcome, RunSummary, StageReport, StageResult, StageStatus};
use crate::plan::{InputSources, Plan};
use crate::progress::Display;
use crate::reuse::{self, Found, Prepared, Reused};
use crate::staleness::{closest_run, explain, RECENT_RUNS};
use crate::worker::{JobInput, StageJob};

/// A claim whose owner has not refreshed it for this long is taken over.
const CLAIM_STALE_S: f64 = 30.0;
/// How often a claim held by another process is re-checked.
const CLAIM_POLL: Duration = Duration::from_millis(200);
/// How long one wait for finished stages lasts (the display ticks as often).
const WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub keep_going: bool,
    /// Nodes to rerun even if cached.
    pub force: Vec<usize>,
}

/// What the scheduler reacts to besides its own pass.
pub enum Event {
    /// Ctrl-C: start nothing more, stop what runs.
    Interrupt,
    /// A started stage ended; its result is recorded already (a cancelled one's is not).
    Finished(usize, StageResult),
    /// A wait for stages ended: show the executor's notices and the stages' progress.
    Tick,
}

/// A stage keyed and not reused: what starting it needs.
#[derive(Default)]
struct Pending {
    doc: Value,
    key: String,
    reasons: Vec<String>,
}

/// A started stage: the capacity it holds and what its report will say.
struct Running {
    need: usize,
    key: String,
    reasons: Vec<String>,
}

/// How a stage failed.
struct Failure {
    message: String,
    log_tail: String,
    duration_s: f64,
}

impl Failure {
    /// A failure before anything ran: no log, no duration.
    fn before_start(message: String) -> Self {
        Self {
            message,
            log_tail: String::new(),
            duration_s: 0.0,
        }
    }
}

/// The state of one run of a plan.
pub struct Scheduler<'a> {
    plan: &'a Plan,
    cache: &'a Arc<Cache>,
    options: &'a RunOptions,
    display: &'a mut dyn Display,
    executor: &'a mut dyn Executor,
    started: Instant,
    owner: ClaimOwner,
    heartbeat: Heartbeat,
    deps: DepHashes,
    downstream: Vec<Vec<usize>>,
    /// Upstream stages without a result yet, per stage.
    waiting_on: Vec<usize>,
    trees: Vec<Option<Hash>>,
    /// The stages done with: reused, ran, failed or skipped.
    reports: Vec<Option<StageReport>>,
    ready: BinaryHeap<Reverse<usize>>,
    /// Claimed, waiting for capacity.
    queued: BinaryHeap<Reverse<usize>>,
    /// Keyed and not reused: queued, or waiting on another process's claim.
    pending: HashMap<usize, Pending>,
    /// Stages whose key equals one already queued or running wait for it and reuse its result.
    in_flight: HashMap<String, Vec<usize>>,
    /// Stages another engine process is running: re-checked when due, until its result is
    /// recorded or its claim is released or abandoned.
    claim_waits: Vec<(usize, Instant)>,
    /// Keys whose recorded result turned out damaged: recomputed, never reported as done.
    damaged: HashSet<String>,
    running: HashMap<usize, Running>,
    /// Executor capacity not held by running stages.
    free: usize,
    stop_new: bool,
    interrupted: bool,
    /// Held for the whole run so `gc`/`verify` never delete what this run is using.
    _lock: CacheLock,
}

impl<'a> Scheduler<'a> {
    pub fn new(
        plan: &'a Plan,
        cache: &'a Arc<Cache>,
        options: &'a RunOptions,
        display: &'a mut dyn Display,
        executor: &'a mut dyn Executor,
    ) -> Result<Self, ExecError> {
        let started = Instant::now();
        let lock = cache.lock_shared()?;
        let owner = ClaimOwner::this_process(unix_now());
        let heartbeat = Heartbeat::start(cache.clone(), owner.clone());
        let deps = DepHashes::for_static_deps(plan, cache)?;
        let n = plan.nodes.len();
        let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut waiting_on: Vec<usize> = vec![0; n];
        for (i, node) in plan.nodes.iter().enumerate() {
            let up = node.upstream();
            waiting_on[i] = up.len();
            for u in up {
                downstream[u].push(i);
            }
        }
        let ready = (0..n)
            .filter(|&i| waiting_on[i] == 0)
            .map(Reverse)
            .collect();
        let free = executor.capacity().max(1);
        Ok(Self {
            plan,
            cache,
            options,
            display,
            executor,
            started,
            owner,
            heartbeat,
            deps,
            downstream,
            waiting_on,
            trees: vec![None; n],
            reports: vec![None; n],
            ready,
            queued: BinaryHeap::new(),
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            claim_waits: Vec::new(),
            damaged: HashSet::new(),
            running: HashMap::new(),
            free,
            stop_new: false,
            interrupted: false,
            _lock: lock,
        })
    }

    /// Runs the plan to its end; `interrupt` is raised by Ctrl-C.
    pub fn run(mut self, interrupt: &AtomicBool) -> Result<RunSummary, ExecError> {
        self.display.begin(self.plan);
        loop {
            if interrupt.load(Ordering::SeqCst) && !self.interrupted {
                self.handle(Event::Interrupt);
            }
            self.key_ready()?;
            self.start_queued();
            self.poll_claims()?;
            if self.is_done() {
                break;
            }
            for (node, result) in self.executor.wait(WAIT) {
                self.handle(Event::Finished(node, result));
            }
            self.handle(Event::Tick);
        }
        Ok(self.finish())
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Interrupt => self.on_interrupt(),
            Event::Finished(node, result) => self.on_finished(node, result),
            Event::Tick => self.on_tick(),
        }
    }

    fn on_interrupt(&mut self) {
        self.interrupted = true;
        self.stop_new = true;
        self.executor.cancel_all();
        self.display
            .message("interrupted: stopping running stages (press Ctrl-C again to exit at once)");
    }

    fn on_tick(&mut self) {
        for m in self.executor.drain_messages() {
            self.display.message(&m);
        }
        self.display.tick(self.plan, &self.executor.progress());
    }

    /// Nothing runs, nothing waits on a claim, and nothing more may or can start.
    fn is_done(&self) -> bool {
        self.running.is_empty()
            && self.claim_waits.is_empty()
            && (self.stop_new || (self.ready.is_empty() && self.queued.is_empty()))
    }

    /// Keys, looks up and handles every ready stage; the stages that cache hits release form
    /// the next batch. The lookups share one read transaction (ended by the first write, such
    /// as a claim).
    fn key_ready(&mut self) -> Result<(), ExecError> {
        let cache: &Cache = self.cache;
        let _reads = cache.read_batch();
        while !self.stop_new && !self.ready.is_empty() {
            let batch: Vec<usize> =
                std::iter::from_fn(|| self.ready.pop().map(|Reverse(i)| i)).collect();
            let force = &self.options.force;
            let prepared =
                reuse::prepare(self.plan, cache, &batch, &self.trees, &mut self.deps, force)?;
            for (pos, (i, prepared)) in batch.iter().copied().zip(prepared).enumerate() {
                if self.stop_new {
                    self.ready.extend(batch[pos..].iter().map(|&j| Reverse(j)));
                    break;
                }
                self.on_prepared(i, prepared)?;
            }
        }
        Ok(())
    }

    /// A ready stage, keyed and looked up: failed (a dep could not be hashed), reused, or on
    /// its way to run.
    fn on_prepared(&mut self, i: usize, prepared: Prepared) -> Result<(), ExecError> {
        let deps = match prepared.deps {
            Ok(d) => d,
            Err(message) => {
                self.fail(i, Failure::before_start(message), None, Vec::new());
                return Ok(());
            }
        };
        let Some(key) = prepared.key else {
            return Ok(());
        };
        if let Some(hit) = self.reuse(i, &key, prepared.found)? {
            self.on_reused(i, key, hit);
            return Ok(());
        }
        // Not reused: the key document is recorded with the run and explains it.
        let Some(doc) = node_doc(self.plan, i, &self.trees, &deps) else {
            return Ok(());
        };
        let reasons = self.reasons(i, &doc)?;
        self.pending.insert(i, Pending { doc, key, reasons });
        self.claim(i, true)
    }

    /// Why node `i` runs, for its report and the display.
    fn reasons(&self, i: usize, doc: &Value) -> Result<Vec<String>, ExecError> {
        let node = &self.plan.nodes[i];
        if self.options.force.contains(&i) {
            return Ok(vec!["--force".to_string()]);
        }
        if !node.cache {
            return Ok(vec!["cache: false".to_string()]);
        }
        let recent = self
            .cache
            .recent_runs(&self.plan.pipeline.name, &node.name, RECENT_RUNS)?;
        let mut reasons = explain(doc, closest_run(doc, &recent));
        if reasons.is_empty() {
            reasons.push("the recorded result's objects are missing from the store".into());
        }
        Ok(reasons)
    }

    /// `found`, if node `i` can reuse it. A damaged result is remembered (with a warning the
    /// first time), so that it is recomputed and never reported as done.
    fn reuse(
        &mut self,
        i: usize,
        key: &str,
        found: Option<Found>,
    ) -> Result<Option<(Hash, Metrics)>, ExecError> {
        let Some(found) = found else {
            return Ok(None);
        };
        match reuse::reuse_found(self.plan, self.cache, i, found)? {
            Reused::Intact(tree, metrics) => Ok(Some((tree, metrics))),
            Reused::Damaged(bad) => {
                if self.damaged.is_empty() {
                    self.display.message(&format!(
                        "warning: the cached result of '{}' is damaged (object {} missing or corrupt); recomputing it (`engine verify` checks the whole cache)",
                        self.plan.nodes[i].name,
                        bad.map(|h| h.short()).unwrap_or_default()
                    ));
                }
                self.damaged.insert(key.to_string());
                Ok(None)
            }
        }
    }

    fn on_reused(&mut self, i: usize, key: String, hit: (Hash, Metrics)) {
        self.trees[i] = Some(hit.0);
        let report = StageReport::cached(i, key, hit);
        self.display.finished(self.plan, &report);
        self.reports[i] = Some(report);
        self.release(i);
    }

    /// Node `i` (keyed, in `pending`) waits for a stage of this run with the same key, or
    /// claims its key: queued when the claim is acquired, re-checked later when another
    /// process holds it or has just recorded its result. `first`: the first attempt, which
    /// says when it has to wait.
    fn claim(&mut self, i: usize, first: bool) -> Result<(), ExecError> {
        let key = self
            .pending
            .get(&i)
            .map(|p| p.key.clone())
            .unwrap_or_default();
        if let Some(parked) = self.in_flight.get_mut(&key) {
            parked.push(i);
            return Ok(());
        }
        let check_done =
            reuse::may_reuse(self.plan, &self.options.force, i) && !self.damaged.contains(&key);
        match self
            .cache
            .try_claim(&key, &self.owner, CLAIM_STALE_S, check_done)?
        {
            ClaimState::Acquired => {
                self.heartbeat.hold(&key);
                self.in_flight.insert(key, Vec::new());
                self.queued.push(Reverse(i));
            }
            ClaimState::AlreadyDone => self.claim_waits.push((i, Instant::now())),
            ClaimState::HeldBy { pid, host, .. } => {
                if first {
                    self.display.message(&format!(
                        "waiting: {} is being run by another engine process (pid {pid} on {host})",
                        self.plan.nodes[i].name
                    ));
                }
                self.claim_waits.push((i, Instant::now() + CLAIM_POLL));
            }
        }
        Ok(())
    }

    /// Starts queued stages while capacity is free, in plan order.
    fn start_queued(&mut self) {
        let plan = self.plan;
        while let (false, Some(&Reverse(i))) = (self.stop_new, self.queued.peek()) {
            let node = &plan.nodes[i];
            let cpus = node.resources.cpus.clamp(1, self.options.jobs.max(1));
            let need = self.executor.cost(cpus);
            if need > self.free {
                break;
            }
            self.queued.pop();
            let Pending { doc, key, reasons } = self.pending.remove(&i).unwrap_or_default();
            self.free -= need;
            self.display.started(plan, i, &reasons);
            let job = stage_job(plan, i, key.clone(), doc, cpus, &self.trees);
            let started = self
                .executor
                .start(i, job, node.op.clone(), &node.resources);
            if let Err(e) = started {
                self.free += need;
                let failure = Failure::before_start(format!("could not start: {e}"));
                self.fail(i, failure, Some(key), reasons);
            } else {
                self.running.insert(i, Running { need, key, reasons });
            }
        }
    }

    /// Stages another process was running: reuse its result, or run them here once its claim
    /// is gone. Once nothing new may start, they are no longer waited for.
    fn poll_claims(&mut self) -> Result<(), ExecError> {
        let waits = std::mem::take(&mut self.claim_waits);
        if self.stop_new {
            for (i, _) in waits {
                self.pending.remove(&i);
            }
            return Ok(());
        }
        let now = Instant::now();
        for (i, due) in waits {
            if due > now {
                self.claim_waits.push((i, due));
                continue;
            }
            let key = self
                .pending
                .get(&i)
                .map(|p| p.key.clone())
                .unwrap_or_default();
            let found = if reuse::may_reuse(self.plan, &self.options.force, i) {
                reuse::find(self.cache, &[Some(&key)])?.pop().flatten()
            } else {
                None
            };
            if let Some(hit) = self.reuse(i, &key, found)? {
                self.pending.remove(&i);
                self.on_reused(i, key, hit);
                continue;
            }
            self.claim(i, false)?;
        }
        Ok(())
    }

    fn on_finished(&mut self, i: usize, result: StageResult) {
        let Some(Running { need, key, reasons }) = self.running.remove(&i) else {
            tracing::warn!("the executor reported stage {i}, which it was not running");
            return;
        };
        self.free += need;
        self.heartbeat.drop_key(&key);
        if let Err(e) = self.cache.release(&key, &self.owner) {
            tracing::warn!("could not release the claim on {key}: {e}");
        }
        if let Some(parked) = self.in_flight.remove(&key) {
            // Re-examined now: a cache hit if this run succeeded, a run of their own if not.
            self.ready.extend(parked.into_iter().map(Reverse));
        }
        let duration_s = result.duration_s();
        let mut report = StageReport {
            node: i,
            status: StageStatus::Ran,
            key: Some(key),
            duration_s: 0.0,
            metrics: Metrics::new(),
            tree: None,
            message: None,
            reasons,
        };
        match result.outcome {
            Outcome::Ok { tree, metrics } => {
                self.trees[i] = Some(tree);
                report.tree = Some(tree);
                report.metrics = metrics;
                report.duration_s = duration_s;
                self.display.finished(self.plan, &report);
                self.reports[i] = Some(report);
                self.release(i);
            }
            Outcome::Failed { error } => {
                let failure = Failure {
                    message: error,
                    log_tail: result.log_tail,
                    duration_s,
                };
                self.fail(i, failure, report.key, report.reasons);
            }
            Outcome::Cancelled => {
                report.status = StageStatus::Skipped;
                report.message = Some("interrupted".into());
                self.reports[i] = Some(report);
            }
        }
    }

    /// Node `i` has a result: its downstream stages whose inputs are all known become ready.
    fn release(&mut self, i: usize) {
        for &d in &self.downstream[i] {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 {
                self.ready.push(Reverse(d));
            }
        }
    }

    /// Node `i` failed: reported, exactly its descendants skipped, and without `--keep-going`
    /// nothing new started.
    fn fail(&mut self, i: usize, failure: Failure, key: Option<String>, reasons: Vec<String>) {
        let report = StageReport {
            node: i,
            status: StageStatus::Failed,
            key,
            duration_s: failure.duration_s,
            metrics: Metrics::new(),
            tree: None,
            message: Some(failure.message),
            reasons,
        };
        self.display.failed(self.plan, &report, &failure.log_tail);
        self.reports[i] = Some(report);
        let mut stack = self.downstream[i].clone();
        while let Some(d) = stack.pop() {
            if self.reports[d].is_some() || self.running.contains_key(&d) {
                continue;
            }
            let message = format!("skipped: upstream '{}' failed", self.plan.nodes[i].name);
            let report = StageReport::skipped(d, message);
            self.display.finished(self.plan, &report);
            self.reports[d] = Some(report);
            stack.extend(&self.downstream[d]);
        }
        if !self.options.keep_going {
            self.stop_new = true;
        }
    }

    /// The summary: every stage not done with is reported as not started. The claims of
    /// stages that never started (stopped by a failure or Ctrl-C, or refused by the executor)
    /// are given up, so that no later run, in this process or another, waits for them.
    fn finish(self) -> RunSummary {
        for key in self.in_flight.keys() {
            self.heartbeat.drop_key(key);
            if let Err(e) = self.cache.release(key, &self.owner) {
                tracing::warn!("could not release the claim on {key}: {e}");
            }
        }
        let reason = if self.interrupted {
            "not started: interrupted"
        } else {
            "not started: an earlier stage failed (--keep-going runs independent stages)"
        };
        let reports = self
            .reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| StageReport::skipped(i, reason.into())))
            .collect();
        drop(self.heartbeat);
        let summary = RunSummary {
            reports,
            interrupted: self.interrupted,
            wall_s: self.started.elapsed().as_secs_f64(),
        };
        self.display.end(self.plan, &summary);
        summary
    }
}

/// The self-contained description of node `i`'s run, given its upstream trees.
fn stage_job(
    plan: &Plan,
    i: usize,
    key: String,
    key_doc: Value,
    cpus: usize,
    trees: &[Option<Hash>],
) -> StageJob {
    let node = &plan.nodes[i];
    StageJob {
        key,
        key_doc,
        pipeline: plan.pipeline.name.clone(),
        stage: node.name.clone(),
        op: node.op.name().to_string(),
        op_version: node.op.version(),
        params: node.params.clone(),
        inputs: input_trees(plan, i, trees),
        seed: node.seed,
        cpus,
        retries: node.retries,
        timeout_s: node.timeout.map(|t| t.as_secs_f64()),
        outs: node.outs.clone(),
        workspace: plan.pipeline.workspace.clone(),
    }
}

fn input_trees(plan: &Plan, i: usize, trees: &[Option<Hash>]) -> Vec<(String, JobInput)> {
    let tree = |u: usize| trees[u].unwrap_or_else(|| cache::hash_bytes(b""));
    plan.nodes[i]
        .inputs
        .iter()
        .map(|input| {
            let ji = match &input.sources {
                InputSources::One(u) => JobInput::One(tree(*u)),
                InputSources::Many(list) => JobInput::Many(
                    list.iter()
                        .enumerate()
                        .map(|(k, &u)| {
                            let folder = crate::plan::list_item_folder(&plan.nodes[u].label, k);
                            (folder, tree(u))
                        })
                        .collect(),
                ),
            };
            (input.name.clone(), ji)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ops::Op;

    use super::*;
    use crate::node_keys::node_key;
    use crate::plan::{build, PlanOptions};
    use crate::spec::{Pipeline, Resources, SpecError};
    use crate::worker;
    use StageStatus::*;

    /// What the fake executor does with a stage, by stage name.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Script {
        Succeed,
        Fail,
        RefuseStart,
        RunUntilCancelled,
    }

    type OnWait = dyn FnMut(usize, &[(usize, StageJob)]);

    /// Completes started stages at its next wait, as their scripts say, and records them as
    /// the real executors do: a success with a real output tree in the store (its one file
    /// holds the key, so equal keys give equal trees), a failure as a failed run.
    struct FakeExecutor {
        cache: Arc<Cache>,
        capacity: usize,
        scripts: HashMap<String, Script>,
        /// Stage names, in start order.
        started: Vec<String>,
        running: Vec<(usize, StageJob)>,
        cancelled: bool,
        /// Called at every wait, with how many waits came before: what happens meanwhile
        /// outside the scheduler (another engine process, Ctrl-C).
        on_wait: Box<OnWait>,
        waits: usize,
    }

    impl FakeExecutor {
        fn new(cache: &Arc<Cache>, capacity: usize, scripts: &[(&str, Script)]) -> Self {
            Self {
                cache: cache.clone(),
                capacity,
                scripts: scripts.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
                started: Vec::new(),
                running: Vec::new(),
                cancelled: false,
                on_wait: Box::new(|_, _| {}),
                waits: 0,
            }
        }

        fn script(&self, stage: &str) -> Script {
            self.scripts.get(stage).copied().unwrap_or(Script::Succeed)
        }

        fn complete(&self, job: &StageJob) -> StageResult {
            let result = match self.script(&job.stage) {
                Script::Fail => StageResult::failed_now(
                    "the command exited with status 3".into(),
                    "its last line".into(),
                    None,
                ),
                _ => succeeded(&self.cache, job),
            };
            worker::record(&self.cache, job, &result).unwrap();
            result
        }
    }

    /// A successful result of `job`, its output stored.
    fn succeeded(cache: &Cache, job: &StageJob) -> StageResult {
        let scratch = cache.store().scratch().unwrap();
        std::fs::write(scratch.path().join("out"), &job.key).unwrap();
        let tree = cache.store().put_dir(scratch.path(), &[]).unwrap();
        StageResult {
            outcome: Outcome::Ok {
                tree,
                metrics: Metrics::new(),
            },
            log_blob: None,
            log_tail: String::new(),
            started_at: unix_now(),
            ended_at: unix_now(),
            host: "fake".into(),
        }
    }

    impl Executor for FakeExecutor {
        fn capacity(&self) -> usize {
            self.capacity
        }

        fn cost(&self, _cpus: usize) -> usize {
            1
        }

        fn start(
            &mut self,
            node: usize,
            job: StageJob,
            _op: Arc<dyn Op>,
            _resources: &Resources,
        ) -> Result<(), ExecError> {
            if self.script(&job.stage) == Script::RefuseStart {
                return Err(SpecError::new("executor", "no slot").into());
            }
            self.started.push(job.stage.clone());
            self.running.push((node, job));
            Ok(())
        }

        fn wait(&mut self, timeout: Duration) -> Vec<(usize, StageResult)> {
            (self.on_wait)(self.waits, &self.running);
            self.waits += 1;
            let mut done = Vec::new();
            for (node, job) in std::mem::take(&mut self.running) {
                if self.cancelled {
                    done.push((node, StageResult::cancelled_now()));
                } else if self.script(&job.stage) == Script::RunUntilCancelled {
                    self.running.push((node, job));
                } else {
                    done.push((node, self.complete(&job)));
                }
            }
            if done.is_empty() {
                std::thread::sleep(timeout);
            }
            done
        }

        fn cancel_all(&mut self) {
            self.cancelled = true;
        }
    }

    /// The display's messages and failures.
    #[derive(Default)]
    struct Recorder {
        messages: Vec<String>,
        failures: Vec<(String, String)>,
    }

    impl Display for Recorder {
        fn begin(&mut self, _: &Plan) {}
        fn started(&mut self, _: &Plan, _: usize, _: &[String]) {}
        fn finished(&mut self, _: &Plan, _: &StageReport) {}
        fn failed(&mut self, plan: &Plan, report: &StageReport, log_tail: &str) {
            let name = plan.nodes[report.node].name.clone();
            self.failures.push((name, log_tail.to_string()));
        }
        fn message(&mut self, text: &str) {
            self.messages.push(text.to_string());
        }
        fn tick(&mut self, _: &Plan, _: &HashMap<usize, String>) {}
        fn end(&mut self, _: &Plan, _: &RunSummary) {}
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        plan: Plan,
        cache: Arc<Cache>,
    }

    /// A pipeline of the given `stages:` lines, and an empty cache.
    fn fixture(stages: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("name: sched\nstages:\n{stages}");
        let pipeline = Pipeline::from_str(&text, &dir.path().join("p.yaml"), &[]).unwrap();
        let plan = build(pipeline, &ops::Registry::builtin(), &PlanOptions::default()).unwrap();
        let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
        Fixture {
            _dir: dir,
            plan,
            cache,
        }
    }

    fn options(jobs: usize, keep_going: bool) -> RunOptions {
        RunOptions {
            jobs,
            keep_going,
            force: Vec::new(),
        }
    }

    /// Runs `f`'s plan on `executor` with `-j jobs`, Ctrl-C never pressed.
    fn run(
        f: &Fixture,
        executor: &mut FakeExecutor,
        jobs: usize,
        keep_going: bool,
    ) -> (RunSummary, Recorder) {
        run_until(
            f,
            executor,
            &options(jobs, keep_going),
            &AtomicBool::new(false),
        )
    }

    fn run_until(
        f: &Fixture,
        executor: &mut FakeExecutor,
        options: &RunOptions,
        interrupt: &AtomicBool,
    ) -> (RunSummary, Recorder) {
        let mut display = Recorder::default();
        let scheduler = Scheduler::new(&f.plan, &f.cache, options, &mut display, executor);
        let summary = scheduler.unwrap().run(interrupt).unwrap();
        (summary, display)
    }

    /// Each stage's status and message, by name.
    fn outcomes(f: &Fixture, summary: &RunSummary) -> BTreeMap<String, (StageStatus, String)> {
        summary
            .reports
            .iter()
            .map(|r| {
                let message = r.message.clone().unwrap_or_default();
                (f.plan.nodes[r.node].name.clone(), (r.status, message))
            })
            .collect()
    }

    fn expected(items: &[(&str, StageStatus, &str)]) -> BTreeMap<String, (StageStatus, String)> {
        items
            .iter()
            .map(|(n, s, m)| (n.to_string(), (*s, m.to_string())))
            .collect()
    }

    const UPSTREAM_A: &str = "skipped: upstream 'a' failed";

    #[test]
    fn a_failure_skips_exactly_its_descendants() {
        let f = fixture(
            r#"
  a: {op: shell, cmd: "echo a"}
  b: {op: shell, cmd: "echo b"}
  c: {op: shell, cmd: "echo c", inputs: {x: a}}
  d: {op: shell, cmd: "echo d", inputs: {x: c}}
  e: {op: shell, cmd: "echo e", inputs: {x: b}}
  f: {op: shell, cmd: "echo f", inputs: {x: a, y: b}}
  g: {op: shell, cmd: "echo g"}
  h: {op: shell, cmd: "echo h", inputs: {x: g}}
"#,
        );
        let scripts = [("a", Script::Fail), ("g", Script::RefuseStart)];
        let mut executor = FakeExecutor::new(&f.cache, 8, &scripts);
        let (summary, display) = run(&f, &mut executor, 8, true);
        let refused = format!(
            "could not start: {}",
            ExecError::from(SpecError::new("executor", "no slot"))
        );
        assert_eq!(
            outcomes(&f, &summary),
            expected(&[
                ("a", Failed, "the command exited with status 3"),
                ("b", Ran, ""),
                ("c", Skipped, UPSTREAM_A),
                ("d", Skipped, UPSTREAM_A),
                ("e", Ran, ""),
                ("f", Skipped, UPSTREAM_A),
                ("g", Failed, &refused),
                ("h", Skipped, "skipped: upstream 'g' failed"),
            ])
        );
        let mut started = executor.started.clone();
        started.sort();
        assert_eq!(started, ["a", "b", "e"]);
        assert_eq!(
            display.failures,
            [
                ("g".to_string(), String::new()),
                ("a".to_string(), "its last line".to_string())
            ]
        );
        assert!(!summary.interrupted);
    }

    #[test]
    fn without_keep_going_nothing_starts_after_the_first_failure() {
        let stages = r#"
  a: {op: shell, cmd: "echo a"}
  b: {op: shell, cmd: "echo b"}
  c: {op: shell, cmd: "echo c", inputs: {x: a}}
"#;
        let not_started =
            "not started: an earlier stage failed (--keep-going runs independent stages)";
        for (keep_going, b) in [(false, (Skipped, not_started)), (true, (Ran, ""))] {
            let f = fixture(stages);
            let mut executor = FakeExecutor::new(&f.cache, 1, &[("a", Script::Fail)]);
            let (summary, _) = run(&f, &mut executor, 1, keep_going);
            assert_eq!(
                outcomes(&f, &summary),
                expected(&[
                    ("a", Failed, "the command exited with status 3"),
                    ("b", b.0, b.1),
                    ("c", Skipped, UPSTREAM_A),
                ]),
                "keep_going: {keep_going}"
            );
            let started: &[&str] = if keep_going { &["a", "b"] } else { &["a"] };
            assert_eq!(executor.started, started);
            // b was claimed and queued, then never started: its claim is given up.
            let b = f.plan.nodes.iter().position(|n| n.name == "b").unwrap();
            let trees = vec![None; f.plan.nodes.len()];
            let key = node_key(&f.plan, b, &trees, &BTreeMap::new()).unwrap();
            let later = ClaimOwner::this_process(unix_now() + 1.0);
            let claim = f
                .cache
                .try_claim(&key, &later, CLAIM_STALE_S, false)
                .unwrap();
            assert_eq!(claim, ClaimState::Acquired, "keep_going: {keep_going}");
        }
    }

    #[test]
    fn stages_with_equal_keys_run_once() {
        let f = fixture(
            r#"
  a: {op: shell, cmd: "echo same"}
  b: {op: shell, cmd: "echo same"}
  c: {op: shell, cmd: "echo other", inputs: {x: b}}
"#,
        );
        let mut executor = FakeExecutor::new(&f.cache, 4, &[]);
        let (summary, _) = run(&f, &mut executor, 4, false);
        assert_eq!(
            outcomes(&f, &summary),
            expected(&[("a", Ran, ""), ("b", Cached, ""), ("c", Ran, "")])
        );
        assert_eq!(executor.started, ["a", "c"]);
        assert_eq!(summary.reports[0].key, summary.reports[1].key);
        assert_eq!(summary.reports[0].tree, summary.reports[1].tree);
    }

    /// Another engine process (same pid, another owner) holds the claim on the key of root
    /// stage `name` until the fake's third wait, past one claim poll, and then releases it,
    /// having recorded a result if `record`. Returns the key.
    fn held_by_another_engine(
        f: &Fixture,
        name: &str,
        executor: &mut FakeExecutor,
        record: bool,
    ) -> String {
        let i = f.plan.nodes.iter().position(|n| n.name == name).unwrap();
        let trees = vec![None; f.plan.nodes.len()];
        let key = node_key(&f.plan, i, &trees, &BTreeMap::new()).unwrap();
        let doc = node_doc(&f.plan, i, &trees, &BTreeMap::new()).unwrap();
        let other = ClaimOwner::this_process(unix_now() - 1000.0);
        let claimed = f
            .cache
            .try_claim(&key, &other, CLAIM_STALE_S, true)
            .unwrap();
        assert_eq!(claimed, ClaimState::Acquired);
        let job = stage_job(&f.plan, i, key.clone(), doc, 1, &trees);
        let cache = f.cache.clone();
        executor.on_wait = Box::new(move |waits, _| {
            if waits == 2 {
                if record {
                    worker::record(&cache, &job, &succeeded(&cache, &job)).unwrap();
                }
                cache.release(&job.key, &other).unwrap();
            }
        });
        key
    }

    #[test]
    fn a_key_claimed_by_another_engine_is_waited_for_then_reused() {
        let f = fixture(
            r#"
  a: {op: shell, cmd: "echo a"}
  b: {op: shell, cmd: "echo b", inputs: {x: a}}
"#,
        );
        let mut executor = FakeExecutor::new(&f.cache, 4, &[]);
        let key = held_by_another_engine(&f, "a", &mut executor, true);
        let (summary, display) = run(&f, &mut executor, 4, false);
        assert_eq!(
            outcomes(&f, &summary),
            expected(&[("a", Cached, ""), ("b", Ran, "")])
        );
        assert_eq!(summary.reports[0].key.as_deref(), Some(key.as_str()));
        assert_eq!(executor.started, ["b"]);
        assert!(executor.waits > 2, "reused before the claim was released");
        let waiting: Vec<&String> = display
            .messages
            .iter()
            .filter(|m| m.starts_with("waiting: a is being run by another engine process"))
            .collect();
        assert_eq!(waiting.len(), 1, "{:?}", display.messages);
    }

    /// Two stages of this run wait on the same key; the other engine gives it up without a
    /// result: one of them runs it, the other reuses that run.
    #[test]
    fn a_claim_given_up_is_run_here_once_for_equal_keys() {
        let f = fixture(
            r#"
  a: {op: shell, cmd: "echo same"}
  b: {op: shell, cmd: "echo same"}
"#,
        );
        let mut executor = FakeExecutor::new(&f.cache, 4, &[]);
        held_by_another_engine(&f, "a", &mut executor, false);
        let (summary, _) = run(&f, &mut executor, 4, false);
        assert_eq!(
            outcomes(&f, &summary),
            expected(&[("a", Ran, ""), ("b", Cached, "")])
        );
        assert_eq!(executor.started, ["a"]);
    }

    #[test]
    fn an_interrupt_stops_running_stages_and_starts_nothing_new() {
        let f = fixture(
            r#"
  a: {op: shell, cmd: "echo a"}
  b: {op: shell, cmd: "echo b"}
  c: {op: shell, cmd: "echo c", inputs: {x: a}}
"#,
        );
        let mut executor = FakeExecutor::new(&f.cache, 1, &[("a", Script::RunUntilCancelled)]);
        let interrupt = Arc::new(AtomicBool::new(false));
        let ctrl_c = interrupt.clone();
        executor.on_wait = Box::new(move |_, running| {
            if !running.is_empty() {
                ctrl_c.store(true, Ordering::SeqCst);
            }
        });
        let (summary, display) = run_until(&f, &mut executor, &options(1, false), &interrupt);
        let not_started = "not started: interrupted";
        assert_eq!(
            outcomes(&f, &summary),
            expected(&[
                ("a", Skipped, "interrupted"),
                ("b", Skipped, not_started),
                ("c", Skipped, not_started),
            ])
        );
        assert!(executor.cancelled);
        assert_eq!(executor.started, ["a"]);
        assert!(summary.interrupted);
        assert!(display.messages[0].starts_with("interrupted: stopping running stages"));
    }
}
