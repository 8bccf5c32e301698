//! Layers on runtime shapes: each a plain struct with a constructor (sizes and a
//! [`VarBuilder`](super::VarBuilder)), a `forward`, and parameters named through
//! [`HasParams`](super::HasParams).

mod attention;
mod conv;
mod linear;
mod norm;
mod pool;
mod spectral;

pub use attention::MultiHeadSelfAttention;
pub use conv::{unfold, Conv2d, ConvGeometry};
pub use linear::Linear;
pub use norm::{BatchNorm2d, LayerNorm};
pub use pool::{global_avg_pool, AvgPool2d};
pub use spectral::SpectralConv2d;

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use rayon::prelude::*;
use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use super::tensor::{grad_buffer_apply, grad_buffer_to_host, host_read, take_grad, with_grad_mut};
use super::{Dev, Float, NnError};

/// What a forward pass needs besides its input: train or eval behaviour (BatchNorm statistics,
/// dropout) and the seeded RNG that dropout masks come from.
#[derive(Debug)]
pub struct ForwardCtx {
    pub training: bool,
    pub rng: StdRng,
}

impl ForwardCtx {
    pub fn train(seed: u64) -> Self {
        Self {
            training: true,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn eval() -> Self {
        Self {
            training: false,
            rng: StdRng::seed_from_u64(0),
        }
    }
}

/// ReLU(x) = max(x, 0), elementwise.
pub fn relu<S: Shape, E: Float, T: Tape<E, Dev>>(
    x: Tensor<S, E, Dev, T>,
) -> Result<Tensor<S, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    Ok(x.try_relu()?)
}

/// GELU(x) = x Phi(x) = x/2 (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016; PyTorch's default
/// `approximate='none'`); dGELU/dx = Phi(x) + x phi(x), phi the standard normal density.
///
/// Not dfdx's `accurate_gelu`: its 0.13 backward drops the 1/sqrt 2 of the inner derivative.
/// A host kernel, elements in parallel; on CUDA it copies through the host (slow path).
pub fn gelu<S: Shape, E: Float, T: Tape<E, Dev>>(
    x: Tensor<S, E, Dev, T>,
) -> Result<Tensor<S, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    // In E's own precision (erff for f32): f64 per element made GELU a quarter of fno2d's time.
    let phi = |x: E| E::of_f64(0.5) * (E::one() + (x * E::of_f64(FRAC_1_SQRT_2)).erf());
    let density =
        |x: E| (E::of_f64(-0.5) * x * x).exp() * E::of_f64(0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2);
    let shape = *x.shape();
    let x = x.try_contiguous()?;
    let (x, mut tape) = x.split_tape();
    let mut y = host_read(&x);
    y.par_iter_mut().for_each(|v| *v = *v * phi(*v));
    let out = x.device().try_tensor_from_vec(y, shape)?;
    let out_id = out.clone();
    tape.add_backward_op(move |grads| {
        let go = take_grad(grads, &out_id)?;
        let xv = host_read(&x);
        with_grad_mut(grads, &x, |gx| {
            gx.par_iter_mut()
                .zip(xv.par_iter())
                .zip(go.par_iter())
                .for_each(|((g, &v), &o)| *g += o * (phi(v) + v * density(v)))
        })?;
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// x_1 + ... + x_n (n >= 1, all of one shape) as one host op: the sum in one parallel pass per
/// addend, and in backward the output gradient added to each addend's (twice for an addend
/// passed twice). Replaces n - 1 binary adds, which each allocate an output and a gradient and
/// run on one thread. TensorFlow calls this `add_n`. On CUDA it copies through the host (slow
/// path).
pub fn add_n<S: Shape, E: Float, T: Tape<E, Dev>>(
    xs: Vec<Tensor<S, E, Dev, T>>,
) -> Result<Tensor<S, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    // Elements per parallel task.
    const PIECE: usize = 1 << 14;
    let mut xs = xs.into_iter();
    let Some(first) = xs.next() else {
        return Err(NnError::shape("add_n addends", ">= 1", 0));
    };
    let shape = *first.shape();
    let (first, mut tape) = first.try_contiguous()?.split_tape();
    let mut y = host_read(&first);
    let dev = first.device().clone();
    let mut addends = vec![first.ghost()];
    for x in xs {
        if x.shape().concrete() != shape.concrete() {
            return Err(NnError::shape(
                "add_n addend",
                shape.concrete(),
                x.shape().concrete(),
            ));
        }
        let (x, t) = x.try_contiguous()?.split_tape();
        tape = tape.merge(t);
        let xv = host_read(&x);
        y.par_chunks_mut(PIECE)
            .zip(xv.par_chunks(PIECE))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
        addends.push(x.ghost());
    }
    let out = dev.try_tensor_from_vec(y, shape)?;
    let out_id = out.ghost();
    tape.add_backward_op(move |grads| {
        let go = grad_buffer_to_host::<E>(grads.get_or_alloc_mut(&out_id)?)?;
        for x in &addends {
            grad_buffer_apply::<E, _>(grads.get_or_alloc_mut(x)?, |gx| {
                gx.par_chunks_mut(PIECE)
                    .zip(go.par_chunks(PIECE))
                    .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b))
            })?;
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// Inverted dropout: in training, zero each element with probability `p` and scale the rest by
/// 1 / (1 - p); the identity in eval. The mask comes from `ctx.rng`, so runs are reproducible.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
}

impl Dropout {
    pub fn new(p: f64) -> Result<Self, NnError> {
        if !(0.0..1.0).contains(&p) {
            return Err(NnError::spec(
                "dropout",
                format!("probability {p} is not in [0, 1)"),
            ));
        }
        Ok(Self { p })
    }

    pub fn forward<S: Shape, E: Float, T: Tape<E, Dev>>(
        &self,
        x: Tensor<S, E, Dev, T>,
        ctx: &mut ForwardCtx,
    ) -> Result<Tensor<S, E, Dev, T>, NnError>
    where
        Dev: Device<E>,
    {
        if !ctx.training || self.p == 0.0 {
            return Ok(x);
        }
        let keep = E::of_f64(1.0 / (1.0 - self.p));
        let n = x.shape().num_elements();
        let mask: Vec<E> = (0..n)
            .map(|_| {
                if ctx.rng.gen::<f64>() < self.p {
                    E::zero()
                } else {
                    keep
                }
            })
            .collect();
        let mask = super::tensor::from_vec(x.device(), mask, *x.shape())?;
        Ok(x.try_mul(mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, rand_tensor};

    #[test]
    fn relu_and_gelu_gradients_match_finite_differences() {
        let dev = Dev::default();
        // Inputs away from 0 so that ReLU's kink is not straddled by the finite difference.
        let x = rand_tensor(&dev, (3, 5), 7);
        let vals: Vec<f64> = x
            .as_vec()
            .into_iter()
            .map(|v| if v.abs() < 0.05 { v + 0.2 } else { v })
            .collect();
        let x = super::super::tensor::from_vec(&dev, vals, (3, 5)).unwrap();
        check_input_grad(&x, relu, 1e-6);
        check_input_grad(&x, gelu, 1e-6);
    }

    #[test]
    fn add_n_sums_and_gives_each_addend_the_gradient() {
        let dev = Dev::default();
        let (a, b) = (rand_tensor(&dev, (2, 3), 1), rand_tensor(&dev, (2, 3), 2));
        let y = add_n(vec![a.clone(), b.clone(), a.clone()])
            .unwrap()
            .as_vec();
        for ((y, a), b) in y.iter().zip(a.as_vec()).zip(b.as_vec()) {
            assert!((y - (2.0 * a + b)).abs() < 1e-12);
        }
        // The same tensor twice (as two skip edges from one node hand it over), plus another.
        check_input_grad(
            &a,
            |t| {
                let (v, tape) = t.split_tape();
                let twice = v.clone().put_tape(Default::default());
                add_n(vec![
                    v.put_tape(tape),
                    b.clone().put_tape(Default::default()),
                    twice,
                ])
            },
            1e-6,
        );
        assert!(add_n::<(usize,), f64, NoneTape>(vec![]).is_err());
        assert!(add_n(vec![a.clone(), rand_tensor(&dev, (3, 2), 3)]).is_err());
    }

    #[test]
    fn gelu_matches_exact_formula() {
        let dev = Dev::default();
        let x =
            super::super::tensor::from_vec(&dev, vec![-2.0f64, -0.5, 0.0, 0.7, 3.0], (5,)).unwrap();
        let y = gelu(x.clone()).unwrap().as_vec();
        // GELU(x) = x/2 (1 + erf(x/sqrt 2)); erf values from tables.
        let erf = [
            -0.9544997361,
            -0.3829249225,
            0.0,
            0.5160726898,
            0.9973002039,
        ];
        for (i, xi) in x.as_vec().iter().enumerate() {
            let want = 0.5 * xi * (1.0 + erf[i]);
            assert!(
                (y[i] - want).abs() < 1e-6,
                "gelu({xi}) = {} vs {want}",
                y[i]
            );
        }
    }

    #[test]
    fn dropout_scales_kept_values_and_is_seeded() {
        let dev = Dev::default();
        let x = super::super::tensor::from_vec(&dev, vec![1.0f64; 1000], (1000,)).unwrap();
        let d = Dropout::new(0.25).unwrap();
        let a = d
            .forward(x.clone(), &mut ForwardCtx::train(3))
            .unwrap()
            .as_vec();
        let b = d
            .forward(x.clone(), &mut ForwardCtx::train(3))
            .unwrap()
            .as_vec();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|v| **v == 0.0).count();
        assert!((200..300).contains(&zeros), "{zeros} zeros");
        assert!(a
            .iter()
            .all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-12));
        let e = d.forward(x, &mut ForwardCtx::eval()).unwrap().as_vec();
        assert!(e.iter().all(|v| *v == 1.0));
        assert!(Dropout::new(1.0).is_err());
    }
}
