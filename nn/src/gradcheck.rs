//! Finite-difference gradient checks (tests only), in f64.
//!
//! The scalar checked is L = sum_i y_i r_i with a fixed random r, so that no part of the output
//! can cancel out; the analytic gradient from the tape is compared with central differences
//! (L(x + h e_i) - L(x - h e_i)) / 2h.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::init::normal;
use super::tensor::from_vec;
use super::{collect_params, collect_params_mut, Dev, HasParams, NnError, ParamKind};

pub type Taped<S> = Tensor<S, f64, Dev, OwnedTape<f64, Dev>>;

const H: f64 = 1e-6;

/// A tensor of N(0, 1) draws.
pub fn rand_tensor<S: Shape>(dev: &Dev, shape: S, seed: u64) -> Tensor<S, f64, Dev> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = normal(1.0, shape.num_elements(), &mut rng);
    from_vec(dev, v, shape).expect("sizes agree")
}

fn weighted_sum<S2: Shape>(y: Taped<S2>, r: &[f64]) -> Taped<Rank0> {
    let n = y.shape().num_elements();
    let dev = y.device().clone();
    let r = from_vec(&dev, r.to_vec(), (n,)).expect("sizes agree");
    y.reshape_like(&(n,))
        .try_mul(r)
        .unwrap()
        .sum::<Rank0, Axis<0>>()
}

fn assert_close(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len());
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs();
        assert!(
            err <= tol * (1.0 + n.abs()),
            "{what}[{i}]: analytic {a} vs finite difference {n} (err {err})"
        );
    }
}

/// Checks d(sum y r)/dx of `f` against finite differences.
pub fn check_input_grad<S: Shape, S2: Shape>(
    x: &Tensor<S, f64, Dev>,
    f: impl Fn(Taped<S>) -> Result<Taped<S2>, NnError>,
    tol: f64,
) {
    let y0 = f(x.clone().traced(Gradients::leaky())).expect("forward");
    let mut rng = StdRng::seed_from_u64(99);
    let r = normal(1.0, y0.shape().num_elements(), &mut rng);
    let g = weighted_sum(y0, &r).backward().get(x).as_vec();

    let base = x.as_vec();
    let mut numeric = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let xp = from_vec(x.device(), v, *x.shape()).expect("sizes agree");
            weighted_sum(f(xp.traced(Gradients::leaky())).expect("forward"), &r).array()
        };
        numeric.push((eval(H) - eval(-H)) / (2.0 * H));
    }
    assert_close("d/dx", &g, &numeric, tol);
}

/// Checks d(sum y r)/d(param) of every trainable parameter of `m` (at most `per_param` entries
/// of each, spread over the tensor) against finite differences.
pub fn check_param_grads<M: HasParams<f64>, S: Shape, S2: Shape>(
    m: &mut M,
    x: &Tensor<S, f64, Dev>,
    mut f: impl FnMut(&mut M, Taped<S>) -> Result<Taped<S2>, NnError>,
    per_param: usize,
    tol: f64,
) {
    let y0 = f(m, x.clone().traced(Gradients::leaky())).expect("forward");
    let mut rng = StdRng::seed_from_u64(98);
    let r = normal(1.0, y0.shape().num_elements(), &mut rng);
    let mut grads = weighted_sum(y0, &r).backward();
    let analytic: Vec<(String, Vec<f64>)> = collect_params(m)
        .into_iter()
        .filter(|(_, p)| p.kind == ParamKind::Trainable)
        .map(|(name, p)| {
            grads.try_alloc_for(&p.value).expect("alloc");
            (name, grads.get(&p.value).as_vec())
        })
        .collect();
    assert!(!analytic.is_empty(), "no trainable parameters to check");

    for (name, g) in analytic {
        let n = g.len();
        let step = (n / per_param.max(1)).max(1);
        let idx: Vec<usize> = (0..n).step_by(step).collect();
        let mut numeric = Vec::new();
        for &i in &idx {
            let mut eval = |m: &mut M, delta: f64| {
                set_entry(m, &name, i, delta);
                let y = f(m, x.clone().traced(Gradients::leaky())).expect("forward");
                set_entry(m, &name, i, -delta);
                weighted_sum(y, &r).array()
            };
            numeric.push((eval(m, H) - eval(m, -H)) / (2.0 * H));
        }
        let picked: Vec<f64> = idx.iter().map(|&i| g[i]).collect();
        assert_close(&name, &picked, &numeric, tol);
    }
}

fn set_entry<M: HasParams<f64>>(m: &mut M, name: &str, i: usize, delta: f64) {
    for (n, p) in collect_params_mut(m) {
        if n == name {
            let mut v = p.to_vec();
            v[i] += delta;
            p.set_vec(v).expect("same size");
        }
    }
}
