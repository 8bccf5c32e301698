//! The key document and the stage key: blake3 over a canonical encoding of everything a
//! result depends on.
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

/// The key of `node`, byte for byte the [`stage_key`] of its [`key_doc`], written without
/// building the document (a cache hit needs only the key). `deps` are the node's dep hashes;
/// `inputs` writes the inputs object in the stripped form of [`write_inputs`], names sorted,
/// with [`write_input_one`] and [`write_input_item`], or returns `None` to give up.
pub fn direct_stage_key(
    node: &Node,
    deps: &BTreeMap<String, Hash>,
    inputs: impl FnOnce(&mut String) -> Option<()>,
) -> Option<String> {
    let mut out = String::with_capacity(256);
    // The top-level keys in sorted order, as `write_object` writes them.
    out.push_str("{\"deps\":{");
    for (i, (path, hash)) in deps.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(path, &mut out);
        out.push(':');
        write_hex(hash, &mut out);
    }
    out.push_str("},\"inputs\":");
    inputs(&mut out)?;
    let _ = write!(out, ",\"key_schema\":{KEY_SCHEMA},\"op\":");
    write_string(node.op.name(), &mut out);
    let _ = write!(out, ",\"op_version\":{},\"params\":", node.op.version());
    write_canonical(&node.params, &mut out);
    let _ = write!(out, ",\"seed\":{}}}", node.seed);
    Some(blake3::hash(out.as_bytes()).to_hex().to_string())
}

/// A single-source input in the key: `{"tree":"<hex>"}`.
pub fn write_input_one(tree: &Hash, out: &mut String) {
    out.push_str("{\"tree\":");
    write_hex(tree, out);
    out.push('}');
}

/// One source of a many-source input in the key: `{"label":"k=v","tree":"<hex>"}`.
pub fn write_input_item(label: &str, tree: &Hash, out: &mut String) {
    out.push_str("{\"label\":");
    write_string(label, out);
    out.push_str(",\"tree\":");
    write_hex(tree, out);
    out.push('}');
}

/// A JSON name for an object key: `"name":`.
pub fn write_name(name: &str, out: &mut String) {
    write_string(name, out);
    out.push(':');
}

fn write_hex(hash: &Hash, out: &mut String) {
    out.push('"');
    out.push_str(&blake3::Hash::from_bytes(*hash.as_bytes()).to_hex());
    out.push('"');
}

/// The key of a key document: upstream stage names are left out.
pub fn stage_key(doc: &Value) -> String {
    let mut out = String::with_capacity(512);
    match doc {
        Value::Object(map) => write_object(
            map,
            &mut out,
            |_| true,
            |k, v, out| {
                if k == "inputs" {
                    write_inputs(v, out)
                } else {
                    write_canonical(v, out)
                }
            },
        ),
        other => write_canonical(other, &mut out),
    }
    blake3::hash(out.as_bytes()).to_hex().to_string()
}

/// `inputs` without the `from` (upstream stage name) fields: `{name: {from, tree}}` or
/// `{name: [{label, from, tree}, ...]}`.
fn write_inputs(v: &Value, out: &mut String) {
    fn strip(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                write_object(m, out, |k| k != "from", |_, v, out| write_canonical(v, out))
            }
            Value::Array(items) => write_array(items, out, strip),
            other => write_canonical(other, out),
        }
    }
    match v {
        Value::Object(m) => write_object(m, out, |_| true, |_, v, out| strip(v, out)),
        other => write_canonical(other, out),
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
        Value::String(s) => write_string(s, out),
        Value::Array(items) => write_array(items, out, write_canonical),
        Value::Object(map) => write_object(map, out, |_| true, |_, v, out| write_canonical(v, out)),
    }
}

fn write_array(items: &[Value], out: &mut String, item: impl Fn(&Value, &mut String)) {
    out.push('[');
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        item(v, out);
    }
    out.push(']');
}

/// An object with its keys sorted, the keys `include` accepts, values written by `value`.
fn write_object(
    map: &Map<String, Value>,
    out: &mut String,
    include: impl Fn(&str) -> bool,
    value: impl Fn(&str, &Value, &mut String),
) {
    let mut keys: Vec<&String> = map.keys().filter(|k| include(k)).collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(k, out);
        out.push(':');
        value(k, &map[*k], out);
    }
    out.push('}');
}

/// A JSON string literal, escaped exactly as serde_json escapes it.
fn write_string(s: &str, out: &mut String) {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(&Value::String(s.to_string()).to_string());
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
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

    /// The key is the hash of the canonical document with every input's `from` removed;
    /// `stage_key` writes that without building the stripped copy.
    #[test]
    fn stage_key_is_the_hash_of_the_stripped_document() {
        fn reference(doc: &Value) -> String {
            let mut d = doc.clone();
            if let Some(Value::Object(inputs)) = d.get_mut("inputs") {
                for v in inputs.values_mut() {
                    match v {
                        Value::Object(m) => {
                            m.remove("from");
                        }
                        Value::Array(items) => items.iter_mut().for_each(|i| {
                            if let Value::Object(m) = i {
                                m.remove("from");
                            }
                        }),
                        _ => {}
                    }
                }
            }
            blake3::hash(canonical_json(&d).as_bytes())
                .to_hex()
                .to_string()
        }
        let docs = [
            json!({"op": "shell", "params": {"cmd": "echo \"q\" \\ \n\u{1}", "z": [1.5, -0.0, 1e300]},
                   "inputs": {"b": {"from": "x", "tree": "00"},
                              "a": [{"label": "k=1", "from": "y", "tree": "01"}, {"from": "z", "tree": "02"}]},
                   "deps": {"from": "kept: not an input"}, "seed": null}),
            json!({"inputs": {}, "params": {"from": 1}}),
            json!([1, {"b": 2, "a": "é"}]),
        ];
        for d in &docs {
            assert_eq!(stage_key(d), reference(d), "{d}");
        }
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
