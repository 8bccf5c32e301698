//! `rerank`: how an architecture ranking changes between two training recipes
//! (`docs/methods/arch-aware.md` §4.2).
//!
//! Input contract. The op takes one list input, `runs` (`inputs: {runs: "train[*]"}`), over a
//! matrix with (at least) the keys `arch`, `recipe` and `seed` (names configurable). Each item's
//! label, as the engine writes it (`arch=3_33_133,recipe=aware,seed=0`), says which run it is;
//! each item folder holds `metrics.json`, a flat object of name -> number with the accuracy
//! named by `metric` (default `test_accuracy`). When `metrics.json` is absent the last record of
//! `history.json` is read instead. A run without the metric but with `diverged: 1`, or with a
//! non-finite value, is excluded (and listed as such), not given a made-up accuracy.
//!
//! Accuracies are averaged over seeds per (arch, recipe). Rankings are by that mean, best first,
//! ties broken by the arch label.

use std::collections::BTreeMap;
use std::path::Path;

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::stats::{kendall_tau_b, kendall_tau_se};
use crate::{read_json, Input, Label, OpError, Outputs, ParamError, RunContext, TypedOp};

/// The artifact this op writes.
pub const RERANK_FILE: &str = "rerank.json";
/// The input holding the `train` results.
pub const RUNS_INPUT: &str = "runs";

pub struct RerankOp;

/// The params of `rerank`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RerankParams {
    /// Metric read from each run (higher is better).
    pub metric: String,
    /// The matrix key of a run's label that names its architecture.
    pub arch_key: String,
    /// The matrix key that names its training recipe.
    pub recipe_key: String,
    /// The matrix key that names its seed (runs without it count as one seed).
    pub seed_key: String,
    /// The reference recipe (its ranking defines the top-K% sets); default: the first recipe.
    pub baseline: Option<String>,
    /// The recipe compared against it; default: the other recipe when there are two.
    pub candidate: Option<String>,
    /// Percentages K of the top-K% curve.
    pub top_k: Vec<f64>,
    /// How many of the most-moved architectures to list.
    pub moved: usize,
    /// Recipe -> list input name, for recipes trained in separate stages (`{benchmark:
    /// runs_benchmark, arch_aware: runs_arch_aware}`): each input's items belong to that recipe
    /// and need no recipe key in their labels. Empty: one `runs` input whose labels carry it.
    pub recipe_inputs: BTreeMap<String, String>,
}

impl Default for RerankParams {
    fn default() -> Self {
        Self {
            metric: "test_accuracy".into(),
            arch_key: "arch".into(),
            recipe_key: "recipe".into(),
            seed_key: "seed".into(),
            baseline: None,
            candidate: None,
            top_k: vec![
                100.0, 90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 5.0, 1.0,
            ],
            moved: 10,
            recipe_inputs: BTreeMap::new(),
        }
    }
}

impl RerankParams {
    fn check(&self) -> Result<(), ParamError> {
        for (i, k) in self.top_k.iter().enumerate() {
            if !(k.is_finite() && *k > 0.0 && *k <= 100.0) {
                return Err(ParamError::new(
                    format!("top_k.{i}"),
                    format!("{k} is not a percentage in (0, 100]"),
                ));
            }
        }
        if self.top_k.is_empty() {
            return Err(ParamError::new("top_k", "give at least one percentage"));
        }
        for (field, v) in [
            ("metric", &self.metric),
            ("arch_key", &self.arch_key),
            ("recipe_key", &self.recipe_key),
            ("seed_key", &self.seed_key),
        ] {
            if v.is_empty() {
                return Err(ParamError::new(field, "must not be empty"));
            }
        }
        if self.recipe_inputs.values().any(String::is_empty) {
            return Err(ParamError::new(
                "recipe_inputs",
                "an input name must not be empty",
            ));
        }
        if self.baseline.is_some() && self.baseline == self.candidate {
            return Err(ParamError::new(
                "candidate",
                "is the same recipe as `baseline`",
            ));
        }
        Ok(())
    }
}

/// One run's outcome.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Value(f64),
    Excluded(String),
}

/// Reads `metric` from a run folder (metrics.json, else the last record of history.json).
fn read_metric(dir: &Path, metric: &str) -> Result<Outcome, OpError> {
    let record = match read_json(&dir.join(crate::METRICS_FILE))? {
        Some(v) => v,
        None => match read_json(&dir.join("history.json"))? {
            Some(Value::Array(rows)) => rows.last().cloned().unwrap_or(Value::Null),
            Some(_) => {
                return Err(OpError::Failed(format!(
                    "{}: history.json is not a list of epoch records",
                    dir.display()
                )))
            }
            None => {
                return Err(OpError::Failed(format!(
                    "{}: neither metrics.json nor history.json is there; each `runs` item must \
                     be a train result with a flat metrics.json holding `{metric}`",
                    dir.display()
                )))
            }
        },
    };
    let Value::Object(map) = record else {
        return Err(OpError::Failed(format!(
            "{}: the metrics record is not an object of name -> number",
            dir.display()
        )));
    };
    match map.get(metric).map(Value::as_f64) {
        Some(Some(v)) if v.is_finite() => Ok(Outcome::Value(v)),
        Some(Some(v)) => Ok(Outcome::Excluded(format!("{metric} is {v}"))),
        Some(None) => Err(OpError::Failed(format!(
            "{}: `{metric}` is not a number",
            dir.display()
        ))),
        None if map.get("diverged").and_then(Value::as_f64) == Some(1.0) => {
            Ok(Outcome::Excluded("diverged".into()))
        }
        None => {
            let names: Vec<&str> = map.keys().map(String::as_str).collect();
            Err(OpError::Failed(format!(
                "{}: no metric `{metric}`; it has {}. Set `metric:` to one of them",
                dir.display(),
                names.join(", ")
            )))
        }
    }
}

/// Accuracies: recipe -> arch -> seed -> value.
type Table = BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>;

#[derive(Serialize)]
struct Excluded {
    label: String,
    reason: String,
}

#[derive(Serialize, Clone)]
struct ArchRow {
    arch: String,
    baseline_acc: f64,
    candidate_acc: f64,
    baseline_rank: usize,
    candidate_rank: usize,
    /// baseline_rank - candidate_rank: positive = ranked higher under the candidate recipe.
    shift: i64,
}

#[derive(Serialize)]
struct CurvePoint {
    k: f64,
    n: usize,
    tau: Option<f64>,
    /// Mean over recipes and seed pairs of the seed-vs-seed tau on the same architectures.
    seed_tau: Option<f64>,
}

#[derive(Serialize)]
struct SeedPoint {
    k: f64,
    n: usize,
    tau: Option<f64>,
    pairs: usize,
}

/// Orders seed labels numerically when they all are numbers, else as text.
fn sorted_seeds<'a>(seeds: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = seeds.cloned().collect();
    v.sort_by(|a, b| match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.total_cmp(&y),
        _ => a.cmp(b),
    });
    v.dedup();
    v
}

/// Ranks (1 = best) by value descending, ties by name.
fn ranks(values: &BTreeMap<&str, f64>) -> BTreeMap<String, usize> {
    let mut v: Vec<(&str, f64)> = values.iter().map(|(k, x)| (*k, *x)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    v.into_iter()
        .enumerate()
        .map(|(i, (k, _))| (k.to_string(), i + 1))
        .collect()
}

/// Mean over recipes and seed pairs of tau(seed a, seed b) over `archs`.
fn seed_tau(table: &Table, recipe: &str, archs: &[String]) -> (Option<f64>, usize) {
    let Some(by_arch) = table.get(recipe) else {
        return (None, 0);
    };
    let seeds = sorted_seeds(by_arch.values().flat_map(|s| s.keys()));
    let mut taus = Vec::new();
    for (i, a) in seeds.iter().enumerate() {
        for b in &seeds[i + 1..] {
            let (mut xa, mut xb) = (Vec::new(), Vec::new());
            for arch in archs {
                if let Some(s) = by_arch.get(arch) {
                    if let (Some(va), Some(vb)) = (s.get(a), s.get(b)) {
                        xa.push(*va);
                        xb.push(*vb);
                    }
                }
            }
            if let Some(t) = kendall_tau_b(&xa, &xb) {
                taus.push(t);
            }
        }
    }
    let n = taus.len();
    ((n > 0).then(|| taus.iter().sum::<f64>() / n as f64), n)
}

/// The like-for-like recipe tau: for each seed both recipes trained, tau over `archs` between
/// the baseline's and the candidate's accuracies of that one seed; the mean over seeds. It is
/// the figure to set beside the seed-vs-seed tau (both compare single runs), whereas `tau_all`
/// compares seed means, which are less noisy.
fn same_seed_tau(table: &Table, baseline: &str, candidate: &str, archs: &[String]) -> Option<f64> {
    let (base, cand) = (table.get(baseline)?, table.get(candidate)?);
    let seeds = sorted_seeds(base.values().flat_map(|s| s.keys()));
    let mut taus = Vec::new();
    for seed in &seeds {
        let (mut xa, mut xb) = (Vec::new(), Vec::new());
        for arch in archs {
            if let (Some(va), Some(vb)) = (
                base.get(arch).and_then(|s| s.get(seed)),
                cand.get(arch).and_then(|s| s.get(seed)),
            ) {
                xa.push(*va);
                xb.push(*vb);
            }
        }
        if let Some(t) = kendall_tau_b(&xa, &xb) {
            taus.push(t);
        }
    }
    (!taus.is_empty()).then(|| taus.iter().sum::<f64>() / taus.len() as f64)
}

/// The metric-name suffix of a percentage: `100`, `5`, `2.5`.
fn k_name(k: f64) -> String {
    format!("{k}")
}

impl TypedOp for RerankOp {
    const NAME: &'static str = "rerank";
    // Version 3: `tau_all_se`, `tau_same_seed`, `mean_acc_change_se`.
    const VERSION: u32 = 3;
    const SUMMARY: &'static str =
        "Kendall tau between two training recipes' architecture rankings, overall and in the \
         top-K%, with the seed-vs-seed control; reads `runs: train[*]`";
    type Params = RerankParams;
    type Config = RerankParams;

    fn resolve(p: RerankParams) -> Result<RerankParams, ParamError> {
        p.check()?;
        Ok(p)
    }

    fn required_inputs(p: &RerankParams) -> Vec<String> {
        if p.recipe_inputs.is_empty() {
            vec![RUNS_INPUT.to_string()]
        } else {
            p.recipe_inputs.values().cloned().collect()
        }
    }

    fn run(
        &self,
        p: &RerankParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let items = run_items(ctx, p)?;
        let runs = read_runs(ctx, p, &items)?;
        let (baseline, candidate) = recipes(p, &runs.recipe_order)?;
        let table = &runs.table;
        let rows = ranked_rows(table, &baseline, &candidate)?;
        let n = rows.len();
        let (curve, seed_curves) = top_k_curves(table, &rows, &p.top_k, [&baseline, &candidate]);
        let base_acc: Vec<f64> = rows.iter().map(|r| r.baseline_acc).collect();
        let cand_acc: Vec<f64> = rows.iter().map(|r| r.candidate_acc).collect();
        let tau_all = kendall_tau_b(&base_acc, &cand_acc);
        let tau_all_se = kendall_tau_se(&base_acc, &cand_acc);
        let order: Vec<String> = rows.iter().map(|r| r.arch.clone()).collect();
        let seed_all: Vec<f64> = [&baseline, &candidate]
            .into_iter()
            .filter_map(|recipe| seed_tau(table, recipe, &order).0)
            .collect();
        let seed_tau_all =
            (!seed_all.is_empty()).then(|| seed_all.iter().sum::<f64>() / seed_all.len() as f64);
        let tau_same_seed = same_seed_tau(table, &baseline, &candidate, &order);
        let mean_base = rows.iter().map(|r| r.baseline_acc).sum::<f64>() / n as f64;
        let mean_cand = rows.iter().map(|r| r.candidate_acc).sum::<f64>() / n as f64;
        // The standard error of the mean change: the spread of the per-architecture changes
        // (of seed means) over sqrt(n).
        let change_se = (n > 1).then(|| {
            let d: Vec<f64> = rows
                .iter()
                .map(|r| r.candidate_acc - r.baseline_acc)
                .collect();
            let m = d.iter().sum::<f64>() / n as f64;
            let var = d.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        });
        let mut moved = rows.clone();
        moved.sort_by(|a, b| b.shift.abs().cmp(&a.shift.abs()).then(a.arch.cmp(&b.arch)));
        moved.truncate(p.moved);
        let artifact = serde_json::json!({
            "metric": p.metric,
            "baseline": baseline,
            "candidate": candidate,
            "num_runs": items.len(),
            "num_archs": n,
            "excluded": runs.excluded,
            "tau_all": tau_all,
            "tau_all_se": tau_all_se,
            "tau_same_seed": tau_same_seed,
            "seed_tau_all": seed_tau_all,
            "curve": curve,
            "seed_curves": seed_curves,
            "mean_acc": {"baseline": mean_base, "candidate": mean_cand},
            "mean_acc_change": mean_cand - mean_base,
            "mean_acc_change_se": change_se,
            "moved": moved,
            "archs": rows,
        });
        out.write_json(RERANK_FILE, &artifact)?;
        let _ = writeln!(
            ctx.log,
            "{n} architectures, {baseline} vs {candidate}: tau = {}, seed-vs-seed tau = {}, \
             mean change {:+.4}",
            tau_all.map_or("n/a".into(), |t| format!("{t:.4}")),
            seed_tau_all.map_or("n/a".into(), |t| format!("{t:.4}")),
            mean_cand - mean_base
        );
        out.metric("num_archs", n as f64);
        out.metric("num_excluded", runs.excluded.len() as f64);
        out.metric("mean_acc_baseline", mean_base);
        out.metric("mean_acc_candidate", mean_cand);
        out.metric("mean_acc_change", mean_cand - mean_base);
        if let Some(se) = change_se {
            out.metric("mean_acc_change_se", se);
        }
        if let Some(t) = tau_all {
            out.metric("tau_all", t);
        }
        if let Some(t) = tau_all_se {
            out.metric("tau_all_se", t);
        }
        if let Some(t) = tau_same_seed {
            out.metric("tau_same_seed", t);
        }
        if let Some(t) = seed_tau_all {
            out.metric("seed_tau_all", t);
        }
        for c in &curve {
            if let Some(t) = c.tau {
                out.metric(format!("tau_top{}", k_name(c.k)), t);
            }
            if let Some(t) = c.seed_tau {
                out.metric(format!("seed_tau_top{}", k_name(c.k)), t);
            }
        }
        Ok(())
    }
}

/// One run to read: the recipe its input gives (if any), its label and its folder.
type RunItem = (Option<String>, String, PathBuf);

/// Every run of the `runs` input, or of each `recipe_inputs` input (labelled by its recipe).
fn run_items(ctx: &RunContext<'_>, p: &RerankParams) -> Result<Vec<RunItem>, OpError> {
    let list = |name: &str| match ctx.input(name)? {
        Input::Many { items, .. } => Ok(items.clone()),
        Input::One(_) => Err(OpError::Failed(format!(
            "`{name}` must be a list input over the train matrix, e.g. \
             `inputs: {{{name}: \"train[*]\"}}`"
        ))),
    };
    let mut items: Vec<RunItem> = Vec::new();
    if p.recipe_inputs.is_empty() {
        items.extend(list(RUNS_INPUT)?.into_iter().map(|(l, d)| (None, l, d)));
    } else {
        for (recipe, input) in &p.recipe_inputs {
            items.extend(
                list(input)?
                    .into_iter()
                    .map(|(l, d)| (Some(recipe.clone()), l, d)),
            );
        }
    }
    Ok(items)
}

/// What the runs hold.
struct Runs {
    table: Table,
    /// Recipes in the order they first appear.
    recipe_order: Vec<String>,
    excluded: Vec<Excluded>,
}

fn read_runs(ctx: &RunContext<'_>, p: &RerankParams, items: &[RunItem]) -> Result<Runs, OpError> {
    let mut runs = Runs {
        table: BTreeMap::new(),
        recipe_order: Vec::new(),
        excluded: Vec::new(),
    };
    for (i, (given_recipe, label, dir)) in items.iter().enumerate() {
        ctx.check_cancelled()?;
        ctx.progress
            .report(&format!("reading run {}/{}", i + 1, items.len()));
        let keys = Label::parse(label);
        let get = |key: &str| -> Result<String, OpError> {
            keys.get(key).map(String::from).ok_or_else(|| {
                OpError::Failed(format!(
                    "run {label:?} has no matrix key `{key}`; the train stage's matrix needs \
                     `{}`, `{}` and `{}` (or set arch_key / recipe_key / seed_key)",
                    p.arch_key, p.recipe_key, p.seed_key
                ))
            })
        };
        let arch = get(&p.arch_key)?;
        let recipe = match given_recipe {
            Some(r) => r.clone(),
            None => get(&p.recipe_key)?,
        };
        let seed = keys.get(&p.seed_key).unwrap_or_default().to_string();
        if !runs.recipe_order.contains(&recipe) {
            runs.recipe_order.push(recipe.clone());
        }
        match read_metric(dir, &p.metric)? {
            Outcome::Value(v) => {
                let slot = runs
                    .table
                    .entry(recipe.clone())
                    .or_default()
                    .entry(arch.clone())
                    .or_default();
                if slot.insert(seed.clone(), v).is_some() {
                    return Err(OpError::Failed(format!(
                        "two runs for arch {arch:?}, recipe {recipe:?}, seed {seed:?}; \
                         other matrix keys must not vary across `{RUNS_INPUT}`"
                    )));
                }
            }
            Outcome::Excluded(reason) => runs.excluded.push(Excluded {
                label: label.clone(),
                reason,
            }),
        }
    }
    Ok(runs)
}

/// The baseline and candidate recipes: as given, else the first recipe and the other one.
fn recipes(p: &RerankParams, recipe_order: &[String]) -> Result<(String, String), OpError> {
    let baseline = match &p.baseline {
        Some(b) => b.clone(),
        None => recipe_order
            .first()
            .cloned()
            .ok_or_else(|| OpError::Failed(format!("`{RUNS_INPUT}` holds no runs")))?,
    };
    let candidate = match &p.candidate {
        Some(c) => c.clone(),
        None => {
            let others: Vec<&String> = recipe_order.iter().filter(|r| **r != baseline).collect();
            match others.as_slice() {
                [one] => (*one).clone(),
                _ => {
                    return Err(OpError::Failed(format!(
                        "recipes found: {recipe_order:?}; with other than two, set \
                         `baseline` and `candidate`"
                    )))
                }
            }
        }
    };
    for r in [&baseline, &candidate] {
        if !recipe_order.contains(r) {
            return Err(OpError::Failed(format!(
                "recipe {r:?} is not among the runs' recipes {recipe_order:?}"
            )));
        }
    }
    Ok((baseline, candidate))
}

/// The architectures with results under both recipes, in baseline rank order.
fn ranked_rows(table: &Table, baseline: &str, candidate: &str) -> Result<Vec<ArchRow>, OpError> {
    let mean = |recipe: &str| -> BTreeMap<&str, f64> {
        table
            .get(recipe)
            .map(|by_arch| {
                by_arch
                    .iter()
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(a, s)| (a.as_str(), s.values().sum::<f64>() / s.len() as f64))
                    .collect()
            })
            .unwrap_or_default()
    };
    let base_mean = mean(baseline);
    let cand_mean = mean(candidate);
    let common: BTreeMap<&str, f64> = base_mean
        .iter()
        .filter(|(a, _)| cand_mean.contains_key(*a))
        .map(|(a, v)| (*a, *v))
        .collect();
    let common_cand: BTreeMap<&str, f64> = common.keys().map(|a| (*a, cand_mean[a])).collect();
    if common.len() < 2 {
        return Err(OpError::Failed(format!(
            "only {} architecture(s) have results under both {baseline:?} and \
             {candidate:?}; a ranking needs two or more",
            common.len()
        )));
    }
    let base_rank = ranks(&common);
    let cand_rank = ranks(&common_cand);
    let mut order: Vec<String> = base_rank.keys().cloned().collect();
    order.sort_by_key(|a| base_rank[a]);
    Ok(order
        .iter()
        .map(|a| ArchRow {
            arch: a.clone(),
            baseline_acc: common[a.as_str()],
            candidate_acc: common_cand[a.as_str()],
            baseline_rank: base_rank[a],
            candidate_rank: cand_rank[a],
            shift: base_rank[a] as i64 - cand_rank[a] as i64,
        })
        .collect())
}

/// The top-K% curve (tau between the recipes and the mean seed-vs-seed tau, on the baseline's
/// top K%) and each recipe's seed-vs-seed curve.
fn top_k_curves(
    table: &Table,
    rows: &[ArchRow],
    top_k: &[f64],
    recipes: [&String; 2],
) -> (Vec<CurvePoint>, BTreeMap<String, Vec<SeedPoint>>) {
    let n = rows.len();
    let mut curve = Vec::new();
    let mut seed_curves: BTreeMap<String, Vec<SeedPoint>> = BTreeMap::new();
    for &k in top_k {
        let size = ((k / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        let top = &rows[..size];
        let archs: Vec<String> = top.iter().map(|r| r.arch.clone()).collect();
        let xb: Vec<f64> = top.iter().map(|r| r.baseline_acc).collect();
        let xc: Vec<f64> = top.iter().map(|r| r.candidate_acc).collect();
        let mut seed_vals = Vec::new();
        for recipe in recipes {
            let (t, pairs) = seed_tau(table, recipe, &archs);
            if let Some(t) = t {
                seed_vals.push(t);
            }
            seed_curves
                .entry(recipe.clone())
                .or_default()
                .push(SeedPoint {
                    k,
                    n: size,
                    tau: t,
                    pairs,
                });
        }
        curve.push(CurvePoint {
            k,
            n: size,
            tau: kendall_tau_b(&xb, &xc),
            seed_tau: (!seed_vals.is_empty())
                .then(|| seed_vals.iter().sum::<f64>() / seed_vals.len() as f64),
        });
    }
    (curve, seed_curves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{OpRun, RunOutput};
    use crate::Op;
    use serde_json::json;

    fn run(params: Value, inputs: BTreeMap<String, Input>) -> RunOutput {
        let mut run = OpRun::new(params);
        for (name, input) in inputs {
            run = run.input_as(&name, input);
        }
        run.run(&RerankOp)
    }

    #[test]
    fn nb201_arch_strings_with_commas_and_pipes_label_runs() {
        let root = tempfile::tempdir().unwrap();
        let archs = ["|nor_conv_3x3~0|+|none~0|", "a,b", "c"];
        let mut rows = Vec::new();
        for (i, arch) in archs.iter().enumerate() {
            rows.push((*arch, "x", 0, Some(0.9 - 0.1 * i as f64)));
            rows.push((*arch, "y", 0, Some(0.5 + 0.1 * i as f64)));
        }
        let inputs = BTreeMap::from([(RUNS_INPUT.to_string(), runs(root.path(), &rows))]);
        let output = run(json!({"top_k": [100]}), inputs);
        assert_eq!(output.metrics()["tau_all"], -1.0);
        let v: Value =
            serde_json::from_slice(&std::fs::read(output.out_dir.join(RERANK_FILE)).unwrap())
                .unwrap();
        assert_eq!(v["archs"][0]["arch"], archs[0]);
        assert_eq!(v["archs"][1]["arch"], "a,b");
    }

    /// Writes one run folder per (arch, recipe, seed) with the given accuracy.
    fn runs(root: &Path, rows: &[(&str, &str, u32, Option<f64>)]) -> Input {
        let mut items = Vec::new();
        for (arch, recipe, seed, acc) in rows {
            let label = format!("arch={arch},recipe={recipe},seed={seed}");
            let dir: PathBuf = root.join(&label);
            std::fs::create_dir_all(&dir).unwrap();
            let metrics = match acc {
                Some(a) => json!({"test_accuracy": a, "diverged": 0}),
                None => json!({"diverged": 1}),
            };
            std::fs::write(dir.join("metrics.json"), metrics.to_string()).unwrap();
            items.push((label, dir));
        }
        Input::Many {
            dir: root.to_path_buf(),
            items,
        }
    }

    #[test]
    fn rerank_end_to_end_by_hand() {
        // Baseline means (best first): a 0.9, b 0.8, c 0.7, d 0.6.
        // Candidate means: a 0.85, b 0.9, c 0.75, d 0.5 -> order b, a, c, d.
        // tau over all: pairs (a,b) discordant, the other five concordant -> (5 - 1) / 6.
        let rows = [
            ("a", "bench", 0, Some(0.9)),
            ("a", "bench", 1, Some(0.9)),
            ("b", "bench", 0, Some(0.8)),
            ("b", "bench", 1, Some(0.8)),
            ("c", "bench", 0, Some(0.7)),
            ("c", "bench", 1, Some(0.7)),
            ("d", "bench", 0, Some(0.6)),
            ("d", "bench", 1, Some(0.6)),
            ("a", "aware", 0, Some(0.8)),
            ("a", "aware", 1, Some(0.9)),
            ("b", "aware", 0, Some(0.9)),
            ("b", "aware", 1, Some(0.9)),
            ("c", "aware", 0, Some(0.75)),
            ("c", "aware", 1, Some(0.75)),
            ("d", "aware", 0, Some(0.5)),
            ("d", "aware", 1, Some(0.5)),
            ("e", "aware", 0, None),
        ];
        let root = tempfile::tempdir().unwrap();
        let mut inputs = BTreeMap::new();
        inputs.insert(RUNS_INPUT.to_string(), runs(root.path(), &rows));
        let output = run(json!({"top_k": [100, 50, 25], "moved": 2}), inputs);
        let (m, log) = (output.metrics(), &output.log);
        assert!(log.contains("bench vs aware"), "{log}");
        assert_eq!(m["num_archs"], 4.0);
        assert_eq!(m["num_excluded"], 1.0);
        assert!((m["tau_all"] - 4.0 / 6.0).abs() < 1e-12);
        assert!((m["tau_top100"] - 4.0 / 6.0).abs() < 1e-12);
        // Top 50% by baseline = {a, b}: reversed under the candidate.
        assert!((m["tau_top50"] + 1.0).abs() < 1e-12);
        // Top 25% is one architecture: no tau.
        assert!(!m.contains_key("tau_top25"));
        // Mean change: (-0.05 + 0.1 + 0.05 - 0.1) / 4 = 0; changes -0.05, 0.1, 0.05, -0.1
        // have sample variance 0.025 / 3, so the standard error is sqrt(0.025 / 12).
        assert!(m["mean_acc_change"].abs() < 1e-12);
        assert!((m["mean_acc_change_se"] - (0.025f64 / 12.0).sqrt()).abs() < 1e-12);
        // Seed control: bench seeds agree (tau 1); aware seeds: a 0.8 / 0.9, b 0.9 / 0.9,
        // c 0.75, d 0.5 -> seed 0 order b > a > c > d, seed 1 ties a = b: tau-b = 5 / sqrt(6*5).
        let aware = 5.0 / 30f64.sqrt();
        assert!((m["seed_tau_all"] - (1.0 + aware) / 2.0).abs() < 1e-12);
        // Like for like: seed 0 of each recipe (a, b swapped: 4 / 6) and seed 1 (a = b tied
        // under aware: 5 / sqrt(6 * 5)), averaged.
        assert!((m["tau_same_seed"] - (4.0 / 6.0 + aware) / 2.0).abs() < 1e-12);
        let v: Value =
            serde_json::from_slice(&std::fs::read(output.out_dir.join(RERANK_FILE)).unwrap())
                .unwrap();
        assert_eq!(v["baseline"], "bench");
        assert_eq!(v["moved"][0]["arch"], "a");
        assert_eq!(v["moved"][0]["shift"], -1);
        assert_eq!(v["moved"].as_array().unwrap().len(), 2);
        assert_eq!(v["excluded"][0]["reason"], "diverged");
        assert_eq!(v["curve"][2]["tau"], Value::Null);
    }

    #[test]
    fn rerank_reports_contract_violations() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("x");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.json"), r#"{"val_accuracy": 0.5}"#).unwrap();
        let one = |label: &str| {
            let mut inputs = BTreeMap::new();
            inputs.insert(
                RUNS_INPUT.to_string(),
                Input::Many {
                    dir: root.path().to_path_buf(),
                    items: vec![(label.to_string(), dir.clone())],
                },
            );
            inputs
        };
        let err = |inputs| run(json!({}), inputs).result.unwrap_err().to_string();
        assert!(err(one("arch=a,seed=0")).contains("`recipe`"));
        let e = err(one("arch=a,recipe=x,seed=0"));
        assert!(e.contains("val_accuracy"), "{e}");
        let mut one_input = BTreeMap::new();
        one_input.insert(RUNS_INPUT.to_string(), Input::One(dir.clone()));
        assert!(err(one_input).contains("train[*]"));
        assert_eq!(
            RerankOp.plan(&json!({"top_k": [0]})).unwrap_err().path,
            "top_k.0"
        );
        assert!(RerankOp.plan(&json!({"bogus": 1})).is_err());
        assert_eq!(
            RerankOp.plan(&json!({})).unwrap().required_inputs,
            vec!["runs"]
        );
    }

    #[test]
    fn recipes_from_separate_inputs_match_one_labelled_input() {
        let bench = [
            ("a", "x", 0, Some(0.9)),
            ("b", "x", 0, Some(0.8)),
            ("c", "x", 0, Some(0.7)),
        ];
        let aware = [
            ("a", "y", 0, Some(0.7)),
            ("b", "y", 0, Some(0.9)),
            ("c", "y", 0, Some(0.6)),
        ];
        let root = tempfile::tempdir().unwrap();
        let mut inputs = BTreeMap::new();
        inputs.insert("runs_b".to_string(), runs(&root.path().join("b"), &bench));
        inputs.insert("runs_a".to_string(), runs(&root.path().join("a"), &aware));
        let params = json!({"recipe_inputs": {"bench": "runs_b", "aware": "runs_a"},
            "baseline": "bench", "top_k": [100]});
        assert_eq!(
            RerankOp.plan(&params).unwrap().required_inputs,
            ["runs_a", "runs_b"]
        );
        let output = run(params, inputs);
        let (m, log) = (output.metrics(), &output.log);
        assert!(log.contains("bench vs aware"), "{log}");
        // Baseline order a, b, c; candidate b, a, c: one discordant pair of three.
        assert!((m["tau_all"] - 1.0 / 3.0).abs() < 1e-12, "{m:?}");
    }
}
