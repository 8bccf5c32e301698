//! Running one stage wherever it runs: in a thread of `engine run`, or in a Slurm job through
//! `engine exec-stage`. A [`StageJob`] is self-contained (op, params, input trees, key), so a
//! worker needs only the object store, never the database; the driver records the result.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use cache::{unix_now, Cache, CacheError, Hash, NewRun, RunStatus, Store};
use ops::{CancelFlag, Input, Op, OpError, Progress, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::outcome::{Outcome, StageResult};

/// Tree paths under this prefix hold a stage's workspace `outs`.
pub const WORKSPACE_PREFIX: &str = "@workspace";

/// An upstream result by tree hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobInput {
    One(Hash),
    /// (label, tree) per instance, in plan order.
    Many(Vec<(String, Hash)>),
}

/// Everything needed to run one stage instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageJob {
    pub key: String,
    pub key_doc: Value,
    pub pipeline: String,
    /// Instance name (`square[p=2]`).
    pub stage: String,
    pub op: String,
    pub op_version: u32,
    pub params: Value,
    pub inputs: Vec<(String, JobInput)>,
    pub seed: u64,
    pub cpus: usize,
    pub retries: u32,
    pub timeout_s: Option<f64>,
    pub outs: Vec<String>,
    pub workspace: PathBuf,
}

/// This machine's name, for run records.
pub fn hostname() -> String {
    cache::hostname()
}

/// Runs every attempt of `job`: materialise inputs, run the op, move its output into the
/// store. Records nothing: see [`record`].
pub fn execute(
    job: &StageJob,
    op: &dyn Op,
    store: &Store,
    interrupt: &CancelFlag,
    progress: &Progress,
) -> Result<StageResult, CacheError> {
    let scratch = store.scratch()?;
    let (inputs, guard) = materialize_inputs(store, job, scratch.path())?;
    let started_at = unix_now();
    let timeout = job.timeout_s.map(Duration::from_secs_f64);
    let mut log = StageLog::create(scratch.path().join("log"))?;
    let mut last_error = String::new();
    let finish = |outcome: Outcome, log: StageLog| -> Result<StageResult, CacheError> {
        let (path, tail) = log.finish()?;
        Ok(StageResult {
            outcome,
            log_blob: Some(store.put_scratch_file(&path)?),
            log_tail: tail,
            started_at,
            ended_at: unix_now(),
            host: hostname(),
        })
    };
    for attempt in 0..=job.retries {
        if attempt > 0 && pause_before_retry(interrupt) {
            // A stop signal that killed the op's processes can reach this process's handler
            // thread a little after the op saw them die; it cancels the retry instead of
            // running the command again (a Slurm time limit signals every process at once).
            return finish(Outcome::Cancelled, log);
        }
        if attempt > 0 {
            let _ = writeln!(
                log,
                "\n--- engine: attempt {} of {} (previous: {last_error}) ---",
                attempt + 1,
                job.retries + 1
            );
        }
        let out_dir = scratch.path().join(format!("out{attempt}"));
        std::fs::create_dir_all(&out_dir).map_err(|e| CacheError::Io {
            path: out_dir.clone(),
            source: e,
        })?;
        if interrupt.is_cancelled() {
            return finish(Outcome::Cancelled, log);
        }
        let watchdog = Watchdog::start(interrupt.clone(), timeout);
        let mut ctx = RunContext {
            inputs: &inputs,
            out_dir: &out_dir,
            workspace: &job.workspace,
            seed: job.seed,
            cpus: job.cpus,
            cancel: &watchdog.cancel,
            progress,
            log: &mut log,
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            op.run(&job.params, &mut ctx)
        }));
        let timed_out = watchdog.stop();
        // Whatever the outcome: a stage that wrote into the store through its inputs' links
        // must not leave those bytes there, nor be retried on them.
        if let Err(message) = guard.check(store) {
            let _ = writeln!(log, "engine: {message}");
            return finish(Outcome::Failed { error: message }, log);
        }
        // A stage that failed because it was being stopped (its processes got the signal
        // first) was interrupted, not failed: no retry, no failure record.
        if interrupt.is_cancelled() && !timed_out {
            return finish(Outcome::Cancelled, log);
        }
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
            Ok(metrics) => match store_result(job, store, &out_dir) {
                Ok(tree) => {
                    return finish(Outcome::Ok { tree, metrics }, log);
                }
                Err(message) => last_error = message,
            },
            Err(OpError::Cancelled) if !timed_out => return finish(Outcome::Cancelled, log),
            Err(OpError::Cancelled) => {
                last_error = format!(
                    "timed out after {}",
                    humantime::format_duration(timeout.unwrap_or_default())
                );
            }
            Err(e) => last_error = e.to_string(),
        }
        let _ = writeln!(log, "engine: {last_error}");
    }
    finish(Outcome::Failed { error: last_error }, log)
}

/// Records a finished (not cancelled) stage in the database.
pub fn record(cache: &Cache, job: &StageJob, result: &StageResult) -> Result<(), CacheError> {
    let (status, tree, error) = match &result.outcome {
        Outcome::Ok { tree, .. } => (RunStatus::Ok, Some(*tree), None),
        Outcome::Failed { error } => (RunStatus::Failed, None, Some(error.clone())),
        Outcome::Cancelled => return Ok(()),
    };
    cache.record(&NewRun {
        key: job.key.clone(),
        pipeline: job.pipeline.clone(),
        stage: job.stage.clone(),
        op: job.op.clone(),
        op_version: job.op_version,
        key_doc: job.key_doc.clone(),
        output_tree: tree,
        status,
        error,
        started_at: result.started_at,
        ended_at: result.ended_at,
        host: result.host.clone(),
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        log_blob: result.log_blob,
        metrics: result.metrics(),
    })?;
    Ok(())
}

/// Links every input of `job` under `scratch/in/<name>` (a list input: one folder per
/// instance); returns the op's view of them and the guard watching the objects linked.
fn materialize_inputs(
    store: &Store,
    job: &StageJob,
    scratch: &Path,
) -> Result<(BTreeMap<String, Input>, InputGuard), CacheError> {
    let mut inputs: BTreeMap<String, Input> = BTreeMap::new();
    let mut input_blobs: Vec<(Hash, String)> = Vec::new();
    for (name, ji) in &job.inputs {
        let dir = scratch.join("in").join(name);
        let input = match ji {
            JobInput::One(tree) => {
                materialize_input(store, tree, &dir, &mut input_blobs, name)?;
                Input::One(dir)
            }
            JobInput::Many(items) => {
                let mut out = Vec::new();
                for (label, tree) in items {
                    let d = dir.join(label);
                    materialize_input(
                        store,
                        tree,
                        &d,
                        &mut input_blobs,
                        &format!("{name}/{label}"),
                    )?;
                    out.push((label.clone(), d));
                }
                std::fs::create_dir_all(&dir).map_err(|e| CacheError::Io {
                    path: dir.clone(),
                    source: e,
                })?;
                Input::Many { dir, items: out }
            }
        };
        inputs.insert(name.clone(), input);
    }
    Ok((inputs, InputGuard::watch(store, input_blobs)))
}

/// Links the files of an upstream tree under `dir`, noting each object and the input path
/// that shows it (for [`InputGuard`]).
fn materialize_input(
    store: &Store,
    tree: &Hash,
    dir: &Path,
    blobs: &mut Vec<(Hash, String)>,
    input: &str,
) -> Result<(), CacheError> {
    let mut t = store.read_tree(tree)?;
    t.entries
        .retain(|e| !e.path.starts_with(&format!("{WORKSPACE_PREFIX}/")));
    blobs.extend(
        t.entries
            .iter()
            .map(|e| (e.blob, format!("{input}/{}", e.path))),
    );
    store.materialize(&t, "", dir, true)
}

/// The stat of an object as a stage's input link shows it. `ctime` is in it because a stage
/// (running as the cache's owner) can reset `mtime` after writing, but not `ctime`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObjectStat {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    mode: u32,
}

impl ObjectStat {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode() & 0o7777,
        })
    }
}

/// Inputs are hard links to store objects, read-only by mode only: a stage running as the
/// cache's owner can `chmod u+w` one and write into the store. The guard remembers every
/// input object's stat before the stage and, after each attempt, re-hashes the objects whose
/// stat changed: a changed object is removed from the store (so whatever recorded it is
/// found damaged and recomputed) and the stage fails; a mode change alone is undone.
struct InputGuard {
    objects: Vec<(Hash, String, Option<ObjectStat>)>,
}

impl InputGuard {
    fn watch(store: &Store, mut blobs: Vec<(Hash, String)>) -> Self {
        blobs.sort_by_key(|b| b.0);
        blobs.dedup_by(|a, b| a.0 == b.0);
        let objects = blobs
            .into_iter()
            .map(|(hash, shown_as)| {
                let stat = ObjectStat::of(&store.object_path(&hash));
                (hash, shown_as, stat)
            })
            .collect();
        Self { objects }
    }

    fn check(&self, store: &Store) -> Result<(), String> {
        let mut changed = Vec::new();
        for (hash, shown_as, before) in &self.objects {
            let path = store.object_path(hash);
            let now = ObjectStat::of(&path);
            if now == *before {
                continue;
            }
            match store.verify_object(hash) {
                Ok(()) => {
                    if let (Some(before), Some(now)) = (before, &now) {
                        // Never wider than either: the store may have narrowed a shared
                        // object to owner-only meanwhile (a private file with these bytes).
                        let mode = before.mode & now.mode;
                        if mode != now.mode {
                            use std::os::unix::fs::PermissionsExt;
                            let _ = std::fs::set_permissions(
                                &path,
                                std::fs::Permissions::from_mode(mode),
                            );
                        }
                    }
                }
                Err(CacheError::MissingObject(_)) if before.is_none() => {}
                Err(_) => {
                    let _ = store.remove_object(hash);
                    changed.push(shown_as.clone());
                }
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the stage changed its input {} (inputs are read-only links into the cache's \
             store: copy a file before changing it); the changed object was removed from the \
             store, so the stage that made it will run again",
            changed.join(", ")
        ))
    }
}

/// A stage's log: written to a file in its scratch folder as it comes (a command may print
/// gigabytes), with only the last [`LOG_TAIL_BYTES`] kept in memory, for messages.
struct StageLog {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    tail: Vec<u8>,
}

const LOG_TAIL_BYTES: usize = 64 * 1024;

impl StageLog {
    fn create(path: PathBuf) -> Result<Self, CacheError> {
        let file = std::fs::File::create(&path).map_err(|e| CacheError::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
            path,
            tail: Vec::new(),
        })
    }

    /// The log file, complete, and its last lines.
    fn finish(mut self) -> Result<(PathBuf, String), CacheError> {
        self.file.flush().map_err(|e| CacheError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        let tail = tail(&self.tail, 20);
        Ok((self.path, tail))
    }
}

impl Write for StageLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.tail.extend_from_slice(&buf[..n]);
        if self.tail.len() > 2 * LOG_TAIL_BYTES {
            self.tail.drain(..self.tail.len() - LOG_TAIL_BYTES);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Moves the output folder and declared `outs` into the store; returns the tree hash.
fn store_result(job: &StageJob, store: &Store, out_dir: &Path) -> Result<Hash, String> {
    if out_dir.join(WORKSPACE_PREFIX).exists() {
        return Err(format!(
            "the stage wrote '{WORKSPACE_PREFIX}' into its output folder; that name is reserved"
        ));
    }
    let mut extra = Vec::new();
    for out in &job.outs {
        let path = job.workspace.join(out);
        if !path.exists() {
            return Err(format!("declared out '{out}' was not written by the stage"));
        }
        extra.push((format!("{WORKSPACE_PREFIX}/{out}"), path));
    }
    store
        .put_dir(out_dir, &extra)
        .map_err(|e| format!("storing the output failed: {e}"))
}

/// The last `lines` lines of a log.
pub fn tail(log: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How long a failed attempt waits before the next one.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Waits [`RETRY_PAUSE`] before a retry; true when the stage is cancelled meanwhile.
fn pause_before_retry(interrupt: &CancelFlag) -> bool {
    let until = Instant::now() + RETRY_PAUSE;
    while Instant::now() < until {
        if interrupt.is_cancelled() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    interrupt.is_cancelled()
}

/// Cancels one attempt of a stage on Ctrl-C or when its timeout passes. Without a timeout the
/// interrupt flag is used directly and no thread is started.
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
