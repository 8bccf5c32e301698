//! Stage keys: blake3 over a canonical encoding of everything a result depends on.
//!
//! The key covers the op name and version, the params (keys sorted, numbers normalised so
//! `1`, `1.0` and `1e0` agree), the *content* hash of every input (so an upstream rerun that
//! produces the same bytes changes nothing downstream: early cutoff), the content hashes of
//! `deps` files and the seed. It never covers scheduling (`resources`, `retries`, `timeout`)
//! or names of upstream stages (renaming a stage reuses its results).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cache::Hash;
use serde_json::{json, Map, Value};

use crate::plan::Node;

/// What one input resolved to, for the key document.
pub enum InputTrees {
    One { from: String, tree: Hash },
    Many(Vec<(String, String, Hash)>),
}

/// Bumped if the key encoding itself changes (invalidates every cached result).
const KEY_SCHEMA: u32 = 1;

/// The key document: everything that goes into the key, plus the upstream stage names (which
/// do not) so `why` can say where a changed input came from.
pub fn key_doc(
    node: &Node,
    inputs: &BTreeMap<String, InputTrees>,
    deps: &BTreeMap<String, Hash>,
) -> Value {
    let mut ins = Map::new();
    for (name, trees) in inputs {
        let v = match trees {
            InputTrees::One { from, tree } => json!({"from": from, "tree": tree.to_hex()}),
            InputTrees::Many(items) => Value::Array(
                items
                    .iter()
                    .map(|(label, from, tree)| json!({"label": label, "from": from, "tree": tree.to_hex()}))
                    .collect(),
            ),
        };
        ins.insert(name.clone(), v);
    }
    let deps: Map<String, Value> = deps
        .iter()
        .map(|(p, h)| (p.clone(), Value::String(h.to_hex())))
        .collect();
    json!({
        "key_schema": KEY_SCHEMA,
        "op": node.op.name(),
        "op_version": node.op.version(),
        "params": node.params,
        "inputs": ins,
        "deps": deps,
        "seed": node.seed,
    })
}

/// The key of a key document: upstream stage names are left out.
pub fn stage_key(doc: &Value) -> String {
    let mut material = doc.clone();
    if let Some(Value::Object(inputs)) = material.get_mut("inputs") {
        for v in inputs.values_mut() {
            strip_from(v);
        }
    }
    blake3::hash(canonical_json(&material).as_bytes())
        .to_hex()
        .to_string()
}

fn strip_from(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("from");
        }
        Value::Array(items) => items.iter_mut().for_each(strip_from),
        _ => {}
    }
}

/// JSON with object keys sorted and numbers in one form: integral values (within 2^53) as
/// integers, other values by Rust's shortest round-trip float formatting.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&canonical_number(n)),
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&map[*k], out);
            }
            out.push('}');
        }
    }
}

fn canonical_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        return format!("{}", f as i64);
    }
    let mut s = String::new();
    let _ = write!(s, "{f:e}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numbers_and_key_order_are_normalised() {
        let a: Value = serde_json::from_str(r#"{"b": 1.0, "a": [1e-3, 2]}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": [0.001, 2.0], "b": 1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        let c: Value = serde_json::from_str(r#"{"a": [0.001, 2.5], "b": 1}"#).unwrap();
        assert_ne!(canonical_json(&a), canonical_json(&c));
    }

    #[test]
    fn upstream_names_do_not_change_the_key() {
        let d1 = json!({"inputs": {"x": {"from": "a", "tree": "00"}}, "params": {}});
        let d2 = json!({"inputs": {"x": {"from": "renamed", "tree": "00"}}, "params": {}});
        let d3 = json!({"inputs": {"x": {"from": "a", "tree": "01"}}, "params": {}});
        assert_eq!(stage_key(&d1), stage_key(&d2));
        assert_ne!(stage_key(&d1), stage_key(&d3));
    }

    proptest! {
        #[test]
        fn canonical_form_is_valid_json_and_stable(x in any::<f64>().prop_filter("finite", |x| x.is_finite()), s in ".*") {
            let v = json!({"s": s, "x": x, "n": [x, 1]});
            let text = canonical_json(&v);
            let parsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(canonical_json(&parsed), text);
        }
    }
}
