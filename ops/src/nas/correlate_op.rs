//! The `indicators.correlate` op: Kendall tau-b between each indicator (and the rank-sum
//! combination, `../shared/papers/training-free-nas.md` §3) and trained accuracy.
//!
//! Inputs: `search`, one `search` result (its `search.json` trajectory); `runs`, a list input of
//! `train` results (`stage[*]`). Contract for each run item: its matrix label holds the cell
//! under `arch_key` (default `arch`; an arch string or digits, e.g. `arch=3_33_133,seed=0`); its
//! folder holds `metrics.json` (flat name -> number) or else `history.json`, whose last record is
//! used; `metric` (default `val_accuracy`) names the accuracy. Runs of the same cell are
//! averaged; a cell absent from the trajectory is an error. Output `correlate.json`; metrics
//! `tau_<indicator>`, `tau_rank_sum` (tau of minus the rank sum, so positive means agreement),
//! `num_archs`.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::indicators::Indicator;
use super::rank::rank_sums;
use super::space::Arch;
use crate::arch::stats::kendall_tau_b;
use crate::{fail, read_json, Input, Label, OpError, Outputs, ParamError, RunContext, TypedOp};

pub const CORRELATE_FILE: &str = "correlate.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelateParams {
    /// The accuracy each run reports (in its `metrics.json`, else its last `history.json` row).
    pub metric: String,
    /// The matrix key of the `runs` items that holds the cell (arch string or digits).
    pub arch_key: String,
}

impl Default for CorrelateParams {
    fn default() -> Self {
        Self {
            metric: "val_accuracy".into(),
            arch_key: "arch".into(),
        }
    }
}

pub struct CorrelateOp;

fn read_accuracy(dir: &Path, metric: &str) -> Result<Option<f64>, OpError> {
    let record = match read_json(&dir.join("metrics.json"))? {
        Some(v) => v,
        None => match read_json(&dir.join("history.json"))? {
            Some(Value::Array(rows)) => rows.last().cloned().unwrap_or(Value::Null),
            _ => {
                return Err(fail(format!(
                    "{}: no metrics.json and no history.json list; is this a `train` result?",
                    dir.display()
                )))
            }
        },
    };
    match record.get(metric) {
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            Some(_) => Ok(None),
            None => Err(fail(format!(
                "{}: `{metric}` is not a number",
                dir.display()
            ))),
        },
        None => Err(fail(format!(
            "{}: no `{metric}` in the run's metrics; set `metric:`",
            dir.display()
        ))),
    }
}

impl TypedOp for CorrelateOp {
    const NAME: &'static str = "indicators.correlate";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Kendall tau of each training-free indicator and their rank-sum with trained accuracy";
    type Params = CorrelateParams;
    type Config = CorrelateParams;

    fn resolve(p: CorrelateParams) -> Result<CorrelateParams, ParamError> {
        Ok(p)
    }
    fn required_inputs(_: &CorrelateParams) -> Vec<String> {
        vec!["search".into(), "runs".into()]
    }

    fn run(
        &self,
        p: &CorrelateParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let search_dir = ctx.one_input("search")?;
        let path = search_dir.join(super::SEARCH_FILE);
        let search = read_json(&path)?.ok_or_else(|| {
            fail(format!(
                "{} is missing; is `search` a search stage?",
                path.display()
            ))
        })?;
        let names: Vec<String> = search["indicators"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let indicators: Vec<Indicator> = names
            .iter()
            .map(|n| serde_json::from_value(Value::String(n.clone())))
            .collect::<Result<_, _>>()
            .map_err(|e| fail(format!("{}: unknown indicator: {e}", path.display())))?;
        // digits -> values, from the trajectory's single cells.
        let mut scored: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
        for entry in search["trajectory"].as_array().into_iter().flatten() {
            if let Some(d) = entry["digits"].as_str() {
                let vals = names.iter().map(|n| entry["values"][n].as_f64()).collect();
                scored.insert(d.to_string(), vals);
            }
        }
        let items = match ctx.input("runs")? {
            Input::Many { items, .. } => items.clone(),
            Input::One(d) => vec![(String::new(), d.clone())],
        };
        let mut acc: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut excluded = Vec::new();
        for (label, dir) in &items {
            let label_pairs = Label::parse(label);
            let raw = label_pairs.get(&p.arch_key).ok_or_else(|| {
                fail(format!(
                    "run {label:?} has no matrix key `{}`; the train stage's matrix must name the cell",
                    p.arch_key
                ))
            })?;
            let arch = Arch::parse(&p.arch_key, raw)?;
            if !scored.contains_key(&arch.digits()) {
                return Err(fail(format!(
                    "run {label:?}: cell {} was not scored by the search",
                    arch.digits()
                )));
            }
            match read_accuracy(dir, &p.metric)? {
                Some(a) => acc.entry(arch.digits()).or_default().push(a),
                None => excluded.push(label.clone()),
            }
        }
        let cells: Vec<String> = acc.keys().cloned().collect();
        let accuracy: Vec<f64> = acc
            .values()
            .map(|v| v.iter().sum::<f64>() / v.len() as f64)
            .collect();
        let table: Vec<Vec<Option<f64>>> = cells.iter().map(|c| scored[c].clone()).collect();
        let mut taus = serde_json::Map::new();
        for (j, n) in names.iter().enumerate() {
            let (x, y): (Vec<f64>, Vec<f64>) = table
                .iter()
                .zip(&accuracy)
                .filter_map(|(r, a)| r[j].map(|v| (v, *a)))
                .unzip();
            let tau = kendall_tau_b(&x, &y);
            if let Some(t) = tau {
                out.metric(format!("tau_{n}"), t);
            }
            taus.insert(n.clone(), json!({ "tau": tau, "n": x.len() }));
        }
        // Failed cells rank worst in the rank sum (§3), so they stay in the combination.
        let neg_sums: Vec<f64> = rank_sums(&table, &indicators).iter().map(|s| -s).collect();
        let combined = kendall_tau_b(&neg_sums, &accuracy);
        if let Some(t) = combined {
            out.metric("tau_rank_sum", t);
        }
        out.metric("num_archs", cells.len() as f64);
        let rows: Vec<Value> = cells
            .iter()
            .zip(&accuracy)
            .zip(&neg_sums)
            .map(|((c, a), s)| json!({ "digits": c, "accuracy": a, "rank_sum": -s, "values": scored[c] }))
            .collect();
        let result = json!({
            "metric": p.metric,
            "indicators": names,
            "tau": taus,
            "tau_rank_sum": { "tau": combined, "n": cells.len(), "of": "minus the rank sum" },
            "excluded_runs": excluded,
            "rows": rows,
        });
        out.write_json(CORRELATE_FILE, &result)
    }
}
