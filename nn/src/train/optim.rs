//! Optimisers over named parameters: SGD (momentum, Nesterov, weight decay) and AdamW, with
//! per-parameter-group learning-rate multipliers and global gradient-norm clipping.

use std::collections::HashMap;

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use crate::{
    collect_params, collect_params_mut, Dev, Float, HasParams, NnError, ParamKind, Tensor1,
};

/// The `optimizer:` block of a stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    /// PyTorch's SGD: g += wd p; b = mu b + g (b = g on the first step);
    /// g = g + mu b (Nesterov) or b; p -= lr g.
    Sgd {
        /// Heavy-ball momentum mu (0: plain SGD).
        #[serde(default)]
        momentum: f64,
        /// Nesterov's form of the momentum step.
        #[serde(default)]
        nesterov: bool,
        /// L2 penalty added to the gradient (coupled weight decay).
        #[serde(default)]
        weight_decay: f64,
    },
    /// Loshchilov & Hutter 2019 (PyTorch's AdamW): p *= 1 - lr wd; m = b1 m + (1 - b1) g;
    /// v = b2 v + (1 - b2) g^2; p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    Adamw {
        /// Decay rates (b1, b2) of the first and second moments.
        #[serde(default = "default_betas")]
        betas: (f64, f64),
        /// Added to the denominator for stability.
        #[serde(default = "default_eps")]
        eps: f64,
        /// Decoupled weight decay (p *= 1 - lr wd per step).
        #[serde(default = "default_adamw_decay")]
        weight_decay: f64,
    },
}

fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_adamw_decay() -> f64 {
    0.01
}

impl OptimizerSpec {
    pub fn validate(&self) -> Result<(), NnError> {
        let unit = |field: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(NnError::config(field, format!("{v} must be in [0, 1)")))
            }
        };
        let non_negative = |field: &str, v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(NnError::config(field, format!("{v} must be >= 0")))
            }
        };
        match *self {
            OptimizerSpec::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                unit("optimizer.momentum", momentum)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
                if nesterov && momentum == 0.0 {
                    return Err(NnError::config(
                        "optimizer.nesterov",
                        "Nesterov momentum needs momentum > 0",
                    ));
                }
                Ok(())
            }
            OptimizerSpec::Adamw {
                betas,
                eps,
                weight_decay,
            } => {
                unit("optimizer.betas.0", betas.0)?;
                unit("optimizer.betas.1", betas.1)?;
                non_negative("optimizer.weight_decay", weight_decay)?;
                if eps > 0.0 {
                    Ok(())
                } else {
                    Err(NnError::config(
                        "optimizer.eps",
                        format!("{eps} must be positive"),
                    ))
                }
            }
        }
    }
}

/// Parameters whose name starts with `prefix` train at `lr_multiplier` times the schedule's
/// rate; 0 freezes them (no update, no weight decay). The longest matching prefix wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamGroup {
    /// Parameter-name prefix the multiplier applies to.
    pub prefix: String,
    /// Factor on the learning rate for those parameters.
    pub lr_multiplier: f64,
}

#[derive(Debug)]
enum State<E: Float> {
    Momentum(Tensor1<E>),
    Adam { m: Tensor1<E>, v: Tensor1<E> },
}

/// An optimiser with its per-parameter state, keyed by parameter name.
#[derive(Debug)]
pub struct Optimizer<E: Float> {
    spec: OptimizerSpec,
    groups: Vec<ParamGroup>,
    state: HashMap<String, State<E>>,
    steps: u64,
}

/// Rescales gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor max_norm / (norm + 1e-6) when norm > max_norm). Returns the norm
/// before clipping.
pub fn clip_grad_norm<E: Float>(
    grads: &mut [Tensor1<E>],
    max_norm: Option<f64>,
) -> Result<f64, NnError>
where
    Dev: Device<E>,
{
    let mut sq = 0.0;
    for g in grads.iter() {
        sq += g
            .clone()
            .try_square()?
            .try_sum::<Rank0, _>()?
            .array()
            .into_f64();
    }
    let norm = sq.sqrt();
    if let Some(max) = max_norm {
        if norm > max {
            let scale = E::of_f64(max / (norm + 1e-6));
            for g in grads.iter_mut() {
                *g = g.clone().try_mul(scale)?;
            }
        }
    }
    Ok(norm)
}

impl<E: Float> Optimizer<E>
where
    Dev: Device<E>,
{
    pub fn new(spec: OptimizerSpec, groups: Vec<ParamGroup>) -> Result<Self, NnError> {
        spec.validate()?;
        for g in &groups {
            if !(g.lr_multiplier >= 0.0 && g.lr_multiplier.is_finite()) {
                return Err(NnError::config(
                    format!("param_groups[{}].lr_multiplier", g.prefix),
                    format!("{} must be >= 0", g.lr_multiplier),
                ));
            }
        }
        Ok(Self {
            spec,
            groups,
            state: HashMap::new(),
            steps: 0,
        })
    }

    /// The learning-rate multiplier of parameter `name`.
    pub fn multiplier(&self, name: &str) -> f64 {
        self.groups
            .iter()
            .filter(|g| name.starts_with(&g.prefix))
            .max_by_key(|g| g.prefix.len())
            .map_or(1.0, |g| g.lr_multiplier)
    }

    /// The gradients of `model`'s trainable parameters, in [`collect_params`] order (zeros for
    /// parameters the loss did not reach).
    pub fn gradients<M: HasParams<E>>(
        model: &M,
        grads: &mut Gradients<E, Dev>,
    ) -> Result<Vec<Tensor1<E>>, NnError> {
        let mut out = Vec::new();
        for (_, p) in collect_params(model) {
            if p.kind == ParamKind::Trainable {
                grads.try_alloc_for(&p.value)?;
                out.push(grads.get(&p.value));
            }
        }
        Ok(out)
    }

    /// One update of every trainable parameter with gradients `grads` (from [`Self::gradients`])
    /// at learning rate `lr`.
    pub fn step<M: HasParams<E>>(
        &mut self,
        model: &mut M,
        grads: Vec<Tensor1<E>>,
        lr: f64,
    ) -> Result<(), NnError> {
        self.steps += 1;
        let t = self.steps as i32;
        let trainable: Vec<_> = collect_params_mut(model)
            .into_iter()
            .filter(|(_, p)| p.kind == ParamKind::Trainable)
            .collect();
        if trainable.len() != grads.len() {
            return Err(NnError::shape(
                "gradients per trainable parameter",
                trainable.len(),
                grads.len(),
            ));
        }
        for ((name, p), g) in trainable.into_iter().zip(grads) {
            let lr_p = lr * self.multiplier(&name);
            if lr_p == 0.0 {
                continue;
            }
            let value = p.value.clone();
            let new = match self.spec {
                OptimizerSpec::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    let g = if weight_decay > 0.0 {
                        g.try_add(value.clone().try_mul(E::of_f64(weight_decay))?)?
                    } else {
                        g
                    };
                    let dir = if momentum > 0.0 {
                        let buf = match self.state.remove(&name) {
                            Some(State::Momentum(b)) => {
                                b.try_mul(E::of_f64(momentum))?.try_add(g.clone())?
                            }
                            _ => g.clone(),
                        };
                        let dir = if nesterov {
                            g.try_add(buf.clone().try_mul(E::of_f64(momentum))?)?
                        } else {
                            buf.clone()
                        };
                        self.state.insert(name, State::Momentum(buf));
                        dir
                    } else {
                        g
                    };
                    value.try_sub(dir.try_mul(E::of_f64(lr_p))?)?
                }
                OptimizerSpec::Adamw {
                    betas: (b1, b2),
                    eps,
                    weight_decay,
                } => {
                    let (m, v) = match self.state.remove(&name) {
                        Some(State::Adam { m, v }) => (m, v),
                        _ => (
                            value.device().try_zeros_like(value.shape())?,
                            value.device().try_zeros_like(value.shape())?,
                        ),
                    };
                    let m = m
                        .try_mul(E::of_f64(b1))?
                        .try_add(g.clone().try_mul(E::of_f64(1.0 - b1))?)?;
                    let v = v
                        .try_mul(E::of_f64(b2))?
                        .try_add(g.try_square()?.try_mul(E::of_f64(1.0 - b2))?)?;
                    let m_hat = m.clone().try_mul(E::of_f64(1.0 / (1.0 - b1.powi(t))))?;
                    let v_hat = v.clone().try_mul(E::of_f64(1.0 / (1.0 - b2.powi(t))))?;
                    let update = m_hat.try_div(v_hat.try_sqrt()?.try_add(E::of_f64(eps))?)?;
                    self.state.insert(name, State::Adam { m, v });
                    value
                        .try_mul(E::of_f64(1.0 - lr_p * weight_decay))?
                        .try_sub(update.try_mul(E::of_f64(lr_p))?)?
                }
            };
            p.value = new;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::from_vec;
    use crate::Param;

    struct Two {
        a: Param<f64>,
        b: Param<f64>,
    }
    impl HasParams<f64> for Two {
        fn visit_params<'a>(&'a self, p: &str, out: &mut Vec<(String, &'a Param<f64>)>) {
            self.a.visit_params(&crate::tensor::join(p, "enc.a"), out);
            self.b.visit_params(&crate::tensor::join(p, "head.b"), out);
        }
        fn visit_params_mut<'a>(
            &'a mut self,
            p: &str,
            out: &mut Vec<(String, &'a mut Param<f64>)>,
        ) {
            self.a
                .visit_params_mut(&crate::tensor::join(p, "enc.a"), out);
            self.b
                .visit_params_mut(&crate::tensor::join(p, "head.b"), out);
        }
    }

    fn two() -> Two {
        let dev = Dev::default();
        Two {
            a: Param::from_vec(&dev, vec![1.0, -2.0], vec![2], ParamKind::Trainable).unwrap(),
            b: Param::from_vec(&dev, vec![0.5], vec![1], ParamKind::Trainable).unwrap(),
        }
    }

    fn g(v: Vec<f64>) -> Tensor1<f64> {
        let n = v.len();
        from_vec(&Dev::default(), v, (n,)).unwrap()
    }

    #[test]
    fn sgd_nesterov_matches_pytorch_recurrence() {
        let mut m = two();
        let spec = OptimizerSpec::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
        };
        let mut opt = Optimizer::new(spec, vec![]).unwrap();
        // Step 1: g' = g + 0.1 p = [0.6, 0.3]; b = g'; d = g' + 0.9 b = 1.9 g'.
        opt.step(&mut m, vec![g(vec![0.5, 0.5]), g(vec![0.0])], 0.1)
            .unwrap();
        let a1 = [1.0 - 0.1 * 1.9 * 0.6, -2.0 - 0.1 * 1.9 * 0.3];
        let got = m.a.to_vec();
        assert!((got[0] - a1[0]).abs() < 1e-12 && (got[1] - a1[1]).abs() < 1e-12);
        // Step 2 with zero gradient: g' = 0.1 p; b = 0.9 b1 + g'; d = g' + 0.9 b.
        opt.step(&mut m, vec![g(vec![0.0, 0.0]), g(vec![0.0])], 0.1)
            .unwrap();
        let gp = 0.1 * a1[0];
        let b = 0.9 * 0.6 + gp;
        assert!((m.a.to_vec()[0] - (a1[0] - 0.1 * (gp + 0.9 * b))).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_groups_scale_or_freeze() {
        let mut m = two();
        let spec = OptimizerSpec::Adamw {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let groups = vec![ParamGroup {
            prefix: "head".into(),
            lr_multiplier: 0.0,
        }];
        let mut opt = Optimizer::new(spec, groups).unwrap();
        assert_eq!(opt.multiplier("head.b"), 0.0);
        opt.step(&mut m, vec![g(vec![3.0, -0.2]), g(vec![1.0])], 0.01)
            .unwrap();
        // Bias-corrected first Adam step is lr * sign(g).
        let a = m.a.to_vec();
        assert!(
            (a[0] - 0.99).abs() < 1e-6 && (a[1] + 1.99).abs() < 1e-6,
            "{a:?}"
        );
        assert_eq!(m.b.to_vec(), vec![0.5]);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut gs = vec![g(vec![3.0, 0.0]), g(vec![4.0])];
        let norm = clip_grad_norm(&mut gs, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let after = clip_grad_norm(&mut gs, None).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
        assert!(Optimizer::<f64>::new(
            OptimizerSpec::Sgd {
                momentum: 1.5,
                nesterov: false,
                weight_decay: 0.0
            },
            vec![]
        )
        .is_err());
    }
}
