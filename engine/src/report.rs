//! `engine report`: paper-style tables and plots regenerated from cached results only.
//!
//! Declared in the pipeline under `report:`. Rows, columns, x axes and series are matrix
//! variables of a stage; cells aggregate a metric over the stage's other matrix variables
//! (typically seeds). Nothing is run: if any result a table needs is missing or stale, the
//! report names those stages and prints nothing partial. Every table and plot lists the stage
//! keys it came from.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cache::Cache;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ExecError;
use crate::plan::Plan;
use crate::spec::interpolate::render;
use crate::spec::{suggestion, SpecError};
use crate::status::stage_statuses;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    #[serde(default)]
    pub title: Option<String>,
    /// Free text printed under the title (what the paper reports, caveats).
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub tables: Vec<TableSpec>,
    #[serde(default)]
    pub plots: Vec<PlotSpec>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Mean and sample standard deviation.
    #[default]
    MeanStd,
    /// Mean and the half-width of a Student-t 95% confidence interval.
    MeanCi95,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub name: String,
    #[serde(default)]
    pub title: Option<String>,
    pub stage: String,
    /// Matrix variable giving the rows; without it (a stage with no matrix, or one value over
    /// every instance) there is one row, named after the stage.
    #[serde(default)]
    pub rows: String,
    /// Matrix variable giving the columns; without it there is one column, the metric.
    #[serde(default)]
    pub columns: Option<String>,
    pub metric: String,
    #[serde(default)]
    pub aggregate: Aggregate,
    /// Fixes other matrix variables (`{pde: poisson}`).
    #[serde(default)]
    pub filter: Map<String, Value>,
    #[serde(default = "default_digits")]
    pub digits: usize,
    /// What the paper says about this table, shown beside it.
    #[serde(default)]
    pub paper: Option<String>,
    /// The noise figure the table is read against (e.g. the seed-vs-seed tau of the same
    /// run), shown under it.
    #[serde(default)]
    pub noise: Option<NoiseSpec>,
}

/// A noise figure: a metric of a stage (the mean and spread when the selection holds several
/// instances), with its standard error when the stage records one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoiseSpec {
    pub stage: String,
    pub metric: String,
    /// The metric holding the figure's standard error.
    #[serde(default)]
    pub se: Option<String>,
    /// Fixes matrix variables of `stage`.
    #[serde(default)]
    pub filter: Map<String, Value>,
    /// What the figure is, e.g. "seed-vs-seed tau of the test accuracies".
    pub label: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlotSpec {
    pub name: String,
    #[serde(default)]
    pub title: Option<String>,
    pub stage: String,
    /// Matrix variable on the x axis (numeric values are placed by value).
    pub x: String,
    /// The metric on the y axis.
    pub y: String,
    /// Matrix variable giving one line each.
    #[serde(default)]
    pub series: Option<String>,
    #[serde(default)]
    pub log_x: bool,
    #[serde(default)]
    pub log_y: bool,
    #[serde(default)]
    pub aggregate: Aggregate,
    #[serde(default)]
    pub filter: Map<String, Value>,
    #[serde(default)]
    pub paper: Option<String>,
}

fn default_digits() -> usize {
    4
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Html,
}

/// What a report run produced.
pub struct ReportOutput {
    pub document: PathBuf,
    pub text: String,
    pub files: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("the report needs results that are not in the cache:\n{0}\nrun `engine run` on the pipeline first; nothing was written")]
    Missing(String),
    #[error("{0}")]
    Io(String),
    #[error("plot {name}: {message}")]
    Plot { name: String, message: String },
}

/// One aggregated cell.
#[derive(Debug, Clone)]
struct Cell {
    mean: f64,
    spread: f64,
    n: usize,
}

/// Values of a metric grouped by (row or x, column or series), with the keys used.
struct Grouped {
    rows: Vec<String>,
    cols: Vec<String>,
    cells: BTreeMap<(String, String), Vec<f64>>,
    provenance: Vec<(String, String)>,
    /// Instances that ran but recorded no value of the metric (undefined for that run, e.g. a
    /// correlation of a constant): shown as such, never as a number.
    absent: Vec<String>,
}

pub fn parse_spec(plan: &Plan) -> Result<Option<ReportSpec>, SpecError> {
    let Some(value) = &plan.pipeline.report else {
        return Ok(None);
    };
    let spec = ops::parse_params::<ReportSpec>(value).map_err(|e| {
        let field = if e.path.is_empty() {
            "report".to_string()
        } else {
            format!("report.{}", e.path)
        };
        plan.pipeline.locate(SpecError::new(field, e.message))
    })?;
    let names = spec
        .tables
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("report.tables.{i}.name"), &t.name))
        .chain(
            spec.plots
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("report.plots.{i}.name"), &p.name)),
        );
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    for (field, name) in names {
        if !is_plain_file_name(name) {
            return Err(plan.pipeline.locate(
                SpecError::new(
                    field,
                    format!("'{name}' is not a plain file name: it names the files written into the report folder"),
                )
                .fix("use letters, digits, '_', '-' and '.', with no '/' and not '.' or '..', e.g. `name: rel_l2_vs_n`"),
            ));
        }
        // A table writes no file of its own, so a table may share its plot's name.
        if !field.starts_with("report.plots.") {
            continue;
        }
        if let Some(first) = seen.insert(name, field.clone()) {
            return Err(plan.pipeline.locate(
                SpecError::new(
                    field,
                    format!("'{name}' is also the name of {first}: their {name}.svg and {name}.png would overwrite each other"),
                )
                .fix("give every plot its own name"),
            ));
        }
    }
    Ok(Some(spec))
}

/// One path segment that writes where it says: no separators, no `.`/`..`, no hidden or
/// control characters, short enough for any filesystem with a `.png` added.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `reports/<pipeline name>/` beside the pipeline: refused when the name is not a plain
/// folder name (it would write elsewhere); `--out` chooses another folder.
pub fn default_out_dir(plan: &Plan) -> Result<PathBuf, SpecError> {
    let name = &plan.pipeline.name;
    if !is_plain_file_name(name) {
        return Err(plan.pipeline.locate(
            SpecError::new(
                "name",
                format!("the pipeline's name '{name}' is not a plain folder name, and the report goes to reports/<name>/"),
            )
            .fix("rename the pipeline with letters, digits, '_', '-' and '.', or pass --out DIR"),
        ));
    }
    Ok(plan.pipeline.workspace.join("reports").join(name))
}

/// Builds the report from the cache. Fails, writing nothing, if a needed result is missing.
pub fn build(
    plan: &Plan,
    cache: &Cache,
    out_dir: &Path,
    format: Format,
) -> Result<ReportOutput, ReportError> {
    let spec = parse_spec(plan)?.ok_or_else(|| {
        plan.pipeline.locate(
            SpecError::new("report", "the pipeline has no `report:` section")
                .fix("add `report: {tables: [...], plots: [...]}` (see README, \"Reports\")"),
        )
    })?;
    let statuses = stage_statuses(plan, cache, &[])?;
    // Check everything first: a report is complete or not written at all.
    let wanted = wanted_nodes(plan, &spec, &statuses)?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| ReportError::Io(format!("{}: {e}", out_dir.display())))?;
    let title = spec
        .title
        .clone()
        .unwrap_or_else(|| format!("Report: {}", plan.pipeline.name));
    let mut md = format!("# {title}\n\n");
    let _ = writeln!(md, "Generated by `engine report` from cached results of `{}` (pipeline `{}`); nothing was rerun.\n", plan.pipeline.file.display(), plan.pipeline.name);
    for n in &spec.notes {
        let _ = writeln!(md, "{n}\n");
    }
    for (t, nodes) in spec.tables.iter().zip(&wanted) {
        let columns = t.columns.as_deref();
        let g = group(plan, cache, &statuses, nodes, &t.rows, columns, &t.metric)?;
        let title = t.title.clone().unwrap_or_else(|| t.name.clone());
        let _ = writeln!(md, "## {title}\n");
        md.push_str(&render_table(t, &g));
        if let Some(p) = &t.paper {
            let _ = writeln!(md, "\n**Paper:** {p}\n");
        }
        if let Some(n) = &t.noise {
            md.push_str(&noise_line(plan, cache, &statuses, n, t.digits)?);
        }
        md.push_str(&provenance(&g));
    }
    let mut files = Vec::new();
    for (p, nodes) in spec.plots.iter().zip(&wanted[spec.tables.len()..]) {
        let g = group(
            plan,
            cache,
            &statuses,
            nodes,
            &p.x,
            p.series.as_deref(),
            &p.y,
        )?;
        files.extend(plot_section(&mut md, p, &g, out_dir)?);
    }
    let (document, text) = match format {
        Format::Markdown => (out_dir.join("report.md"), md.clone()),
        Format::Html => (out_dir.join("report.html"), to_html(&title, &md)),
    };
    std::fs::write(&document, &text)
        .map_err(|e| ReportError::Io(format!("{}: {e}", document.display())))?;
    files.insert(0, document.clone());
    Ok(ReportOutput {
        document,
        text: md,
        files,
    })
}

/// The nodes each table, then each plot, of `spec` shows; an error listing every one of them
/// that is not cached, with why.
fn wanted_nodes(
    plan: &Plan,
    spec: &ReportSpec,
    statuses: &[crate::status::NodeStatus],
) -> Result<Vec<Vec<usize>>, ReportError> {
    let mut missing: Vec<String> = Vec::new();
    let mut wanted: Vec<Vec<usize>> = Vec::new();
    let selections = spec
        .tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("report.tables.{i}"),
                &t.stage,
                &t.filter,
                vec![Some(&t.rows), t.columns.as_ref()],
            )
        })
        .chain(spec.plots.iter().enumerate().map(|(i, p)| {
            (
                format!("report.plots.{i}"),
                &p.stage,
                &p.filter,
                vec![Some(&p.x), p.series.as_ref()],
            )
        }))
        .chain(spec.tables.iter().enumerate().filter_map(|(i, t)| {
            let n = t.noise.as_ref()?;
            Some((
                format!("report.tables.{i}.noise"),
                &n.stage,
                &n.filter,
                vec![],
            ))
        }));
    for (field, stage, filter, vars) in selections {
        let vars: Vec<&String> = vars.into_iter().flatten().collect();
        let nodes = select_nodes(plan, &field, stage, filter, &vars)?;
        for &i in &nodes {
            let name = &plan.nodes[i].name;
            let listed = missing.iter().any(|m| m.starts_with(&format!("  {name} ")));
            if !statuses[i].cached && !listed {
                missing.push(format!(
                    "  {name} ({}): {}",
                    crate::status::status_word(&statuses[i]),
                    statuses[i].reasons.join("; ")
                ));
            }
        }
        wanted.push(nodes);
    }
    if !missing.is_empty() {
        return Err(ReportError::Missing(missing.join("\n")));
    }
    Ok(wanted)
}

/// A plot's section: the figure, drawn to `<name>.svg` and `<name>.png` in `out_dir`, then
/// its data as a table. Returns the two files.
fn plot_section(
    md: &mut String,
    p: &PlotSpec,
    g: &Grouped,
    out_dir: &Path,
) -> Result<[PathBuf; 2], ReportError> {
    let svg = out_dir.join(format!("{}.svg", p.name));
    let png = out_dir.join(format!("{}.png", p.name));
    draw(p, g, &svg, &png)?;
    let title = p.title.clone().unwrap_or_else(|| p.name.clone());
    let _ = writeln!(md, "## {title}\n");
    let _ = writeln!(md, "![{}]({}.svg)\n", p.name, p.name);
    let table = TableSpec {
        name: p.name.clone(),
        title: None,
        stage: p.stage.clone(),
        rows: p.x.clone(),
        columns: p.series.clone(),
        metric: p.y.clone(),
        aggregate: p.aggregate,
        filter: Map::new(),
        digits: 4,
        paper: None,
        noise: None,
    };
    md.push_str(&render_table(&table, g));
    if let Some(text) = &p.paper {
        let _ = writeln!(md, "\n**Paper:** {text}\n");
    }
    md.push_str(&provenance(g));
    Ok([svg, png])
}

/// The line under a table giving its noise figure: `label = mean (standard error se)` for one
/// instance, the mean and spread over several; "not measured" when no instance recorded the
/// metric (a one-seed run has no seed-vs-seed figure), which is said, not hidden.
fn noise_line(
    plan: &Plan,
    cache: &Cache,
    statuses: &[crate::status::NodeStatus],
    n: &NoiseSpec,
    digits: usize,
) -> Result<String, ReportError> {
    let nodes = select_nodes(plan, "report.noise", &n.stage, &n.filter, &[])?;
    let mut values: Vec<f64> = Vec::new();
    let mut errors: Vec<f64> = Vec::new();
    for &i in &nodes {
        let key = statuses[i].key.clone().unwrap_or_default();
        let record = cache
            .lookup(&key)
            .map_err(ExecError::from)?
            .ok_or_else(|| ReportError::Missing(format!("  {}", plan.nodes[i].name)))?;
        if let Some(v) = record.metrics.get(&n.metric) {
            values.push(*v);
        }
        if let Some(v) = n.se.as_ref().and_then(|se| record.metrics.get(se)) {
            errors.push(*v);
        }
    }
    let text = match values.len() {
        0 => format!(
            "not measured (stage `{}` recorded no `{}`: a figure over seeds or cells needs two or more)",
            n.stage, n.metric
        ),
        1 => match errors.first() {
            Some(se) => format!("{:.d$} (standard error {se:.d$})", values[0], d = digits),
            None => format!("{:.d$}", values[0], d = digits),
        },
        k => {
            let cell = aggregate(&values, Aggregate::MeanStd);
            format!("{:.d$} ± {:.d$} (n={k})", cell.mean, cell.spread, d = digits)
        }
    };
    Ok(format!(
        "\n**Noise, same run:** {} = {text} (stage `{}`)\n",
        n.label, n.stage
    ))
}

/// The nodes of `stage` matching `filter`, checking that the named variables exist.
fn select_nodes(
    plan: &Plan,
    field: &str,
    stage: &str,
    filter: &Map<String, Value>,
    vars: &[&String],
) -> Result<Vec<usize>, SpecError> {
    let Some(spec) = plan.pipeline.stage(stage) else {
        let names: Vec<&str> = plan
            .pipeline
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        return Err(plan.pipeline.locate(
            SpecError::new(format!("{field}.stage"), format!("no stage '{stage}'"))
                .fix(suggestion(stage, names.iter().copied())),
        ));
    };
    let known: Vec<&str> = spec.matrix.iter().map(|(k, _)| k.as_str()).collect();
    for v in vars
        .iter()
        .map(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .chain(filter.keys().map(String::as_str))
    {
        if !known.contains(&v) {
            return Err(plan.pipeline.locate(
                SpecError::new(
                    field.to_string(),
                    format!("stage '{stage}' has no matrix variable '{v}'"),
                )
                .fix(suggestion(v, known.iter().copied())),
            ));
        }
    }
    Ok(plan
        .select(stage)
        .into_iter()
        .filter(|&i| {
            filter
                .iter()
                .all(|(k, v)| plan.nodes[i].matrix.get(k).map(render) == Some(render(v)))
        })
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn group(
    plan: &Plan,
    cache: &Cache,
    statuses: &[crate::status::NodeStatus],
    nodes: &[usize],
    row_var: &str,
    col_var: Option<&str>,
    metric: &str,
) -> Result<Grouped, ReportError> {
    let mut rows: Vec<String> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut provenance = Vec::new();
    let mut absent = Vec::new();
    let mut have_any: std::collections::BTreeSet<String> = Default::default();
    for &i in nodes {
        let node = &plan.nodes[i];
        let key = statuses[i].key.clone().unwrap_or_default();
        let record = cache
            .lookup(&key)
            .map_err(ExecError::from)?
            .ok_or_else(|| ReportError::Missing(format!("  {}", node.name)))?;
        let r = match row_var {
            "" => node.stage.clone(),
            _ => node.matrix.get(row_var).map(render).unwrap_or_default(),
        };
        let c = col_var
            .and_then(|c| node.matrix.get(c))
            .map(render)
            .unwrap_or_else(|| metric.to_string());
        provenance.push((node.name.clone(), key));
        if !rows.contains(&r) {
            rows.push(r.clone());
        }
        if !cols.contains(&c) {
            cols.push(c.clone());
        }
        let Some(&value) = record.metrics.get(metric) else {
            absent.push(node.name.clone());
            have_any.extend(record.metrics.keys().cloned());
            continue;
        };
        cells.entry((r, c)).or_default().push(value);
    }
    // No instance has the metric at all: a misspelt name, not an undefined value.
    if cells.is_empty() && !absent.is_empty() {
        let have: Vec<String> = have_any.into_iter().collect();
        return Err(ReportError::Spec(
            plan.pipeline.locate(
                SpecError::new(
                    "report",
                    format!("stage {} recorded no metric '{metric}'", absent[0]),
                )
                .fix(format!(
                    "its metrics are: {}",
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                )),
            ),
        ));
    }
    Ok(Grouped {
        rows,
        cols,
        cells,
        provenance,
        absent,
    })
}

/// Two-sided 95% Student-t quantiles for 1..=30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

fn aggregate(values: &[f64], how: Aggregate) -> Cell {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    let var = if n > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    let std = var.sqrt();
    let spread = match how {
        Aggregate::MeanStd => std,
        Aggregate::MeanCi95 if n > 1 => {
            T95.get(n - 2).copied().unwrap_or(1.96) * std / (n as f64).sqrt()
        }
        Aggregate::MeanCi95 => 0.0,
    };
    Cell { mean, spread, n }
}

fn render_table(t: &TableSpec, g: &Grouped) -> String {
    let mut out = String::new();
    let corner = match &t.columns {
        Some(c) => format!("{} \\ {}", t.rows, c),
        None if t.rows.is_empty() => "stage".to_string(),
        None => t.rows.clone(),
    };
    let _ = writeln!(out, "| {corner} | {} |", g.cols.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(g.cols.len() + 1));
    let pm = match t.aggregate {
        Aggregate::MeanStd => "±",
        Aggregate::MeanCi95 => "± (95% CI)",
    };
    for r in &g.rows {
        let mut line = format!("| {r} |");
        for c in &g.cols {
            match g.cells.get(&(r.clone(), c.clone())) {
                Some(v) => {
                    let cell = aggregate(v, t.aggregate);
                    if cell.n > 1 {
                        let _ = write!(
                            line,
                            " {:.d$} {pm} {:.d$} (n={}) |",
                            cell.mean,
                            cell.spread,
                            cell.n,
                            d = t.digits
                        );
                    } else {
                        let _ = write!(line, " {:.d$} |", cell.mean, d = t.digits);
                    }
                }
                None => line.push_str(" – |"),
            }
        }
        let _ = writeln!(out, "{line}");
    }
    if !g.absent.is_empty() {
        let names: Vec<String> = g.absent.iter().map(|n| format!("`{n}`")).collect();
        let _ = writeln!(
            out,
            "\n– : not recorded (undefined for that run) by {}",
            names.join(", ")
        );
    }
    out
}

fn provenance(g: &Grouped) -> String {
    let mut out = String::from("\n<details><summary>Provenance: stage keys</summary>\n\n");
    for (name, key) in &g.provenance {
        let _ = writeln!(out, "- `{name}` {}", &key[..16.min(key.len())]);
    }
    out.push_str("\n</details>\n\n");
    out
}

fn to_html(title: &str, md: &str) -> String {
    // A small, dependency-free rendering of the Markdown this module writes.
    let mut body = String::new();
    let mut in_table = false;
    for line in md.lines() {
        let esc = line
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        if line.starts_with('|') {
            if line.starts_with("|---") {
                continue;
            }
            if !in_table {
                body.push_str("<table>\n");
                in_table = true;
            }
            let cells: Vec<&str> = esc.trim_matches('|').split('|').map(str::trim).collect();
            let _ = writeln!(
                body,
                "<tr>{}</tr>",
                cells
                    .iter()
                    .map(|c| format!("<td>{c}</td>"))
                    .collect::<String>()
            );
            continue;
        }
        if in_table {
            body.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = line.strip_prefix("## ") {
            let _ = writeln!(body, "<h2>{h}</h2>");
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = writeln!(body, "<h1>{h}</h1>");
        } else if let Some(rest) = line.strip_prefix("![") {
            if let Some((alt, src)) = rest.split_once("](") {
                let _ = writeln!(
                    body,
                    "<img alt=\"{alt}\" src=\"{}\">",
                    src.trim_end_matches(')')
                );
            }
        } else if line.starts_with("<details") || line.starts_with("</details") {
            body.push_str(line);
            body.push('\n');
        } else if !line.is_empty() {
            let _ = writeln!(body, "<p>{esc}</p>");
        }
    }
    if in_table {
        body.push_str("</table>\n");
    }
    format!("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>body{{font-family:sans-serif;max-width:60em;margin:auto}}table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:.2em .5em}}</style></head><body>\n{body}</body></html>\n")
}

/// Axis labels: four significant digits, scientific outside [1e-3, 1e5).
fn short_number(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e5).contains(&a) {
        let digits = (3 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        format!("{v:.2e}")
    }
}

/// The font plotters draws text with (bundled: nothing is needed on the machine).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// (x, mean, spread) of one plotted point.
type Point = (f64, f64, f64);
/// A plot line: its name and points.
type Series = (String, Vec<Point>);
/// An axis range, low to high.
type Span = (f64, f64);

/// One line per column of `g`: its (x, mean, spread) points sorted by x. x is a row's value
/// when every row is a number (returned too), its position otherwise.
fn plot_series(p: &PlotSpec, g: &Grouped) -> (Vec<Series>, Option<Vec<f64>>) {
    let numeric: Option<Vec<f64>> = g.rows.iter().map(|r| r.parse::<f64>().ok()).collect();
    let xs: Vec<f64> = numeric
        .clone()
        .unwrap_or_else(|| (0..g.rows.len()).map(|i| i as f64).collect());
    let mut series: Vec<Series> = Vec::new();
    for c in &g.cols {
        let mut pts = Vec::new();
        for (x, r) in xs.iter().zip(&g.rows) {
            if let Some(v) = g.cells.get(&(r.clone(), c.clone())) {
                let cell = aggregate(v, p.aggregate);
                pts.push((*x, cell.mean, cell.spread));
            }
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push((c.clone(), pts));
    }
    (series, numeric)
}

/// `v`, or the smallest positive number when `v` is not positive (for a log axis).
fn positive(v: f64) -> f64 {
    if v > 0.0 {
        v
    } else {
        f64::MIN_POSITIVE
    }
}

/// The x and y ranges holding every point with its error bar, widened when flat.
fn plot_ranges(p: &PlotSpec, series: &[Series]) -> Result<(Span, Span), String> {
    let all: Vec<&(f64, f64, f64)> = series.iter().flat_map(|(_, s)| s).collect();
    if all.is_empty() {
        return Err("no points".into());
    }
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1 - p.2), b.max(p.1 + p.2))
        });
    if p.log_x && x0 <= 0.0 || p.log_y && y0 <= 0.0 && all.iter().any(|q| q.1 <= 0.0) {
        return Err("a log axis needs positive values".into());
    }
    if p.log_y {
        y0 = positive(y0).min(all.iter().map(|q| q.1).fold(f64::INFINITY, f64::min));
    }
    if x0 == x1 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    if y0 == y1 {
        y0 -= 0.5 * y0.abs().max(1e-9);
        y1 += 0.5 * y1.abs().max(1e-9);
    }
    Ok(((x0, x1), (y0, y1)))
}

fn draw(p: &PlotSpec, g: &Grouped, svg: &Path, png: &Path) -> Result<(), ReportError> {
    use plotters::prelude::*;
    register_font();
    let plot_err = |e: String| ReportError::Plot {
        name: p.name.clone(),
        message: e,
    };
    let (series, numeric) = plot_series(p, g);
    let ((x0, x1), (y0, y1)) = plot_ranges(p, &series).map_err(plot_err)?;
    let title = p.title.clone().unwrap_or_else(|| p.name.clone());
    let labels: Vec<String> = g.rows.clone();
    macro_rules! render {
        ($backend:expr) => {{
            let root = $backend.into_drawing_area();
            root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
            let mut builder = ChartBuilder::on(&root);
            builder
                .caption(&title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70);
            macro_rules! body {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    let nonnumeric = numeric.is_none();
                    let labels = labels.clone();
                    chart
                        .configure_mesh()
                        .x_desc(p.x.as_str())
                        .y_desc(p.y.as_str())
                        .x_label_formatter(&|v: &f64| {
                            if nonnumeric {
                                labels.get(v.round() as usize).cloned().unwrap_or_default()
                            } else {
                                format!("{v}")
                            }
                        })
                        .y_label_formatter(&|v: &f64| short_number(*v))
                        .draw()
                        .map_err(|e| plot_err(e.to_string()))?;
                    for (k, (name, pts)) in series.iter().enumerate() {
                        let color = Palette99::pick(k).to_rgba();
                        chart
                            .draw_series(LineSeries::new(
                                pts.iter().map(|q| (q.0, q.1)),
                                color.stroke_width(2),
                            ))
                            .map_err(|e| plot_err(e.to_string()))?
                            .label(name.as_str())
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                            });
                        chart
                            .draw_series(
                                pts.iter()
                                    .map(|q| Circle::new((q.0, q.1), 3, color.filled())),
                            )
                            .map_err(|e| plot_err(e.to_string()))?;
                        chart
                            .draw_series(pts.iter().filter(|q| q.2 > 0.0).map(|q| {
                                let lo = if p.log_y {
                                    positive(q.1 - q.2)
                                } else {
                                    q.1 - q.2
                                };
                                ErrorBar::new_vertical(
                                    q.0,
                                    lo,
                                    q.1,
                                    q.1 + q.2,
                                    color.stroke_width(1),
                                    6,
                                )
                            }))
                            .map_err(|e| plot_err(e.to_string()))?;
                    }
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(|e| plot_err(e.to_string()))?;
                }};
            }
            match (p.log_x, p.log_y) {
                (false, false) => body!(builder
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(|e| plot_err(e.to_string()))?),
                (true, false) => body!(builder
                    .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                    .map_err(|e| plot_err(e.to_string()))?),
                (false, true) => body!(builder
                    .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                    .map_err(|e| plot_err(e.to_string()))?),
                (true, true) => body!(builder
                    .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                    .map_err(|e| plot_err(e.to_string()))?),
            }
            root.present().map_err(|e| plot_err(e.to_string()))?;
        }};
    }
    render!(SVGBackend::new(svg, (800, 500)));
    render!(BitMapBackend::new(png, (800, 500)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        for ok in ["rel_l2_vs_n", "tau-ntk", "fig.1", "A9"] {
            assert!(is_plain_file_name(ok), "{ok}");
        }
        for bad in [
            "", ".", "..", "../../x", "a/b", "/etc/x", "a b", "a\\b", "x\0",
        ] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
        assert!(!is_plain_file_name(&"x".repeat(201)));
    }
}
