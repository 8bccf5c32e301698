//! Fully connected layer.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rand::rngs::StdRng;

use crate::tensor::impl_has_params;
use crate::{Dev, Float, Init, NnError, Param, ParamKind, Tensor2, Tensor3};

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
    /// `name` is the layer's dotted name, passed to the init hook.
    pub fn new(
        dev: &Dev,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        init: &Init,
        rng: &mut StdRng,
    ) -> Result<Self, NnError> {
        if in_features == 0 || out_features == 0 {
            return Err(NnError::spec(
                name,
                "a linear layer needs at least one input and output",
            ));
        }
        let w = init.weights(
            name,
            in_features,
            out_features,
            in_features * out_features,
            rng,
        );
        let weight = Param::from_vec(
            dev,
            w,
            vec![out_features, in_features],
            ParamKind::Trainable,
        )?;
        let bias = if bias {
            let b = init.biases(name, in_features, out_features, out_features, rng);
            Some(Param::from_vec(
                dev,
                b,
                vec![out_features],
                ParamKind::Trainable,
            )?)
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
    use crate::{collect_params, InitScheme};
    use rand::SeedableRng;

    fn layer(bias: bool) -> Linear<f64> {
        let mut rng = StdRng::seed_from_u64(0);
        Linear::new(
            &Dev::default(),
            "fc",
            4,
            3,
            bias,
            &Init::default(),
            &mut rng,
        )
        .unwrap()
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
        let mut rng = StdRng::seed_from_u64(0);
        let init = Init::new(InitScheme::KaimingNormal);
        assert!(Linear::<f64>::new(&Dev::default(), "x", 0, 3, true, &init, &mut rng).is_err());
    }
}
