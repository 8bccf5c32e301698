//! Running a [`Plan`]: cache lookups, parallel execution of stale stages, atomic recording.
//!
//! The scheduler thread owns all state. A stage becomes *ready* when every upstream stage has
//! a result; it is then keyed (its inputs' output trees are known), looked up, and either
//! reused or handed to a worker thread, within the `-j` CPU budget. Workers run the op in a
//! scratch folder, move its output into the store and record the run in one transaction, so a
//! kill at any point leaves no partial record.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cache::{Cache, ClaimOwner, ClaimState, Hash, NewRun, RunStatus, Tree};
use ops::{CancelFlag, Input, Metrics, OpError, Progress, RunContext};
use serde_json::Value;

use crate::keys::{closest_run, explain, node_key, DepHashes};
use crate::plan::{InputSources, Plan};
use crate::progress::Display;
use crate::spec::SpecError;

/// A claim whose owner has not refreshed it for this long is taken over.
pub const CLAIM_STALE_S: f64 = 30.0;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const CLAIM_POLL: Duration = Duration::from_millis(200);

/// How many recent runs of a stage are compared to find the closest one when explaining.
pub const RECENT_RUNS: usize = 20;

/// Tree paths under this prefix hold a stage's workspace `outs`.
pub const WORKSPACE_PREFIX: &str = "@workspace";

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub keep_going: bool,
    /// Nodes to rerun even if cached.
    pub force: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    Cached,
    Ran,
    Failed,
    Skipped,
}

/// What happened to one stage instance.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub node: usize,
    pub status: StageStatus,
    pub key: Option<String>,
    pub duration_s: f64,
    pub metrics: Metrics,
    pub tree: Option<Hash>,
    /// Failure message or skip reason.
    pub message: Option<String>,
    /// Why it ran (for `ran`), from the key diff.
    pub reasons: Vec<String>,
}

pub struct RunSummary {
    pub reports: Vec<StageReport>,
    pub interrupted: bool,
    pub wall_s: f64,
}

impl RunSummary {
    pub fn count(&self, status: StageStatus) -> usize {
        self.reports.iter().filter(|r| r.status == status).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cache: {0}")]
    Cache(#[from] cache::CacheError),
}

enum Event {
    Finished { node: usize, outcome: WorkerOutcome },
}

enum WorkerOutcome {
    Ran {
        tree: Hash,
        metrics: Metrics,
        duration_s: f64,
    },
    Failed {
        message: String,
        log_tail: String,
        duration_s: f64,
    },
    Cancelled,
}

struct Running {
    cancel: CancelFlag,
    cpus: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
    Skipped,
}

/// Runs every stale stage of `plan`. `interrupt` is raised by the Ctrl-C handler.
pub fn run(
    plan: &Plan,
    cache: &Arc<Cache>,
    options: &RunOptions,
    interrupt: &AtomicBool,
    display: &mut dyn Display,
) -> Result<RunSummary, ExecError> {
    let started = Instant::now();
    // Held for the whole run so `gc`/`verify` never delete what this run is using.
    let _lock = cache.lock_shared()?;
    let owner = ClaimOwner {
        id: format!("{}:{}:{}", hostname(), std::process::id(), unix_now()),
        host: hostname(),
        pid: std::process::id(),
    };
    let heartbeat = Heartbeat::start(cache.clone(), owner.clone());
    let n = plan.nodes.len();
    let mut deps = DepHashes::for_static_deps(plan, cache)?;
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting_on: Vec<usize> = vec![0; n];
    for (i, node) in plan.nodes.iter().enumerate() {
        let up = node.upstream();
        waiting_on[i] = up.len();
        for u in up {
            downstream[u].push(i);
        }
    }
    let mut state = vec![State::Waiting; n];
    let mut trees: Vec<Option<Hash>> = vec![None; n];
    let mut reports: Vec<Option<StageReport>> = vec![None; n];
    let mut ready: BinaryHeap<Reverse<usize>> = (0..n)
        .filter(|&i| waiting_on[i] == 0)
        .map(Reverse)
        .collect();
    let mut queued: BinaryHeap<Reverse<usize>> = BinaryHeap::new();
    let mut queued_keys: HashMap<usize, (Value, String, Vec<String>)> = HashMap::new();
    // Stages whose key equals one already queued or running wait for it and reuse its result.
    let mut in_flight: HashMap<String, Vec<usize>> = HashMap::new();
    // Stages another engine process is running: re-checked until its result is recorded or
    // its claim is released or abandoned.
    let mut claim_waits: Vec<(usize, Instant)> = Vec::new();
    let mut warned_corrupt = false;
    let mut running: HashMap<usize, Running> = HashMap::new();
    let mut free_cpus = options.jobs.max(1);
    let mut stop_new = false;
    let mut interrupted = false;
    let (tx, rx) = mpsc::channel::<Event>();
    let progress_texts: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    display.begin(plan);

    loop {
        if interrupt.load(Ordering::SeqCst) && !interrupted {
            interrupted = true;
            stop_new = true;
            for r in running.values() {
                r.cancel.cancel();
            }
            display.message(
                "interrupted: stopping running stages (press Ctrl-C again to exit at once)",
            );
        }
        // Key and look up every ready stage; cache hits free their dependents at once.
        while !stop_new {
            let Some(Reverse(i)) = ready.pop() else { break };
            let node = &plan.nodes[i];
            let node_deps = match deps.for_node(plan, cache, i) {
                Ok(d) => d,
                Err(message) => {
                    fail(
                        plan,
                        i,
                        message,
                        String::new(),
                        0.0,
                        None,
                        &mut state,
                        &mut reports,
                        display,
                    );
                    skip_descendants(i, plan, &downstream, &mut state, &mut reports, display);
                    if !options.keep_going {
                        stop_new = true;
                    }
                    continue;
                }
            };
            let Some((doc, key)) = node_key(plan, i, &trees, &node_deps) else {
                continue;
            };
            let forced = options.force.contains(&i);
            if node.cache && !forced {
                if let Some(tree) = reuse(plan, cache, i, &key, &mut warned_corrupt, display)? {
                    trees[i] = Some(tree.0);
                    state[i] = State::Done;
                    let report = StageReport {
                        node: i,
                        status: StageStatus::Cached,
                        key: Some(key),
                        duration_s: 0.0,
                        metrics: tree.1,
                        tree: Some(tree.0),
                        message: None,
                        reasons: Vec::new(),
                    };
                    display.finished(plan, &report);
                    reports[i] = Some(report);
                    release(i, &downstream, &mut waiting_on, &mut ready);
                    continue;
                }
            }
            let reasons = if forced {
                vec!["--force".to_string()]
            } else if !node.cache {
                vec!["cache: false".to_string()]
            } else {
                let recent = cache.recent_runs(&plan.pipeline.name, &node.name, RECENT_RUNS)?;
                let mut r = explain(&doc, closest_run(&doc, &recent));
                if r.is_empty() {
                    r.push("the recorded result's objects are missing from the store".into());
                }
                r
            };
            if let Some(parked) = in_flight.get_mut(&key) {
                parked.push(i);
                continue;
            }
            match cache.try_claim(&key, &owner, CLAIM_STALE_S)? {
                ClaimState::Acquired => {
                    heartbeat.hold(&key);
                    in_flight.insert(key.clone(), Vec::new());
                    queued_keys.insert(i, (doc, key, reasons));
                    queued.push(Reverse(i));
                }
                ClaimState::HeldBy { pid, host, .. } => {
                    display.message(&format!(
                        "waiting: {} is being run by another engine process (pid {pid} on {host})",
                        node.name
                    ));
                    queued_keys.insert(i, (doc, key, reasons));
                    claim_waits.push((i, Instant::now() + CLAIM_POLL));
                }
            }
        }
        // Start queued stages while CPUs are free, in plan order.
        while let (false, Some(&Reverse(i))) = (stop_new, queued.peek()) {
            let need = plan.nodes[i].resources.cpus.clamp(1, options.jobs.max(1));
            if need > free_cpus {
                break;
            }
            queued.pop();
            let (doc, key, reasons) = queued_keys.remove(&i).unwrap_or_default();
            free_cpus -= need;
            let cancel = CancelFlag::new();
            running.insert(
                i,
                Running {
                    cancel: cancel.clone(),
                    cpus: need,
                },
            );
            state[i] = State::Running;
            display.started(plan, i, &reasons);
            let job = Job {
                node: i,
                key: key.clone(),
                doc,
                inputs: input_trees(plan, i, &trees),
                cpus: need,
                interrupt: cancel,
                progress_texts: progress_texts.clone(),
            };
            reports[i] = Some(StageReport {
                node: i,
                status: StageStatus::Ran,
                key: Some(key),
                duration_s: 0.0,
                metrics: Metrics::new(),
                tree: None,
                message: None,
                reasons,
            });
            spawn_worker(plan, cache, job, tx.clone());
        }
        // Stages another process was running: reuse its result, or run them ourselves once
        // its claim is gone.
        let now = Instant::now();
        let mut still_waiting = Vec::new();
        for (i, due) in std::mem::take(&mut claim_waits) {
            if stop_new {
                queued_keys.remove(&i);
                continue;
            }
            if due > now {
                still_waiting.push((i, due));
                continue;
            }
            let key = queued_keys.get(&i).map(|k| k.1.clone()).unwrap_or_default();
            if let Some(tree) = reuse(plan, cache, i, &key, &mut warned_corrupt, display)? {
                queued_keys.remove(&i);
                trees[i] = Some(tree.0);
                state[i] = State::Done;
                let report = StageReport {
                    node: i,
                    status: StageStatus::Cached,
                    key: Some(key),
                    duration_s: 0.0,
                    metrics: tree.1,
                    tree: Some(tree.0),
                    message: None,
                    reasons: Vec::new(),
                };
                display.finished(plan, &report);
                reports[i] = Some(report);
                release(i, &downstream, &mut waiting_on, &mut ready);
                continue;
            }
            match cache.try_claim(&key, &owner, CLAIM_STALE_S)? {
                ClaimState::Acquired => {
                    heartbeat.hold(&key);
                    in_flight.insert(key, Vec::new());
                    queued.push(Reverse(i));
                }
                ClaimState::HeldBy { .. } => still_waiting.push((i, now + CLAIM_POLL)),
            }
        }
        claim_waits = still_waiting;
        if running.is_empty()
            && claim_waits.is_empty()
            && (stop_new || (ready.is_empty() && queued.is_empty()))
        {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Finished { node: i, outcome }) => {
                let r = running.remove(&i);
                let finished_key = reports[i].as_ref().and_then(|r| r.key.clone());
                if let Some(k) = &finished_key {
                    heartbeat.drop_key(k);
                    if let Err(e) = cache.release(k, &owner) {
                        tracing::warn!("could not release the claim on {k}: {e}");
                    }
                }
                if let Some(parked) = finished_key.and_then(|k| in_flight.remove(&k)) {
                    // Re-examined now: a cache hit if this run succeeded, a run of their own if not.
                    ready.extend(parked.into_iter().map(Reverse));
                }
                free_cpus += r.as_ref().map_or(1, |r| r.cpus);
                progress_texts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&i);
                match outcome {
                    WorkerOutcome::Ran {
                        tree,
                        metrics,
                        duration_s,
                    } => {
                        trees[i] = Some(tree);
                        state[i] = State::Done;
                        if let Some(rep) = reports[i].as_mut() {
                            rep.tree = Some(tree);
                            rep.metrics = metrics;
                            rep.duration_s = duration_s;
                        }
                        if let Some(rep) = &reports[i] {
                            display.finished(plan, rep);
                        }
                        release(i, &downstream, &mut waiting_on, &mut ready);
                    }
                    WorkerOutcome::Failed {
                        message,
                        log_tail,
                        duration_s,
                    } => {
                        let key = reports[i].as_ref().and_then(|r| r.key.clone());
                        fail(
                            plan,
                            i,
                            message,
                            log_tail,
                            duration_s,
                            key,
                            &mut state,
                            &mut reports,
                            display,
                        );
                        skip_descendants(i, plan, &downstream, &mut state, &mut reports, display);
                        if !options.keep_going {
                            stop_new = true;
                        }
                    }
                    WorkerOutcome::Cancelled => {
                        state[i] = State::Skipped;
                        if let Some(rep) = reports[i].as_mut() {
                            rep.status = StageStatus::Skipped;
                            rep.message = Some("interrupted".into());
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let texts = progress_texts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        display.tick(plan, &texts);
    }

    let reason = if interrupted {
        "not started: interrupted"
    } else {
        "not started: an earlier stage failed (--keep-going runs independent stages)"
    };
    let reports: Vec<StageReport> = reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or(StageReport {
                node: i,
                status: StageStatus::Skipped,
                key: None,
                duration_s: 0.0,
                metrics: Metrics::new(),
                tree: None,
                message: Some(reason.into()),
                reasons: Vec::new(),
            })
        })
        .collect();
    heartbeat.stop();
    let summary = RunSummary {
        reports,
        interrupted,
        wall_s: started.elapsed().as_secs_f64(),
    };
    display.end(plan, &summary);
    Ok(summary)
}

fn release(
    i: usize,
    downstream: &[Vec<usize>],
    waiting_on: &mut [usize],
    ready: &mut BinaryHeap<Reverse<usize>>,
) {
    for &d in &downstream[i] {
        waiting_on[d] -= 1;
        if waiting_on[d] == 0 {
            ready.push(Reverse(d));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fail(
    plan: &Plan,
    i: usize,
    message: String,
    log_tail: String,
    duration_s: f64,
    key: Option<String>,
    state: &mut [State],
    reports: &mut [Option<StageReport>],
    display: &mut dyn Display,
) {
    state[i] = State::Failed;
    let report = StageReport {
        node: i,
        status: StageStatus::Failed,
        key,
        duration_s,
        metrics: Metrics::new(),
        tree: None,
        message: Some(message),
        reasons: reports[i]
            .as_ref()
            .map(|r| r.reasons.clone())
            .unwrap_or_default(),
    };
    display.failed(plan, &report, &log_tail);
    reports[i] = Some(report);
}

fn skip_descendants(
    failed: usize,
    plan: &Plan,
    downstream: &[Vec<usize>],
    state: &mut [State],
    reports: &mut [Option<StageReport>],
    display: &mut dyn Display,
) {
    let mut stack = downstream[failed].clone();
    while let Some(d) = stack.pop() {
        if state[d] != State::Waiting {
            continue;
        }
        state[d] = State::Skipped;
        let report = StageReport {
            node: d,
            status: StageStatus::Skipped,
            key: None,
            duration_s: 0.0,
            metrics: Metrics::new(),
            tree: None,
            message: Some(format!(
                "skipped: upstream '{}' failed",
                plan.nodes[failed].name
            )),
            reasons: Vec::new(),
        };
        display.finished(plan, &report);
        reports[d] = Some(report);
        stack.extend(&downstream[d]);
    }
}

/// A cache hit whose objects are all present: restores workspace `outs` and returns the
/// output tree and metrics.
fn reuse(
    plan: &Plan,
    cache: &Cache,
    i: usize,
    key: &str,
    warned_corrupt: &mut bool,
    display: &mut dyn Display,
) -> Result<Option<(Hash, Metrics)>, ExecError> {
    let Some(record) = cache.lookup(key)? else {
        return Ok(None);
    };
    let Some(tree_hash) = record.output_tree else {
        return Ok(None);
    };
    let node = &plan.nodes[i];
    if let Err(bad) = cache.check_tree(&tree_hash) {
        if !*warned_corrupt {
            display.message(&format!(
                "warning: the cached result of '{}' is damaged (object {} missing or corrupt); recomputing it (`engine verify` checks the whole cache)",
                node.name,
                bad.first().map(|h| h.short()).unwrap_or_default()
            ));
            *warned_corrupt = true;
        }
        return Ok(None);
    }
    if !node.outs.is_empty() {
        let tree = cache.store().read_tree(&tree_hash)?;
        restore_outs(plan, cache, i, &tree)?;
    }
    Ok(Some((tree_hash, record.run.metrics.clone())))
}

/// Puts a cached stage's workspace `outs` back where the pipeline expects them, copying only
/// files whose content differs.
fn restore_outs(plan: &Plan, cache: &Cache, i: usize, tree: &Tree) -> Result<(), ExecError> {
    let ws = &plan.pipeline.workspace;
    let prefix = format!("{WORKSPACE_PREFIX}/");
    let wanted: Vec<(&cache::TreeEntry, PathBuf)> = tree
        .entries
        .iter()
        .filter_map(|e| e.path.strip_prefix(&prefix).map(|rel| (e, ws.join(rel))))
        .collect();
    let present: Vec<PathBuf> = wanted
        .iter()
        .filter(|(_, p)| p.is_file())
        .map(|(_, p)| p.clone())
        .collect();
    let hashes: HashMap<PathBuf, Hash> = present
        .iter()
        .cloned()
        .zip(cache.hash_paths(&present))
        .filter_map(|(p, h)| h.ok().map(|h| (p, h)))
        .collect();
    let _ = i;
    for (entry, path) in wanted {
        if hashes.get(&path) == Some(&entry.blob) {
            continue;
        }
        let single = Tree {
            entries: vec![entry.clone()],
        };
        cache
            .store()
            .materialize(&single, &entry.path, &path, false)?;
    }
    Ok(())
}

fn input_trees(plan: &Plan, i: usize, trees: &[Option<Hash>]) -> Vec<(String, JobInput)> {
    plan.nodes[i]
        .inputs
        .iter()
        .map(|input| {
            let ji = match &input.sources {
                InputSources::One(u) => {
                    JobInput::One(trees[*u].unwrap_or_else(|| cache::hash_bytes(b"")))
                }
                InputSources::Many(list) => JobInput::Many(
                    list.iter()
                        .enumerate()
                        .map(|(k, &u)| {
                            let label = plan.nodes[u].label.replace('/', "_");
                            let label = if label.is_empty() {
                                k.to_string()
                            } else {
                                label
                            };
                            (label, trees[u].unwrap_or_else(|| cache::hash_bytes(b"")))
                        })
                        .collect(),
                ),
            };
            (input.name.clone(), ji)
        })
        .collect()
}

enum JobInput {
    One(Hash),
    Many(Vec<(String, Hash)>),
}

struct Job {
    node: usize,
    key: String,
    doc: Value,
    inputs: Vec<(String, JobInput)>,
    cpus: usize,
    /// Raised by the scheduler on Ctrl-C.
    interrupt: CancelFlag,
    progress_texts: Arc<Mutex<HashMap<usize, String>>>,
}

fn spawn_worker(plan: &Plan, cache: &Arc<Cache>, job: Job, tx: mpsc::Sender<Event>) {
    let node = plan.nodes[job.node].clone();
    let pipeline = plan.pipeline.name.clone();
    let workspace = plan.pipeline.workspace.clone();
    let cache = cache.clone();
    std::thread::spawn(move || {
        let i = job.node;
        let _span = tracing::info_span!("stage", name = %node.name, op = node.op.name()).entered();
        let outcome = match execute(&node, &pipeline, &workspace, &cache, &job) {
            Ok(o) => o,
            Err(e) => WorkerOutcome::Failed {
                message: format!("engine error: {e}"),
                log_tail: String::new(),
                duration_s: 0.0,
            },
        };
        let _ = tx.send(Event::Finished { node: i, outcome });
    });
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's name, for run records.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// One stage, every attempt: materialise inputs, run the op, store and record the result.
fn execute(
    node: &crate::plan::Node,
    pipeline: &str,
    workspace: &Path,
    cache: &Cache,
    job: &Job,
) -> Result<WorkerOutcome, ExecError> {
    let scratch = cache.store().scratch()?;
    let mut inputs: BTreeMap<String, Input> = BTreeMap::new();
    for (name, ji) in &job.inputs {
        let dir = scratch.path().join("in").join(name);
        let input = match ji {
            JobInput::One(tree) => {
                materialize_input(cache, tree, &dir)?;
                Input::One(dir)
            }
            JobInput::Many(items) => {
                let mut out = Vec::new();
                for (label, tree) in items {
                    let d = dir.join(label);
                    materialize_input(cache, tree, &d)?;
                    out.push((label.clone(), d));
                }
                std::fs::create_dir_all(&dir).map_err(|e| cache::CacheError::Io {
                    path: dir.clone(),
                    source: e,
                })?;
                Input::Many { dir, items: out }
            }
        };
        inputs.insert(name.clone(), input);
    }
    let started_at = unix_now();
    let start = Instant::now();
    let mut log: Vec<u8> = Vec::new();
    let progress = {
        let texts = job.progress_texts.clone();
        let i = job.node;
        Progress::new(move |m| {
            texts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(i, m.to_string());
        })
    };
    let mut last_error = String::new();
    for attempt in 0..=node.retries {
        if attempt > 0 {
            let _ = writeln!(
                log,
                "\n--- engine: attempt {} of {} (previous: {last_error}) ---",
                attempt + 1,
                node.retries + 1
            );
        }
        let out_dir = scratch.path().join(format!("out{attempt}"));
        std::fs::create_dir_all(&out_dir).map_err(|e| cache::CacheError::Io {
            path: out_dir.clone(),
            source: e,
        })?;
        if job.interrupt.is_cancelled() {
            return Ok(WorkerOutcome::Cancelled);
        }
        let watchdog = Watchdog::start(job.interrupt.clone(), node.timeout);
        let mut ctx = RunContext {
            params: &node.params,
            inputs: &inputs,
            out_dir: &out_dir,
            workspace,
            seed: node.seed,
            cpus: job.cpus,
            cancel: &watchdog.cancel,
            progress: &progress,
            log: &mut log,
            metrics: Metrics::new(),
        };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.op.run(&mut ctx)));
        let metrics = std::mem::take(&mut ctx.metrics);
        let timed_out = watchdog.stop();
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(OpError::Failed(format!("the op panicked: {what}")))
            }
        };
        match result {
            Ok(()) => match store_result(node, workspace, cache, &out_dir) {
                Ok(tree) => {
                    let duration_s = start.elapsed().as_secs_f64();
                    let log_blob = cache.store().put_bytes(&log)?;
                    cache.record(&NewRun {
                        key: job.key.clone(),
                        pipeline: pipeline.to_string(),
                        stage: node.name.clone(),
                        op: node.op.name().to_string(),
                        op_version: node.op.version(),
                        key_doc: job.doc.clone(),
                        output_tree: Some(tree),
                        status: RunStatus::Ok,
                        error: None,
                        started_at,
                        ended_at: unix_now(),
                        host: hostname(),
                        engine_version: env!("CARGO_PKG_VERSION").to_string(),
                        log_blob: Some(log_blob),
                        metrics: metrics.clone(),
                    })?;
                    return Ok(WorkerOutcome::Ran {
                        tree,
                        metrics,
                        duration_s,
                    });
                }
                Err(message) => last_error = message,
            },
            Err(OpError::Cancelled) if !timed_out => {
                return Ok(WorkerOutcome::Cancelled);
            }
            Err(OpError::Cancelled) => {
                last_error = format!(
                    "timed out after {}",
                    humantime::format_duration(node.timeout.unwrap_or_default())
                );
            }
            Err(e) => last_error = e.to_string(),
        }
        let _ = writeln!(log, "engine: {last_error}");
    }
    let duration_s = start.elapsed().as_secs_f64();
    let log_blob = cache.store().put_bytes(&log)?;
    cache.record(&NewRun {
        key: job.key.clone(),
        pipeline: pipeline.to_string(),
        stage: node.name.clone(),
        op: node.op.name().to_string(),
        op_version: node.op.version(),
        key_doc: job.doc.clone(),
        output_tree: None,
        status: RunStatus::Failed,
        error: Some(last_error.clone()),
        started_at,
        ended_at: unix_now(),
        host: hostname(),
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        log_blob: Some(log_blob),
        metrics: Metrics::new(),
    })?;
    Ok(WorkerOutcome::Failed {
        message: last_error,
        log_tail: tail(&log, 20),
        duration_s,
    })
}

/// Refreshes this process's claims every few seconds, so other processes can tell a live
/// owner from a dead one.
struct Heartbeat {
    held: Arc<Mutex<std::collections::HashSet<String>>>,
    stop_tx: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Heartbeat {
    fn start(cache: Arc<Cache>, owner: ClaimOwner) -> Self {
        let held: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = {
            let held = held.clone();
            std::thread::spawn(move || loop {
                match stop_rx.recv_timeout(HEARTBEAT_EVERY) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let keys: Vec<String> = held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                if !keys.is_empty() {
                    if let Err(e) = cache.heartbeat(&keys, &owner) {
                        tracing::warn!("claim heartbeat failed: {e}");
                    }
                }
            })
        };
        Self {
            held,
            stop_tx,
            thread,
        }
    }

    fn hold(&self, key: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
    }

    fn drop_key(&self, key: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn stop(self) {
        drop(self.stop_tx);
        let _ = self.thread.join();
    }
}

/// Cancels one attempt of a stage on Ctrl-C or when its timeout passes. Without a timeout the
/// scheduler's interrupt flag is used directly and no thread is started.
struct Watchdog {
    cancel: CancelFlag,
    timed_out: Arc<AtomicBool>,
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(interrupt: CancelFlag, timeout: Option<Duration>) -> Self {
        let timed_out = Arc::new(AtomicBool::new(false));
        let Some(timeout) = timeout else {
            return Self {
                cancel: interrupt,
                timed_out,
                stop_tx: None,
                thread: None,
            };
        };
        let cancel = CancelFlag::new();
        let deadline = Instant::now() + timeout;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = {
            let (cancel, timed_out) = (cancel.clone(), timed_out.clone());
            std::thread::spawn(move || loop {
                match stop_rx.recv_timeout(Duration::from_millis(20)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if interrupt.is_cancelled() {
                    cancel.cancel();
                    return;
                }
                if Instant::now() >= deadline {
                    timed_out.store(true, Ordering::SeqCst);
                    cancel.cancel();
                    return;
                }
            })
        };
        Self {
            cancel,
            timed_out,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Ends the watch; true if the attempt was stopped by its timeout.
    fn stop(mut self) -> bool {
        drop(self.stop_tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.timed_out.load(Ordering::SeqCst)
    }
}

fn materialize_input(cache: &Cache, tree: &Hash, dir: &Path) -> Result<(), ExecError> {
    let mut t = cache.store().read_tree(tree)?;
    t.entries
        .retain(|e| !e.path.starts_with(&format!("{WORKSPACE_PREFIX}/")));
    cache.store().materialize(&t, "", dir, true)?;
    Ok(())
}

/// Moves the output folder and declared `outs` into the store; returns the tree hash.
fn store_result(
    node: &crate::plan::Node,
    workspace: &Path,
    cache: &Cache,
    out_dir: &Path,
) -> Result<Hash, String> {
    if out_dir.join(WORKSPACE_PREFIX).exists() {
        return Err(format!(
            "the stage wrote '{WORKSPACE_PREFIX}' into its output folder; that name is reserved"
        ));
    }
    let mut extra = Vec::new();
    for out in &node.outs {
        let path = workspace.join(out);
        if !path.exists() {
            return Err(format!("declared out '{out}' was not written by the stage"));
        }
        extra.push((format!("{WORKSPACE_PREFIX}/{out}"), path));
    }
    cache
        .store()
        .put_dir(out_dir, &extra)
        .map_err(|e| format!("storing the output failed: {e}"))
}

/// The last `lines` lines of a log.
pub fn tail(log: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
