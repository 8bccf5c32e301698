//! `data.synthetic_images`: a seeded 10-class image task that needs spatial features.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dataset::{
    split_by_permutation, write_splits, DatasetMeta, Fractions, Split, Targets, Task,
};
use crate::fail;
use crate::params_doc::required;
use crate::seed::derive_seed;
use crate::{OpError, Outputs, ParamError, RunContext, TypedOp};

/// Generates `samples` images of `channels x size x size` in 10 balanced classes, each a line
/// figure drawn at a random place and scale on Gaussian noise:
///
/// | class | figure (inside an L x L box) |
/// | --- | --- |
/// | 0 | horizontal bar through the middle row |
/// | 1 | vertical bar through the middle column |
/// | 2 | main diagonal `\` |
/// | 3 | anti-diagonal `/` |
/// | 4 | plus: middle row + middle column |
/// | 5 | X: both diagonals |
/// | 6 | square outline: the box's border |
/// | 7 | filled square |
/// | 8 | corner `L`: left column + bottom row |
/// | 9 | `T`: top row + middle column |
///
/// Per image: the side L is uniform in [max(3, size/4), size/2]; the box's corner is uniform
/// over all places where it fits; the figure's pixels get intensity `a * colour[c]` with `a`
/// uniform in [0.6, 1.4] and a colour per channel uniform in [0.3, 1]; every pixel gets N(0,
/// noise^2) (`noise`, default 0.15); finally each image is standardised to zero mean and unit variance over all its
/// pixels. Because the figure moves over the whole image and images are standardised, the
/// per-class mean images are nearly flat and total brightness says nothing: a linear model on
/// pixels stays near chance, while local oriented-edge and junction detectors pooled over space
/// (a CNN) separate the classes. Labels are `i % 10`, so classes are balanced before the
/// seeded train/val/test permutation.
pub struct SyntheticImagesOp;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticParams {
    /// Images to generate, at least one per class. Required.
    pub samples: Option<usize>,
    /// Side of the square images, in pixels (8..=256).
    pub size: usize,
    /// Channels per image (1..=16); each gets its own colour of the figure.
    pub channels: usize,
    /// Standard deviation of the Gaussian pixel noise, before standardisation.
    pub noise: f64,
    /// Added to the stage seed: a different data set under the same stage seed.
    pub seed_offset: u64,
    /// Fraction of the images held out as the val split.
    pub val_fraction: f64,
    /// Fraction of the images held out as the test split.
    pub test_fraction: f64,
}

impl Default for SyntheticParams {
    fn default() -> Self {
        Self {
            samples: None,
            size: 16,
            channels: 1,
            noise: 0.15,
            seed_offset: 0,
            val_fraction: 0.1,
            test_fraction: 0.2,
        }
    }
}

/// Checked [`SyntheticParams`].
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    samples: usize,
    size: usize,
    channels: usize,
    noise: f64,
    seed_offset: u64,
    fractions: Fractions,
}

pub const CLASSES: usize = 10;

/// The figure of `class` in an `l x l` box: `true` where the figure is.
pub fn render_shape(class: usize, l: usize) -> Vec<bool> {
    let mid = l / 2;
    let mut m = vec![false; l * l];
    for r in 0..l {
        for c in 0..l {
            m[r * l + c] = match class {
                0 => r == mid,
                1 => c == mid,
                2 => r == c,
                3 => r + c == l - 1,
                4 => r == mid || c == mid,
                5 => r == c || r + c == l - 1,
                6 => r == 0 || c == 0 || r == l - 1 || c == l - 1,
                7 => true,
                8 => c == 0 || r == l - 1,
                _ => r == 0 || c == mid,
            };
        }
    }
    m
}

fn image(class: usize, p: &SyntheticConfig, rng: &mut StdRng, noise: &Normal<f64>) -> Vec<f32> {
    let s = p.size;
    let l = rng.gen_range((s / 4).max(3)..=s / 2);
    let (r0, c0) = (rng.gen_range(0..=s - l), rng.gen_range(0..=s - l));
    let a = rng.gen_range(0.6..1.4);
    let colour: Vec<f64> = (0..p.channels).map(|_| rng.gen_range(0.3..1.0)).collect();
    let figure = render_shape(class, l);
    let mut img = vec![0f64; p.channels * s * s];
    for (ch, col) in colour.iter().enumerate() {
        for r in 0..s {
            for c in 0..s {
                let inside = (r0..r0 + l).contains(&r) && (c0..c0 + l).contains(&c);
                let on = inside && figure[(r - r0) * l + (c - c0)];
                let v = if on { a * col } else { 0.0 };
                img[(ch * s + r) * s + c] = v + noise.sample(rng);
            }
        }
    }
    let n = img.len() as f64;
    let mean = img.iter().sum::<f64>() / n;
    let var = img.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let sd = var.sqrt().max(1e-6);
    img.into_iter().map(|v| ((v - mean) / sd) as f32).collect()
}

impl TypedOp for SyntheticImagesOp {
    const NAME: &'static str = "data.synthetic_images";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "seeded 10-class line-figure images (a CNN beats a linear model) as a dataset";
    type Params = SyntheticParams;
    type Config = SyntheticConfig;

    fn resolve(p: SyntheticParams) -> Result<SyntheticConfig, ParamError> {
        let samples = required(p.samples, "samples")?;
        if !(8..=256).contains(&p.size) {
            return Err(ParamError::new(
                "size",
                format!("{} must be in 8..=256", p.size),
            ));
        }
        if !(1..=16).contains(&p.channels) {
            return Err(ParamError::new(
                "channels",
                format!("{} must be in 1..=16", p.channels),
            ));
        }
        if samples < CLASSES {
            return Err(ParamError::new(
                "samples",
                format!("{samples} is fewer than the {CLASSES} classes"),
            ));
        }
        if !(p.noise >= 0.0 && p.noise.is_finite()) {
            return Err(ParamError::new(
                "noise",
                format!("{} must be >= 0", p.noise),
            ));
        }
        let fractions = Fractions {
            val: p.val_fraction,
            test: p.test_fraction,
        };
        fractions.check()?;
        Ok(SyntheticConfig {
            samples,
            size: p.size,
            channels: p.channels,
            noise: p.noise,
            seed_offset: p.seed_offset,
            fractions,
        })
    }

    fn run(
        &self,
        p: &SyntheticConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let seed = ctx.seed.wrapping_add(p.seed_offset);
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 1));
        let noise = Normal::new(0.0, p.noise).map_err(|e| fail(format!("noise: {e}")))?;
        let per = p.channels * p.size * p.size;
        let mut x = Vec::with_capacity(p.samples * per);
        let mut y = Vec::with_capacity(p.samples);
        for i in 0..p.samples {
            if i % 256 == 0 {
                ctx.check_cancelled()?;
            }
            let class = i % CLASSES;
            x.extend(image(class, p, &mut rng, &noise));
            y.push(class);
        }
        let all = Split {
            n: p.samples,
            x,
            y: Targets::Labels(y),
        };
        let splits = split_by_permutation(&all, p.fractions, derive_seed(seed, 2));
        let meta = DatasetMeta {
            task: Task::Classification,
            classes: Some(CLASSES),
            shape: [p.channels, p.size, p.size],
            target_shape: None,
            samples: BTreeMap::new(),
            source: Self::NAME.to_string(),
            normalization: None,
        };
        write_splits(out, meta, &splits)?;
        let _ = writeln!(
            ctx.log,
            "{} images {}x{}x{}: train {}, val {}, test {}",
            p.samples, p.channels, p.size, p.size, splits[0].n, splits[1].n, splits[2].n
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{read_meta, read_split};
    use crate::testing::OpRun;
    use crate::Op;

    #[test]
    fn figures_differ_and_generation_is_seeded() {
        let figures: Vec<Vec<bool>> = (0..CLASSES).map(|c| render_shape(c, 5)).collect();
        for a in 0..CLASSES {
            for b in a + 1..CLASSES {
                assert_ne!(figures[a], figures[b], "classes {a} and {b}");
            }
        }
        let params = serde_json::json!({"samples": 50, "size": 8, "channels": 2});
        let run = |seed: u64| {
            OpRun::new(params.clone())
                .seed(seed)
                .run(&SyntheticImagesOp)
        };
        let (a, b, c) = (run(3), run(3), run(4));
        assert_eq!(c.metrics()["train_samples"], 35.0);
        let read = |d: &std::path::Path| std::fs::read(d.join("train.safetensors")).unwrap();
        assert_eq!(read(&a.out_dir), read(&b.out_dir));
        assert_ne!(read(&a.out_dir), read(&c.out_dir));
        let meta = read_meta(&a.out_dir).unwrap();
        assert_eq!(meta.shape, [2, 8, 8]);
        let train = read_split(&a.out_dir, &meta, "train").unwrap();
        // Each image is standardised.
        let img = &train.x[..128];
        let mean = img.iter().map(|v| *v as f64).sum::<f64>() / 128.0;
        assert!(mean.abs() < 1e-5, "{mean}");
        let err = |v: serde_json::Value| SyntheticImagesOp.plan(&v).unwrap_err();
        assert_eq!(
            err(serde_json::json!({"samples": 50, "size": 4})).path,
            "size"
        );
        assert!(err(serde_json::json!({"samples": 50, "colour": 1}))
            .message
            .starts_with("unknown field `colour`"));
        let missing = err(serde_json::json!({"size": 8}));
        assert_eq!(
            (missing.path.as_str(), missing.message.as_str()),
            ("", "missing field `samples`")
        );
    }
}
