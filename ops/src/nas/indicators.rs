//! Training-free indicators of an architecture at initialization
//! (`docs/methods/training-free-nas.md` §2). Each is a plain function of a supernet
//! ([`OpSets`]; a single cell is a supernet with one op per edge), a network shape, inputs and a
//! seed; each returns a value or a typed [`Failure`], never a made-up 0.
//!
//! As-ViT's length distortion (`docs/methods/asvit.md` §2) is measured on `vit` models, in
//! [`super::vit_space`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::linalg::{cholesky, cholesky_logdet, cholesky_solve, cross, eigenvalues, gram};
use super::net::{NetConfig, ParamSet, ProxyNet, SignRecorder};
use super::space::OpSets;
use crate::seed::derive_seed;
use nn::layers::ForwardCtx;
use nn::{open_device, Dev, NnError, Tensor4};

/// The indicators a search can use.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    /// NTK condition number kappa (trainability; lower is better).
    Ntk,
    /// Number of linear regions R (expressivity; higher is better).
    Regions,
    /// NTK kernel-regression error G (generalization; lower is better).
    Generalization,
    /// NASWOT log|det K_H| (higher is better).
    Naswot,
    /// As-ViT length distortion L_E of a `vit` model (higher is better; `docs/methods/asvit.md`
    /// §2).
    LengthDistortion,
}

impl Indicator {
    /// The indicators of the NB201 space (length distortion needs a `vit` model).
    pub const ALL: [Indicator; 4] = [
        Indicator::Ntk,
        Indicator::Regions,
        Indicator::Generalization,
        Indicator::Naswot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Indicator::Ntk => "ntk",
            Indicator::Regions => "regions",
            Indicator::Generalization => "generalization",
            Indicator::Naswot => "naswot",
            Indicator::LengthDistortion => "length_distortion",
        }
    }

    /// `docs/methods/training-free-nas.md` §3: kappa and G ascending, R (and NASWOT) descending.
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Indicator::Regions | Indicator::Naswot | Indicator::LengthDistortion
        )
    }
}

/// Why an indicator has no value for an architecture.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("{indicator}: non-finite value {value}")]
    NonFinite { indicator: &'static str, value: f64 },
    #[error("{indicator}: singular kernel ({detail})")]
    Singular {
        indicator: &'static str,
        detail: String,
    },
    #[error("{indicator}: network error: {message}")]
    Network {
        indicator: &'static str,
        message: String,
    },
}

impl Failure {
    fn network(indicator: Indicator, e: NnError) -> Self {
        Failure::Network {
            indicator: indicator.name(),
            message: e.to_string(),
        }
    }

    fn singular(indicator: Indicator, detail: impl Into<String>) -> Self {
        Failure::Singular {
            indicator: indicator.name(),
            detail: detail.into(),
        }
    }
}

/// A batch of images, row-major `(n, c, h, w)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Images {
    pub x: Vec<f64>,
    pub shape: (usize, usize, usize, usize),
}

impl Images {
    fn tensor(&self, dev: &Dev) -> Result<Tensor4<f64>, NnError> {
        nn::from_vec(dev, self.x.clone(), self.shape)
    }
}

/// `value`, or the failure that marks an architecture whose indicator is not finite.
pub(crate) fn finite(indicator: Indicator, value: f64) -> Result<f64, Failure> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Failure::NonFinite {
            indicator: indicator.name(),
            value,
        })
    }
}

/// The seed of repeat `r` (an independent initialization).
fn repeat_seed(seed: u64, r: usize) -> u64 {
    derive_seed(seed, 7_000 + r as u64)
}

/// `docs/methods/training-free-nas.md` §2, trainability: kappa = lambda_max / lambda_min of
/// Theta = G G^T (batch x batch), G's row i the gradient of sum_k f_k(x_i) over every weight
/// tensor (conv kernels, BN gammas, classifier matrix; no biases), BatchNorm on batch
/// statistics; mean over `repeats` initializations. lambda_min <= 1e-12 lambda_max is singular.
pub fn ntk_condition_number(
    cfg: &NetConfig,
    sets: &OpSets,
    images: &Images,
    repeats: usize,
    seed: u64,
) -> Result<f64, Failure> {
    const IND: Indicator = Indicator::Ntk;
    let dev = open_device().map_err(|e| Failure::network(IND, e))?;
    let x = images.tensor(&dev).map_err(|e| Failure::network(IND, e))?;
    let mut sum = 0.0;
    for r in 0..repeats.max(1) {
        let mut net = ProxyNet::new(&dev, cfg, sets, repeat_seed(seed, r))
            .map_err(|e| Failure::network(IND, e))?;
        let g = net
            .per_sample_gradients(&x, ParamSet::Weights)
            .map_err(|e| Failure::network(IND, e))?;
        sum += condition_number(&g)?;
    }
    finite(IND, sum / repeats.max(1) as f64)
}

/// kappa of the Gram matrix of the rows of `g` (`docs/methods/training-free-nas.md` §2).
pub fn condition_number(g: &[Vec<f64>]) -> Result<f64, Failure> {
    const IND: Indicator = Indicator::Ntk;
    let n = g.len();
    let k = gram(g);
    if k.iter().any(|v| !v.is_finite()) {
        return Err(Failure::NonFinite {
            indicator: IND.name(),
            value: f64::NAN,
        });
    }
    let eig = eigenvalues(&k, n);
    let (Some(&lo), Some(&hi)) = (eig.first(), eig.last()) else {
        return Err(Failure::singular(IND, "empty batch"));
    };
    let resolved = hi > 0.0 && lo > super::linalg::SINGULAR_RTOL * hi;
    if !resolved {
        return Err(Failure::singular(
            IND,
            format!("eigenvalues in [{lo:.3e}, {hi:.3e}]"),
        ));
    }
    finite(IND, hi / lo)
}

/// The thin network for linear regions (arXiv 2102.11535 §3.2; VITA-Group/TENAS
/// `linear_region_counter.py`): C = 1, one cell, first stage only, one input channel, no stem.
pub fn thin_config() -> NetConfig {
    NetConfig {
        in_channels: 1,
        channels: 1,
        cells_per_stage: 1,
        stages: 1,
        classes: 1,
        stem: false,
    }
}

/// `docs/methods/training-free-nas.md` §2, expressivity:
/// R = sum_i 1 / #{j : pattern_j == pattern_i} (the number of distinct ReLU sign patterns) over
/// `crops` `(n, 1, 3, 3)` through the thin network with BatchNorm on batch statistics; mean over
/// `repeats` initializations. The ReLUs are those of the cell's conv edges (one per conv op: the
/// sign of the edge's input) and the final BN-ReLU.
pub fn linear_regions(
    cfg: &NetConfig,
    sets: &OpSets,
    crops: &Images,
    repeats: usize,
    seed: u64,
) -> Result<f64, Failure> {
    const IND: Indicator = Indicator::Regions;
    let dev = open_device().map_err(|e| Failure::network(IND, e))?;
    let x = crops.tensor(&dev).map_err(|e| Failure::network(IND, e))?;
    let mut sum = 0.0;
    for r in 0..repeats.max(1) {
        let mut net = ProxyNet::new(&dev, cfg, sets, repeat_seed(seed, r))
            .map_err(|e| Failure::network(IND, e))?;
        let mut rec = SignRecorder::default();
        net.forward(x.clone(), &ForwardCtx::train(0), Some(&mut rec))
            .map_err(|e| Failure::network(IND, e))?;
        sum += count_regions(&rec.patterns(crops.shape.0));
    }
    finite(IND, sum / repeats.max(1) as f64)
}

/// R = sum_i 1 / #{j : pattern_j == pattern_i}: each group of equal patterns contributes
/// exactly 1, so R is the number of distinct patterns (counted exactly, without float sums).
pub fn count_regions(patterns: &[Vec<u64>]) -> f64 {
    let distinct: std::collections::HashSet<&[u64]> = patterns.iter().map(Vec::as_slice).collect();
    distinct.len() as f64
}

/// One-hot labels centred by their batch mean, `(n, classes)` row-major.
fn centred_one_hot(labels: &[usize], classes: usize) -> Vec<f64> {
    let n = labels.len();
    let mut y = vec![0.0; n * classes];
    for (i, &l) in labels.iter().enumerate() {
        if l < classes {
            y[i * classes + l] = 1.0;
        }
    }
    for c in 0..classes {
        let mean = (0..n).map(|i| y[i * classes + c]).sum::<f64>() / n.max(1) as f64;
        for i in 0..n {
            y[i * classes + c] -= mean;
        }
    }
    y
}

/// `docs/methods/training-free-nas.md` §2, generalization: with G_x, G_y the per-sample gradients
/// over the cell parameters of a training batch X and a held-out batch Y,
/// P = Theta_yx Theta_xx^{-1} Y_x and G = mean_i sum_c (P - Y_y)_ic^2 (labels one-hot, centred by
/// batch mean); mean over repeats. A singular Theta_xx (or a cell without parameters) fails.
#[allow(clippy::too_many_arguments)]
pub fn ntk_regression_error(
    cfg: &NetConfig,
    sets: &OpSets,
    train: &Images,
    train_labels: &[usize],
    held: &Images,
    held_labels: &[usize],
    repeats: usize,
    seed: u64,
) -> Result<f64, Failure> {
    const IND: Indicator = Indicator::Generalization;
    let dev = open_device().map_err(|e| Failure::network(IND, e))?;
    let xt = train.tensor(&dev).map_err(|e| Failure::network(IND, e))?;
    let xh = held.tensor(&dev).map_err(|e| Failure::network(IND, e))?;
    let classes = cfg.classes;
    let yx = centred_one_hot(train_labels, classes);
    let yy = centred_one_hot(held_labels, classes);
    let (n, m) = (train.shape.0, held.shape.0);
    let mut sum = 0.0;
    for r in 0..repeats.max(1) {
        let mut net = ProxyNet::new(&dev, cfg, sets, repeat_seed(seed, r))
            .map_err(|e| Failure::network(IND, e))?;
        if net.num_params(ParamSet::Cells) == 0 {
            return Err(Failure::singular(IND, "the cell has no parameters"));
        }
        let gx = net
            .per_sample_gradients(&xt, ParamSet::Cells)
            .map_err(|e| Failure::network(IND, e))?;
        let gy = net
            .per_sample_gradients(&xh, ParamSet::Cells)
            .map_err(|e| Failure::network(IND, e))?;
        let l = cholesky(&gram(&gx), n)
            .ok_or_else(|| Failure::singular(IND, "Theta_xx is not positive definite"))?;
        let alpha = cholesky_solve(&l, n, &yx, classes);
        let theta_yx = cross(&gy, &gx);
        let mut err = 0.0;
        for i in 0..m {
            for c in 0..classes {
                let p: f64 = (0..n)
                    .map(|j| theta_yx[i * n + j] * alpha[j * classes + c])
                    .sum();
                err += (p - yy[i * classes + c]).powi(2);
            }
        }
        sum += err / m.max(1) as f64;
    }
    finite(IND, sum / repeats.max(1) as f64)
}

/// `docs/methods/training-free-nas.md` §2 (NASWOT baseline): log|det K_H|, K_H[i, j] = number of
/// ReLU units on which samples i and j agree (sign of the ReLU input), over one batch at one
/// initialization.
pub fn naswot(cfg: &NetConfig, sets: &OpSets, images: &Images, seed: u64) -> Result<f64, Failure> {
    const IND: Indicator = Indicator::Naswot;
    let dev = open_device().map_err(|e| Failure::network(IND, e))?;
    let x = images.tensor(&dev).map_err(|e| Failure::network(IND, e))?;
    let mut net = ProxyNet::new(&dev, cfg, sets, repeat_seed(seed, 0))
        .map_err(|e| Failure::network(IND, e))?;
    let mut rec = SignRecorder::default();
    net.forward(x, &ForwardCtx::train(0), Some(&mut rec))
        .map_err(|e| Failure::network(IND, e))?;
    let n = images.shape.0;
    let units = rec.units() as f64;
    let codes = rec.patterns(n);
    let mut k = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let differ: u32 = codes[i]
                .iter()
                .zip(&codes[j])
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            k[i * n + j] = units - differ as f64;
        }
    }
    let l = cholesky(&k, n).ok_or_else(|| Failure::singular(IND, "K_H is singular"))?;
    finite(IND, cholesky_logdet(&l, n))
}
