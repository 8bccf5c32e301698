//! The `scale` op: As-ViT's training-free growth of a seed topology into a family of models
//! (`docs/methods/asvit.md` §3).
//!
//! Each step: candidates = (one more block in one of the 4 stages) x (hidden <- round(h (1 + r))
//! for r in `ratios`); candidates above the parameter `budget` are dropped; the rest are scored
//! on a reduced-width proxy (hidden / `proxy_divisor`) with L_E and kappa and the best rank sum
//! (kappa ascending, L_E descending) becomes the next member. Stops when a member reaches the
//! parameter `target`, when no candidate fits the budget, or after `max_steps`.
//!
//! Inputs: `seed`, a `search` result with `space: vit` (its choice), unless `topology:` is given
//! inline; optional `data` for the NTK images (else Gaussian). Outputs `family.json` (every
//! member: depths, hidden, params, MACs, scores, plus every candidate scored) and `models.json`
//! (`[{label, model}]`, one per member in order) for `train`'s `model_from`.

use std::time::Instant;

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::indicators::{Failure, Indicator};
use super::probes::vit_probes;
use super::rank::{best_by_rank_sum, rank_sums};
use super::search_params::{check_vit_indicators, VitProxy};
use super::vit_space::{write_models, VitScorer, VitTopology};
use crate::seed::derive_seed;
use crate::{read_json, Count, OpError, Outputs, ParamError, RunContext, TypedOp};
use nn::models::VitSpec;

pub const FAMILY_FILE: &str = "family.json";
pub const SEED_INPUT: &str = "seed";

/// The params of `scale` (the paper's values in brackets). `budget` and `target` have no
/// default, so the defaults of the others are given field by field (a container default would
/// make every field optional).
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleParams {
    /// The seed topology; without it, the choice of the `search` behind input `seed`.
    #[serde(default)]
    pub topology: Option<VitTopology>,
    /// Starting width of stage 1.
    #[serde(default = "ScaleParams::hidden")]
    pub hidden: Count,
    /// Starting blocks per stage [1, 1, 1, 1].
    #[serde(default = "ScaleParams::depths")]
    pub depths: [Count; 4],
    /// Width growth ratios r, each >= 0 [0.05, 0.10, 0.15, 0.20].
    #[serde(default = "ScaleParams::ratios")]
    pub ratios: Vec<f64>,
    /// No candidate above this many parameters is scored [110M].
    pub budget: Count,
    /// Stop once a member has at least this many parameters, at most `budget` [80M].
    pub target: Count,
    /// The proxy network scored has width hidden / proxy_divisor [4].
    #[serde(default = "ScaleParams::proxy_divisor")]
    pub proxy_divisor: Count,
    /// Growth steps at most.
    #[serde(default = "ScaleParams::max_steps")]
    pub max_steps: Count,
    /// The scores whose rank sum picks each step's winner (ViT indicators only).
    #[serde(default = "ScaleParams::indicators")]
    pub indicators: Vec<Indicator>,
    /// Probe settings (`hidden` is not used: the proxy width follows each candidate).
    #[serde(default)]
    pub probe: VitProxy,
}

/// The defaults serde fills in.
impl ScaleParams {
    fn hidden() -> Count {
        Count(32)
    }
    fn depths() -> [Count; 4] {
        [Count(1); 4]
    }
    fn ratios() -> Vec<f64> {
        vec![0.05, 0.10, 0.15, 0.20]
    }
    fn proxy_divisor() -> Count {
        Count(4)
    }
    fn max_steps() -> Count {
        Count(64)
    }
    fn indicators() -> Vec<Indicator> {
        vec![Indicator::LengthDistortion, Indicator::Ntk]
    }
}

impl ScaleParams {
    fn check(&self) -> Result<(), ParamError> {
        if self.indicators.is_empty() {
            return Err(ParamError::new(
                "indicators",
                "must name at least one indicator",
            ));
        }
        check_vit_indicators(&self.indicators, "indicators")?;
        self.probe.check("probe")?;
        if let Some(t) = &self.topology {
            if t.indices().is_none() {
                return Err(ParamError::new(
                    "topology",
                    format!("{} is outside the As-ViT space", t.label()),
                ));
            }
        }
        if self.ratios.is_empty() || self.ratios.iter().any(|r| !(r.is_finite() && *r >= 0.0)) {
            return Err(ParamError::new(
                "ratios",
                "give one or more growth ratios >= 0 (e.g. [0.05, 0.1])",
            ));
        }
        if self.target > self.budget {
            return Err(ParamError::new(
                "target",
                format!(
                    "{} exceeds the budget {}: no member could reach it",
                    self.target, self.budget
                ),
            ));
        }
        Ok(())
    }
}

/// What the growth loop needs besides the scorer.
#[derive(Clone, Debug)]
pub struct GrowthConfig {
    pub topology: VitTopology,
    pub hidden: usize,
    pub depths: [usize; 4],
    pub ratios: Vec<f64>,
    pub budget: usize,
    pub target: usize,
    pub proxy_divisor: usize,
    pub max_steps: usize,
    pub in_channels: usize,
    pub image_size: usize,
    pub classes: usize,
}

/// One scored candidate of one step.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub step: usize,
    pub stage: usize,
    pub ratio: f64,
    pub depths: [usize; 4],
    pub hidden: usize,
    pub params: usize,
    pub proxy_hidden: usize,
    pub scores: Option<Vec<f64>>,
    pub failed: Option<String>,
    pub rank_sum: Option<f64>,
}

/// One model of the family.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    pub step: usize,
    pub depths: [usize; 4],
    pub hidden: usize,
    pub params: usize,
    /// Multiply-accumulates per image (what ViT papers call FLOPs).
    pub macs: u64,
    /// The winning candidate's proxy scores (none for the seed).
    pub scores: Option<Vec<f64>>,
    /// What grew: `seed` or `stage 2 +1 block, hidden x1.10`.
    pub grew: String,
    pub spec: VitSpec,
}

#[derive(Clone, Debug, Serialize)]
pub struct Growth {
    pub members: Vec<Member>,
    pub candidates: Vec<Candidate>,
    /// `target`, `budget` (no candidate fits) or `max_steps`.
    pub stop: String,
}

/// Heads of stage 1 divide every width multiple of this (stage i has 2^i times both).
fn width_quantum(t: &VitTopology) -> usize {
    (t.heads >> 3).max(1)
}

fn round_up_to(v: usize, q: usize) -> usize {
    v.div_ceil(q).max(1) * q
}

/// One growth step's candidates from `cur`, as (stage, ratio, depths, hidden): one more block
/// in a stage times each width ratio, without duplicates, within the budget.
fn next_candidates(cfg: &GrowthConfig, cur: &Member) -> Vec<(usize, f64, [usize; 4], usize)> {
    let q = width_quantum(&cfg.topology);
    let mut todo: Vec<(usize, f64, [usize; 4], usize)> = Vec::new();
    for stage in 0..4 {
        for &r in &cfg.ratios {
            let mut d = cur.depths;
            d[stage] += 1;
            let h = round_up_to((cur.hidden as f64 * (1.0 + r)).round() as usize, q);
            let fits = cfg
                .topology
                .spec(h, d, cfg.classes)
                .param_count(cfg.in_channels)
                <= cfg.budget;
            if fits && !todo.iter().any(|c| c.2 == d && c.3 == h) {
                todo.push((stage, r, d, h));
            }
        }
    }
    todo
}

/// `docs/methods/asvit.md` §3, the growth loop. `score` maps a proxy spec to indicator values (in
/// `indicators` order); candidates are scored in parallel on `pool`.
pub fn grow(
    cfg: &GrowthConfig,
    indicators: &[Indicator],
    score: &(dyn Fn(&VitSpec) -> Result<Vec<f64>, Failure> + Sync),
    pool: &rayon::ThreadPool,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<Growth, OpError> {
    let t = cfg.topology;
    let q = width_quantum(&t);
    let spec = |h: usize, d: [usize; 4]| t.spec(h, d, cfg.classes);
    let member =
        |step: usize, h: usize, d: [usize; 4], scores, grew: String| -> Result<Member, OpError> {
            let s = spec(h, d);
            s.validate()
                .map_err(|e| OpError::Failed(format!("step {step}: {e}")))?;
            let macs = s
                .macs(cfg.in_channels, cfg.image_size, 1)
                .map_err(|e| OpError::Failed(format!("step {step}: {e}")))?;
            Ok(Member {
                step,
                depths: d,
                hidden: h,
                params: s.param_count(cfg.in_channels),
                macs,
                scores,
                grew,
                spec: s,
            })
        };
    let hidden = round_up_to(cfg.hidden, q);
    let seed = member(0, hidden, cfg.depths, None, "seed".into())?;
    if seed.params > cfg.budget {
        return Err(OpError::Failed(format!(
            "the seed ({} at hidden {hidden}, depths {:?}) has {} parameters, above the budget {}",
            t.label(),
            cfg.depths,
            seed.params,
            cfg.budget
        )));
    }
    let mut members = vec![seed];
    let mut candidates = Vec::new();
    let mut stop = "max_steps".to_string();
    for step in 1..=cfg.max_steps {
        let cur = &members[members.len() - 1];
        if cur.params >= cfg.target {
            stop = "target".into();
            break;
        }
        if cancelled() {
            return Err(OpError::Cancelled);
        }
        let todo = next_candidates(cfg, cur);
        if todo.is_empty() {
            stop = "budget".into();
            break;
        }
        let proxies: Vec<(usize, VitSpec)> = todo
            .iter()
            .map(|&(_, _, d, h)| {
                let ph = round_up_to(h / cfg.proxy_divisor, q);
                (ph, spec(ph, d))
            })
            .collect();
        let results: Vec<Result<Vec<f64>, Failure>> =
            pool.install(|| proxies.par_iter().map(|(_, s)| score(s)).collect());
        let table: Vec<Vec<Option<f64>>> = results
            .iter()
            .map(|r| match r {
                Ok(v) => v.iter().copied().map(Some).collect(),
                Err(_) => vec![None; indicators.len()],
            })
            .collect();
        let sums = rank_sums(&table, indicators);
        let Some(best) = best_by_rank_sum(&table, indicators) else {
            return Err(OpError::Failed(format!(
                "step {step}: every candidate failed its indicators; the first failure: {}",
                results
                    .iter()
                    .find_map(|r| r.as_ref().err())
                    .map_or_else(String::new, ToString::to_string)
            )));
        };
        for (i, (&(stage, ratio, d, h), r)) in todo.iter().zip(&results).enumerate() {
            candidates.push(Candidate {
                step,
                stage: stage + 1,
                ratio,
                depths: d,
                hidden: h,
                params: spec(h, d).param_count(cfg.in_channels),
                proxy_hidden: proxies[i].0,
                scores: r.as_ref().ok().cloned(),
                failed: r.as_ref().err().map(ToString::to_string),
                rank_sum: r.is_ok().then_some(sums[i]),
            });
        }
        let (stage, ratio, d, h) = todo[best];
        let grew = format!("stage {} +1 block, hidden x{:.2}", stage + 1, 1.0 + ratio);
        let scores = results[best].as_ref().ok().cloned();
        members.push(member(step, h, d, scores, grew)?);
    }
    if members[members.len() - 1].params >= cfg.target {
        stop = "target".into();
    }
    Ok(Growth {
        members,
        candidates,
        stop,
    })
}

pub struct ScaleOp;

impl TypedOp for ScaleOp {
    const NAME: &'static str = "scale";
    // Version 2: members scored at the reference ViT init.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "As-ViT training-free scaling: grows a seed ViT topology block by block under a parameter \
         budget into a family (family.json, models.json for train's model_from)";
    type Params = ScaleParams;
    type Config = ScaleParams;

    fn resolve(p: ScaleParams) -> Result<ScaleParams, ParamError> {
        p.check()?;
        Ok(p)
    }

    fn required_inputs(c: &ScaleParams) -> Vec<String> {
        match c.topology {
            None => vec![SEED_INPUT.to_string()],
            Some(_) => Vec::new(),
        }
    }

    fn run(
        &self,
        p: &ScaleParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let started = Instant::now();
        let topology = match p.topology {
            Some(t) => t,
            None => read_seed(ctx)?,
        };
        let probes = vit_probes(ctx, &p.probe)?;
        let (_, in_channels, side, _) = probes.batch.shape;
        let scorer = VitScorer {
            indicators: p.indicators.clone(),
            points: p.probe.points,
            repeats: p.probe.repeats.get(),
            images: probes.batch.clone(),
            seed: derive_seed(ctx.seed, 13),
        };
        let cfg = GrowthConfig {
            topology,
            hidden: p.hidden.get(),
            depths: p.depths.map(Count::get),
            ratios: p.ratios.clone(),
            budget: p.budget.get(),
            target: p.target.get(),
            proxy_divisor: p.proxy_divisor.get(),
            max_steps: p.max_steps.get(),
            in_channels,
            image_size: side,
            classes: probes.classes,
        };
        let _ = writeln!(
            ctx.log,
            "scale {} from hidden {} depths {:?}: budget {} params, target {}, {} px",
            topology.label(),
            cfg.hidden,
            cfg.depths,
            cfg.budget,
            cfg.target,
            side
        );
        let pool = ctx.thread_pool()?;
        let cancel = ctx.cancel.clone();
        let cancelled = move || cancel.is_cancelled();
        let score = |s: &VitSpec| scorer.score(s).into_iter().collect::<Result<Vec<f64>, _>>();
        let growth = grow(&cfg, &p.indicators, &score, &pool, &cancelled)?;
        let total = started.elapsed().as_secs_f64();
        for m in &growth.members {
            let _ = writeln!(
                ctx.log,
                "member {}: depths {:?} hidden {} params {} MACs {} ({})",
                m.step, m.depths, m.hidden, m.params, m.macs, m.grew
            );
        }
        let names: Vec<&str> = p.indicators.iter().map(|i| i.name()).collect();
        let family = json!({
            "seed": {"topology": topology, "label": topology.label()},
            "indicators": names,
            "image": {"channels": in_channels, "size": side, "classes": probes.classes, "source": probes.source},
            "budget": cfg.budget,
            "target": cfg.target,
            "stop": growth.stop,
            "members": growth.members,
            "candidates": growth.candidates,
            "seconds_total": total,
        });
        out.write_json(FAMILY_FILE, &family)?;
        write_models(
            out,
            growth.members.iter().map(|m| {
                let label = format!(
                    "member {}: depths {:?} hidden {}",
                    m.step, m.depths, m.hidden
                );
                (label, m.spec.clone())
            }),
        )?;
        let last = &growth.members[growth.members.len() - 1];
        out.metric("members", growth.members.len() as f64);
        out.metric("candidates_scored", growth.candidates.len() as f64);
        out.metric("final_params", last.params as f64);
        out.metric("final_hidden", last.hidden as f64);
        let reached = if growth.stop == "target" { 1.0 } else { 0.0 };
        out.metric("reached_target", reached);
        out.metric("seconds_total", total);
        Ok(())
    }
}

/// The seed topology: the `choice` of the `search` (space: vit) behind input `seed`.
fn read_seed(ctx: &RunContext<'_>) -> Result<VitTopology, OpError> {
    let path = ctx.one_input(SEED_INPUT)?.join(super::SEARCH_FILE);
    let v = read_json(&path)?.ok_or_else(|| {
        OpError::Failed(format!(
            "input `seed` has no {} ({}); point it at a `search` stage with `space: vit`, or \
             give `topology:`",
            super::SEARCH_FILE,
            path.display()
        ))
    })?;
    if v["space"] != "vit" {
        return Err(OpError::Failed(format!(
            "{}: a search over space {} has no ViT topology; the seed search needs `space: vit`",
            path.display(),
            v["space"]
        )));
    }
    serde_json::from_value(v["choice"]["topology"].clone())
        .map_err(|e| OpError::Failed(format!("{}: choice.topology: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> VitTopology {
        VitTopology {
            kernels: [8, 4, 4, 4],
            splits: [2, 1, 1, 1],
            expansions: [3, 2, 4, 6],
            heads: 32,
        }
    }

    fn cfg(budget: usize, target: usize) -> GrowthConfig {
        GrowthConfig {
            topology: seed(),
            hidden: 32,
            depths: [1; 4],
            ratios: vec![0.05, 0.1, 0.15, 0.2],
            budget,
            target,
            proxy_divisor: 4,
            max_steps: 100,
            in_channels: 3,
            image_size: 32,
            classes: 10,
        }
    }

    /// A synthetic score: L_E prefers depth in stage 3, kappa prefers narrow proxies.
    fn synthetic(s: &VitSpec) -> Result<Vec<f64>, Failure> {
        let d = s.depths();
        Ok(vec![d[2] as f64 * 10.0 - d[0] as f64, s.hidden as f64])
    }

    fn run(c: &GrowthConfig) -> Growth {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        grow(
            c,
            &[Indicator::LengthDistortion, Indicator::Ntk],
            &synthetic,
            &pool,
            &|| false,
        )
        .unwrap()
    }

    #[test]
    fn the_growth_loop_respects_its_budget_and_stops_at_the_target() {
        let seed_params = seed().spec(32, [1; 4], 10).param_count(3);
        // A target beyond the budget's reach: the loop stops when nothing fits.
        let budget = seed_params * 3;
        let g = run(&cfg(budget, budget));
        assert_eq!(g.stop, "budget");
        assert!(g.members.len() > 2, "{:?}", g.members.len());
        assert!(g.members.iter().all(|m| m.params <= budget));
        assert!(g.candidates.iter().all(|c| c.params <= budget));
        // Each step adds exactly one block and does not narrow the model.
        for w in g.members.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            assert_eq!(
                b.depths.iter().sum::<usize>(),
                a.depths.iter().sum::<usize>() + 1
            );
            assert!(b.hidden > a.hidden && b.params > a.params);
            assert_eq!(b.hidden % 4, 0, "stage-1 heads (32 / 8) divide the width");
        }
        // The synthetic L_E is best with depth in stage 3 and kappa with the narrowest proxy.
        assert_eq!(g.members[1].depths, [1, 1, 2, 1]);
        // A reachable target: stop at the first member that reaches it.
        let target = seed_params * 2;
        let g = run(&cfg(budget, target));
        assert_eq!(g.stop, "target");
        let n = g.members.len();
        assert!(g.members[n - 1].params >= target);
        assert!(g.members[..n - 1].iter().all(|m| m.params < target));
        // A seed above the budget is an error, not an empty family.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let e = grow(
            &cfg(seed_params - 1, seed_params - 1),
            &[Indicator::Ntk],
            &synthetic,
            &pool,
            &|| false,
        );
        assert!(matches!(e, Err(OpError::Failed(m)) if m.contains("above the budget")));
    }

    #[test]
    fn params_are_checked() {
        let plan = |params: serde_json::Value| crate::Op::plan(&ScaleOp, &params);
        let e = plan(json!({"budget": 10, "target": 20})).unwrap_err();
        assert_eq!(e.path, "target");
        let e = plan(json!({"budget": 10, "target": 5, "indicators": ["regions"]})).unwrap_err();
        assert_eq!(e.path, "indicators");
        let e = plan(json!({"budget": 10, "target": 5, "ratios": []})).unwrap_err();
        assert_eq!(e.path, "ratios");
        let bad = json!({"kernels": [9, 4, 4, 4], "splits": [2, 1, 1, 1], "expansions": [3, 2, 4, 6], "heads": 32});
        let e = plan(json!({"budget": 10, "target": 5, "topology": bad})).unwrap_err();
        assert_eq!(e.path, "topology");
        let e = plan(json!({"budget": 10, "target": 5, "depths": [1, 0, 1, 1]})).unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("depths[1]", "must be at least 1")
        );
        let e = plan(json!({"budget": 10, "target": 5, "probe": {"hidden": 12}})).unwrap_err();
        assert_eq!(e.path, "probe.hidden");
        assert_eq!(
            plan(json!({"budget": 10, "target": 5}))
                .unwrap()
                .required_inputs,
            [SEED_INPUT]
        );
        let seed = json!({"kernels": [8, 4, 4, 4], "splits": [2, 1, 1, 1], "expansions": [3, 2, 4, 6], "heads": 32});
        let given = plan(json!({"budget": 10, "target": 5, "topology": seed})).unwrap();
        assert!(given.required_inputs.is_empty());
    }
}
