//! Computing stage keys against the cache: deps hashing, input trees, and explaining why a
//! stage is stale by diffing its key document with the closest recorded run.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use cache::{Cache, Hash, RunRecord};
use serde_json::Value;

use crate::key::{
    direct_stage_key, key_doc, stage_key, write_input_item, write_input_one, write_name, InputTrees,
};
use crate::plan::{InputSources, Plan};
use crate::spec::SpecError;

/// Content hashes of `deps` paths, computed once per path per run.
pub struct DepHashes {
    known: HashMap<String, Hash>,
}

impl DepHashes {
    /// Hashes every dep no stage produces, in one parallel batch. A missing dep is bad input.
    pub fn for_static_deps(plan: &Plan, cache: &Cache) -> Result<Self, SpecError> {
        let mut paths: Vec<String> = Vec::new();
        let mut fields: HashMap<String, String> = HashMap::new();
        for node in &plan.nodes {
            if !node.dep_producers.is_empty() {
                continue;
            }
            for (i, d) in node.deps.iter().enumerate() {
                if !fields.contains_key(d) {
                    fields.insert(d.clone(), format!("stages.{}.params.deps.{i}", node.stage));
                    paths.push(d.clone());
                }
            }
        }
        // Refuse a missing dep before hashing anything: bad input must leave the cache
        // (and its stat cache) untouched.
        for path in &paths {
            if let Err(e) = std::fs::metadata(plan.pipeline.workspace.join(path)) {
                return Err(plan.pipeline.locate(
                    SpecError::new(
                        fields[path].clone(),
                        format!("dep '{path}' cannot be read: {e}"),
                    )
                    .fix(
                        "create the file, fix the path, or produce it with another stage's `outs:`",
                    ),
                ));
            }
        }
        let mut hashes = Self {
            known: HashMap::new(),
        };
        let results = hashes.hash(plan, cache, &paths);
        for (path, result) in paths.iter().zip(results) {
            if let Err(message) = result {
                return Err(plan.pipeline.locate(
                    SpecError::new(fields[path].clone(), message).fix(
                        "create the file, fix the path, or produce it with another stage's `outs:`",
                    ),
                ));
            }
        }
        Ok(hashes)
    }

    fn hash(&mut self, plan: &Plan, cache: &Cache, paths: &[String]) -> Vec<Result<Hash, String>> {
        let absolute: Vec<PathBuf> = paths
            .iter()
            .map(|p| plan.pipeline.workspace.join(p))
            .collect();
        let results = cache.hash_paths(&absolute);
        paths
            .iter()
            .zip(results)
            .map(|(p, r)| match r {
                Ok(h) => {
                    self.known.insert(p.clone(), h);
                    Ok(h)
                }
                Err(e) => Err(format!("dep '{p}' cannot be read: {}", root_cause(&e))),
            })
            .collect()
    }

    /// Hashes of `node`'s deps; deps produced by other stages are (re)hashed now, after their
    /// producers finished.
    pub fn for_node(
        &mut self,
        plan: &Plan,
        cache: &Cache,
        node: usize,
    ) -> Result<BTreeMap<String, Hash>, String> {
        let n = &plan.nodes[node];
        if !n.dep_producers.is_empty() {
            let fresh = self.hash(plan, cache, &n.deps);
            for r in fresh {
                r?;
            }
        }
        n.deps
            .iter()
            .map(|d| {
                self.known
                    .get(d)
                    .map(|h| (d.clone(), *h))
                    .ok_or_else(|| format!("dep '{d}' was not hashed"))
            })
            .collect()
    }
}

fn root_cause(e: &cache::CacheError) -> String {
    match e {
        cache::CacheError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// The key of `node`, given the output trees of finished nodes; `None` when an upstream
/// result is not known yet. Equal to the [`stage_key`] of [`node_doc`], written directly.
pub fn node_key(
    plan: &Plan,
    node: usize,
    trees: &[Option<Hash>],
    deps: &BTreeMap<String, Hash>,
) -> Option<String> {
    let n = &plan.nodes[node];
    if n.dep_producers.iter().any(|&u| trees[u].is_none()) {
        return None;
    }
    let mut inputs: Vec<&crate::plan::NodeInput> = n.inputs.iter().collect();
    inputs.sort_by(|a, b| a.name.cmp(&b.name));
    let key = direct_stage_key(n, deps, |out| {
        out.push('{');
        for (k, input) in inputs.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            write_name(&input.name, out);
            match &input.sources {
                InputSources::One(i) => write_input_one(&trees[*i]?, out),
                InputSources::Many(list) => {
                    out.push('[');
                    for (j, &i) in list.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        let label = &plan.nodes[i].label;
                        write_input_item(label, &trees[i]?, out);
                    }
                    out.push(']');
                }
            }
        }
        out.push('}');
        Some(())
    })?;
    debug_assert_eq!(
        Some(&key),
        node_doc(plan, node, trees, deps)
            .map(|d| stage_key(&d))
            .as_ref(),
        "the direct key of {} differs from its document's",
        n.name
    );
    Some(key)
}

/// The key document of `node` (everything its key covers, plus upstream stage names), given
/// the output trees of finished nodes; `None` when an upstream result is not known yet.
pub fn node_doc(
    plan: &Plan,
    node: usize,
    trees: &[Option<Hash>],
    deps: &BTreeMap<String, Hash>,
) -> Option<Value> {
    let n = &plan.nodes[node];
    let mut inputs = BTreeMap::new();
    for input in &n.inputs {
        let trees = match &input.sources {
            InputSources::One(i) => InputTrees::One {
                from: plan.nodes[*i].name.clone(),
                tree: trees[*i]?,
            },
            InputSources::Many(list) => InputTrees::Many(
                list.iter()
                    .map(|&i| {
                        Some((
                            plan.nodes[i].label.clone(),
                            plan.nodes[i].name.clone(),
                            trees[i]?,
                        ))
                    })
                    .collect::<Option<_>>()?,
            ),
        };
        inputs.insert(input.name.clone(), trees);
    }
    if n.upstream().iter().any(|&u| trees[u].is_none()) {
        return None;
    }
    Some(key_doc(n, &inputs, deps))
}

/// A key document with the inputs left out, for explaining a stage whose upstream is stale.
pub fn partial_doc(plan: &Plan, node: usize, deps: &BTreeMap<String, Hash>) -> Value {
    let mut doc = key_doc(&plan.nodes[node], &BTreeMap::new(), deps);
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("inputs");
    }
    doc
}

/// The recent run of the same stage whose key document differs least from `current`.
pub fn closest_run<'a>(current: &Value, runs: &'a [RunRecord]) -> Option<&'a RunRecord> {
    runs.iter().min_by_key(|r| explain(current, Some(r)).len())
}

/// What differs between the current key document and a recorded run's, in words. A current
/// document without `inputs` (upstream not known yet) compares everything else.
pub fn explain(current: &Value, previous: Option<&RunRecord>) -> Vec<String> {
    let Some(previous) = previous else {
        return vec!["never run".to_string()];
    };
    let old = &previous.key_doc;
    let mut reasons = Vec::new();
    let field = |doc: &Value, k: &str| doc.get(k).cloned().unwrap_or(Value::Null);
    for k in ["key_schema", "op", "op_version", "seed"] {
        let (a, b) = (field(old, k), field(current, k));
        if a != b && current.get(k).is_some() {
            reasons.push(format!(
                "{}: {} -> {}",
                k.replace('_', " "),
                short(&a),
                short(&b)
            ));
        }
    }
    let mut old_params = BTreeMap::new();
    let mut new_params = BTreeMap::new();
    flatten("", &field(old, "params"), &mut old_params);
    flatten("", &field(current, "params"), &mut new_params);
    diff_maps(&old_params, &new_params, &mut reasons, "param");
    let old_deps = field(old, "deps");
    let new_deps = field(current, "deps");
    let names: std::collections::BTreeSet<&String> = old_deps
        .as_object()
        .into_iter()
        .chain(new_deps.as_object())
        .flat_map(|m| m.keys())
        .collect();
    for name in names {
        match (old_deps.get(name), new_deps.get(name)) {
            (Some(a), Some(b)) if a != b => reasons.push(format!(
                "deps file {name} changed: {} -> {}",
                short_hash(a),
                short_hash(b)
            )),
            (None, Some(_)) => reasons.push(format!("deps file {name} added")),
            (Some(_), None) => reasons.push(format!("deps file {name} removed")),
            _ => {}
        }
    }
    if let Some(new_inputs) = current.get("inputs").and_then(Value::as_object) {
        let old_inputs = old
            .get("inputs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for (name, now) in new_inputs {
            match old_inputs.get(name) {
                None => reasons.push(format!("input '{name}' added")),
                Some(before) if strip(before) != strip(now) => {
                    reasons.push(describe_input_change(name, before, now))
                }
                _ => {}
            }
        }
        for name in old_inputs.keys() {
            if !new_inputs.contains_key(name) {
                reasons.push(format!("input '{name}' removed"));
            }
        }
    }
    reasons
}

fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "from")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
        other => other.clone(),
    }
}

fn describe_input_change(name: &str, before: &Value, now: &Value) -> String {
    match (before, now) {
        (Value::Object(_), Value::Object(_)) => format!(
            "input '{name}' changed: {} -> {} (output of '{}')",
            short_hash(&before["tree"]),
            short_hash(&now["tree"]),
            now["from"].as_str().unwrap_or("?")
        ),
        (Value::Array(a), Value::Array(b)) => {
            let changed: Vec<String> = b
                .iter()
                .filter(|item| !a.iter().any(|old| strip(old) == strip(item)))
                .map(|item| item["from"].as_str().unwrap_or("?").to_string())
                .collect();
            if a.len() != b.len() {
                format!("input '{name}' now has {} items (was {})", b.len(), a.len())
            } else {
                format!(
                    "input '{name}' changed: new output of {}",
                    changed.join(", ")
                )
            }
        }
        _ => format!("input '{name}' changed shape"),
    }
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

fn diff_maps(
    old: &BTreeMap<String, Value>,
    new: &BTreeMap<String, Value>,
    reasons: &mut Vec<String>,
    what: &str,
) {
    for (k, b) in new {
        match old.get(k) {
            None => reasons.push(format!("{what} {k} added: {}", short(b))),
            Some(a) if crate::key::canonical_json(a) != crate::key::canonical_json(b) => {
                reasons.push(format!("{what} {k}: {} -> {}", short(a), short(b)))
            }
            _ => {}
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            reasons.push(format!("{what} {k} removed"));
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn short_hash(v: &Value) -> String {
    v.as_str()
        .map(|s| s.chars().take(12).collect())
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{build, PlanOptions};
    use crate::spec::Pipeline;

    /// The key written directly equals the hash of the key document, for single and many
    /// inputs, labels that need escaping, deps, seeds and params whose keys need sorting.
    #[test]
    fn direct_keys_equal_the_documents_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.txt"), "x").unwrap();
        let text = r#"
name: keys
stages:
  m:
    op: shell
    matrix: {a: ["q\"uote", "back\\slash", "tab\there", 1.5]}
    deps: [d.txt]
    seed: 7
    cmd: "echo ${matrix.a} > $ENGINE_OUT/o"
  all:
    op: shell
    inputs: {zeta: "m[*]", alpha: "m[a=1.5]"}
    env: {ZED: "1", ALPHA: "two words"}
    cmd: "true"
"#;
        let pipeline = Pipeline::from_str(text, &dir.path().join("p.yaml"), &[]).unwrap();
        let plan = build(pipeline, &ops::Registry::builtin(), &PlanOptions::default()).unwrap();
        let trees: Vec<Option<Hash>> = (0..plan.nodes.len())
            .map(|i| Some(cache::hash_bytes(format!("tree {i}").as_bytes())))
            .collect();
        let deps = BTreeMap::from([("d.txt".to_string(), cache::hash_bytes(b"x"))]);
        for i in 0..plan.nodes.len() {
            let key = node_key(&plan, i, &trees, &deps).unwrap();
            let doc = node_doc(&plan, i, &trees, &deps).unwrap();
            assert_eq!(key, stage_key(&doc), "{}", plan.nodes[i].name);
        }
        let mut missing = trees.clone();
        missing[0] = None;
        let last = plan.nodes.len() - 1;
        assert_eq!(node_key(&plan, last, &missing, &deps), None);
        assert_eq!(node_doc(&plan, last, &missing, &deps), None);
    }
}
