//! `search` params: the pipeline's shape ([`SearchParams`]) and the checked configuration the op
//! runs ([`SearchConfig`]: the chosen algorithm with only its own settings, [`Strategy`]).
//! The probe settings of both spaces live here too, so that the ViT space, `scale` and
//! `search` share them without importing one another.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::indicators::Indicator;
use super::search::{EvolutionConfig, ReinforceConfig};
use super::space::Arch;
use crate::{Count, ParamError};

/// The search space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SpaceName {
    /// NAS-Bench-201 cells (settings under `proxy:`).
    #[default]
    Nb201,
    /// The As-ViT space (`vit_space.rs`; settings under `vit:`).
    Vit,
}

/// The connectivity pre-filter (arXiv 2205.05662).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

/// Sizes of the proxy networks and probes (CPU-sized defaults; the paper's values in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyParams {
    /// C of the NTK / G / NASWOT network [3].
    pub channels: Count,
    /// N of that network [1].
    pub cells_per_stage: Count,
    /// Batch for kappa, G (train and held-out) and NASWOT, at least 2 [64].
    pub batch: usize,
    /// Independent initializations averaged [3].
    pub repeats: Count,
    /// 3x3 crops for the linear regions, at least 2 [3000].
    pub region_samples: usize,
    /// Side of the Gaussian images when there is no `data` input (divisible by 4).
    pub image_size: usize,
    /// Classes of the Gaussian fallback (a dataset brings its own).
    pub classes: Count,
}

impl Default for ProxyParams {
    fn default() -> Self {
        Self {
            channels: Count(3),
            cells_per_stage: Count(1),
            batch: 16,
            repeats: Count(3),
            region_samples: 1000,
            image_size: 16,
            classes: Count(10),
        }
    }
}

impl ProxyParams {
    fn check(&self) -> Result<(), ParamError> {
        if self.batch < 2 {
            return Err(ParamError::new(
                "proxy.batch",
                "must be at least 2 (a kernel needs two samples)",
            ));
        }
        if self.region_samples < 2 {
            return Err(ParamError::new(
                "proxy.region_samples",
                "must be at least 2",
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(4) {
            return Err(ParamError::new(
                "proxy.image_size",
                format!(
                    "{} must be a positive multiple of 4 (two stride-2 reductions)",
                    self.image_size
                ),
            ));
        }
        Ok(())
    }
}

/// How the ViT indicators are measured (CPU-sized defaults; the paper's values in brackets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct VitProxy {
    /// Width of stage 1 of the scored network, a multiple of 8 (the most stage-1 heads of the
    /// space, 64 / 8) [32].
    pub hidden: Count,
    /// Side of the Gaussian images when there is no `data` input, at least 4 [32].
    pub image_size: usize,
    /// Points on the circle for L_E, at least 3 [the reference: 10 analytic-derivative points].
    pub points: usize,
    /// Batch of the NTK, at least 2 [16].
    pub batch: usize,
    /// Initializations (and circles) averaged [5].
    pub repeats: Count,
    /// Classes of the scored network's head when there is no `data` input (the head is not
    /// part of either score).
    pub classes: Count,
}

impl Default for VitProxy {
    fn default() -> Self {
        Self {
            hidden: Count(32),
            image_size: 32,
            points: 32,
            batch: 8,
            repeats: Count(2),
            classes: Count(10),
        }
    }
}

impl VitProxy {
    /// Checks the settings found under `prefix` (`vit`, `probe`).
    pub fn check(&self, prefix: &str) -> Result<(), ParamError> {
        for (f, v, min) in [
            ("image_size", self.image_size, 4),
            ("points", self.points, 3),
            ("batch", self.batch, 2),
        ] {
            if v < min {
                return Err(ParamError::new(
                    format!("{prefix}.{f}"),
                    format!("{v} is below the minimum {min}"),
                ));
            }
        }
        if !self.hidden.get().is_multiple_of(8) {
            return Err(ParamError::new(
                format!("{prefix}.hidden"),
                format!(
                    "{} is not a multiple of 8: a topology with 64 heads has 8 heads in stage 1",
                    self.hidden
                ),
            ));
        }
        Ok(())
    }

    /// The NB201 probe settings that load the same images (two batches; no crops are used).
    pub fn probe_params(&self) -> ProxyParams {
        ProxyParams {
            batch: self.batch,
            region_samples: 2,
            image_size: self.image_size,
            classes: self.classes,
            ..ProxyParams::default()
        }
    }
}

/// Checks an indicator list for the ViT space.
pub fn check_vit_indicators(indicators: &[Indicator], field: &str) -> Result<(), ParamError> {
    for ind in indicators {
        if !matches!(ind, Indicator::LengthDistortion | Indicator::Ntk) {
            return Err(
                ParamError::new(field, format!("{} is not measured on ViTs", ind.name()))
                    .with_fix("use `indicators: [length_distortion, ntk]`"),
            );
        }
    }
    Ok(())
}

/// How the space is searched (TE-NAS, arXiv 2102.11535; TEG-NAS, arXiv 2108.11939).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// `samples` distinct candidates drawn uniformly, scored, the rank-sum best taken.
    Random,
    /// Score the cells listed in `cells` (a fixed sample, e.g. the cells a pipeline trains).
    Listed,
    /// Prune the NB201 supernet one op per edge and round.
    Prune,
    /// Regularized evolution with tournament selection (`population`, `tournament`, `cycles`,
    /// `batch`).
    Evolution,
    /// REINFORCE over per-choice logits with the changing-range reward (`steps`, `lr`,
    /// `momentum`, `window`, `batch`).
    Reinforce,
}

impl Algorithm {
    /// The name `algorithm:` gives it, as `search.json` records it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Listed => "listed",
            Algorithm::Prune => "prune",
            Algorithm::Evolution => "evolution",
            Algorithm::Reinforce => "reinforce",
        }
    }
}

/// The params of `search` (the paper's values in brackets). Each algorithm reads its own
/// settings; the others' may be given too (a matrix over `algorithm` gives every point all of
/// them) and are checked but unused, except `cells`, which only `listed` takes. `algorithm` has
/// no default, so the others' defaults are given field by field (a container default would make
/// every field optional).
#[derive(Clone, Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// The space searched.
    #[serde(default)]
    pub space: SpaceName,
    /// The search algorithm.
    pub algorithm: Algorithm,
    /// Indicators combined by rank-sum [TE-NAS: ntk, regions; TEG-NAS adds generalization;
    /// the ViT space: length_distortion, ntk].
    #[serde(default = "SearchParams::indicators")]
    pub indicators: Vec<Indicator>,
    /// The connectivity pre-filter (`space: nb201`; random, evolution, reinforce).
    #[serde(default)]
    pub filter: FilterMode,
    /// `space: nb201`: the proxy networks and probes.
    #[serde(default)]
    pub proxy: ProxyParams,
    /// random: distinct candidates drawn from the whole space; with a filter, the rejected ones
    /// are not scored.
    #[serde(default = "SearchParams::samples")]
    pub samples: Count,
    /// listed: the cells to score (arch strings or digits, `"3_33_133"`).
    #[serde(default)]
    pub cells: Vec<String>,
    /// evolution: cells kept alive [256].
    #[serde(default = "SearchParams::population")]
    pub population: Count,
    /// evolution: members sampled per tournament, at most `population` [64].
    #[serde(default = "SearchParams::tournament")]
    pub tournament: Count,
    /// evolution: rounds of mutation after the initial population [1000].
    #[serde(default = "SearchParams::cycles")]
    pub cycles: usize,
    /// evolution and reinforce: candidates made and scored in parallel per cycle / step [1].
    #[serde(default = "SearchParams::batch")]
    pub batch: Count,
    /// reinforce: policy updates [500].
    #[serde(default = "SearchParams::steps")]
    pub steps: usize,
    /// reinforce: learning rate of the policy [0.04].
    #[serde(default = "SearchParams::lr")]
    pub lr: f64,
    /// reinforce: momentum of the reward baseline, in [0, 1) [0.9].
    #[serde(default = "SearchParams::momentum")]
    pub momentum: f64,
    /// reinforce: indicator values the changing-range reward remembers (its max - min scale)
    /// [10].
    #[serde(default = "SearchParams::window")]
    pub window: Count,
    /// `space: vit`: the scored network and probes.
    #[serde(default)]
    pub vit: VitProxy,
}

/// The defaults serde fills in.
impl SearchParams {
    fn indicators() -> Vec<Indicator> {
        vec![Indicator::Ntk, Indicator::Regions]
    }
    fn samples() -> Count {
        Count(32)
    }
    fn population() -> Count {
        Count(16)
    }
    fn tournament() -> Count {
        Count(4)
    }
    fn cycles() -> usize {
        32
    }
    fn batch() -> Count {
        Count(2)
    }
    fn steps() -> usize {
        16
    }
    fn lr() -> f64 {
        0.04
    }
    fn momentum() -> f64 {
        0.9
    }
    fn window() -> Count {
        Count(10)
    }
}

/// The algorithm with its settings checked and its cells parsed.
#[derive(Clone, Debug)]
pub enum Strategy {
    Random { samples: usize },
    Listed(Vec<Arch>),
    Prune,
    Evolution(EvolutionConfig),
    Reinforce(ReinforceConfig),
}

/// The space searched, with its settings.
#[derive(Clone, Debug)]
pub enum SpaceConfig {
    Nb201 {
        filter: FilterMode,
        proxy: ProxyParams,
    },
    Vit(VitProxy),
}

/// Checked `search` params: what the op runs.
#[derive(Clone, Debug)]
pub struct SearchConfig {
    /// `algorithm:` as given (`random`, ...).
    pub algorithm: &'static str,
    pub indicators: Vec<Indicator>,
    pub strategy: Strategy,
    pub space: SpaceConfig,
}

impl SearchConfig {
    pub fn resolve(p: SearchParams) -> Result<Self, ParamError> {
        check_indicator_list(&p.indicators)?;
        if p.space == SpaceName::Vit {
            check_vit_space(&p)?;
        } else if p.indicators.contains(&Indicator::LengthDistortion) {
            return Err(ParamError::new(
                "indicators",
                "length_distortion is measured on ViTs; use it with `space: vit`",
            ));
        }
        p.proxy.check()?;
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
        let strategy = strategy(&p)?;
        let space = match p.space {
            SpaceName::Vit => SpaceConfig::Vit(p.vit),
            SpaceName::Nb201 => SpaceConfig::Nb201 {
                filter: p.filter,
                proxy: p.proxy,
            },
        };
        Ok(Self {
            algorithm: p.algorithm.name(),
            indicators: p.indicators,
            strategy,
            space,
        })
    }
}

/// What the ViT space does not support.
fn check_vit_space(p: &SearchParams) -> Result<(), ParamError> {
    check_vit_indicators(&p.indicators, "indicators")?;
    p.vit.check("vit")?;
    if !matches!(p.algorithm, Algorithm::Random | Algorithm::Reinforce) {
        return Err(ParamError::new(
            "algorithm",
            format!(
                "{} is not implemented for the vit space",
                title(p.algorithm.name())
            ),
        )
        .with_fix("use `algorithm: random` or `algorithm: reinforce`"));
    }
    if p.filter != FilterMode::None {
        return Err(ParamError::new(
            "filter",
            "the connectivity filter judges NB201 cells, not ViTs",
        ));
    }
    Ok(())
}

/// An algorithm's name as logs and messages print it (`Evolution`).
pub fn title(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
}

/// At least one indicator, none twice.
fn check_indicator_list(indicators: &[Indicator]) -> Result<(), ParamError> {
    if indicators.is_empty() {
        return Err(
            ParamError::new("indicators", "must name at least one indicator")
                .with_fix("e.g. `indicators: [ntk, regions]`"),
        );
    }
    for (i, a) in indicators.iter().enumerate() {
        if indicators[..i].contains(a) {
            return Err(ParamError::new(
                "indicators",
                format!("{} is listed twice", a.name()),
            ));
        }
    }
    Ok(())
}

/// The chosen algorithm with its settings; `listed`'s cells parsed, and the algorithms that
/// cannot take the `filter` refusing it.
fn strategy(p: &SearchParams) -> Result<Strategy, ParamError> {
    let refuse_filter = |message: &str| {
        if p.filter == FilterMode::None {
            Ok(())
        } else {
            Err(ParamError::new("filter", message).with_fix(format!(
                "use `filter: none` with `algorithm: {}`",
                p.algorithm.name()
            )))
        }
    };
    if p.algorithm != Algorithm::Listed && !p.cells.is_empty() {
        return Err(ParamError::new(
            "cells",
            "only `algorithm: listed` takes a list of cells",
        ));
    }
    Ok(match p.algorithm {
        Algorithm::Random => Strategy::Random {
            samples: p.samples.get(),
        },
        Algorithm::Listed => {
            if p.cells.is_empty() {
                return Err(
                    ParamError::new("cells", "`algorithm: listed` needs cells to score")
                        .with_fix("e.g. `cells: [\"3_30_243\", \"1_11_042\"]`"),
                );
            }
            let cells = p
                .cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let field = format!("cells[{i}]");
                    Arch::parse(&field, c).map_err(|e| ParamError::new(field, e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            refuse_filter("a listed sample is scored as given; filter the list instead")?;
            Strategy::Listed(cells)
        }
        Algorithm::Prune => {
            refuse_filter(
                "pruning works on supernets, which the connectivity filter does not judge",
            )?;
            Strategy::Prune
        }
        Algorithm::Evolution => Strategy::Evolution(EvolutionConfig {
            population: p.population.get(),
            tournament: p.tournament.get(),
            cycles: p.cycles,
            batch: p.batch.get(),
        }),
        Algorithm::Reinforce => Strategy::Reinforce(ReinforceConfig {
            steps: p.steps,
            lr: p.lr,
            momentum: p.momentum,
            window: p.window.get(),
            batch: p.batch.get(),
        }),
    })
}
