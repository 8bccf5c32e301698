//! Weight initialisation schemes, and the hook through which an architecture-aware scheme
//! (`docs/methods/arch-aware.md` §2) supplies per-layer variances.

use std::fmt;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use super::Float;

/// The base scheme for weights that the hook (if any) leaves alone.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// PyTorch's default: `kaiming_uniform_(a = sqrt(5))`, i.e. W ~ U(-1/sqrt(fan_in),
    /// 1/sqrt(fan_in)); biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    #[default]
    Default,
    /// He et al. 2015, fan-in mode for ReLU: W ~ N(0, 2 / fan_in); biases 0.
    KaimingNormal,
}

/// Supplies the variance of a layer's weights from outside (the architecture-aware init).
///
/// `layer` is the dotted name of the layer (`cell.edges.3.linear`), `fan_in`/`fan_out` its
/// fans (for a convolution, channels times kernel area). `Some(v)` draws W ~ N(0, v) and zero
/// biases; `None` falls back to the base [`InitScheme`].
pub trait VarianceHook: Send + Sync {
    fn weight_variance(&self, layer: &str, fan_in: usize, fan_out: usize) -> Option<f64>;
}

impl<F> VarianceHook for F
where
    F: Fn(&str, usize, usize) -> Option<f64> + Send + Sync,
{
    fn weight_variance(&self, layer: &str, fan_in: usize, fan_out: usize) -> Option<f64> {
        self(layer, fan_in, fan_out)
    }
}

/// How a model's parameters are drawn: a base scheme plus an optional per-layer hook.
#[derive(Clone, Default)]
pub struct Init {
    pub scheme: InitScheme,
    pub hook: Option<Arc<dyn VarianceHook>>,
    /// Linear layers only: W ~ N(0, std^2) truncated to [-2, 2] (timm's and PyTorch's
    /// `trunc_normal_(std=std)` bounds are absolute, not in units of std), biases 0; the hook
    /// and `scheme` still apply to every other layer (convolutions, norms).
    pub linear_trunc_normal: Option<f64>,
}

impl fmt::Debug for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Init")
            .field("scheme", &self.scheme)
            .field("hook", &self.hook.as_ref().map(|_| "<hook>"))
            .field("linear_trunc_normal", &self.linear_trunc_normal)
            .finish()
    }
}

impl Init {
    pub fn new(scheme: InitScheme) -> Self {
        Self {
            scheme,
            hook: None,
            linear_trunc_normal: None,
        }
    }

    /// This init with every Linear weight drawn from a truncated normal of `std` and zero
    /// Linear biases (the ViT reference init: VITA-Group/AsViT `transformer.py` `_init_weights`).
    pub fn with_linear_trunc_normal(mut self, std: f64) -> Self {
        self.linear_trunc_normal = Some(std);
        self
    }

    /// `numel` weights of the Linear layer `layer`: the truncated normal if set, else as
    /// [`Self::weights`].
    pub fn linear_weights<E: Float>(
        &self,
        layer: &str,
        fan_in: usize,
        fan_out: usize,
        numel: usize,
        rng: &mut StdRng,
    ) -> Vec<E> {
        match self.linear_trunc_normal {
            Some(std) => truncated_normal(std, TRUNC_BOUND, numel, rng),
            None => self.weights(layer, fan_in, fan_out, numel, rng),
        }
    }

    /// `numel` biases of the Linear layer `layer`: zero under the truncated normal, else as
    /// [`Self::biases`].
    pub fn linear_biases<E: Float>(
        &self,
        layer: &str,
        fan_in: usize,
        fan_out: usize,
        numel: usize,
        rng: &mut StdRng,
    ) -> Vec<E> {
        match self.linear_trunc_normal {
            Some(_) => vec![E::zero(); numel],
            None => self.biases(layer, fan_in, fan_out, numel, rng),
        }
    }

    pub fn with_hook(mut self, hook: Arc<dyn VarianceHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    fn hooked_variance(&self, layer: &str, fan_in: usize, fan_out: usize) -> Option<f64> {
        self.hook
            .as_ref()
            .and_then(|h| h.weight_variance(layer, fan_in, fan_out))
    }

    /// `numel` weights of `layer`, drawn by the hook's variance or the base scheme.
    pub fn weights<E: Float>(
        &self,
        layer: &str,
        fan_in: usize,
        fan_out: usize,
        numel: usize,
        rng: &mut StdRng,
    ) -> Vec<E> {
        let fan_in = fan_in.max(1) as f64;
        if let Some(var) = self.hooked_variance(layer, fan_in as usize, fan_out) {
            return normal(var.max(0.0).sqrt(), numel, rng);
        }
        match self.scheme {
            InitScheme::Default => uniform(1.0 / fan_in.sqrt(), numel, rng),
            InitScheme::KaimingNormal => normal((2.0 / fan_in).sqrt(), numel, rng),
        }
    }

    /// `numel` biases of `layer`; zero whenever the weights are normal (hook or kaiming).
    pub fn biases<E: Float>(
        &self,
        layer: &str,
        fan_in: usize,
        fan_out: usize,
        numel: usize,
        rng: &mut StdRng,
    ) -> Vec<E> {
        if self.hooked_variance(layer, fan_in, fan_out).is_some() {
            return vec![E::zero(); numel];
        }
        match self.scheme {
            InitScheme::Default => uniform(1.0 / (fan_in.max(1) as f64).sqrt(), numel, rng),
            InitScheme::KaimingNormal => vec![E::zero(); numel],
        }
    }
}

/// `n` draws from U(-bound, bound).
pub(crate) fn uniform<E: Float>(bound: f64, n: usize, rng: &mut StdRng) -> Vec<E> {
    if bound <= 0.0 {
        return vec![E::zero(); n];
    }
    let d = Uniform::new(-bound, bound);
    (0..n).map(|_| E::of_f64(d.sample(rng))).collect()
}

/// The absolute truncation bound of `trunc_normal_` (its defaults a = -2, b = 2).
const TRUNC_BOUND: f64 = 2.0;

/// `n` draws from N(0, std^2) conditioned on |x| <= bound (redrawn until inside).
pub(crate) fn truncated_normal<E: Float>(
    std: f64,
    bound: f64,
    n: usize,
    rng: &mut StdRng,
) -> Vec<E> {
    let Ok(d) = Normal::new(0.0, std) else {
        return vec![E::zero(); n];
    };
    if std <= 0.0 {
        return vec![E::zero(); n];
    }
    (0..n)
        .map(|_| loop {
            let x: f64 = d.sample(rng);
            if x.abs() <= bound {
                break E::of_f64(x);
            }
        })
        .collect()
}

/// `n` draws from N(0, std^2).
pub(crate) fn normal<E: Float>(std: f64, n: usize, rng: &mut StdRng) -> Vec<E> {
    match Normal::new(0.0, std) {
        Ok(d) if std > 0.0 => (0..n).map(|_| E::of_f64(d.sample(rng))).collect(),
        _ => vec![E::zero(); n],
    }
}

/// `n` draws from U[0, 1) scaled by `scale`.
pub(crate) fn unit_uniform<E: Float>(scale: f64, n: usize, rng: &mut StdRng) -> Vec<E> {
    (0..n)
        .map(|_| E::of_f64(scale * rng.gen::<f64>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn mean_var(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        (m, v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n)
    }

    #[test]
    fn schemes_have_their_variance() {
        let mut rng = StdRng::seed_from_u64(1);
        let fan_in = 50;
        let d: Vec<f64> = Init::new(InitScheme::Default).weights("l", fan_in, 10, 20000, &mut rng);
        let (_, v) = mean_var(&d);
        // U(-b, b) has variance b^2 / 3 with b = 1/sqrt(fan_in).
        assert!((v - 1.0 / (3.0 * fan_in as f64)).abs() < 0.1 / (3.0 * fan_in as f64));
        assert!(d.iter().all(|x| x.abs() <= 1.0 / (fan_in as f64).sqrt()));

        let k: Vec<f64> =
            Init::new(InitScheme::KaimingNormal).weights("l", fan_in, 10, 20000, &mut rng);
        let (m, v) = mean_var(&k);
        assert!(m.abs() < 0.01);
        assert!((v - 2.0 / fan_in as f64).abs() < 0.1 * 2.0 / fan_in as f64);
    }

    #[test]
    fn truncated_normal_has_its_std_and_bound() {
        let mut rng = StdRng::seed_from_u64(3);
        let init = Init::default().with_linear_trunc_normal(0.02);
        let w: Vec<f64> = init.linear_weights("l", 10, 10, 20000, &mut rng);
        let (m, v) = mean_var(&w);
        assert!(
            m.abs() < 1e-3 && (v.sqrt() - 0.02).abs() < 0.001,
            "{m} {}",
            v.sqrt()
        );
        let b: Vec<f64> = init.linear_biases("l", 10, 10, 5, &mut rng);
        assert!(b.iter().all(|x| *x == 0.0));
        // A wide normal shows the bound: nothing outside [-2, 2].
        let wide: Vec<f64> = truncated_normal(3.0, TRUNC_BOUND, 5000, &mut rng);
        assert!(wide.iter().all(|x| x.abs() <= 2.0));
        // Other layers keep the base scheme.
        let conv: Vec<f64> = init.weights("c", 50, 10, 1000, &mut rng);
        assert!(conv.iter().all(|x| x.abs() <= 1.0 / 50f64.sqrt()));
    }

    #[test]
    fn hook_overrides_named_layers_only() {
        let hook = |layer: &str, _fi: usize, _fo: usize| (layer == "a").then_some(4.0);
        let init = Init::new(InitScheme::Default).with_hook(Arc::new(hook));
        let mut rng = StdRng::seed_from_u64(2);
        let a: Vec<f64> = init.weights("a", 100, 10, 20000, &mut rng);
        let (_, v) = mean_var(&a);
        assert!((v - 4.0).abs() < 0.2, "hooked variance {v}");
        let b: Vec<f64> = init.weights("b", 100, 10, 1000, &mut rng);
        assert!(b.iter().all(|x| x.abs() <= 0.1));
        let bias: Vec<f64> = init.biases("a", 100, 10, 5, &mut rng);
        assert!(bias.iter().all(|x| *x == 0.0));
    }
}
