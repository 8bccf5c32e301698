//! Commands that read results out of the cache and print or copy them: `exp`, `table`,
//! `export`, `path`, `checkout`, `config`. None runs a stage or writes the cache, except
//! `exp remove`, which forgets an experiment record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cache::Cache;
use clap::{Args, Subcommand, ValueEnum};
use engine::experiments::{self, MetricFilter, ShowOptions};
use engine::plan::Plan;
use engine::spec::Pipeline;
use engine::status::{stage_statuses, status_word};
use engine::table::{flatten, Cell, Table, TableFormat};
use serde_json::{json, Map, Value};

use super::{
    cache_dir, check_cache_dir, display_path, load_plan, open_cache, select, targeted, Exit,
    PipelineArgs, EXIT_BAD_INPUT, EXIT_OK, EXIT_STAGE_FAILED,
};

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Aligned columns.
    Table,
    /// A Markdown table.
    Md,
    Csv,
    /// A list of JSON records.
    Json,
}

impl From<FormatArg> for TableFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Table => TableFormat::Text,
            FormatArg::Md => TableFormat::Markdown,
            FormatArg::Csv => TableFormat::Csv,
            FormatArg::Json => TableFormat::Json,
        }
    }
}

#[derive(Subcommand)]
pub enum ExpCommand {
    /// One line per named experiment: when, which commit, what it ran, its overrides.
    List(ExpListArgs),
    /// One row per experiment: the params that differ and the chosen metrics.
    Show(ExpShowArgs),
    /// Two experiments side by side: params and metrics with deltas, stage by stage.
    Diff(ExpDiffArgs),
    /// Forget experiments (their results then go with the next `engine gc` that drops them).
    Remove(ExpRemoveArgs),
}

#[derive(Args)]
pub struct ExpPipelineArgs {
    /// The pipeline file (YAML) whose experiments to read.
    pipeline: PathBuf,
    /// Cache folder (default: .engine/ beside the pipeline file).
    #[arg(long, env = "ENGINE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExpListArgs {
    #[command(flatten)]
    pipeline: ExpPipelineArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    format: FormatArg,
}

#[derive(Args)]
pub struct ExpShowArgs {
    #[command(flatten)]
    pipeline: ExpPipelineArgs,
    /// Hide metric columns equal in every row too (params that do not differ are hidden
    /// anyway, unless --all-params).
    #[arg(long)]
    only_changed: bool,
    /// Show every param, also those equal in all experiments.
    #[arg(long)]
    all_params: bool,
    /// Metrics to show: `acc` (any stage), `eval.acc` (every instance of a stage),
    /// `eval[seed=0].acc`; comma-separated (default: every metric of the final stages).
    #[arg(long, value_name = "LIST")]
    metrics: Option<String>,
    /// Sort by a column: `vars.lr`, `eval.acc`, `eval[seed=0].acc`.
    #[arg(long, value_name = "COLUMN")]
    sort_by: Option<String>,
    /// With --sort-by: largest first.
    #[arg(long, requires = "sort_by")]
    desc: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    format: FormatArg,
}

#[derive(Args)]
pub struct ExpDiffArgs {
    #[command(flatten)]
    pipeline: ExpPipelineArgs,
    /// The experiment compared against.
    a: String,
    /// The experiment compared.
    b: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExpRemoveArgs {
    #[command(flatten)]
    pipeline: ExpPipelineArgs,
    /// Experiment names.
    #[arg(required = true)]
    names: Vec<String>,
}

#[derive(Args)]
pub struct TableArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The stage, or a selector of some of its instances (`train[lr=0.1,*]`).
    stage: String,
    /// Metrics to show, comma-separated (default: all the instances recorded).
    #[arg(long, value_name = "LIST")]
    metrics: Option<String>,
    /// Average over these matrix variables (comma-separated): one row per value of the
    /// others, with each metric's mean, sample standard deviation and count.
    #[arg(long, value_name = "VARS")]
    mean_over: Option<String>,
    /// Sort by a column.
    #[arg(long, value_name = "COLUMN")]
    sort_by: Option<String>,
    /// With --sort-by: largest first.
    #[arg(long, requires = "sort_by")]
    desc: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    format: FormatArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Csv,
    /// A list of JSON records (`pandas.read_json`).
    Json,
    /// Apache Parquet (`pandas.read_parquet`); needs --out.
    Parquet,
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Only these stages and what they need (default: every stage).
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    format: ExportFormat,
    /// Write to this file instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct PathArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// One stage instance (`train[seed=0]`).
    stage: String,
    /// A file of its outputs (`model.safetensors`).
    file: String,
}

#[derive(Args)]
pub struct CheckoutArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// A stage, an instance or a selector; several instances go into one folder each.
    stage: String,
    /// The folder to copy the outputs into (created if missing).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Overwrite files that exist there already.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Print every stage instance (matrices expanded, inputs resolved) instead of the stages.
    #[arg(long)]
    expand: bool,
    /// Print JSON instead of YAML.
    #[arg(long)]
    json: bool,
}

fn bad_input(message: String) -> Exit {
    Exit {
        code: EXIT_BAD_INPUT,
        message: format!("error: {message}"),
    }
}

fn failure(message: String) -> Exit {
    Exit {
        code: EXIT_STAGE_FAILED,
        message: format!("error: {message}"),
    }
}

/// The pipeline (for its name and stages) and its existing cache.
fn open_experiments(args: &ExpPipelineArgs) -> Result<(Pipeline, Cache), Exit> {
    let pipeline = Pipeline::load(&args.pipeline, &[])?;
    let dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => pipeline.workspace.join(".engine"),
    };
    if !dir.join("cache.db").is_file() {
        return Err(bad_input(format!(
            "{} has no cache yet ({} is missing); `engine run {} --name NAME` records an experiment",
            display_path(&args.pipeline),
            dir.display(),
            display_path(&args.pipeline)
        )));
    }
    let cache = Cache::open(&dir)?;
    Ok((pipeline, cache))
}

/// Stages no other stage takes as input: where a pipeline's results are.
fn final_stages(pipeline: &Pipeline) -> BTreeSet<String> {
    let used: BTreeSet<&str> = pipeline
        .stages
        .iter()
        .flat_map(|s| s.inputs.iter())
        .map(|(_, r)| r.split('[').next().unwrap_or(r).trim())
        .collect();
    pipeline
        .stages
        .iter()
        .filter(|s| !used.contains(s.name.as_str()))
        .map(|s| s.name.clone())
        .collect()
}

pub fn cmd_exp(command: ExpCommand) -> Result<i32, Exit> {
    match command {
        ExpCommand::List(args) => {
            let (pipeline, cache) = open_experiments(&args.pipeline)?;
            let table = experiments::list(&cache, &pipeline.name)?;
            if table.rows.is_empty() {
                eprintln!(
                    "no experiments of '{}' yet; `engine run {} --name NAME` records one",
                    pipeline.name,
                    display_path(&args.pipeline.pipeline)
                );
            }
            print!("{}", table.render(args.format.into()));
        }
        ExpCommand::Show(args) => {
            let (pipeline, cache) = open_experiments(&args.pipeline)?;
            let options = ShowOptions {
                all_params: args.all_params,
                only_changed: args.only_changed,
                metrics: MetricFilter::parse(args.metrics.as_deref()),
                default_stages: final_stages(&pipeline),
                sort_by: args.sort_by.clone(),
                descending: args.desc,
            };
            let table =
                experiments::show(&cache, &pipeline.name, &options).map_err(|e| match e {
                    experiments::ShowError::Cache(c) => Exit::from(c),
                    other => bad_input(format!("--sort-by: {other}")),
                })?;
            if table.rows.is_empty() {
                eprintln!(
                    "no experiments of '{}' yet; `engine run {} --name NAME` records one",
                    pipeline.name,
                    display_path(&args.pipeline.pipeline)
                );
            }
            print!("{}", table.render(args.format.into()));
        }
        ExpCommand::Diff(args) => {
            let (pipeline, cache) = open_experiments(&args.pipeline)?;
            let get = |name: &str| -> Result<_, Exit> {
                experiments::find(&cache, &pipeline.name, name)?.ok_or_else(|| {
                    let names: Vec<String> = cache
                        .experiments(&pipeline.name)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|e| e.name)
                        .collect();
                    bad_input(format!(
                        "there is no experiment '{name}' of '{}'\n  fix: {}",
                        pipeline.name,
                        engine::spec::suggestion(name, names.iter().map(String::as_str))
                    ))
                })
            };
            let (a, b) = (get(&args.a)?, get(&args.b)?);
            let diff = experiments::diff(&cache, &a, &b)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&diff).unwrap_or_default()
                );
            } else {
                print!("{}", diff.text());
            }
        }
        ExpCommand::Remove(args) => {
            let (pipeline, cache) = open_experiments(&args.pipeline)?;
            let mut missing = Vec::new();
            for name in &args.names {
                if cache.remove_experiment(&pipeline.name, name)? {
                    println!("removed experiment '{name}'");
                } else {
                    missing.push(name.as_str());
                }
            }
            if !missing.is_empty() {
                return Err(bad_input(format!(
                    "no experiment named {} ('engine exp list' shows them)",
                    missing.join(", ")
                )));
            }
        }
    }
    Ok(EXIT_OK)
}

/// One node's standing in the cache: its status word, its key (when its inputs have results),
/// and its run record when the result is current.
struct Current {
    status: String,
    key: Option<String>,
    record: Option<cache::RunRecord>,
}

/// The current result of each node, if cached: its record.
fn cached_records(plan: &Plan, cache: &Cache, nodes: &[usize]) -> Result<Vec<Current>, Exit> {
    let statuses = stage_statuses(plan, cache, &[])?;
    let mut out = Vec::with_capacity(nodes.len());
    for &i in nodes {
        let s = &statuses[i];
        let record = match &s.key {
            Some(k) if s.cached => cache.lookup(k)?,
            _ => None,
        };
        out.push(Current {
            status: status_word(s).to_string(),
            key: s.key.clone(),
            record,
        });
    }
    Ok(out)
}

pub fn cmd_table(args: TableArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    let plan = targeted(plan, std::slice::from_ref(&args.stage))?;
    let nodes = select(&plan, &args.stage)?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let records = cached_records(&plan, &cache, &nodes)?;
    let filter = MetricFilter::parse(args.metrics.as_deref());
    let vars: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for &i in &nodes {
            for k in plan.nodes[i].matrix.keys() {
                if !v.contains(k) {
                    v.push(k.clone());
                }
            }
        }
        v
    };
    let mut metric_names: Vec<String> = Vec::new();
    for (Current { record, .. }, &i) in records.iter().zip(&nodes) {
        for m in record.iter().flat_map(|r| r.metrics.keys()) {
            if (filter.is_empty() || filter.matches(&plan.nodes[i].name, m))
                && !metric_names.contains(m)
            {
                metric_names.push(m.clone());
            }
        }
    }
    if let Some(missing) = filter
        .names
        .iter()
        .find(|n| !metric_names.iter().any(|m| n.ends_with(m.as_str())))
    {
        let all: BTreeSet<&String> = records
            .iter()
            .flat_map(|c| c.record.iter().flat_map(|r| r.metrics.keys()))
            .collect();
        if !all.is_empty() {
            return Err(bad_input(format!(
                "--metrics: no cached instance of '{}' has '{missing}'\n  fix: {}",
                args.stage,
                engine::spec::suggestion(missing, all.iter().map(|s| s.as_str()))
            )));
        }
    }
    let mean_over: Vec<String> = args
        .mean_over
        .as_deref()
        .map(|l| {
            l.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for v in &mean_over {
        if !vars.contains(v) {
            return Err(bad_input(format!(
                "--mean-over {v}: '{}' has no matrix variable '{v}'\n  fix: {}",
                args.stage,
                engine::spec::suggestion(v, vars.iter().map(String::as_str))
            )));
        }
    }
    let mut table = if mean_over.is_empty() {
        let any_stale = records.iter().any(|c| c.status != "cached");
        let mut columns = vars.clone();
        if vars.is_empty() {
            columns.insert(0, "instance".into());
        }
        if any_stale {
            columns.push("status".into());
        }
        columns.extend(metric_names.iter().cloned());
        let mut t = Table::new(columns);
        for (Current { status, record, .. }, &i) in records.iter().zip(&nodes) {
            let node = &plan.nodes[i];
            let mut row: Vec<Cell> = if vars.is_empty() {
                vec![Cell::Text(node.name.clone())]
            } else {
                vars.iter()
                    .map(|v| {
                        node.matrix
                            .get(v)
                            .map(Cell::from_json)
                            .unwrap_or(Cell::Empty)
                    })
                    .collect()
            };
            if any_stale {
                row.push(Cell::Text(status.clone()));
            }
            for m in &metric_names {
                let v = record.as_ref().and_then(|r| r.metrics.get(m));
                row.push(v.map(|v| Cell::Number(*v)).unwrap_or(Cell::Empty));
            }
            t.rows.push(row);
        }
        t
    } else {
        let keep: Vec<&String> = vars.iter().filter(|v| !mean_over.contains(v)).collect();
        let mut groups: Vec<(Vec<Cell>, Vec<usize>)> = Vec::new();
        for (pos, &i) in nodes.iter().enumerate() {
            let node = &plan.nodes[i];
            let key: Vec<Cell> = keep
                .iter()
                .map(|v| {
                    node.matrix
                        .get(*v)
                        .map(Cell::from_json)
                        .unwrap_or(Cell::Empty)
                })
                .collect();
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(pos),
                None => groups.push((key, vec![pos])),
            }
        }
        let mut columns: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        columns.push("n".into());
        for m in &metric_names {
            columns.push(format!("{m} (mean)"));
            columns.push(format!("{m} (std)"));
        }
        let mut t = Table::new(columns);
        for (key, members) in groups {
            let mut row = key;
            let cached = members
                .iter()
                .filter(|&&p| records[p].record.is_some())
                .count();
            row.push(Cell::Number(cached as f64));
            for m in &metric_names {
                let values: Vec<f64> = members
                    .iter()
                    .filter_map(|&p| records[p].record.as_ref().and_then(|r| r.metrics.get(m)))
                    .copied()
                    .filter(|v| v.is_finite())
                    .collect();
                let n = values.len() as f64;
                let mean = (n > 0.0).then(|| values.iter().sum::<f64>() / n);
                let std = mean.filter(|_| n > 1.0).map(|mu| {
                    (values.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
                });
                row.push(mean.map(Cell::Number).unwrap_or(Cell::Empty));
                row.push(std.map(Cell::Number).unwrap_or(Cell::Empty));
            }
            t.rows.push(row);
        }
        t
    };
    if let Some(by) = &args.sort_by {
        let i = table
            .column(by)
            .or_else(|| table.column(&format!("{by} (mean)")))
            .ok_or_else(|| {
                bad_input(format!(
                    "--sort-by {by}: there is no such column; the columns are: {}",
                    table.columns.join(", ")
                ))
            })?;
        table.sort_by_column(i, args.desc);
    }
    let stale = records.iter().filter(|c| c.status != "cached").count();
    if stale > 0 {
        eprintln!(
            "{stale} of {} instances are not cached; `engine run {} '{}'` computes them",
            records.len(),
            display_path(&args.pipeline.pipeline),
            args.stage
        );
    }
    print!("{}", table.render(args.format.into()));
    Ok(EXIT_OK)
}

pub fn cmd_export(args: ExportArgs) -> Result<i32, Exit> {
    if matches!(args.format, ExportFormat::Parquet) && args.out.is_none() {
        return Err(bad_input(
            "--format parquet writes a binary file: give it with --out FILE".into(),
        ));
    }
    let plan = targeted(load_plan(&args.pipeline)?, &args.targets)?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let nodes: Vec<usize> = (0..plan.nodes.len()).collect();
    let records = cached_records(&plan, &cache, &nodes)?;
    let table = export_table(&plan, &records);
    match (args.format, &args.out) {
        (ExportFormat::Parquet, Some(out)) => {
            table
                .write_parquet(out)
                .map_err(|e| failure(format!("cannot write {}: {e}", out.display())))?;
        }
        (format, out) => {
            let text = table.render(match format {
                ExportFormat::Json => TableFormat::Json,
                _ => TableFormat::Csv,
            });
            match out {
                Some(out) => std::fs::write(out, text)
                    .map_err(|e| failure(format!("cannot write {}: {e}", out.display())))?,
                None => print!("{text}"),
            }
        }
    }
    if let Some(out) = &args.out {
        eprintln!("wrote {} rows to {}", table.rows.len(), out.display());
    }
    Ok(EXIT_OK)
}

/// One row per instance: identity, status and timing, then `matrix.*`, `params.*` and
/// `metrics.*` columns (the union over all instances; empty where an instance has none).
fn export_table(plan: &Plan, records: &[Current]) -> Table {
    let mut matrix_cols: Vec<String> = Vec::new();
    let mut param_cols: Vec<String> = Vec::new();
    let mut metric_cols: Vec<String> = Vec::new();
    let mut per_node: Vec<(BTreeMap<String, Value>, BTreeMap<String, Value>)> = Vec::new();
    let push_new = |cols: &mut Vec<String>, k: &str| {
        if !cols.iter().any(|c| c == k) {
            cols.push(k.to_string());
        }
    };
    for (node, Current { record, .. }) in plan.nodes.iter().zip(records) {
        for k in node.matrix.keys() {
            push_new(&mut matrix_cols, k);
        }
        let mut leaves = Vec::new();
        flatten("", &node.params, &mut leaves);
        let params: BTreeMap<String, Value> =
            leaves.into_iter().filter(|(k, _)| !k.is_empty()).collect();
        for k in params.keys() {
            push_new(&mut param_cols, k);
        }
        for k in record.iter().flat_map(|r| r.metrics.keys()) {
            push_new(&mut metric_cols, k);
        }
        per_node.push((
            params,
            node.matrix
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ));
    }
    let mut columns: Vec<String> = [
        "name",
        "stage",
        "op",
        "op_version",
        "status",
        "key",
        "started_at",
        "duration_s",
        "host",
    ]
    .map(String::from)
    .to_vec();
    columns.extend(matrix_cols.iter().map(|c| format!("matrix.{c}")));
    columns.extend(param_cols.iter().map(|c| format!("params.{c}")));
    columns.extend(metric_cols.iter().map(|c| format!("metrics.{c}")));
    let mut table = Table::new(columns);
    for (
        (
            node,
            Current {
                status,
                key,
                record,
            },
        ),
        (params, matrix),
    ) in plan.nodes.iter().zip(records).zip(&per_node)
    {
        let mut row = vec![
            Cell::Text(node.name.clone()),
            Cell::Text(node.stage.clone()),
            Cell::Text(node.op.name().to_string()),
            Cell::Number(node.op.version() as f64),
            Cell::Text(status.clone()),
            key.clone().map(Cell::Text).unwrap_or(Cell::Empty),
            record
                .as_ref()
                .map(|r| Cell::Text(experiments::format_time(r.started_at)))
                .unwrap_or(Cell::Empty),
            record
                .as_ref()
                .map(|r| Cell::Number(r.ended_at - r.started_at))
                .unwrap_or(Cell::Empty),
            record
                .as_ref()
                .map(|r| Cell::Text(r.host.clone()))
                .unwrap_or(Cell::Empty),
        ];
        row.extend(
            matrix_cols
                .iter()
                .map(|c| matrix.get(c).map(Cell::from_json).unwrap_or(Cell::Empty)),
        );
        row.extend(
            param_cols
                .iter()
                .map(|c| params.get(c).map(Cell::from_json).unwrap_or(Cell::Empty)),
        );
        row.extend(metric_cols.iter().map(|c| {
            record
                .as_ref()
                .and_then(|r| r.metrics.get(c))
                .map(|v| Cell::Number(*v))
                .unwrap_or(Cell::Empty)
        }));
        table.rows.push(row);
    }
    table
}

/// The output tree of one cached instance named by `selector`.
fn cached_tree(
    plan: &Plan,
    cache: &Cache,
    selector: &str,
    pipeline: &Path,
) -> Result<Vec<(usize, cache::Tree)>, Exit> {
    let nodes = select(plan, selector)?;
    let records = cached_records(plan, cache, &nodes)?;
    let mut out = Vec::new();
    let mut stale = Vec::new();
    for (&i, Current { status, record, .. }) in nodes.iter().zip(&records) {
        match record.as_ref().and_then(|r| r.output_tree) {
            Some(tree) => out.push((i, cache.store().read_tree(&tree)?)),
            None => stale.push(format!("{} ({status})", plan.nodes[i].name)),
        }
    }
    if !stale.is_empty() {
        return Err(bad_input(format!(
            "{} has no current result: `engine run {} '{selector}'` computes it",
            stale.join(", "),
            display_path(pipeline)
        )));
    }
    Ok(out)
}

pub fn cmd_path(args: PathArgs) -> Result<i32, Exit> {
    let plan = targeted(
        load_plan(&args.pipeline)?,
        std::slice::from_ref(&args.stage),
    )?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let trees = cached_tree(&plan, &cache, &args.stage, &args.pipeline.pipeline)?;
    if trees.len() != 1 {
        let names: Vec<&str> = trees
            .iter()
            .map(|(i, _)| plan.nodes[*i].name.as_str())
            .collect();
        return Err(bad_input(format!(
            "'{}' names {} instances; name one: {}",
            args.stage,
            names.len(),
            names.join(", ")
        )));
    }
    let (i, tree) = &trees[0];
    let Some(entry) = tree.get(args.file.trim_start_matches("./")) else {
        let files: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        return Err(bad_input(format!(
            "{} has no output '{}'\n  fix: {}",
            plan.nodes[*i].name,
            args.file,
            engine::spec::suggestion(&args.file, files.iter().copied())
        )));
    };
    println!("{}", cache.store().object_path(&entry.blob).display());
    Ok(EXIT_OK)
}

pub fn cmd_checkout(args: CheckoutArgs) -> Result<i32, Exit> {
    let plan = targeted(
        load_plan(&args.pipeline)?,
        std::slice::from_ref(&args.stage),
    )?;
    let cache_root = cache_dir(&args.pipeline, &plan.pipeline);
    let cache = open_cache(&args.pipeline, &plan)?;
    let trees = cached_tree(&plan, &cache, &args.stage, &args.pipeline.pipeline)?;
    let to = std::path::absolute(&args.to)
        .map_err(|e| bad_input(format!("--to {}: {e}", args.to.display())))?;
    if to.starts_with(&cache_root) || cache_root.starts_with(&to) {
        return Err(bad_input(format!(
            "--to {}: the cache is there; copy results out to a folder of their own",
            args.to.display()
        )));
    }
    // One instance goes into the folder itself; several into one subfolder each, named as
    // list inputs name them.
    let targets: Vec<(PathBuf, &cache::Tree)> = if trees.len() == 1 {
        vec![(to.clone(), &trees[0].1)]
    } else {
        trees
            .iter()
            .enumerate()
            .map(|(pos, (i, t))| {
                let folder = engine::plan::list_item_folder(&plan.nodes[*i].label, pos);
                (to.join(folder), t)
            })
            .collect()
    };
    if !args.force {
        let existing: Vec<String> = targets
            .iter()
            .flat_map(|(dir, tree)| tree.entries.iter().map(move |e| dir.join(&e.path)))
            .filter(|p| p.exists() || p.is_symlink())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            return Err(bad_input(format!(
                "{} file(s) exist already, e.g. {}; nothing was copied\n  fix: pass --force to overwrite them, or choose another --to",
                existing.len(),
                existing[0]
            )));
        }
    }
    let mut files = 0;
    for (dir, tree) in &targets {
        std::fs::create_dir_all(dir)
            .map_err(|e| failure(format!("cannot create {}: {e}", dir.display())))?;
        cache.store().materialize_in(tree, "", dir, dir)?;
        files += tree.entries.len();
    }
    eprintln!(
        "copied {files} file(s) of {} instance(s) to {}",
        targets.len(),
        args.to.display()
    );
    Ok(EXIT_OK)
}

pub fn cmd_config(args: ConfigArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    check_cache_dir(&cache_dir(&args.pipeline, &plan.pipeline), false)?;
    let value = if args.expand {
        expanded_config(&plan)
    } else {
        stage_config(&plan.pipeline)
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        print!("{}", serde_yaml::to_string(&value).unwrap_or_default());
    }
    Ok(EXIT_OK)
}

/// The pipeline as the engine reads it: overrides applied, `${vars.*}` resolved, shorthand
/// params under `params`, defaults filled in.
fn stage_config(p: &Pipeline) -> Value {
    let mut stages = Map::new();
    for s in &p.stages {
        let mut m = Map::new();
        m.insert("op".into(), json!(s.op));
        if let Some(d) = &s.description {
            m.insert("description".into(), json!(d));
        }
        if !s.inputs.is_empty() {
            let inputs: Map<String, Value> = s
                .inputs
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            m.insert("inputs".into(), Value::Object(inputs));
        }
        if !s.matrix.is_empty() {
            let matrix: Map<String, Value> = s
                .matrix
                .iter()
                .map(|(k, v)| (k.clone(), Value::Array(v.clone())))
                .collect();
            m.insert("matrix".into(), Value::Object(matrix));
        }
        m.insert("params".into(), Value::Object(s.params.clone()));
        if let Some(seed) = &s.seed {
            m.insert("seed".into(), seed.clone());
        }
        if s.retries > 0 {
            m.insert("retries".into(), json!(s.retries));
        }
        if let Some(t) = s.timeout {
            m.insert(
                "timeout".into(),
                json!(humantime::format_duration(t).to_string()),
            );
        }
        if !s.cache {
            m.insert("cache".into(), json!(false));
        }
        stages.insert(s.name.clone(), Value::Object(m));
    }
    let mut doc = Map::new();
    doc.insert("name".into(), json!(p.name));
    doc.insert("vars".into(), Value::Object(p.vars.clone()));
    doc.insert("stages".into(), Value::Object(stages));
    if let Some(r) = &p.report {
        doc.insert("report".into(), r.clone());
    }
    Value::Object(doc)
}

/// Every instance in plan order: its resolved params, the instances its inputs are and its
/// seed.
fn expanded_config(plan: &Plan) -> Value {
    let mut instances = Map::new();
    for n in &plan.nodes {
        let mut m = Map::new();
        m.insert("op".into(), json!(n.op.name()));
        if !n.matrix.is_empty() {
            m.insert("matrix".into(), Value::Object(n.matrix.clone()));
        }
        if !n.inputs.is_empty() {
            let inputs: Map<String, Value> = n
                .inputs
                .iter()
                .map(|i| {
                    let names: Vec<Value> = i
                        .sources
                        .nodes()
                        .iter()
                        .map(|&u| json!(plan.nodes[u].name))
                        .collect();
                    let v = match &i.sources {
                        engine::plan::InputSources::One(_) => names[0].clone(),
                        engine::plan::InputSources::Many(_) => Value::Array(names),
                    };
                    (i.name.clone(), v)
                })
                .collect();
            m.insert("inputs".into(), Value::Object(inputs));
        }
        m.insert("params".into(), n.params.clone());
        m.insert("seed".into(), json!(n.seed));
        if !n.deps.is_empty() {
            m.insert("deps".into(), json!(n.deps));
        }
        if !n.outs.is_empty() {
            m.insert("outs".into(), json!(n.outs));
        }
        instances.insert(n.name.clone(), Value::Object(m));
    }
    json!({"name": plan.pipeline.name, "instances": instances})
}
