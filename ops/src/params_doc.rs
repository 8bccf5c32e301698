//! Param documentation generated from the types that parse params.
//!
//! Every op's `Params` derives `serde::Deserialize` (which parses) and `schemars::JsonSchema`
//! (which describes the same fields, defaults, doc comments and enum alternatives, because
//! schemars reads the same `#[serde]` attributes). [`of`] walks that schema into one flat row
//! per param path, which `engine ops NAME` prints and the README's op reference is made from.
//! So a param cannot be accepted without being listed, and the listing cannot drift.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::ParamError;

/// One param of an op: `path` is dotted from the params root (`model.width`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDoc {
    pub path: String,
    /// `integer`, `number | "arch_aware"`, `list of string`, `"sgd" | "adam"` ...
    pub kind: String,
    /// The value used when the param is left out; `None` when it is required (or has no
    /// default to show, `required` says which).
    pub default: Option<Value>,
    pub required: bool,
    /// The field's doc comment, first paragraph.
    pub doc: String,
    /// Set for fields of one alternative of a tagged param (`algorithm: evolution`).
    pub when: Option<String>,
}

/// The rows of every param of `P`, in declaration order, nested structs flattened into dotted
/// paths and each alternative of a tagged enum listed with `when` naming its tag value.
pub fn of<P: JsonSchema>() -> Vec<ParamDoc> {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<P>();
    let root = schema.as_value();
    let defs = root.get("$defs").and_then(Value::as_object).cloned();
    let walker = Walker {
        defs: defs.unwrap_or_default(),
    };
    let mut rows = Vec::new();
    walker.object(root, "", None, &mut rows);
    rows
}

struct Walker {
    defs: Map<String, Value>,
}

impl Walker {
    /// `schema` with a `$ref` followed to its definition.
    fn deref<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => r
                .rsplit('/')
                .next()
                .and_then(|name| self.defs.get(name))
                .map_or(schema, |d| self.deref(d)),
            None => schema,
        }
    }

    /// Rows for the properties of an object schema (or of each alternative of a tagged enum).
    fn object(&self, schema: &Value, prefix: &str, when: Option<&str>, rows: &mut Vec<ParamDoc>) {
        let schema = self.deref(schema);
        if let Some(alternatives) = alternatives(schema) {
            let tagged: Vec<(String, String, &Value)> = alternatives
                .iter()
                .filter_map(|alt| {
                    let alt = self.deref(alt);
                    tag_of(alt).map(|(field, value)| (field, value, alt))
                })
                .collect();
            if tagged.len() == alternatives.len() && !tagged.is_empty() {
                for (field, value, alt) in tagged {
                    let when = format!("{prefix}{field}: {value}");
                    self.properties(alt, prefix, Some(&when), Some(&field), rows);
                }
                return;
            }
        }
        self.properties(schema, prefix, when, None, rows);
    }

    fn properties(
        &self,
        schema: &Value,
        prefix: &str,
        when: Option<&str>,
        skip: Option<&str>,
        rows: &mut Vec<ParamDoc>,
    ) {
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, prop) in props {
            if Some(name.as_str()) == skip {
                continue;
            }
            let path = format!("{prefix}{name}");
            let target = self.deref(prop);
            let doc = description(prop).or_else(|| description(target));
            rows.push(ParamDoc {
                path: path.clone(),
                kind: self.kind(prop),
                default: prop.get("default").filter(|d| !d.is_null()).cloned(),
                required: required.contains(&name.as_str()),
                doc: doc.unwrap_or_default(),
                when: when.map(String::from),
            });
            if self.is_struct(prop) {
                self.object(self.nullable_inner(prop), &format!("{path}."), when, rows);
            }
        }
    }

    /// An object with named fields (or a tagged enum of such), worth listing field by field.
    fn is_struct(&self, schema: &Value) -> bool {
        let schema = self.nullable_inner(schema);
        if schema.get("properties").is_some() {
            return true;
        }
        alternatives(schema)
            .is_some_and(|alts| alts.iter().all(|a| tag_of(self.deref(a)).is_some()))
    }

    /// For `Option<T>` (`anyOf: [T, null]`), `T`; otherwise the schema itself.
    fn nullable_inner<'a>(&'a self, schema: &'a Value) -> &'a Value {
        let schema = self.deref(schema);
        if let Some(alts) = alternatives(schema) {
            let non_null: Vec<&Value> = alts.iter().filter(|a| !is_null(self.deref(a))).collect();
            if non_null.len() == 1 && alts.len() == 2 {
                return self.deref(non_null[0]);
            }
        }
        schema
    }

    /// The type in words.
    fn kind(&self, schema: &Value) -> String {
        let schema = self.deref(schema);
        if let Some(c) = schema.get("const") {
            return c.to_string();
        }
        if let Some(values) = schema.get("enum").and_then(Value::as_array) {
            return values
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" | ");
        }
        if let Some(alts) = alternatives(schema) {
            if alts.iter().all(|a| tag_of(self.deref(a)).is_some()) {
                let (field, _) = tag_of(self.deref(&alts[0])).unwrap_or_default();
                let values: Vec<String> = alts
                    .iter()
                    .filter_map(|a| tag_of(self.deref(a)).map(|(_, v)| format!("{field}: {v}")))
                    .collect();
                return format!("one of {{{}}}", values.join(", "));
            }
            let mut parts: Vec<String> = Vec::new();
            let mut optional = false;
            for alt in alts {
                if is_null(self.deref(alt)) {
                    optional = true;
                } else {
                    parts.push(self.kind(alt));
                }
            }
            let joined = parts.join(" | ");
            return if optional {
                format!("{joined} (optional)")
            } else {
                joined
            };
        }
        match schema.get("type") {
            Some(Value::String(t)) => self.simple_kind(t, schema),
            Some(Value::Array(types)) => {
                let mut optional = false;
                let mut parts = Vec::new();
                for t in types.iter().filter_map(Value::as_str) {
                    if t == "null" {
                        optional = true;
                    } else {
                        parts.push(self.simple_kind(t, schema));
                    }
                }
                let joined = parts.join(" | ");
                if optional {
                    format!("{joined} (optional)")
                } else {
                    joined
                }
            }
            _ => "any".into(),
        }
    }

    fn simple_kind(&self, t: &str, schema: &Value) -> String {
        match t {
            "array" => match schema.get("items").or_else(|| schema.get("prefixItems")) {
                Some(Value::Array(items)) => {
                    let parts: Vec<String> = items.iter().map(|i| self.kind(i)).collect();
                    format!("[{}]", parts.join(", "))
                }
                Some(items) => format!("list of {}", grouped(self.kind(items))),
                None => "list".into(),
            },
            "object" => match schema.get("additionalProperties") {
                Some(v @ Value::Object(_)) => format!("map of {}", grouped(self.kind(v))),
                _ if schema.get("properties").is_some() => "object".into(),
                _ => "map".into(),
            },
            "integer" => match schema.get("minimum").and_then(Value::as_u64) {
                Some(min) if min > 0 => format!("integer >= {min}"),
                _ => "integer".into(),
            },
            other => other.to_string(),
        }
    }
}

/// A kind with alternatives in parentheses, so `list of (a | b)` does not read as `(list of a) | b`.
fn grouped(kind: String) -> String {
    if kind.contains(" | ") {
        format!("({kind})")
    } else {
        kind
    }
}

fn alternatives(schema: &Value) -> Option<&Vec<Value>> {
    schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)
}

fn is_null(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("null")
}

/// The (field, value) of an internally tagged enum variant: a required property whose schema
/// is a single string constant.
fn tag_of(schema: &Value) -> Option<(String, String)> {
    let props = schema.get("properties")?.as_object()?;
    let required = schema.get("required")?.as_array()?;
    required.iter().filter_map(Value::as_str).find_map(|name| {
        let p = props.get(name)?;
        let value = p.get("const").or_else(|| {
            p.get("enum")
                .and_then(Value::as_array)
                .filter(|e| e.len() == 1)?
                .first()
        })?;
        Some((name.to_string(), value.as_str()?.to_string()))
    })
}

/// The first paragraph of a schema's doc comment (schemars splits a leading paragraph into
/// `title`; both are joined back so the row reads as the comment does).
fn description(schema: &Value) -> Option<String> {
    let title = schema.get("title").and_then(Value::as_str);
    let description = schema.get("description").and_then(Value::as_str);
    let text = match (title, description) {
        (Some(t), Some(d)) => format!("{t} {d}"),
        (Some(t), None) => t.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => return None,
    };
    let first = text.split("\n\n").next().unwrap_or("").replace('\n', " ");
    let first = first.trim();
    (!first.is_empty()).then(|| first.to_string())
}

/// A count that must be at least 1 (`epochs`, `batch_size`, `samples` ...): a zero is refused
/// while parsing, naming the field, so no op checks it by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Count(pub usize);

impl Count {
    pub fn get(self) -> usize {
        self.0
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match usize::deserialize(deserializer)? {
            0 => Err(serde::de::Error::custom("must be at least 1")),
            n => Ok(Count(n)),
        }
    }
}

impl JsonSchema for Count {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Count".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "integer", "minimum": 1})
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A param without a default, refused in serde's own words when it is left out. Params types
/// take every default from one `Default` impl (container `#[serde(default)]`, so the defaults
/// are listed by `engine ops`); the few params that must be given are `Option`s checked here.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, ParamError> {
    value.ok_or_else(|| ParamError::new("", format!("missing field `{field}`")))
}

/// The params of one op as aligned text for a terminal (`engine ops NAME`).
pub fn text(rows: &[ParamDoc]) -> String {
    let width = rows.iter().map(|r| r.path.len()).max().unwrap_or(0).min(32);
    let mut out = String::new();
    for row in rows {
        let default = match (&row.default, row.required) {
            (Some(v), _) => format!("default {v}"),
            (None, true) => "required".into(),
            (None, false) => "optional".into(),
        };
        out.push_str(&format!(
            "  {:<width$}  {}; {}\n",
            row.path, row.kind, default
        ));
        if let Some(when) = &row.when {
            out.push_str(&format!("  {:<width$}    with `{when}`\n", ""));
        }
        if !row.doc.is_empty() {
            out.push_str(&format!("  {:<width$}    {}\n", "", row.doc));
        }
    }
    out
}

/// The params table of one op as Markdown (`engine ops NAME --markdown`, the README reference).
pub fn markdown(rows: &[ParamDoc]) -> String {
    let mut text = String::from("| param | type | default | description |\n|---|---|---|---|\n");
    for row in rows {
        let default = match (&row.default, row.required) {
            (Some(v), _) => format!("`{v}`"),
            (None, true) => "required".into(),
            (None, false) => "-".into(),
        };
        let when = row
            .when
            .as_deref()
            .map(|w| format!(" (with `{w}`)"))
            .unwrap_or_default();
        text.push_str(&format!(
            "| `{}` | {} | {} | {}{} |\n",
            row.path,
            row.kind.replace('|', "\\|"),
            default.replace('|', "\\|"),
            row.doc.replace('|', "\\|"),
            when
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// How the test model is trained.
    #[derive(Debug, Deserialize, Serialize, JsonSchema, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        /// Passes over the data.
        epochs: Option<Count>,
        /// The optimiser.
        optimizer: Opt,
        /// Learning rate, or `arch_aware`.
        lr: Lr,
    }

    #[derive(Debug, Deserialize, Serialize, JsonSchema)]
    #[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
    enum Opt {
        /// Stochastic gradient descent.
        Sgd {
            /// Heavy-ball momentum.
            momentum: f64,
        },
        Adam {
            /// First-moment decay.
            beta1: f64,
        },
    }

    impl Default for Opt {
        fn default() -> Self {
            Opt::Sgd { momentum: 0.9 }
        }
    }

    #[derive(Debug, Deserialize, Serialize, JsonSchema)]
    #[serde(untagged)]
    enum Lr {
        Fixed(f64),
        Named(Named),
    }

    #[derive(Debug, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum Named {
        ArchAware,
    }

    impl Default for Lr {
        fn default() -> Self {
            Lr::Fixed(0.1)
        }
    }

    #[test]
    fn rows_carry_types_defaults_docs_and_alternatives() {
        let rows = of::<Demo>();
        let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "epochs",
                "optimizer",
                "optimizer.momentum",
                "optimizer.beta1",
                "lr"
            ]
        );
        assert_eq!(rows[0].kind, "integer >= 1 (optional)");
        assert_eq!(rows[0].doc, "Passes over the data.");
        assert_eq!(rows[1].kind, "one of {kind: sgd, kind: adam}");
        assert_eq!(
            rows[1].default,
            Some(serde_json::json!({"kind": "sgd", "momentum": 0.9}))
        );
        assert_eq!(rows[2].when.as_deref(), Some("optimizer.kind: sgd"));
        assert_eq!(rows[3].when.as_deref(), Some("optimizer.kind: adam"));
        assert_eq!(rows[4].kind, "number | \"arch_aware\"");
        assert_eq!(rows[4].default, Some(serde_json::json!(0.1)));
        assert!(markdown(&rows).contains("| `epochs` | integer >= 1 (optional) |"));
    }

    #[test]
    fn a_zero_count_is_refused_with_the_field_named() {
        let err = crate::parse_params::<Demo>(&serde_json::json!({"epochs": 0})).unwrap_err();
        assert_eq!(
            (err.path.as_str(), err.message.as_str()),
            ("epochs", "must be at least 1")
        );
    }
}
