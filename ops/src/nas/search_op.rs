//! The `search` op: training-free search over NAS-Bench-201 cells
//! (TE-NAS, arXiv 2102.11535; TEG-NAS, arXiv 2108.11939) scored by their indicators, or over As-ViT
//! topologies (`space: vit`, As-ViT, arXiv 2202.11921; the space is [`super::vit_space`]).
//!
//! Algorithms: `random`, `prune`, `evolution`, `reinforce` (`docs/methods/training-free-nas.md`
//! §4) and `listed` (score the given `cells`: a fixed sample to correlate with trained accuracy);
//! the ViT space has `random` and `reinforce`. Params: [`SearchParams`].
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
//!
//! A `vit` search also writes `models.json`, one `{label, model}` per scored topology in
//! trajectory order, which a `train` stage reads with `model_from`; its `search.json` keeps
//! the seconds per phase, and its metrics add `choice_<indicator>`.

use std::time::Instant;

use serde_json::{json, Value};

use super::indicators::{
    linear_regions, naswot, ntk_condition_number, ntk_regression_error, thin_config, Failure,
    Indicator,
};
use super::net::NetConfig;
use super::probes::{self, vit_probes, Probes};
use super::search::{
    evolution, listed_search, prune, random_search, reinforce, Evaluator, Record, Scorer,
    SearchError,
};
use super::search_params::{
    title, FilterMode, ProxyParams, SearchConfig, SearchParams, SpaceConfig, Strategy, VitProxy,
};
use super::space::{OpSets, Space};
use super::vit_space::{
    random_vit_search, reinforce_vit_search, write_models, VitEvaluator, VitScorer, VitTopology,
    CHOICES,
};
use crate::arch::filter::AcceptanceBox;
use crate::seed::derive_seed;
use crate::{OpError, Outputs, ParamError, RunContext, TypedOp};

pub const SEARCH_FILE: &str = "search.json";

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

    fn score(&self, sets: &OpSets) -> Vec<Result<f64, Failure>> {
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

impl TypedOp for SearchOp {
    const NAME: &'static str = "search";
    // 2: timings moved from search.json to the metrics; `random` with a filter draws from the
    // whole space and skips the rejected draws; `listed`.
    // Version 3: G over cell and reduction weights; pruning without `none`; one failed indicator
    // drops a cell from that indicator only; the region network has no stem; ViTs scored at
    // the reference init; As-ViT REINFORCE answers the policy's argmax.
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "training-free NAS over NAS-Bench-201 cells or As-ViT topologies (TE-NAS / TEG-NAS indicators; random, listed, prune, evolution, reinforce)";
    type Params = SearchParams;
    type Config = SearchConfig;

    fn resolve(p: SearchParams) -> Result<SearchConfig, ParamError> {
        SearchConfig::resolve(p)
    }

    fn run(
        &self,
        c: &SearchConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        match &c.space {
            SpaceConfig::Nb201 { filter, proxy } => run_nb201(c, *filter, proxy, ctx, out),
            SpaceConfig::Vit(vit) => run_vit(c, vit, ctx, out),
        }
    }
}

/// The NB201 space the search may visit.
fn nb201_space(filter: FilterMode) -> Result<Space, OpError> {
    match filter {
        FilterMode::None => Ok(Space::All),
        FilterMode::Paper => Space::filtered(AcceptanceBox::paper_nb201()),
        FilterMode::Space => Space::space_box().and_then(Space::filtered),
    }
    .map_err(|e| OpError::Failed(format!("filter: {e}")))
}

/// What an NB201 algorithm chose, and what it adds to `search.json`.
struct Outcome {
    choice: usize,
    /// Top-level keys of `search.json` only this algorithm writes (`draws`, `policy` ...).
    extra: Value,
    /// `random`: the draws the filter rejected.
    rejected: Option<usize>,
}

fn run_strategy(
    ev: &mut Evaluator<'_, ProxyScorer>,
    space: &Space,
    strategy: &Strategy,
    seed: u64,
) -> Result<Outcome, SearchError> {
    let plain = |choice| Outcome {
        choice,
        extra: json!({}),
        rejected: None,
    };
    Ok(match strategy {
        Strategy::Random { samples } => {
            let (choice, draws) = random_search(ev, space, *samples, seed)?;
            Outcome {
                choice,
                extra: json!({ "draws": draws }),
                rejected: Some(draws.rejected),
            }
        }
        Strategy::Listed(cells) => plain(listed_search(ev, cells)?),
        Strategy::Prune => {
            let (choice, rounds) = prune(ev)?;
            Outcome {
                extra: json!({ "prune_rounds": rounds }),
                ..plain(choice)
            }
        }
        Strategy::Evolution(cfg) => plain(evolution(ev, space, cfg, seed)?),
        Strategy::Reinforce(cfg) => {
            let (choice, trace) = reinforce(ev, space, cfg, seed)?;
            Outcome {
                extra: json!({ "policy": trace }),
                ..plain(choice)
            }
        }
    })
}

/// Every indicator of `values`, by name; `null` where it failed.
fn named_values(names: &[&str], values: Vec<Option<f64>>) -> serde_json::Map<String, Value> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| (n.to_string(), v.map_or(Value::Null, Value::from)))
        .collect()
}

/// `{indicator: why}` for each failed indicator of a candidate; null when none failed.
fn failures(names: &[&str], results: &[Result<f64, Failure>]) -> Value {
    let failed: serde_json::Map<String, Value> = names
        .iter()
        .zip(results)
        .filter_map(|(n, r)| {
            r.as_ref()
                .err()
                .map(|e| (n.to_string(), json!(e.to_string())))
        })
        .collect();
    if failed.is_empty() {
        Value::Null
    } else {
        Value::Object(failed)
    }
}

/// The trajectory of `search.json`: every candidate scored, in order.
fn nb201_trajectory(records: &[Record], names: &[&str]) -> Vec<Value> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let cell = r.sets.single();
            json!({
                "index": i,
                "phase": r.phase,
                "arch": cell.map(|a| a.arch_string()),
                "digits": cell.map(|a| a.digits()),
                "ops": r.sets.label(),
                "values": named_values(names, r.values()),
                "failed": failures(names, &r.results),
            })
        })
        .collect()
}

/// `search` over NB201 cells.
fn run_nb201(
    c: &SearchConfig,
    filter: FilterMode,
    proxy: &ProxyParams,
    ctx: &mut RunContext<'_>,
    out: &mut Outputs<'_>,
) -> Result<(), OpError> {
    let started = Instant::now();
    let t = Instant::now();
    let probes = probes::load(ctx, proxy)?;
    let scorer = ProxyScorer {
        indicators: c.indicators.clone(),
        net: NetConfig {
            in_channels: probes.batch.shape.1,
            channels: proxy.channels.get(),
            cells_per_stage: proxy.cells_per_stage.get(),
            stages: 3,
            classes: probes.classes,
            stem: true,
        },
        repeats: proxy.repeats.get(),
        probes,
        seed: derive_seed(ctx.seed, 13),
    };
    let space = nb201_space(filter)?;
    out.metric("seconds_prepare", t.elapsed().as_secs_f64());
    let _ = writeln!(
        ctx.log,
        "search {} on {} inputs, indicators {:?}, space of {} cells",
        title(c.algorithm),
        scorer.probes.source,
        c.indicators,
        space.size()
    );

    let pool = ctx.thread_pool()?;
    let cancel = ctx.cancel.clone();
    let cancelled = move || cancel.is_cancelled();
    let mut ev = Evaluator::new(&scorer, &pool, &cancelled);
    let t = Instant::now();
    let outcome = run_strategy(&mut ev, &space, &c.strategy, derive_seed(ctx.seed, 14))
        .map_err(search_error)?;
    out.metric("seconds_search", t.elapsed().as_secs_f64());

    let records = &ev.records;
    let choice = outcome.choice;
    let Some(arch) = records[choice].sets.single() else {
        return Err(OpError::Failed("the search ended on a supernet".into()));
    };
    let names: Vec<&str> = c.indicators.iter().map(|i| i.name()).collect();
    let num_failed = records.iter().filter(|r| r.failure().is_some()).count();
    let total = started.elapsed().as_secs_f64();
    let shape = scorer.probes.batch.shape;
    let mut doc = json!({
        "space": "nb201",
        "algorithm": c.algorithm,
        "indicators": names,
        "filter": {
            "mode": filter,
            "accepted": space.size(),
            "box": match &space { Space::Accepted { acceptance, .. } => json!(acceptance), Space::All => Value::Null },
        },
        "data": {
            "source": scorer.probes.source,
            "image_shape": [shape.1, shape.2, shape.3],
            "classes": scorer.probes.classes,
            "batch": proxy.batch,
            "region_samples": proxy.region_samples,
        },
        "proxy": proxy,
        "choice": {
            "index": choice,
            "arch": arch.arch_string(),
            "digits": arch.digits(),
        },
        "num_scored": records.len(),
        "num_failed": num_failed,
        "trajectory": nb201_trajectory(records, &names),
    });
    if let (Some(o), Value::Object(e)) = (doc.as_object_mut(), outcome.extra) {
        o.extend(e);
    }
    out.write_json(SEARCH_FILE, &doc)?;
    let _ = writeln!(
        ctx.log,
        "chose {} ({}) after scoring {} ({} failed) in {total:.1}s",
        arch.arch_string(),
        arch.digits(),
        records.len(),
        num_failed
    );
    out.metric("num_scored", records.len() as f64);
    out.metric("num_failed", num_failed as f64);
    out.metric("seconds_total", total);
    out.metric("choice_index", choice as f64);
    out.metric(
        "filter_fraction_kept",
        space.size() as f64 / Space::All.size() as f64,
    );
    if let Some(rejected) = outcome.rejected {
        out.metric("num_rejected", rejected as f64);
    }
    Ok(())
}

/// The ViT search's choice and, for `reinforce`, the policy it learned.
fn run_vit_strategy(
    ev: &mut VitEvaluator<'_>,
    c: &SearchConfig,
    seed: u64,
) -> Result<(usize, Value), OpError> {
    match &c.strategy {
        Strategy::Random { samples } => Ok((random_vit_search(ev, *samples, seed)?, json!({}))),
        Strategy::Reinforce(cfg) => {
            let (best, probs, rewards) = reinforce_vit_search(ev, cfg, seed)?;
            let named: serde_json::Map<String, Value> = CHOICES
                .iter()
                .zip(probs)
                .map(|((n, _), p)| (n.to_string(), json!(p)))
                .collect();
            Ok((
                best,
                json!({"policy": {"probabilities": named, "rewards": rewards}}),
            ))
        }
        _ => Err(OpError::Failed(format!(
            "{} is not implemented for the vit space",
            title(c.algorithm)
        ))),
    }
}

/// `search` with `space: vit`: the As-ViT seed search.
fn run_vit(
    c: &SearchConfig,
    vit: &VitProxy,
    ctx: &mut RunContext<'_>,
    out: &mut Outputs<'_>,
) -> Result<(), OpError> {
    let started = Instant::now();
    let mut phases = serde_json::Map::new();
    let t = Instant::now();
    let probes = vit_probes(ctx, vit)?;
    let scorer = VitScorer {
        indicators: c.indicators.clone(),
        points: vit.points,
        repeats: vit.repeats.get(),
        images: probes.batch.clone(),
        seed: derive_seed(ctx.seed, 13),
    };
    phases.insert("prepare".into(), json!(t.elapsed().as_secs_f64()));
    let _ = writeln!(
        ctx.log,
        "vit search {} on {} images {:?}, indicators {:?}, space of {} topologies",
        title(c.algorithm),
        probes.source,
        probes.batch.shape,
        c.indicators,
        VitTopology::space_size()
    );
    let pool = ctx.thread_pool()?;
    let cancel = ctx.cancel.clone();
    let cancelled = move || cancel.is_cancelled();
    let mut ev = VitEvaluator::new(&scorer, vit.hidden.get(), probes.classes, &pool, &cancelled);
    let t = Instant::now();
    let (choice, extra) = run_vit_strategy(&mut ev, c, derive_seed(ctx.seed, 14))?;
    phases.insert("search".into(), json!(t.elapsed().as_secs_f64()));
    let names: Vec<&str> = c.indicators.iter().map(|i| i.name()).collect();
    let num_failed = ev.records.iter().filter(|r| r.failure().is_some()).count();
    let total = started.elapsed().as_secs_f64();
    phases.insert("total".into(), json!(total));
    let chosen = ev.records[choice].topology;
    let mut doc = json!({
        "space": "vit",
        "algorithm": c.algorithm,
        "indicators": names,
        "data": {"source": probes.source, "image_shape": [probes.batch.shape.1, probes.batch.shape.2, probes.batch.shape.3], "classes": probes.classes},
        "proxy": vit,
        "scoring_init": super::vit_space::SCORING_INIT,
        "choice": {
            "index": choice,
            "label": chosen.label(),
            "topology": chosen,
            "model": nn::ModelSpec::Vit(ev.spec(&chosen)),
        },
        "num_scored": ev.records.len(),
        "num_failed": num_failed,
        "seconds": phases,
        "trajectory": vit_trajectory(&ev, &names),
    });
    if let (Some(o), Value::Object(e)) = (doc.as_object_mut(), extra) {
        o.extend(e);
    }
    out.write_json(SEARCH_FILE, &doc)?;
    write_models(
        out,
        ev.records
            .iter()
            .map(|r| (r.topology.label(), ev.spec(&r.topology))),
    )?;
    let _ = writeln!(
        ctx.log,
        "chose {} after scoring {} ({} failed) in {total:.1}s",
        chosen.label(),
        ev.records.len(),
        num_failed
    );
    out.metric("num_scored", ev.records.len() as f64);
    out.metric("num_failed", num_failed as f64);
    out.metric("seconds_total", total);
    out.metric("choice_index", choice as f64);
    for (n, x) in names.iter().zip(ev.records[choice].values()) {
        if let Some(x) = x {
            out.metric(format!("choice_{n}"), x);
        }
    }
    Ok(())
}

/// The trajectory of a ViT `search.json`: every topology scored, in order.
fn vit_trajectory(ev: &VitEvaluator<'_>, names: &[&str]) -> Vec<Value> {
    ev.records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "index": i,
                "phase": r.phase,
                "label": r.topology.label(),
                "topology": r.topology,
                "values": named_values(names, r.values()),
                "failed": failures(names, &r.results),
            })
        })
        .collect()
}
