//! `${vars.x}` and `${matrix.k}` in string values.
//!
//! A string that is exactly one reference takes the referenced value with its type (a number
//! stays a number, a list a list); a reference inside a longer string is spliced in as text.
//! `${NAME}` without a dot is left alone for the shell, and `$${` is a literal `${`.
//!
//! What references produce is bounded: splicing a long var into a string many times, in many
//! stages and matrix points, multiplies a small file into gigabytes. One resolved string may
//! not pass [`MAX_RESOLVED_STRING`], and the strings and values that references produce over
//! the whole pipeline (load and every matrix point) may not pass [`MAX_EXPANDED_TOTAL`].

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value};

use super::{suggestion, SpecError};

/// The longest string that resolving references may produce (1 MiB).
pub const MAX_RESOLVED_STRING: usize = 1 << 20;
/// The most bytes of resolved strings and values over a whole pipeline (64 MiB).
pub const MAX_EXPANDED_TOTAL: usize = 64 << 20;

/// What references can see. `matrix: None` means "not resolved yet": `${matrix.*}` is kept.
pub struct Scope<'a> {
    pub vars: Option<&'a Map<String, Value>>,
    pub matrix: Option<&'a Map<String, Value>>,
    /// Shared by every resolution of one pipeline, on every thread.
    pub budget: &'a Budget,
}

/// Bytes produced by references so far, against [`MAX_EXPANDED_TOTAL`].
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicUsize,
}

impl Budget {
    /// A budget of which `used` bytes are already spent (by loading, before planning).
    pub fn starting_at(used: usize) -> Self {
        Self {
            used: AtomicUsize::new(used),
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn spend(&self, bytes: usize, field: &Field<'_>, reference: &str) -> Result<(), SpecError> {
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > MAX_EXPANDED_TOTAL {
            return Err(SpecError::new(
                field.to_string(),
                format!(
                    "resolving ${{{reference}}} here takes the text that ${{...}} references produce past {} MiB for the whole pipeline (the limit counts every resolved string of every stage and matrix point)",
                    MAX_EXPANDED_TOTAL >> 20
                ),
            )
            .fix("splice large values fewer times: keep them in a file listed under `deps:` and read it there, or shrink the matrix"));
        }
        Ok(())
    }
}

/// About the bytes of `v` as JSON text, without building the text.
fn size_of(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(_) => 5,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(|i| size_of(i) + 1).sum::<usize>() + 2,
        Value::Object(map) => {
            map.iter()
                .map(|(k, v)| k.len() + 4 + size_of(v))
                .sum::<usize>()
                + 2
        }
    }
}

/// Resolves every reference in `value` (strings at any depth); `path` names it in errors.
pub fn resolve(value: &Value, scope: &Scope<'_>, path: &str) -> Result<Value, SpecError> {
    resolve_at(value, scope, &Field::Root(path))
}

/// Where a value sits, built into a string only for an error (planning resolves every param
/// of every matrix point, and formatting each path up front was a large share of it).
enum Field<'a> {
    Root(&'a str),
    Key(&'a Field<'a>, &'a str),
    Index(&'a Field<'a>, usize),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Root(path) => f.write_str(path),
            Field::Key(parent, key) => write!(f, "{parent}.{key}"),
            Field::Index(parent, i) => write!(f, "{parent}.{i}"),
        }
    }
}

fn resolve_at(value: &Value, scope: &Scope<'_>, field: &Field<'_>) -> Result<Value, SpecError> {
    Ok(match value {
        Value::String(s) => resolve_str(s, scope, field)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| resolve_at(v, scope, &Field::Index(field, i)))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(resolve_map(map, scope, field)?),
        other => other.clone(),
    })
}

/// [`resolve`] of an object's entries, without wrapping it in a [`Value`] first.
pub fn resolve_object(
    map: &Map<String, Value>,
    scope: &Scope<'_>,
    path: &str,
) -> Result<Map<String, Value>, SpecError> {
    resolve_map(map, scope, &Field::Root(path))
}

fn resolve_map(
    map: &Map<String, Value>,
    scope: &Scope<'_>,
    field: &Field<'_>,
) -> Result<Map<String, Value>, SpecError> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), resolve_at(v, scope, &Field::Key(field, k))?)))
        .collect()
}

enum Piece<'s> {
    Text(&'s str),
    Ref(&'s str),
}

/// Splits a string into text and `${ref}` pieces (only refs containing a dot are ours).
fn pieces<'s>(s: &'s str, field: &Field<'_>) -> Result<Vec<Piece<'s>>, SpecError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if i > 0 && rest.as_bytes()[i - 1] == b'$' {
            // `$${` : keep both characters for now; the last pass unescapes.
            out.push(Piece::Text(&rest[..i + 2]));
            rest = &rest[i + 2..];
            continue;
        }
        let Some(end) = rest[i..].find('}') else {
            return Err(
                SpecError::new(field.to_string(), format!("unclosed '${{' in \"{s}\""))
                    .fix("close it with '}', or write '$${' for a literal '${'"),
            );
        };
        let inner = &rest[i + 2..i + end];
        out.push(Piece::Text(&rest[..i]));
        if inner.contains('.') {
            out.push(Piece::Ref(inner.trim()));
        } else {
            out.push(Piece::Text(&rest[i..i + end + 1]));
        }
        rest = &rest[i + end + 1..];
    }
    out.push(Piece::Text(rest));
    Ok(out)
}

fn resolve_str(s: &str, scope: &Scope<'_>, field: &Field<'_>) -> Result<Value, SpecError> {
    if !s.contains("${") {
        return Ok(Value::String(s.to_string()));
    }
    let parts = pieces(s, field)?;
    let final_pass = scope.matrix.is_some();
    let non_empty: Vec<&Piece> = parts
        .iter()
        .filter(|p| !matches!(p, Piece::Text(t) if t.is_empty()))
        .collect();
    if let [Piece::Ref(r)] = non_empty.as_slice() {
        if let Some(v) = lookup(r, scope, field)? {
            scope.budget.spend(size_of(&v), field, r)?;
            return Ok(v);
        }
    }
    let mut out = String::new();
    let mut first_resolved: Option<&str> = None;
    for piece in &parts {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Ref(r) => match lookup(r, scope, field)? {
                Some(v) => {
                    first_resolved.get_or_insert(r);
                    let text = render(&v);
                    if out.len() + text.len() > MAX_RESOLVED_STRING {
                        return Err(SpecError::new(
                            field.to_string(),
                            format!(
                                "splicing ${{{r}}} makes this string longer than {} MiB (the limit on one resolved string)",
                                MAX_RESOLVED_STRING >> 20
                            ),
                        )
                        .fix("keep large data in a file listed under `deps:` and read it there, instead of splicing it into text"));
                    }
                    out.push_str(&text);
                }
                None => {
                    out.push_str("${");
                    out.push_str(r);
                    out.push('}');
                }
            },
        }
    }
    // The whole string counts, not only what its references added: text spliced in while
    // loading is copied again into every matrix point that resolves `${matrix.*}` beside it.
    if let Some(r) = first_resolved {
        scope.budget.spend(out.len(), field, r)?;
    }
    if final_pass {
        out = out.replace("$${", "${");
    }
    Ok(Value::String(out))
}

/// Text form of a value spliced into a string.
pub fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `Ok(None)`: a reference this pass leaves for later (`${matrix.*}` before expansion).
fn lookup(
    reference: &str,
    scope: &Scope<'_>,
    field: &Field<'_>,
) -> Result<Option<Value>, SpecError> {
    let mut segments = reference.split('.');
    let namespace = segments.next().unwrap_or_default();
    let rest: Vec<&str> = segments.collect();
    let (root, what) = match namespace {
        "vars" => match scope.vars {
            Some(v) => (v, "var"),
            None => return Ok(None),
        },
        "matrix" => match scope.matrix {
            Some(m) => (m, "matrix variable"),
            None => return Ok(None),
        },
        other => {
            return Err(SpecError::new(
                field.to_string(),
                format!("unknown namespace '{other}' in ${{{reference}}}"),
            )
            .fix(format!(
                "use ${{vars.NAME}} or ${{matrix.NAME}} ({}); write $${{...}} for a literal",
                suggestion(other, ["vars", "matrix"])
            )))
        }
    };
    let mut current: Option<&Value> = None;
    for (i, seg) in rest.iter().enumerate() {
        let next = match current {
            None => root.get(*seg),
            Some(Value::Object(m)) => m.get(*seg),
            Some(Value::Array(a)) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            Some(_) => None,
        };
        match next {
            Some(v) => current = Some(v),
            None => {
                let fix = if i == 0 {
                    let known: Vec<&str> = root.keys().map(String::as_str).collect();
                    if namespace == "vars" {
                        format!(
                            "{}; define it under `vars:` or pass --set vars.{seg}=VALUE",
                            suggestion(seg, known.iter().copied())
                        )
                    } else if known.is_empty() {
                        "this stage has no `matrix:`".to_string()
                    } else {
                        suggestion(seg, known.iter().copied())
                    }
                } else {
                    format!("'{}' has no entry '{seg}'", rest[..i].join("."))
                };
                return Err(SpecError::new(
                    field.to_string(),
                    format!(
                        "${{{reference}}} does not resolve: no {what} '{}'",
                        rest[..=i].join(".")
                    ),
                )
                .fix(fix));
            }
        }
    }
    match current {
        Some(v) => Ok(Some(v.clone())),
        None => Err(SpecError::new(
            field.to_string(),
            format!("${{{reference}}} names no {what}"),
        )
        .fix(format!("write ${{{namespace}.NAME}}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Map<String, Value> {
        json!({"n": 3, "words": ["a", "b"], "m": {"w": 8}})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn typed_and_spliced() {
        let v = vars();
        let scope = Scope {
            vars: Some(&v),
            matrix: None,
            budget: &Budget::default(),
        };
        assert_eq!(resolve(&json!("${vars.n}"), &scope, "x").unwrap(), json!(3));
        assert_eq!(
            resolve(&json!("${vars.words}"), &scope, "x").unwrap(),
            json!(["a", "b"])
        );
        assert_eq!(
            resolve(&json!("n=${vars.n} w=${vars.m.w}"), &scope, "x").unwrap(),
            json!("n=3 w=8")
        );
        assert_eq!(
            resolve(&json!("${vars.words.1}"), &scope, "x").unwrap(),
            json!("b")
        );
        // matrix refs wait for the planner; shell vars and escapes are left alone
        assert_eq!(
            resolve(&json!("${matrix.p} ${HOME} $${vars.n}"), &scope, "x").unwrap(),
            json!("${matrix.p} ${HOME} $${vars.n}")
        );
    }

    #[test]
    fn final_pass_unescapes_and_resolves_matrix() {
        let v = vars();
        let m = json!({"p": 2}).as_object().unwrap().clone();
        let scope = Scope {
            vars: Some(&v),
            matrix: Some(&m),
            budget: &Budget::default(),
        };
        assert_eq!(
            resolve(&json!("${matrix.p}"), &scope, "x").unwrap(),
            json!(2)
        );
        assert_eq!(
            resolve(&json!("a $${vars.n}"), &scope, "x").unwrap(),
            json!("a ${vars.n}")
        );
    }

    #[test]
    fn unresolved_is_an_error_with_a_fix() {
        let v = vars();
        let scope = Scope {
            vars: Some(&v),
            matrix: None,
            budget: &Budget::default(),
        };
        let e = resolve(&json!("${vars.nn}"), &scope, "stages.a.params.cmd").unwrap_err();
        assert_eq!(e.field, "stages.a.params.cmd");
        assert!(e.fix.unwrap().contains("did you mean 'n'"));
        let e = resolve(&json!("${var.n}"), &scope, "x").unwrap_err();
        assert!(e.message.contains("unknown namespace"));
        assert!(resolve(&json!("${vars.n"), &scope, "x").is_err());
    }

    #[test]
    fn one_string_and_the_pipeline_are_bounded() {
        let v = json!({"big": "x".repeat(100_000)})
            .as_object()
            .unwrap()
            .clone();
        let budget = Budget::default();
        let scope = Scope {
            vars: Some(&v),
            matrix: None,
            budget: &budget,
        };
        // Ten splices fit in one string; eleven do not.
        assert!(resolve(&json!("${vars.big}".repeat(10)), &scope, "x").is_ok());
        let e = resolve(
            &json!("${vars.big}".repeat(11)),
            &scope,
            "stages.a.params.cmd",
        )
        .unwrap_err();
        assert_eq!(e.field, "stages.a.params.cmd");
        assert!(e.message.contains("1 MiB"), "{e}");
        // The total counts whole strings and whole values, across calls.
        let budget = Budget::starting_at(MAX_EXPANDED_TOTAL - 150_000);
        let scope = Scope {
            vars: Some(&v),
            matrix: None,
            budget: &budget,
        };
        assert!(resolve(&json!("a ${vars.big}"), &scope, "x").is_ok());
        let e = resolve(&json!("${vars.big}"), &scope, "stages.b.params.cmd").unwrap_err();
        assert_eq!(e.field, "stages.b.params.cmd");
        assert!(e.message.contains("64 MiB"), "{e}");
        assert!(e.fix.unwrap().contains("deps:"));
        // Strings without references cost nothing.
        let budget = Budget::default();
        let scope = Scope {
            vars: Some(&v),
            matrix: None,
            budget: &budget,
        };
        resolve(&json!("plain text ${HOME}"), &scope, "x").unwrap();
        assert_eq!(budget.used(), 0);
    }
}
