//! The keys of a plan's nodes: deps hashed once per run, upstream output trees put into each
//! node's key document (`node_doc`) or written straight into its key (`node_key`, the same
//! bytes without the document). The encoding itself is `key_doc`'s.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use cache::{Cache, Hash};
use serde_json::Value;

use crate::key_doc::{
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
