//! Running stages as Slurm jobs.
//!
//! Each stage becomes one `sbatch` job whose script runs `engine exec-stage` on a job file in
//! the cache folder; the worker writes objects into the shared store (same atomic renames) and
//! a result file. This driver alone writes the SQLite database: it polls `squeue` for all its
//! jobs in one call, records results, and submits newly ready stages. Job ids are recorded at
//! submission, so a restarted driver adopts jobs that are still queued or running and records
//! those that finished while it was away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::{unix_now, Cache};
use ops::Op;

use crate::error::ExecError;
use crate::executor::Executor;
use crate::outcome::StageResult;
use crate::spec::{Resources, SpecError};
use crate::worker::{self, StageJob};

const EXECUTOR: &str = "slurm";
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A job gone from the queue gets this long for its result file to become visible (shared
/// filesystems cache directory listings).
const RESULT_GRACE: Duration = Duration::from_secs(10);

/// Settings from the command line and the pipeline's `executor:` block.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub max_jobs: usize,
    /// The engine binary the jobs run (must exist at this path on the nodes).
    pub engine_bin: PathBuf,
}

struct SlurmJob {
    job_id: String,
    job: StageJob,
    resources: Resources,
    /// Slurm-level resubmissions left (time limit, preemption, node failure).
    retries_left: u32,
    gone_since: Option<Instant>,
    cancelled: bool,
}

impl SlurmJob {
    /// A job just submitted or adopted, with the stage's full retry budget.
    fn new(job_id: String, job: StageJob, resources: &Resources) -> Self {
        let retries_left = job.retries;
        Self {
            job_id,
            job,
            resources: resources.clone(),
            retries_left,
            gone_since: None,
            cancelled: false,
        }
    }
}

pub struct SlurmExecutor {
    cache: Arc<Cache>,
    options: SlurmOptions,
    dir: PathBuf,
    running: HashMap<usize, SlurmJob>,
    probed: bool,
    last_poll: Option<Instant>,
    messages: Vec<String>,
}

fn slurm_error(message: String) -> ExecError {
    ExecError::Spec(SpecError::new("executor", message))
}

impl SlurmExecutor {
    pub fn new(cache: Arc<Cache>, options: SlurmOptions) -> Result<Self, ExecError> {
        for tool in ["sbatch", "squeue", "scancel"] {
            let found = Command::new(tool)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !found {
                return Err(slurm_error(format!("`{tool}` is not available here"))
                    .with_fix("run the driver on a Slurm login node, or use --executor local"));
            }
        }
        let dir = cache.root().join("slurm");
        for sub in ["jobs", "results", "logs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| cache::CacheError::Io {
                path: d.clone(),
                source: e,
            })?;
        }
        Ok(Self {
            cache,
            options,
            dir,
            running: HashMap::new(),
            probed: false,
            last_poll: None,
            messages: Vec::new(),
        })
    }

    /// Writes a file from a job and waits for it: the cache must be on a filesystem the
    /// nodes share.
    fn probe(&mut self) -> Result<(), ExecError> {
        let marker = self.dir.join(format!(
            "probe-{}-{}",
            std::process::id(),
            unix_now() as u64
        ));
        let script = format!("#!/bin/sh\ntouch '{}'\n", marker.display());
        let script_path = self.dir.join("probe.sh");
        std::fs::write(&script_path, script).map_err(|e| cache::CacheError::Io {
            path: script_path.clone(),
            source: e,
        })?;
        let mut args = vec![
            "--parsable".to_string(),
            "--job-name=engine:probe".into(),
            format!("--output={}", self.dir.join("logs/probe.log").display()),
        ];
        args.extend(self.cluster_flags(&Resources::default()));
        let id = sbatch(&args, &script_path)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if marker.exists() {
                let _ = std::fs::remove_file(&marker);
                return Ok(());
            }
            let active = squeue(std::slice::from_ref(&id))?;
            if !active.contains_key(&id)
                && Instant::now() > deadline.min(Instant::now() + RESULT_GRACE)
            {
                // Gone from the queue: give the shared filesystem a moment, then give up.
                std::thread::sleep(RESULT_GRACE);
                if marker.exists() {
                    let _ = std::fs::remove_file(&marker);
                    return Ok(());
                }
                return Err(slurm_error(format!(
                    "a probe job could not write into the cache folder {}; it must be on a filesystem shared by the compute nodes",
                    self.cache.root().display()
                ))
                .with_fix("put the cache on the shared filesystem with --cache-dir (and the pipeline's folder too)"));
            }
            if Instant::now() > deadline {
                return Err(
                    slurm_error("the probe job did not run within 10 minutes".into())
                        .with_fix("check the partition with `sinfo`, or pass --slurm-partition"),
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn cluster_flags(&self, resources: &Resources) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(p) = resources
            .partition
            .as_ref()
            .or(self.options.partition.as_ref())
        {
            flags.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.options.account {
            flags.push(format!("--account={a}"));
        }
        flags
    }

    fn submit(&mut self, job: &StageJob, resources: &Resources) -> Result<String, ExecError> {
        let (job_file, script, result, log) = job_paths(&self.dir, &job.key);
        let _ = std::fs::remove_file(&result);
        let text = serde_json::to_vec_pretty(job)
            .map_err(|e| slurm_error(format!("cannot encode the job: {e}")))?;
        write_atomic(&job_file, &text)?;
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name=engine:{}", job.stage),
            format!("--output={}", log.display()),
            format!("--cpus-per-task={}", job.cpus.max(1)),
        ];
        if let Some(mem) = resources.mem_bytes {
            args.push(format!("--mem={}M", mem.div_ceil(1024 * 1024)));
        }
        if resources.gpus > 0 {
            args.push(format!("--gres=gpu:{}", resources.gpus));
        }
        if let Some(t) = &resources.time {
            args.push(format!("--time={t}"));
        }
        args.extend(self.cluster_flags(resources));
        args.extend(resources.sbatch.iter().cloned());
        let body = format!(
            "#!/bin/sh\n# engine stage {stage} (key {key})\nexec '{bin}' exec-stage '{job}' --cache-dir '{cache}' --result '{result}'\n",
            stage = job.stage,
            key = job.key,
            bin = self.options.engine_bin.display(),
            job = job_file.display(),
            cache = self.cache.root().display(),
            result = result.display(),
        );
        write_atomic(&script, body.as_bytes())?;
        let id = sbatch(&args, &script)?;
        self.cache
            .put_cluster_job(&job.key, EXECUTOR, &id, &job.stage)?;
        Ok(id)
    }

    fn finish(&mut self, node: usize) -> Option<StageResult> {
        let sj = self.running.remove(&node)?;
        let (job_file, script, result_file, log) = job_paths(&self.dir, &sj.job.key);
        let _ = self.cache.forget_cluster_job(&sj.job.key, EXECUTOR);
        if sj.cancelled {
            // Cancelled by this driver (Ctrl-C): record nothing, even a result the job managed
            // to write while being killed (its command may have carried on past the signal).
            for f in [job_file, script, result_file] {
                let _ = std::fs::remove_file(f);
            }
            return Some(StageResult::cancelled_now());
        }
        let read = std::fs::read(&result_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<StageResult>(&b).ok());
        let outcome = match read {
            Some(result) => {
                if let Err(e) = worker::record(&self.cache, &sj.job, &result) {
                    StageResult::failed_now(format!("engine error: {e}"), result.log_tail, None)
                } else {
                    result
                }
            }
            None if sj.cancelled => StageResult::cancelled_now(),
            None => {
                let log_bytes = std::fs::read(&log).unwrap_or_default();
                if sj.retries_left > 0 {
                    self.messages.push(format!(
                        "Slurm job {} of {} ended without a result (time limit, preemption or node failure); resubmitting ({} retries left)\n  --- last lines of its log ---\n  {}",
                        sj.job_id,
                        sj.job.stage,
                        sj.retries_left - 1,
                        worker::tail(&log_bytes, 10).replace('\n', "\n  ")
                    ));
                    match self.submit(&sj.job, &sj.resources) {
                        Ok(id) => {
                            self.running.insert(
                                node,
                                SlurmJob {
                                    job_id: id,
                                    retries_left: sj.retries_left - 1,
                                    gone_since: None,
                                    ..sj
                                },
                            );
                            return None;
                        }
                        Err(e) => {
                            return Some(StageResult::failed_now(
                                format!("resubmission failed: {e}"),
                                String::new(),
                                None,
                            ));
                        }
                    }
                }
                let message = format!(
                    "Slurm job {} ended without a result (time limit, preemption, node failure or a crash); see {}",
                    sj.job_id,
                    log.display()
                );
                let result = StageResult::failed_now(
                    message,
                    worker::tail(&log_bytes, 20),
                    self.cache.store().put_bytes(&log_bytes).ok(),
                );
                let _ = worker::record(&self.cache, &sj.job, &result);
                result
            }
        };
        for f in [job_file, script, result_file] {
            let _ = std::fs::remove_file(f);
        }
        Some(outcome)
    }
}

impl Executor for SlurmExecutor {
    fn capacity(&self) -> usize {
        self.options.max_jobs.max(1)
    }

    fn cost(&self, _cpus: usize) -> usize {
        1
    }

    fn start(
        &mut self,
        node: usize,
        job: StageJob,
        _op: Arc<dyn Op>,
        resources: &Resources,
    ) -> Result<(), ExecError> {
        // A job a previous driver submitted for this key: adopt it if it is still queued or
        // running, or if its result is already there.
        if let Some(id) = self.cache.cluster_job(&job.key, EXECUTOR)? {
            let (_, _, result, _) = job_paths(&self.dir, &job.key);
            let active = squeue(std::slice::from_ref(&id))?;
            if active.contains_key(&id) || result.exists() {
                self.messages.push(format!(
                    "adopted Slurm job {id} for {} (submitted by an earlier driver)",
                    job.stage
                ));
                self.running.insert(node, SlurmJob::new(id, job, resources));
                return Ok(());
            }
        }
        if !self.probed {
            self.probe()?;
            self.probed = true;
        }
        let id = self.submit(&job, resources)?;
        self.running.insert(node, SlurmJob::new(id, job, resources));
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Vec<(usize, StageResult)> {
        let due = self
            .last_poll
            .map_or(Duration::ZERO, |t| POLL_EVERY.saturating_sub(t.elapsed()));
        std::thread::sleep(due.min(timeout));
        if self.last_poll.is_some_and(|t| t.elapsed() < POLL_EVERY) || self.running.is_empty() {
            return Vec::new();
        }
        self.last_poll = Some(Instant::now());
        let ids: Vec<String> = self.running.values().map(|j| j.job_id.clone()).collect();
        let active = match squeue(&ids) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("squeue failed: {e}; retrying");
                return Vec::new();
            }
        };
        let mut done = Vec::new();
        let nodes: Vec<usize> = self.running.keys().copied().collect();
        let dir = self.dir.clone();
        for node in nodes {
            let Some(sj) = self.running.get_mut(&node) else {
                continue;
            };
            let (_, _, result, _) = job_paths(&dir, &sj.job.key);
            if active.contains_key(&sj.job_id) && !result.exists() {
                continue;
            }
            if !result.exists() && !sj.cancelled {
                let since = *sj.gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() < RESULT_GRACE {
                    continue;
                }
            }
            if let Some(result) = self.finish(node) {
                done.push((node, result));
            }
        }
        done
    }

    fn drain_messages(&mut self) -> Vec<String> {
        std::mem::take(&mut self.messages)
    }

    fn cancel_all(&mut self) {
        let ids: Vec<String> = self
            .running
            .values_mut()
            .map(|j| {
                j.cancelled = true;
                j.job_id.clone()
            })
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("scancel").args(&ids).status();
        }
    }
}

trait WithFix {
    fn with_fix(self, fix: &str) -> Self;
}

impl WithFix for ExecError {
    fn with_fix(self, fix: &str) -> Self {
        match self {
            ExecError::Spec(e) => ExecError::Spec(e.fix(fix)),
            other => other,
        }
    }
}

/// Job file, sbatch script, result file and Slurm log of the job for `key`.
fn job_paths(dir: &Path, key: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        dir.join("jobs").join(format!("{key}.json")),
        dir.join("jobs").join(format!("{key}.sh")),
        dir.join("results").join(format!("{key}.json")),
        dir.join("logs").join(format!("{key}.log")),
    )
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExecError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| cache::CacheError::Io {
        path: tmp.clone(),
        source: e,
    })?;
    std::fs::rename(&tmp, path).map_err(|e| cache::CacheError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(())
}

fn sbatch(args: &[String], script: &Path) -> Result<String, ExecError> {
    let out = Command::new("sbatch")
        .args(args)
        .arg(script)
        .output()
        .map_err(|e| slurm_error(format!("cannot run sbatch: {e}")))?;
    if !out.status.success() {
        return Err(slurm_error(format!(
            "sbatch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() {
        return Err(slurm_error(format!("sbatch printed no job id: {text}")));
    }
    Ok(id)
}

/// Job id -> state for those of `ids` still queued, running or completing (one call).
fn squeue(ids: &[String]) -> Result<HashMap<String, String>, ExecError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%i %T", "-j", &ids.join(",")])
        .output()
        .map_err(|e| slurm_error(format!("cannot run squeue: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut states = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(id), Some(state)) = (parts.next(), parts.next()) {
            let active = matches!(
                state,
                "PENDING"
                    | "RUNNING"
                    | "COMPLETING"
                    | "CONFIGURING"
                    | "SUSPENDED"
                    | "REQUEUED"
                    | "REQUEUE_HOLD"
                    | "REQUEUE_FED"
                    | "RESIZING"
                    | "SIGNALING"
                    | "STAGE_OUT"
            );
            if active {
                states.insert(id.to_string(), state.to_string());
            }
        }
    }
    Ok(states)
}
