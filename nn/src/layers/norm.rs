//! Normalisation layers.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rayon::prelude::*;

use crate::layers::ForwardCtx;
use crate::tensor::{
    grad_buffer_apply, grad_buffer_to_host, host_read, impl_has_params, with_grad_mut,
};
use crate::{Dev, Float, NnError, Param, ParamKind, Tensor3, Tensor4, VarBuilder};

/// Batch normalisation over `(batch, h, w)` per channel (Ioffe & Szegedy 2015, Alg. 1):
/// y = (x - mu) / sqrt(var + eps) * gamma + beta, with the batch's mean and biased variance in
/// training and the running estimates in eval. Running estimates follow PyTorch:
/// r <- (1 - momentum) r + momentum * stat, the variance term unbiased (n / (n - 1)).
///
/// One fused host op, forward and backward (dfdx's broadcast ops would store about ten
/// activation-sized temporaries and their gradients per layer); on CUDA it copies through the
/// host (slow path).
#[derive(Clone, Debug)]
pub struct BatchNorm2d<E: Float> {
    pub weight: Param<E>,
    pub bias: Param<E>,
    pub running_mean: Param<E>,
    pub running_var: Param<E>,
    pub momentum: f64,
    pub eps: f64,
}
impl_has_params!(BatchNorm2d {
    weight,
    bias,
    running_mean,
    running_var
});

impl<E: Float> BatchNorm2d<E>
where
    Dev: Device<E>,
{
    /// gamma = 1, beta = 0, running mean 0 and variance 1; momentum 0.1, eps 1e-5.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let p = |v: f64, kind| vb.param(vec![E::of_f64(v); channels], vec![channels], kind);
        Ok(Self {
            weight: p(1.0, ParamKind::Trainable)?,
            bias: p(0.0, ParamKind::Trainable)?,
            running_mean: p(0.0, ParamKind::Buffer)?,
            running_var: p(1.0, ParamKind::Buffer)?,
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    pub fn channels(&self) -> usize {
        self.weight.shape[0]
    }

    /// `(batch, c, h, w)` -> same shape.
    pub fn forward<T: Tape<E, Dev>>(
        &mut self,
        x: Tensor4<E, T>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor4<E, T>, NnError> {
        let shape = *x.shape();
        let (b, c, h, w) = shape;
        if c != self.channels() {
            return Err(NnError::shape("batchnorm channels", self.channels(), c));
        }
        let (hw, n) = (h * w, b * h * w);
        if ctx.training && n < 2 {
            return Err(NnError::shape(
                "batchnorm in training (needs more than one value per channel)",
                ">= 2 values per channel",
                shape,
            ));
        }
        let x = x.try_contiguous()?;
        let (x, mut tape) = x.split_tape();
        let xv = host_read(&x);
        // The op keeps its host copy of x for backward; of the tensors only the ids.
        let (dev, x) = (x.device().clone(), x.ghost());
        let (mean, inv_std) = if ctx.training {
            self.batch_stats(&xv, b, c, hw)?
        } else {
            self.running_stats()
        };
        let saved = BatchNormSaved {
            xv,
            gamma: host_read(&self.weight.value),
            mean,
            inv_std,
            b,
            c,
            hw,
            n,
            training: ctx.training,
        };
        let y = saved.normalise(&host_read(&self.bias.value));
        let out = dev.try_tensor_from_vec(y, shape)?;
        let out_id = out.ghost();
        let (weight, bias) = (self.weight.value.clone(), self.bias.value.clone());
        // Backward (Ioffe & Szegedy 2015, Sec. 3), x_hat = (x - mu) inv_std, sums over (b, h, w):
        // dbeta = sum dy, dgamma = sum dy x_hat, and in training
        // dx = gamma inv_std (dy - dbeta / n - x_hat dgamma / n); in eval dx = gamma inv_std dy.
        tape.add_backward_op(move |grads| {
            let go = grad_buffer_to_host::<E>(grads.get_or_alloc_mut(&out_id)?)?;
            let sums = saved.grad_sums(&go);
            grad_buffer_apply::<E, _>(grads.get_or_alloc_mut(&x)?, |gx| {
                saved.add_input_grad(gx, &go, &sums)
            })?;
            with_grad_mut(grads, &weight, |gw| {
                for (g, s) in gw.iter_mut().zip(&sums) {
                    *g += E::of_f64(s.1);
                }
            })?;
            with_grad_mut(grads, &bias, |gb| {
                for (g, s) in gb.iter_mut().zip(&sums) {
                    *g += E::of_f64(s.0);
                }
            })?;
            Ok(())
        });
        Ok(out.put_tape(tape))
    }

    /// Training: per-channel mean and 1 / sqrt(var + eps) of the batch (biased variance, two
    /// passes over each channel, partial sums in the float type flushed into f64, see
    /// `lane_sum`), folding them into the running estimates on the way.
    fn batch_stats(
        &mut self,
        xv: &[E],
        b: usize,
        c: usize,
        hw: usize,
    ) -> Result<(Vec<f64>, Vec<f64>), NnError> {
        let n = b * hw;
        let stats: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let planes = || (0..b).map(|i| &xv[(i * c + ch) * hw..][..hw]);
                let mean = lane_sum(planes(), |v| v) / n as f64;
                let m = E::of_f64(mean);
                let ss = lane_sum(planes(), |v| (v - m) * (v - m));
                (mean, ss / n as f64)
            })
            .collect();
        let m = self.momentum;
        let unbias = n as f64 / (n as f64 - 1.0);
        let rm: Vec<E> = (host_read(&self.running_mean.value).iter())
            .zip(&stats)
            .map(|(r, s)| E::of_f64((1.0 - m) * r.into_f64() + m * s.0))
            .collect();
        let rv: Vec<E> = (host_read(&self.running_var.value).iter())
            .zip(&stats)
            .map(|(r, s)| E::of_f64((1.0 - m) * r.into_f64() + m * unbias * s.1))
            .collect();
        self.running_mean.set_vec(rm)?;
        self.running_var.set_vec(rv)?;
        Ok(stats
            .iter()
            .map(|&(mu, var)| (mu, 1.0 / (var + self.eps).sqrt()))
            .unzip())
    }

    /// Eval: per-channel mean and 1 / sqrt(var + eps) from the running estimates.
    fn running_stats(&self) -> (Vec<f64>, Vec<f64>) {
        let rm = host_read(&self.running_mean.value);
        let rv = host_read(&self.running_var.value);
        rm.iter()
            .zip(&rv)
            .map(|(m, v)| (m.into_f64(), 1.0 / (v.into_f64() + self.eps).sqrt()))
            .unzip()
    }
}

/// What [`BatchNorm2d::forward`] keeps for its backward op: the host copy of x `(b, c, hw)`,
/// gamma as of the forward, and the per-channel statistics it normalised with.
struct BatchNormSaved<E> {
    xv: Vec<E>,
    gamma: Vec<E>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    b: usize,
    c: usize,
    hw: usize,
    /// Values per channel, `b * hw`.
    n: usize,
    training: bool,
}

impl<E: Float> BatchNormSaved<E> {
    /// y = (x - mu) inv_std gamma + beta, `(b, c, hw)`.
    fn normalise(&self, beta: &[E]) -> Vec<E> {
        let BatchNormSaved {
            xv,
            gamma,
            mean,
            inv_std,
            c,
            hw,
            ..
        } = self;
        let (c, hw) = (*c, *hw);
        // y = (x - mu) inv_std gamma + beta = x scale + shift, per channel.
        let scale: Vec<E> = (0..c)
            .map(|ch| E::of_f64(inv_std[ch] * gamma[ch].into_f64()))
            .collect();
        let shift: Vec<E> = (0..c)
            .map(|ch| {
                E::of_f64(beta[ch].into_f64() - mean[ch] * inv_std[ch] * gamma[ch].into_f64())
            })
            .collect();
        let mut y = Vec::with_capacity(xv.len());
        y.spare_capacity_mut()
            .par_chunks_mut(hw)
            .zip(xv.par_chunks(hw))
            .enumerate()
            .for_each(|(plane, (yp, xp))| {
                let (a, s) = (scale[plane % c], shift[plane % c]);
                for (yv, &xi) in yp.iter_mut().zip(xp) {
                    yv.write(xi * a + s);
                }
            });
        // SAFETY: the planes cover all of `y`'s capacity, each entry written above.
        unsafe { y.set_len(xv.len()) };
        y
    }

    /// Per channel (sum dy, sum dy x_hat) of the output gradient `go`, as in `lane_sum`.
    fn grad_sums(&self, go: &[E]) -> Vec<(f64, f64)> {
        let (b, c, hw, xv) = (self.b, self.c, self.hw, &self.xv);
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let planes = (0..b).map(|i| {
                    let at = (i * c + ch) * hw;
                    (&go[at..at + hw], &xv[at..at + hw])
                });
                lane_sum2(planes, E::of_f64(self.mean[ch]))
            })
            .collect();
        sums.iter()
            .zip(&self.inv_std)
            .map(|(&(sdy, sdyxm), &is)| (sdy, sdyxm * is))
            .collect()
    }

    /// gx += dx, from the output gradient `go` and its [`BatchNormSaved::grad_sums`].
    fn add_input_grad(&self, gx: &mut [E], go: &[E], sums: &[(f64, f64)]) {
        let (c, hw, n) = (self.c, self.hw, self.n);
        gx.par_chunks_mut(hw)
            .zip(self.xv.par_chunks(hw))
            .zip(go.par_chunks(hw))
            .enumerate()
            .for_each(|(plane, ((gp, xp), gop))| {
                let ch = plane % c;
                let (mu, is) = (self.mean[ch], self.inv_std[ch]);
                let k = self.gamma[ch].into_f64() * is;
                if self.training {
                    let (mdy, mdyx) = (sums[ch].0 / n as f64, sums[ch].1 / n as f64);
                    // dx = k dy - k mdy - k is mdyx (x - mu) = a dy + b x + d
                    let (a, bx) = (E::of_f64(k), E::of_f64(-k * is * mdyx));
                    let d = E::of_f64(-k * mdy + k * is * mdyx * mu);
                    for ((gv, &xi), &g) in gp.iter_mut().zip(xp).zip(gop) {
                        *gv += a * g + bx * xi + d;
                    }
                } else {
                    let a = E::of_f64(k);
                    for (gv, &g) in gp.iter_mut().zip(gop) {
                        *gv += a * g;
                    }
                }
            })
    }
}

/// Lanes of a vectorised sum: enough independent accumulators to fill two AVX registers of f32.
const LANES: usize = 16;
/// Values summed in the float type's lanes before the lanes are added into the f64 total:
/// bounds the float type's rounding error (a few hundred adds per lane), however many planes.
const FLUSH: usize = 4096;

/// sum of f(v) over the values of `planes`: `LANES` partial sums in the float type
/// (vectorisable), added into an f64 total at least every `FLUSH` values. The grouping depends
/// only on the plane sizes, so the result is the same on any number of threads.
#[inline]
fn lane_sum<'a, E: Float>(planes: impl Iterator<Item = &'a [E]>, f: impl Fn(E) -> E) -> f64 {
    let (mut acc, mut total, mut pending) = ([E::zero(); LANES], 0.0, 0);
    for plane in planes {
        let (pieces, tail) = plane.as_chunks::<LANES>();
        for piece in pieces {
            for i in 0..LANES {
                acc[i] += f(piece[i]);
            }
        }
        total += tail.iter().map(|&v| f(v).into_f64()).sum::<f64>();
        pending += plane.len();
        if pending >= FLUSH {
            total += acc.iter().map(|a| a.into_f64()).sum::<f64>();
            (acc, pending) = ([E::zero(); LANES], 0);
        }
    }
    total + acc.iter().map(|a| a.into_f64()).sum::<f64>()
}

/// (sum g, sum g (x - m)) over pairs of planes (g, x), like [`lane_sum`].
#[inline]
fn lane_sum2<'a, E: Float>(planes: impl Iterator<Item = (&'a [E], &'a [E])>, m: E) -> (f64, f64) {
    let (mut s, mut t) = ([E::zero(); LANES], [E::zero(); LANES]);
    let (mut s64, mut t64, mut pending) = (0.0, 0.0, 0);
    let flush = |lanes: &mut [E; LANES]| {
        let sum = lanes.iter().map(|a| a.into_f64()).sum::<f64>();
        *lanes = [E::zero(); LANES];
        sum
    };
    for (g, x) in planes {
        let (gp, gt) = g.as_chunks::<LANES>();
        let (xp, xt) = x[..g.len()].as_chunks::<LANES>();
        for (gv, xv) in gp.iter().zip(xp) {
            for i in 0..LANES {
                s[i] += gv[i];
                t[i] += gv[i] * (xv[i] - m);
            }
        }
        for (&gv, &xv) in gt.iter().zip(xt) {
            s64 += gv.into_f64();
            t64 += (gv * (xv - m)).into_f64();
        }
        pending += g.len();
        if pending >= FLUSH {
            s64 += flush(&mut s);
            t64 += flush(&mut t);
            pending = 0;
        }
    }
    (s64 + flush(&mut s), t64 + flush(&mut t))
}

/// Layer normalisation over the last axis (Ba et al. 2016):
/// y = (x - mean) / sqrt(var + eps) * gamma + beta, per token.
#[derive(Clone, Debug)]
pub struct LayerNorm<E: Float> {
    pub weight: Param<E>,
    pub bias: Param<E>,
    pub eps: f64,
}
impl_has_params!(LayerNorm { weight, bias });

impl<E: Float> LayerNorm<E>
where
    Dev: Device<E>,
{
    /// gamma = 1, beta = 0, eps 1e-5.
    pub fn new(features: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let p = |v: f64| {
            vb.param(
                vec![E::of_f64(v); features],
                vec![features],
                ParamKind::Trainable,
            )
        };
        Ok(Self {
            weight: p(1.0)?,
            bias: p(0.0)?,
            eps: 1e-5,
        })
    }

    /// `(batch, tokens, d)` -> same shape.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor3<E, T>) -> Result<Tensor3<E, T>, NnError> {
        let shape = *x.shape();
        if shape.2 != self.weight.shape[0] {
            return Err(NnError::shape(
                "layernorm features",
                self.weight.shape[0],
                shape.2,
            ));
        }
        let normed = x.try_normalize::<Axis<2>>(self.eps)?;
        let gamma = self
            .weight
            .vec1()
            .try_broadcast_like::<_, Axes2<0, 1>>(&shape)?;
        let beta = self
            .bias
            .vec1()
            .try_broadcast_like::<_, Axes2<0, 1>>(&shape)?;
        Ok(normed.try_mul(gamma)?.try_add(beta)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use crate::Init;

    #[test]
    fn batchnorm_training_normalises_and_tracks_running_stats() {
        let dev = Dev::default();
        let mut bn =
            BatchNorm2d::<f64>::new(2, VarBuilder::new(&dev, &Init::default(), 0)).unwrap();
        let x = rand_tensor(&dev, (4, 2, 3, 3), 1)
            .try_mul(3.0)
            .unwrap()
            .try_add(5.0)
            .unwrap();
        let y = bn
            .forward(x.clone(), &ForwardCtx::train(0))
            .unwrap()
            .as_vec();
        let xv = x.as_vec();
        for c in 0..2 {
            let idx: Vec<usize> = (0..4)
                .flat_map(|b| (0..9).map(move |k| (b * 2 + c) * 9 + k))
                .collect();
            let n = idx.len() as f64;
            let ym = idx.iter().map(|&i| y[i]).sum::<f64>() / n;
            let yv = idx.iter().map(|&i| (y[i] - ym).powi(2)).sum::<f64>() / n;
            assert!(
                ym.abs() < 1e-10 && (yv - 1.0).abs() < 1e-3,
                "channel {c}: {ym} {yv}"
            );
            let xm = idx.iter().map(|&i| xv[i]).sum::<f64>() / n;
            let xvar = idx.iter().map(|&i| (xv[i] - xm).powi(2)).sum::<f64>() / (n - 1.0);
            let rm = bn.running_mean.to_vec()[c];
            let rv = bn.running_var.to_vec()[c];
            assert!((rm - 0.1 * xm).abs() < 1e-10);
            assert!((rv - (0.9 + 0.1 * xvar)).abs() < 1e-10);
        }
        // Eval uses the running statistics.
        let e = bn.forward(x, &ForwardCtx::eval()).unwrap().as_vec();
        let (rm, rv) = (bn.running_mean.to_vec()[0], bn.running_var.to_vec()[0]);
        assert!((e[0] - (xv[0] - rm) / (rv + 1e-5).sqrt()).abs() < 1e-10);
    }

    #[test]
    fn batchnorm_gradients_match_finite_differences() {
        let dev = Dev::default();
        let mut bn =
            BatchNorm2d::<f64>::new(2, VarBuilder::new(&dev, &Init::default(), 0)).unwrap();
        // Non-trivial gamma and beta so their gradients are tested away from identity.
        bn.weight.set_vec(vec![1.5, 0.7]).unwrap();
        bn.bias.set_vec(vec![0.1, -0.3]).unwrap();
        let x = rand_tensor(&dev, (3, 2, 2, 2), 2);
        let train = ForwardCtx::train(0);
        let probe = bn.clone();
        check_input_grad(&x, |t| probe.clone().forward(t, &train), 1e-5);
        check_param_grads(&mut bn, &x, |m, t| m.forward(t, &train), 4, 1e-5);
        let eval = ForwardCtx::eval();
        check_input_grad(&x, |t| probe.clone().forward(t, &eval), 1e-6);
    }

    #[test]
    fn layernorm_matches_formula_and_gradients() {
        let dev = Dev::default();
        let mut ln = LayerNorm::<f64>::new(4, VarBuilder::new(&dev, &Init::default(), 0)).unwrap();
        ln.weight.set_vec(vec![1.0, 2.0, 0.5, -1.0]).unwrap();
        ln.bias.set_vec(vec![0.0, 0.1, 0.2, 0.3]).unwrap();
        let x = rand_tensor(&dev, (2, 3, 4), 3);
        let y = ln.forward(x.clone()).unwrap().as_vec();
        let xv = x.as_vec();
        let (g, b) = (ln.weight.to_vec(), ln.bias.to_vec());
        for t in 0..6 {
            let row = &xv[t * 4..t * 4 + 4];
            let m = row.iter().sum::<f64>() / 4.0;
            let v = row.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 4.0;
            for k in 0..4 {
                let want = (row[k] - m) / (v + 1e-5).sqrt() * g[k] + b[k];
                assert!((y[t * 4 + k] - want).abs() < 1e-10);
            }
        }
        check_input_grad(&x, |t| ln.forward(t), 1e-5);
        check_param_grads(&mut ln, &x, |m, t| m.forward(t), 4, 1e-6);
    }
}
