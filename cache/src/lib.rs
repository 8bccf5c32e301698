//! The result cache of `engine`: a content-addressed object store plus a SQLite index.
//!
//! Objects (`objects/ab/cdef…`) are immutable blobs named by their blake3 hash; a stage's output
//! is a [`Tree`] manifest (path -> blob) that is itself a blob. `cache.db` records every run
//! (its key, what went into the key, the output tree, metrics, timings, host, log) and a stat
//! cache so unchanged workspace files are not re-read. This crate knows nothing of pipelines or
//! ops: callers hand it keys, folders and records.
//!
//! Crash consistency: objects are written to `tmp/` and renamed into place, and a run record is
//! one transaction written only after all of its objects exist, so a kill at any instant leaves
//! either no record or a complete one. `tmp/` leftovers of dead processes are removed on open.

mod db;
mod experiments;
mod hash;
mod machine;
mod maintenance;
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub use db::{unix_now, ClaimOwner, ClaimState, Hit, NewRun, RunRecord, RunStatus, SCHEMA_VERSION};
pub use experiments::{Experiment, ExperimentStage, ExperimentTable, NewExperiment};
pub use hash::{hash_bytes, hash_file, Hash, HashParseError};
pub use machine::{hostname, pid_space_id};
pub use maintenance::{GcReport, Keep, VerifyReport};
pub use store::{Scratch, Store, Tree, TreeEntry};

/// Everything that can go wrong in the cache, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cache database {path}: {source}{}", damaged_db_hint(.source))]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cache database {path} has schema version {found}, newer than this engine's {supported}; upgrade engine or use another --cache-dir")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("object {0} is missing from the store")]
    MissingObject(Hash),
    #[error("object {hash} is corrupt (its content hashes to {actual})")]
    CorruptObject { hash: Hash, actual: Hash },
    #[error("tree manifest {hash} is not valid: {message}")]
    BadTree { hash: Hash, message: String },
    #[error("{path} is not inside the folder it must stay in")]
    PathEscape { path: PathBuf },
    #[error("{path}: symbolic link to nothing (its target does not exist); a result cannot store a dangling link")]
    DanglingLink { path: PathBuf },
    #[error("{path}: symbolic link loop (following it leads back to a folder it is inside)")]
    LinkLoop { path: PathBuf },
    #[error("{path}: the file name is not valid UTF-8; the cache stores names as UTF-8 text, so rename the file")]
    NotUtf8Name { path: PathBuf },
    #[error("{path} is a {kind}, not a regular file or folder; only regular files and folders can be hashed or stored")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is a symbolic link; refusing to restore files through it (they would land in its target): replace it with a real folder")]
    SymlinkInPath { path: PathBuf },
}

/// The advice appended to a database error that means the file itself is damaged.
fn damaged_db_hint(source: &rusqlite::Error) -> &'static str {
    if db_error_is_damage(source) {
        " (the database file is damaged; `engine verify --repair` moves it aside and starts an \
         empty index, keeping the stored objects)"
    } else {
        ""
    }
}

fn db_error_is_damage(source: &rusqlite::Error) -> bool {
    matches!(
        source.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

impl CacheError {
    /// Whether this is SQLite saying that `cache.db` is damaged (truncated, overwritten),
    /// which [`Cache::recover_damaged_db`] repairs.
    pub fn is_damaged_db(&self) -> bool {
        matches!(self, CacheError::Db { source, .. } if db_error_is_damage(source))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CacheError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

impl Drop for Cache {
    fn drop(&mut self) {
        self.flush_stat_cache();
    }
}

/// An advisory `flock` on `<cache>/lock`, released when dropped (or when the process dies).
pub struct CacheLock {
    _file: std::fs::File,
}

impl CacheLock {
    fn acquire(path: &Path, exclusive: bool) -> Result<Self> {
        let waiting =
            exclusive.then_some("waiting for running engine processes on this cache to finish…");
        Self::acquire_saying(path, exclusive, waiting)
    }

    /// [`CacheLock::acquire`], printing `waiting` (if any) when it has to wait.
    fn acquire_saying(path: &Path, exclusive: bool, waiting: Option<&str>) -> Result<Self> {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| CacheError::io(path, e))?;
        let mode = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let quick = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if quick != 0 {
            if let Some(waiting) = waiting {
                eprintln!("{waiting}");
            }
            // SAFETY: as above, blocking this time.
            let r = unsafe { libc::flock(file.as_raw_fd(), mode) };
            if r != 0 {
                return Err(CacheError::io(path, std::io::Error::last_os_error()));
            }
        }
        Ok(Self { _file: file })
    }
}

/// The cache folder (`.engine/` by default): store + database, safe to share between threads.
pub struct Cache {
    root: PathBuf,
    store: Store,
    db: Mutex<db::Db>,
    /// Stat-cache entries not yet written: one transaction per batch, not per lookup (a
    /// no-op run of 10,000 stages otherwise spent most of its time committing them).
    pending_stats: Mutex<PendingStats>,
    /// A [`ReadBatch`] is alive: lookups share one read transaction until the next write.
    batching: AtomicBool,
}

/// While alive, the cache's lookups (records, stat cache) run in one read transaction; any
/// write ends it first, and the next lookup opens a new one. See [`Cache::read_batch`].
pub struct ReadBatch<'a> {
    cache: &'a Cache,
}

impl Drop for ReadBatch<'_> {
    fn drop(&mut self) {
        self.cache.batching.store(false, Ordering::SeqCst);
        drop(self.cache.db());
    }
}

/// Pending stat-cache entries are written once this many have accumulated, and on drop.
const STAT_BATCH: usize = 4096;

/// Stat-cache entries waiting to be written: workspace files by path, store objects by hash.
#[derive(Default)]
struct PendingStats {
    files: Vec<hash::StatEntry>,
    objects: Vec<(Hash, hash::StatKey)>,
}

impl PendingStats {
    fn len(&self) -> usize {
        self.files.len() + self.objects.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`, migrating its schema and clearing
    /// scratch folders left by processes that no longer exist.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.exists() {
            // A new cache holds copies of outputs that may be private: only its owner may
            // enter it. An existing folder keeps the mode its owner gave it (a shared cache).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| CacheError::io(root, e))?;
        }
        let root = root.canonicalize().map_err(|e| CacheError::io(root, e))?;
        let store = Store::open(&root)?;
        // Fail early, with the OS's own words, on a cache we cannot write (read-only mount,
        // permissions, full disk) rather than deep inside SQLite.
        let probe = store.probe_path();
        std::fs::write(&probe, b"").map_err(|e| CacheError::io(&probe, e))?;
        let _ = std::fs::remove_file(&probe);
        store.clean_stale_scratch(false)?;
        let db = {
            // Opening switches the database to WAL and migrates its schema, steps SQLite may
            // refuse with "database is locked" (not wait) while another process does the
            // same: processes open the cache one at a time (briefly; runs do not hold this).
            let _opening = CacheLock::acquire_saying(&root.join("open.lock"), true, None)?;
            db::Db::open(&root.join("cache.db"))?
        };
        Ok(Self {
            root,
            store,
            db: Mutex::new(db),
            pending_stats: Mutex::new(PendingStats::default()),
            batching: AtomicBool::new(false),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The database for anything but a batched lookup: ends a batch's read transaction first.
    fn db(&self) -> std::sync::MutexGuard<'_, db::Db> {
        let mut db = self.db_locked();
        db.end_read();
        db
    }

    /// The database for a lookup: inside a [`ReadBatch`], in its read transaction.
    fn db_read(&self) -> std::sync::MutexGuard<'_, db::Db> {
        let mut db = self.db_locked();
        if self.batching.load(Ordering::SeqCst) {
            db.begin_read();
        }
        db
    }

    fn db_locked(&self) -> std::sync::MutexGuard<'_, db::Db> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the following lookups in one read transaction (a no-op run checks thousands of
    /// records; taking SQLite's read lock per statement was a fifth of its time). The snapshot
    /// may miss a record another process writes meanwhile, which costs only a claim round
    /// trip: claims re-check "already done" atomically.
    pub fn read_batch(&self) -> ReadBatch<'_> {
        self.batching.store(true, Ordering::SeqCst);
        ReadBatch { cache: self }
    }

    /// Content hashes of workspace files or folders (a folder hashes its sorted relative paths
    /// and file hashes). Unchanged files (same device, inode, size, mtime) are not re-read.
    pub fn hash_paths(&self, paths: &[PathBuf]) -> Vec<Result<Hash>> {
        let expanded = hash::expand(paths);
        let known = self.db_read().stat_entries(&expanded.files);
        let (results, fresh) = hash::hash_expanded(expanded, &known);
        self.remember(fresh, Vec::new());
        results
    }

    /// Writes pending stat-cache entries now (also done on drop).
    pub fn flush_stat_cache(&self) {
        let batch =
            std::mem::take(&mut *self.pending_stats.lock().unwrap_or_else(|p| p.into_inner()));
        if !batch.is_empty() {
            self.write_stats(&batch);
        }
    }

    fn write_stats(&self, batch: &PendingStats) {
        if let Err(e) = self.db().put_stats(&batch.files, &batch.objects) {
            tracing::warn!("could not update the stat cache: {e}");
        }
    }

    /// The successful run recorded under `key`, if any.
    pub fn lookup(&self, key: &str) -> Result<Option<RunRecord>> {
        self.db_read().lookup(key)
    }

    /// The output tree and metrics of the successful run recorded under `key`, if any: what
    /// reusing it needs, without the rest of the record.
    pub fn lookup_hit(&self, key: &str) -> Result<Option<Hit>> {
        self.db_read().lookup_hit(key)
    }

    /// The most recent successful run of `stage` in `pipeline` (for "why did this rerun").
    pub fn latest_run(&self, pipeline: &str, stage: &str) -> Result<Option<RunRecord>> {
        self.db().latest_run(pipeline, stage, Some(RunStatus::Ok))
    }

    /// The `limit` most recent successful runs of `stage` in `pipeline`, newest first.
    pub fn recent_runs(&self, pipeline: &str, stage: &str, limit: usize) -> Result<Vec<RunRecord>> {
        self.db().recent_runs(pipeline, stage, limit)
    }

    /// The most recent run of `stage` in `pipeline`, whatever its status (for `logs`).
    pub fn latest_attempt(&self, pipeline: &str, stage: &str) -> Result<Option<RunRecord>> {
        self.db().latest_run(pipeline, stage, None)
    }

    /// Records a finished run in one transaction. For a successful run every object it
    /// references must already be in the store. Returns the run id; if another process already
    /// recorded the same key, that record wins and its id is returned.
    pub fn record(&self, run: &NewRun) -> Result<i64> {
        let blobs = match &run.output_tree {
            Some(tree) if !self.store.contains(tree) => {
                return Err(CacheError::MissingObject(*tree))
            }
            Some(tree) => self
                .store
                .read_tree(tree)
                .ok()
                .map(|t| t.entries.iter().map(|e| e.blob).collect::<Vec<_>>()),
            None => None,
        };
        let id = self.db().record(run, blobs.as_deref())?;
        if let (Some(tree), Some(blobs)) = (&run.output_tree, &blobs) {
            self.remember_new_objects(tree, blobs, run.started_at);
        }
        Ok(id)
    }

    /// Puts the stat of a run's objects into the stat cache when this run wrote them (modified
    /// after it started): the store hashed their content as it wrote them, so the first reuse
    /// need not read them again. Objects that existed before (deduplicated) are left to the
    /// normal check, which re-hashes them once.
    fn remember_new_objects(&self, tree: &Hash, blobs: &[Hash], started_at: f64) {
        let since_ns = (started_at * 1e9) as i64;
        let fresh: Vec<(Hash, hash::StatKey)> = std::iter::once(tree)
            .chain(blobs)
            .filter_map(|h| {
                let stat = self.store.object_stat(h).ok()?;
                (stat.mtime_ns >= since_ns).then_some((*h, stat))
            })
            .collect();
        self.remember(Vec::new(), fresh);
    }

    /// Queues stat-cache entries, writing them once a batch has accumulated.
    fn remember(&self, files: Vec<hash::StatEntry>, objects: Vec<(Hash, hash::StatKey)>) {
        if files.is_empty() && objects.is_empty() {
            return;
        }
        let mut pending = self.pending_stats.lock().unwrap_or_else(|p| p.into_inner());
        pending.files.extend(files);
        pending.objects.extend(objects);
        if pending.len() >= STAT_BATCH {
            let batch = std::mem::take(&mut *pending);
            drop(pending);
            self.write_stats(&batch);
        }
    }

    /// True when the tree manifest and every blob it names are present (cheap: no re-hash).
    pub fn tree_is_complete(&self, tree: &Hash) -> bool {
        match self.store.read_tree(tree) {
            Ok(t) => t.entries.iter().all(|e| self.store.contains(&e.blob)),
            Err(_) => false,
        }
    }

    /// Checks a cached result before it is reused: the manifest and every blob must exist and
    /// hash to their names. Objects already verified and unchanged since (same stat) are not
    /// re-read. Corrupt objects are deleted so a recomputation can store good ones; the
    /// corrupt hashes are returned.
    pub fn check_tree(&self, tree: &Hash) -> std::result::Result<(), Vec<Hash>> {
        self.check_hit(tree, None)
    }

    /// [`Cache::check_tree`] for a hit whose blob list was recorded with the run
    /// ([`Hit::blobs`]): the manifest is checked like every object but not read.
    pub fn check_hit(
        &self,
        tree: &Hash,
        blobs: Option<&[Hash]>,
    ) -> std::result::Result<(), Vec<Hash>> {
        self.check_hits(&[(*tree, blobs)]).remove(0)
    }

    /// [`Cache::check_hit`] for many hits at once: every object they name is checked once, in
    /// one pass (stats in parallel, one stat-cache lookup each), in the order given.
    pub fn check_hits(
        &self,
        hits: &[(Hash, Option<&[Hash]>)],
    ) -> Vec<std::result::Result<(), Vec<Hash>>> {
        // Runs recorded before their blob list was (schema < 4) read the manifest instead;
        // `None` when it cannot be read.
        let manifests: Vec<Option<Vec<Hash>>> = hits
            .iter()
            .map(|(tree, blobs)| match blobs {
                Some(_) => Some(Vec::new()),
                None => self
                    .store
                    .read_tree(tree)
                    .ok()
                    .map(|t| t.entries.iter().map(|e| e.blob).collect()),
            })
            .collect();
        let lists: Vec<&[Hash]> = hits
            .iter()
            .zip(&manifests)
            .map(|((_, blobs), manifest)| blobs.unwrap_or(manifest.as_deref().unwrap_or(&[])))
            .collect();
        let mut index: std::collections::HashMap<Hash, usize> = std::collections::HashMap::new();
        let mut objects: Vec<Hash> = Vec::new();
        for ((tree, _), list) in hits.iter().zip(&lists) {
            for h in std::iter::once(tree).chain(list.iter()) {
                index.entry(*h).or_insert_with(|| {
                    objects.push(*h);
                    objects.len() - 1
                });
            }
        }
        let ok = self.verified(&objects);
        let good = |h: &Hash| ok[index[h]];
        let mut removed = std::collections::HashSet::new();
        let mut quarantine = |bad: Vec<Hash>| -> Vec<Hash> {
            let fresh: Vec<Hash> = bad.iter().copied().filter(|h| removed.insert(*h)).collect();
            self.quarantine(&fresh);
            bad
        };
        hits.iter()
            .zip(&lists)
            .enumerate()
            .map(|(i, ((tree, _), list))| {
                if !good(tree) || manifests[i].is_none() {
                    // A damaged manifest's blob list means nothing: only the manifest goes.
                    return Err(quarantine(vec![*tree]));
                }
                let bad: Vec<Hash> = list.iter().copied().filter(|h| !good(h)).collect();
                if bad.is_empty() {
                    Ok(())
                } else {
                    Err(quarantine(bad))
                }
            })
            .collect()
    }

    /// Whether each object exists and hashes to its name. An object whose stat matches the
    /// one remembered when it was last verified (or written) is not re-read.
    fn verified(&self, hashes: &[Hash]) -> Vec<bool> {
        use rayon::prelude::*;
        let parallel = hashes.len() >= hash::PARALLEL_FROM;
        let stat = |h: &Hash| self.store.object_stat(h).ok();
        let stats: Vec<Option<hash::StatKey>> = if parallel {
            hashes.par_iter().map(stat).collect()
        } else {
            hashes.iter().map(stat).collect()
        };
        let known = self.db_read().object_stats(hashes);
        let now = hash::now_ns();
        let check = |((h, stat), known): (
            (&Hash, &Option<hash::StatKey>),
            &Option<hash::StatKey>,
        )|
         -> (bool, Option<(Hash, hash::StatKey)>) {
            let Some(stat) = stat else {
                return (false, None);
            };
            if known.as_ref() == Some(stat) {
                return (true, None);
            }
            let good = hash_file(&self.store.object_path(h)).is_ok_and(|actual| actual == *h);
            let remember = (good && !hash::is_racy(stat, now)).then_some((*h, *stat));
            (good, remember)
        };
        let checked: Vec<(bool, Option<(Hash, hash::StatKey)>)> = if parallel {
            hashes
                .par_iter()
                .zip(&stats)
                .zip(&known)
                .map(check)
                .collect()
        } else {
            hashes.iter().zip(&stats).zip(&known).map(check).collect()
        };
        let fresh = checked.iter().filter_map(|(_, r)| *r).collect();
        self.remember(Vec::new(), fresh);
        checked.into_iter().map(|(ok, _)| ok).collect()
    }

    fn quarantine(&self, bad: &[Hash]) -> Vec<Hash> {
        for h in bad {
            if let Err(e) = self.store.remove_object(h) {
                tracing::warn!("could not delete corrupt object {h}: {e}");
            }
        }
        bad.to_vec()
    }

    /// Claims `key` for this process (see [`ClaimOwner`]); a claim held by a live process
    /// with a recent heartbeat is reported instead.
    /// With `check_done`, a key whose successful run is already recorded is reported as done
    /// (checked atomically with the claim).
    pub fn try_claim(
        &self,
        key: &str,
        me: &ClaimOwner,
        stale_after_s: f64,
        check_done: bool,
    ) -> Result<ClaimState> {
        let busy = |pid: i32| self.store.holds_live_work_of(pid);
        self.db()
            .try_claim(key, me, stale_after_s, check_done, &busy)
    }

    /// Refreshes this process's claims on `keys`.
    pub fn heartbeat(&self, keys: &[String], me: &ClaimOwner) -> Result<()> {
        self.db().heartbeat(keys, me)
    }

    pub fn release(&self, key: &str, me: &ClaimOwner) -> Result<()> {
        self.db().release(key, me)
    }

    /// Remembers the cluster job running `key`, so a restarted driver can adopt it.
    pub fn put_cluster_job(
        &self,
        key: &str,
        executor: &str,
        job_id: &str,
        stage: &str,
    ) -> Result<()> {
        self.db().put_cluster_job(key, executor, job_id, stage)
    }

    pub fn cluster_job(&self, key: &str, executor: &str) -> Result<Option<String>> {
        self.db().cluster_job(key, executor)
    }

    pub fn forget_cluster_job(&self, key: &str, executor: &str) -> Result<()> {
        self.db().forget_cluster_job(key, executor)
    }

    /// A shared lock held while a run uses the cache; `gc` and `verify` take it exclusively.
    pub fn lock_shared(&self) -> Result<CacheLock> {
        CacheLock::acquire(&self.root.join("lock"), false)
    }

    /// The exclusive lock; waits (saying so) while other processes hold the shared one.
    pub fn lock_exclusive(&self) -> Result<CacheLock> {
        CacheLock::acquire(&self.root.join("lock"), true)
    }

    /// Path of the database file.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("cache.db")
    }

    /// Recovers a cache whose `cache.db` is damaged ([`CacheError::is_damaged_db`]): moves the
    /// database (with its `-wal` and `-shm` files) aside to `cache.db.broken-<unix time>`, so
    /// that the next [`Cache::open`] starts an empty index over the same objects. The records
    /// are lost (the objects do not say which key produced them, so nothing is rebuilt):
    /// stages run again, and outputs equal to stored ones are not stored twice. Waits for
    /// other engine processes like `verify` does, and does nothing if the database opens
    /// and checks clean by then. Returns where the database went, if it was moved.
    pub fn recover_damaged_db(root: &Path) -> Result<Option<PathBuf>> {
        let _lock = CacheLock::acquire(&root.join("lock"), true)?;
        let _opening = CacheLock::acquire_saying(&root.join("open.lock"), true, None)?;
        let db_path = root.join("cache.db");
        match db::Db::open(&db_path).and_then(|db| db.quick_check()) {
            Ok(()) => return Ok(None),
            Err(e) if e.is_damaged_db() => {}
            Err(e) => return Err(e),
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = root.join(format!("cache.db.broken-{stamp}"));
        for suffix in ["-wal", "-shm", ""] {
            let from = root.join(format!("cache.db{suffix}"));
            let to = root.join(format!("cache.db.broken-{stamp}{suffix}"));
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::io(from, e)),
            }
        }
        Ok(Some(aside))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A run record for tests: `ok` with `tree`, `failed` without.
    pub(crate) fn new_run(key: &str, tree: Option<Hash>) -> NewRun {
        NewRun {
            key: key.to_string(),
            pipeline: "p".into(),
            stage: "s".into(),
            op: "shell".into(),
            op_version: 1,
            key_doc: serde_json::json!({"params": {"a": 1}}),
            output_tree: tree,
            status: if tree.is_some() {
                RunStatus::Ok
            } else {
                RunStatus::Failed
            },
            error: None,
            started_at: 1.0,
            ended_at: 2.0,
            host: "h".into(),
            engine_version: "0".into(),
            log_blob: None,
            metrics: BTreeMap::from([("acc".to_string(), 0.5), ("nan".to_string(), f64::NAN)]),
        }
    }

    #[test]
    fn record_then_lookup_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let scratch = cache.store().scratch().unwrap();
        std::fs::write(scratch.path().join("a.txt"), "hello").unwrap();
        let tree = cache.store().put_dir(scratch.path(), &[]).unwrap();
        cache.record(&new_run("k1", Some(tree))).unwrap();
        let rec = cache.lookup("k1").unwrap().unwrap();
        assert_eq!(rec.output_tree, Some(tree));
        assert_eq!(rec.metrics["acc"], 0.5);
        assert!(rec.metrics["nan"].is_nan());
        assert!(cache.tree_is_complete(&tree));
        assert!(cache.lookup("k2").unwrap().is_none());
        // Reopening sees the same record.
        drop(cache);
        let cache = Cache::open(dir.path()).unwrap();
        assert!(cache.lookup("k1").unwrap().is_some());
    }

    /// Inside a read batch, a write still commits at once (it ends the batch's transaction),
    /// other connections see it, and the batch's next lookup sees it too.
    #[test]
    fn writes_inside_a_read_batch_commit_and_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let other = Cache::open(dir.path()).unwrap();
        let tree = cache.store().put_bytes(b"{\"entries\":[]}").unwrap();
        let batch = cache.read_batch();
        assert!(cache.lookup_hit("k").unwrap().is_none());
        cache.record(&new_run("k", Some(tree))).unwrap();
        assert!(
            other.lookup_hit("k").unwrap().is_some(),
            "committed for others"
        );
        let hit = cache.lookup_hit("k").unwrap().unwrap();
        assert_eq!(hit.output_tree, Some(tree));
        // A record written by another process during a batch is seen once the batch ends.
        other.record(&new_run("k2", Some(tree))).unwrap();
        drop(batch);
        assert!(cache.lookup_hit("k2").unwrap().is_some());
    }

    /// A hit checks the blobs recorded with the run (no manifest read), or the manifest's
    /// when the run predates that column; either way a deleted blob is found.
    #[test]
    fn hits_check_recorded_blobs_and_fall_back_to_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let s = cache.store().scratch().unwrap();
        std::fs::write(s.path().join("a"), "1").unwrap();
        std::fs::write(s.path().join("b"), "2").unwrap();
        let tree = cache.store().put_dir(s.path(), &[]).unwrap();
        cache.record(&new_run("k", Some(tree))).unwrap();
        let manifest: Vec<Hash> = cache
            .store()
            .read_tree(&tree)
            .unwrap()
            .entries
            .iter()
            .map(|e| e.blob)
            .collect();
        let hit = cache.lookup_hit("k").unwrap().unwrap();
        assert_eq!(hit.blobs.as_deref(), Some(&manifest[..]));
        assert!(cache.check_hit(&tree, hit.blobs.as_deref()).is_ok());
        // Recorded before schema 4: no list, the manifest is read.
        cache
            .db()
            .conn()
            .execute("UPDATE runs SET blobs = NULL", [])
            .unwrap();
        let old = cache.lookup_hit("k").unwrap().unwrap();
        assert!(old.blobs.is_none());
        assert!(cache.check_hit(&tree, None).is_ok());
        std::fs::remove_file(cache.store().object_path(&manifest[1])).unwrap();
        assert_eq!(cache.check_hit(&tree, None), Err(vec![manifest[1]]));
        assert_eq!(
            cache.check_hit(&tree, hit.blobs.as_deref()),
            Err(vec![manifest[1]])
        );
    }

    /// Objects a run wrote enter the stat cache when it is recorded (the store hashed them as
    /// it wrote them); an object that predates the run (deduplicated) does not, so its first
    /// reuse still re-hashes it.
    #[test]
    fn recording_remembers_only_the_objects_the_run_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let old = cache.store().put_bytes(b"written before the run").unwrap();
        let old_path = cache.store().object_path(&old);
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&old_path)
            .unwrap()
            .set_modified(past)
            .unwrap();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            - 1.0;
        let s = cache.store().scratch().unwrap();
        std::fs::write(s.path().join("new"), "written by the run").unwrap();
        std::fs::write(s.path().join("old"), "written before the run").unwrap();
        let tree = cache.store().put_dir(s.path(), &[]).unwrap();
        let mut run = new_run("k", Some(tree));
        run.started_at = started;
        cache.record(&run).unwrap();
        cache.flush_stat_cache();
        let blobs = cache.lookup_hit("k").unwrap().unwrap().blobs.unwrap();
        let objects: Vec<Hash> = std::iter::once(tree).chain(blobs).collect();
        let known = cache.db().object_stats(&objects);
        let remembered: Vec<Hash> = objects
            .iter()
            .zip(&known)
            .filter(|(_, k)| k.is_some())
            .map(|(h, _)| *h)
            .collect();
        assert!(remembered.contains(&tree), "the manifest is new");
        assert!(
            !remembered.contains(&old),
            "the old blob is left to the check"
        );
        assert_eq!(remembered.len(), 2, "manifest and the new blob: {known:?}");
    }

    #[test]
    fn failed_runs_are_not_cache_hits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        cache.record(&new_run("k", None)).unwrap();
        assert!(cache.lookup("k").unwrap().is_none());
        assert!(cache.latest_attempt("p", "s").unwrap().is_some());
        assert!(cache.latest_run("p", "s").unwrap().is_none());
    }

    #[test]
    fn record_refuses_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let err = cache
            .record(&new_run("k", Some(hash_bytes(b"nope"))))
            .unwrap_err();
        assert!(matches!(err, CacheError::MissingObject(_)));
    }

    #[test]
    fn duplicate_key_keeps_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let tree = cache.store().put_bytes(b"{\"entries\":[]}").unwrap();
        let a = cache.record(&new_run("k", Some(tree))).unwrap();
        let b = cache.record(&new_run("k", Some(tree))).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn stat_cache_avoids_rehash_and_sees_edits() {
        let dir = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let f = ws.path().join("f.txt");
        std::fs::write(&f, "one").unwrap();
        let h1 = cache
            .hash_paths(std::slice::from_ref(&f))
            .remove(0)
            .unwrap();
        assert_eq!(h1, hash_bytes(b"one"));
        std::fs::write(&f, "two!").unwrap();
        let h2 = cache
            .hash_paths(std::slice::from_ref(&f))
            .remove(0)
            .unwrap();
        assert_eq!(h2, hash_bytes(b"two!"));
        let missing = cache.hash_paths(&[ws.path().join("nope")]).remove(0);
        assert!(missing.is_err());
    }

    /// A new cache folder is private; an existing one keeps its mode.
    #[test]
    fn a_new_cache_folder_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("a/cache");
        drop(Cache::open(&new).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&new), 0o700);
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(Cache::open(&shared).unwrap());
        assert_eq!(mode(&shared), 0o755);
    }

    /// A truncated or overwritten cache.db is recognised, named with the fix, and recovered:
    /// moved aside (with its -wal/-shm), an empty index started, the objects kept.
    #[test]
    fn a_damaged_database_is_moved_aside_and_the_objects_kept() {
        for damage in ["truncate", "garbage"] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("c");
            let tree = {
                let cache = Cache::open(&root).unwrap();
                for i in 0..200 {
                    let s = cache.store().scratch().unwrap();
                    std::fs::write(s.path().join("a.txt"), format!("hello {i}")).unwrap();
                    let tree = cache.store().put_dir(s.path(), &[]).unwrap();
                    cache
                        .record(&new_run(&format!("k{i}"), Some(tree)))
                        .unwrap();
                }
                cache.lookup("k0").unwrap().unwrap().output_tree.unwrap()
            };
            let db = root.join("cache.db");
            let len = std::fs::metadata(&db).unwrap().len();
            assert!(len > 8192, "{len}");
            match damage {
                "truncate" => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&db)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap(),
                _ => std::fs::write(&db, vec![0x5a; len as usize]).unwrap(),
            }
            let damaged = Cache::open(&root).and_then(|c| c.verify(false));
            let err = match damaged {
                Err(e) => e,
                Ok(r) => panic!("{damage}: not noticed: {r:?}"),
            };
            assert!(err.is_damaged_db(), "{damage}: {err}");
            assert!(err.to_string().contains("engine verify --repair"), "{err}");
            let aside = Cache::recover_damaged_db(&root).unwrap().unwrap();
            assert!(aside.is_file());
            let cache = Cache::open(&root).unwrap();
            assert!(cache.lookup("k0").unwrap().is_none());
            assert!(cache.store().contains(&tree), "objects are kept");
            assert_eq!(cache.verify(false).unwrap().problem_count(), 0);
            drop(cache);
            assert_eq!(Cache::recover_damaged_db(&root).unwrap(), None);
        }
    }

    /// A claim's pid is tested only in its owner's pid space: a dead pid elsewhere (another
    /// container with the same host name) is waited for until its heartbeat stops.
    #[test]
    fn claims_of_another_pid_space_are_not_taken_over_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let me = ClaimOwner::this_process(1.0);
        let mut ghost = me.clone();
        ghost.id = "ghost".into();
        ghost.pid = 999_999_999;
        ghost.pid_space = "000000000000".into();
        assert_eq!(
            cache.try_claim("k", &ghost, 30.0, false).unwrap(),
            ClaimState::Acquired
        );
        assert!(matches!(
            cache.try_claim("k", &me, 30.0, false).unwrap(),
            ClaimState::HeldBy { .. }
        ));
        ghost.pid_space = me.pid_space.clone();
        ghost.id = "ghost2".into();
        assert_eq!(
            cache.try_claim("k2", &ghost, 30.0, false).unwrap(),
            ClaimState::Acquired
        );
        assert_eq!(
            cache.try_claim("k2", &me, 30.0, false).unwrap(),
            ClaimState::Acquired,
            "a dead pid of our own pid space is taken over"
        );
    }
}
