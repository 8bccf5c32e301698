//! From a [`Pipeline`] to a [`Plan`]: matrices expanded, references resolved, params validated
//! by their ops, and the stage instances in a deterministic topological order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ops::{Op, Registry};
use petgraph::graph::{DiGraph, NodeIndex};
use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::spec::interpolate::{self, render, Budget, Scope};
use crate::spec::{suggestion, Pipeline, Resources, SpecError, StageSpec, MAX_STAGES_CEILING};

/// One stage instance (a stage, or one point of its matrix).
#[derive(Clone)]
pub struct Node {
    /// `stage` or `stage[k=v,...]`.
    pub name: String,
    pub stage: String,
    /// `k=v,...`, empty without a matrix.
    pub label: String,
    pub matrix: Map<String, Value>,
    pub op: Arc<dyn Op>,
    pub params: Value,
    pub inputs: Vec<NodeInput>,
    /// Workspace-relative, normalised.
    pub deps: Vec<String>,
    pub outs: Vec<String>,
    /// Nodes whose `outs` produce one of this node's `deps` (an implicit edge).
    pub dep_producers: Vec<usize>,
    pub seed: u64,
    pub retries: u32,
    pub timeout: Option<Duration>,
    pub resources: Resources,
    pub cache: bool,
}

#[derive(Debug, Clone)]
pub struct NodeInput {
    pub name: String,
    /// As written (`square[*]`), after interpolation.
    pub reference: String,
    pub sources: InputSources,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSources {
    One(usize),
    Many(Vec<usize>),
}

impl InputSources {
    pub fn nodes(&self) -> Vec<usize> {
        match self {
            InputSources::One(i) => vec![*i],
            InputSources::Many(v) => v.clone(),
        }
    }
}

impl Node {
    /// Every node this one waits for.
    pub fn upstream(&self) -> Vec<usize> {
        let mut up: Vec<usize> = self.inputs.iter().flat_map(|i| i.sources.nodes()).collect();
        up.extend(&self.dep_producers);
        up.sort_unstable();
        up.dedup();
        up
    }
}

/// The expanded pipeline. `nodes` are topologically ordered: every node's upstream nodes come
/// before it.
impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("op", &self.op.name())
            .finish()
    }
}

#[derive(Debug)]
pub struct Plan {
    pub pipeline: Pipeline,
    pub nodes: Vec<Node>,
}

impl Plan {
    /// Nodes of `stage` (a stage name or an instance name).
    pub fn select(&self, stage: &str) -> Vec<usize> {
        let exact: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].name == stage)
            .collect();
        if !exact.is_empty() {
            return exact;
        }
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].stage == stage)
            .collect()
    }

    /// The instances a command-line selector names: an instance name (`cnn[lr=0.02,seed=1]`,
    /// variables in any order), a stage name (all its instances) or a partial selector
    /// (`cnn[lr=0.02]`, `cnn[lr=0.02,*]`, `cnn[*]`: every instance matching), in the syntax
    /// `inputs:` accept. In plan order; an error names what does not match and what would.
    pub fn resolve_selector(&self, selector: &str) -> Result<Vec<usize>, SpecError> {
        let selector = selector.trim();
        let exact: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].name == selector)
            .collect();
        if !exact.is_empty() {
            return Ok(exact);
        }
        let stage = selector.split('[').next().unwrap_or(selector).trim();
        let Some(spec) = self.pipeline.stage(stage) else {
            return Err(self.unknown_stage(stage));
        };
        let instances: Vec<(usize, BTreeMap<String, String>)> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].stage == stage)
            .map(|i| {
                let point = self.nodes[i]
                    .matrix
                    .iter()
                    .map(|(k, v)| (k.clone(), render(v)))
                    .collect();
                (i, point)
            })
            .collect();
        let Some(inner) = selector[stage.len()..].trim().strip_prefix('[') else {
            return Ok(instances.into_iter().map(|(i, _)| i).collect());
        };
        // On the command line a partial selector takes every instance it matches.
        let reference = if inner.contains('*') {
            selector.to_string()
        } else {
            match inner.strip_suffix(']') {
                Some(body) if body.trim().is_empty() => format!("{stage}[*]"),
                Some(body) => format!("{stage}[{body},*]"),
                None => selector.to_string(),
            }
        };
        let index = StageIndex {
            spec,
            values: spec
                .matrix
                .iter()
                .map(|(k, vs)| (k.clone(), RenderedValues::new(vs)))
                .collect(),
            instances,
        };
        let by_stage = HashMap::from([(stage, index)]);
        let mut e = match resolve_reference(&self.pipeline, &by_stage, &reference) {
            Ok(sources) => return Ok(sources.nodes()),
            Err(e) => e,
        };
        e.message = format!("'{selector}': {}", e.message);
        e.file = self.pipeline.file.clone();
        Err(e)
    }

    /// An error for a stage name on the command line that matches nothing.
    pub fn unknown_stage(&self, stage: &str) -> SpecError {
        let names: Vec<&str> = self
            .pipeline
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        let mut e = SpecError::new("", format!("there is no stage '{stage}'"))
            .fix(suggestion(stage, names.iter().copied()));
        e.file = self.pipeline.file.clone();
        e
    }

    /// The plan of `targets` and everything they need (their upstream nodes, transitively),
    /// in the same order: what `engine run p.yaml TARGET...` runs. Keys do not change, since
    /// they never depend on node positions.
    pub fn restricted_to(self, targets: &[usize]) -> Plan {
        let mut keep = vec![false; self.nodes.len()];
        for &t in targets {
            keep[t] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if keep[i] {
                for u in self.nodes[i].upstream() {
                    keep[u] = true;
                }
            }
        }
        let mut position = vec![usize::MAX; self.nodes.len()];
        let mut nodes = Vec::with_capacity(keep.iter().filter(|k| **k).count());
        for (i, node) in self.nodes.into_iter().enumerate() {
            if keep[i] {
                position[i] = nodes.len();
                nodes.push(node);
            }
        }
        for node in &mut nodes {
            for input in &mut node.inputs {
                input.sources = match &input.sources {
                    InputSources::One(u) => InputSources::One(position[*u]),
                    InputSources::Many(us) => {
                        InputSources::Many(us.iter().map(|u| position[*u]).collect())
                    }
                };
            }
            for p in &mut node.dep_producers {
                *p = position[*p];
            }
        }
        Plan {
            pipeline: self.pipeline,
            nodes,
        }
    }

    /// Every node downstream of `roots`, including them.
    pub fn descendants(&self, roots: &[usize]) -> Vec<bool> {
        let mut mark = vec![false; self.nodes.len()];
        for &r in roots {
            mark[r] = true;
        }
        for i in 0..self.nodes.len() {
            if !mark[i] && self.nodes[i].upstream().iter().any(|&u| mark[u]) {
                mark[i] = true;
            }
        }
        mark
    }
}

/// From this many stage instances, expansion and reference resolution run on all cores.
const PARALLEL_FROM: usize = 64;

/// Options of planning that do not come from the file.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Overrides the pipeline's `max_stages`.
    pub max_stages: Option<usize>,
    /// Folders `deps`/`outs` may never point into (the cache).
    pub protected: Vec<PathBuf>,
    /// `--device`: given to every stage whose op takes a `device` param and sets none.
    pub device: Option<String>,
}

pub fn build(
    pipeline: Pipeline,
    registry: &Registry,
    options: &PlanOptions,
) -> Result<Plan, SpecError> {
    let max_stages = options.max_stages.unwrap_or(pipeline.max_stages);
    let locate = |e: SpecError| pipeline.locate(e);
    if max_stages > MAX_STAGES_CEILING || max_stages == 0 {
        let mut e = SpecError::new(
            "",
            format!("--max-stages {max_stages}: must be from 1 to {MAX_STAGES_CEILING}"),
        )
        .fix("a plan holds every stage instance in memory; split the pipeline, or pass a smaller --max-stages");
        e.file = pipeline.file.clone();
        return Err(e);
    }
    let protected: Vec<PathBuf> = options.protected.iter().map(|p| resolved_path(p)).collect();
    let Instances {
        mut nodes,
        by_stage,
        raw_inputs,
    } = instances(&pipeline, registry, options, &protected, max_stages)?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if seen.insert(&node.name, i).is_some() {
            return Err(locate(
                SpecError::new(
                    format!("stages.{}.matrix", node.stage),
                    format!("two matrix points are both named '{}'", node.name),
                )
                .fix("matrix values must differ in their text form (1 and \"1\" do not)"),
            ));
        }
    }
    check_outs_overlap(&pipeline, &nodes)?;
    check_on_disk(&pipeline, &nodes, &protected)?;
    resolve_inputs(&pipeline, &by_stage, raw_inputs, &mut nodes)?;
    check_list_folders(&pipeline, &nodes)?;
    link_produced_deps(&mut nodes);
    let order = topological_order(&nodes).map_err(|cycle| locate(cycle_error(&nodes, &cycle)))?;
    let nodes = reorder(nodes, &order);
    Ok(Plan { pipeline, nodes })
}

/// Every stage's instances, in stage order then point order, with the index references are
/// resolved against and each instance's inputs as written.
struct Instances<'p> {
    nodes: Vec<Node>,
    by_stage: HashMap<&'p str, StageIndex<'p>>,
    raw_inputs: Vec<RawInputs>,
}

/// Expands every stage into its instances, up to `max_stages` in all.
fn instances<'p>(
    pipeline: &'p Pipeline,
    registry: &Registry,
    options: &PlanOptions,
    protected: &[PathBuf],
    max_stages: usize,
) -> Result<Instances<'p>, SpecError> {
    let locate = |e: SpecError| pipeline.locate(e);
    let budget = Budget::starting_at(pipeline.expanded_bytes);
    let mut out = Instances {
        nodes: Vec::new(),
        by_stage: HashMap::new(),
        raw_inputs: Vec::new(),
    };
    for spec in &pipeline.stages {
        let op = registry.get(&spec.op).cloned().ok_or_else(|| {
            locate(
                SpecError::new(
                    format!("stages.{}.op", spec.name),
                    format!("unknown op '{}'", spec.op),
                )
                .fix(format!(
                    "{} (`engine ops` lists every op)",
                    suggestion(&spec.op, registry.names().collect::<Vec<_>>())
                )),
            )
        })?;
        let count = instance_count(spec, out.nodes.len(), max_stages).map_err(locate)?;
        // `--device` goes to ops whose params type has a `device` field; asked once per stage
        // (the answer walks the op's params schema), not once per matrix point.
        let device = options.device.as_deref().filter(|_| op.takes_device());
        // Points expand independently: on all cores for big matrices, in point order.
        let expand_point = |point: usize| {
            let point = matrix_point(&spec.matrix, point);
            expand(pipeline, spec, &op, point, device, protected, &budget)
        };
        let expanded: Vec<Result<(Node, RawInputs), SpecError>> = if count >= PARALLEL_FROM {
            (0..count).into_par_iter().map(expand_point).collect()
        } else {
            (0..count).map(expand_point).collect()
        };
        for node in expanded {
            let (node, raw) = node.map_err(locate)?;
            let index = out
                .by_stage
                .entry(&spec.name)
                .or_insert_with(|| StageIndex {
                    spec,
                    values: spec
                        .matrix
                        .iter()
                        .map(|(k, vs)| (k.clone(), RenderedValues::new(vs)))
                        .collect(),
                    instances: Vec::new(),
                });
            let rendered = node
                .matrix
                .iter()
                .map(|(k, v)| (k.clone(), render(v)))
                .collect();
            index.instances.push((out.nodes.len(), rendered));
            out.raw_inputs.push(raw);
            out.nodes.push(node);
        }
    }
    Ok(out)
}

/// How many instances `spec`'s matrix makes, if `planned` instances and these stay within
/// `max_stages`.
fn instance_count(spec: &StageSpec, planned: usize, max_stages: usize) -> Result<usize, SpecError> {
    spec.matrix
        .iter()
        .try_fold(1usize, |acc, (_, values)| acc.checked_mul(values.len()))
        .filter(|n| planned.saturating_add(*n) <= max_stages)
        .ok_or_else(|| {
            SpecError::new(
                format!("stages.{}.matrix", spec.name),
                format!(
                    "the matrix expands the pipeline past {max_stages} stages ({})",
                    spec.matrix
                        .iter()
                        .map(|(k, v)| format!("{k}: {}", v.len()))
                        .collect::<Vec<_>>()
                        .join(" x ")
                ),
            )
            .fix("shrink the matrix, or raise the limit with `max_stages:` or --max-stages")
        })
}

/// Resolves every node's input references (on all cores for big plans); the first error in
/// plan order is the one returned, whatever order the threads finished in.
fn resolve_inputs(
    pipeline: &Pipeline,
    by_stage: &HashMap<&str, StageIndex<'_>>,
    raw_inputs: Vec<RawInputs>,
    nodes: &mut [Node],
) -> Result<(), SpecError> {
    let resolve = |inputs: RawInputs| -> Result<Vec<NodeInput>, SpecError> {
        inputs
            .into_iter()
            .map(|(local, reference, field)| {
                let sources = resolve_reference(pipeline, by_stage, &reference)
                    .map_err(|m| m.field_if_empty(&field))?;
                Ok(NodeInput {
                    name: local,
                    reference,
                    sources,
                })
            })
            .collect()
    };
    let resolved: Vec<Result<Vec<NodeInput>, SpecError>> = if raw_inputs.len() >= PARALLEL_FROM {
        raw_inputs.into_par_iter().map(resolve).collect()
    } else {
        raw_inputs.into_iter().map(resolve).collect()
    };
    for (node, inputs) in nodes.iter_mut().zip(resolved) {
        node.inputs = inputs.map_err(|e| pipeline.locate(e))?;
    }
    Ok(())
}

/// The error for a `cycle` of nodes, naming the kind of edge that closes it: an input, or a
/// dep inside another stage's outs.
fn cycle_error(nodes: &[Node], cycle: &[usize]) -> SpecError {
    let first = &nodes[cycle[0]];
    let from = cycle[cycle.len() - 1];
    let via_input = first
        .inputs
        .iter()
        .any(|inp| inp.sources.nodes().contains(&from));
    let (field, fix) = if via_input {
        (
            "inputs",
            "a stage cannot depend on its own output; remove one of these inputs",
        )
    } else {
        ("params.deps", "a stage cannot read a file that it (through these stages) writes; remove the dep or the other stage's `outs:` entry")
    };
    SpecError::new(
        format!("stages.{}.{field}", first.stage),
        format!(
            "the stages form a cycle: {}",
            cycle
                .iter()
                .chain(std::iter::once(&cycle[0]))
                .map(|&i| nodes[i].name.as_str())
                .collect::<Vec<_>>()
                .join(" -> ")
        ),
    )
    .fix(fix)
}

trait FieldIfEmpty {
    fn field_if_empty(self, field: &str) -> Self;
}

impl FieldIfEmpty for SpecError {
    fn field_if_empty(mut self, field: &str) -> Self {
        if self.field.is_empty() {
            self.field = field.to_string();
        }
        self
    }
}

/// The `point`-th combination of the matrix, in declaration order (last variable fastest).
fn matrix_point(matrix: &[(String, Vec<Value>)], mut point: usize) -> Map<String, Value> {
    let mut chosen = vec![Value::Null; matrix.len()];
    for (i, (_, values)) in matrix.iter().enumerate().rev() {
        chosen[i] = values[point % values.len()].clone();
        point /= values.len();
    }
    matrix.iter().map(|(k, _)| k.clone()).zip(chosen).collect()
}

/// A matrix point as the label list inputs name their items by (`p=2,q=a`).
pub fn label_of(matrix: &Map<String, Value>) -> String {
    ops::Label::from_pairs(matrix.iter().map(|(k, v)| (k.clone(), render(v)))).to_string()
}

type RawInputs = Vec<(String, String, String)>;

fn expand(
    pipeline: &Pipeline,
    spec: &StageSpec,
    op: &Arc<dyn Op>,
    matrix: Map<String, Value>,
    device: Option<&str>,
    protected: &[PathBuf],
    budget: &Budget,
) -> Result<(Node, RawInputs), SpecError> {
    let stage_path = format!("stages.{}", spec.name);
    let scope = Scope {
        vars: Some(&pipeline.vars),
        matrix: Some(&matrix),
        budget,
    };
    let params = Value::Object(interpolate::resolve_object(
        &spec.params,
        &scope,
        &format!("{stage_path}.params"),
    )?);
    let (params, injected) = with_default_device(params, device);
    let op_plan = op.plan(&params).map_err(|mut e| {
        if let (true, Some(device)) = (injected && e.path == "device", device) {
            e.message = format!("--device {device}: {}", e.message);
            e.fix = e
                .fix
                .or_else(|| Some("choose a device this build supports, e.g. --device cpu".into()));
        }
        param_error(e, op.as_ref(), &stage_path)
    })?;
    let mut raw_inputs = Vec::new();
    for (local, reference) in &spec.inputs {
        let field = format!("{stage_path}.inputs.{local}");
        let resolved = interpolate::resolve(&Value::String(reference.clone()), &scope, &field)?;
        raw_inputs.push((local.clone(), render(&resolved), field));
    }
    let seed = match &spec.seed {
        None => 0,
        Some(s) => {
            let v = interpolate::resolve(s, &scope, &format!("{stage_path}.seed"))?;
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| {
                    SpecError::new(
                        format!("{stage_path}.seed"),
                        format!("must be a non-negative integer, found {v}"),
                    )
                })?
        }
    };
    let deps = check_paths(
        &op_plan.deps,
        pipeline,
        protected,
        PathRole::Dep,
        &format!("{stage_path}.params.deps"),
    )?;
    let outs = check_paths(
        &op_plan.outs,
        pipeline,
        protected,
        PathRole::Out,
        &format!("{stage_path}.params.outs"),
    )?;
    for required in &op_plan.required_inputs {
        if !spec.inputs.iter().any(|(l, _)| l == required) {
            return Err(SpecError::new(
                format!("{stage_path}.inputs"),
                format!("op '{}' needs an input named '{required}'", op.name()),
            )
            .fix(format!("add `inputs: {{{required}: <stage>}}`")));
        }
    }
    let label = label_of(&matrix);
    let name = if matrix.is_empty() {
        spec.name.clone()
    } else {
        format!("{}[{label}]", spec.name)
    };
    Ok((
        Node {
            name,
            stage: spec.name.clone(),
            label,
            matrix,
            op: op.clone(),
            params,
            inputs: Vec::new(),
            deps,
            outs,
            dep_producers: Vec::new(),
            seed,
            retries: spec.retries,
            timeout: spec.timeout,
            resources: spec.resources.clone(),
            cache: spec.cache,
        },
        raw_inputs,
    ))
}

/// Adds `device: <d>` (given only for ops whose params type has a `device` field) to params
/// that do not choose a device themselves. An op that takes the field but not the value (cuda
/// in a CPU-only build) is then refused by its own validation, naming `--device`. Returns
/// whether the field was added.
fn with_default_device(params: Value, device: Option<&str>) -> (Value, bool) {
    match (device, params) {
        (Some(device), Value::Object(mut map)) if !map.contains_key("device") => {
            map.insert("device".into(), Value::String(device.to_string()));
            (Value::Object(map), true)
        }
        (_, params) => (params, false),
    }
}

/// An op's param error as a spec error naming the stage's field, with a fix.
fn param_error(e: ops::ParamError, op: &dyn Op, stage_path: &str) -> SpecError {
    let field = if e.path.is_empty() {
        format!("{stage_path}.params")
    } else {
        format!("{stage_path}.params.{}", e.path)
    };
    let mut err = SpecError::new(field, format!("{} (op '{}')", e.message, op.name()));
    err.fix = e
        .fix
        .or_else(|| unknown_field_fix(&e.message))
        .or_else(|| wrong_type_fix(&e.path, &e.message));
    err
}

/// serde's "invalid type: integer `3`, expected a sequence" -> "make 'deps' a sequence".
fn wrong_type_fix(path: &str, message: &str) -> Option<String> {
    // Untagged enums (`cmd`, env values) state only what they expect: "a string or ...".
    let expected = match message.split_once("expected ") {
        Some((_, e)) => e,
        None if message.starts_with("a ") || message.starts_with("an ") => message,
        None => return None,
    };
    let field = if path.is_empty() { "the params" } else { path };
    Some(format!("make '{field}' {}", expected.trim_end_matches('.')))
}

/// serde's "unknown field `x`, expected one of `a`, `b`" -> "did you mean ...".
fn unknown_field_fix(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    Some(format!(
        "remove '{field}' ({})",
        suggestion(field, expected.iter().copied())
    ))
}

/// What a stage does with a workspace path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PathRole {
    Dep,
    Out,
}

/// `path` made absolute and normalised, with its longest existing ancestor replaced by its
/// canonical form (symlinks resolved), so that two spellings of one folder compare equal.
pub fn resolved_path(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|c| c.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut normal = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    let mut existing = normal.as_path();
    let mut missing = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return missing.iter().rev().fold(real, |acc, seg| acc.join(seg));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name);
                existing = parent;
            }
            _ => return normal,
        }
    }
}

/// The error for a path that overlaps the cache folder `cache`, in either direction.
fn cache_overlap(
    field: &str,
    raw: &str,
    absolute: &Path,
    cache: &Path,
    role: PathRole,
) -> Option<SpecError> {
    if absolute.starts_with(cache) {
        return Some(
            SpecError::new(field, format!("'{raw}' points into the engine's cache"))
                .fix("read upstream results through `inputs:`, never from the cache folder"),
        );
    }
    if cache.starts_with(absolute) {
        let (what, why) = match role {
            PathRole::Out => ("output", "its cache.db would become part of the stage's output, and restoring that output after a cache hit would overwrite the live cache"),
            PathRole::Dep => ("dep", "the cache changes on every run, so the stage would never be cached, and its files would be hashed while they are written"),
        };
        return Some(
            SpecError::new(
                field,
                format!(
                    "the {what} '{raw}' holds the engine's cache folder {}: {why}",
                    cache.display()
                ),
            )
            .fix("keep the cache outside every `outs`/`deps` folder (--cache-dir DIR or ENGINE_CACHE_DIR), or name a narrower path"),
        );
    }
    None
}

/// Normalises workspace-relative paths and refuses ones that leave the workspace, point into
/// the cache or hold it.
fn check_paths(
    paths: &[String],
    pipeline: &Pipeline,
    protected: &[PathBuf],
    role: PathRole,
    field: &str,
) -> Result<Vec<String>, SpecError> {
    let mut out = Vec::new();
    for (i, raw) in paths.iter().enumerate() {
        let f = format!("{field}.{i}");
        let path = Path::new(raw);
        if path.is_absolute() {
            return Err(SpecError::new(f, format!("'{raw}' is an absolute path"))
                .fix("deps and outs are relative to the pipeline's folder; copy or link the file into it"));
        }
        let mut normal = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => normal.push(p),
                Component::CurDir => {}
                Component::ParentDir => {
                    if !normal.pop() {
                        return Err(SpecError::new(
                            f,
                            format!("'{raw}' leaves the pipeline's folder"),
                        )
                        .fix(
                            "deps and outs must stay inside the folder holding the pipeline file",
                        ));
                    }
                }
                _ => return Err(SpecError::new(f, format!("'{raw}' is not a relative path"))),
            }
        }
        if normal.as_os_str().is_empty() {
            return Err(
                SpecError::new(f, format!("'{raw}' names the whole workspace"))
                    .fix("name the files or folders the stage reads or writes"),
            );
        }
        let absolute = pipeline.workspace.join(&normal);
        let default_cache = pipeline.workspace.join(".engine");
        if let Some(e) = std::iter::once(&default_cache)
            .chain(protected)
            .find_map(|cache| cache_overlap(&f, raw, &absolute, cache, role))
        {
            return Err(e);
        }
        out.push(normal.to_string_lossy().into_owned());
    }
    Ok(out)
}

/// `stages.S.params.outs.J` of node `i`'s `j`-th output.
fn out_field(nodes: &[Node], i: usize, j: usize) -> String {
    format!("stages.{}.params.outs.{j}", nodes[i].stage)
}

/// `field` with its position, for naming the other side of a conflict.
fn field_at(pipeline: &Pipeline, field: &str) -> String {
    match pipeline.locate(SpecError::new(field, "")).pos {
        Some(pos) => format!("{field} at line {}:{}", pos.line, pos.col),
        None => field.to_string(),
    }
}

/// Two stage instances may not write one path, nor one inside another's (`results` and
/// `results/x.txt`): restoring either after a cache hit would overwrite the other's files.
fn check_outs_overlap(pipeline: &Pipeline, nodes: &[Node]) -> Result<(), SpecError> {
    /// An output path, its node and its index in the node's `outs`.
    type Out<'a> = (&'a Path, usize, usize);
    let mut all: Vec<Out> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.outs
                .iter()
                .enumerate()
                .map(move |(j, o)| (Path::new(o.as_str()), i, j))
        })
        .collect();
    if all.len() < 2 {
        return Ok(());
    }
    // Component order puts every path's descendants right after it, so the paths a path lies
    // in are exactly the stack of its sorted predecessors that it starts with.
    all.sort_unstable();
    let mut stack: Vec<Out> = Vec::new();
    let mut worst: Option<((usize, usize, usize), Out, Out)> = None;
    for &entry in &all {
        while stack.last().is_some_and(|top| !entry.0.starts_with(top.0)) {
            stack.pop();
        }
        if let Some(&other) = stack.iter().find(|s| s.1 != entry.1) {
            // Report the conflict whose later stage comes first in the file.
            let (first, later) = if other.1 < entry.1 {
                (other, entry)
            } else {
                (entry, other)
            };
            let rank = (later.1, later.2, first.1);
            let better = match &worst {
                None => true,
                Some((r, ..)) => rank < *r,
            };
            if better {
                worst = Some((rank, first, later));
            }
        }
        stack.push(entry);
    }
    let Some((_, first, later)) = worst else {
        return Ok(());
    };
    let (a, b) = (&nodes[first.1], &nodes[later.1]);
    let other = field_at(pipeline, &out_field(nodes, first.1, first.2));
    let (pa, pb) = (first.0.display(), later.0.display());
    let relation = if first.0 == later.0 {
        format!("'{pb}' is also an output of {} ({other})", a.name)
    } else if later.0.starts_with(first.0) {
        format!(
            "'{pb}' lies inside '{pa}', an output of {} ({other})",
            a.name
        )
    } else {
        format!("'{pb}' holds '{pa}', an output of {} ({other})", a.name)
    };
    let fix = if a.stage == b.stage {
        "put a matrix value in the path so each instance writes its own, e.g. `outs: [results/${matrix.p}.txt]`".to_string()
    } else {
        "give each stage its own output path; a stage that reads another's files takes them through `inputs:` or `deps:`".to_string()
    };
    Err(pipeline.locate(
        SpecError::new(
            out_field(nodes, later.1, later.2),
            format!(
                "{relation}: {} and {} would overwrite each other's results",
                b.name, a.name
            ),
        )
        .fix(fix),
    ))
}

/// Checks that need the filesystem, once per distinct path: an `outs` path may not pass
/// through a symlink (restoring it after a hit would write wherever the link points, outside
/// the workspace), and a dep reached through symlinks may not lead into the cache or hold it.
fn check_on_disk(
    pipeline: &Pipeline,
    nodes: &[Node],
    protected: &[PathBuf],
) -> Result<(), SpecError> {
    use std::collections::HashSet;
    // Distinct paths in plan order, with the node and index that first names each.
    let mut seen: HashSet<(&str, PathRole)> = HashSet::new();
    let mut todo: Vec<(&str, PathRole, usize, usize)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (role, paths) in [(PathRole::Dep, &n.deps), (PathRole::Out, &n.outs)] {
            for (j, p) in paths.iter().enumerate() {
                if seen.insert((p, role)) {
                    todo.push((p, role, i, j));
                }
            }
        }
    }
    if todo.is_empty() {
        return Ok(());
    }
    let ws = &pipeline.workspace;
    // Every folder on the way to an output, looked at once however many outputs share it:
    // Some(true) a symlink, Some(false) something else, None not there.
    let mut prefixes: HashSet<&Path> = HashSet::new();
    for (rel, role, ..) in &todo {
        if *role == PathRole::Out {
            prefixes.extend(
                Path::new(rel)
                    .ancestors()
                    .filter(|p| !p.as_os_str().is_empty()),
            );
        }
    }
    let prefixes: Vec<&Path> = prefixes.into_iter().collect();
    let is_link = |p: &Path| {
        std::fs::symlink_metadata(ws.join(p))
            .ok()
            .map(|m| m.file_type().is_symlink())
    };
    let kinds: HashMap<&Path, Option<bool>> = if prefixes.len() >= PARALLEL_FROM {
        prefixes.par_iter().map(|&p| (p, is_link(p))).collect()
    } else {
        prefixes.iter().map(|&p| (p, is_link(p))).collect()
    };
    let check = |&(rel, role, i, j): &(&str, PathRole, usize, usize)| -> Option<SpecError> {
        let field = |what: &str| format!("stages.{}.params.{what}.{j}", nodes[i].stage);
        match role {
            PathRole::Out => {
                let mut chain: Vec<&Path> = Path::new(rel)
                    .ancestors()
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect();
                chain.reverse();
                let link = chain
                    .into_iter()
                    .map(|p| (p, kinds.get(p).copied().flatten()))
                    .take_while(|(_, k)| k.is_some())
                    .find(|(_, k)| *k == Some(true))?
                    .0;
                let target = std::fs::read_link(ws.join(link))
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                let shown = link.display();
                Some(
                    SpecError::new(
                        field("outs"),
                        format!(
                            "'{rel}' passes through the symlink '{shown}' -> {target}: restoring this output after a cache hit would write wherever the link points"
                        ),
                    )
                    .fix(format!(
                        "replace the symlink '{shown}' with a real folder, or name a path without links in `outs:`"
                    )),
                )
            }
            PathRole::Dep => {
                let lexical = ws.join(rel);
                let real = resolved_path(&lexical);
                if real == lexical {
                    return None;
                }
                let f = field("deps");
                protected
                    .iter()
                    .find_map(|cache| cache_overlap(&f, rel, &real, cache, PathRole::Dep))
            }
        }
    };
    let problems: Vec<Option<SpecError>> = if todo.len() >= PARALLEL_FROM {
        todo.par_iter().map(check).collect()
    } else {
        todo.iter().map(check).collect()
    };
    match problems.into_iter().flatten().next() {
        Some(e) => Err(pipeline.locate(e)),
        None => Ok(()),
    }
}

/// The folder an instance gets inside a list input (`ENGINE_IN_X/<folder>`): its label with
/// '/' made '_', or its position when the stage has no matrix. `scheduler::input_trees` calls it.
pub fn list_item_folder(label: &str, position: usize) -> String {
    if label.is_empty() {
        position.to_string()
    } else {
        label.replace('/', "_")
    }
}

/// The longest file name Linux filesystems take.
const NAME_MAX: usize = 255;

/// Every instance of a list input gets its own folder: two labels that differ only in '/'
/// versus '_' would share one, and a label too long for a file name cannot be one.
fn check_list_folders(pipeline: &Pipeline, nodes: &[Node]) -> Result<(), SpecError> {
    for n in nodes {
        for input in &n.inputs {
            let InputSources::Many(list) = &input.sources else {
                continue;
            };
            let field = format!("stages.{}.inputs.{}", n.stage, input.name);
            let unusual = |l: &str| l.len() > NAME_MAX || l.contains(['/', '\0']);
            if !list.iter().any(|&u| unusual(&nodes[u].label)) {
                continue;
            }
            let mut folders: HashMap<String, usize> = HashMap::with_capacity(list.len());
            for (k, &u) in list.iter().enumerate() {
                let folder = list_item_folder(&nodes[u].label, k);
                if folder.len() > NAME_MAX || folder.contains('\0') {
                    return Err(pipeline.locate(
                        SpecError::new(
                            &field,
                            format!(
                                "instance {} cannot have a folder in this list input: its matrix values make a name of {} bytes{}",
                                nodes[u].name,
                                folder.len(),
                                if folder.contains('\0') { " with a NUL byte" } else { "" }
                            ),
                        )
                        .fix(format!("keep the matrix values of stage '{}' short (a folder name holds at most {NAME_MAX} bytes) and free of NUL", nodes[u].stage)),
                    ));
                }
                if let Some(prev) = folders.insert(folder.clone(), u) {
                    return Err(pipeline.locate(
                        SpecError::new(
                            &field,
                            format!(
                                "instances {} and {} would share the folder '{folder}' in this list input ('/' in a matrix value becomes '_')",
                                nodes[prev].name, nodes[u].name
                            ),
                        )
                        .fix(format!("make the matrix values of stage '{}' differ other than by '/' versus '_'", nodes[u].stage)),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Parses `stage`, `stage[*]`, `stage[k=v,...]`, `stage[k=v,*]`.
/// A stage's instances for resolving `stage[k=v]` references, with every matrix value rendered
/// once (rendering per reference and instance made planning a 100 x 100 matrix quadratic).
struct StageIndex<'a> {
    spec: &'a StageSpec,
    /// Matrix variable -> its values, rendered.
    values: HashMap<String, RenderedValues>,
    /// Node index and its matrix point, rendered.
    instances: Vec<(usize, BTreeMap<String, String>)>,
}

/// A matrix variable's values as text, in declaration order, and where each one is.
struct RenderedValues {
    list: Vec<String>,
    position: HashMap<String, usize>,
}

impl RenderedValues {
    fn new(values: &[Value]) -> Self {
        let list: Vec<String> = values.iter().map(render).collect();
        let mut position = HashMap::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            position.entry(v.clone()).or_insert(i);
        }
        Self { list, position }
    }
}

fn resolve_reference(
    pipeline: &Pipeline,
    by_stage: &HashMap<&str, StageIndex>,
    reference: &str,
) -> Result<InputSources, SpecError> {
    let reference = reference.trim();
    let (stage, selector) = match reference.split_once('[') {
        None => (reference, None),
        Some((s, rest)) => {
            let Some(inner) = rest.strip_suffix(']') else {
                return Err(
                    SpecError::new("", format!("'{reference}' has an unclosed '['"))
                        .fix("write stage[k=v] or stage[*]"),
                );
            };
            (s.trim(), Some(inner))
        }
    };
    let Some(StageIndex {
        spec,
        values: rendered_values,
        instances,
    }) = by_stage.get(stage)
    else {
        let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        return Err(
            SpecError::new("", format!("input refers to unknown stage '{stage}'"))
                .fix(suggestion(stage, names.iter().copied())),
        );
    };
    let Some(selector) = selector else {
        if instances.len() == 1 && spec.matrix.is_empty() {
            return Ok(InputSources::One(instances[0].0));
        }
        return Err(SpecError::new(
            "",
            format!(
                "stage '{stage}' has a matrix ({} instances)",
                instances.len()
            ),
        )
        .fix(format!(
            "write \"{stage}[*]\" for all of them or {stage}[k=v] for one"
        )));
    };
    let mut wildcard = false;
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "*" {
            wildcard = true;
            continue;
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(
                SpecError::new("", format!("'{part}' in '{reference}' is not k=v or *"))
                    .fix(format!("write {stage}[k=v] or {stage}[*]")),
            );
        };
        wanted.insert(k.trim().to_string(), v.trim().to_string());
    }
    let matrix_vars: Vec<&str> = spec.matrix.iter().map(|(k, _)| k.as_str()).collect();
    for (k, v) in &wanted {
        let Some(rendered) = rendered_values.get(k) else {
            return Err(SpecError::new(
                "",
                format!("stage '{stage}' has no matrix variable '{k}'"),
            )
            .fix(suggestion(k, matrix_vars.iter().copied())));
        };
        if !rendered.position.contains_key(v) {
            return Err(SpecError::new(
                "",
                format!("'{k}={v}' matches no instance of stage '{stage}'"),
            )
            .fix(format!("'{k}' takes: {}", rendered.list.join(", "))));
        }
    }
    if !wildcard && wanted.len() == spec.matrix.len() {
        // Every variable pinned: the instance is the matrix point at these positions (the
        // order `matrix_point` enumerates, last variable fastest), no scan of the instances.
        let point = spec.matrix.iter().fold(0, |point, (k, values)| {
            point * values.len() + rendered_values[k].position[&wanted[k]]
        });
        return Ok(InputSources::One(instances[point].0));
    }
    let matches: Vec<usize> = instances
        .iter()
        .filter(|(_, point)| wanted.iter().all(|(k, v)| point.get(k) == Some(v)))
        .map(|(i, _)| *i)
        .collect();
    if wildcard {
        return Ok(InputSources::Many(matches));
    }
    match matches.as_slice() {
        [one] => Ok(InputSources::One(*one)),
        _ => Err(SpecError::new(
            "",
            format!("'{reference}' matches {} instances, not one", matches.len()),
        )
        .fix(format!(
            "name every matrix variable ({}), or add ',*' to take them all as a list",
            matrix_vars.join(", ")
        ))),
    }
}

/// A dep inside another stage's `outs` makes that stage upstream.
fn link_produced_deps(nodes: &mut [Node]) {
    let mut producers: Vec<(PathBuf, usize)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in &n.outs {
            producers.push((PathBuf::from(o), i));
        }
    }
    if producers.is_empty() {
        return;
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut found = Vec::new();
        for d in &node.deps {
            let d = Path::new(d);
            for (o, p) in &producers {
                if *p != i && (d.starts_with(o) || o.starts_with(d)) {
                    found.push(*p);
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        node.dep_producers = found;
    }
}

/// Kahn's algorithm, always taking the earliest-declared ready node, so the order is stable.
/// On a cycle, returns the node indices along it.
fn topological_order(nodes: &[Node]) -> Result<Vec<usize>, Vec<usize>> {
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(nodes.len(), nodes.len());
    let idx: Vec<NodeIndex> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
    for (i, n) in nodes.iter().enumerate() {
        for u in n.upstream() {
            graph.add_edge(idx[u], idx[i], ());
        }
    }
    let mut indegree: Vec<usize> = (0..nodes.len())
        .map(|i| {
            graph
                .neighbors_directed(idx[i], petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len())
        .filter(|&i| indegree[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for next in graph.neighbors_directed(idx[i], petgraph::Direction::Outgoing) {
            let j = graph[next];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(Reverse(j));
            }
        }
    }
    if order.len() == nodes.len() {
        return Ok(order);
    }
    // Walk backwards along remaining edges until a node repeats: that loop is a cycle.
    let start = (0..nodes.len()).find(|&i| indegree[i] > 0).unwrap_or(0);
    let mut path = vec![start];
    let mut current = start;
    loop {
        let Some(prev) = nodes[current]
            .upstream()
            .into_iter()
            .find(|&u| indegree[u] > 0)
        else {
            return Err(path);
        };
        if let Some(pos) = path.iter().position(|&p| p == prev) {
            let mut cycle: Vec<usize> = path[pos..].to_vec();
            cycle.reverse();
            return Err(cycle);
        }
        path.push(prev);
        current = prev;
    }
}

fn reorder(nodes: Vec<Node>, order: &[usize]) -> Vec<Node> {
    let mut new_index = vec![0; nodes.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&old| {
            let mut n = slots[old]
                .take()
                .expect("each index appears once in a topological order");
            for input in &mut n.inputs {
                input.sources = match &input.sources {
                    InputSources::One(i) => InputSources::One(new_index[*i]),
                    InputSources::Many(v) => {
                        InputSources::Many(v.iter().map(|i| new_index[*i]).collect())
                    }
                };
            }
            n.dep_producers = n.dep_producers.iter().map(|i| new_index[*i]).collect();
            n
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<Plan, SpecError> {
        let dir = std::env::temp_dir();
        let p = Pipeline::from_str(text, &dir.join("p.yaml"), &[])?;
        build(p, &Registry::builtin(), &PlanOptions::default())
    }

    const DEMO: &str = r#"
name: demo
vars: {n: 3}
stages:
  total:
    op: shell
    inputs: {parts: "square[*]"}
    cmd: "cat $ENGINE_IN_PARTS/*/out.txt"
  make:
    op: shell
    cmd: "seq ${vars.n} > $ENGINE_OUT/numbers.txt"
  square:
    op: shell
    matrix: {p: [2, 3]}
    inputs: {numbers: make}
    cmd: "awk '{print $1^${matrix.p}}' $ENGINE_IN_NUMBERS/numbers.txt > $ENGINE_OUT/out.txt"
"#;

    #[test]
    fn expands_and_orders() {
        let p = plan(DEMO).unwrap();
        let names: Vec<&str> = p.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["make", "square[p=2]", "square[p=3]", "total"]);
        assert_eq!(
            p.nodes[1].params["cmd"],
            "awk '{print $1^2}' $ENGINE_IN_NUMBERS/numbers.txt > $ENGINE_OUT/out.txt"
        );
        assert_eq!(p.nodes[3].inputs[0].sources, InputSources::Many(vec![1, 2]));
        assert_eq!(p.nodes[1].inputs[0].sources, InputSources::One(0));
    }

    #[test]
    fn selectors() {
        let text = DEMO.replace("\"square[*]\"", "\"square[p=3]\"");
        let p = plan(&text).unwrap();
        assert_eq!(p.nodes[3].inputs[0].sources, InputSources::One(2));
        let e = plan(&DEMO.replace("\"square[*]\"", "square")).unwrap_err();
        assert!(e.fix.unwrap().contains("square[*]"));
        let e = plan(&DEMO.replace("\"square[*]\"", "\"square[p=4]\"")).unwrap_err();
        assert!(e.fix.unwrap().contains("2, 3"));
        assert_eq!(e.field, "stages.total.inputs.parts");
        let e = plan(&DEMO.replace("\"square[*]\"", "\"sqare[*]\"")).unwrap_err();
        assert!(e.fix.unwrap().contains("square"));
    }

    #[test]
    fn command_line_selectors_take_every_match_in_any_order() {
        let text = DEMO.replace("matrix: {p: [2, 3]}", "matrix: {p: [2, 3], q: [a, b]}");
        let p = plan(&text).unwrap();
        let names = |sel: &str| -> Vec<String> {
            p.resolve_selector(sel)
                .unwrap()
                .into_iter()
                .map(|i| p.nodes[i].name.clone())
                .collect()
        };
        assert_eq!(names("square[q=b,p=3]"), ["square[p=3,q=b]"]);
        assert_eq!(names("square[p=3,q=b]"), ["square[p=3,q=b]"]);
        assert_eq!(names("square[p=2]"), ["square[p=2,q=a]", "square[p=2,q=b]"]);
        assert_eq!(
            names("square[q=a,*]"),
            ["square[p=2,q=a]", "square[p=3,q=a]"]
        );
        assert_eq!(names("square").len(), 4);
        assert_eq!(names("square[*]").len(), 4);
        assert_eq!(names("make"), ["make"]);
        let e = p.resolve_selector("square[p=4]").unwrap_err();
        assert!(e.message.contains("square[p=4]"), "{}", e.message);
        assert!(e.fix.unwrap().contains("2, 3"));
        let e = p.resolve_selector("square[r=1]").unwrap_err();
        assert!(
            e.message.contains("no matrix variable 'r'"),
            "{}",
            e.message
        );
        let e = p.resolve_selector("sqare").unwrap_err();
        assert!(e.fix.unwrap().contains("square"));
    }

    #[test]
    fn a_restricted_plan_keeps_the_targets_and_what_they_need() {
        let p = plan(DEMO).unwrap();
        let target = p.resolve_selector("square[p=3]").unwrap();
        let r = p.restricted_to(&target);
        let names: Vec<&str> = r.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["make", "square[p=3]"]);
        assert_eq!(r.nodes[1].inputs[0].sources, InputSources::One(0));
        let p = plan(DEMO).unwrap();
        let all = p.resolve_selector("total").unwrap();
        let r = p.restricted_to(&all);
        assert_eq!(r.nodes.len(), 4);
        assert_eq!(r.nodes[3].inputs[0].sources, InputSources::Many(vec![1, 2]));
    }

    /// A reference pinning every matrix variable (in any order) finds its instance by
    /// position; it must be the instance whose point matches, as a scan would find.
    #[test]
    fn pinned_references_find_the_matching_instance() {
        let text = r#"
name: pins
stages:
  m:
    op: shell
    matrix: {a: [x, "y z", 3], b: [1, 2.5, 10, -1]}
    cmd: "echo ${matrix.a} ${matrix.b} > $ENGINE_OUT/o"
  pick:
    op: shell
    matrix: {a: [x, "y z", 3], b: [1, 2.5, 10, -1]}
    inputs: {one: "m[b=${matrix.b}, a=${matrix.a}]", part: "m[*, a=${matrix.a}]"}
    cmd: "true"
"#;
        let p = plan(text).unwrap();
        let picks: Vec<&Node> = p.nodes.iter().filter(|n| n.stage == "pick").collect();
        assert_eq!(picks.len(), 12);
        for pick in picks {
            let InputSources::One(src) = pick.inputs[0].sources else {
                panic!("{}: not one source", pick.name);
            };
            assert_eq!(p.nodes[src].stage, "m");
            assert_eq!(p.nodes[src].matrix, pick.matrix, "{}", pick.name);
            // A partial selector with a wildcard: every instance with this `a`.
            let InputSources::Many(part) = &pick.inputs[1].sources else {
                panic!("{}: not many sources", pick.name);
            };
            assert_eq!(part.len(), 4);
            assert!(part
                .iter()
                .all(|&i| p.nodes[i].matrix["a"] == pick.matrix["a"]));
        }
        let e = plan(&text.replace("b=${matrix.b}", "b=7")).unwrap_err();
        assert!(
            e.fix.unwrap().contains("1, 2.5, 10, -1"),
            "lists the values"
        );
    }

    #[test]
    fn cycle_is_reported_with_its_path() {
        let e = plan("stages:\n  a: {op: shell, cmd: x, inputs: {i: b}}\n  b: {op: shell, cmd: x, inputs: {i: c}}\n  c: {op: shell, cmd: x, inputs: {i: a}}\n").unwrap_err();
        assert!(e.message.contains("cycle"), "{e}");
        for n in ["a", "b", "c"] {
            assert!(e.message.contains(n));
        }
    }

    #[test]
    fn limits_and_paths() {
        let e = plan(
            "max_stages: 5\nstages:\n  a: {op: shell, cmd: x, matrix: {p: [1,2,3], q: [1,2]}}\n",
        )
        .unwrap_err();
        assert!(e.message.contains("past 5"), "{e}");
        let e = plan("stages:\n  a: {op: shell, cmd: x, deps: [../x]}\n").unwrap_err();
        assert_eq!(e.field, "stages.a.params.deps.0");
        let e = plan("stages:\n  a: {op: shell, cmd: x, outs: [.engine/objects/x]}\n").unwrap_err();
        assert!(e.message.contains("cache"));
        let e = plan("stages:\n  a: {op: shel, cmd: x}\n").unwrap_err();
        assert!(e.fix.unwrap().contains("'shell'"));
        let e = plan("stages:\n  a: {op: shell, cmd: x, matrix: {p: [1, \"1\"]}}\n").unwrap_err();
        assert!(e.message.contains("both named"), "{e}");
    }

    #[test]
    fn outs_feeding_deps_make_an_edge() {
        let p = plan("stages:\n  use: {op: shell, cmd: x, deps: [data/a.txt]}\n  make: {op: shell, cmd: x, outs: [data]}\n").unwrap();
        assert_eq!(p.nodes[0].name, "make");
        assert_eq!(p.nodes[1].dep_producers, vec![0]);
    }

    #[test]
    fn outs_of_two_instances_may_not_overlap() {
        let two = |a: &str, b: &str| {
            plan(&format!(
                "stages:\n  a: {{op: shell, cmd: x, outs: [{a}]}}\n  b: {{op: shell, cmd: x, outs: [{b}]}}\n"
            ))
        };
        assert!(two("results/a.txt", "results/b.txt").is_ok());
        assert!(two("results", "results-2").is_ok());
        for (a, b, says) in [
            ("r/x.txt", "r/x.txt", "is also an output of a"),
            ("r", "r/x.txt", "lies inside 'r'"),
            ("r/x.txt", "r", "holds 'r/x.txt'"),
        ] {
            let e = two(a, b).unwrap_err();
            assert_eq!(e.field, "stages.b.params.outs.0", "{a} {b}");
            assert!(e.message.contains(says), "{a} {b}: {e}");
            assert!(
                e.message.contains("stages.a.params.outs.0 at line 2:"),
                "{e}"
            );
        }
        // One stage may list a folder and a file in it; its matrix instances may not share.
        assert!(plan("stages:\n  a: {op: shell, cmd: x, outs: [r, r/x]}\n").is_ok());
        let e = plan("stages:\n  a: {op: shell, cmd: x, matrix: {p: [1, 2]}, outs: [r]}\n")
            .unwrap_err();
        assert!(
            e.message.contains("a[p=2]") && e.message.contains("a[p=1]"),
            "{e}"
        );
        assert!(e.fix.unwrap().contains("${matrix.p}"));
    }

    #[test]
    fn list_inputs_need_one_folder_per_instance() {
        let text = "stages:\n  m: {op: shell, cmd: x, matrix: {p: [a/b, a_b, c]}}\n  c: {op: shell, cmd: x, inputs: {all: \"m[*]\"}}\n";
        let e = plan(text).unwrap_err();
        assert_eq!(e.field, "stages.c.inputs.all");
        assert!(e.message.contains("m[p=a/b] and m[p=a_b]"), "{e}");
        assert!(plan(&text.replace("a_b", "a_c")).is_ok());
        assert_eq!(list_item_folder("p=a/b", 3), "p=a_b");
        assert_eq!(list_item_folder("", 3), "3");
        let long = format!("stages:\n  m: {{op: shell, cmd: x, matrix: {{p: [{}]}}}}\n  c: {{op: shell, cmd: x, inputs: {{all: \"m[*]\"}}}}\n", "v".repeat(300));
        let e = plan(&long).unwrap_err();
        assert!(e.message.contains("bytes"), "{e}");
    }

    #[test]
    fn the_cache_may_not_lie_inside_outs_or_deps() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(ws.join("results/cache")).unwrap();
        std::fs::create_dir_all(ws.join("data")).unwrap();
        std::os::unix::fs::symlink(ws.join("results"), ws.join("link")).unwrap();
        let build_with = |text: &str, cache: &str| {
            let p = Pipeline::from_str(text, &ws.join("p.yaml"), &[])?;
            let options = PlanOptions {
                protected: vec![ws.join(cache)],
                ..PlanOptions::default()
            };
            build(p, &Registry::builtin(), &options)
        };
        let outs = "stages:\n  a: {op: shell, cmd: x, outs: [results]}\n";
        let e = build_with(outs, "results/cache").unwrap_err();
        assert!(e.message.contains("holds the engine's cache"), "{e}");
        // The same folder by another spelling, or through a link.
        assert!(build_with(outs, "data/../results/./cache").is_err());
        assert!(build_with(outs, "link/cache").is_err());
        assert!(build_with(outs, "elsewhere").is_ok());
        // A dep through a link into the cache.
        let e = build_with(
            "stages:\n  a: {op: shell, cmd: x, deps: [link/cache]}\n",
            "results/cache",
        )
        .unwrap_err();
        assert!(e.message.contains("points into the engine's cache"), "{e}");
        // An out through a link.
        let e = build_with(
            "stages:\n  a: {op: shell, cmd: x, outs: [link/x.txt]}\n",
            "elsewhere",
        )
        .unwrap_err();
        assert!(e.message.contains("symlink 'link'"), "{e}");
        assert_eq!(
            resolved_path(&ws.join("link/./new/../cache")),
            ws.join("results/cache")
        );
    }
}
