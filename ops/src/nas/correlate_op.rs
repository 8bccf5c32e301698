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

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::indicators::Indicator;
use super::rank::rank_sums;
use super::space::Arch;
use crate::arch::stats::kendall_tau_b;
use crate::{parse_params, Input, Op, OpError, ParamError, RunContext};

pub const CORRELATE_FILE: &str = "correlate.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelateParams {
    #[serde(default = "d_metric")]
    pub metric: String,
    #[serde(default = "d_key")]
    pub arch_key: String,
}

fn d_metric() -> String {
    "val_accuracy".into()
}
fn d_key() -> String {
    "arch".into()
}

pub struct CorrelateOp;

fn fail(m: String) -> OpError {
    OpError::Failed(m)
}

fn read_json(path: &Path) -> Result<Option<Value>, OpError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| fail(format!("{} is not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OpError::io(format!("cannot read {}", path.display()), e)),
    }
}

/// The value of `key` in a matrix label `k=v,k=v` (values may contain commas: a segment
/// without `name=` continues the previous value).
fn label_value(label: &str, key: &str) -> Option<String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for seg in label.split(',') {
        match seg.split_once('=') {
            Some((k, v))
                if !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) =>
            {
                pairs.push((k.to_string(), v.to_string()))
            }
            _ => {
                if let Some(last) = pairs.last_mut() {
                    last.1.push(',');
                    last.1.push_str(seg);
                }
            }
        }
    }
    pairs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

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

impl Op for CorrelateOp {
    fn name(&self) -> &'static str {
        "indicators.correlate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Kendall tau of each training-free indicator and their rank-sum with trained accuracy"
    }
    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        parse_params::<CorrelateParams>(params).map(|_| ())
    }
    fn required_inputs(&self, _params: &Value) -> Vec<String> {
        vec!["search".into(), "runs".into()]
    }

    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let p: CorrelateParams = parse_params(ctx.params)?;
        let search_dir = match ctx.input("search")? {
            Input::One(d) => d.clone(),
            Input::Many { .. } => {
                return Err(fail("input `search` must be one search result".into()))
            }
        };
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
            let raw = label_value(label, &p.arch_key).ok_or_else(|| {
                fail(format!(
                    "run {label:?} has no matrix key `{}`; the train stage's matrix must name the cell",
                    p.arch_key
                ))
            })?;
            let arch = Arch::parse(&p.arch_key, &raw).map_err(|e| fail(e.to_string()))?;
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
                ctx.metrics.insert(format!("tau_{n}"), t);
            }
            taus.insert(n.clone(), json!({ "tau": tau, "n": x.len() }));
        }
        // Failed cells rank worst in the rank sum (§3), so they stay in the combination.
        let neg_sums: Vec<f64> = rank_sums(&table, &indicators).iter().map(|s| -s).collect();
        let combined = kendall_tau_b(&neg_sums, &accuracy);
        if let Some(t) = combined {
            ctx.metrics.insert("tau_rank_sum".into(), t);
        }
        ctx.metrics.insert("num_archs".into(), cells.len() as f64);
        let rows: Vec<Value> = cells
            .iter()
            .zip(&accuracy)
            .zip(&neg_sums)
            .map(|((c, a), s)| json!({ "digits": c, "accuracy": a, "rank_sum": -s, "values": scored[c] }))
            .collect();
        let out = json!({
            "metric": p.metric,
            "indicators": names,
            "tau": taus,
            "tau_rank_sum": { "tau": combined, "n": cells.len(), "of": "minus the rank sum" },
            "excluded_runs": excluded,
            "rows": rows,
        });
        let path = ctx.out_dir.join(CORRELATE_FILE);
        let text = serde_json::to_vec_pretty(&out).map_err(|e| fail(e.to_string()))?;
        std::fs::write(&path, text)
            .map_err(|e| OpError::io(format!("cannot write {}", path.display()), e))
    }
}
