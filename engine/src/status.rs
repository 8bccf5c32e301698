//! Cached or stale, with reasons, for every stage instance: what `status`, `why`, `show`,
//! `run --dry-run` and `report` show. Runs nothing and changes nothing.

use cache::Cache;

use crate::error::ExecError;
use crate::node_keys::{node_doc, node_key, partial_doc, DepHashes};
use crate::plan::Plan;
use crate::staleness::{closest_run, explain, RECENT_RUNS};

/// Cached or stale, with reasons, for every node; runs nothing.
pub struct NodeStatus {
    /// Key and end time of the run the reasons compare against.
    pub compared_with: Option<(String, f64)>,
    pub cached: bool,
    pub never_run: bool,
    /// The latest attempt at this very key failed: when it ended, and its error.
    pub failed: Option<(f64, String)>,
    pub key: Option<String>,
    pub reasons: Vec<String>,
}

/// Keys every node in order and looks each up, without running or modifying anything.
pub fn stage_statuses(
    plan: &Plan,
    cache: &Cache,
    force: &[usize],
) -> Result<Vec<NodeStatus>, ExecError> {
    let _reads = cache.read_batch();
    let mut deps = DepHashes::for_static_deps(plan, cache)?;
    let mut trees: Vec<Option<cache::Hash>> = vec![None; plan.nodes.len()];
    let mut out: Vec<NodeStatus> = Vec::with_capacity(plan.nodes.len());
    for (i, node) in plan.nodes.iter().enumerate() {
        let node_deps = match deps.for_node(plan, cache, i) {
            Ok(d) => d,
            Err(message) => {
                // A dep another stage produces and that does not exist yet.
                out.push(NodeStatus {
                    compared_with: None,
                    cached: false,
                    never_run: false,
                    failed: None,
                    key: None,
                    reasons: vec![message],
                });
                continue;
            }
        };
        // Earlier runs are read only for stages that are not cache hits (a hit needs no
        // explanation, and reading 20 full records per stage dominated a cached status).
        let recent = || cache.recent_runs(&plan.pipeline.name, &node.name, RECENT_RUNS);
        let status = match node_key(plan, i, &trees, &node_deps) {
            Some(key) => {
                let hit = cache
                    .lookup_hit(&key)?
                    .and_then(|h| h.output_tree)
                    .filter(|t| cache.tree_is_complete(t));
                let usable = hit.is_some() && node.cache && !force.contains(&i);
                let recent = if usable { Vec::new() } else { recent()? };
                // Only what is not reused needs its document (known whenever the key is; the
                // partial document is only a fallback).
                let doc = (!usable).then(|| {
                    node_doc(plan, i, &trees, &node_deps)
                        .unwrap_or_else(|| partial_doc(plan, i, &node_deps))
                });
                let previous = doc.as_ref().and_then(|doc| closest_run(doc, &recent));
                if force.contains(&i) {
                    NodeStatus {
                        compared_with: None,
                        cached: false,
                        never_run: previous.is_none(),
                        failed: None,
                        key: Some(key),
                        reasons: vec!["--force".into()],
                    }
                } else if !node.cache {
                    NodeStatus {
                        compared_with: None,
                        cached: false,
                        never_run: previous.is_none(),
                        failed: None,
                        key: Some(key),
                        reasons: vec!["cache: false".into()],
                    }
                } else if let Some(tree) = hit {
                    trees[i] = Some(tree);
                    NodeStatus {
                        compared_with: None,
                        cached: true,
                        never_run: false,
                        failed: None,
                        key: Some(key),
                        reasons: Vec::new(),
                    }
                } else {
                    let mut reasons = doc
                        .as_ref()
                        .map(|doc| explain(doc, previous))
                        .unwrap_or_default();
                    if reasons.is_empty() {
                        reasons.push(
                            "the recorded result's objects are missing from the store".into(),
                        );
                    }
                    NodeStatus {
                        compared_with: previous.map(|p| (p.key.clone(), p.ended_at)),
                        cached: false,
                        never_run: previous.is_none(),
                        failed: None,
                        key: Some(key),
                        reasons,
                    }
                }
            }
            None => {
                let stale_up: Vec<&str> = node
                    .upstream()
                    .into_iter()
                    .filter(|&u| trees[u].is_none())
                    .map(|u| plan.nodes[u].name.as_str())
                    .collect();
                let partial = partial_doc(plan, i, &node_deps);
                let recent = recent()?;
                let previous = closest_run(&partial, &recent);
                let mut reasons = explain(&partial, previous);
                reasons.retain(|r| r != "never run");
                reasons.push(format!(
                    "upstream {} will run first; this stage reruns only if its output changes",
                    stale_up.join(", ")
                ));
                if previous.is_none() {
                    reasons.insert(0, "never run".into());
                }
                NodeStatus {
                    compared_with: previous.map(|p| (p.key.clone(), p.ended_at)),
                    cached: false,
                    never_run: previous.is_none(),
                    failed: None,
                    key: None,
                    reasons,
                }
            }
        };
        out.push(status);
    }
    // A stage whose latest attempt at its current key failed says so, not "never run".
    for (node, status) in plan.nodes.iter().zip(out.iter_mut()) {
        let Some(key) = status.key.as_deref().filter(|_| !status.cached) else {
            continue;
        };
        if let Some(last) = cache.latest_attempt(&plan.pipeline.name, &node.name)? {
            if last.status == cache::RunStatus::Failed && last.key == key {
                let error = last.error.clone().unwrap_or_default();
                let first = error.lines().next().unwrap_or("").trim().to_string();
                status.reasons.retain(|r| r != "never run");
                status.reasons.insert(
                    0,
                    format!(
                        "{first} (attempt of {})",
                        crate::experiments::format_time(last.ended_at)
                    ),
                );
                status.failed = Some((last.ended_at, first));
            }
        }
    }
    Ok(out)
}

pub fn status_word(s: &NodeStatus) -> &'static str {
    if s.cached {
        "cached"
    } else if s.failed.is_some() {
        "failed"
    } else if s.never_run {
        "never run"
    } else {
        "stale"
    }
}
