//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

use crate::NnError;

/// The shape of the learning rate over training, after the warmup.
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleKind {
    /// lr = base.
    Constant,
    /// One cosine decay over all post-warmup steps (Loshchilov & Hutter 2017, no restarts):
    /// lr = min + (base - min) (1 + cos(pi t / T)) / 2.
    Cosine { min_lr: f64 },
    /// lr = base * gamma^floor(t / every).
    Step { every: u64, gamma: f64 },
}

/// A schedule: `warmup_steps` of linear warmup from base/warmup to base, then `kind`.
/// Written as `{kind: cosine, min_lr: 0, warmup_steps: 100}`; fields of other kinds are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(try_from = "ScheduleFields", into = "ScheduleFields")]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
}

/// The flat serde form of [`Schedule`] (serde cannot deny unknown fields through `flatten`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ScheduleFields {
    /// `constant`, `cosine` or `step`.
    kind: String,
    /// Steps of linear warm-up from 0 to the learning rate.
    #[serde(default, skip_serializing_if = "is_zero")]
    warmup_steps: u64,
    /// `cosine`: the learning rate at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_lr: Option<f64>,
    /// `step`: steps between decays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    every: Option<u64>,
    /// `step`: the factor of each decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gamma: Option<f64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl TryFrom<ScheduleFields> for Schedule {
    type Error = String;
    fn try_from(f: ScheduleFields) -> Result<Self, String> {
        let only = |allowed: &[&str]| {
            let given = [
                ("min_lr", f.min_lr.is_some()),
                ("every", f.every.is_some()),
                ("gamma", f.gamma.is_some()),
            ];
            match given.iter().find(|(n, set)| *set && !allowed.contains(n)) {
                Some((n, _)) => Err(format!(
                    "`{n}` does not apply to schedule kind `{}`",
                    f.kind
                )),
                None => Ok(()),
            }
        };
        let kind = match f.kind.as_str() {
            "constant" => {
                only(&[])?;
                ScheduleKind::Constant
            }
            "cosine" => {
                only(&["min_lr"])?;
                ScheduleKind::Cosine {
                    min_lr: f.min_lr.unwrap_or(0.0),
                }
            }
            "step" => {
                only(&["every", "gamma"])?;
                ScheduleKind::Step {
                    every: f
                        .every
                        .ok_or("schedule kind `step` needs `every` (steps between decays)")?,
                    gamma: f.gamma.unwrap_or(0.1),
                }
            }
            other => {
                return Err(format!(
                    "unknown schedule kind `{other}`; expected constant, cosine or step"
                ))
            }
        };
        Ok(Schedule {
            kind,
            warmup_steps: f.warmup_steps,
        })
    }
}

impl From<Schedule> for ScheduleFields {
    fn from(s: Schedule) -> Self {
        let mut f = ScheduleFields {
            warmup_steps: s.warmup_steps,
            ..Default::default()
        };
        match s.kind {
            ScheduleKind::Constant => f.kind = "constant".into(),
            ScheduleKind::Cosine { min_lr } => {
                f.kind = "cosine".into();
                f.min_lr = Some(min_lr);
            }
            ScheduleKind::Step { every, gamma } => {
                f.kind = "step".into();
                f.every = Some(every);
                f.gamma = Some(gamma);
            }
        }
        f
    }
}

impl Schedule {
    pub fn constant() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
        }
    }

    pub fn validate(&self) -> Result<(), NnError> {
        match self.kind {
            ScheduleKind::Step { every: 0, .. } => {
                Err(NnError::config("schedule.every", "must be at least 1"))
            }
            ScheduleKind::Step { gamma, .. } if !(gamma > 0.0 && gamma.is_finite()) => Err(
                NnError::config("schedule.gamma", format!("{gamma} must be positive")),
            ),
            ScheduleKind::Cosine { min_lr } if !(min_lr >= 0.0 && min_lr.is_finite()) => Err(
                NnError::config("schedule.min_lr", format!("{min_lr} must be >= 0")),
            ),
            _ => Ok(()),
        }
    }

    /// The learning rate for step `step` (0-based) of `total_steps`.
    pub fn lr_at(&self, base: f64, step: u64, total_steps: u64) -> f64 {
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let t = step - self.warmup_steps;
        let span = total_steps.saturating_sub(self.warmup_steps).max(1);
        match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Cosine { min_lr } => {
                let frac = (t as f64 / span as f64).min(1.0);
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
            }
            ScheduleKind::Step { every, gamma } => base * gamma.powi((t / every.max(1)) as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_their_formulas() {
        let c: Schedule = serde_json::from_value(serde_json::json!({"kind": "cosine"})).unwrap();
        assert_eq!(c.lr_at(1.0, 0, 100), 1.0);
        assert!((c.lr_at(1.0, 50, 100) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(1.0, 99, 100) < 1e-3);
        let w: Schedule = serde_json::from_value(
            serde_json::json!({"kind": "cosine", "warmup_steps": 10, "min_lr": 0.1}),
        )
        .unwrap();
        assert!((w.lr_at(2.0, 0, 110) - 0.2).abs() < 1e-12);
        assert!((w.lr_at(2.0, 9, 110) - 2.0).abs() < 1e-12);
        assert!((w.lr_at(2.0, 60, 110) - 1.05).abs() < 1e-12);
        let s: Schedule =
            serde_json::from_value(serde_json::json!({"kind": "step", "every": 3, "gamma": 0.5}))
                .unwrap();
        assert_eq!(
            [s.lr_at(1.0, 2, 9), s.lr_at(1.0, 3, 9), s.lr_at(1.0, 7, 9)],
            [1.0, 0.5, 0.25]
        );
        assert_eq!(Schedule::constant().lr_at(0.3, 1000, 10), 0.3);
        let bad: Schedule =
            serde_json::from_value(serde_json::json!({"kind": "step", "every": 0, "gamma": 0.5}))
                .unwrap();
        assert!(bad.validate().is_err());
        assert!(serde_json::from_value::<Schedule>(
            serde_json::json!({"kind": "cosine", "bogus": 1})
        )
        .is_err());
        assert!(serde_json::from_value::<Schedule>(
            serde_json::json!({"kind": "cosine", "every": 1})
        )
        .is_err());
        assert!(serde_json::from_value::<Schedule>(serde_json::json!({"kind": "step"})).is_err());
        let round: Schedule = serde_json::from_value(serde_json::to_value(&w).unwrap()).unwrap();
        assert_eq!(round, w);
    }
}
