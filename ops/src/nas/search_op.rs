//! The `search` op: training-free search over NAS-Bench-201 cells
//! (`../shared/papers/training-free-nas.md` §4) scored by the indicators of §2.
//!
//! Algorithms: `random`, `prune`, `evolution`, `reinforce` (§4) and `listed` (score the given
//! `cells`: a fixed sample to correlate with trained accuracy).
//!
//! Inputs: optional `data`, a classification dataset folder (a `data.*` stage: `meta.json` +
//! `train.safetensors`); without it the indicators run on seeded Gaussian images (recorded in
//! the output as `data.source`). Output: `search.json` (the choice, the full trajectory with
//! every indicator value or failure, the pruning rounds or policy when relevant). `search.json`
//! is a function of the params, the input and the seed only, byte for byte (whatever the thread
//! count), so a rerun gives the same cached tree and downstream stages stay cached. Timings are
//! not deterministic and so live only in the metrics (the run record in the cache and `engine
//! show`), like `train`'s `wall_time_s`: `seconds_prepare` (probes, filter), `seconds_search`
//! (scoring and the algorithm), `seconds_total`. Other metrics: `num_scored`, `num_failed`,
//! `choice_index`, `filter_fraction_kept` (the share of the 15,625 cells the search may visit),
//! and for `random`, `num_rejected` (draws the filter rejected, never scored).

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::indicators::{
    linear_regions, naswot, ntk_condition_number, ntk_regression_error, thin_config, Failure,
    Images, Indicator,
};
use super::net::NetConfig;
use super::search::{
    evolution, listed_search, prune, random_search, reinforce, Evaluator, EvolutionConfig,
    ReinforceConfig, Scorer, SearchError,
};
use super::space::{Arch, OpSets, Space};
use crate::arch::filter::AcceptanceBox;
use crate::ml::dataset::{read_meta, read_split, Targets, Task};
use crate::ml::derive_seed;
use crate::{parse_params, LegacyOp as Op, OpError, ParamError, RunContext};

pub const SEARCH_FILE: &str = "search.json";
pub const DATA_INPUT: &str = "data";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Random,
    /// Score the cells listed in `cells` (a fixed sample, e.g. the cells a pipeline trains).
    Listed,
    Prune,
    Evolution,
    Reinforce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpaceName {
    Nb201,
    /// The As-ViT space (`vit_space.rs`; settings under `vit:`).
    Vit,
}

/// The connectivity pre-filter (`../shared/papers/connectivity-convergence.md` §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    /// No filter.
    #[default]
    None,
    /// The box computed from the whole space.
    Space,
    /// The paper's stated NB201 box.
    Paper,
}

/// Sizes of the proxy networks and probes (CPU-sized defaults; the note's values in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyParams {
    /// C of the NTK / G / NASWOT network [3].
    #[serde(default = "d_channels")]
    pub channels: usize,
    /// N of that network [1].
    #[serde(default = "d_one")]
    pub cells_per_stage: usize,
    /// Batch for kappa, G (train and held-out) and NASWOT [64].
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Independent initializations averaged [3].
    #[serde(default = "d_repeats")]
    pub repeats: usize,
    /// 3x3 crops for the linear regions [3000].
    #[serde(default = "d_crops")]
    pub region_samples: usize,
    /// Side of the Gaussian images when there is no `data` input (divisible by 4).
    #[serde(default = "d_size")]
    pub image_size: usize,
    /// Classes of the Gaussian fallback (a dataset brings its own).
    #[serde(default = "d_classes")]
    pub classes: usize,
}

fn d_channels() -> usize {
    3
}
fn d_one() -> usize {
    1
}
fn d_batch() -> usize {
    16
}
fn d_repeats() -> usize {
    3
}
fn d_crops() -> usize {
    1000
}
fn d_size() -> usize {
    16
}
fn d_classes() -> usize {
    10
}

impl Default for ProxyParams {
    fn default() -> Self {
        Self {
            channels: d_channels(),
            cells_per_stage: d_one(),
            batch: d_batch(),
            repeats: d_repeats(),
            region_samples: d_crops(),
            image_size: d_size(),
            classes: d_classes(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    #[serde(default = "d_space")]
    pub space: SpaceName,
    pub algorithm: Algorithm,
    /// Indicators combined by rank-sum [TE-NAS: ntk, regions; TEG-NAS adds generalization].
    #[serde(default = "d_indicators")]
    pub indicators: Vec<Indicator>,
    #[serde(default)]
    pub filter: FilterMode,
    #[serde(default)]
    pub proxy: ProxyParams,
    /// random: distinct cells drawn from the whole space; with a filter, the rejected ones are
    /// not scored.
    #[serde(default = "d_samples")]
    pub samples: usize,
    /// listed: the cells to score (arch strings or digits, `"3_33_133"`).
    #[serde(default)]
    pub cells: Vec<String>,
    /// evolution [256, 64, 1000].
    #[serde(default = "d_population")]
    pub population: usize,
    #[serde(default = "d_tournament")]
    pub tournament: usize,
    #[serde(default = "d_cycles")]
    pub cycles: usize,
    /// evolution and reinforce: cells made and scored in parallel per cycle / step [1].
    #[serde(default = "d_par")]
    pub batch: usize,
    /// reinforce [500, 0.04, 0.9, 10].
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_momentum")]
    pub momentum: f64,
    #[serde(default = "d_window")]
    pub window: usize,
    /// `space: vit` only: the scored network and probes.
    #[serde(default)]
    pub vit: super::vit_space::VitProxy,
}

fn d_space() -> SpaceName {
    SpaceName::Nb201
}
fn d_indicators() -> Vec<Indicator> {
    vec![Indicator::Ntk, Indicator::Regions]
}
fn d_samples() -> usize {
    32
}
fn d_population() -> usize {
    16
}
fn d_tournament() -> usize {
    4
}
fn d_cycles() -> usize {
    32
}
fn d_par() -> usize {
    2
}
fn d_steps() -> usize {
    16
}
fn d_lr() -> f64 {
    0.04
}
fn d_momentum() -> f64 {
    0.9
}
fn d_window() -> usize {
    10
}

impl SearchParams {
    pub fn parse(params: &Value) -> Result<Self, ParamError> {
        let p: Self = parse_params(params)?;
        if p.indicators.is_empty() {
            return Err(
                ParamError::new("indicators", "must name at least one indicator")
                    .with_fix("e.g. `indicators: [ntk, regions]`"),
            );
        }
        for (i, a) in p.indicators.iter().enumerate() {
            if p.indicators[..i].contains(a) {
                return Err(ParamError::new(
                    "indicators",
                    format!("{} is listed twice", a.name()),
                ));
            }
        }
        if p.space == SpaceName::Vit {
            super::vit_space::validate_search(&p)?;
        } else if p.indicators.contains(&Indicator::LengthDistortion) {
            return Err(ParamError::new(
                "indicators",
                "length_distortion is measured on ViTs; use it with `space: vit`",
            ));
        }
        let pr = &p.proxy;
        for (field, v) in [
            ("proxy.channels", pr.channels),
            ("proxy.cells_per_stage", pr.cells_per_stage),
            ("proxy.repeats", pr.repeats),
            ("proxy.classes", pr.classes),
            ("samples", p.samples),
            ("population", p.population),
            ("tournament", p.tournament),
            ("batch", p.batch),
            ("window", p.window),
        ] {
            if v == 0 {
                return Err(ParamError::new(field, "must be positive"));
            }
        }
        if pr.batch < 2 {
            return Err(ParamError::new(
                "proxy.batch",
                "must be at least 2 (a kernel needs two samples)",
            ));
        }
        if pr.region_samples < 2 {
            return Err(ParamError::new(
                "proxy.region_samples",
                "must be at least 2",
            ));
        }
        if pr.image_size == 0 || !pr.image_size.is_multiple_of(4) {
            return Err(ParamError::new(
                "proxy.image_size",
                format!(
                    "{} must be a positive multiple of 4 (two stride-2 reductions)",
                    pr.image_size
                ),
            ));
        }
        if p.tournament > p.population {
            return Err(ParamError::new(
                "tournament",
                format!("{} exceeds population {}", p.tournament, p.population),
            ));
        }
        if !(p.lr.is_finite() && p.lr > 0.0) {
            return Err(ParamError::new("lr", "must be a positive number"));
        }
        if !(0.0..1.0).contains(&p.momentum) {
            return Err(ParamError::new("momentum", "must be in [0, 1)"));
        }
        match (p.algorithm, p.cells.is_empty()) {
            (Algorithm::Listed, true) => {
                return Err(
                    ParamError::new("cells", "`algorithm: listed` needs cells to score")
                        .with_fix("e.g. `cells: [\"3_30_243\", \"1_11_042\"]`"),
                )
            }
            (Algorithm::Listed, false) => {
                for (i, c) in p.cells.iter().enumerate() {
                    Arch::parse(&format!("cells[{i}]"), c)
                        .map_err(|e| ParamError::new(format!("cells[{i}]"), e.to_string()))?;
                }
                if p.filter != FilterMode::None {
                    return Err(ParamError::new(
                        "filter",
                        "a listed sample is scored as given; filter the list instead",
                    )
                    .with_fix("use `filter: none` with `algorithm: listed`"));
                }
            }
            (_, false) => {
                return Err(ParamError::new(
                    "cells",
                    "only `algorithm: listed` takes a list of cells",
                ))
            }
            (_, true) => {}
        }
        if p.algorithm == Algorithm::Prune && p.filter != FilterMode::None {
            return Err(ParamError::new(
                "filter",
                "pruning works on supernets, which the connectivity filter does not judge",
            )
            .with_fix("use `filter: none` with `algorithm: prune`"));
        }
        Ok(p)
    }
}

/// The images every candidate is scored on.
#[derive(Clone, Debug)]
pub struct Probes {
    /// `dataset` or `gaussian`.
    pub source: &'static str,
    pub classes: usize,
    pub batch: Images,
    pub labels: Vec<usize>,
    pub held: Images,
    pub held_labels: Vec<usize>,
    pub crops: Images,
}

fn gaussian(n: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| Distribution::<f64>::sample(&StandardNormal, rng))
        .collect()
}

impl Probes {
    /// Seeded Gaussian images and uniform labels.
    pub fn gaussian(p: &ProxyParams, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 11));
        let s = p.image_size;
        let shape = (p.batch, 3, s, s);
        let labels = |rng: &mut StdRng| (0..p.batch).map(|_| rng.gen_range(0..p.classes)).collect();
        let batch = Images {
            x: gaussian(p.batch * 3 * s * s, &mut rng),
            shape,
        };
        let l1 = labels(&mut rng);
        let held = Images {
            x: gaussian(p.batch * 3 * s * s, &mut rng),
            shape,
        };
        let l2 = labels(&mut rng);
        let crops = Images {
            x: gaussian(p.region_samples * 9, &mut rng),
            shape: (p.region_samples, 1, 3, 3),
        };
        Self {
            source: "gaussian",
            classes: p.classes,
            batch,
            labels: l1,
            held,
            held_labels: l2,
            crops,
        }
    }

    /// Two disjoint seeded batches of the training split, and 3x3 crops of one random channel
    /// of random training images (training-free-nas.md §2).
    pub fn from_dataset(dir: &Path, p: &ProxyParams, seed: u64) -> Result<Self, OpError> {
        let meta = read_meta(dir)?;
        let fail = |m: String| OpError::Failed(format!("input `data` ({}): {m}", dir.display()));
        if meta.task != Task::Classification {
            return Err(fail("the indicators need a classification dataset".into()));
        }
        let classes = meta
            .classes
            .filter(|c| *c > 0)
            .ok_or_else(|| fail("meta.json has no classes".into()))?;
        let [c, h, w] = meta.shape;
        if h % 4 != 0 || w % 4 != 0 || h < 4 || w < 4 {
            return Err(fail(format!(
                "images are {h}x{w}; the proxy network needs sides divisible by 4"
            )));
        }
        let split = read_split(dir, &meta, "train")?;
        if split.n < 2 * p.batch {
            return Err(fail(format!(
                "the train split has {} samples; two batches of proxy.batch = {} are needed",
                split.n, p.batch
            )));
        }
        let Targets::Labels(labels) = &split.y else {
            return Err(fail("the train split has no labels".into()));
        };
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 12));
        let order = rand::seq::index::sample(&mut rng, split.n, 2 * p.batch).into_vec();
        let len = c * h * w;
        let take = |idx: &[usize]| Images {
            x: idx
                .iter()
                .flat_map(|&i| split.x[i * len..(i + 1) * len].iter().map(|&v| v as f64))
                .collect(),
            shape: (idx.len(), c, h, w),
        };
        let (a, b) = order.split_at(p.batch);
        let mut crops = Vec::with_capacity(p.region_samples * 9);
        for _ in 0..p.region_samples {
            let (i, ch) = (rng.gen_range(0..split.n), rng.gen_range(0..c));
            let (y0, x0) = (rng.gen_range(0..=h - 3), rng.gen_range(0..=w - 3));
            for y in y0..y0 + 3 {
                for x in x0..x0 + 3 {
                    crops.push(split.x[i * len + ch * h * w + y * w + x] as f64);
                }
            }
        }
        Ok(Self {
            source: "dataset",
            classes,
            batch: take(a),
            labels: a.iter().map(|&i| labels[i]).collect(),
            held: take(b),
            held_labels: b.iter().map(|&i| labels[i]).collect(),
            crops: Images {
                x: crops,
                shape: (p.region_samples, 1, 3, 3),
            },
        })
    }
}

/// Scores a supernet on the configured indicators with the proxy networks.
pub struct ProxyScorer {
    pub indicators: Vec<Indicator>,
    pub net: NetConfig,
    pub repeats: usize,
    pub probes: Probes,
    pub seed: u64,
}

impl Scorer for ProxyScorer {
    fn indicators(&self) -> &[Indicator] {
        &self.indicators
    }

    fn score(&self, sets: &OpSets) -> Result<Vec<f64>, Failure> {
        let p = &self.probes;
        self.indicators
            .iter()
            .map(|ind| match ind {
                Indicator::Ntk => {
                    ntk_condition_number(&self.net, sets, &p.batch, self.repeats, self.seed)
                }
                Indicator::Regions => {
                    linear_regions(&thin_config(), sets, &p.crops, self.repeats, self.seed)
                }
                Indicator::Generalization => ntk_regression_error(
                    &self.net,
                    sets,
                    &p.batch,
                    &p.labels,
                    &p.held,
                    &p.held_labels,
                    self.repeats,
                    self.seed,
                ),
                Indicator::Naswot => naswot(&self.net, sets, &p.batch, self.seed),
                Indicator::LengthDistortion => Err(Failure::Network {
                    indicator: ind.name(),
                    message: "measured on ViTs only".into(),
                }),
            })
            .collect()
    }
}

pub struct SearchOp;

fn search_error(e: SearchError) -> OpError {
    match e {
        SearchError::Cancelled => OpError::Cancelled,
        other => OpError::Failed(other.to_string()),
    }
}

fn write_json(dir: &Path, name: &str, value: &Value) -> Result<(), OpError> {
    let path = dir.join(name);
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| OpError::Failed(format!("cannot encode {name}: {e}")))?;
    std::fs::write(&path, text)
        .map_err(|e| OpError::io(format!("cannot write {}", path.display()), e))
}

impl Op for SearchOp {
    fn name(&self) -> &'static str {
        "search"
    }
    fn version(&self) -> u32 {
        // 2: timings moved from search.json to the metrics; `random` with a filter draws from
        // the whole space and skips the rejected draws; `listed`.
        2
    }
    fn summary(&self) -> &'static str {
        "training-free NAS over NAS-Bench-201 cells or As-ViT topologies (TE-NAS / TEG-NAS indicators; random, listed, prune, evolution, reinforce)"
    }
    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        SearchParams::parse(params).map(|_| ())
    }

    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let p = SearchParams::parse(ctx.params)?;
        if p.space == SpaceName::Vit {
            return super::vit_space::run_search(ctx, &p);
        }
        let started = Instant::now();
        let mut phases: Vec<(String, f64)> = Vec::new();

        let t = Instant::now();
        let probes = match ctx.inputs.get(DATA_INPUT) {
            Some(input) => {
                let paths = input.paths();
                let [dir] = paths.as_slice() else {
                    return Err(OpError::Failed(
                        "input `data` must be one dataset, not a list".into(),
                    ));
                };
                Probes::from_dataset(dir, &p.proxy, ctx.seed)?
            }
            None => Probes::gaussian(&p.proxy, ctx.seed),
        };
        let in_channels = probes.batch.shape.1;
        let scorer = ProxyScorer {
            indicators: p.indicators.clone(),
            net: NetConfig {
                in_channels,
                channels: p.proxy.channels,
                cells_per_stage: p.proxy.cells_per_stage,
                stages: 3,
                classes: probes.classes,
            },
            repeats: p.proxy.repeats,
            probes,
            seed: derive_seed(ctx.seed, 13),
        };
        let space = match p.filter {
            FilterMode::None => Ok(Space::All),
            FilterMode::Paper => Space::filtered(AcceptanceBox::paper_nb201()),
            FilterMode::Space => Space::space_box().and_then(Space::filtered),
        }
        .map_err(|e| OpError::Failed(format!("filter: {e}")))?;
        phases.push(("prepare".into(), t.elapsed().as_secs_f64()));
        let _ = writeln!(
            ctx.log,
            "search {:?} on {} inputs, indicators {:?}, space of {} cells",
            p.algorithm,
            scorer.probes.source,
            p.indicators,
            space.size()
        );

        let pool = ctx.thread_pool()?;
        let cancel = ctx.cancel.clone();
        let cancelled = move || cancel.is_cancelled();
        let mut ev = Evaluator::new(&scorer, &pool, &cancelled);
        let t = Instant::now();
        let algo_seed = derive_seed(ctx.seed, 14);
        let mut extra = json!({});
        let mut random_rejected = None;
        let choice = match p.algorithm {
            Algorithm::Random => {
                random_search(&mut ev, &space, p.samples, algo_seed).map(|(i, draws)| {
                    random_rejected = Some(draws.rejected);
                    extra = json!({ "draws": draws });
                    i
                })
            }
            Algorithm::Listed => {
                let cells = p
                    .cells
                    .iter()
                    .map(|c| Arch::parse("cells", c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| OpError::Failed(e.to_string()))?;
                listed_search(&mut ev, &cells)
            }
            Algorithm::Prune => prune(&mut ev).map(|(i, rounds)| {
                extra = json!({ "prune_rounds": rounds });
                i
            }),
            Algorithm::Evolution => evolution(
                &mut ev,
                &space,
                &EvolutionConfig {
                    population: p.population,
                    tournament: p.tournament,
                    cycles: p.cycles,
                    batch: p.batch,
                },
                algo_seed,
            ),
            Algorithm::Reinforce => reinforce(
                &mut ev,
                &space,
                &ReinforceConfig {
                    steps: p.steps,
                    lr: p.lr,
                    momentum: p.momentum,
                    window: p.window,
                    batch: p.batch,
                },
                algo_seed,
            )
            .map(|(i, trace)| {
                extra = json!({ "policy": trace });
                i
            }),
        }
        .map_err(search_error)?;
        phases.push(("search".into(), t.elapsed().as_secs_f64()));

        let records = &ev.records;
        let Some(arch) = records[choice].sets.single() else {
            return Err(OpError::Failed("the search ended on a supernet".into()));
        };
        let names: Vec<&str> = p.indicators.iter().map(|i| i.name()).collect();
        let trajectory: Vec<Value> = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let cell = r.sets.single();
                let values: serde_json::Map<String, Value> = names
                    .iter()
                    .zip(r.values(names.len()))
                    .map(|(n, v)| (n.to_string(), v.map_or(Value::Null, Value::from)))
                    .collect();
                json!({
                    "index": i,
                    "phase": r.phase,
                    "arch": cell.map(|a| a.arch_string()),
                    "digits": cell.map(|a| a.digits()),
                    "ops": r.sets.label(),
                    "values": values,
                    "failed": r.result.as_ref().err().map(ToString::to_string),
                })
            })
            .collect();
        let num_failed = records.iter().filter(|r| r.result.is_err()).count();
        let total = started.elapsed().as_secs_f64();
        phases.push(("total".into(), total));
        let mut out = json!({
            "space": "nb201",
            "algorithm": p.algorithm,
            "indicators": names,
            "filter": {
                "mode": p.filter,
                "accepted": space.size(),
                "box": match &space { Space::Accepted { acceptance, .. } => json!(acceptance), Space::All => Value::Null },
            },
            "data": {
                "source": scorer.probes.source,
                "image_shape": [scorer.probes.batch.shape.1, scorer.probes.batch.shape.2, scorer.probes.batch.shape.3],
                "classes": scorer.probes.classes,
                "batch": p.proxy.batch,
                "region_samples": p.proxy.region_samples,
            },
            "proxy": p.proxy,
            "choice": {
                "index": choice,
                "arch": arch.arch_string(),
                "digits": arch.digits(),
            },
            "num_scored": records.len(),
            "num_failed": num_failed,
            "trajectory": trajectory,
        });
        if let (Some(o), Value::Object(e)) = (out.as_object_mut(), extra) {
            o.extend(e);
        }
        write_json(ctx.out_dir, SEARCH_FILE, &out)?;
        let _ = writeln!(
            ctx.log,
            "chose {} ({}) after scoring {} ({} failed) in {total:.1}s",
            arch.arch_string(),
            arch.digits(),
            records.len(),
            num_failed
        );
        ctx.metrics
            .insert("num_scored".into(), records.len() as f64);
        ctx.metrics.insert("num_failed".into(), num_failed as f64);
        for (phase, seconds) in phases {
            ctx.metrics.insert(format!("seconds_{phase}"), seconds);
        }
        ctx.metrics.insert("choice_index".into(), choice as f64);
        ctx.metrics.insert(
            "filter_fraction_kept".into(),
            space.size() as f64 / Space::All.size() as f64,
        );
        if let Some(rejected) = random_rejected {
            ctx.metrics.insert("num_rejected".into(), rejected as f64);
        }
        Ok(())
    }
}
