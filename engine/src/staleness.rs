//! Why a stage is stale: its key document diffed, field by field, with the closest of the
//! stage's recent recorded runs. What `why`, `status` and `run` print as reasons.

use std::collections::BTreeMap;

use cache::RunRecord;
use serde_json::Value;

use crate::key_doc::canonical_json;

/// How many recent runs of a stage are compared to find the closest one when explaining.
pub const RECENT_RUNS: usize = 20;

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
            Some(a) if canonical_json(a) != canonical_json(b) => {
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
