//! `pde.generate` params: the YAML shape ([`GenerateParams`]) and the validated, fully resolved
//! configuration every later step reads ([`Config`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::reaction_diffusion::{self, PDEBENCH};
use crate::ParamError;

/// Grids smaller than this cannot resolve a bump of width 1/32 at all.
pub const MIN_RESOLUTION: usize = 8;
pub const MAX_RESOLUTION: usize = 1024;
pub const MAX_SAMPLES: usize = 10_000_000;
pub const MAX_FRAMES: usize = 1000;

/// The PDE solved (arXiv 2402.15734).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Equation {
    /// -div(K grad u) = f, anisotropic diffusion, periodic.
    Poisson,
    /// -div(grad u) + omega u = f.
    Helmholtz,
    /// FitzHugh-Nagumo reaction-diffusion (PDEBench's coefficients).
    ReactionDiffusion,
    /// Kolmogorov-flow Navier-Stokes in vorticity form.
    NavierStokes,
}

impl Equation {
    pub fn name(self) -> &'static str {
        match self {
            Equation::Poisson => "poisson",
            Equation::Helmholtz => "helmholtz",
            Equation::ReactionDiffusion => "reaction_diffusion",
            Equation::NavierStokes => "navier_stokes",
        }
    }

    fn time_dependent(self) -> bool {
        matches!(self, Equation::ReactionDiffusion | Equation::NavierStokes)
    }
}

/// The paper's named parameter ranges (`docs/methods/operator-learning.md` §1, "Splits").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Unlabeled pretraining range.
    Pretrain,
    /// In-distribution fine-tune/test range.
    Id,
    /// Out-of-distribution range.
    Ood,
}

/// `re: 300` or `re: [100, 300, 500]`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "a Reynolds number or a list of them")]
pub enum Reynolds {
    /// Every sample at this Reynolds number.
    One(f64),
    /// Sample i at re[i % len].
    Many(Vec<f64>),
}

/// As written in the pipeline. `equation` has no default, so the defaults of the others are
/// given field by field (a container default would make every field optional).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// The PDE.
    pub equation: Equation,
    /// Grid points per side (n x n), 8..=1024.
    #[serde(default = "GenerateParams::resolution")]
    pub resolution: usize,
    /// Samples drawn (and solved), 1..=10,000,000.
    #[serde(default = "GenerateParams::samples")]
    pub samples: usize,
    /// Combined with the stage seed.
    #[serde(default)]
    pub seed: u64,
    /// false: inputs only, no solver run.
    #[serde(default = "GenerateParams::labeled")]
    pub labeled: bool,
    /// Preset parameter range; an explicit `e` / `omega` / `re` overrides it.
    #[serde(default)]
    pub split: Option<Split>,
    /// Poisson: [lo, hi] of the anisotropy eigenvalue e ~ U[lo, hi].
    #[serde(default)]
    pub e: Option<[f64; 2]>,
    /// Helmholtz: [lo, hi] of the integer omega ~ U{lo..hi}.
    #[serde(default)]
    pub omega: Option<[i64; 2]>,
    /// Navier-Stokes: Reynolds number(s); sample i uses re[i % len].
    #[serde(default)]
    pub re: Option<Reynolds>,
    /// Time-dependent: the input is the state at t_start (burn-in; default 0).
    #[serde(default)]
    pub t_start: Option<f64>,
    /// Time-dependent: targets up to t_end (default 1).
    #[serde(default)]
    pub t_end: Option<f64>,
    /// Time-dependent: stored target frames, evenly spaced in (t_start, t_end] (default 1, at
    /// most 1000).
    #[serde(default)]
    pub frames: Option<usize>,
    /// Time-dependent: largest time step; the window is cut into equal steps no longer than it.
    #[serde(default)]
    pub dt: Option<f64>,
}

/// The defaults serde fills in.
impl GenerateParams {
    fn resolution() -> usize {
        32
    }
    fn samples() -> usize {
        64
    }
    fn labeled() -> bool {
        true
    }
}

/// What is sampled per equation, after presets and checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "equation", rename_all = "snake_case")]
pub enum Problem {
    Poisson {
        e: [f64; 2],
    },
    Helmholtz {
        omega: [i64; 2],
    },
    ReactionDiffusion {
        du: f64,
        dv: f64,
        k: f64,
        window: Window,
    },
    NavierStokes {
        re: Vec<f64>,
        window: Window,
    },
}

/// A time window cut into equal steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub t_start: f64,
    pub t_end: f64,
    pub frames: usize,
    /// Steps (and their length) from t = 0 to t_start.
    pub burn_in_steps: usize,
    pub burn_in_dt: f64,
    /// Steps (and their length) between consecutive stored frames.
    pub steps_per_frame: usize,
    pub dt: f64,
}

impl Window {
    /// Solver steps one labeled sample takes.
    pub fn total_steps(&self) -> usize {
        self.burn_in_steps + self.frames * self.steps_per_frame
    }
}

/// Validated params: the one thing the generator reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub equation: Equation,
    pub resolution: usize,
    pub samples: usize,
    /// The params' seed, as given (the stage seed is mixed in at run time).
    pub seed: u64,
    pub labeled: bool,
    pub split: Option<Split>,
    pub problem: Problem,
}

impl Config {
    /// Transitional, for `oplearn`'s tests until they call `PdeGenerateOp::config` (the op's
    /// one parse and resolve, which this is).
    pub fn from_value(params: &serde_json::Value) -> Result<Self, ParamError> {
        <super::PdeGenerateOp as crate::TypedOp>::config(params)
    }

    pub fn resolve(p: GenerateParams) -> Result<Self, ParamError> {
        let eq = p.equation;
        if !(MIN_RESOLUTION..=MAX_RESOLUTION).contains(&p.resolution) {
            return Err(ParamError::new(
                "resolution",
                format!(
                    "{} is outside {MIN_RESOLUTION}..={MAX_RESOLUTION}",
                    p.resolution
                ),
            )
            .with_fix("the sizes used are 32 (the CPU default) and 64 (the paper)"));
        }
        if !(1..=MAX_SAMPLES).contains(&p.samples) {
            return Err(ParamError::new(
                "samples",
                format!("{} is outside 1..={MAX_SAMPLES}", p.samples),
            ));
        }
        refuse_other_equations_fields(&p)?;
        let split = p.split.unwrap_or(Split::Id);
        let problem = problem(&p, split)?;
        if eq.time_dependent() && !p.labeled {
            if let Some(t) = p.t_start.filter(|t| *t != 0.0) {
                return Err(ParamError::new(
                    "t_start",
                    format!(
                        "labeled: false skips the solver, so inputs are the t = 0 initial \
                         conditions; t_start = {t} would need a solve"
                    ),
                )
                .with_fix("set t_start: 0 or labeled: true"));
            }
        }
        Ok(Config {
            equation: eq,
            resolution: p.resolution,
            samples: p.samples,
            seed: p.seed,
            labeled: p.labeled,
            split: p.split,
            problem,
        })
    }

    /// Input channels, solution channels.
    pub fn channels(&self) -> (usize, usize) {
        match &self.problem {
            Problem::Poisson { .. } => (4, 1),
            Problem::Helmholtz { .. } => (3, 1),
            Problem::ReactionDiffusion { window, .. } => (2, 2 * window.frames),
            Problem::NavierStokes { window, .. } => (1, window.frames),
        }
    }

    pub fn channel_names(&self) -> Vec<&'static str> {
        match &self.problem {
            Problem::Poisson { .. } => vec!["f", "k11", "k22", "k12"],
            Problem::Helmholtz { .. } => vec!["f", "diffusivity", "omega"],
            Problem::ReactionDiffusion { .. } => vec!["u", "v"],
            Problem::NavierStokes { .. } => vec!["w"],
        }
    }

    /// Columns of the `coeffs` table.
    pub fn coeff_names(&self) -> Vec<&'static str> {
        match &self.problem {
            Problem::Poisson { .. } => vec!["k11", "k22", "k12", "e", "theta", "vf"],
            Problem::Helmholtz { .. } => vec!["diffusivity", "omega", "vf"],
            Problem::ReactionDiffusion { .. } => vec!["du", "dv", "k"],
            Problem::NavierStokes { .. } => vec!["re"],
        }
    }

    pub fn window(&self) -> Option<&Window> {
        match &self.problem {
            Problem::ReactionDiffusion { window, .. } | Problem::NavierStokes { window, .. } => {
                Some(window)
            }
            _ => None,
        }
    }
}

/// What is sampled for the equation, with the split's ranges where none is given.
fn problem(p: &GenerateParams, split: Split) -> Result<Problem, ParamError> {
    Ok(match p.equation {
        Equation::Poisson => {
            let e = p.e.unwrap_or(match split {
                Split::Pretrain => [1.0, 20.0],
                Split::Id => [5.0, 15.0],
                Split::Ood => [15.0, 50.0],
            });
            if !(e[0].is_finite() && e[1].is_finite() && 0.0 < e[0] && e[0] <= e[1]) {
                return Err(ParamError::new(
                    "e",
                    format!("[{}, {}] is not a range 0 < lo <= hi", e[0], e[1]),
                )
                .with_fix("e is the second eigenvalue of K (the first is 1), e.g. [5, 15]"));
            }
            Problem::Poisson { e }
        }
        Equation::Helmholtz => {
            let omega = p.omega.unwrap_or(match split {
                Split::Pretrain => [1, 20],
                Split::Id => [5, 15],
                Split::Ood => [15, 20],
            });
            if !(1 <= omega[0] && omega[0] <= omega[1] && omega[1] <= 1_000_000) {
                return Err(ParamError::new(
                    "omega",
                    format!(
                        "[{}, {}] is not an integer range 1 <= lo <= hi <= 1e6",
                        omega[0], omega[1]
                    ),
                )
                .with_fix("e.g. omega: [5, 15]"));
            }
            Problem::Helmholtz { omega }
        }
        Equation::ReactionDiffusion => {
            if split == Split::Ood {
                return Err(ParamError::new(
                    "split",
                    "reaction_diffusion has no OOD split in the paper",
                )
                .with_fix("use split: pretrain or id"));
            }
            let window = window(p, 0.0, 1.0, 5e-3)?;
            let limit = reaction_diffusion::stable_dt(&PDEBENCH, p.resolution);
            if window.dt > limit || window.burn_in_dt > limit {
                return Err(ParamError::new(
                    "dt",
                    format!(
                        "a step of {} is beyond RK4's diffusion stability limit {limit:.3e} \
                         at resolution {}",
                        window.dt.max(window.burn_in_dt),
                        p.resolution
                    ),
                )
                .with_fix(format!("set dt <= {limit:.3e}")));
            }
            Problem::ReactionDiffusion {
                du: PDEBENCH.du,
                dv: PDEBENCH.dv,
                k: PDEBENCH.k,
                window,
            }
        }
        Equation::NavierStokes => {
            let re = match &p.re {
                Some(Reynolds::One(r)) => vec![*r],
                Some(Reynolds::Many(list)) => list.clone(),
                None => match split {
                    Split::Pretrain => vec![100.0, 300.0, 500.0, 800.0, 1000.0],
                    Split::Id => vec![300.0],
                    Split::Ood => vec![10000.0],
                },
            };
            if re.is_empty() || re.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
                return Err(ParamError::new(
                    "re",
                    format!("{re:?}: give one or more positive Reynolds numbers"),
                ));
            }
            Problem::NavierStokes {
                re,
                window: window(p, 0.0, 1.0, 1e-2)?,
            }
        }
    })
}

/// The fields of another equation, given anyway, are refused by name.
fn refuse_other_equations_fields(p: &GenerateParams) -> Result<(), ParamError> {
    let eq = p.equation;
    let only_for = |field: &str, given: bool, owner: &str| {
        if given {
            Err(ParamError::new(
                field,
                format!("`{field}` applies to {owner} only, not to {}", eq.name()),
            )
            .with_fix(format!("remove `{field}`")))
        } else {
            Ok(())
        }
    };
    if eq != Equation::Poisson {
        only_for("e", p.e.is_some(), "equation: poisson")?;
    }
    if eq != Equation::Helmholtz {
        only_for("omega", p.omega.is_some(), "equation: helmholtz")?;
    }
    if eq != Equation::NavierStokes {
        only_for("re", p.re.is_some(), "equation: navier_stokes")?;
    }
    if !eq.time_dependent() {
        let owner = "the time-dependent equations (reaction_diffusion, navier_stokes)";
        only_for("t_start", p.t_start.is_some(), owner)?;
        only_for("t_end", p.t_end.is_some(), owner)?;
        only_for("frames", p.frames.is_some(), owner)?;
        only_for("dt", p.dt.is_some(), owner)?;
    }
    Ok(())
}

/// Cuts [0, t_start] and each frame interval of (t_start, t_end] into equal steps <= dt.
fn window(p: &GenerateParams, t_start: f64, t_end: f64, dt: f64) -> Result<Window, ParamError> {
    let t_start = p.t_start.unwrap_or(t_start);
    let t_end = p.t_end.unwrap_or(t_end);
    let frames = p.frames.unwrap_or(1);
    let dt_max = p.dt.unwrap_or(dt);
    if !(t_start.is_finite() && t_start >= 0.0) {
        return Err(ParamError::new(
            "t_start",
            format!("{t_start} must be finite and >= 0"),
        ));
    }
    if !(t_end.is_finite() && t_end > t_start) {
        return Err(ParamError::new(
            "t_end",
            format!("{t_end} must be finite and after t_start = {t_start}"),
        ));
    }
    if !(1..=MAX_FRAMES).contains(&frames) {
        return Err(ParamError::new(
            "frames",
            format!("{frames} is outside 1..={MAX_FRAMES}"),
        ));
    }
    if !(dt_max.is_finite() && dt_max > 0.0) {
        return Err(ParamError::new("dt", format!("{dt_max} must be positive")));
    }
    let interval = (t_end - t_start) / frames as f64;
    // A relative slack so that e.g. 1.0 / 0.01 is 100 steps, not 101.
    let steps_for = |span: f64| ((span / dt_max) * (1.0 - 1e-12)).ceil().max(1.0);
    let steps_per_frame = steps_for(interval);
    let burn_in_steps = if t_start > 0.0 {
        steps_for(t_start)
    } else {
        0.0
    };
    if steps_per_frame * frames as f64 + burn_in_steps > 1e9 {
        return Err(ParamError::new(
            "dt",
            format!("{dt_max} needs more than 1e9 steps for the window [0, {t_end}]"),
        ));
    }
    Ok(Window {
        t_start,
        t_end,
        frames,
        burn_in_steps: burn_in_steps as usize,
        burn_in_dt: if burn_in_steps > 0.0 {
            t_start / burn_in_steps
        } else {
            0.0
        },
        steps_per_frame: steps_per_frame as usize,
        dt: interval / steps_per_frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use serde_json::Value;

    fn config(v: &Value) -> Result<Config, ParamError> {
        Config::resolve(crate::parse_params(v)?)
    }

    fn err(v: Value) -> ParamError {
        config(&v).unwrap_err()
    }

    #[test]
    fn presets_and_defaults() {
        let c = config(&json!({"equation": "poisson", "split": "ood"})).unwrap();
        assert_eq!(c.problem, Problem::Poisson { e: [15.0, 50.0] });
        assert_eq!((c.resolution, c.samples, c.labeled), (32, 64, true));
        let c = config(&json!({"equation": "helmholtz", "omega": [2, 3]})).unwrap();
        assert_eq!(c.problem, Problem::Helmholtz { omega: [2, 3] });
        let c = config(&json!({"equation": "navier_stokes", "split": "pretrain"})).unwrap();
        let Problem::NavierStokes { re, window } = &c.problem else {
            panic!("{c:?}")
        };
        assert_eq!(re, &[100.0, 300.0, 500.0, 800.0, 1000.0]);
        assert_eq!((window.steps_per_frame, window.dt), (100, 0.01));
        let c = config(&json!({"equation": "navier_stokes", "re": 10000})).unwrap();
        assert!(matches!(&c.problem, Problem::NavierStokes { re, .. } if re == &[10000.0]));
    }

    #[test]
    fn window_is_cut_into_equal_steps_no_longer_than_dt() {
        let c = config(&json!({
            "equation": "reaction_diffusion", "t_start": 0.25, "t_end": 1.25, "frames": 3, "dt": 0.01
        }))
        .unwrap();
        let w = c.window().unwrap();
        assert_eq!((w.burn_in_steps, w.steps_per_frame), (25, 34));
        assert!((w.dt * 34.0 * 3.0 - 1.0).abs() < 1e-12 && w.dt <= 0.01);
        assert_eq!(c.channels(), (2, 6));
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(json!({"equation": "poisson", "bogus": 1}))
            .message
            .contains("bogus"));
        assert_eq!(
            err(json!({"equation": "poisson", "omega": [1, 2]})).path,
            "omega"
        );
        assert_eq!(err(json!({"equation": "poisson", "dt": 0.1})).path, "dt");
        assert_eq!(err(json!({"equation": "helmholtz", "re": 3})).path, "re");
        assert_eq!(err(json!({"equation": "poisson", "e": [0, 2]})).path, "e");
        assert_eq!(err(json!({"equation": "poisson", "e": [3, 2]})).path, "e");
        assert_eq!(
            err(json!({"equation": "helmholtz", "omega": [0, 2]})).path,
            "omega"
        );
        assert_eq!(
            err(json!({"equation": "poisson", "resolution": 4})).path,
            "resolution"
        );
        assert_eq!(
            err(json!({"equation": "poisson", "samples": 0})).path,
            "samples"
        );
        assert_eq!(
            err(json!({"equation": "navier_stokes", "re": []})).path,
            "re"
        );
        assert_eq!(
            err(json!({"equation": "navier_stokes", "t_end": 0})).path,
            "t_end"
        );
        assert_eq!(
            err(json!({"equation": "navier_stokes", "dt": -1})).path,
            "dt"
        );
        assert_eq!(
            err(json!({"equation": "reaction_diffusion", "split": "ood"})).path,
            "split"
        );
        assert_eq!(
            err(json!({"equation": "reaction_diffusion", "resolution": 256, "dt": 0.01})).path,
            "dt"
        );
        assert_eq!(
            err(json!({"equation": "navier_stokes", "labeled": false, "t_start": 5, "t_end": 6}))
                .path,
            "t_start"
        );
        assert_eq!(err(json!({"equation": "burgers"})).path, "equation");
        assert_eq!(
            err(json!({"equation": "poisson", "resolution": -3})).path,
            "resolution"
        );
    }
}
