//! Normalisation layers.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use crate::nn::layers::ForwardCtx;
use crate::nn::tensor::impl_has_params;
use crate::nn::{Dev, Float, NnError, Param, ParamKind, Tensor3, Tensor4};

/// Batch normalisation over `(batch, h, w)` per channel (Ioffe & Szegedy 2015, Alg. 1):
/// y = (x - mu) / sqrt(var + eps) * gamma + beta, with the batch's mean and biased variance in
/// training and the running estimates in eval. Running estimates follow PyTorch:
/// r <- (1 - momentum) r + momentum * stat, the variance term unbiased (n / (n - 1)).
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
    pub fn new(dev: &Dev, channels: usize) -> Result<Self, NnError> {
        let p =
            |v: f64, kind| Param::from_vec(dev, vec![E::of_f64(v); channels], vec![channels], kind);
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
        let eps = E::of_f64(self.eps);
        let normed = if ctx.training {
            let n = b * h * w;
            if n < 2 {
                return Err(NnError::shape(
                    "batchnorm in training (needs more than one value per channel)",
                    ">= 2 values per channel",
                    shape,
                ));
            }
            // mu: (c,), taped on a tape of its own that merges back at the subtraction.
            let mean = x.retaped::<T>().try_mean::<(usize,), Axes3<0, 2, 3>>()?;
            let mean_value: crate::nn::Tensor1<E> = mean.retaped::<NoneTape>();
            let centered = x.try_sub(mean.try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?)?;
            let var = centered
                .retaped::<T>()
                .try_square()?
                .try_mean::<(usize,), Axes3<0, 2, 3>>()?;
            let var_value: crate::nn::Tensor1<E> = var.retaped::<NoneTape>();
            let std = var.try_add(eps)?.try_sqrt()?;
            let normed = centered.try_div(std.try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?)?;

            let m = E::of_f64(self.momentum);
            let keep = E::of_f64(1.0 - self.momentum);
            let unbias = E::of_f64(n as f64 / (n as f64 - 1.0));
            let rm = self
                .running_mean
                .vec1()
                .try_mul(keep)?
                .try_add(mean_value.try_mul(m)?)?;
            let rv = self
                .running_var
                .vec1()
                .try_mul(keep)?
                .try_add(var_value.try_mul(m * unbias)?)?;
            self.running_mean.value = rm;
            self.running_var.value = rv;
            normed
        } else {
            let mean = self
                .running_mean
                .vec1()
                .try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?;
            let std = self.running_var.vec1().try_add(eps)?.try_sqrt()?;
            x.try_sub(mean)?
                .try_div(std.try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?)?
        };
        let gamma = self
            .weight
            .vec1()
            .try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?;
        let beta = self
            .bias
            .vec1()
            .try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?;
        Ok(normed.try_mul(gamma)?.try_add(beta)?)
    }
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
    pub fn new(dev: &Dev, features: usize) -> Result<Self, NnError> {
        let p = |v: f64| {
            Param::from_vec(
                dev,
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
    use crate::nn::gradcheck::{check_input_grad, check_param_grads, rand_tensor};

    #[test]
    fn batchnorm_training_normalises_and_tracks_running_stats() {
        let dev = Dev::default();
        let mut bn = BatchNorm2d::<f64>::new(&dev, 2).unwrap();
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
        let mut bn = BatchNorm2d::<f64>::new(&dev, 2).unwrap();
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
        let mut ln = LayerNorm::<f64>::new(&dev, 4).unwrap();
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
