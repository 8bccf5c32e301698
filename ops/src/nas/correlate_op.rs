//! The `indicators.correlate` op: Kendall tau-b between each indicator (and the rank-sum
//! combination, `docs/methods/training-free-nas.md` §3) and trained accuracy.
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
use crate::arch::stats::{kendall_tau_b, kendall_tau_se};
use crate::{fail, read_json, Input, Label, OpError, Outputs, ParamError, RunContext, TypedOp};

pub const CORRELATE_FILE: &str = "correlate.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelateParams {
    /// The accuracy each run reports (in its `metrics.json`, else its last `history.json` row).
    pub metric: String,
    /// The matrix key of the `runs` items that holds the cell (arch string or digits).
    pub arch_key: String,
    /// The matrix key that names the training seed: runs of two seeds give the seed-vs-seed
    /// tau of the accuracies, the noise floor every indicator tau is read against.
    pub seed_key: String,
}

impl Default for CorrelateParams {
    fn default() -> Self {
        Self {
            metric: "val_accuracy".into(),
            arch_key: "arch".into(),
            seed_key: "seed".into(),
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

/// The seed-vs-seed tau of the accuracies: tau between two seeds' accuracies over the cells
/// both trained, the mean over every pair of seeds, and the standard error of the first pair's
/// tau. `(None, None, 0)` with fewer than two seeds.
fn seed_vs_seed(
    by_seed: &BTreeMap<String, BTreeMap<String, f64>>,
) -> (Option<f64>, Option<f64>, usize) {
    let seeds: Vec<&BTreeMap<String, f64>> = by_seed.values().collect();
    let (mut taus, mut se) = (Vec::new(), None);
    for (i, a) in seeds.iter().enumerate() {
        for b in &seeds[i + 1..] {
            let (x, y): (Vec<f64>, Vec<f64>) = a
                .iter()
                .filter_map(|(cell, va)| b.get(cell).map(|vb| (*va, *vb)))
                .unzip();
            if let Some(t) = kendall_tau_b(&x, &y) {
                if taus.is_empty() {
                    se = kendall_tau_se(&x, &y);
                }
                taus.push(t);
            }
        }
    }
    let mean = (!taus.is_empty()).then(|| taus.iter().sum::<f64>() / taus.len() as f64);
    (mean, se, taus.len())
}

impl TypedOp for CorrelateOp {
    const NAME: &'static str = "indicators.correlate";
    // Version 2: the rank sum over the cells every indicator scored; the seed-vs-seed tau and
    // standard errors.
    const VERSION: u32 = 2;
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
        // seed -> cell -> accuracy.
        let mut by_seed: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
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
            let seed = label_pairs.get(&p.seed_key).unwrap_or_default().to_string();
            match read_accuracy(dir, &p.metric)? {
                Some(a) => {
                    acc.entry(arch.digits()).or_default().push(a);
                    by_seed.entry(seed).or_default().insert(arch.digits(), a);
                }
                None => excluded.push(label.clone()),
            }
        }
        let (seed_tau, seed_tau_se, seed_pairs) = seed_vs_seed(&by_seed);
        if let Some(t) = seed_tau {
            out.metric("seed_tau", t);
        }
        if let Some(t) = seed_tau_se {
            out.metric("seed_tau_se", t);
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
            let se = kendall_tau_se(&x, &y);
            if let Some(se) = se {
                out.metric(format!("tau_{n}_se"), se);
            }
            taus.insert(n.clone(), json!({ "tau": tau, "se": se, "n": x.len() }));
        }
        // The rank sum over the cells every indicator scored: a cell one indicator failed drops
        // out of that indicator's tau and of this one, and stays in the others.
        let complete: Vec<usize> = (0..cells.len())
            .filter(|&i| table[i].iter().all(Option::is_some))
            .collect();
        let sub: Vec<Vec<Option<f64>>> = complete.iter().map(|&i| table[i].clone()).collect();
        let sub_acc: Vec<f64> = complete.iter().map(|&i| accuracy[i]).collect();
        let neg_sums: Vec<f64> = rank_sums(&sub, &indicators).iter().map(|s| -s).collect();
        let combined = kendall_tau_b(&neg_sums, &sub_acc);
        let combined_se = kendall_tau_se(&neg_sums, &sub_acc);
        if let Some(t) = combined {
            out.metric("tau_rank_sum", t);
        }
        let mut rank_sum_of = vec![None; cells.len()];
        for (k, &i) in complete.iter().enumerate() {
            rank_sum_of[i] = Some(-neg_sums[k]);
        }
        out.metric("num_archs", cells.len() as f64);
        let rows: Vec<Value> = cells
            .iter()
            .zip(&accuracy)
            .zip(&rank_sum_of)
            .map(|((c, a), s)| json!({ "digits": c, "accuracy": a, "rank_sum": s, "values": scored[c] }))
            .collect();
        let result = json!({
            "metric": p.metric,
            "indicators": names,
            "tau": taus,
            "tau_rank_sum": { "tau": combined, "se": combined_se, "n": complete.len(), "of": "minus the rank sum" },
            "seed_tau": { "tau": seed_tau, "se": seed_tau_se, "pairs": seed_pairs, "seeds": by_seed.len(), "of": "accuracy of one seed vs another, mean over seed pairs" },
            "excluded_runs": excluded,
            "rows": rows,
        });
        out.write_json(CORRELATE_FILE, &result)
    }
}
