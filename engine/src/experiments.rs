//! Named experiments: `engine run --name` records what an invocation set and every stage key
//! it produced; `engine exp list/show/diff` compare them. The tables are built here, once, for
//! the CLI and the dashboard alike.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use cache::{Cache, CacheError, Experiment, ExperimentStage, NewExperiment};
use serde_json::{json, Value};

use crate::outcome::{RunSummary, StageStatus};
use crate::plan::Plan;
use crate::table::{flatten, Cell, Table};

/// What the caller of a named run knows beyond the plan and its summary.
pub struct RunContext<'a> {
    pub name: &'a str,
    /// `--set` overrides as given.
    pub sets: &'a [String],
    /// `--params-file` paths as given.
    pub params_files: &'a [String],
    /// The command line, for the record.
    pub argv: Vec<String>,
}

/// Names are used on the command line and in file names of exports: keep them plain.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+' | '='));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid experiment name: use up to 128 letters, digits and _ - . + ="
        ))
    }
}

/// Records the run as experiment `ctx.name` (replacing one of that name). Returns whether an
/// experiment of that name was replaced.
pub fn record(
    cache: &Cache,
    plan: &Plan,
    summary: &RunSummary,
    ctx: &RunContext<'_>,
) -> Result<bool, CacheError> {
    let stages = summary
        .reports
        .iter()
        .map(|r| {
            let node = &plan.nodes[r.node];
            ExperimentStage {
                name: node.name.clone(),
                stage: node.stage.clone(),
                key: r.key.clone(),
                status: status_name(r.status).into(),
                matrix: Value::Object(node.matrix.clone()),
                params: node.params.clone(),
                duration_s: (r.status == StageStatus::Ran).then_some(r.duration_s),
            }
        })
        .collect();
    let meta = json!({
        "overrides": ctx.sets,
        "params_files": ctx.params_files,
        "vars": Value::Object(plan.pipeline.vars.clone()),
        "git": git_state(&plan.pipeline.workspace),
        "command": ctx.argv,
        "interrupted": summary.interrupted,
        "wall_s": summary.wall_s,
    });
    cache.record_experiment(&NewExperiment {
        pipeline: plan.pipeline.name.clone(),
        name: ctx.name.to_string(),
        created_at: cache::unix_now(),
        meta,
        stages,
    })
}

fn status_name(s: StageStatus) -> &'static str {
    match s {
        StageStatus::Cached => "cached",
        StageStatus::Ran => "ran",
        StageStatus::Failed => "failed",
        StageStatus::Skipped => "skipped",
    }
}

/// The commit checked out in `dir`'s git work tree and whether tracked files differ from it,
/// or null outside a work tree (or without git).
pub fn git_state(dir: &Path) -> Value {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "HEAD"]) else {
        return Value::Null;
    };
    let changed: Vec<String> = git(&["status", "--porcelain", "--untracked-files=no"])
        .unwrap_or_default()
        .lines()
        .map(|l| l.get(3..).unwrap_or(l).to_string())
        .collect();
    json!({"commit": commit, "dirty": !changed.is_empty(), "changed": changed})
}

/// The experiment's params as columns: every resolved var (`vars.lr`) and every override that
/// set something else (`stages.train.params.lr`).
fn experiment_params(meta: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut leaves = Vec::new();
    flatten(
        "vars",
        meta.get("vars").unwrap_or(&Value::Null),
        &mut leaves,
    );
    for (k, v) in leaves {
        if k != "vars" {
            out.insert(k, v);
        }
    }
    for set in meta
        .get("overrides")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Some((k, v)) = set.split_once('=') {
            let k = k.trim_start_matches('+');
            if !k.starts_with("vars.") {
                let value = serde_yaml::from_str::<serde_yaml::Value>(v)
                    .ok()
                    .and_then(|y| crate::spec::yaml_to_json(&y, k).ok())
                    .unwrap_or_else(|| Value::String(v.to_string()));
                out.insert(k.to_string(), value);
            }
        }
    }
    out
}

fn git_cell(meta: &Value) -> Cell {
    match meta.get("git") {
        Some(g) if g.is_object() => {
            let commit = g["commit"].as_str().unwrap_or("");
            let short = &commit[..commit.len().min(10)];
            let dirty = if g["dirty"].as_bool().unwrap_or(false) {
                "+dirty"
            } else {
                ""
            };
            Cell::Text(format!("{short}{dirty}"))
        }
        _ => Cell::Empty,
    }
}

/// Which metrics `exp show` and `table` print: every metric of the given stages, or those the
/// user names. A name is `metric` (any stage), `stage.metric` (every instance of a stage) or
/// `instance.metric` (`train[seed=1].acc`).
#[derive(Debug, Clone, Default)]
pub struct MetricFilter {
    pub names: Vec<String>,
}

impl MetricFilter {
    /// A comma-separated list; commas inside `[...]` belong to a selector.
    pub fn parse(list: Option<&str>) -> Self {
        let mut names = Vec::new();
        let mut depth = 0usize;
        let mut current = String::new();
        for c in list.unwrap_or("").chars() {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    names.push(std::mem::take(&mut current));
                    continue;
                }
                _ => {}
            }
            current.push(c);
        }
        names.push(current);
        Self {
            names: names
                .into_iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn matches(&self, instance: &str, metric: &str) -> bool {
        self.names.iter().any(|n| names_metric(n, instance, metric))
    }
}

/// Whether `name` (`metric`, `stage.metric`, `stage[k=v,...].metric`, variables in any order,
/// `*` allowed) names `metric` of `instance`.
pub fn names_metric(name: &str, instance: &str, metric: &str) -> bool {
    if name == metric {
        return true;
    }
    let split = match name.rfind("].") {
        Some(i) => Some((&name[..=i], &name[i + 2..])),
        None => name.split_once('.'),
    };
    let Some((selector, m)) = split else {
        return false;
    };
    m == metric && selects(selector, instance)
}

/// Whether a selector (`stage`, `stage[k=v,*]`) takes `instance` (`stage[k=v,...]`).
pub fn selects(selector: &str, instance: &str) -> bool {
    let (stage, label) = match instance.split_once('[') {
        Some((s, rest)) => (s, rest.strip_suffix(']').unwrap_or(rest)),
        None => (instance, ""),
    };
    let (want_stage, inner) = match selector.split_once('[') {
        Some((s, rest)) => (s.trim(), Some(rest.strip_suffix(']').unwrap_or(rest))),
        None => (selector.trim(), None),
    };
    if want_stage != stage {
        return false;
    }
    let Some(inner) = inner else { return true };
    let label = ops::Label::parse(label);
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "*")
        .all(|p| {
            p.split_once('=')
                .is_some_and(|(k, v)| label.get(k.trim()) == Some(v.trim()))
        })
}

/// How `exp show` builds its table.
#[derive(Debug, Clone, Default)]
pub struct ShowOptions {
    /// Every param column, not only those that differ between experiments.
    pub all_params: bool,
    /// Drop metric columns equal in every row too.
    pub only_changed: bool,
    pub metrics: MetricFilter,
    /// The stages whose metrics are shown when `metrics` is empty (the pipeline's final
    /// stages); empty means every stage.
    pub default_stages: BTreeSet<String>,
    /// A column (`vars.lr`, `eval.acc`, `eval[seed=0].acc`) to sort by.
    pub sort_by: Option<String>,
    pub descending: bool,
}

/// One row per experiment of `pipeline`: name, creation time, commit, the params that differ
/// and the chosen metrics (columns `instance.metric`). Three queries whatever the number of
/// experiments.
pub fn show(cache: &Cache, pipeline: &str, options: &ShowOptions) -> Result<Table, ShowError> {
    let data = cache.experiment_table(pipeline)?;
    let params: Vec<BTreeMap<String, Value>> = data
        .experiments
        .iter()
        .map(|e| experiment_params(&e.meta))
        .collect();
    let param_names: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let many = data.experiments.len() > 1;
    let param_columns: Vec<&String> = param_names
        .into_iter()
        .filter(|name| {
            options.all_params
                || !many
                || params
                    .windows(2)
                    .any(|w| w[0].get(*name) != w[1].get(*name))
        })
        .collect();
    // Metric columns in first-seen order (plan order of the oldest experiment first).
    let mut metric_columns: Vec<(String, String)> = Vec::new();
    let mut seen: std::collections::HashSet<(String, String)> = Default::default();
    for e in &data.experiments {
        for (instance, key, _) in data.stages.get(&e.id).into_iter().flatten() {
            let stage = instance.split('[').next().unwrap_or(instance);
            let wanted_stage = !options.metrics.is_empty()
                || options.default_stages.is_empty()
                || options.default_stages.contains(stage);
            if !wanted_stage {
                continue;
            }
            let Some(metrics) = key.as_ref().and_then(|k| data.metrics.get(k)) else {
                continue;
            };
            for m in metrics.keys() {
                if !options.metrics.is_empty() && !options.metrics.matches(instance, m) {
                    continue;
                }
                let col = (instance.clone(), m.clone());
                if seen.insert(col.clone()) {
                    metric_columns.push(col);
                }
            }
        }
    }
    let mut columns: Vec<String> = vec!["experiment".into(), "created".into(), "git".into()];
    columns.extend(param_columns.iter().map(|s| s.to_string()));
    columns.extend(metric_columns.iter().map(|(i, m)| format!("{i}.{m}")));
    let mut table = Table::new(columns);
    for (e, p) in data.experiments.iter().zip(&params) {
        let mut row = vec![
            Cell::Text(e.name.clone()),
            Cell::Text(format_time(e.created_at)),
            git_cell(&e.meta),
        ];
        row.extend(
            param_columns
                .iter()
                .map(|c| p.get(*c).map(Cell::from_json).unwrap_or(Cell::Empty)),
        );
        let by_instance: HashMap<&str, Option<&String>> = data
            .stages
            .get(&e.id)
            .into_iter()
            .flatten()
            .map(|(i, k, _)| (i.as_str(), k.as_ref()))
            .collect();
        for (instance, m) in &metric_columns {
            let v = by_instance
                .get(instance.as_str())
                .and_then(|k| k.as_ref())
                .and_then(|k| data.metrics.get(*k))
                .and_then(|ms| ms.get(m));
            row.push(v.map(|v| Cell::Number(*v)).unwrap_or(Cell::Empty));
        }
        table.rows.push(row);
    }
    if let Some(by) = &options.sort_by {
        let i = sort_column(&table, by)?;
        table.sort_by_column(i, options.descending);
    }
    if options.only_changed && many {
        let constant: Vec<bool> = (0..table.columns.len())
            .map(|i| table.is_constant(i))
            .collect();
        table.retain_columns(|i| i < 2 || !constant[i]);
    } else if table.rows.iter().all(|r| r[2] == Cell::Empty) {
        // Outside a git work tree the column says nothing.
        table.retain_columns(|i| i != 2);
    }
    Ok(table)
}

/// The column `by` names: a column name, or a metric name that names exactly one column.
fn sort_column(table: &Table, by: &str) -> Result<usize, ShowError> {
    if let Some(i) = table.column(by) {
        return Ok(i);
    }
    let candidates: Vec<usize> = (0..table.columns.len())
        .filter(|&i| {
            let c = &table.columns[i];
            let split = match c.rfind("].") {
                Some(j) => Some((&c[..=j], &c[j + 2..])),
                None => c.split_once('.'),
            };
            split.is_some_and(|(instance, metric)| names_metric(by, instance, metric))
        })
        .collect();
    match candidates.as_slice() {
        [one] => Ok(*one),
        [] => Err(ShowError::Column {
            name: by.to_string(),
            columns: table.columns.clone(),
        }),
        many => Err(ShowError::Ambiguous {
            name: by.to_string(),
            columns: many.iter().map(|&i| table.columns[i].clone()).collect(),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("there is no column '{name}' to sort by; the columns are: {}", columns.join(", "))]
    Column { name: String, columns: Vec<String> },
    #[error("'{name}' names several columns ({}); give one of them", columns.join(", "))]
    Ambiguous { name: String, columns: Vec<String> },
}

/// `exp list`: one row per experiment with what it did.
pub fn list(cache: &Cache, pipeline: &str) -> Result<Table, CacheError> {
    let data = cache.experiment_table(pipeline)?;
    let mut table = Table::new(
        [
            "experiment",
            "created",
            "git",
            "stages",
            "ran",
            "cached",
            "failed",
            "skipped",
            "overrides",
        ]
        .map(String::from)
        .to_vec(),
    );
    for e in &data.experiments {
        let stages = data.stages.get(&e.id).map(Vec::as_slice).unwrap_or(&[]);
        let count = |s: &str| Cell::Number(stages.iter().filter(|x| x.2 == s).count() as f64);
        let overrides: Vec<&str> = e.meta["overrides"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        table.rows.push(vec![
            Cell::Text(e.name.clone()),
            Cell::Text(format_time(e.created_at)),
            git_cell(&e.meta),
            Cell::Number(stages.len() as f64),
            count("ran"),
            count("cached"),
            count("failed"),
            count("skipped"),
            Cell::Text(overrides.join(" ")),
        ]);
    }
    Ok(table)
}

/// Two experiments compared stage by stage.
#[derive(Debug, serde::Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    /// Params (vars and overrides) that differ: (name, value in a, value in b).
    pub params: Vec<(String, Value, Value)>,
    pub git: (Value, Value),
    pub stages: Vec<StageDiff>,
    /// Instances in both with the same key (their results are shared).
    pub shared: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct StageDiff {
    pub name: String,
    pub key_a: Option<String>,
    pub key_b: Option<String>,
    /// `same`, `differs`, `only_a`, `only_b`.
    pub relation: &'static str,
    /// Params of the instance that differ: (dotted name, a, b).
    pub params: Vec<(String, Value, Value)>,
    /// Metrics in either: (name, a, b, b - a).
    pub metrics: Vec<MetricDelta>,
}

#[derive(Debug, serde::Serialize)]
pub struct MetricDelta {
    pub name: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    pub delta: Option<f64>,
}

/// The named experiment, or an error listing the names there are.
pub fn find(
    cache: &Cache,
    pipeline: &str,
    name: &str,
) -> Result<Option<(Experiment, Vec<ExperimentStage>)>, CacheError> {
    cache.experiment(pipeline, name)
}

pub fn diff(
    cache: &Cache,
    (ea, sa): &(Experiment, Vec<ExperimentStage>),
    (eb, sb): &(Experiment, Vec<ExperimentStage>),
) -> Result<Diff, CacheError> {
    let pa = experiment_params(&ea.meta);
    let pb = experiment_params(&eb.meta);
    let names: BTreeSet<&String> = pa.keys().chain(pb.keys()).collect();
    let params = names
        .into_iter()
        .filter(|n| pa.get(*n) != pb.get(*n))
        .map(|n| {
            (
                n.clone(),
                pa.get(n).cloned().unwrap_or(Value::Null),
                pb.get(n).cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    let by_b: HashMap<&str, &ExperimentStage> = sb.iter().map(|s| (s.name.as_str(), s)).collect();
    let in_a: std::collections::HashSet<&str> = sa.iter().map(|s| s.name.as_str()).collect();
    let metrics_of = |key: &Option<String>| -> Result<BTreeMap<String, f64>, CacheError> {
        Ok(match key {
            Some(k) => cache.lookup_hit(k)?.map(|h| h.metrics).unwrap_or_default(),
            None => BTreeMap::new(),
        })
    };
    let mut stages = Vec::new();
    let mut shared = 0;
    let pairs = sa
        .iter()
        .map(|s| (Some(s), by_b.get(s.name.as_str()).copied()))
        .chain(
            sb.iter()
                .filter(|s| !in_a.contains(s.name.as_str()))
                .map(|s| (None, Some(s))),
        );
    for (a, b) in pairs {
        let name = a.or(b).map(|s| s.name.clone()).unwrap_or_default();
        let key_a = a.and_then(|s| s.key.clone());
        let key_b = b.and_then(|s| s.key.clone());
        let relation = match (a, b) {
            (Some(_), None) => "only_a",
            (None, Some(_)) => "only_b",
            _ if key_a.is_some() && key_a == key_b => "same",
            _ => "differs",
        };
        if relation == "same" {
            shared += 1;
        }
        let mut params = Vec::new();
        if let (Some(a), Some(b)) = (a, b) {
            let (mut la, mut lb) = (Vec::new(), Vec::new());
            flatten("", &a.params, &mut la);
            flatten("", &b.params, &mut lb);
            let ma: BTreeMap<String, Value> = la.into_iter().collect();
            let mb: BTreeMap<String, Value> = lb.into_iter().collect();
            let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            for k in keys {
                if ma.get(k) != mb.get(k) {
                    params.push((
                        k.clone(),
                        ma.get(k).cloned().unwrap_or(Value::Null),
                        mb.get(k).cloned().unwrap_or(Value::Null),
                    ));
                }
            }
        }
        let (ma, mb) = (metrics_of(&key_a)?, metrics_of(&key_b)?);
        let names: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
        let metrics = names
            .into_iter()
            .map(|n| {
                let (a, b) = (ma.get(n).copied(), mb.get(n).copied());
                MetricDelta {
                    name: n.clone(),
                    a,
                    b,
                    delta: a.zip(b).map(|(a, b)| b - a),
                }
            })
            .collect();
        stages.push(StageDiff {
            name,
            key_a,
            key_b,
            relation,
            params,
            metrics,
        });
    }
    Ok(Diff {
        a: ea.name.clone(),
        b: eb.name.clone(),
        params,
        git: (ea.meta["git"].clone(), eb.meta["git"].clone()),
        stages,
        shared,
    })
}

impl Diff {
    /// For a terminal: what differs, stage by stage; stages that share a key are listed by
    /// name only, and their metrics only with `all`.
    pub fn text(&self) -> String {
        use crate::table::format_number as num;
        let value = |v: &Value| match v {
            Value::Null => "–".to_string(),
            Value::Number(n) => n.as_f64().map(num).unwrap_or_else(|| n.to_string()),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let change = |a: &Value, b: &Value| -> String {
            let (a, b) = (value(a), value(b));
            let (sa, sb) = short_change(&a, &b);
            format!("{sa} -> {sb}")
        };
        let mut out = format!("{} -> {}\n", self.a, self.b);
        let commit = |g: &Value| -> String {
            match g.get("commit").and_then(Value::as_str) {
                Some(c) => format!(
                    "{}{}",
                    &c[..c.len().min(10)],
                    if g["dirty"].as_bool().unwrap_or(false) {
                        "+dirty"
                    } else {
                        ""
                    }
                ),
                None => "–".into(),
            }
        };
        if self.git.0 != self.git.1 {
            out.push_str(&format!(
                "git: {} -> {}\n",
                commit(&self.git.0),
                commit(&self.git.1)
            ));
        }
        if self.params.is_empty() {
            out.push_str("params: the same\n");
        } else {
            out.push_str("params:\n");
            for (k, a, b) in &self.params {
                out.push_str(&format!("  {k}: {}\n", change(a, b)));
            }
        }
        out.push_str(&format!(
            "stages: {} of {} share their key (and result)\n",
            self.shared,
            self.stages.len()
        ));
        for s in &self.stages {
            let short = |k: &Option<String>| {
                k.as_deref()
                    .map(|k| k[..k.len().min(12)].to_string())
                    .unwrap_or_else(|| "–".into())
            };
            match s.relation {
                "same" => {
                    out.push_str(&format!("  = {}  key {}\n", s.name, short(&s.key_a)));
                    continue;
                }
                "only_a" => out.push_str(&format!("  - {}  only in {}\n", s.name, self.a)),
                "only_b" => out.push_str(&format!("  + {}  only in {}\n", s.name, self.b)),
                _ => out.push_str(&format!(
                    "  ~ {}  key {} -> {}\n",
                    s.name,
                    short(&s.key_a),
                    short(&s.key_b)
                )),
            }
            for (k, a, b) in &s.params {
                out.push_str(&format!("      param  {k}: {}\n", change(a, b)));
            }
            for m in &s.metrics {
                let f = |v: Option<f64>| v.map(num).unwrap_or_else(|| "–".into());
                if m.a == m.b {
                    out.push_str(&format!("      metric {}: {} (same)\n", m.name, f(m.a)));
                    continue;
                }
                let delta = match (m.delta, m.a) {
                    (Some(d), Some(a)) if a != 0.0 => {
                        format!(
                            "  ({}{}, {:+.1}%)",
                            if d >= 0.0 { "+" } else { "" },
                            num(d),
                            100.0 * d / a.abs()
                        )
                    }
                    (Some(d), _) => format!("  ({}{})", if d >= 0.0 { "+" } else { "" }, num(d)),
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "      metric {}: {} -> {}{delta}\n",
                    m.name,
                    f(m.a),
                    f(m.b)
                ));
            }
        }
        out
    }
}

/// Two long texts shortened to the part that differs, with a little context either side.
fn short_change(a: &str, b: &str) -> (String, String) {
    const LONG: usize = 60;
    const CONTEXT: usize = 12;
    if a.chars().count() <= LONG && b.chars().count() <= LONG {
        return (a.to_string(), b.to_string());
    }
    let (ca, cb): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let prefix = ca.iter().zip(&cb).take_while(|(x, y)| x == y).count();
    let max_suffix = ca.len().min(cb.len()) - prefix;
    let suffix = ca
        .iter()
        .rev()
        .zip(cb.iter().rev())
        .take(max_suffix)
        .take_while(|(x, y)| x == y)
        .count();
    let cut = |c: &[char]| -> String {
        let start = prefix.saturating_sub(CONTEXT);
        let end = (c.len() - suffix + CONTEXT).min(c.len());
        format!(
            "{}{}{}",
            if start > 0 { "…" } else { "" },
            c[start..end].iter().collect::<String>(),
            if end < c.len() { "…" } else { "" }
        )
    };
    (cut(&ca), cut(&cb))
}

pub fn format_time(unix: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix.max(0.0));
    let s = humantime::format_rfc3339_seconds(t).to_string();
    // 2026-12-04T10:00:00Z -> 2026-12-04 10:00:00
    s.trim_end_matches('Z').replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_vars_and_other_overrides() {
        let meta = json!({
            "vars": {"lr": 0.1, "opt": {"kind": "sgd"}},
            "overrides": ["vars.lr=0.1", "stages.train.params.clip=2", "+stages.t.x=[1, 2]"],
        });
        let p = experiment_params(&meta);
        let keys: Vec<&str> = p.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "stages.t.x",
                "stages.train.params.clip",
                "vars.lr",
                "vars.opt.kind"
            ]
        );
        assert_eq!(p["stages.train.params.clip"], json!(2));
        assert_eq!(p["stages.t.x"], json!([1, 2]));
    }

    #[test]
    fn long_changes_show_what_differs() {
        let a = format!("{}0.1{}", "x".repeat(50), "y".repeat(50));
        let b = format!("{}0.25{}", "x".repeat(50), "y".repeat(50));
        let (sa, sb) = short_change(&a, &b);
        assert_eq!(sa, format!("…{}0.1{}…", "x".repeat(10), "y".repeat(12)));
        assert_eq!(sb, format!("…{}0.25{}…", "x".repeat(10), "y".repeat(12)));
        assert_eq!(short_change("a", "b"), ("a".into(), "b".into()));
    }

    #[test]
    fn selectors_in_metric_names() {
        let f = MetricFilter::parse(Some("train[width=8,seed=2].acc,steps"));
        assert_eq!(f.names.len(), 2);
        assert!(f.matches("train[seed=2,width=8]", "acc"));
        assert!(!f.matches("train[seed=1,width=8]", "acc"));
        assert!(f.matches("train[seed=1,width=8]", "steps"));
        assert!(names_metric(
            "train[seed=2,*].acc",
            "train[seed=2,width=4]",
            "acc"
        ));
        assert!(!names_metric("trai.acc", "train", "acc"));
    }

    #[test]
    fn metric_filter_names() {
        let f = MetricFilter::parse(Some("acc, train.loss,eval[seed=1].f1"));
        assert!(f.matches("eval[seed=0]", "acc"));
        assert!(f.matches("train[seed=3]", "loss"));
        assert!(!f.matches("eval", "loss"));
        assert!(f.matches("eval[seed=1]", "f1"));
        assert!(!f.matches("eval[seed=0]", "f1"));
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name("lr0.1-run_2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a b").is_err());
    }
}
