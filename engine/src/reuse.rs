//! Finding recorded results for the scheduler: what is ready at once is keyed (on all cores
//! from [`PARALLEL_KEYS`] stages), looked up and its objects checked as one batch; an intact
//! result is reused by restoring its workspace `outs`. Decides nothing about what runs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use cache::{Cache, Hash, Tree};
use ops::Metrics;

use crate::error::ExecError;
use crate::node_keys::{node_key, DepHashes};
use crate::plan::Plan;
use crate::worker::WORKSPACE_PREFIX;

/// What the in-order pass of the scheduler needs of a ready stage.
pub struct Prepared {
    /// The hashes of the stage's deps, or why they could not be hashed.
    pub deps: Result<BTreeMap<String, Hash>, String>,
    /// The key (`None` while an upstream result is unknown, or without deps).
    pub key: Option<String>,
    /// The recorded result for the key, if the stage may reuse one and one exists.
    pub found: Option<Found>,
}

/// A recorded result and the outcome of checking its objects.
pub struct Found {
    tree: Hash,
    metrics: Metrics,
    check: Result<(), Vec<Hash>>,
}

/// What a recorded result turned out to be.
pub enum Reused {
    /// Its objects are intact and its workspace `outs` restored: its tree and metrics.
    Intact(Hash, Metrics),
    /// An object it names is missing or corrupt (the first such object).
    Damaged(Option<Hash>),
}

/// From this many stages a batch is keyed on all cores (below, waking the pool costs more).
const PARALLEL_KEYS: usize = 32;

/// Whether node `i` may reuse a recorded result (`cache: true` and not forced).
pub fn may_reuse(plan: &Plan, force: &[usize], i: usize) -> bool {
    plan.nodes[i].cache && !force.contains(&i)
}

/// Keys `batch` (ready stages, in plan order), then looks up and checks the recorded results
/// of those that may reuse one, all in one pass.
pub fn prepare(
    plan: &Plan,
    cache: &Cache,
    batch: &[usize],
    trees: &[Option<Hash>],
    deps: &mut DepHashes,
    force: &[usize],
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
        .map(|(&i, key)| key.as_deref().filter(|_| may_reuse(plan, force, i)))
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
pub fn find(cache: &Cache, keys: &[Option<&str>]) -> Result<Vec<Option<Found>>, ExecError> {
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

/// Reuses `found` for node `i` if its objects are intact, restoring the node's workspace
/// `outs`.
pub fn reuse_found(
    plan: &Plan,
    cache: &Cache,
    i: usize,
    found: Found,
) -> Result<Reused, ExecError> {
    if let Err(bad) = found.check {
        return Ok(Reused::Damaged(bad.first().copied()));
    }
    if !plan.nodes[i].outs.is_empty() {
        let tree = cache.store().read_tree(&found.tree)?;
        restore_outs(plan, cache, &tree)?;
    }
    Ok(Reused::Intact(found.tree, found.metrics))
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
