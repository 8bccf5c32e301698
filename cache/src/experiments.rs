//! Named experiments: what one `engine run --name` invocation set (its metadata, as the engine
//! gives it) and the key of every stage instance it produced. The cache stores them as it
//! stores runs, without knowing what the metadata means; results stay in `runs`, found by key.

use std::collections::{BTreeMap, HashMap, HashSet};

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use crate::db::Db;
use crate::{Cache, CacheError, Result};

/// One stage instance of an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentStage {
    /// Instance name (`train[lr=0.1]`).
    pub name: String,
    pub stage: String,
    /// `None` when the instance could not be keyed (an upstream failed).
    pub key: Option<String>,
    /// What the invocation did with it (`ran`, `cached`, `failed`, `skipped`).
    pub status: String,
    /// Its matrix values (an object; empty without a matrix).
    pub matrix: Value,
    pub params: Value,
    /// How long its result took to compute, when known.
    pub duration_s: Option<f64>,
}

/// An experiment to record.
#[derive(Debug, Clone)]
pub struct NewExperiment {
    pub pipeline: String,
    pub name: String,
    /// Unix seconds.
    pub created_at: f64,
    /// Whatever the caller wants to keep with it (overrides, vars, git state).
    pub meta: Value,
    pub stages: Vec<ExperimentStage>,
}

/// A recorded experiment, without its stages.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub id: i64,
    pub pipeline: String,
    pub name: String,
    pub created_at: f64,
    pub meta: Value,
}

/// What [`Cache::experiment_table`] reads for comparing many experiments at once.
#[derive(Debug, Default)]
pub struct ExperimentTable {
    /// Oldest first.
    pub experiments: Vec<Experiment>,
    /// By experiment id: (instance name, key, status), in plan order. Params are left out
    /// (see [`Cache::experiment`] for one experiment's full stages).
    pub stages: HashMap<i64, Vec<(String, Option<String>, String)>>,
    /// Metrics of the successful run of every key above that has one.
    pub metrics: HashMap<String, BTreeMap<String, f64>>,
}

impl Db {
    fn record_experiment(&mut self, e: &NewExperiment) -> Result<bool> {
        let path = self.path.clone();
        let err = |source| CacheError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let replaced = tx
            .execute(
                "DELETE FROM experiments WHERE pipeline = ?1 AND name = ?2",
                params![e.pipeline, e.name],
            )
            .map_err(err)?
            > 0;
        tx.execute(
            "INSERT INTO experiments (pipeline, name, created_at, meta) VALUES (?1, ?2, ?3, ?4)",
            params![e.pipeline, e.name, e.created_at, e.meta.to_string()],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO experiment_stages (experiment_id, position, name, stage, key,
                        status, matrix, params, duration_s)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(err)?;
            for (i, s) in e.stages.iter().enumerate() {
                stmt.execute(params![
                    id,
                    i as i64,
                    s.name,
                    s.stage,
                    s.key,
                    s.status,
                    s.matrix.to_string(),
                    s.params.to_string(),
                    s.duration_s,
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(replaced)
    }

    fn experiments(&self, pipeline: &str) -> Result<Vec<Experiment>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, pipeline, name, created_at, meta FROM experiments
                 WHERE pipeline = ?1 ORDER BY created_at, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([pipeline], |r| {
                Ok(Experiment {
                    id: r.get(0)?,
                    pipeline: r.get(1)?,
                    name: r.get(2)?,
                    created_at: r.get(3)?,
                    // Written by this crate from a JSON value; unreadable text reads as null.
                    meta: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or(Value::Null),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    fn experiment_stages(&self, id: i64) -> Result<Vec<ExperimentStage>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT name, stage, key, status, matrix, params, duration_s
                 FROM experiment_stages WHERE experiment_id = ?1 ORDER BY position",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([id], |r| {
                let json = |s: String| serde_json::from_str(&s).unwrap_or(Value::Null);
                Ok(ExperimentStage {
                    name: r.get(0)?,
                    stage: r.get(1)?,
                    key: r.get(2)?,
                    status: r.get(3)?,
                    matrix: json(r.get(4)?),
                    params: json(r.get(5)?),
                    duration_s: r.get(6)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    fn experiment_table(&self, pipeline: &str) -> Result<ExperimentTable> {
        let experiments = self.experiments(pipeline)?;
        let mut stages: HashMap<i64, Vec<(String, Option<String>, String)>> = HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT s.experiment_id, s.name, s.key, s.status
                     FROM experiment_stages s JOIN experiments e ON e.id = s.experiment_id
                     WHERE e.pipeline = ?1 ORDER BY s.experiment_id, s.position",
                )
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([pipeline], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(|e| self.err(e))?;
            for row in rows {
                let (id, name, key, status) = row.map_err(|e| self.err(e))?;
                stages.entry(id).or_default().push((name, key, status));
            }
        }
        let mut metrics: HashMap<String, BTreeMap<String, f64>> = HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT r.key, m.name, m.value FROM runs r JOIN metrics m ON m.run_id = r.id
                     WHERE r.status = 'ok' AND r.key IN (
                        SELECT s.key FROM experiment_stages s
                        JOIN experiments e ON e.id = s.experiment_id
                        WHERE e.pipeline = ?1 AND s.key IS NOT NULL)",
                )
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([pipeline], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<f64>>(2)?.unwrap_or(f64::NAN),
                    ))
                })
                .map_err(|e| self.err(e))?;
            for row in rows {
                let (key, name, value) = row.map_err(|e| self.err(e))?;
                metrics.entry(key).or_default().insert(name, value);
            }
        }
        Ok(ExperimentTable {
            experiments,
            stages,
            metrics,
        })
    }

    fn remove_experiment(&mut self, pipeline: &str, name: &str) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "DELETE FROM experiments WHERE pipeline = ?1 AND name = ?2",
                params![pipeline, name],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    pub(crate) fn experiment_keys(&self) -> Result<HashSet<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT key FROM experiment_stages WHERE key IS NOT NULL")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }
}

impl Cache {
    /// Records an experiment in one transaction, replacing one of the same pipeline and name
    /// (returns whether it did). Its stages' results are kept by `gc` while it exists.
    pub fn record_experiment(&self, experiment: &NewExperiment) -> Result<bool> {
        self.db().record_experiment(experiment)
    }

    /// The experiments of `pipeline`, oldest first.
    pub fn experiments(&self, pipeline: &str) -> Result<Vec<Experiment>> {
        self.db().experiments(pipeline)
    }

    /// One experiment and its stages, in plan order.
    pub fn experiment(
        &self,
        pipeline: &str,
        name: &str,
    ) -> Result<Option<(Experiment, Vec<ExperimentStage>)>> {
        let db = self.db();
        let found = db
            .experiments(pipeline)?
            .into_iter()
            .find(|e| e.name == name);
        match found {
            Some(e) => {
                let stages = db.experiment_stages(e.id)?;
                Ok(Some((e, stages)))
            }
            None => Ok(None),
        }
    }

    /// Every experiment of `pipeline` with its stage keys and their metrics, in three queries
    /// whatever the number of experiments.
    pub fn experiment_table(&self, pipeline: &str) -> Result<ExperimentTable> {
        self.db().experiment_table(pipeline)
    }

    /// Forgets an experiment (its results stay until `gc` finds nothing else keeping them).
    pub fn remove_experiment(&self, pipeline: &str, name: &str) -> Result<bool> {
        self.db().remove_experiment(pipeline, name)
    }

    /// The id of the named experiment, if recorded (cheap existence check).
    pub fn experiment_id(&self, pipeline: &str, name: &str) -> Result<Option<i64>> {
        let db = self.db();
        db.conn
            .query_row(
                "SELECT id FROM experiments WHERE pipeline = ?1 AND name = ?2",
                params![pipeline, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stage(name: &str, key: Option<&str>, status: &str) -> ExperimentStage {
        ExperimentStage {
            name: name.into(),
            stage: name.split('[').next().unwrap_or(name).into(),
            key: key.map(str::to_string),
            status: status.into(),
            matrix: json!({}),
            params: json!({"lr": 0.1}),
            duration_s: Some(1.5),
        }
    }

    #[test]
    fn experiments_round_trip_and_a_name_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        let mut e = NewExperiment {
            pipeline: "p".into(),
            name: "a".into(),
            created_at: 10.0,
            meta: json!({"vars": {"lr": 0.1}}),
            stages: vec![
                stage("data", Some("k1"), "ran"),
                stage("train", None, "skipped"),
            ],
        };
        assert!(!cache.record_experiment(&e).unwrap());
        let (got, stages) = cache.experiment("p", "a").unwrap().unwrap();
        assert_eq!(got.meta, json!({"vars": {"lr": 0.1}}));
        assert_eq!(stages, e.stages);
        e.stages.pop();
        e.created_at = 11.0;
        assert!(cache.record_experiment(&e).unwrap());
        let (_, stages) = cache.experiment("p", "a").unwrap().unwrap();
        assert_eq!(stages.len(), 1);
        assert_eq!(cache.experiments("p").unwrap().len(), 1);
        assert!(cache.experiments("other").unwrap().is_empty());
        let table = cache.experiment_table("p").unwrap();
        assert_eq!(table.experiments.len(), 1);
        assert_eq!(table.stages[&table.experiments[0].id].len(), 1);
        assert!(cache.remove_experiment("p", "a").unwrap());
        assert!(!cache.remove_experiment("p", "a").unwrap());
        assert!(cache.experiment("p", "a").unwrap().is_none());
    }
}
