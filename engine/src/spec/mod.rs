//! The pipeline file: YAML -> validated [`Pipeline`] (vars resolved, `--set` applied).
//!
//! Values are handled as JSON after loading (YAML anchors and merge keys applied), so params
//! reach ops and the key encoder in one canonical form. `${matrix.*}` references stay in place
//! here; the planner resolves them per matrix instance.

mod error;
pub mod interpolate;
mod source;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

pub use error::{closest, suggestion, SpecError};
pub use source::{Pos, SourceMap};

/// Matrices may not expand a pipeline past this many stages unless `max_stages:` or
/// `--max-stages` says otherwise.
pub const DEFAULT_MAX_STAGES: usize = 100_000;

/// No `max_stages:` or `--max-stages` may go past this: a plan holds every instance in memory,
/// and a limit of billions lets one matrix line exhaust it instead of failing cleanly.
pub const MAX_STAGES_CEILING: usize = 10_000_000;

/// The longest `timeout:` a stage may give (365 days); past it a timeout is a typo, and huge
/// values overflow the clock arithmetic of the watchdog.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Top-level keys of a pipeline file.
const TOP_LEVEL: &[&str] = &[
    "name",
    "vars",
    "stages",
    "max_stages",
    "description",
    "executor",
    "report",
];

/// Stage keys the engine reads itself; any other key is a param of the stage's op.
pub const STAGE_FIELDS: &[&str] = &[
    "op",
    "params",
    "inputs",
    "matrix",
    "retries",
    "timeout",
    "resources",
    "cache",
    "seed",
    "description",
];

/// A loaded pipeline, before matrix expansion.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The pipeline file as the user named it.
    pub file: PathBuf,
    /// The folder holding the pipeline file: commands run there, `deps`/`outs` are relative
    /// to it.
    pub workspace: PathBuf,
    pub vars: Map<String, Value>,
    pub stages: Vec<StageSpec>,
    pub max_stages: usize,
    pub executor: ExecutorSpec,
    /// The `report:` block, read by `engine report` (vars resolved).
    pub report: Option<Value>,
    source: SourceMap,
    /// `--set` paths, so errors in values that came from the command line say so.
    overrides: Vec<(String, String)>,
    /// Bytes `${...}` references produced while loading; planning continues the same budget.
    pub(crate) expanded_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub op: String,
    /// Op params, with stage shorthand merged in; `${matrix.*}` unresolved.
    pub params: Map<String, Value>,
    /// Local input name -> reference (`stage`, `stage[k=v]`, `stage[*]`), unresolved.
    pub inputs: Vec<(String, String)>,
    pub matrix: Vec<(String, Vec<Value>)>,
    pub retries: u32,
    pub timeout: Option<Duration>,
    pub resources: Resources,
    /// `cache: false`: always run, never reuse.
    pub cache: bool,
    /// Explicit seed (may be `${matrix.seed}`); 0 when absent.
    pub seed: Option<Value>,
    pub description: Option<String>,
}

/// Scheduling needs of a stage; never part of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpus: usize,
    pub gpus: usize,
    pub mem_bytes: Option<u64>,
    /// Cluster wall-time limit, as sbatch's `--time` takes it (`30`, `2:00:00`, `1-0`).
    pub time: Option<String>,
    pub partition: Option<String>,
    /// Extra sbatch flags, one per item (`--constraint=a100`).
    pub sbatch: Vec<String>,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 1,
            gpus: 0,
            mem_bytes: None,
            time: None,
            partition: None,
            sbatch: Vec::new(),
        }
    }
}

/// The pipeline's `executor:` block; command-line flags override it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorSpec {
    /// `local` (default) or `slurm`.
    pub kind: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub max_jobs: Option<usize>,
}

impl Pipeline {
    /// Loads `file`, applies `sets` (`dotted.key=yaml-value`) and resolves `${vars.*}`.
    pub fn load(file: &Path, sets: &[String]) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            located(
                file,
                SpecError::new("", format!("cannot read the pipeline file: {e}")),
            )
            .fix("check the path; a pipeline is a YAML file such as pipelines/demo.yaml")
        })?;
        Self::from_str_with(&text, file, &[], sets)
    }

    /// As [`Pipeline::load`], with the overrides of `params_files` applied first (in order),
    /// then `sets`.
    pub fn load_with(
        file: &Path,
        params_files: &[ParamsFile],
        sets: &[String],
    ) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            located(
                file,
                SpecError::new("", format!("cannot read the pipeline file: {e}")),
            )
            .fix("check the path; a pipeline is a YAML file such as pipelines/demo.yaml")
        })?;
        Self::from_str_with(&text, file, params_files, sets)
    }

    /// As [`Pipeline::load`], from text already read.
    pub fn from_str(text: &str, file: &Path, sets: &[String]) -> Result<Self, SpecError> {
        Self::from_str_with(text, file, &[], sets)
    }

    /// As [`Pipeline::load_with`], from text already read.
    pub fn from_str_with(
        text: &str,
        file: &Path,
        params_files: &[ParamsFile],
        sets: &[String],
    ) -> Result<Self, SpecError> {
        // A byte-order mark is not content: editors on Windows write one, and YAML readers
        // would otherwise see text before `name:` (a second document).
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let source = SourceMap::build(text);
        let locate = |e: SpecError| locate_with(&source, file, &[], e);
        let mut doc = top_level(parse_yaml(text, file)?, file, &locate)?;
        normalize_stages(&mut doc).map_err(&locate)?;
        let mut overrides = Vec::new();
        for params in params_files {
            for (key, value, origin) in params.entries()? {
                let path =
                    set_value(&mut doc, &key, value, &origin).map_err(|e| located(file, e))?;
                overrides.push((path, origin));
            }
        }
        for set in sets {
            let path = apply_set(&mut doc, set).map_err(|e| located(file, e))?;
            overrides.push((path, format!("--set {set}")));
        }
        let locate = |e: SpecError| locate_with(&source, file, &overrides, e);
        let name = pipeline_name(&doc, file).map_err(&locate)?;
        let vars = match doc.get("vars") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(vars)) => vars.clone(),
            Some(other) => {
                return Err(locate(SpecError::new(
                    "vars",
                    format!("must be a mapping of name -> value, found {}", kind(other)),
                )))
            }
        };
        let max_stages = max_stages(&doc).map_err(&locate)?;
        let budget = interpolate::Budget::default();
        let scope = interpolate::Scope {
            vars: Some(&vars),
            matrix: None,
            budget: &budget,
        };
        let report = match doc.get("report") {
            None | Some(Value::Null) => None,
            Some(r) => Some(interpolate::resolve(r, &scope, "report").map_err(&locate)?),
        };
        let executor = parse_executor(doc.get("executor")).map_err(&locate)?;
        let stages = resolve_stages(&doc, &scope).map_err(&locate)?;
        Ok(Self {
            name,
            file: file.to_path_buf(),
            workspace: workspace_of(file)?,
            vars,
            stages,
            max_stages,
            executor,
            report,
            source,
            overrides,
            expanded_bytes: budget.used(),
        })
    }

    /// Attaches the file, position and `--set` origin to an error about `error.field`.
    pub fn locate(&self, error: SpecError) -> SpecError {
        locate_with(&self.source, &self.file, &self.overrides, error)
    }

    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// The pipeline document as a mapping of known top-level keys.
fn top_level(
    doc: Value,
    file: &Path,
    locate: &dyn Fn(SpecError) -> SpecError,
) -> Result<Map<String, Value>, SpecError> {
    let doc = match doc {
        Value::Object(map) => map,
        Value::Null => {
            return Err(
                located(file, SpecError::new("", "the pipeline file is empty"))
                    .fix("start with `name: my-pipeline` and a `stages:` mapping"),
            )
        }
        other => {
            return Err(locate(SpecError::new(
                "",
                format!("a pipeline must be a mapping, found {}", kind(&other)),
            ))
            .fix("start with `name: my-pipeline` and a `stages:` mapping"))
        }
    };
    for key in doc.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) {
            return Err(locate(
                SpecError::new(key.clone(), "unknown top-level key")
                    .fix(suggestion(key, TOP_LEVEL.iter().copied())),
            ));
        }
    }
    Ok(doc)
}

/// Every stage of the `stages:` mapping with its shorthand params moved under `params`.
fn normalize_stages(doc: &mut Map<String, Value>) -> Result<(), SpecError> {
    let stages = match doc.get_mut("stages") {
        Some(Value::Object(stages)) => stages,
        Some(other) => {
            return Err(SpecError::new(
                "stages",
                format!("must be a mapping of stage name -> stage, found {}", kind(other)),
            ))
        }
        None => {
            return Err(SpecError::new("stages", "the pipeline has no `stages:`")
                .fix("add `stages:` with at least one stage, e.g. `hello: {op: shell, cmd: \"echo hi\"}`"))
        }
    };
    for (name, stage) in stages.iter_mut() {
        normalize_stage(name, stage)?;
    }
    Ok(())
}

/// `name:`, or the file's stem without one.
fn pipeline_name(doc: &Map<String, Value>, file: &Path) -> Result<String, SpecError> {
    match doc.get("name") {
        None => Ok(file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into())),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(other) => Err(SpecError::new(
            "name",
            format!("must be a non-empty string, found {}", kind(other)),
        )),
    }
}

fn max_stages(doc: &Map<String, Value>) -> Result<usize, SpecError> {
    let Some(v) = doc.get("max_stages") else {
        return Ok(DEFAULT_MAX_STAGES);
    };
    v.as_u64()
        .filter(|n| *n > 0 && *n <= MAX_STAGES_CEILING as u64)
        .map(|n| n as usize)
        .ok_or_else(|| {
            SpecError::new(
                "max_stages",
                format!("must be a positive integer up to {MAX_STAGES_CEILING}, found {v}"),
            )
            .fix(format!(
                "write a whole number of stages from 1 to {MAX_STAGES_CEILING}, e.g. `max_stages: 200000`"
            ))
        })
}

/// Every stage with `${vars.*}` resolved, parsed.
fn resolve_stages(
    doc: &Map<String, Value>,
    scope: &interpolate::Scope<'_>,
) -> Result<Vec<StageSpec>, SpecError> {
    let mut specs = Vec::new();
    if let Some(Value::Object(stages)) = doc.get("stages") {
        if stages.is_empty() {
            return Err(SpecError::new("stages", "the pipeline has no stages")
                .fix("add at least one stage under `stages:`"));
        }
        for (name, stage) in stages {
            let path = format!("stages.{name}");
            let stage = interpolate::resolve(stage, scope, &path)?;
            specs.push(parse_stage(name, &stage)?);
        }
    }
    Ok(specs)
}

/// The pipeline file's folder, canonical: where relative paths of the pipeline start.
fn workspace_of(file: &Path) -> Result<PathBuf, SpecError> {
    file.parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .canonicalize()
        .map_err(|e| {
            located(
                file,
                SpecError::new("", format!("cannot resolve the pipeline's folder: {e}")),
            )
        })
}

fn located(file: &Path, mut error: SpecError) -> SpecError {
    error.file = file.to_path_buf();
    error
}

fn locate_with(
    source: &SourceMap,
    file: &Path,
    overrides: &[(String, String)],
    mut error: SpecError,
) -> SpecError {
    error.file = file.to_path_buf();
    if let Some((_, set)) = overrides
        .iter()
        .rev()
        .find(|(path, _)| error.field == *path || error.field.starts_with(&format!("{path}.")))
    {
        error.message = format!("{} (value from {set})", error.message);
    } else if error.pos.is_none() {
        error.pos = source.find(&error.field);
    }
    error
}

fn parse_yaml(text: &str, file: &Path) -> Result<Value, SpecError> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let mut err = located(file, SpecError::new("", format!("malformed YAML: {e}"))).fix(
            "check indentation and quoting near this position (a `:` inside a value needs quotes)",
        );
        if let Some(loc) = e.location() {
            err.pos = Some(Pos {
                line: loc.line(),
                col: loc.column(),
            });
        }
        err
    })?;
    value.apply_merge().map_err(|e| {
        located(
            file,
            SpecError::new("", format!("invalid YAML merge key: {e}")),
        )
    })?;
    let source = SourceMap::build(text);
    convert(&value, "", Some(&source)).map_err(|e| locate_with(&source, file, &[], e))
}

/// Converts YAML to JSON values: keys become strings, tags and non-finite floats are errors,
/// and so are two keys of one mapping that become the same string (`1` and `"1"`).
pub fn yaml_to_json(value: &serde_yaml::Value, path: &str) -> Result<Value, SpecError> {
    convert(value, path, None)
}

/// [`yaml_to_json`]; `source`, when the value came from a file, names the lines of repeated
/// keys.
fn convert(
    value: &serde_yaml::Value,
    path: &str,
    source: Option<&SourceMap>,
) -> Result<Value, SpecError> {
    use serde_yaml::Value as Y;
    Ok(match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| {
                        SpecError::new(path, format!("{f} is not a finite number"))
                            .fix("write a finite number, or quote it to pass a string")
                    })?
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| convert(v, &join(path, &i.to_string()), source))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => {
                        return Err(SpecError::new(
                            path,
                            format!("mapping keys must be strings, found {other:?}"),
                        ))
                    }
                };
                let field = join(path, &key);
                if out.contains_key(&key) {
                    let positions = source.map(|s| s.every(&field)).unwrap_or_default();
                    let where_ = match positions.as_slice() {
                        [a, b, ..] => format!(" (lines {} and {})", a.line, b.line),
                        _ => String::new(),
                    };
                    let mut err = SpecError::new(
                        &field,
                        format!(
                            "the key '{key}' is given twice in one mapping{where_}: keys are compared as text, so `{key}` and `\"{key}\"` are the same key"
                        ),
                    )
                    .fix("keep one of the two entries, or rename one");
                    // Point at the second one: the first is what the user meant to keep.
                    err.pos = positions.get(1).copied();
                    return Err(err);
                }
                let v = convert(v, &field, source)?;
                out.insert(key, v);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            return Err(
                SpecError::new(path, format!("YAML tags ({}) are not supported", t.tag))
                    .fix("remove the `!tag`"),
            )
        }
    })
}

fn join(base: &str, segment: &str) -> String {
    if base.is_empty() {
        segment.to_string()
    } else {
        format!("{base}.{segment}")
    }
}

/// A short description of a JSON value's type, for messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Moves op-param shorthand (`cmd:` beside `op:`) into `params:`.
fn normalize_stage(name: &str, stage: &mut Value) -> Result<(), SpecError> {
    let path = format!("stages.{name}");
    validate_stage_name(name, &path)?;
    let Value::Object(map) = stage else {
        return Err(SpecError::new(
            &path,
            format!(
                "a stage must be a mapping with at least `op:`, found {}",
                kind(stage)
            ),
        )
        .fix(format!("write `{name}: {{op: shell, cmd: \"...\"}}`")));
    };
    let mut params = match map.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(SpecError::new(
                format!("{path}.params"),
                format!(
                    "must be a mapping of param -> value, found {}",
                    kind(&other)
                ),
            ))
        }
    };
    let shorthand: Vec<String> = map
        .keys()
        .filter(|k| !STAGE_FIELDS.contains(&k.as_str()))
        .cloned()
        .collect();
    for key in shorthand {
        if params.contains_key(&key) {
            return Err(SpecError::new(
                format!("{path}.{key}"),
                format!("'{key}' is given both beside `op:` and under `params:`"),
            )
            .fix("keep one of the two"));
        }
        if let Some(v) = map.remove(&key) {
            params.insert(key, v);
        }
    }
    map.insert("params".into(), Value::Object(params));
    Ok(())
}

/// An input's local name is a folder of the stage's scratch space (`in/<name>`): it must be
/// one plain path segment.
fn validate_input_name(name: &str, path: &str) -> Result<(), SpecError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(
            SpecError::new(path, format!("'{name}' is not a valid input name"))
                .fix("use letters, digits and '_', e.g. `data: make_data`"),
        );
    }
    Ok(())
}

fn validate_stage_name(name: &str, path: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(
            SpecError::new(path, format!("'{name}' is not a valid stage name"))
                .fix("use letters, digits, '_', '-' and '.' only"),
        )
    }
}

/// A `--params-file`: a YAML mapping of overrides in the pipeline's own shape
/// (`vars: {lr: 0.1}`, `stages: {train: {epochs: 3}}`); each leaf is one override, checked
/// as `--set` checks it.
#[derive(Debug, Clone)]
pub struct ParamsFile {
    pub path: PathBuf,
    text: String,
}

impl ParamsFile {
    pub fn read(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            located(
                path,
                SpecError::new("", format!("cannot read the params file: {e}")),
            )
            .fix("pass a YAML file of overrides, e.g. `vars: {lr: 0.1}`")
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
        })
    }

    /// (dotted key, value, origin for messages) of every leaf, in file order.
    fn entries(&self) -> Result<Vec<(String, Value, String)>, SpecError> {
        let text = self.text.strip_prefix('\u{feff}').unwrap_or(&self.text);
        let source = SourceMap::build(text);
        let doc = match parse_yaml(text, &self.path)? {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            other => {
                return Err(located(
                    &self.path,
                    SpecError::new(
                        "",
                        format!(
                            "a params file is a mapping of overrides, found {}",
                            kind(&other)
                        ),
                    ),
                )
                .fix("write e.g. `vars: {lr: 0.1}`"))
            }
        };
        fn walk(prefix: &str, map: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    Value::Object(m) if !m.is_empty() => walk(&key, m, out),
                    _ => out.push((key, v.clone())),
                }
            }
        }
        let mut leaves = Vec::new();
        walk("", &doc, &mut leaves);
        Ok(leaves
            .into_iter()
            .map(|(key, value)| {
                let at = match source.find(&key) {
                    Some(pos) => format!("{} line {}", self.path.display(), pos.line),
                    None => self.path.display().to_string(),
                };
                let origin = format!("{at} ({key})");
                (key, value, origin)
            })
            .collect())
    }
}

/// How an override treats a key the pipeline does not have (Hydra's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetMode {
    /// `key=value`: the key must exist where the pipeline's own names live (vars, matrix
    /// variables, inputs), so a typo is an error, not a silently unused value.
    Override,
    /// `+key=value`: the key must not exist yet.
    Add,
    /// `++key=value`: set it either way.
    Force,
}

/// Applies one `--set dotted.key=value` to the document; returns the path it set.
fn apply_set(doc: &mut Map<String, Value>, set: &str) -> Result<String, SpecError> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(
            SpecError::new("", format!("--set {set}: expected KEY=VALUE"))
                .fix("e.g. --set vars.n=5 or --set stages.train.params.lr=0.1"),
        );
    };
    let yaml: serde_yaml::Value = serde_yaml::from_str(raw).map_err(|e| {
        SpecError::new("", format!("--set {set}: the value is not valid YAML: {e}"))
            .fix("quote the value in the shell, e.g. --set 'stages.a.params.cmd=\"echo hi\"'")
    })?;
    let value = yaml_to_json(&yaml, key.trim_start_matches('+'))
        .map_err(|e| SpecError::new("", format!("--set {set}: {}", e.message)))?;
    set_value(doc, key, value, &format!("--set {set}"))
}

/// Sets `key` (dotted, optionally `+` or `++` first) to `value`; `origin` names the override
/// in errors (`--set vars.n=5`, `params.yaml line 3`). Returns the path it set.
fn set_value(
    doc: &mut Map<String, Value>,
    key: &str,
    value: Value,
    origin: &str,
) -> Result<String, SpecError> {
    let (mode, key) = if let Some(k) = key.strip_prefix("++") {
        (SetMode::Force, k)
    } else if let Some(k) = key.strip_prefix('+') {
        (SetMode::Add, k)
    } else {
        (SetMode::Override, key)
    };
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(SpecError::new(
            "",
            format!("{origin}: '{key}' has an empty segment"),
        ));
    }
    let mut segments: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
    if segments[0] == "stages" && segments.len() >= 3 {
        let stage = &segments[1];
        let stages = doc.get("stages").and_then(Value::as_object);
        if !stages.is_some_and(|s| s.contains_key(stage)) {
            let names: Vec<&str> = stages
                .map(|s| s.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err(
                SpecError::new("", format!("{origin}: there is no stage '{stage}'"))
                    .fix(suggestion(stage, names.iter().copied())),
            );
        }
        if !STAGE_FIELDS.contains(&segments[2].as_str()) {
            segments.insert(2, "params".into());
        }
    }
    // Names the pipeline defines itself: an override must find them, or it is a typo. Op
    // params are checked by their op, which refuses unknown ones with the same hint.
    let strict_from = match segments.as_slice() {
        [first, ..] if first == "vars" => Some(1),
        [first, _, field, ..] if first == "stages" && (field == "matrix" || field == "inputs") => {
            Some(3)
        }
        _ => None,
    };
    let last = segments.len() - 1;
    let mut node = doc;
    for (i, seg) in segments.iter().enumerate() {
        let exists = node.contains_key(seg);
        if !exists && mode == SetMode::Override && strict_from.is_some_and(|from| i >= from) {
            let here = segments[..i].join(".");
            let names: Vec<&str> = node.keys().map(String::as_str).collect();
            let hint = match closest(seg, names.iter().copied()) {
                Some(c) => format!("did you mean '{}'?", [here.as_str(), c].join(".")),
                None if names.is_empty() => format!("'{here}' has no keys"),
                None => format!("'{here}' has: {}", names.join(", ")),
            };
            return Err(SpecError::new(
                "",
                format!(
                    "{origin}: the pipeline has no '{}'",
                    segments[..=i].join(".")
                ),
            )
            .fix(format!("{hint} To add a new key, write +{key}=...")));
        }
        if i == last {
            if exists && mode == SetMode::Add {
                return Err(SpecError::new(
                    "",
                    format!("{origin}: '{key}' is already set in the pipeline"),
                )
                .fix(format!(
                    "drop the '+' to override it ({key}=...), or write ++{key}=... to set it either way"
                )));
            }
            node.insert(seg.clone(), value);
            break;
        }
        let entry = node
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if entry.is_null() {
            *entry = Value::Object(Map::new());
        }
        node = match entry {
            Value::Object(m) => m,
            other => {
                return Err(SpecError::new(
                    "",
                    format!(
                        "{origin}: '{}' is {}, not a mapping",
                        segments[..=i].join("."),
                        kind(other)
                    ),
                ))
            }
        };
    }
    Ok(segments.join("."))
}

fn parse_stage(name: &str, stage: &Value) -> Result<StageSpec, SpecError> {
    let path = format!("stages.{name}");
    let field = |f: &str| format!("{path}.{f}");
    let map = stage.as_object().cloned().unwrap_or_default();
    let op = match map.get("op") {
        Some(Value::String(op)) => op.clone(),
        Some(other) => {
            return Err(SpecError::new(
                field("op"),
                format!("must be an op name, found {}", kind(other)),
            ))
        }
        None => {
            return Err(SpecError::new(&path, "the stage has no `op:`")
                .fix("add `op: shell` (or another op; `engine ops` lists them)"))
        }
    };
    let params = match map.get("params") {
        Some(Value::Object(p)) => p.clone(),
        _ => Map::new(),
    };
    let inputs = parse_inputs(map.get("inputs"), &path)?;
    let matrix = parse_matrix(map.get("matrix"), &field("matrix"))?;
    let retries = parse_retries(map.get("retries"), &field("retries"))?;
    let timeout = parse_timeout(map.get("timeout"), &field("timeout"))?;
    let resources = parse_resources(map.get("resources"), &field("resources"))?;
    let cache = match map.get("cache") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(SpecError::new(
                field("cache"),
                format!("must be true or false, found {}", kind(other)),
            ))
        }
    };
    let seed = map.get("seed").filter(|v| !v.is_null()).cloned();
    if let Some(s) = &seed {
        if !s.is_u64() && !s.is_string() {
            return Err(SpecError::new(
                field("seed"),
                format!("must be a non-negative integer, found {s}"),
            ));
        }
    }
    let description = map
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(StageSpec {
        name: name.to_string(),
        op,
        params,
        inputs,
        matrix,
        retries,
        timeout,
        resources,
        cache,
        seed,
        description,
    })
}

/// `inputs:`: (local name, stage reference) pairs, their `ENGINE_IN_` variables distinct.
fn parse_inputs(value: Option<&Value>, path: &str) -> Result<Vec<(String, String)>, SpecError> {
    let field = |f: &str| format!("{path}.{f}");
    let inputs = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(inputs)) => {
            let mut out = Vec::new();
            for (local, reference) in inputs {
                validate_input_name(local, &field(&format!("inputs.{local}")))?;
                match reference {
                    Value::String(r) => out.push((local.clone(), r.clone())),
                    other => {
                        return Err(SpecError::new(
                            field(&format!("inputs.{local}")),
                            format!("must be a stage reference string, found {}", kind(other)),
                        )
                        .fix("write `name: stage`, `name: stage[k=v]` or `name: \"stage[*]\"`"))
                    }
                }
            }
            out
        }
        Some(other) => {
            return Err(SpecError::new(
                field("inputs"),
                format!(
                    "must be a mapping of local name -> stage reference, found {}",
                    kind(other)
                ),
            )
            .fix("e.g. `inputs: {data: make_data}`"))
        }
    };
    // Each input is handed to the command as ENGINE_IN_<NAME>; two names that give the same
    // variable would leave one input unreachable without a word.
    let mut vars: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for (local, _) in &inputs {
        let var = ops::input_var(local);
        if let Some(first) = vars.insert(var.clone(), local) {
            return Err(SpecError::new(
                field(&format!("inputs.{local}")),
                format!("inputs '{first}' and '{local}' both become the variable {var}"),
            )
            .fix(format!(
                "rename one of them: letters and digits are kept (upper-cased), anything else becomes '_' in {var}"
            )));
        }
    }
    Ok(inputs)
}

/// `matrix:`: each variable with its (non-empty) list of values.
fn parse_matrix(
    value: Option<&Value>,
    field: &str,
) -> Result<Vec<(String, Vec<Value>)>, SpecError> {
    let matrix = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => {
            if m.is_empty() {
                return Err(SpecError::new(field, "the matrix is empty")
                    .fix("give at least one variable with a list of values, or remove `matrix:`"));
            }
            let mut out = Vec::new();
            for (var, values) in m {
                let values = match values {
                    Value::Array(v) if !v.is_empty() => v.clone(),
                    Value::Array(_) => {
                        return Err(SpecError::new(
                            format!("{field}.{var}"),
                            "the matrix variable has no values",
                        )
                        .fix("list at least one value, e.g. `[1, 2]`"))
                    }
                    other => {
                        return Err(SpecError::new(
                            format!("{field}.{var}"),
                            format!("must be a list of values, found {}", kind(other)),
                        )
                        .fix(format!("write `{var}: [a, b]`")))
                    }
                };
                out.push((var.clone(), values));
            }
            out
        }
        Some(other) => {
            return Err(SpecError::new(
                field,
                format!(
                    "must be a mapping of variable -> list of values, found {}",
                    kind(other)
                ),
            ))
        }
    };
    Ok(matrix)
}

fn parse_retries(value: Option<&Value>, field: &str) -> Result<u32, SpecError> {
    let retries = match value {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().filter(|n| *n <= 100).ok_or_else(|| {
            SpecError::new(field, format!("must be an integer 0..=100, found {v}"))
                .fix("write how many times to rerun a failed attempt, e.g. `retries: 2`")
        })? as u32,
    };
    Ok(retries)
}

/// `timeout:`, in seconds or a humantime duration, up to [`MAX_TIMEOUT`].
fn parse_timeout(value: Option<&Value>, field: &str) -> Result<Option<Duration>, SpecError> {
    let timeout = match value {
        None | Some(Value::Null) => None,
        // `Duration::from_secs_f64` panics past u64 seconds; a year is already far past any
        // stage a timeout is meant for, so anything beyond it is refused as a typo.
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s > 0.0 && s <= MAX_TIMEOUT.as_secs_f64() => {
                Some(Duration::from_secs_f64(s))
            }
            _ => {
                return Err(SpecError::new(
                    field,
                    format!("must be more than 0 and at most 365 days (31536000 s), found {n}"),
                )
                .fix("e.g. `timeout: 10m` or `timeout: 30` (seconds); leave it out for no limit"))
            }
        },
        Some(Value::String(s)) => {
            let d = humantime::parse_duration(s).map_err(|e| {
                SpecError::new(field, format!("'{s}' is not a duration: {e}"))
                    .fix("e.g. `timeout: 10m`, `90s` or `2h`")
            })?;
            if d.is_zero() || d > MAX_TIMEOUT {
                return Err(SpecError::new(
                    field,
                    format!("'{s}' must be more than 0 and at most 365 days"),
                )
                .fix("e.g. `timeout: 10m`, `90s` or `2h`; leave it out for no limit"));
            }
            Some(d)
        }
        Some(other) => {
            return Err(
                SpecError::new(field, format!("must be a duration, found {}", kind(other)))
                    .fix("e.g. `timeout: 10m`"),
            )
        }
    };
    Ok(timeout)
}

fn parse_resources(value: Option<&Value>, path: &str) -> Result<Resources, SpecError> {
    let mut res = Resources::default();
    let map = match value {
        None | Some(Value::Null) => return Ok(res),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(
                SpecError::new(path, format!("must be a mapping, found {}", kind(other)))
                    .fix("e.g. `resources: {cpus: 2, mem: 4G}`"),
            )
        }
    };
    for (key, v) in map {
        let f = format!("{path}.{key}");
        match key.as_str() {
            "cpus" => {
                res.cpus = v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                    SpecError::new(&f, format!("must be a positive integer, found {v}"))
                })? as usize
            }
            "gpus" => {
                res.gpus = v
                    .as_u64()
                    .ok_or_else(|| SpecError::new(&f, format!("must be an integer, found {v}")))?
                    as usize
            }
            "mem" => {
                res.mem_bytes = Some(
                    parse_bytes(v)
                        .map_err(|m| SpecError::new(&f, m).fix("e.g. `mem: 4G` or `mem: 512M`"))?,
                )
            }
            "time" => {
                res.time = Some(match v {
                    Value::String(t) if !t.trim().is_empty() => t.trim().to_string(),
                    Value::Number(n) if n.as_u64().is_some() => n.to_string(),
                    other => {
                        return Err(SpecError::new(
                            &f,
                            format!("must be a time limit, found {other}"),
                        )
                        .fix("as sbatch --time takes it: minutes (`30`) or `H:MM:SS`"))
                    }
                })
            }
            "partition" => {
                res.partition = Some(
                    v.as_str()
                        .filter(|p| !p.trim().is_empty())
                        .ok_or_else(|| {
                            SpecError::new(&f, format!("must be a partition name, found {v}"))
                        })?
                        .to_string(),
                )
            }
            "sbatch" => {
                res.sbatch = v
                    .as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(|i| i.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        SpecError::new(&f, format!("must be a list of sbatch flags, found {v}"))
                            .fix("e.g. `sbatch: [\"--constraint=a100\"]`")
                    })?
            }
            other => {
                return Err(SpecError::new(&f, format!("unknown resource '{other}'"))
                    .fix(suggestion(other, RESOURCE_FIELDS.iter().copied())))
            }
        }
    }
    Ok(res)
}

const RESOURCE_FIELDS: &[&str] = &["cpus", "gpus", "mem", "time", "partition", "sbatch"];

fn parse_executor(value: Option<&Value>) -> Result<ExecutorSpec, SpecError> {
    let mut spec = ExecutorSpec::default();
    let map = match value {
        None | Some(Value::Null) => return Ok(spec),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(SpecError::new(
                "executor",
                format!("must be a mapping, found {}", kind(other)),
            )
            .fix("e.g. `executor: {kind: slurm, partition: gpu, max_jobs: 50}`"))
        }
    };
    for (key, v) in map {
        let f = format!("executor.{key}");
        let text = || -> Result<String, SpecError> {
            v.as_str()
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .ok_or_else(|| SpecError::new(&f, format!("must be a non-empty string, found {v}")))
        };
        match key.as_str() {
            "kind" => {
                let k = text()?;
                if k != "local" && k != "slurm" {
                    return Err(SpecError::new(&f, format!("unknown executor '{k}'"))
                        .fix(suggestion(&k, ["local", "slurm"])));
                }
                spec.kind = Some(k);
            }
            "partition" => spec.partition = Some(text()?),
            "account" => spec.account = Some(text()?),
            "max_jobs" => {
                spec.max_jobs = Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                    SpecError::new(&f, format!("must be a positive integer, found {v}"))
                })? as usize)
            }
            other => {
                return Err(
                    SpecError::new(&f, format!("unknown executor setting '{other}'")).fix(
                        suggestion(other, ["kind", "partition", "account", "max_jobs"]),
                    ),
                )
            }
        }
    }
    Ok(spec)
}

fn parse_bytes(v: &Value) -> Result<u64, String> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let s = v
        .as_str()
        .ok_or_else(|| format!("must be a size such as 4G, found {v}"))?;
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let mult: f64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0f64.powi(4),
        _ => return Err(format!("'{s}' has an unknown unit")),
    };
    Ok((num * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<Pipeline, SpecError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Pipeline::from_str(text, Path::new("p.yaml"), &sets)
    }

    #[test]
    fn shorthand_vars_and_sets() {
        let p = load(
            "name: demo\nvars: {n: 3}\nstages:\n  make:\n    op: shell\n    cmd: \"seq ${vars.n}\"\n    retries: 2\n    timeout: 10m\n",
            &["vars.n=5", "stages.make.env={A: 1}"],
        )
        .unwrap();
        let s = &p.stages[0];
        assert_eq!(s.params["cmd"], "seq 5");
        assert_eq!(s.params["env"]["A"], 1);
        assert_eq!(s.retries, 2);
        assert_eq!(s.timeout, Some(Duration::from_secs(600)));
    }

    #[test]
    fn errors_are_located() {
        let e = load("stages:\n  a:\n    op: shell\n    retries: -1\n", &[]).unwrap_err();
        assert_eq!(e.field, "stages.a.retries");
        assert_eq!(e.pos, Some(Pos { line: 4, col: 5 }));
        let e = load("stages:\n  a:\n    op: shell\n  b: [\n", &[]).unwrap_err();
        assert!(e.message.contains("malformed YAML"), "{e}");
        assert!(e.pos.is_some());
        let e = load("stagse: {}\n", &[]).unwrap_err();
        assert!(e.fix.unwrap().contains("stages"));
    }

    #[test]
    fn set_errors_name_the_override() {
        let e = load(
            "stages:\n  a: {op: shell, cmd: x}\n",
            &["stages.b.params.x=1"],
        )
        .unwrap_err();
        assert!(e.message.contains("no stage 'b'"), "{e}");
        let e = load(
            "stages:\n  a: {op: shell, cmd: x, retries: 1}\n",
            &["stages.a.retries=x"],
        )
        .unwrap_err();
        assert!(e.message.contains("--set stages.a.retries=x"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes(&Value::from("4G")), Ok(4 << 30));
        assert_eq!(parse_bytes(&Value::from("512MiB")), Ok(512 << 20));
        assert!(parse_bytes(&Value::from("4Q")).is_err());
    }

    #[test]
    fn a_byte_order_mark_is_not_content() {
        let p = load(
            "\u{feff}name: bom\nstages:\n  a: {op: shell, cmd: x}\n",
            &[],
        )
        .unwrap();
        assert_eq!(p.name, "bom");
        let e = load("\u{feff}stages:\n  a: {op: shell, retries: x}\n", &[]).unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 2, col: 18 }));
    }

    #[test]
    fn keys_of_one_text_are_refused_with_both_lines() {
        let e = load(
            "stages:\n  a:\n    op: shell\n    env:\n      1: a\n      \"1\": b\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "stages.a.env.1");
        assert_eq!(e.pos, Some(Pos { line: 6, col: 7 }));
        assert!(e.message.contains("lines 5 and 6"), "{e}");
        // From --set there are no lines, but the same refusal.
        let e = load("stages:\n  a: {op: shell}\n", &["vars={1: a, \"1\": b}"]).unwrap_err();
        assert!(e.message.contains("given twice"), "{e}");
    }

    #[test]
    fn timeouts_are_bounded() {
        let stage = |t: &str| load(&format!("stages:\n  a: {{op: shell, timeout: {t}}}\n"), &[]);
        assert_eq!(
            stage("31536000").unwrap().stages[0].timeout,
            Some(MAX_TIMEOUT)
        );
        assert_eq!(
            stage("2h").unwrap().stages[0].timeout,
            Some(Duration::from_secs(7200))
        );
        for bad in ["1e300", "-1", "0", "31536000.5", "\"366days\"", "\"0s\""] {
            let e = stage(bad).unwrap_err();
            assert_eq!(e.field, "stages.a.timeout", "{bad}");
            assert!(e.message.contains("365 days"), "{bad}: {e}");
        }
    }

    #[test]
    fn input_names_are_one_segment_and_one_variable() {
        let with = |inputs: &str| {
            load(
                &format!("stages:\n  up: {{op: shell}}\n  b: {{op: shell, inputs: {inputs}}}\n"),
                &[],
            )
        };
        assert!(with("{data: up, model-2: up}").is_ok());
        let e = with("{a-b: up, a_b: up}").unwrap_err();
        assert_eq!(e.field, "stages.b.inputs.a_b");
        assert!(e.message.contains("ENGINE_IN_A_B"), "{e}");
        for bad in ["\"..\"", "\".\"", "\"a/b\"", "\"\""] {
            let e = with(&format!("{{{bad}: up}}")).unwrap_err();
            assert!(e.message.contains("not a valid input name"), "{bad}: {e}");
        }
    }

    #[test]
    fn max_stages_is_capped() {
        let e = load("max_stages: 10000001\nstages:\n  a: {op: shell}\n", &[]).unwrap_err();
        assert_eq!(e.field, "max_stages");
        assert!(e.fix.unwrap().contains("10000000"));
        assert!(load("max_stages: 10000000\nstages:\n  a: {op: shell}\n", &[]).is_ok());
    }
}
