//! Property: after any set of param edits on any DAG, exactly the stages whose key changed
//! rerun: the edited stages, plus descendants whose inputs' *content* changed (early cutoff).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use engine::exec::{self, RunOptions, StageStatus};
use engine::plan::{self, PlanOptions};
use engine::progress::Silent;
use engine::spec::Pipeline;
use ops::{OpError, Outputs, ParamError, Registry, RunContext, TypedOp};
use proptest::prelude::*;
use serde::Deserialize;

/// Writes `value / 2` followed by its inputs' outputs, so values 4 and 5 give equal bytes.
struct Emit;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct EmitParams {
    /// The number halved into `out.txt`.
    value: u32,
}

impl TypedOp for Emit {
    const NAME: &'static str = "emit";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "test op";
    type Params = EmitParams;
    type Config = EmitParams;

    fn resolve(p: EmitParams) -> Result<EmitParams, ParamError> {
        Ok(p)
    }
    fn run(
        &self,
        p: &EmitParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let mut text = format!("{}", p.value / 2);
        for (name, input) in ctx.inputs {
            for path in input.paths() {
                let upstream = std::fs::read_to_string(path.join("out.txt"))
                    .map_err(|e| OpError::io(format!("input {name}"), e))?;
                text.push_str(&format!("|{name}:{upstream}"));
            }
        }
        std::fs::write(out.path("out.txt"), text).map_err(|e| OpError::io("write", e))
    }
}

fn pipeline_text(values: &[u32], edges: &[Vec<usize>]) -> String {
    let mut text = String::from("name: prop\nstages:\n");
    for (i, v) in values.iter().enumerate() {
        text.push_str(&format!("  s{i}:\n    op: emit\n    value: {v}\n"));
        if !edges[i].is_empty() {
            text.push_str("    inputs:\n");
            for u in &edges[i] {
                text.push_str(&format!("      in{u}: s{u}\n"));
            }
        }
    }
    text
}

/// Runs the pipeline; returns the names of stages that ran.
fn run(dir: &std::path::Path, cache: &Arc<cache::Cache>, text: &str) -> Vec<String> {
    let file = dir.join("p.yaml");
    std::fs::write(&file, text).unwrap();
    let pipeline = Pipeline::load(&file, &[]).unwrap();
    let mut registry = Registry::empty();
    registry.register(Arc::new(Emit));
    let plan = plan::build(pipeline, &registry, &PlanOptions::default()).unwrap();
    let options = RunOptions {
        jobs: 2,
        keep_going: false,
        force: Vec::new(),
    };
    let summary = exec::run(&plan, cache, &options, &AtomicBool::new(false), &mut Silent).unwrap();
    assert_eq!(summary.count(StageStatus::Failed), 0);
    let mut ran: Vec<String> = summary
        .reports
        .iter()
        .filter(|r| r.status == StageStatus::Ran)
        .map(|r| plan.nodes[r.node].name.clone())
        .collect();
    ran.sort();
    ran
}

/// The model: a stage's output is a function of its value/2 and its inputs' outputs.
fn outputs(values: &[u32], edges: &[Vec<usize>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let mut text = format!("{}", v / 2);
        let mut ins: BTreeMap<String, usize> = BTreeMap::new();
        for u in &edges[i] {
            ins.insert(format!("in{u}"), *u);
        }
        for (name, u) in ins {
            text.push_str(&format!("|{name}:{}", out[u]));
        }
        out.push(text);
    }
    out
}

fn dag() -> impl Strategy<Value = (Vec<u32>, Vec<Vec<usize>>, Vec<Option<u32>>)> {
    (2usize..8).prop_flat_map(|n| {
        let values = proptest::collection::vec(0u32..6, n);
        let edges = (0..n)
            .map(|i| {
                proptest::collection::btree_set(0..i.max(1), 0..=i.min(3))
                    .prop_map(move |s| s.into_iter().filter(|&u| u < i).collect::<Vec<_>>())
            })
            .collect::<Vec<_>>();
        let edits = proptest::collection::vec(proptest::option::weighted(0.3, 0u32..6), n);
        (values, edges, edits)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn rerun_set_is_edited_plus_changed_descendants((values, edges, edits) in dag()) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(cache::Cache::open(&dir.path().join(".engine")).unwrap());
        let first = run(dir.path(), &cache, &pipeline_text(&values, &edges));
        let initial = outputs(&values, &edges);
        let distinct: std::collections::HashSet<_> = (0..values.len())
            .map(|i| {
                let ins: Vec<String> = edges[i].iter().map(|&u| format!("{u}:{}", initial[u])).collect();
                (values[i], ins)
            })
            .collect();
        prop_assert_eq!(first.len(), distinct.len());

        let edited: Vec<u32> = values.iter().zip(&edits).map(|(v, e)| e.unwrap_or(*v)).collect();
        let ran = run(dir.path(), &cache, &pipeline_text(&edited, &edges));

        // A stage runs iff its key (value, inputs' content) was never computed before, by
        // any stage: identical work is shared, in a run and across runs.
        let before = outputs(&values, &edges);
        let after = outputs(&edited, &edges);
        let key = |vals: &[u32], outs: &[String], i: usize| {
            let ins: Vec<String> = edges[i].iter().map(|&u| format!("{u}:{}", outs[u])).collect();
            (vals[i], ins)
        };
        let mut seen: std::collections::HashSet<_> =
            (0..values.len()).map(|i| key(&values, &before, i)).collect();
        let mut expected: Vec<String> = Vec::new();
        for i in 0..values.len() {
            if seen.insert(key(&edited, &after, i)) {
                expected.push(format!("s{i}"));
            }
        }
        expected.sort();
        prop_assert_eq!(&ran, &expected);

        // Descendant closure bounds the rerun set.
        let mut closure: Vec<bool> = (0..values.len()).map(|i| values[i] != edited[i]).collect();
        for i in 0..values.len() {
            if edges[i].iter().any(|&u| closure[u]) {
                closure[i] = true;
            }
        }
        for name in &ran {
            let i: usize = name[1..].parse().unwrap();
            prop_assert!(closure[i]);
        }

        // A third run with no edits runs nothing.
        let again = run(dir.path(), &cache, &pipeline_text(&edited, &edges));
        prop_assert!(again.is_empty());
    }
}
