//! `pretrain.mask`: masked reconstruction with optional blur on unlabeled PDE inputs with the
//! `fno2d_mae` model (`docs/methods/operator-learning.md` §3).

use std::time::{Duration, Instant};

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{read_pde, scale_inputs};
use crate::fail;
use crate::params_doc::required;
use crate::seed::derive_seed;
use crate::{Count, OpError, Outputs, ParamError, RunContext, TypedOp};
use nn::layers::ForwardCtx;
use nn::models::InputShape;
use nn::train::{
    clip_grad_norm, save_checkpoint, Optimizer, OptimizerSpec, Schedule, ScheduleKind,
};
use nn::{from_vec, open_device, Dev, Init, Model, ModelSpec, NnError, VarBuilder};

pub const HISTORY_FILE: &str = "history.json";
/// Largest blur kernel (section 3, step 2).
pub const MAX_KERNEL: usize = 63;
/// Below this sigma no blur is applied (section 3, step 2).
pub const MIN_SIGMA: f64 = 0.25;

/// `init: pretrained` trains; `init: scratch` writes the untrained initialisation, the
/// random-init baseline that fine-tuning then loads through the very same `init` path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// Pretrain for `epochs`.
    #[default]
    Pretrained,
    /// Write the initialisation untrained.
    Scratch,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainParams {
    /// The model: an `fno2d_mae` spec (`{kind: fno2d_mae, width, modes, layers, head_width}`).
    /// Required.
    pub model: Option<ModelSpec>,
    /// r: floor(r n^2) pixels masked per sample, in [0, 1). Required.
    pub mask_ratio: Option<f64>,
    /// [a, b]: sigma ~ U[a, b] per batch; absent or null: no blur.
    pub blur: Option<[f64; 2]>,
    /// Passes over the unlabeled samples (0 only with `init: scratch`). Required.
    pub epochs: Option<usize>,
    /// Samples per optimisation step.
    pub batch_size: Count,
    /// Peak AdamW learning rate of the cosine schedule.
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Maximum global gradient norm.
    pub clip: f64,
    /// Use only the first N unlabeled samples.
    pub samples: Option<Count>,
    /// `pretrained` (train) or `scratch` (write the untrained initialisation).
    pub init: InitMode,
}

impl Default for PretrainParams {
    fn default() -> Self {
        Self {
            model: None,
            mask_ratio: None,
            blur: None,
            epochs: None,
            batch_size: Count(16),
            lr: 1e-3,
            weight_decay: 0.0,
            clip: 1.0,
            samples: None,
            init: InitMode::Pretrained,
        }
    }
}

/// Checked [`PretrainParams`].
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    model: ModelSpec,
    mask_ratio: f64,
    blur: Option<[f64; 2]>,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    weight_decay: f64,
    clip: f64,
    samples: Option<usize>,
    init: InitMode,
}

impl PretrainConfig {
    fn resolve(p: PretrainParams) -> Result<Self, ParamError> {
        let model = required(p.model, "model")?;
        let mask_ratio = required(p.mask_ratio, "mask_ratio")?;
        let epochs = required(p.epochs, "epochs")?;
        if !matches!(model, ModelSpec::Fno2dMae(_)) {
            return Err(ParamError::new(
                "model.kind",
                format!("pretrain.mask needs `fno2d_mae`, not {}", model.kind()),
            ));
        }
        model
            .check()
            .map_err(|e| ParamError::new("model", e.to_string()))?;
        if !(0.0..1.0).contains(&mask_ratio) {
            return Err(ParamError::new(
                "mask_ratio",
                format!("{mask_ratio} must be in [0, 1)"),
            ));
        }
        if let Some([a, b]) = p.blur {
            if !(a >= 0.0 && b >= a && b.is_finite()) {
                return Err(ParamError::new(
                    "blur",
                    format!("[{a}, {b}] must satisfy 0 <= a <= b"),
                ));
            }
        }
        if !(p.lr > 0.0 && p.lr.is_finite()) {
            return Err(ParamError::new("lr", "must be positive"));
        }
        if !(p.clip > 0.0 && p.clip.is_finite()) {
            return Err(ParamError::new("clip", "must be positive"));
        }
        if p.init == InitMode::Pretrained && epochs == 0 {
            return Err(ParamError::new("epochs", "must be at least 1")
                .with_fix("use `init: scratch` for an untrained checkpoint"));
        }
        Ok(Self {
            model,
            mask_ratio,
            blur: p.blur,
            epochs,
            batch_size: p.batch_size.get(),
            lr: p.lr,
            weight_decay: p.weight_decay,
            clip: p.clip,
            samples: p.samples.map(Count::get),
            init: p.init,
        })
    }
}

/// Section 3, step 1: floor(r * pixels) masked pixels per sample.
pub fn mask_count(ratio: f64, pixels: usize) -> usize {
    ((ratio * pixels as f64).floor() as usize).min(pixels)
}

/// A fresh mask over `pixels` pixels with exactly `count` set.
pub fn draw_mask(pixels: usize, count: usize, rng: &mut StdRng) -> Vec<bool> {
    let mut mask = vec![false; pixels];
    for i in rand::seq::index::sample(rng, pixels, count.min(pixels)) {
        mask[i] = true;
    }
    mask
}

/// Section 3, step 2: kernel size min(2 floor((4 sigma + 1) / 2) + 1, 63); `None` (no blur)
/// when sigma < 0.25.
pub fn blur_kernel_size(sigma: f64) -> Option<usize> {
    if sigma.is_nan() || sigma < MIN_SIGMA {
        return None;
    }
    let k = 2 * ((4.0 * sigma + 1.0) / 2.0).floor() as usize + 1;
    Some(k.min(MAX_KERNEL))
}

/// Normalised 1-D Gaussian weights exp(-x^2 / (2 sigma^2)), x = -(size/2)..=size/2.
pub fn gaussian_kernel(sigma: f64, size: usize) -> Vec<f64> {
    let half = (size / 2) as f64;
    let w: Vec<f64> = (0..size)
        .map(|i| {
            let x = i as f64 - half;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f64 = w.iter().sum();
    w.into_iter().map(|v| v / total).collect()
}

/// Separable blur of one `n x n` plane with periodic wrap (the domain is the periodic unit
/// square, so wrapping is the boundary condition the data already has).
pub fn blur_plane(plane: &mut [f32], n: usize, kernel: &[f64]) {
    let half = (kernel.len() / 2) as isize;
    let wrap = |i: isize| i.rem_euclid(n as isize) as usize;
    let mut tmp = vec![0.0f64; n * n];
    for r in 0..n {
        for c in 0..n {
            tmp[r * n + c] = kernel
                .iter()
                .enumerate()
                .map(|(k, w)| w * plane[r * n + wrap(c as isize + k as isize - half)] as f64)
                .sum();
        }
    }
    for r in 0..n {
        for c in 0..n {
            plane[r * n + c] = kernel
                .iter()
                .enumerate()
                .map(|(k, w)| w * tmp[wrap(r as isize + k as isize - half) * n + c])
                .sum::<f64>() as f32;
        }
    }
}

/// One batch's model input, blur(x) * mask, and loss weights (1 on masked pixels of every
/// channel; 1 everywhere when no pixel is masked, i.e. r = 0: section 3, step 4).
/// `x` is `[b, c, n, n]` row-major.
pub fn corrupt_batch(
    x: &[f32],
    channels: usize,
    n: usize,
    mask_ratio: f64,
    sigma: Option<f64>,
    rng: &mut StdRng,
) -> (Vec<f32>, Vec<f32>) {
    let plane = n * n;
    let count = mask_count(mask_ratio, plane);
    let kernel = sigma.and_then(|s| blur_kernel_size(s).map(|k| gaussian_kernel(s, k)));
    let mut input = x.to_vec();
    let mut weight = vec![0.0f32; x.len()];
    for (sample, w) in input
        .chunks_mut(channels * plane)
        .zip(weight.chunks_mut(channels * plane))
    {
        if let Some(k) = &kernel {
            for chan in sample.chunks_mut(plane) {
                blur_plane(chan, n, k);
            }
        }
        let mask = draw_mask(plane, count, rng);
        for (chan, wc) in sample.chunks_mut(plane).zip(w.chunks_mut(plane)) {
            for ((v, wv), &masked) in chan.iter_mut().zip(wc.iter_mut()).zip(&mask) {
                if count == 0 {
                    *wv = 1.0;
                } else if masked {
                    *v = 0.0;
                    *wv = 1.0;
                }
            }
        }
    }
    (input, weight)
}

/// One epoch's line of `history.json`.
#[derive(Debug, Clone, Serialize)]
struct EpochRecord {
    epoch: usize,
    steps: u64,
    lr: f64,
    /// Mean over the epoch's samples of the per-sample masked squared error.
    loss: f64,
}

/// One optimisation step on the masked loss; returns the loss before the update.
/// Section 3, step 4: L = (1/B) sum_b sum_c sum_pixels w (out - x)^2.
#[allow(clippy::too_many_arguments)]
fn masked_step(
    model: &mut Model<f32>,
    opt: &mut Optimizer<f32>,
    dev: &Dev,
    shape: (usize, usize, usize, usize),
    (input, target, weight): (Vec<f32>, Vec<f32>, Vec<f32>),
    lr: f64,
    clip: f64,
    fctx: &mut ForwardCtx,
) -> Result<f64, NnError> {
    let (b, c, h, w) = shape;
    let x = from_vec(dev, input, shape)?;
    let target = from_vec(dev, target, (b, c * h * w))?;
    let weight = from_vec(dev, weight, (b, c * h * w))?;
    let out = model.forward(x.traced(Gradients::leaky()), fctx)?;
    let loss = out
        .try_sub(target)?
        .try_mul(weight)?
        .try_square()?
        .try_sum::<Rank0, _>()?
        .try_mul(1.0 / b.max(1) as f32)?;
    let value = loss.array() as f64;
    if !value.is_finite() {
        return Err(NnError::NonFiniteLoss { step: 0, value });
    }
    let mut grads = loss.try_backward()?;
    let mut g = Optimizer::gradients(model, &mut grads)?;
    drop(grads);
    clip_grad_norm(&mut g, Some(clip))?;
    opt.step(model, g, lr)?;
    Ok(value)
}

pub struct PretrainMaskOp;

/// The scaled unlabeled inputs `x` `[samples, channels, n, n]` a pretraining run fits.
struct Pool {
    x: Vec<f32>,
    samples: usize,
    channels: usize,
    n: usize,
}

/// Section 3, step 5: AdamW with one cosine decay over all steps (no restarts), on batches
/// corrupted per [`corrupt_batch`]. Returns the epochs' records and the steps taken.
fn pretrain(
    p: &PretrainConfig,
    model: &mut Model<f32>,
    dev: &Dev,
    pool: &Pool,
    ctx: &mut RunContext<'_>,
) -> Result<(Vec<EpochRecord>, u64), OpError> {
    let (c, n, samples) = (pool.channels, pool.n, pool.samples);
    let per = c * n * n;
    let spec = OptimizerSpec::Adamw {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: p.weight_decay,
    };
    let mut opt = Optimizer::new(spec, Vec::new())?;
    let schedule = Schedule {
        kind: ScheduleKind::Cosine { min_lr: 0.0 },
        warmup_steps: 0,
    };
    let bs = p.batch_size;
    let total_steps = (samples.div_ceil(bs) * p.epochs) as u64;
    let mut shuffle = StdRng::seed_from_u64(derive_seed(ctx.seed, 11));
    let mut masks = StdRng::seed_from_u64(derive_seed(ctx.seed, 13));
    let mut fctx = ForwardCtx::train(derive_seed(ctx.seed, 12));
    let mut last_report = Instant::now();
    let (mut history, mut step) = (Vec::new(), 0u64);
    for epoch in 1..=p.epochs {
        let mut order: Vec<usize> = (0..samples).collect();
        order.shuffle(&mut shuffle);
        let (mut loss_sum, mut lr) = (0.0, p.lr);
        for chunk in order.chunks(bs) {
            ctx.check_cancelled()?;
            let mut target = Vec::with_capacity(chunk.len() * per);
            for &i in chunk {
                target.extend_from_slice(&pool.x[i * per..(i + 1) * per]);
            }
            let sigma = p
                .blur
                .map(|[a, b]| if b > a { masks.gen_range(a..b) } else { a });
            let (input, weight) = corrupt_batch(&target, c, n, p.mask_ratio, sigma, &mut masks);
            lr = schedule.lr_at(p.lr, step, total_steps);
            let loss = masked_step(
                model,
                &mut opt,
                dev,
                (chunk.len(), c, n, n),
                (input, target, weight),
                lr,
                p.clip,
                &mut fctx,
            )
            .map_err(|e| match e {
                NnError::NonFiniteLoss { value, .. } => fail(format!(
                    "pretraining loss became {value} at step {step} (epoch {epoch}); lower `lr`"
                )),
                other => other.into(),
            })?;
            loss_sum += loss * chunk.len() as f64;
            step += 1;
            if last_report.elapsed() > Duration::from_secs(1) {
                ctx.progress
                    .report(&format!("epoch {epoch}/{} step {step}", p.epochs));
                last_report = Instant::now();
            }
        }
        let loss = loss_sum / samples.max(1) as f64;
        let _ = writeln!(
            ctx.log,
            "epoch {epoch}/{} loss {loss:.5} lr {lr:.3e}",
            p.epochs
        );
        history.push(EpochRecord {
            epoch,
            steps: step,
            lr,
            loss,
        });
    }
    Ok((history, step))
}

impl TypedOp for PretrainMaskOp {
    const NAME: &'static str = "pretrain.mask";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "masked (and blurred) reconstruction pretraining of fno2d_mae on unlabeled PDE inputs";
    type Params = PretrainParams;
    type Config = PretrainConfig;

    fn resolve(p: PretrainParams) -> Result<PretrainConfig, ParamError> {
        PretrainConfig::resolve(p)
    }
    fn required_inputs(_: &PretrainConfig) -> Vec<String> {
        vec!["data".to_string()]
    }

    fn run(
        &self,
        p: &PretrainConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let started = Instant::now();
        let data = read_pde(ctx.one_input("data")?)?;
        let mut x = scale_inputs(&data, &data.meta)?;
        let (c, n) = (data.channels, data.resolution);
        let samples = p.samples.unwrap_or(data.samples).min(data.samples);
        x.truncate(samples * c * n * n);
        let _span =
            tracing::info_span!("pretrain.mask", samples, mask_ratio = p.mask_ratio).entered();
        let dev = open_device()?;
        let input = InputShape {
            channels: c,
            height: n,
            width: n,
        };
        let init = Init::default();
        let vb = VarBuilder::new(&dev, &init, derive_seed(ctx.seed, 10));
        let mut model = Model::<f32>::build(&p.model, input, vb)?;
        let (history, step) = match p.init {
            InitMode::Pretrained => {
                let pool = Pool {
                    x,
                    samples,
                    channels: c,
                    n,
                };
                pretrain(p, &mut model, &dev, &pool, ctx)?
            }
            InitMode::Scratch => (Vec::new(), 0),
        };
        save_checkpoint(&model, out.dir())?;
        out.write_json(HISTORY_FILE, &history)?;
        if let Some(last) = history.last() {
            out.metric("loss", last.loss);
        }
        if let Some(first) = history.first() {
            out.metric("first_epoch_loss", first.loss);
        }
        out.metric("steps", step as f64);
        out.metric("params", model.num_trainable() as f64);
        out.metric("masked_pixels", mask_count(p.mask_ratio, n * n) as f64);
        out.write_metrics_file()?;
        out.metric("wall_time_s", started.elapsed().as_secs_f64());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_count_is_exact_per_sample_and_shared_over_channels() {
        assert_eq!(mask_count(0.6, 256), 153);
        assert_eq!(mask_count(0.75, 64 * 64), 3072);
        assert_eq!(mask_count(0.0, 1024), 0);
        let mut rng = StdRng::seed_from_u64(3);
        let (c, n, b) = (3, 8, 5);
        let x: Vec<f32> = (0..b * c * n * n).map(|i| 1.0 + i as f32).collect();
        let (input, weight) = corrupt_batch(&x, c, n, 0.3, None, &mut rng);
        let want = mask_count(0.3, n * n);
        let mut masks = Vec::new();
        for s in 0..b {
            let planes: Vec<Vec<bool>> = (0..c)
                .map(|ch| {
                    let o = (s * c + ch) * n * n;
                    (0..n * n).map(|p| input[o + p] == 0.0).collect()
                })
                .collect();
            for plane in &planes {
                assert_eq!(plane.iter().filter(|m| **m).count(), want);
                assert_eq!(plane, &planes[0], "same mask over channels");
            }
            for ch in 0..c {
                let o = (s * c + ch) * n * n;
                for p in 0..n * n {
                    assert_eq!(weight[o + p] == 1.0, planes[0][p]);
                }
            }
            masks.push(planes[0].clone());
        }
        assert_ne!(masks[0], masks[1], "fresh mask per sample");
    }

    #[test]
    fn blur_kernel_size_rule() {
        assert_eq!(blur_kernel_size(0.0), None);
        assert_eq!(blur_kernel_size(0.2499), None);
        // 2 floor((4 * 0.25 + 1) / 2) + 1 = 2 floor(1) + 1 = 3
        assert_eq!(blur_kernel_size(0.25), Some(3));
        assert_eq!(blur_kernel_size(1.0), Some(5));
        assert_eq!(blur_kernel_size(1.24), Some(5));
        assert_eq!(blur_kernel_size(1.25), Some(7));
        assert_eq!(blur_kernel_size(7.5), Some(31));
        assert_eq!(blur_kernel_size(15.4), Some(63));
        assert_eq!(blur_kernel_size(100.0), Some(63));
        let k = gaussian_kernel(1.0, 5);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((k[0] - k[4]).abs() < 1e-15 && k[2] > k[1]);
    }

    #[test]
    fn small_sigma_leaves_input_unblurred_and_r0_weights_every_pixel() {
        let (c, n) = (2, 6);
        let x: Vec<f32> = (0..c * n * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut rng = StdRng::seed_from_u64(1);
        let (input, weight) = corrupt_batch(&x, c, n, 0.0, Some(0.2), &mut rng);
        assert_eq!(input, x, "sigma < 0.25: no blur; r = 0: nothing masked");
        assert!(
            weight.iter().all(|w| *w == 1.0),
            "r = 0: loss over all pixels"
        );
        let (blurred, _) = corrupt_batch(&x, c, n, 0.0, Some(1.0), &mut rng);
        assert_ne!(blurred, x);
        // A periodic blur keeps each plane's mean.
        let mean = |v: &[f32]| v.iter().map(|v| *v as f64).sum::<f64>();
        assert!((mean(&blurred[..n * n]) - mean(&x[..n * n])).abs() < 1e-4);
    }

    #[test]
    fn r0_loss_is_nonzero_and_covers_all_pixels() {
        use nn::models::Fno2dMaeSpec;
        let dev = Dev::default();
        let spec = ModelSpec::Fno2dMae(Fno2dMaeSpec {
            width: 4,
            modes: (2, 2),
            layers: 1,
            head_width: 8,
        });
        let (c, n) = (2, 8);
        let input = InputShape {
            channels: c,
            height: n,
            width: n,
        };
        let init = Init::default();
        let model = Model::<f32>::build(&spec, input, VarBuilder::new(&dev, &init, 0)).unwrap();
        let x: Vec<f32> = (0..c * n * n).map(|i| (i as f32 * 0.1).cos()).collect();
        let mut rng = StdRng::seed_from_u64(0);
        let (inp, weight) = corrupt_batch(&x, c, n, 0.0, None, &mut rng);
        let out = nn::train::predict(
            &mut model.clone(),
            from_vec(&dev, inp.clone(), (1, c, n, n)).unwrap(),
        )
        .unwrap()
        .as_vec();
        let full: f64 = out
            .iter()
            .zip(&x)
            .map(|(o, t)| ((o - t) as f64).powi(2))
            .sum();
        let mut opt = Optimizer::new(
            OptimizerSpec::Adamw {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
            Vec::new(),
        )
        .unwrap();
        let loss = masked_step(
            &mut model.clone(),
            &mut opt,
            &dev,
            (1, c, n, n),
            (inp, x.clone(), weight),
            1e-3,
            1.0,
            &mut ForwardCtx::train(0),
        )
        .unwrap();
        assert!(full > 0.0);
        assert!((loss - full).abs() <= 1e-4 * full, "{loss} vs {full}");
    }
}
