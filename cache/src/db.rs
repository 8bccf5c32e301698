//! `cache.db`: the SQLite index of runs, metrics and file stats.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::hash::{Hash, StatKey};
use crate::{CacheError, Result};

/// Bumped with every migration below; a database newer than this is refused, not corrupted.
pub const SCHEMA_VERSION: i64 = 7;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema.
    r#"
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        pipeline TEXT NOT NULL,
        stage TEXT NOT NULL,
        op TEXT NOT NULL,
        op_version INTEGER NOT NULL,
        key_doc TEXT NOT NULL,
        output_tree TEXT,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error TEXT,
        started_at REAL NOT NULL,
        ended_at REAL NOT NULL,
        host TEXT NOT NULL,
        engine_version TEXT NOT NULL,
        log_blob TEXT
    );
    CREATE UNIQUE INDEX runs_ok_key ON runs(key) WHERE status = 'ok';
    CREATE INDEX runs_by_stage ON runs(pipeline, stage, ended_at);
    CREATE TABLE metrics (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value REAL,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE stat_cache (
        path TEXT PRIMARY KEY,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    "#,
    // 1 -> 2: per-stage claims, so concurrent engine processes run each key once.
    r#"
    CREATE TABLE claims (
        key TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        heartbeat REAL NOT NULL
    );
    "#,
    // 2 -> 3: cluster jobs by stage key, so a restarted driver adopts instead of resubmitting.
    r#"
    CREATE TABLE cluster_jobs (
        key TEXT PRIMARY KEY,
        executor TEXT NOT NULL,
        job_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        submitted_at REAL NOT NULL
    );
    "#,
    // 3 -> 4: the blobs of a run's output tree, so a cache hit checks its objects without
    // reading the manifest (NULL for runs recorded before: those read it).
    r#"
    ALTER TABLE runs ADD COLUMN blobs TEXT;
    "#,
    // 4 -> 5: the stat cache of store objects keyed by hash, not path: a cache hit checks its
    // objects with 32-byte keys instead of long path strings. Object rows move over.
    r#"
    CREATE TABLE object_stat (
        hash BLOB PRIMARY KEY,
        dev INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT OR REPLACE INTO object_stat (hash, dev, ino, size, mtime_ns)
        SELECT unhex(hash), dev, ino, size, mtime_ns FROM stat_cache
        WHERE path LIKE '%/objects/' || substr(hash, 1, 2) || '/' || substr(hash, 3);
    DELETE FROM stat_cache
        WHERE path LIKE '%/objects/' || substr(hash, 1, 2) || '/' || substr(hash, 3);
    "#,
    // 5 -> 6: the pid space (host, boot, pid namespace: `crate::pid_space_id`) of a claim's
    // owner, so that its pid is only tested where it means that process. NULL for claims
    // written before: those are taken over only when their heartbeat stops.
    r#"
    ALTER TABLE claims ADD COLUMN pid_space TEXT;
    "#,
    // 6 -> 7: named experiments (`engine run --name`): what an invocation set and every stage
    // key it produced, so runs can be compared later and gc keeps their results.
    r#"
    CREATE TABLE experiments (
        id INTEGER PRIMARY KEY,
        pipeline TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        meta TEXT NOT NULL,
        UNIQUE (pipeline, name)
    );
    CREATE TABLE experiment_stages (
        experiment_id INTEGER NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        stage TEXT NOT NULL,
        key TEXT,
        status TEXT NOT NULL,
        matrix TEXT NOT NULL,
        params TEXT NOT NULL,
        duration_s REAL,
        PRIMARY KEY (experiment_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX experiment_stages_key ON experiment_stages(key);
    "#,
];

/// Who holds a claim: `id` is unique per engine process (host, pid, start time).
#[derive(Debug, Clone)]
pub struct ClaimOwner {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// See [`crate::pid_space_id`]: `pid` names a process only in this pid space.
    pub pid_space: String,
}

impl ClaimOwner {
    /// This process, started at `started_at` (unix seconds).
    pub fn this_process(started_at: f64) -> Self {
        let host = crate::hostname();
        let pid = std::process::id();
        ClaimOwner {
            id: format!("{host}:{pid}:{started_at}"),
            host,
            pid,
            pid_space: crate::pid_space_id().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimState {
    Acquired,
    /// A successful run of the key is recorded: reuse it.
    AlreadyDone,
    HeldBy {
        owner: String,
        pid: u32,
        host: String,
    },
}

/// A run's references, for verify and gc.
#[derive(Debug, Clone)]
pub struct RunRef {
    pub id: i64,
    pub ok: bool,
    pub pipeline: String,
    pub stage: String,
    pub key: String,
    pub ended_at: f64,
    pub output_tree: Option<Hash>,
    pub log_blob: Option<Hash>,
}

/// Now, in seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Ok,
    Failed,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
        }
    }
}

/// A run to record.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub key: String,
    pub pipeline: String,
    pub stage: String,
    pub op: String,
    pub op_version: u32,
    /// Everything that went into the key, so a later run can say exactly what changed.
    pub key_doc: serde_json::Value,
    /// `None` for a failed run.
    pub output_tree: Option<Hash>,
    pub status: RunStatus,
    pub error: Option<String>,
    /// Unix seconds.
    pub started_at: f64,
    pub ended_at: f64,
    pub host: String,
    pub engine_version: String,
    pub log_blob: Option<Hash>,
    pub metrics: BTreeMap<String, f64>,
}

/// A recorded run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: i64,
    pub run: NewRun,
}

impl std::ops::Deref for RunRecord {
    type Target = NewRun;
    fn deref(&self) -> &NewRun {
        &self.run
    }
}

/// What reusing a recorded run needs: see [`crate::Cache::lookup_hit`].
#[derive(Debug, Clone)]
pub struct Hit {
    pub output_tree: Option<Hash>,
    pub metrics: BTreeMap<String, f64>,
    /// The blobs `output_tree` names, when recorded with the run (schema 4 on).
    pub blobs: Option<Vec<Hash>>,
}

pub(crate) struct Db {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    /// A read transaction opened by [`Db::begin_read`] is in progress.
    reading: bool,
}

impl Db {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let err = |source| CacheError::Db {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        // Lookups of a large cache touch pages all over the index: map the file instead of
        // copying each page in with pread, and keep more of them (both per connection).
        conn.pragma_update(None, "mmap_size", 1i64 << 30)
            .map_err(err)?;
        conn.pragma_update(None, "cache_size", -65536i64)
            .map_err(err)?;
        let mut db = Self {
            conn,
            path: path.to_path_buf(),
            reading: false,
        };
        db.migrate()?;
        Ok(db)
    }

    pub(crate) fn err(&self, source: rusqlite::Error) -> CacheError {
        CacheError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(CacheError::SchemaTooNew {
                path: self.path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Records `run`; `blobs` are the blobs its output tree names (see migration 4).
    pub(crate) fn record(&mut self, run: &NewRun, blobs: Option<&[Hash]>) -> Result<i64> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        if run.status == RunStatus::Ok {
            let existing: Option<(i64, Option<String>)> = tx
                .query_row(
                    "SELECT id, output_tree FROM runs WHERE key = ?1 AND status = 'ok'",
                    [&run.key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err)?;
            if let Some((id, tree)) = existing {
                if tree == run.output_tree.map(|h| h.to_hex()) {
                    return Ok(id);
                }
                // A recomputation (the old result's objects were lost) that produced other
                // bytes: the new result replaces the old one.
                tx.execute("DELETE FROM runs WHERE id = ?1", [id])
                    .map_err(err)?;
            }
        }
        tx.execute(
            "INSERT INTO runs (key, pipeline, stage, op, op_version, key_doc, output_tree, status,
                error, started_at, ended_at, host, engine_version, log_blob, blobs)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                run.key,
                run.pipeline,
                run.stage,
                run.op,
                run.op_version,
                run.key_doc.to_string(),
                run.output_tree.map(|h| h.to_hex()),
                run.status.as_str(),
                run.error,
                run.started_at,
                run.ended_at,
                run.host,
                run.engine_version,
                run.log_blob.map(|h| h.to_hex()),
                blobs.map(|b| b.iter().map(Hash::to_hex).collect::<Vec<_>>().join(" ")),
            ],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        {
            let mut stmt = tx
                .prepare("INSERT INTO metrics (run_id, name, value) VALUES (?1, ?2, ?3)")
                .map_err(err)?;
            for (name, value) in &run.metrics {
                // SQLite stores NaN as NULL; read back as NaN.
                let value = if value.is_nan() { None } else { Some(*value) };
                stmt.execute(params![id, name, value]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(id)
    }

    #[cfg(test)]
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Opens a read transaction, so that a run of lookups shares one snapshot and one lock
    /// acquisition instead of taking both per statement. Harmless when it cannot start.
    pub(crate) fn begin_read(&mut self) {
        if !self.reading && self.conn.is_autocommit() && self.conn.execute_batch("BEGIN").is_ok() {
            self.reading = true;
        }
    }

    /// Ends the read transaction of [`Db::begin_read`], if one is open. Every use of the
    /// connection other than a batched read calls this first, so no write ever runs inside it.
    pub(crate) fn end_read(&mut self) {
        if std::mem::take(&mut self.reading) && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("COMMIT");
        }
    }

    /// What a cache hit needs of the successful run recorded under `key`: its output tree
    /// and metrics (cheaper than [`Db::lookup`], which also reads and parses the key document).
    pub(crate) fn lookup_hit(&self, key: &str) -> Result<Option<Hit>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, output_tree, blobs FROM runs WHERE key = ?1 AND status = 'ok'",
            )
            .map_err(|e| self.err(e))?;
        let row = stmt
            .query_row([key], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((id, tree, blobs)) = row else {
            return Ok(None);
        };
        // A list that does not parse is treated as absent: the manifest is read instead.
        let blobs = blobs.and_then(|b| {
            b.split_ascii_whitespace()
                .map(str::parse)
                .collect::<std::result::Result<Vec<Hash>, _>>()
                .ok()
        });
        let tree = match tree {
            Some(t) => Some(t.parse().map_err(|_| CacheError::Db {
                path: self.path.clone(),
                source: rusqlite::Error::InvalidColumnType(
                    1,
                    format!("run {id}: bad output_tree"),
                    rusqlite::types::Type::Text,
                ),
            })?),
            None => None,
        };
        Ok(Some(Hit {
            output_tree: tree,
            metrics: self.metrics(id)?,
            blobs,
        }))
    }

    pub(crate) fn lookup(&self, key: &str) -> Result<Option<RunRecord>> {
        self.query_one(
            "SELECT * FROM runs WHERE key = ?1 AND status = 'ok'",
            &[&key as &dyn rusqlite::ToSql],
        )
    }

    pub(crate) fn latest_run(
        &self,
        pipeline: &str,
        stage: &str,
        status: Option<RunStatus>,
    ) -> Result<Option<RunRecord>> {
        match status {
            Some(status) => self.query_one(
                "SELECT * FROM runs WHERE pipeline = ?1 AND stage = ?2 AND status = ?3
                 ORDER BY ended_at DESC, id DESC LIMIT 1",
                &[&pipeline as &dyn rusqlite::ToSql, &stage, &status.as_str()],
            ),
            None => self.query_one(
                "SELECT * FROM runs WHERE pipeline = ?1 AND stage = ?2
                 ORDER BY ended_at DESC, id DESC LIMIT 1",
                &[&pipeline as &dyn rusqlite::ToSql, &stage],
            ),
        }
    }

    pub(crate) fn recent_runs(
        &self,
        pipeline: &str,
        stage: &str,
        limit: usize,
    ) -> Result<Vec<RunRecord>> {
        let ids: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT id FROM runs WHERE pipeline = ?1 AND stage = ?2 AND status = 'ok'
                     ORDER BY ended_at DESC, id DESC LIMIT ?3",
                )
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params![pipeline, stage, limit as i64], |r| r.get(0))
                .map_err(|e| self.err(e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| self.err(e))?
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = self.query_one(
                "SELECT * FROM runs WHERE id = ?1",
                &[&id as &dyn rusqlite::ToSql],
            )? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn query_one(&self, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Option<RunRecord>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let row = stmt
            .query_row(args, |r| {
                Ok((
                    r.get::<_, i64>("id")?,
                    r.get::<_, String>("key")?,
                    r.get::<_, String>("pipeline")?,
                    r.get::<_, String>("stage")?,
                    r.get::<_, String>("op")?,
                    r.get::<_, u32>("op_version")?,
                    r.get::<_, String>("key_doc")?,
                    r.get::<_, Option<String>>("output_tree")?,
                    r.get::<_, String>("status")?,
                    r.get::<_, Option<String>>("error")?,
                    r.get::<_, f64>("started_at")?,
                    r.get::<_, f64>("ended_at")?,
                    r.get::<_, String>("host")?,
                    r.get::<_, String>("engine_version")?,
                    r.get::<_, Option<String>>("log_blob")?,
                ))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(row) = row else { return Ok(None) };
        let (
            id,
            key,
            pipeline,
            stage,
            op,
            op_version,
            key_doc,
            tree,
            status,
            error,
            s,
            e,
            host,
            ver,
            log,
        ) = row;
        let corrupt = |what: &str| CacheError::Db {
            path: self.path.clone(),
            source: rusqlite::Error::InvalidColumnType(
                0,
                format!("run {id}: bad {what}"),
                rusqlite::types::Type::Text,
            ),
        };
        let parse_hash = |h: Option<String>, what: &str| -> Result<Option<Hash>> {
            h.map(|h| h.parse().map_err(|_| corrupt(what))).transpose()
        };
        let run = NewRun {
            key,
            pipeline,
            stage,
            op,
            op_version,
            key_doc: serde_json::from_str(&key_doc).map_err(|_| corrupt("key_doc"))?,
            output_tree: parse_hash(tree, "output_tree")?,
            status: if status == "ok" {
                RunStatus::Ok
            } else {
                RunStatus::Failed
            },
            error,
            started_at: s,
            ended_at: e,
            host,
            engine_version: ver,
            log_blob: parse_hash(log, "log_blob")?,
            metrics: self.metrics(id)?,
        };
        Ok(Some(RunRecord { id, run }))
    }

    fn metrics(&self, run_id: i64) -> Result<BTreeMap<String, f64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, value FROM metrics WHERE run_id = ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<f64>>(1)?.unwrap_or(f64::NAN),
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Claims `key` for `owner` unless a live owner holds it. A claim whose heartbeat is older
    /// than `stale_after_s`, or whose owner process on this host is gone, is taken over.
    pub(crate) fn try_claim(
        &mut self,
        key: &str,
        me: &ClaimOwner,
        stale_after_s: f64,
        check_done: bool,
        dead_owner_busy: &dyn Fn(i32) -> bool,
    ) -> Result<ClaimState> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        // Checked in the same transaction as the claim: a result recorded (and its claim
        // released) since the caller's lookup must not be computed again.
        let done: Option<i64> = tx
            .query_row(
                "SELECT id FROM runs WHERE key = ?1 AND status = 'ok'",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if check_done && done.is_some() {
            return Ok(ClaimState::AlreadyDone);
        }
        let now = unix_now();
        let held: Option<(String, String, i64, f64, Option<String>)> = tx
            .query_row(
                "SELECT owner, host, pid, heartbeat, pid_space FROM claims WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(err)?;
        if let Some((owner, host, pid, heartbeat, pid_space)) = held {
            // The pid is tested only in the owner's own pid space: the same host name in
            // another container, or before a reboot, may give the pid to another process.
            // A dead owner whose stage processes still live (they are being stopped) is
            // waited for: a take-over must never run a second copy beside them.
            let here = pid_space.as_deref() == Some(me.pid_space.as_str());
            let gone = here && !crate::machine::process_alive(pid as i32);
            let busy = gone && dead_owner_busy(pid as i32);
            let dead = gone && !busy;
            let stale = now - heartbeat > stale_after_s;
            if owner != me.id && (busy || (!dead && !stale)) {
                return Ok(ClaimState::HeldBy {
                    owner,
                    pid: pid as u32,
                    host,
                });
            }
            if owner != me.id {
                tracing::warn!(
                    "taking over the claim on {key} from {owner} ({})",
                    if dead {
                        "its process is gone"
                    } else {
                        "no heartbeat"
                    }
                );
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO claims (key, owner, host, pid, heartbeat, pid_space)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key, me.id, me.host, me.pid, now, me.pid_space],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(ClaimState::Acquired)
    }

    pub(crate) fn heartbeat(&mut self, keys: &[String], me: &ClaimOwner) -> Result<()> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("UPDATE claims SET heartbeat = ?1 WHERE key = ?2 AND owner = ?3")
                .map_err(err)?;
            let now = unix_now();
            for k in keys {
                stmt.execute(params![now, k, me.id]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    pub(crate) fn release(&mut self, key: &str, me: &ClaimOwner) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM claims WHERE key = ?1 AND owner = ?2",
                params![key, me.id],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every run as (id, status ok?, pipeline, stage, ended_at, output tree, log blob).
    pub(crate) fn all_runs(&self) -> Result<Vec<RunRef>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, status, pipeline, stage, key, ended_at, output_tree, log_blob FROM runs")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, f64>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, status, pipeline, stage, key, ended_at, tree, log) =
                row.map_err(|e| self.err(e))?;
            out.push(RunRef {
                id,
                ok: status == "ok",
                pipeline,
                stage,
                key,
                ended_at,
                // An unparsable hash is reported by verify as a missing object.
                output_tree: tree.map(|t| t.parse().unwrap_or(Hash::from_bytes([0; 32]))),
                log_blob: log.map(|t| t.parse().unwrap_or(Hash::from_bytes([0; 32]))),
            });
        }
        Ok(out)
    }

    /// `PRAGMA quick_check`: an error that [`CacheError::is_damaged_db`] recognises when the
    /// file is damaged (truncated, overwritten), even where opening it still worked.
    pub(crate) fn quick_check(&self) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA quick_check")
            .map_err(|e| self.err(e))?;
        let lines: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))?;
        if lines.len() == 1 && lines[0] == "ok" {
            return Ok(());
        }
        Err(self.err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(lines.join("; ")),
        )))
    }

    /// The input trees of every run by id: each string in its key document's `inputs` value,
    /// at any depth, that parses as a hash. The engine writes `inputs` as `{name: {from,
    /// tree}}` or `{name: [{label, from, tree}]}`; this crate reads it without knowing that
    /// shape (labels and stage names are never 64 hex digits). Runs whose document does not
    /// parse have none.
    pub(crate) fn run_inputs(&self) -> Result<HashMap<i64, Vec<Hash>>> {
        fn walk(v: &serde_json::Value, out: &mut Vec<Hash>) {
            match v {
                serde_json::Value::String(s) => {
                    if let Ok(h) = s.parse() {
                        out.push(h);
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
                serde_json::Value::Object(m) => m.values().for_each(|i| walk(i, out)),
                _ => {}
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT id, key_doc FROM runs")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (id, doc) = row.map_err(|e| self.err(e))?;
            let mut trees = Vec::new();
            if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&doc) {
                if let Some(inputs) = doc.get("inputs") {
                    walk(inputs, &mut trees);
                }
            }
            out.insert(id, trees);
        }
        Ok(out)
    }

    pub(crate) fn delete_runs(&mut self, ids: &[i64]) -> Result<()> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM runs WHERE id = ?1")
                .map_err(err)?;
            for id in ids {
                stmt.execute([id]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    pub(crate) fn put_cluster_job(
        &self,
        key: &str,
        executor: &str,
        job_id: &str,
        stage: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO cluster_jobs (key, executor, job_id, stage, submitted_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key, executor, job_id, stage, unix_now()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub(crate) fn cluster_job(&self, key: &str, executor: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT job_id FROM cluster_jobs WHERE key = ?1 AND executor = ?2",
                params![key, executor],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub(crate) fn forget_cluster_job(&self, key: &str, executor: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM cluster_jobs WHERE key = ?1 AND executor = ?2",
                params![key, executor],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Remembered stats and hashes of `files` (plain files; folders are expanded by the caller).
    pub(crate) fn stat_entries(&self, files: &[PathBuf]) -> HashMap<PathBuf, (StatKey, Hash)> {
        let mut out = HashMap::new();
        let Ok(mut stmt) = self.conn.prepare_cached(
            "SELECT dev, ino, size, mtime_ns, hash FROM stat_cache WHERE path = ?1",
        ) else {
            return out;
        };
        for path in files {
            let row = stmt
                .query_row([path.to_string_lossy()], |r| {
                    Ok((
                        StatKey {
                            dev: r.get::<_, i64>(0)? as u64,
                            ino: r.get::<_, i64>(1)? as u64,
                            size: r.get::<_, i64>(2)? as u64,
                            mtime_ns: r.get(3)?,
                        },
                        r.get::<_, String>(4)?,
                    ))
                })
                .optional();
            if let Ok(Some((stat, hash))) = row {
                if let Ok(hash) = hash.parse() {
                    out.insert(path.clone(), (stat, hash));
                }
            }
        }
        out
    }

    /// Remembered stats of store objects (see migration 5), in the order of `hashes`.
    pub(crate) fn object_stats(&self, hashes: &[Hash]) -> Vec<Option<StatKey>> {
        let Ok(mut stmt) = self
            .conn
            .prepare_cached("SELECT dev, ino, size, mtime_ns FROM object_stat WHERE hash = ?1")
        else {
            return vec![None; hashes.len()];
        };
        hashes
            .iter()
            .map(|h| {
                stmt.query_row([&h.as_bytes()[..]], |r| {
                    Ok(StatKey {
                        dev: r.get::<_, i64>(0)? as u64,
                        ino: r.get::<_, i64>(1)? as u64,
                        size: r.get::<_, i64>(2)? as u64,
                        mtime_ns: r.get(3)?,
                    })
                })
                .ok()
            })
            .collect()
    }

    /// Writes stat-cache entries of workspace files and of store objects in one transaction.
    pub(crate) fn put_stats(
        &mut self,
        files: &[(PathBuf, StatKey, Hash)],
        objects: &[(Hash, StatKey)],
    ) -> Result<()> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO stat_cache (path, dev, ino, size, mtime_ns, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            for (p, s, h) in files {
                stmt.execute(params![
                    p.to_string_lossy(),
                    s.dev as i64,
                    s.ino as i64,
                    s.size as i64,
                    s.mtime_ns,
                    h.to_hex()
                ])
                .map_err(err)?;
            }
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO object_stat (hash, dev, ino, size, mtime_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(err)?;
            for (h, s) in objects {
                stmt.execute(params![
                    &h.as_bytes()[..],
                    s.dev as i64,
                    s.ino as i64,
                    s.size as i64,
                    s.mtime_ns
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 5 moves the stat-cache rows of store objects to the hash-keyed table and
    /// leaves workspace files where they were.
    #[test]
    fn migration_5_moves_object_stats() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cache.db");
        let conn = Connection::open(&p).unwrap();
        for sql in &MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        let object = crate::hash::hash_bytes(b"an object");
        let hex = object.to_hex();
        let object_path = format!("/c/.engine/objects/{}/{}", &hex[..2], &hex[2..]);
        let file_hash = crate::hash::hash_bytes(b"a workspace file").to_hex();
        for (path, hash) in [(object_path.as_str(), &hex), ("/c/data.txt", &file_hash)] {
            conn.execute(
                "INSERT INTO stat_cache (path, dev, ino, size, mtime_ns, hash)
                 VALUES (?1, 1, 2, 3, 4, ?2)",
                params![path, hash],
            )
            .unwrap();
        }
        drop(conn);
        let db = Db::open(&p).unwrap();
        let stat = StatKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
        };
        assert_eq!(db.object_stats(&[object]), vec![Some(stat)]);
        let files = db.stat_entries(&[PathBuf::from(&object_path), PathBuf::from("/c/data.txt")]);
        assert_eq!(files.len(), 1, "only the workspace file stays: {files:?}");
        assert!(files.contains_key(Path::new("/c/data.txt")));
    }

    /// Migration 6 keeps the claims of an older engine (no pid space): they are not taken
    /// over by pid, only once their heartbeat is stale.
    #[test]
    fn migration_6_keeps_old_claims_until_their_heartbeat_stops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cache.db");
        let conn = Connection::open(&p).unwrap();
        for sql in &MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        let me = ClaimOwner::this_process(1.0);
        conn.execute(
            "INSERT INTO claims (key, owner, host, pid, heartbeat) VALUES ('k', 'old', ?1, 999999999, ?2)",
            params![me.host, unix_now()],
        )
        .unwrap();
        drop(conn);
        let mut db = Db::open(&p).unwrap();
        assert!(matches!(
            db.try_claim("k", &me, 30.0, false, &|_| false).unwrap(),
            ClaimState::HeldBy { .. }
        ));
        assert_eq!(
            db.try_claim("k", &me, -1.0, false, &|_| false).unwrap(),
            ClaimState::Acquired
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cache.db");
        drop(Db::open(&p).unwrap());
        let conn = Connection::open(&p).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Db::open(&p),
            Err(CacheError::SchemaTooNew { found: 99, .. })
        ));
    }
}
