//! File watching for `engine watch`: the pipeline file and every `deps` path, debounced.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::plan::Plan;

/// Watches a set of paths. Files are watched through their parent folder (editors replace
/// files by renaming, which a watch on the file itself would lose); folders recursively.
pub struct PathWatcher {
    watcher: RecommendedWatcher,
    rx: mpsc::Receiver<notify::Result<notify::Event>>,
    watched_dirs: BTreeSet<(PathBuf, bool)>,
    /// The paths whose changes matter (absolute).
    targets: Vec<PathBuf>,
}

impl PathWatcher {
    pub fn new() -> notify::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let watcher = notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        })?;
        Ok(Self {
            watcher,
            rx,
            watched_dirs: BTreeSet::new(),
            targets: Vec::new(),
        })
    }

    /// Watches exactly `targets` from now on (adding and dropping OS watches as needed).
    pub fn set_targets(&mut self, targets: Vec<PathBuf>) -> notify::Result<()> {
        let mut wanted: BTreeSet<(PathBuf, bool)> = BTreeSet::new();
        for t in &targets {
            if t.is_dir() {
                wanted.insert((t.clone(), true));
            } else if let Some(parent) = t.parent() {
                // Watch the nearest existing ancestor, so a file that appears later is seen.
                let mut dir = parent.to_path_buf();
                while !dir.is_dir() {
                    match dir.parent() {
                        Some(p) => dir = p.to_path_buf(),
                        None => break,
                    }
                }
                wanted.insert((dir, false));
            }
        }
        for (dir, _) in self.watched_dirs.difference(&wanted) {
            let _ = self.watcher.unwatch(dir);
        }
        for (dir, recursive) in wanted.difference(&self.watched_dirs) {
            let mode = if *recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            self.watcher.watch(dir, mode)?;
        }
        self.watched_dirs = wanted;
        self.targets = targets;
        Ok(())
    }

    fn relevant(&self, path: &Path) -> bool {
        self.targets
            .iter()
            .any(|t| path == t || path.starts_with(t))
    }

    /// Drops every event received so far (the run's own writes).
    pub fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Blocks until a relevant change, then until `quiet` passes without another; returns
    /// the changed paths. Returns `None` when `stop()` says so (checked every 100 ms).
    pub fn next_change(&self, quiet: Duration, stop: &dyn Fn() -> bool) -> Option<Vec<PathBuf>> {
        let mut changed: BTreeSet<PathBuf> = BTreeSet::new();
        let mut last = None::<Instant>;
        loop {
            if stop() {
                return None;
            }
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(event)) => {
                    if matches!(event.kind, notify::EventKind::Access(_)) {
                        continue;
                    }
                    for p in event.paths {
                        if self.relevant(&p) {
                            changed.insert(p);
                            last = Some(Instant::now());
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!("file watch error: {e}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
            if last.is_some_and(|t| t.elapsed() >= quiet) {
                return Some(changed.into_iter().collect());
            }
        }
    }
}

/// The pipeline file and every dep path of `plan`, absolute.
pub fn watch_targets(pipeline_file: &Path, plan: Option<&Plan>) -> Vec<PathBuf> {
    let file = pipeline_file
        .canonicalize()
        .unwrap_or_else(|_| pipeline_file.to_path_buf());
    let mut targets = vec![file];
    if let Some(plan) = plan {
        let mut deps: BTreeSet<PathBuf> = BTreeSet::new();
        for n in &plan.nodes {
            for d in &n.deps {
                deps.insert(plan.pipeline.workspace.join(d));
            }
        }
        targets.extend(deps);
    }
    targets
}
