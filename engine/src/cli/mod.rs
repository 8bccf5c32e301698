//! Argument definitions and the commands behind them. `results.rs` holds the commands that
//! read results out of the cache (experiments, tables, exports, paths, checkouts, config).

mod results;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use cache::Cache;
use clap::{Args, Parser, Subcommand, ValueEnum};
use engine::exec::{self, RunOptions, RunSummary, StageReport, StageStatus};
use engine::plan::{self, Plan, PlanOptions};
use engine::progress::{Display, Live, Plain};
use engine::spec::{Pipeline, SpecError};
use engine::status::{stage_statuses, status_word, NodeStatus};
use ops::Registry;
use serde_json::{json, Value};

const EXIT_OK: i32 = 0;
const EXIT_STAGE_FAILED: i32 = 1;
const EXIT_BAD_INPUT: i32 = 2;
const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(
    name = "engine",
    version,
    about = "Declarative, content-hashed ML experiment pipelines"
)]
struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stale stage of a pipeline.
    Run(RunArgs),
    /// Show each stage as cached, stale (with the reason) or never run.
    Status(StatusArgs),
    /// Explain exactly what differs from the closest cached run of a stage.
    Why(StageArgs),
    /// Print the stage graph.
    Dag(DagArgs),
    /// Show a stage's params, key, metrics, outputs and timings.
    Show(ShowArgs),
    /// Print the log of a stage's latest run.
    Logs(StageArgs),
    /// Rerun what is stale whenever the pipeline file or a deps path changes.
    Watch(WatchArgs),
    /// Regenerate the pipeline's `report:` tables and plots from the cache (runs nothing).
    Report(ReportArgs),
    /// List the built-in ops, or print every param of one op (type, default, doc).
    Ops(OpsArgs),
    /// Run one stage from a job file (what a Slurm job executes; not for direct use).
    #[command(hide = true)]
    ExecStage(ExecStageArgs),
    /// Re-hash every object and check every record; --repair drops records that need
    /// missing or corrupt objects, so their stages rerun.
    Verify(VerifyArgs),
    /// Delete records outside a retention rule and every object no record refers to
    /// (results of named experiments are kept until `engine exp remove`).
    Gc(GcArgs),
    /// Compare named runs (`engine run --name NAME`): list, show, diff, remove.
    #[command(subcommand)]
    Exp(results::ExpCommand),
    /// A stage's instances as a table of matrix values and metrics (no `report:` needed).
    Table(results::TableArgs),
    /// Every stage instance as one row (matrix values, params, metrics, key, status,
    /// duration) in CSV, JSON or Parquet, for pandas.
    Export(results::ExportArgs),
    /// Print the stored path of one output file of a cached stage.
    Path(results::PathArgs),
    /// Copy a cached stage's outputs into a folder.
    Checkout(results::CheckoutArgs),
    /// Print the pipeline after overrides and `${vars.*}` (and, with --expand, every
    /// instance) as YAML.
    Config(results::ConfigArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    /// Markdown tables, SVG and PNG plots.
    Md,
    /// One HTML page beside the plots.
    Html,
}

#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Output folder (default: reports/<pipeline name>/ beside the pipeline file).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The report's format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Md)]
    format: ReportFormat,
}

#[derive(Args)]
struct OpsArgs {
    /// The op whose params to print (all ops when left out).
    name: Option<String>,
    /// Print Markdown: one op's params table, or with no NAME the whole op reference
    /// (`docs/ops.md` is this output).
    #[arg(long)]
    markdown: bool,
}

#[derive(Args)]
struct ExecStageArgs {
    /// The job file the driver wrote.
    job: PathBuf,
    /// The shared cache folder whose store receives the outputs.
    #[arg(long)]
    cache_dir: PathBuf,
    /// Where to write the result for the driver.
    #[arg(long)]
    result: PathBuf,
}

#[derive(Args)]
struct CacheArgs {
    /// The cache folder (or give --pipeline to use the one beside that pipeline).
    #[arg(long, env = "ENGINE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    /// A pipeline file whose default cache (.engine/ beside it) to check.
    pipeline: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    /// Drop records that depend on missing or corrupt objects, delete corrupt objects.
    #[arg(long)]
    repair: bool,
    /// Print one JSON object with the counts and problems.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GcArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// Keep the N most recent runs of every stage.
    #[arg(long, value_name = "N", conflicts_with_all = ["older_than", "pipeline"])]
    keep_last: Option<usize>,
    /// Drop runs older than this (e.g. 30d, 12h).
    #[arg(long, value_name = "AGE", conflicts_with = "pipeline")]
    older_than: Option<String>,
    /// Keep only the results this pipeline uses now (its current keys); drop everything else.
    #[arg(long, value_name = "FILE")]
    pipeline: Option<PathBuf>,
    /// `--set` overrides for --pipeline.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "pipeline")]
    sets: Vec<String>,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Clone)]
struct PipelineArgs {
    /// The pipeline file (YAML).
    pipeline: PathBuf,
    /// Override a value: `vars.n=5`, `stages.train.params.lr=0.1` (value parsed as YAML).
    /// A key the pipeline lacks is an error; `+vars.x=1` adds one, `++key=v` sets either way.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// A YAML file of overrides in the pipeline's shape (`vars: {lr: 0.1}`), applied before
    /// any --set; repeatable.
    #[arg(long = "params-file", value_name = "FILE")]
    params_files: Vec<PathBuf>,
    /// Cache folder (default: .engine/ beside the pipeline file).
    #[arg(long, env = "ENGINE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Refuse pipelines that expand to more stages than this (default: the file's
    /// `max_stages`, else 100000).
    #[arg(long, value_name = "N")]
    max_stages: Option<usize>,
    /// Device for every stage whose op takes `device` and sets none (`cpu`, `cuda`).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Run only these stages and what they need: `train`, `train[lr=0.1]`, `train[seed=0,*]`
    /// (default: every stage).
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// Record this run as a named experiment (its overrides, vars, git commit and every
    /// stage key), for `engine exp`; a name used before is replaced.
    #[arg(long, value_name = "NAME", conflicts_with = "dry_run")]
    name: Option<String>,
    /// CPUs to use for stages at once (default: all cores).
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,
    /// Show what would run and why, running nothing.
    #[arg(long)]
    dry_run: bool,
    /// After a failure, keep running stages that do not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Rerun this stage (name or `name[k=v]`) even if cached; repeatable.
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Print one JSON object describing the run on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    executor: ExecutorArgs,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ExecutorKind {
    Local,
    Slurm,
}

#[derive(Args)]
struct ExecutorArgs {
    /// Where stages run (default: the pipeline's `executor.kind`, else local).
    #[arg(long, value_enum)]
    executor: Option<ExecutorKind>,
    /// Slurm partition for every job (a stage's `resources.partition` wins).
    #[arg(long, value_name = "P")]
    slurm_partition: Option<String>,
    /// Slurm account to charge.
    #[arg(long, value_name = "A")]
    slurm_account: Option<String>,
    /// At most this many Slurm jobs queued or running at once (default 100).
    #[arg(long, value_name = "N")]
    max_jobs: Option<usize>,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// CPUs to use for stages at once (default: all cores).
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,
    /// After a failure, keep running stages that do not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Quiet time after the last change before rerunning.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    debounce: std::time::Duration,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Only these stages and what they need (as for `run`).
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// Print one JSON object with every stage's status and reasons.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StageArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// A stage, an instance such as `square[p=2]`, or a partial selector (`square[p=2,*]`).
    stage: String,
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// A stage, an instance such as `square[p=2]`, or a partial selector (`square[p=2,*]`).
    stage: String,
    /// Print JSON (one object, or a list for several instances).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    /// One line per instance with its inputs.
    Text,
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

#[derive(Args)]
struct DagArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// How to print the graph.
    #[arg(long, value_enum, default_value_t = DagFormat::Text)]
    format: DagFormat,
}

/// A failure that ends the command, with its exit code.
struct Exit {
    code: i32,
    message: String,
}

impl From<SpecError> for Exit {
    fn from(e: SpecError) -> Self {
        Exit {
            code: EXIT_BAD_INPUT,
            message: format!("error: {e}"),
        }
    }
}

impl From<cache::CacheError> for Exit {
    fn from(e: cache::CacheError) -> Self {
        Exit {
            code: EXIT_STAGE_FAILED,
            message: format!("error: cache: {e}"),
        }
    }
}

impl From<exec::ExecError> for Exit {
    fn from(e: exec::ExecError) -> Self {
        match e {
            exec::ExecError::Spec(s) => s.into(),
            exec::ExecError::Cache(c) => c.into(),
        }
    }
}

static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    if !cli.command.runs_stages() {
        restore_sigpipe();
    }
    let result = match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Status(args) => cmd_status(args),
        Command::Why(args) => cmd_why(args),
        Command::Dag(args) => cmd_dag(args),
        Command::Show(args) => cmd_show(args),
        Command::Logs(args) => cmd_logs(args),
        Command::Watch(args) => cmd_watch(args),
        Command::Verify(args) => cmd_verify(args),
        Command::Report(args) => cmd_report(args),
        Command::ExecStage(args) => cmd_exec_stage(args),
        Command::Gc(args) => cmd_gc(args),
        Command::Ops(args) => cmd_ops(args),
        Command::Exp(command) => results::cmd_exp(command),
        Command::Table(args) => results::cmd_table(args),
        Command::Export(args) => results::cmd_export(args),
        Command::Path(args) => results::cmd_path(args),
        Command::Checkout(args) => results::cmd_checkout(args),
        Command::Config(args) => results::cmd_config(args),
    };
    match result {
        Ok(code) => code,
        Err(exit) => {
            eprintln!("{}", exit.message);
            exit.code
        }
    }
}

impl Command {
    /// Whether the command runs stages (and so must survive a closed stdout or stderr, as
    /// SIGPIPE would not let it: a stage half-run is lost work). The others only print.
    fn runs_stages(&self) -> bool {
        match self {
            Command::Run(args) => !args.dry_run,
            Command::Watch(_) | Command::ExecStage(_) => true,
            _ => false,
        }
    }
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`engine status p.yaml | head -1`)
/// panics with "Broken pipe". A command that only prints ends quietly instead, as Unix tools
/// do, by taking the default action back.
fn restore_sigpipe() {
    // SAFETY: resets one signal's disposition; called before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints to stdout for a command that runs stages: a closed stdout is not worth a panic
/// (stderr's messages and the cache keep what happened).
fn print_quietly(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn cmd_ops(args: OpsArgs) -> Result<i32, Exit> {
    let registry = Registry::builtin();
    let Some(name) = args.name else {
        if args.markdown {
            print!("{}", engine::ops_doc::reference(&registry));
        } else {
            for name in registry.names() {
                if let Some(op) = registry.get(name) {
                    println!("{name:<24} v{:<3} {}", op.version(), op.summary());
                }
            }
        }
        return Ok(EXIT_OK);
    };
    let Some(op) = registry.get(&name) else {
        let mut message = format!("error: there is no op named '{name}'");
        if let Some(close) = engine::spec::closest(&name, registry.names()) {
            message.push_str(&format!("; did you mean '{close}'?"));
        }
        message.push_str("\n  fix: `engine ops` lists every op");
        return Err(Exit {
            code: EXIT_BAD_INPUT,
            message,
        });
    };
    if args.markdown {
        print!(
            "{}",
            engine::ops_doc::op_section(name.as_str(), op.as_ref())
        );
    } else {
        println!("{name} v{}: {}", op.version(), op.summary());
        print!("{}", ops::params_doc::text(&op.params_doc()));
    }
    Ok(EXIT_OK)
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Loads a pipeline with its overrides; touches no cache.
fn load_pipeline(args: &PipelineArgs) -> Result<Pipeline, Exit> {
    let params: Vec<engine::spec::ParamsFile> = args
        .params_files
        .iter()
        .map(|p| engine::spec::ParamsFile::read(p))
        .collect::<Result<_, _>>()?;
    Ok(Pipeline::load_with(&args.pipeline, &params, &args.sets)?)
}

/// Loads and plans a pipeline; touches no cache.
fn load_plan(args: &PipelineArgs) -> Result<Plan, Exit> {
    let pipeline = load_pipeline(args)?;
    let cache_dir = cache_dir(args, &pipeline);
    check_cache_dir(&cache_dir, args.cache_dir.is_some())?;
    let options = PlanOptions {
        max_stages: args.max_stages,
        protected: vec![cache_dir],
        device: args.device.clone(),
    };
    Ok(plan::build(pipeline, &Registry::builtin(), &options)?)
}

/// The cache folder must be a folder, or creatable as one: a regular file there (or above it)
/// is bad input, refused before anything runs rather than as a failure to open the cache.
fn check_cache_dir(dir: &Path, explicit: bool) -> Result<(), Exit> {
    let named = if explicit {
        format!("--cache-dir {}", dir.display())
    } else {
        format!("the cache folder {}", dir.display())
    };
    let mut current = Some(dir);
    while let Some(path) = current {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                let problem = if path == dir {
                    "is a file, not a folder".to_string()
                } else {
                    format!("cannot be created: {} is a file", path.display())
                };
                return Err(Exit {
                    code: EXIT_BAD_INPUT,
                    message: format!(
                        "error: {named}: {problem}\n  fix: pass a folder for the cache with --cache-dir DIR (or ENGINE_CACHE_DIR; it is created if missing), or move {} away",
                        path.display()
                    ),
                });
            }
            Err(_) => current = path.parent(),
        }
    }
    Ok(())
}

fn cache_dir(args: &PipelineArgs, pipeline: &Pipeline) -> PathBuf {
    match &args.cache_dir {
        Some(dir) if dir.is_absolute() => dir.clone(),
        Some(dir) => std::env::current_dir()
            .map(|c| c.join(dir))
            .unwrap_or_else(|_| dir.clone()),
        None => pipeline.workspace.join(".engine"),
    }
}

fn open_cache(args: &PipelineArgs, plan: &Plan) -> Result<Arc<Cache>, Exit> {
    let dir = cache_dir(args, &plan.pipeline);
    Cache::open(&dir).map(Arc::new).map_err(|e| Exit {
        code: EXIT_STAGE_FAILED,
        message: format!("error: cannot open the cache at {}: {e}", dir.display()),
    })
}

fn select(plan: &Plan, stage: &str) -> Result<Vec<usize>, Exit> {
    let nodes = plan.resolve_selector(stage)?;
    if nodes.is_empty() {
        return Err(plan.unknown_stage(stage).into());
    }
    Ok(nodes)
}

/// The plan of `targets` and what they need; the whole plan without targets.
fn targeted(plan: Plan, targets: &[String]) -> Result<Plan, Exit> {
    if targets.is_empty() {
        return Ok(plan);
    }
    let mut nodes = Vec::new();
    for t in targets {
        nodes.extend(select(&plan, t)?);
    }
    Ok(plan.restricted_to(&nodes))
}

fn cmd_run(args: RunArgs) -> Result<i32, Exit> {
    if let Some(name) = &args.name {
        engine::experiments::check_name(name).map_err(|message| Exit {
            code: EXIT_BAD_INPUT,
            message: format!("error: --name {message}"),
        })?;
    }
    let plan = targeted(load_plan(&args.pipeline)?, &args.targets)?;
    let mut force = Vec::new();
    for f in &args.force {
        force.extend(select(&plan, f)?);
    }
    let cache = open_cache(&args.pipeline, &plan)?;
    if args.dry_run {
        let statuses = stage_statuses(&plan, &cache, &force)?;
        print_statuses(&plan, &statuses, args.json);
        return Ok(EXIT_OK);
    }
    let interrupt = install_interrupt_handler();
    let options = RunOptions {
        jobs: jobs(args.jobs),
        keep_going: args.keep_going,
        force,
    };
    let mut display = new_display(args.json);
    let kind = args
        .executor
        .executor
        .unwrap_or(match plan.pipeline.executor.kind.as_deref() {
            Some("slurm") => ExecutorKind::Slurm,
            _ => ExecutorKind::Local,
        });
    let summary = match kind {
        ExecutorKind::Local => exec::run(&plan, &cache, &options, &interrupt, display.as_mut())?,
        ExecutorKind::Slurm => {
            let spec = &plan.pipeline.executor;
            let slurm_options = engine::slurm::SlurmOptions {
                partition: args
                    .executor
                    .slurm_partition
                    .clone()
                    .or_else(|| spec.partition.clone()),
                account: args
                    .executor
                    .slurm_account
                    .clone()
                    .or_else(|| spec.account.clone()),
                max_jobs: args.executor.max_jobs.or(spec.max_jobs).unwrap_or(100),
                engine_bin: std::env::var_os("ENGINE_SLURM_BIN")
                    .map(PathBuf::from)
                    .or_else(|| std::env::current_exe().ok())
                    .unwrap_or_else(|| PathBuf::from("engine")),
            };
            let mut executor = engine::slurm::SlurmExecutor::new(cache.clone(), slurm_options)?;
            exec::run_with(
                &plan,
                &cache,
                &options,
                &interrupt,
                display.as_mut(),
                &mut executor,
            )?
        }
    };
    if args.json {
        let stages: Vec<Value> = summary
            .reports
            .iter()
            .map(|r| stage_json(&plan, &cache, r))
            .collect();
        let out = json!({
            "pipeline": plan.pipeline.name,
            "stages": stages,
            "counts": {
                "ran": summary.count(StageStatus::Ran),
                "cached": summary.count(StageStatus::Cached),
                "failed": summary.count(StageStatus::Failed),
                "skipped": summary.count(StageStatus::Skipped),
            },
            "interrupted": summary.interrupted,
            "wall_s": summary.wall_s,
        });
        print_quietly(&format!("{out}\n"));
    }
    if let Some(name) = &args.name {
        let sets = &args.pipeline.sets;
        let params_files: Vec<String> = args
            .pipeline
            .params_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let ctx = engine::experiments::RunContext {
            name,
            sets,
            params_files: &params_files,
            argv: std::env::args().collect(),
        };
        let replaced = engine::experiments::record(&cache, &plan, &summary, &ctx)?;
        eprintln!(
            "recorded experiment '{name}'{} ({} stages); `engine exp show {}` compares it",
            if replaced {
                ", replacing the one of that name"
            } else {
                ""
            },
            summary.reports.len(),
            display_path(&args.pipeline.pipeline)
        );
    }
    let code = exit_code(&summary);
    // The process exits next: freeing a large plan and its reports one allocation at a time
    // would only delay that (about 5% of a 10,000-stage no-op). The cache is dropped as usual:
    // it flushes the stat cache.
    std::mem::forget((plan, summary));
    Ok(code)
}

/// First Ctrl-C raises the returned flag (stages stop cleanly); a second exits at once,
/// killing every process group the ops started.
fn install_interrupt_handler() -> Arc<AtomicBool> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if INTERRUPTS.fetch_add(1, Ordering::SeqCst) >= 1 {
            ops::kill_all_children();
            std::process::exit(EXIT_INTERRUPTED);
        }
        flag.store(true, Ordering::SeqCst);
    });
    interrupt
}

fn jobs(requested: Option<usize>) -> usize {
    requested
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1)
}

fn new_display(json: bool) -> Box<dyn Display> {
    if std::io::stderr().is_terminal() && !json {
        Box::new(Live::new())
    } else {
        Box::new(Plain::new())
    }
}

fn cmd_watch(args: WatchArgs) -> Result<i32, Exit> {
    let interrupt = install_interrupt_handler();
    let mut watcher = engine::watch::PathWatcher::new().map_err(|e| Exit {
        code: EXIT_STAGE_FAILED,
        message: format!("error: cannot watch files: {e}"),
    })?;
    let file = args.pipeline.pipeline.clone();
    let mut changed: Vec<PathBuf> = Vec::new();
    loop {
        if !changed.is_empty() {
            let names: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
            eprintln!("changed: {}", names.join(", "));
        }
        // An invalid pipeline mid-edit is reported and watched until it is fixed.
        let plan = match load_plan(&args.pipeline) {
            Ok(plan) => Some(plan),
            Err(e) => {
                eprintln!("{}", e.message);
                eprintln!("(still watching; fix the pipeline and save)");
                None
            }
        };
        if let Some(plan) = &plan {
            let cache = open_cache(&args.pipeline, plan)?;
            let options = RunOptions {
                jobs: jobs(args.jobs),
                keep_going: args.keep_going,
                force: Vec::new(),
            };
            let mut display = new_display(false);
            match exec::run(plan, &cache, &options, &interrupt, display.as_mut()) {
                Ok(summary) if summary.interrupted => return Ok(EXIT_INTERRUPTED),
                Ok(_) => {}
                Err(e) => eprintln!("{}", Exit::from(e).message),
            }
        }
        watcher
            .set_targets(engine::watch::watch_targets(&file, plan.as_ref()))
            .map_err(|e| Exit {
                code: EXIT_STAGE_FAILED,
                message: format!("error: cannot watch files: {e}"),
            })?;
        // Events caused by the run itself (outs written into the workspace) are not changes.
        watcher.drain();
        eprintln!("watching {} for changes (Ctrl-C to stop)", file.display());
        match watcher.next_change(args.debounce, &|| interrupt.load(Ordering::SeqCst)) {
            Some(paths) => changed = paths,
            None => return Ok(EXIT_INTERRUPTED),
        }
    }
}

fn exit_code(summary: &RunSummary) -> i32 {
    if summary.interrupted {
        EXIT_INTERRUPTED
    } else if summary.count(StageStatus::Failed) > 0 {
        EXIT_STAGE_FAILED
    } else {
        EXIT_OK
    }
}

fn metrics_json(metrics: &ops::Metrics) -> Value {
    metrics
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::Number::from_f64(*v)
                    .map(Value::Number)
                    .unwrap_or(Value::Null),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn outputs_json(cache: &Cache, tree: Option<&cache::Hash>) -> Value {
    let Some(tree) = tree else { return json!({}) };
    let Ok(t) = cache.store().read_tree(tree) else {
        return json!({});
    };
    t.entries
        .iter()
        .map(|e| {
            (
                e.path.clone(),
                json!({
                    "hash": e.blob.to_hex(),
                    "size": e.size,
                    "path": cache.store().object_path(&e.blob),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn stage_json(plan: &Plan, cache: &Cache, r: &StageReport) -> Value {
    let node = &plan.nodes[r.node];
    json!({
        "name": node.name,
        "stage": node.stage,
        "op": node.op.name(),
        "key": r.key,
        "status": r.status,
        "duration_s": r.duration_s,
        "metrics": metrics_json(&r.metrics),
        "tree": r.tree.map(|t| t.to_hex()),
        "outputs": outputs_json(cache, r.tree.as_ref()),
        "message": r.message,
        "reasons": r.reasons,
    })
}

fn print_statuses(plan: &Plan, statuses: &[NodeStatus], as_json: bool) {
    if as_json {
        let stages: Vec<Value> = plan
            .nodes
            .iter()
            .zip(statuses)
            .map(|(n, s)| {
                json!({
                    "name": n.name,
                    "stage": n.stage,
                    "op": n.op.name(),
                    "key": s.key,
                    "status": if s.cached { "cached" } else { "stale" },
                    "never_run": s.never_run,
                    "failed": s.failed.is_some(),
                    "reasons": s.reasons,
                })
            })
            .collect();
        let cached = statuses.iter().filter(|s| s.cached).count();
        println!(
            "{}",
            json!({"pipeline": plan.pipeline.name, "stages": stages, "counts": {"cached": cached, "stale": statuses.len() - cached}})
        );
        return;
    }
    let width = plan.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    for (n, s) in plan.nodes.iter().zip(statuses) {
        let word = status_word(s);
        let reasons: Vec<&str> = s
            .reasons
            .iter()
            .map(String::as_str)
            .filter(|r| *r != word)
            .collect();
        if reasons.is_empty() {
            println!("{:<width$}  {word}", n.name);
        } else {
            println!("{:<width$}  {word}: {}", n.name, reasons.join("; "));
        }
    }
}

fn cmd_status(args: StatusArgs) -> Result<i32, Exit> {
    let plan = targeted(load_plan(&args.pipeline)?, &args.targets)?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let statuses = stage_statuses(&plan, &cache, &[])?;
    print_statuses(&plan, &statuses, args.json);
    Ok(EXIT_OK)
}

fn cmd_why(args: StageArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    let nodes = select(&plan, &args.stage)?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let statuses = stage_statuses(&plan, &cache, &[])?;
    for i in nodes {
        let node = &plan.nodes[i];
        let s = &statuses[i];
        if s.cached {
            println!(
                "{}: cached (key {}); nothing differs",
                node.name,
                s.key.as_deref().unwrap_or("?")
            );
            continue;
        }
        let previous = s.compared_with.clone();
        match &previous {
            Some(p) => println!(
                "{}: would run. Compared with its closest cached run (key {}, finished {}):",
                node.name,
                &p.0[..12.min(p.0.len())],
                format_time(p.1)
            ),
            None => println!("{}: would run.", node.name),
        }
        for r in &s.reasons {
            println!("  - {r}");
        }
        // For a stale upstream, say why it is stale too.
        for u in node.upstream() {
            if !statuses[u].cached {
                println!(
                    "  upstream {} is {}: {}",
                    plan.nodes[u].name,
                    status_word(&statuses[u]),
                    statuses[u].reasons.join("; ")
                );
            }
        }
    }
    Ok(EXIT_OK)
}

fn format_time(unix: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn cmd_dag(args: DagArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    let id = |i: usize| format!("n{i}");
    match args.format {
        DagFormat::Text => {
            for n in &plan.nodes {
                let ups: Vec<String> = n
                    .inputs
                    .iter()
                    .map(|inp| format!("{} <- {}", inp.name, inp.reference))
                    .chain(
                        n.dep_producers
                            .iter()
                            .map(|&p| format!("deps <- {}", plan.nodes[p].name)),
                    )
                    .collect();
                if ups.is_empty() {
                    println!("{} ({})", n.name, n.op.name());
                } else {
                    println!("{} ({})  [{}]", n.name, n.op.name(), ups.join(", "));
                }
            }
        }
        DagFormat::Dot => {
            println!("digraph \"{}\" {{", plan.pipeline.name.replace('"', "'"));
            println!("  rankdir=LR;");
            for (i, n) in plan.nodes.iter().enumerate() {
                println!(
                    "  {} [label=\"{}\\n({})\"];",
                    id(i),
                    n.name.replace('"', "'"),
                    n.op.name()
                );
            }
            for (i, n) in plan.nodes.iter().enumerate() {
                for u in n.upstream() {
                    println!("  {} -> {};", id(u), id(i));
                }
            }
            println!("}}");
        }
        DagFormat::Mermaid => {
            println!("graph LR");
            for (i, n) in plan.nodes.iter().enumerate() {
                println!(
                    "  {}[\"{} ({})\"]",
                    id(i),
                    n.name.replace('"', "'"),
                    n.op.name()
                );
            }
            for (i, n) in plan.nodes.iter().enumerate() {
                for u in n.upstream() {
                    println!("  {} --> {}", id(u), id(i));
                }
            }
        }
    }
    Ok(EXIT_OK)
}

fn cmd_show(args: ShowArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    let nodes = select(&plan, &args.stage)?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let statuses = stage_statuses(&plan, &cache, &[])?;
    let mut shown = Vec::new();
    for i in nodes {
        let node = &plan.nodes[i];
        let s = &statuses[i];
        let record = match &s.key {
            Some(k) if s.cached => cache.lookup(k)?,
            _ => None,
        };
        let last = cache.latest_attempt(&plan.pipeline.name, &node.name)?;
        let log_path = last
            .as_ref()
            .and_then(|r| r.log_blob)
            .map(|h| cache.store().object_path(&h));
        let v = json!({
            "name": node.name,
            "stage": node.stage,
            "op": node.op.name(),
            "op_version": node.op.version(),
            "key": s.key,
            "status": if s.cached { "cached" } else { "stale" },
            "reasons": s.reasons,
            "params": node.params,
            "seed": node.seed,
            "metrics": record.as_ref().map(|r| metrics_json(&r.metrics)).unwrap_or(json!({})),
            "tree": record.as_ref().and_then(|r| r.output_tree).map(|t| t.to_hex()),
            "outputs": outputs_json(&cache, record.as_ref().and_then(|r| r.output_tree.as_ref())),
            "started_at": record.as_ref().map(|r| r.started_at),
            "duration_s": record.as_ref().map(|r| r.ended_at - r.started_at),
            "host": record.as_ref().map(|r| r.host.clone()),
            "log": log_path,
        });
        shown.push(v);
    }
    if args.json {
        if shown.len() == 1 {
            println!("{}", shown[0]);
        } else {
            println!("{}", Value::Array(shown));
        }
        return Ok(EXIT_OK);
    }
    for v in shown {
        println!("{}", v["name"].as_str().unwrap_or("?"));
        println!(
            "  op        {} v{}",
            v["op"].as_str().unwrap_or("?"),
            v["op_version"]
        );
        println!("  status    {}", v["status"].as_str().unwrap_or("?"));
        if let Some(k) = v["key"].as_str() {
            println!("  key       {k}");
        }
        println!("  params    {}", v["params"]);
        if let Some(m) = v["metrics"].as_object().filter(|m| !m.is_empty()) {
            for (k, val) in m {
                let shown = val
                    .as_f64()
                    .map(engine::table::format_number)
                    .unwrap_or_else(|| "–".into());
                println!("  metric    {k} = {shown}");
            }
        }
        if let Some(o) = v["outputs"].as_object() {
            for (path, e) in o {
                println!(
                    "  output    {path}  {}  ({} bytes)",
                    e["path"].as_str().unwrap_or("?"),
                    e["size"]
                );
            }
        }
        if let Some(d) = v["duration_s"].as_f64() {
            println!(
                "  duration  {d:.3}s on {}",
                v["host"].as_str().unwrap_or("?")
            );
        }
        if let Some(l) = v["log"].as_str() {
            println!("  log       {l}");
        }
        for r in v["reasons"].as_array().into_iter().flatten() {
            println!("  stale     {}", r.as_str().unwrap_or(""));
        }
    }
    Ok(EXIT_OK)
}

fn cmd_logs(args: StageArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    let nodes = select(&plan, &args.stage)?;
    let cache = open_cache(&args.pipeline, &plan)?;
    let many = nodes.len() > 1;
    let mut found = false;
    for i in nodes {
        let node = &plan.nodes[i];
        let Some(run) = cache.latest_attempt(&plan.pipeline.name, &node.name)? else {
            continue;
        };
        let Some(blob) = run.log_blob else { continue };
        let path = cache.store().object_path(&blob);
        let text = std::fs::read(&path).map_err(|e| Exit {
            code: EXIT_STAGE_FAILED,
            message: format!("error: cannot read the log {}: {e}", path.display()),
        })?;
        if many {
            println!("==> {} <==", node.name);
        }
        print!("{}", String::from_utf8_lossy(&text));
        found = true;
    }
    if !found {
        return Err(Exit {
            code: EXIT_STAGE_FAILED,
            message: format!(
                "error: '{}' has no recorded run yet; `engine run {}` first",
                args.stage,
                display_path(&args.pipeline.pipeline)
            ),
        });
    }
    Ok(EXIT_OK)
}

fn display_path(p: &Path) -> String {
    p.display().to_string()
}

/// The cache folder for commands that work on a cache rather than a pipeline.
fn resolve_cache_dir(explicit: &Option<PathBuf>, pipeline: Option<&Path>) -> Result<PathBuf, Exit> {
    if let Some(dir) = explicit {
        return Ok(dir.clone());
    }
    if let Some(p) = pipeline {
        let folder = p
            .parent()
            .filter(|f| !f.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        return Ok(folder.join(".engine"));
    }
    let here = PathBuf::from(".engine");
    if here.is_dir() {
        return Ok(here);
    }
    Err(Exit {
        code: EXIT_BAD_INPUT,
        message:
            "error: no cache given: pass --cache-dir DIR, a pipeline file, or run where .engine/ is"
                .into(),
    })
}

fn open_existing_cache(dir: &Path) -> Result<Cache, Exit> {
    require_cache(dir)?;
    Ok(Cache::open(dir)?)
}

/// Refuses a folder that is no engine cache, before anything is created in it.
fn require_cache(dir: &Path) -> Result<(), Exit> {
    if !dir.join("cache.db").is_file() {
        return Err(Exit {
            code: EXIT_BAD_INPUT,
            message: format!(
                "error: {} is not an engine cache (no cache.db)",
                dir.display()
            ),
        });
    }
    Ok(())
}

fn cmd_verify(args: VerifyArgs) -> Result<i32, Exit> {
    let dir = resolve_cache_dir(&args.cache.cache_dir, args.pipeline.as_deref())?;
    require_cache(&dir)?;
    let verified = Cache::open(&dir).and_then(|cache| cache.verify(args.repair));
    let (report, recovered) = match verified {
        Err(e) if e.is_damaged_db() && args.repair => {
            eprintln!("found: {e}");
            let aside = Cache::recover_damaged_db(&dir)?;
            (Cache::open(&dir)?.verify(true)?, aside)
        }
        other => (other?, None),
    };
    if let Some(aside) = &recovered {
        eprintln!(
            "repaired: the cache database was damaged; moved it to {} and started an empty one. \
             Its records are lost and cannot be rebuilt from the objects (they do not say which \
             stage made them); the {} stored objects are kept. Stages will run again; outputs \
             equal to stored ones are not stored twice, and `engine gc` removes objects no \
             record uses.",
            aside.display(),
            report.objects
        );
    }
    if args.json {
        println!(
            "{}",
            json!({
                "objects": report.objects,
                "bytes": report.bytes,
                "corrupt": report.corrupt.iter().map(|h| h.to_hex()).collect::<Vec<_>>(),
                "bad_runs": report.bad_runs,
                "problems": report.problems,
                "unreferenced": report.unreferenced,
                "repaired_runs": report.repaired_runs,
                "deleted_objects": report.deleted_objects,
            })
        );
    } else {
        println!(
            "checked {} objects ({} bytes)",
            report.objects, report.bytes
        );
        for p in &report.problems {
            println!("problem: {p}");
        }
        if report.unreferenced > 0 {
            println!(
                "{} unreferenced objects (harmless; `engine gc` removes them)",
                report.unreferenced
            );
        }
        if args.repair && report.problem_count() > 0 {
            println!(
                "repaired: dropped {} records (their stages will rerun), deleted {} corrupt objects",
                report.repaired_runs, report.deleted_objects
            );
        }
        println!("{} problems", report.problem_count());
    }
    Ok(if report.problem_count() > 0 && !args.repair {
        EXIT_STAGE_FAILED
    } else {
        EXIT_OK
    })
}

fn cmd_gc(args: GcArgs) -> Result<i32, Exit> {
    let keep = if let Some(n) = args.keep_last {
        cache::Keep::LastN(n)
    } else if let Some(age) = &args.older_than {
        let d = humantime::parse_duration(age).map_err(|e| Exit {
            code: EXIT_BAD_INPUT,
            message: format!("error: --older-than {age}: {e} (e.g. 30d, 12h, 90m)"),
        })?;
        cache::Keep::NewerThan(d.as_secs_f64())
    } else if args.pipeline.is_some() {
        cache::Keep::Keys(std::collections::HashSet::new())
    } else {
        cache::Keep::All
    };
    let dir = resolve_cache_dir(&args.cache.cache_dir, args.pipeline.as_deref())?;
    // Bad input is rejected before the cache is touched.
    let plan = match (&keep, &args.pipeline) {
        (cache::Keep::Keys(_), Some(file)) => Some(load_plan(&PipelineArgs {
            pipeline: file.clone(),
            sets: args.sets.clone(),
            params_files: Vec::new(),
            cache_dir: Some(dir.clone()),
            max_stages: None,
            device: None,
        })?),
        _ => None,
    };
    let cache = Arc::new(open_existing_cache(&dir)?);
    // The lock comes before the keep list: a run that records a result while the list is
    // computed would otherwise lose that result to this gc.
    let lock = cache.lock_exclusive()?;
    let keep = match plan {
        Some(plan) => {
            let statuses = stage_statuses(&plan, &cache, &[])?;
            let keys = statuses
                .into_iter()
                .filter(|s| s.cached)
                .filter_map(|s| s.key)
                .collect();
            cache::Keep::Keys(keys)
        }
        None => keep,
    };
    let report = cache.gc_locked(&lock, &keep, args.dry_run)?;
    println!(
        "{}{} records dropped, {} objects deleted, {} freed",
        if args.dry_run { "dry run: " } else { "" },
        report.runs_dropped,
        report.objects_deleted,
        human_bytes(report.bytes_freed)
    );
    Ok(EXIT_OK)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn cmd_exec_stage(args: ExecStageArgs) -> Result<i32, Exit> {
    let fail = |message: String| Exit {
        code: EXIT_STAGE_FAILED,
        message: format!("error: {message}"),
    };
    let text = std::fs::read(&args.job).map_err(|e| {
        fail(format!(
            "cannot read the job file {}: {e}",
            args.job.display()
        ))
    })?;
    let job: engine::worker::StageJob = serde_json::from_slice(&text)
        .map_err(|e| fail(format!("{} is not a job file: {e}", args.job.display())))?;
    let store = cache::Store::open_existing(&args.cache_dir)?;
    let registry = Registry::builtin();
    let op = registry
        .get(&job.op)
        .ok_or_else(|| {
            fail(format!(
                "this engine has no op '{}' (different versions on driver and nodes?)",
                job.op
            ))
        })?
        .clone();
    if op.version() != job.op_version {
        return Err(fail(format!(
            "op '{}' is version {} here but the driver keyed it as version {}; install the same engine on the nodes",
            job.op,
            op.version(),
            job.op_version
        )));
    }
    // scancel and Slurm's time limit send SIGTERM: stop the op and write no result, so the
    // driver can tell a killed job from a finished one.
    let cancel = ops::CancelFlag::new();
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || cancel.cancel());
    }
    let progress = ops::Progress::new(|m| println!("progress: {m}"));
    println!(
        "engine exec-stage: {} (key {}) on {}",
        job.stage,
        job.key,
        engine::worker::hostname()
    );
    let result = engine::worker::execute(&job, op.as_ref(), &store, &cancel, &progress)?;
    if matches!(result.outcome, engine::outcome::Outcome::Cancelled) {
        println!("engine exec-stage: stopped by a signal; no result written");
        return Ok(EXIT_INTERRUPTED);
    }
    let bytes =
        serde_json::to_vec(&result).map_err(|e| fail(format!("cannot encode the result: {e}")))?;
    let tmp = args.result.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .map_err(|e| fail(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &args.result)
        .map_err(|e| fail(format!("cannot write {}: {e}", args.result.display())))?;
    println!("engine exec-stage: done");
    Ok(EXIT_OK)
}

fn cmd_report(args: ReportArgs) -> Result<i32, Exit> {
    let plan = load_plan(&args.pipeline)?;
    // Validate the report section and where it goes before touching the cache.
    engine::report::parse_spec(&plan)?;
    let out = match &args.out {
        Some(out) => out.clone(),
        None => engine::report::default_out_dir(&plan)?,
    };
    let cache = open_cache(&args.pipeline, &plan)?;
    let format = match args.format {
        ReportFormat::Md => engine::report::Format::Markdown,
        ReportFormat::Html => engine::report::Format::Html,
    };
    match engine::report::build(&plan, &cache, &out, format) {
        Ok(output) => {
            print!("{}", output.text);
            for f in &output.files {
                eprintln!("wrote {}", f.display());
            }
            Ok(EXIT_OK)
        }
        Err(engine::report::ReportError::Spec(e)) => Err(e.into()),
        Err(e) => Err(Exit {
            code: EXIT_STAGE_FAILED,
            message: format!("error: {e}"),
        }),
    }
}
