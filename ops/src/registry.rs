//! The table of ops a pipeline can name.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{Op, ShellOp};

/// Ops by name. The engine owns one and resolves every stage's `op:` against it.
#[derive(Clone)]
pub struct Registry {
    ops: BTreeMap<&'static str, Arc<dyn Op>>,
}

impl Registry {
    /// An empty registry (tests register their own ops).
    pub fn empty() -> Self {
        Self {
            ops: BTreeMap::new(),
        }
    }

    /// Every built-in op.
    pub fn builtin() -> Self {
        let mut registry = Self::empty();
        registry.register(Arc::new(ShellOp));
        registry.register(Arc::new(crate::ml::SyntheticImagesOp));
        registry.register(Arc::new(crate::ml::Cifar10Op));
        registry.register(Arc::new(crate::ml::MnistOp));
        registry.register(Arc::new(crate::ml::ImportOp));
        registry.register(Arc::new(crate::ml::DigitsOp));
        registry.register(Arc::new(crate::ml::TrainOp));
        registry.register(Arc::new(crate::ml::LrProbeOp));
        registry.register(Arc::new(crate::ml::EvaluateOp));
        crate::pde::register(&mut registry);
        crate::arch::register(&mut registry);
        crate::nas::register(&mut registry);
        crate::oplearn::register(&mut registry);
        registry
    }

    pub fn register(&mut self, op: Arc<dyn Op>) {
        self.ops.insert(op.name(), op);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Op>> {
        self.ops.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ops.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Map, Value};

    use super::Registry;
    use crate::ParamDoc;

    /// A param name no op has.
    const PROBE: &str = "__no_such_param__";

    /// The fields serde says it accepts where `probe` sits: "unknown field `x`, expected one of
    /// `a`, `b`" (or "expected `a`"); `None` when the error is about something else.
    fn accepted_fields(op: &dyn crate::Op, probe: Value) -> Option<BTreeSet<String>> {
        let err = op.plan(&probe).err()?;
        let rest = err
            .message
            .strip_prefix(&format!("unknown field `{PROBE}`, "))?;
        if rest == "there are no fields" {
            return Some(BTreeSet::new());
        }
        Some(
            rest.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect(),
        )
    }

    /// Listed children of `prefix` (top level when empty) for one alternative (`when`).
    fn listed(rows: &[ParamDoc], prefix: &str, when: Option<&str>) -> BTreeSet<String> {
        rows.iter()
            .filter(|r| when.is_none() || r.when.is_none() || r.when.as_deref() == when)
            .filter_map(|r| r.path.strip_prefix(prefix))
            .filter(|rest| !rest.contains('.'))
            .map(String::from)
            .collect()
    }

    /// The tag values of the top-level alternatives (`algorithm: random`), as (field, value).
    fn alternatives(rows: &[ParamDoc]) -> Vec<Option<(String, String)>> {
        let mut alts: Vec<Option<(String, String)>> = rows
            .iter()
            .filter(|r| !r.path.contains('.'))
            .filter_map(|r| r.when.as_deref())
            .filter_map(|w| w.split_once(": "))
            .filter(|(field, _)| !field.contains('.'))
            .map(|(f, v)| Some((f.to_string(), v.to_string())))
            .collect();
        alts.dedup();
        if alts.is_empty() {
            alts.push(None);
        }
        alts
    }

    #[test]
    fn every_param_an_op_accepts_is_listed_and_documented() {
        let registry = Registry::builtin();
        for name in registry.names() {
            let op = registry.get(name).unwrap().as_ref();
            let rows = op.params_doc();
            for row in &rows {
                assert!(
                    !row.doc.is_empty(),
                    "op {name}: param `{}` has no doc",
                    row.path
                );
                assert!(
                    !row.kind.is_empty(),
                    "op {name}: param `{}` has no type",
                    row.path
                );
            }
            for alt in alternatives(&rows) {
                let mut probe = Map::new();
                let when = alt.as_ref().map(|(f, v)| format!("{f}: {v}"));
                if let Some((field, value)) = &alt {
                    probe.insert(field.clone(), Value::String(value.clone()));
                }
                probe.insert(PROBE.into(), json!(1));
                let accepted =
                    accepted_fields(op, Value::Object(probe.clone())).unwrap_or_else(|| {
                        panic!("op {name} ({when:?}): an unknown param is not refused as unknown")
                    });
                let shown = listed(&rows, "", when.as_deref());
                for field in &accepted {
                    assert!(
                        shown.contains(field),
                        "op {name}: `{field}` is accepted but not listed ({shown:?})"
                    );
                }
                // One level down: the fields of every listed struct param.
                for parent in &shown {
                    let prefix = format!("{parent}.");
                    let children = listed(&rows, &prefix, None);
                    if children.is_empty() {
                        continue;
                    }
                    let mut nested = probe.clone();
                    nested.remove(PROBE);
                    nested.insert(parent.clone(), json!({ PROBE: 1 }));
                    if let Some(accepted) = accepted_fields(op, Value::Object(nested)) {
                        for field in &accepted {
                            assert!(
                                children.contains(field),
                                "op {name}: `{prefix}{field}` is accepted but not listed"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ops_that_take_a_device_say_so_from_their_params() {
        let registry = Registry::builtin();
        let takes: Vec<&str> = registry
            .names()
            .filter(|n| registry.get(n).unwrap().takes_device())
            .collect();
        assert_eq!(takes, ["evaluate", "lr.probe", "train"]);
    }
}
