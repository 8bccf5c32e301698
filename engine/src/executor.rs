//! Where stages run. The scheduler decides *what* runs; an [`Executor`] runs it: in
//! threads of this process ([`LocalExecutor`]) or as Slurm jobs (`slurm::SlurmExecutor`).
//! Either way the finished result is recorded before the scheduler hears of it.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache::Cache;
use ops::{CancelFlag, Op, Progress};

use crate::error::ExecError;
use crate::outcome::StageResult;
use crate::spec::Resources;
use crate::worker::{self, StageJob};

pub trait Executor {
    /// Total capacity, in the units of [`Executor::cost`].
    fn capacity(&self) -> usize;
    /// What a stage asking for `cpus` takes of the capacity.
    fn cost(&self, cpus: usize) -> usize;
    /// Starts a stage; its outcome arrives through [`Executor::wait`].
    fn start(
        &mut self,
        node: usize,
        job: StageJob,
        op: Arc<dyn Op>,
        resources: &Resources,
    ) -> Result<(), ExecError>;
    /// Waits up to `timeout` for stages to finish; returns those that did, with their
    /// results already recorded (a cancelled stage's is not).
    fn wait(&mut self, timeout: Duration) -> Vec<(usize, StageResult)>;
    /// Stops every running stage; their outcomes still arrive through `wait`.
    fn cancel_all(&mut self);
    /// Op-reported progress of running stages.
    fn progress(&self) -> HashMap<usize, String> {
        HashMap::new()
    }
    /// Notices for the display (adopted or resubmitted jobs).
    fn drain_messages(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// Runs each stage on a thread of this process, within a CPU budget.
pub struct LocalExecutor {
    cache: Arc<Cache>,
    jobs: usize,
    tx: mpsc::Sender<(usize, StageResult)>,
    rx: mpsc::Receiver<(usize, StageResult)>,
    cancels: HashMap<usize, CancelFlag>,
    threads: HashMap<usize, std::thread::JoinHandle<()>>,
    progress: Arc<Mutex<HashMap<usize, String>>>,
}

impl LocalExecutor {
    pub fn new(cache: Arc<Cache>, jobs: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            cache,
            jobs: jobs.max(1),
            tx,
            rx,
            cancels: HashMap::new(),
            threads: HashMap::new(),
            progress: Arc::default(),
        }
    }
}

impl Executor for LocalExecutor {
    fn capacity(&self) -> usize {
        self.jobs
    }

    fn cost(&self, cpus: usize) -> usize {
        cpus.clamp(1, self.jobs)
    }

    fn start(
        &mut self,
        node: usize,
        job: StageJob,
        op: Arc<dyn Op>,
        _resources: &Resources,
    ) -> Result<(), ExecError> {
        let cancel = CancelFlag::new();
        self.cancels.insert(node, cancel.clone());
        let cache = self.cache.clone();
        let tx = self.tx.clone();
        let texts = self.progress.clone();
        let handle = std::thread::spawn(move || {
            let _span = tracing::info_span!("stage", name = %job.stage, op = %job.op).entered();
            let progress = {
                let texts = texts.clone();
                Progress::new(move |m| {
                    texts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node, m.to_string());
                })
            };
            let result = worker::execute(&job, op.as_ref(), cache.store(), &cancel, &progress)
                .and_then(|result| worker::record(&cache, &job, &result).map(|()| result))
                .unwrap_or_else(|e| {
                    StageResult::failed_now(format!("engine error: {e}"), String::new(), None)
                });
            texts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
            let _ = tx.send((node, result));
        });
        self.threads.insert(node, handle);
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Vec<(usize, StageResult)> {
        let mut done = Vec::new();
        if let Ok(first) = self.rx.recv_timeout(timeout) {
            done.push(first);
            while let Ok(more) = self.rx.try_recv() {
                done.push(more);
            }
        }
        for (node, _) in &done {
            self.cancels.remove(node);
            // The thread has sent its last message; joining releases its handle on the cache
            // (and so the database connection) before the run returns.
            if let Some(t) = self.threads.remove(node) {
                let _ = t.join();
            }
        }
        done
    }

    fn cancel_all(&mut self) {
        for c in self.cancels.values() {
            c.cancel();
        }
    }

    fn progress(&self) -> HashMap<usize, String> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
