//! Keeping a cache honest and small: `verify` re-hashes everything and checks every record's
//! references; `gc` drops records by a retention rule and deletes unreachable objects. Both
//! run under the cache's exclusive lock, so they never race a running engine.

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;

use crate::db::RunRef;
use crate::{Cache, CacheError, CacheLock, Hash, Result};

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub objects: usize,
    pub bytes: u64,
    /// Objects whose content does not hash to their name.
    pub corrupt: Vec<Hash>,
    /// One line per broken record.
    pub problems: Vec<String>,
    /// Records whose results cannot be trusted (missing or corrupt objects).
    pub bad_runs: Vec<i64>,
    /// Objects no record refers to (harmless; `gc` removes them).
    pub unreferenced: usize,
    /// With repair: records dropped and corrupt objects deleted.
    pub repaired_runs: usize,
    pub deleted_objects: usize,
}

impl VerifyReport {
    pub fn problem_count(&self) -> usize {
        self.corrupt.len() + self.bad_runs.len()
    }
}

/// Which records `gc` keeps.
#[derive(Debug, Clone)]
pub enum Keep {
    /// Every record; only objects no record refers to are deleted.
    All,
    /// The N most recent runs of each (pipeline, stage).
    LastN(usize),
    /// Runs that ended within this many seconds.
    NewerThan(f64),
    /// Only successful runs with these keys (the results a pipeline uses now).
    Keys(HashSet<String>),
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub runs_dropped: usize,
    pub objects_deleted: usize,
    pub bytes_freed: u64,
}

impl Cache {
    /// Re-hashes every object and checks every record; with `repair`, drops the records that
    /// depend on missing or corrupt objects (so their stages rerun) and deletes corrupt objects.
    /// A record depends on its own objects and on its input trees (the hashes in its key
    /// document's `inputs`): a record computed from a tree that is damaged now, or from the
    /// output of a record that is dropped, is dropped too, transitively, so that a rerun of
    /// its inputs cannot revive it. A damaged `cache.db` is an error
    /// ([`CacheError::is_damaged_db`]).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport> {
        let _lock = self.lock_exclusive()?;
        self.db().quick_check()?;
        let store = self.store();
        let objects = store.all_objects()?;
        let checked: Vec<(Hash, u64, bool)> = objects
            .par_iter()
            .map(|h| {
                let size = std::fs::metadata(store.object_path(h))
                    .map(|m| m.len())
                    .unwrap_or(0);
                let ok = store.verify_object(h).is_ok();
                (*h, size, ok)
            })
            .collect();
        let mut report = VerifyReport {
            objects: checked.len(),
            bytes: checked.iter().map(|c| c.1).sum(),
            corrupt: checked.iter().filter(|c| !c.2).map(|c| c.0).collect(),
            ..VerifyReport::default()
        };
        let corrupt: HashSet<Hash> = report.corrupt.iter().copied().collect();
        let present: HashSet<Hash> = objects.iter().copied().collect();
        let mut referenced: HashSet<Hash> = HashSet::new();
        for run in self.db().all_runs()? {
            let refs = match run_references(self, &run) {
                Ok(refs) => refs,
                Err(message) => {
                    report.problems.push(format!(
                        "run {} ({} / {}): {message}",
                        run.id, run.pipeline, run.stage
                    ));
                    report.bad_runs.push(run.id);
                    referenced.extend(run.output_tree.iter().chain(run.log_blob.iter()).copied());
                    continue;
                }
            };
            let broken: Vec<String> = refs
                .iter()
                .filter(|h| !present.contains(h) || corrupt.contains(h))
                .map(|h| {
                    let what = if present.contains(h) {
                        "corrupt"
                    } else {
                        "missing"
                    };
                    format!("object {} is {what}", h.short())
                })
                .collect();
            if !broken.is_empty() {
                report.problems.push(format!(
                    "run {} ({} / {}, key {}): {}",
                    run.id,
                    run.pipeline,
                    run.stage,
                    &run.key[..12.min(run.key.len())],
                    broken.join(", ")
                ));
                report.bad_runs.push(run.id);
            }
            referenced.extend(refs);
        }
        self.drop_dependents(&mut report, &present, &corrupt)?;
        report.unreferenced = objects.iter().filter(|h| !referenced.contains(h)).count();
        for h in &report.corrupt {
            if !referenced.contains(h) {
                report
                    .problems
                    .push(format!("object {} is corrupt (unreferenced)", h.short()));
            }
        }
        if repair {
            self.db().delete_runs(&report.bad_runs)?;
            report.repaired_runs = report.bad_runs.len();
            for h in &report.corrupt {
                store.remove_object(h)?;
                report.deleted_objects += 1;
            }
        }
        Ok(report)
    }

    /// Adds to `report.bad_runs` every record whose input trees include a damaged tree (one
    /// whose manifest or blobs are missing or corrupt) or the output tree of a bad record,
    /// until nothing changes.
    fn drop_dependents(
        &self,
        report: &mut VerifyReport,
        present: &HashSet<Hash>,
        corrupt: &HashSet<Hash>,
    ) -> Result<()> {
        let runs = self.db().all_runs()?;
        let inputs = self.db().run_inputs()?;
        let good = |h: &Hash| present.contains(h) && !corrupt.contains(h);
        let mut damaged: HashMap<Hash, bool> = HashMap::new();
        let mut is_damaged = |tree: &Hash| -> bool {
            *damaged.entry(*tree).or_insert_with(|| {
                !good(tree)
                    || match self.store().read_tree(tree) {
                        Ok(t) => t.entries.iter().any(|e| !good(&e.blob)),
                        Err(_) => true,
                    }
            })
        };
        let mut bad: HashSet<i64> = report.bad_runs.iter().copied().collect();
        let mut tainted: HashSet<Hash> = runs
            .iter()
            .filter(|r| bad.contains(&r.id))
            .filter_map(|r| r.output_tree)
            .collect();
        loop {
            let mut changed = false;
            for run in &runs {
                if bad.contains(&run.id) {
                    continue;
                }
                let Some(input) = inputs.get(&run.id).and_then(|trees| {
                    trees
                        .iter()
                        .find(|t| tainted.contains(t) || is_damaged(t))
                        .copied()
                }) else {
                    continue;
                };
                let why = if tainted.contains(&input) {
                    "the output of a dropped record"
                } else {
                    "missing or corrupt"
                };
                report.problems.push(format!(
                    "run {} ({} / {}): its input tree {} is {why}",
                    run.id,
                    run.pipeline,
                    run.stage,
                    input.short()
                ));
                report.bad_runs.push(run.id);
                bad.insert(run.id);
                tainted.extend(run.output_tree);
                changed = true;
            }
            if !changed {
                return Ok(());
            }
        }
    }

    /// Drops records not kept by `keep`, then deletes every object no remaining record
    /// refers to. Waits for running engine processes on this cache to finish first.
    pub fn gc(&self, keep: &Keep, dry_run: bool) -> Result<GcReport> {
        let lock = self.lock_exclusive()?;
        self.gc_locked(&lock, keep, dry_run)
    }

    /// [`Cache::gc`] under an exclusive lock the caller already holds (from
    /// [`Cache::lock_exclusive`]), so that what to keep can be decided under the same lock:
    /// a record written between deciding and collecting would otherwise be dropped.
    pub fn gc_locked(&self, _held: &CacheLock, keep: &Keep, dry_run: bool) -> Result<GcReport> {
        // No engine run is in progress: scratch named the old way (without its owner's pid
        // space) can only be a leftover now.
        if !dry_run {
            self.store().clean_stale_scratch(true)?;
        }
        let runs = self.db().all_runs()?;
        let now = crate::db::unix_now();
        let mut drop: Vec<i64> = Vec::new();
        match keep {
            Keep::All => {}
            Keep::LastN(n) => {
                let mut by_stage: BTreeMap<(&str, &str), Vec<&RunRef>> = BTreeMap::new();
                for r in &runs {
                    by_stage.entry((&r.pipeline, &r.stage)).or_default().push(r);
                }
                for list in by_stage.values_mut() {
                    list.sort_by(|a, b| b.ended_at.total_cmp(&a.ended_at).then(b.id.cmp(&a.id)));
                    drop.extend(list.iter().skip(*n).map(|r| r.id));
                }
            }
            Keep::NewerThan(secs) => {
                drop.extend(
                    runs.iter()
                        .filter(|r| now - r.ended_at > *secs)
                        .map(|r| r.id),
                );
            }
            Keep::Keys(keys) => {
                drop.extend(
                    runs.iter()
                        .filter(|r| !(r.ok && keys.contains(&r.key)))
                        .map(|r| r.id),
                );
            }
        }
        // A named experiment keeps the results it refers to until it is removed.
        let experiment_keys = self.db().experiment_keys()?;
        drop.retain(|id| {
            runs.iter()
                .find(|r| r.id == *id)
                .is_none_or(|r| !(r.ok && experiment_keys.contains(&r.key)))
        });
        let dropped: HashSet<i64> = drop.iter().copied().collect();
        let mut reachable: HashSet<Hash> = HashSet::new();
        for run in runs.iter().filter(|r| !dropped.contains(&r.id)) {
            // A record whose tree cannot be read keeps what it names directly.
            match run_references(self, run) {
                Ok(refs) => reachable.extend(refs),
                Err(_) => {
                    reachable.extend(run.output_tree.iter().chain(run.log_blob.iter()).copied())
                }
            }
        }
        // A kept record's input trees are kept with it, even when the records that produced
        // them go: `verify` drops a record whose input tree is missing, since it can no longer
        // tell what the record was computed from.
        let inputs = self.db().run_inputs()?;
        let mut input_trees: HashSet<Hash> = HashSet::new();
        for run in runs.iter().filter(|r| !dropped.contains(&r.id)) {
            input_trees.extend(inputs.get(&run.id).into_iter().flatten().copied());
        }
        for tree in input_trees {
            if reachable.insert(tree) {
                if let Ok(t) = self.store().read_tree(&tree) {
                    reachable.extend(t.entries.iter().map(|e| e.blob));
                }
            }
        }
        let mut report = GcReport {
            runs_dropped: drop.len(),
            ..GcReport::default()
        };
        let store = self.store();
        let doomed: Vec<Hash> = store
            .all_objects()?
            .into_iter()
            .filter(|h| !reachable.contains(h))
            .collect();
        for h in &doomed {
            report.bytes_freed += std::fs::metadata(store.object_path(h))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        report.objects_deleted = doomed.len();
        if !dry_run {
            // Records first: an object is only deleted once nothing refers to it.
            self.db().delete_runs(&drop)?;
            for h in &doomed {
                store.remove_object(h)?;
            }
        }
        Ok(report)
    }
}

/// Every object a run refers to: its log, its tree manifest and the tree's blobs.
fn run_references(cache: &Cache, run: &RunRef) -> std::result::Result<Vec<Hash>, String> {
    let mut refs: Vec<Hash> = run.log_blob.iter().copied().collect();
    if run.ok && run.output_tree.is_none() {
        return Err("a successful run without an output tree".into());
    }
    if let Some(tree) = run.output_tree {
        refs.push(tree);
        match cache.store().read_tree(&tree) {
            Ok(t) => refs.extend(t.entries.iter().map(|e| e.blob)),
            Err(CacheError::MissingObject(_)) => {}
            Err(e) => return Err(format!("its output tree cannot be read: {e}")),
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewRun, RunStatus};
    use std::os::unix::fs::PermissionsExt;

    fn record(cache: &Cache, key: &str, content: &[u8], ended: f64) -> Hash {
        let s = cache.store().scratch().unwrap();
        std::fs::write(s.path().join("f"), content).unwrap();
        let tree = cache.store().put_dir(s.path(), &[]).unwrap();
        cache
            .record(&NewRun {
                key: key.into(),
                pipeline: "p".into(),
                stage: "s".into(),
                op: "o".into(),
                op_version: 1,
                key_doc: serde_json::json!({}),
                output_tree: Some(tree),
                status: RunStatus::Ok,
                error: None,
                started_at: ended - 1.0,
                ended_at: ended,
                host: "h".into(),
                engine_version: "0".into(),
                log_blob: None,
                metrics: Default::default(),
            })
            .unwrap();
        crate::hash_bytes(content)
    }

    #[test]
    fn gc_keeps_what_a_named_experiment_refers_to() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let kept = record(&cache, "k1", b"kept", 1.0);
        let gone = record(&cache, "k2", b"gone", 2.0);
        cache
            .record_experiment(&crate::NewExperiment {
                pipeline: "p".into(),
                name: "e".into(),
                created_at: 3.0,
                meta: serde_json::json!({}),
                stages: vec![crate::ExperimentStage {
                    name: "s".into(),
                    stage: "s".into(),
                    key: Some("k1".into()),
                    status: "ran".into(),
                    matrix: serde_json::json!({}),
                    params: serde_json::json!({}),
                    duration_s: None,
                }],
            })
            .unwrap();
        let report = cache.gc(&Keep::Keys(HashSet::new()), false).unwrap();
        assert_eq!(report.runs_dropped, 1);
        assert!(cache.lookup("k1").unwrap().is_some());
        assert!(cache.lookup("k2").unwrap().is_none());
        assert!(cache.store().contains(&kept));
        assert!(!cache.store().contains(&gone));
        let table = cache.experiment_table("p").unwrap();
        assert_eq!(
            table.stages.values().next().unwrap()[0].1.as_deref(),
            Some("k1")
        );
        cache.remove_experiment("p", "e").unwrap();
        cache.gc(&Keep::Keys(HashSet::new()), false).unwrap();
        assert!(!cache.store().contains(&kept));
    }

    #[test]
    fn verify_finds_and_repairs_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let blob = record(&cache, "k1", b"hello", 1.0);
        record(&cache, "k2", b"other", 2.0);
        let clean = cache.verify(false).unwrap();
        assert_eq!(clean.problem_count(), 0, "{:?}", clean.problems);
        let p = cache.store().object_path(&blob);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&p, b"hellO").unwrap();
        let bad = cache.verify(false).unwrap();
        assert_eq!(bad.corrupt, vec![blob]);
        assert_eq!(bad.bad_runs.len(), 1);
        let fixed = cache.verify(true).unwrap();
        assert_eq!(fixed.repaired_runs, 1);
        assert!(cache.lookup("k1").unwrap().is_none());
        assert!(cache.lookup("k2").unwrap().is_some());
        assert_eq!(cache.verify(false).unwrap().problem_count(), 0);
    }

    /// Records computed from a damaged tree, or from the output of a dropped record, are
    /// dropped too, transitively; unrelated records stay.
    #[test]
    fn repair_drops_records_downstream_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let put = |content: &[u8]| {
            let s = cache.store().scratch().unwrap();
            std::fs::write(s.path().join("f"), content).unwrap();
            cache.store().put_dir(s.path(), &[]).unwrap()
        };
        let rec = |key: &str, tree: Hash, inputs: serde_json::Value| {
            cache
                .record(&NewRun {
                    stage: key.into(),
                    key_doc: serde_json::json!({"inputs": inputs, "params": {"label": "x"}}),
                    ..crate::tests::new_run(key, Some(tree))
                })
                .unwrap();
        };
        let (ta, tb, tc, tu) = (put(b"a"), put(b"b"), put(b"c"), put(b"u"));
        rec("a", ta, serde_json::json!({}));
        rec(
            "b",
            tb,
            serde_json::json!({"x": {"from": "a", "tree": ta.to_hex()}}),
        );
        rec(
            "c",
            tc,
            serde_json::json!({"m": [{"label": "k=1", "from": "b", "tree": tb.to_hex()}]}),
        );
        rec("u", tu, serde_json::json!({}));
        // A tree no record produces (its producer was collected), whose blob is then lost.
        let orphan = put(b"orphan");
        let to = put(b"from orphan");
        rec("o", to, serde_json::json!({"x": {"tree": orphan.to_hex()}}));
        assert_eq!(cache.verify(false).unwrap().problem_count(), 0);
        let blob_a = crate::hash_bytes(b"a");
        let p = cache.store().object_path(&blob_a);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&p, b"A").unwrap();
        cache
            .store()
            .remove_object(&crate::hash_bytes(b"orphan"))
            .unwrap();
        let report = cache.verify(true).unwrap();
        assert_eq!(report.repaired_runs, 4, "{:?}", report.problems);
        for key in ["a", "b", "c", "o"] {
            assert!(cache.lookup(key).unwrap().is_none(), "{key} kept");
        }
        assert!(cache.lookup("u").unwrap().is_some());
    }

    /// gc keeps the input trees of the records it keeps, so that verify stays clean after it.
    #[test]
    fn gc_keeps_the_inputs_of_kept_records() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        record(&cache, "up", b"upstream", 1.0);
        let up_tree = cache.lookup("up").unwrap().unwrap().output_tree.unwrap();
        let s = cache.store().scratch().unwrap();
        std::fs::write(s.path().join("f"), "downstream").unwrap();
        let tree = cache.store().put_dir(s.path(), &[]).unwrap();
        let mut run = cache.lookup("up").unwrap().unwrap().run;
        run.key = "down".into();
        run.stage = "down".into();
        run.ended_at = 2.0;
        run.output_tree = Some(tree);
        run.key_doc =
            serde_json::json!({"inputs": {"x": {"from": "up", "tree": up_tree.to_hex()}}});
        cache.record(&run).unwrap();
        let r = cache
            .gc(&Keep::NewerThan(crate::db::unix_now() - 1.5), false)
            .unwrap();
        assert_eq!(r.runs_dropped, 1);
        assert!(cache.lookup("up").unwrap().is_none());
        assert!(cache.store().contains(&up_tree));
        assert!(cache.store().contains(&crate::hash_bytes(b"upstream")));
        let v = cache.verify(false).unwrap();
        assert_eq!(v.problem_count(), 0, "{:?}", v.problems);
    }

    #[test]
    fn gc_keeps_what_it_should() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let old = record(&cache, "k1", b"old", 1.0);
        let new = record(&cache, "k2", b"new", 2.0);
        let orphan = cache.store().put_bytes(b"orphan").unwrap();
        let r = cache.gc(&Keep::All, false).unwrap();
        assert_eq!(r.objects_deleted, 1);
        assert!(!cache.store().contains(&orphan));
        let dry = cache.gc(&Keep::LastN(1), true).unwrap();
        assert_eq!(dry.runs_dropped, 1);
        assert!(cache.store().contains(&old));
        let r = cache.gc(&Keep::LastN(1), false).unwrap();
        assert_eq!(r.runs_dropped, 1);
        assert!(r.bytes_freed > 0);
        assert!(!cache.store().contains(&old));
        assert!(cache.store().contains(&new));
        assert!(cache.lookup("k1").unwrap().is_none());
        let keys: HashSet<String> = HashSet::new();
        cache.gc(&Keep::Keys(keys), false).unwrap();
        assert!(cache.store().all_objects().unwrap().is_empty());
    }
}
