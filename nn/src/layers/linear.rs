//! Fully connected layer.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use crate::tensor::impl_has_params;
use crate::{Dev, Float, NnError, Param, ParamKind, Tensor2, Tensor3, VarBuilder};

/// y = x W^T + b, W: `(out, in)` (PyTorch's layout), b: `(out,)`.
#[derive(Clone, Debug)]
pub struct Linear<E: Float> {
    pub weight: Param<E>,
    pub bias: Option<Param<E>>,
}
impl_has_params!(Linear { weight, bias });

impl<E: Float> Linear<E>
where
    Dev: Device<E>,
{
    /// `in_features -> out_features` with a bias; weights from `vb`'s init.
    pub fn new(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Self, NnError> {
        Self::build(in_features, out_features, true, vb)
    }

    /// `in_features -> out_features` without a bias.
    pub fn no_bias(
        in_features: usize,
        out_features: usize,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        Self::build(in_features, out_features, false, vb)
    }

    fn build(
        in_features: usize,
        out_features: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        if in_features == 0 || out_features == 0 {
            return Err(NnError::spec(
                vb.name(),
                "a linear layer needs at least one input and output",
            ));
        }
        let w = vb.linear_weights(in_features, out_features, in_features * out_features);
        let weight = vb.param(w, vec![out_features, in_features], ParamKind::Trainable)?;
        let bias = if bias {
            let b = vb.linear_biases(in_features, out_features, out_features);
            Some(vb.param(b, vec![out_features], ParamKind::Trainable)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    /// `(batch, in)` -> `(batch, out)`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor2<E, T>) -> Result<Tensor2<E, T>, NnError> {
        let (b, k) = *x.shape();
        if k != self.in_features() {
            return Err(NnError::shape(
                "linear input features",
                self.in_features(),
                k,
            ));
        }
        let wt = self.weight.mat2()?.try_permute::<_, Axes2<1, 0>>()?;
        let y = x.try_matmul(wt)?;
        match &self.bias {
            Some(bias) => {
                let shape = (b, self.out_features());
                Ok(y.try_add(bias.vec1().try_broadcast_like::<_, Axis<0>>(&shape)?)?)
            }
            None => Ok(y),
        }
    }

    /// `(batch, tokens, in)` -> `(batch, tokens, out)`, the same map on every token.
    pub fn forward3<T: Tape<E, Dev>>(&self, x: Tensor3<E, T>) -> Result<Tensor3<E, T>, NnError> {
        let (b, n, k) = *x.shape();
        let y = self.forward(x.try_reshape_like(&(b * n, k))?)?;
        Ok(y.try_reshape_like(&(b, n, self.out_features()))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use crate::{collect_params, Init, InitScheme};

    fn layer(bias: bool) -> Linear<f64> {
        let (dev, init) = (Dev::default(), Init::default());
        let vb = VarBuilder::new(&dev, &init, 0).pp("fc");
        if bias {
            Linear::new(4, 3, vb).unwrap()
        } else {
            Linear::no_bias(4, 3, vb).unwrap()
        }
    }

    #[test]
    fn computes_x_wt_plus_b() {
        let dev = Dev::default();
        let l = layer(true);
        let x = rand_tensor(&dev, (2, 4), 1);
        let y = l.forward(x.clone()).unwrap().as_vec();
        let (w, b, xv) = (
            l.weight.to_vec(),
            l.bias.as_ref().unwrap().to_vec(),
            x.as_vec(),
        );
        for r in 0..2 {
            for o in 0..3 {
                let want: f64 = (0..4).map(|i| xv[r * 4 + i] * w[o * 4 + i]).sum::<f64>() + b[o];
                assert!((y[r * 3 + o] - want).abs() < 1e-12);
            }
        }
        let names: Vec<String> = collect_params(&l).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight", "bias"]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Dev::default();
        let mut l = layer(true);
        let x = rand_tensor(&dev, (2, 4), 2);
        check_input_grad(&x, |t| l.forward(t), 1e-6);
        check_param_grads(&mut l, &x, |m, t| m.forward(t), 12, 1e-6);
        let x3 = rand_tensor(&dev, (2, 3, 4), 3);
        check_param_grads(&mut l, &x3, |m, t| m.forward3(t), 12, 1e-6);
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let l = layer(false);
        let x = rand_tensor(&Dev::default(), (2, 5), 1);
        assert!(matches!(l.forward(x), Err(NnError::Shape { .. })));
        let (dev, init) = (Dev::default(), Init::new(InitScheme::KaimingNormal));
        let e = Linear::<f64>::new(0, 3, VarBuilder::new(&dev, &init, 0).pp("x")).unwrap_err();
        assert!(matches!(e, NnError::InvalidSpec { field, .. } if field == "x"));
    }
}
