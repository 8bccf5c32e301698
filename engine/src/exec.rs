//! Running a [`Plan`]: cache lookups, parallel execution of stale stages, atomic recording.
//!
//! The scheduler thread owns all state. A stage becomes *ready* when every upstream stage has
//! a result; it is then keyed (its inputs' output trees are known), looked up, and either
//! reused or handed to a worker thread, within the `-j` CPU budget. Workers run the op in a
//! scratch folder, move its output into the store and record the run in one transaction, so a
//! kill at any point leaves no partial record.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache::{Cache, ClaimOwner, ClaimState, Hash, Tree};
use ops::Metrics;
use serde_json::Value;

use crate::executor::{Executor, LocalExecutor, WorkerOutcome};
use crate::keys::{closest_run, explain, node_doc, node_key, DepHashes};
use crate::plan::{InputSources, Plan};
use crate::progress::Display;
use crate::spec::SpecError;
pub use crate::worker::WORKSPACE_PREFIX;
use crate::worker::{unix_now, JobInput, StageJob};

/// A claim whose owner has not refreshed it for this long is taken over.
pub const CLAIM_STALE_S: f64 = 30.0;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const CLAIM_POLL: Duration = Duration::from_millis(200);

/// How many recent runs of a stage are compared to find the closest one when explaining.
pub const RECENT_RUNS: usize = 20;

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

impl StageReport {
    /// A stage whose result was reused.
    fn cached(node: usize, key: String, (tree, metrics): (Hash, Metrics)) -> Self {
        Self {
            node,
            status: StageStatus::Cached,
            key: Some(key),
            duration_s: 0.0,
            metrics,
            tree: Some(tree),
            message: None,
            reasons: Vec::new(),
        }
    }
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done,
    Failed,
    Skipped,
}

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
    let started = Instant::now();
    // Held for the whole run so `gc`/`verify` never delete what this run is using.
    let _lock = cache.lock_shared()?;
    let owner = ClaimOwner::this_process(unix_now());
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
    // Keys whose recorded result turned out damaged: recomputed, never reported as done.
    let mut damaged: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Node -> the capacity it holds.
    let mut running: HashMap<usize, usize> = HashMap::new();
    let mut free = executor.capacity().max(1);
    let mut stop_new = false;
    let mut interrupted = false;
    display.begin(plan);

    loop {
        if interrupt.load(Ordering::SeqCst) && !interrupted {
            interrupted = true;
            stop_new = true;
            executor.cancel_all();
            display.message(
                "interrupted: stopping running stages (press Ctrl-C again to exit at once)",
            );
        }
        // Key and look up every ready stage; cache hits free their dependents at once. The
        // lookups share one read transaction (ended by the first write, e.g. a claim). What is
        // ready now is keyed, looked up and checked as one batch (keys and object stats on all
        // cores), then handled in plan order; the stages its hits release form the next batch.
        let reads = cache.read_batch();
        while !stop_new && !ready.is_empty() {
            let batch: Vec<usize> =
                std::iter::from_fn(|| ready.pop().map(|Reverse(i)| i)).collect();
            let prepared = prepare(plan, cache, &batch, &trees, &mut deps, options)?;
            for (pos, (i, prepared)) in batch.iter().copied().zip(prepared).enumerate() {
                if stop_new {
                    ready.extend(batch[pos..].iter().map(|&j| Reverse(j)));
                    break;
                }
                let node = &plan.nodes[i];
                let node_deps = match prepared.deps {
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
                let Some(key) = prepared.key else { continue };
                let forced = options.force.contains(&i);
                if let Some(tree) =
                    reuse_found(plan, cache, i, &key, prepared.found, &mut damaged, display)?
                {
                    trees[i] = Some(tree.0);
                    state[i] = State::Done;
                    let report = StageReport::cached(i, key, tree);
                    display.finished(plan, &report);
                    reports[i] = Some(report);
                    release(i, &downstream, &mut waiting_on, &mut ready);
                    continue;
                }
                // Not reused: the key document is recorded with the run and explains it.
                let Some(doc) = node_doc(plan, i, &trees, &node_deps) else {
                    continue;
                };
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
                let check_done = node.cache && !forced && !damaged.contains(&key);
                match cache.try_claim(&key, &owner, CLAIM_STALE_S, check_done)? {
                    ClaimState::Acquired => {
                        heartbeat.hold(&key);
                        in_flight.insert(key.clone(), Vec::new());
                        queued_keys.insert(i, (doc, key, reasons));
                        queued.push(Reverse(i));
                    }
                    ClaimState::AlreadyDone => {
                        queued_keys.insert(i, (doc, key, reasons));
                        claim_waits.push((i, Instant::now()));
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
        }
        drop(reads);
        // Start queued stages while CPUs are free, in plan order.
        while let (false, Some(&Reverse(i))) = (stop_new, queued.peek()) {
            let cpus = plan.nodes[i].resources.cpus.clamp(1, options.jobs.max(1));
            let need = executor.cost(cpus);
            if need > free {
                break;
            }
            queued.pop();
            let (doc, key, reasons) = queued_keys.remove(&i).unwrap_or_default();
            free -= need;
            running.insert(i, need);
            state[i] = State::Running;
            display.started(plan, i, &reasons);
            let job = stage_job(plan, i, key.clone(), doc, cpus, &trees);
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
            if let Err(e) =
                executor.start(i, job, plan.nodes[i].op.clone(), &plan.nodes[i].resources)
            {
                running.remove(&i);
                free += need;
                let key = reports[i].as_ref().and_then(|r| r.key.clone());
                fail(
                    plan,
                    i,
                    format!("could not start: {e}"),
                    String::new(),
                    0.0,
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
            let may_reuse = plan.nodes[i].cache && !options.force.contains(&i);
            let reused = if may_reuse {
                reuse(plan, cache, i, &key, &mut damaged, display)?
            } else {
                None
            };
            if let Some(tree) = reused {
                queued_keys.remove(&i);
                trees[i] = Some(tree.0);
                state[i] = State::Done;
                let report = StageReport::cached(i, key, tree);
                display.finished(plan, &report);
                reports[i] = Some(report);
                release(i, &downstream, &mut waiting_on, &mut ready);
                continue;
            }
            let check_done = may_reuse && !damaged.contains(&key);
            match cache.try_claim(&key, &owner, CLAIM_STALE_S, check_done)? {
                ClaimState::Acquired => {
                    heartbeat.hold(&key);
                    in_flight.insert(key, Vec::new());
                    queued.push(Reverse(i));
                }
                ClaimState::AlreadyDone => still_waiting.push((i, now)),
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
        for (i, outcome) in executor.wait(Duration::from_millis(100)) {
            {
                let held = running.remove(&i);
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
                free += held.unwrap_or(1);
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
        }
        for m in executor.drain_messages() {
            display.message(&m);
        }
        display.tick(plan, &executor.progress());
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
    drop(heartbeat);
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
/// What the in-order pass of the scheduler needs of a ready stage.
struct Prepared {
    /// The hashes of the stage's deps, or why they could not be hashed.
    deps: Result<BTreeMap<String, Hash>, String>,
    /// The key (`None` while an upstream result is unknown, or without deps).
    key: Option<String>,
    /// The recorded result for the key, if the stage may reuse one and one exists.
    found: Option<Found>,
}

/// A recorded result and the outcome of checking its objects.
struct Found {
    tree: Hash,
    metrics: Metrics,
    check: Result<(), Vec<Hash>>,
}

/// From this many stages a batch is keyed on all cores (below, waking the pool costs more).
const PARALLEL_KEYS: usize = 32;

/// Keys `batch` (ready stages, in plan order), then looks up and checks the recorded results
/// of those that may reuse one, all in one pass.
fn prepare(
    plan: &Plan,
    cache: &Cache,
    batch: &[usize],
    trees: &[Option<Hash>],
    deps: &mut DepHashes,
    options: &RunOptions,
) -> Result<Vec<Prepared>, ExecError> {
    use rayon::prelude::*;
    let node_deps: Vec<Result<BTreeMap<String, Hash>, String>> = batch
        .iter()
        .map(|&i| deps.for_node(plan, cache, i))
        .collect();
    let key_of = |(&i, d): (&usize, &Result<BTreeMap<String, Hash>, String>)| {
        d.as_ref().ok().and_then(|d| node_key(plan, i, trees, d))
    };
    let keys: Vec<Option<String>> = if batch.len() >= PARALLEL_KEYS {
        batch.par_iter().zip(&node_deps).map(key_of).collect()
    } else {
        batch.iter().zip(&node_deps).map(key_of).collect()
    };
    let wanted: Vec<Option<&str>> = batch
        .iter()
        .zip(&keys)
        .map(|(&i, key)| {
            let may_reuse = plan.nodes[i].cache && !options.force.contains(&i);
            key.as_deref().filter(|_| may_reuse)
        })
        .collect();
    let mut found = find(cache, &wanted)?.into_iter();
    Ok(node_deps
        .into_iter()
        .zip(keys)
        .map(|(deps, key)| Prepared {
            deps,
            key,
            found: found.next().flatten(),
        })
        .collect())
}

/// The recorded results of `keys` (`None` entries are skipped), their objects checked in one
/// pass.
fn find(cache: &Cache, keys: &[Option<&str>]) -> Result<Vec<Option<Found>>, ExecError> {
    let mut hits = Vec::with_capacity(keys.len());
    for key in keys {
        hits.push(match key {
            Some(key) => cache.lookup_hit(key)?,
            None => None,
        });
    }
    let trees: Vec<(Hash, Option<&[Hash]>)> = hits
        .iter()
        .flatten()
        .filter_map(|hit| Some((hit.output_tree?, hit.blobs.as_deref())))
        .collect();
    let mut checks = cache.check_hits(&trees).into_iter();
    Ok(hits
        .into_iter()
        .map(|hit| {
            let hit = hit?;
            let tree = hit.output_tree?;
            Some(Found {
                tree,
                metrics: hit.metrics,
                check: checks.next()?,
            })
        })
        .collect())
}

/// The recorded result of node `i`'s key, if it exists and is intact (outs restored).
fn reuse(
    plan: &Plan,
    cache: &Cache,
    i: usize,
    key: &str,
    damaged: &mut std::collections::HashSet<String>,
    display: &mut dyn Display,
) -> Result<Option<(Hash, Metrics)>, ExecError> {
    let found = find(cache, &[Some(key)])?.pop().flatten();
    reuse_found(plan, cache, i, key, found, damaged, display)
}

/// Reuses `found` for node `i` if its objects are intact, restoring the node's workspace
/// `outs`; a damaged result is noted in `damaged` (a warning the first time) and not reused.
fn reuse_found(
    plan: &Plan,
    cache: &Cache,
    i: usize,
    key: &str,
    found: Option<Found>,
    damaged: &mut std::collections::HashSet<String>,
    display: &mut dyn Display,
) -> Result<Option<(Hash, Metrics)>, ExecError> {
    let Some(found) = found else {
        return Ok(None);
    };
    let node = &plan.nodes[i];
    if let Err(bad) = found.check {
        if damaged.is_empty() {
            display.message(&format!(
                "warning: the cached result of '{}' is damaged (object {} missing or corrupt); recomputing it (`engine verify` checks the whole cache)",
                node.name,
                bad.first().map(|h| h.short()).unwrap_or_default()
            ));
        }
        damaged.insert(key.to_string());
        return Ok(None);
    }
    if !node.outs.is_empty() {
        let tree = cache.store().read_tree(&found.tree)?;
        restore_outs(plan, cache, &tree)?;
    }
    Ok(Some((found.tree, found.metrics)))
}

/// Puts a cached stage's workspace `outs` back where the pipeline expects them, copying only
/// files whose content differs.
fn restore_outs(plan: &Plan, cache: &Cache, tree: &Tree) -> Result<(), ExecError> {
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
    for (entry, path) in wanted {
        if hashes.get(&path) == Some(&entry.blob) {
            continue;
        }
        let single = Tree {
            entries: vec![entry.clone()],
        };
        // Never through a symlinked folder of the workspace: the files would land in its target.
        cache
            .store()
            .materialize_in(&single, &entry.path, ws, &path)?;
    }
    Ok(())
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
                            (
                                crate::plan::list_item_folder(&plan.nodes[u].label, k),
                                trees[u].unwrap_or_else(|| cache::hash_bytes(b"")),
                            )
                        })
                        .collect(),
                ),
            };
            (input.name.clone(), ji)
        })
        .collect()
}

/// Refreshes this process's claims every few seconds, so other processes can tell a live
/// owner from a dead one.
/// Stopped when dropped, so an early return cannot leave its thread (and its handle on the
/// cache) running.
struct Heartbeat {
    held: Arc<Mutex<std::collections::HashSet<String>>>,
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
            stop_tx: Some(stop_tx),
            thread: Some(thread),
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
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop_tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
