//! The images every candidate is scored on: two batches and 3x3 crops from the `data` input (a
//! classification dataset), or seeded Gaussian images without one
//! (TE-NAS, arXiv 2102.11535). Both spaces and `scale` load them here.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::indicators::Images;
use super::search_params::{ProxyParams, VitProxy};
use crate::dataset::{read_meta, read_split, Targets, Task};
use crate::seed::derive_seed;
use crate::{OpError, RunContext};

/// The optional input holding a classification dataset (`meta.json` + `train.safetensors`).
pub const DATA_INPUT: &str = "data";

/// The images every candidate is scored on.
#[derive(Clone, Debug)]
pub struct Probes {
    /// `dataset` or `gaussian`.
    pub source: &'static str,
    pub classes: usize,
    pub batch: Images,
    pub labels: Vec<usize>,
    pub held: Images,
    pub held_labels: Vec<usize>,
    pub crops: Images,
}

fn gaussian(n: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| Distribution::<f64>::sample(&StandardNormal, rng))
        .collect()
}

impl Probes {
    /// Seeded Gaussian images and uniform labels.
    pub fn gaussian(p: &ProxyParams, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 11));
        let s = p.image_size;
        let shape = (p.batch, 3, s, s);
        let labels = |rng: &mut StdRng| {
            (0..p.batch)
                .map(|_| rng.gen_range(0..p.classes.get()))
                .collect()
        };
        let batch = Images {
            x: gaussian(p.batch * 3 * s * s, &mut rng),
            shape,
        };
        let l1 = labels(&mut rng);
        let held = Images {
            x: gaussian(p.batch * 3 * s * s, &mut rng),
            shape,
        };
        let l2 = labels(&mut rng);
        let crops = Images {
            x: gaussian(p.region_samples * 9, &mut rng),
            shape: (p.region_samples, 1, 3, 3),
        };
        Self {
            source: "gaussian",
            classes: p.classes.get(),
            batch,
            labels: l1,
            held,
            held_labels: l2,
            crops,
        }
    }

    /// Two disjoint seeded batches of the training split, and 3x3 crops of one random channel
    /// of random training images (`docs/methods/training-free-nas.md` §2).
    pub fn from_dataset(dir: &Path, p: &ProxyParams, seed: u64) -> Result<Self, OpError> {
        let meta = read_meta(dir)?;
        let fail = |m: String| OpError::Failed(format!("input `data` ({}): {m}", dir.display()));
        if meta.task != Task::Classification {
            return Err(fail("the indicators need a classification dataset".into()));
        }
        let classes = meta
            .classes
            .filter(|c| *c > 0)
            .ok_or_else(|| fail("meta.json has no classes".into()))?;
        let [c, h, w] = meta.shape;
        if h % 4 != 0 || w % 4 != 0 || h < 4 || w < 4 {
            return Err(fail(format!(
                "images are {h}x{w}; the proxy network needs sides divisible by 4"
            )));
        }
        let split = read_split(dir, &meta, "train")?;
        if split.n < 2 * p.batch {
            return Err(fail(format!(
                "the train split has {} samples; two batches of proxy.batch = {} are needed",
                split.n, p.batch
            )));
        }
        let Targets::Labels(labels) = &split.y else {
            return Err(fail("the train split has no labels".into()));
        };
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 12));
        let order = rand::seq::index::sample(&mut rng, split.n, 2 * p.batch).into_vec();
        let len = c * h * w;
        let take = |idx: &[usize]| Images {
            x: idx
                .iter()
                .flat_map(|&i| split.x[i * len..(i + 1) * len].iter().map(|&v| v as f64))
                .collect(),
            shape: (idx.len(), c, h, w),
        };
        let (a, b) = order.split_at(p.batch);
        let mut crops = Vec::with_capacity(p.region_samples * 9);
        for _ in 0..p.region_samples {
            let (i, ch) = (rng.gen_range(0..split.n), rng.gen_range(0..c));
            let (y0, x0) = (rng.gen_range(0..=h - 3), rng.gen_range(0..=w - 3));
            for y in y0..y0 + 3 {
                for x in x0..x0 + 3 {
                    crops.push(split.x[i * len + ch * h * w + y * w + x] as f64);
                }
            }
        }
        Ok(Self {
            source: "dataset",
            classes,
            batch: take(a),
            labels: a.iter().map(|&i| labels[i]).collect(),
            held: take(b),
            held_labels: b.iter().map(|&i| labels[i]).collect(),
            crops: Images {
                x: crops,
                shape: (p.region_samples, 1, 3, 3),
            },
        })
    }
}

/// The probes of a stage: from its `data` input when it has one, else Gaussian.
pub fn load(ctx: &RunContext<'_>, p: &ProxyParams) -> Result<Probes, OpError> {
    match ctx.inputs.get(DATA_INPUT) {
        Some(input) => {
            let paths = input.paths();
            let [dir] = paths.as_slice() else {
                return Err(OpError::Failed(
                    "input `data` must be one dataset, not a list".into(),
                ));
            };
            Probes::from_dataset(dir, p, ctx.seed)
        }
        None => Ok(Probes::gaussian(p, ctx.seed)),
    }
}

/// The images the ViT NTK is measured on: two batches from the `data` input (square images),
/// or Gaussian images.
pub fn vit_probes(ctx: &RunContext<'_>, proxy: &VitProxy) -> Result<Probes, OpError> {
    let probes = load(ctx, &proxy.probe_params())?;
    let (_, _, h, w) = probes.batch.shape;
    if h != w {
        return Err(OpError::Failed(format!(
            "input `data` has {h}x{w} images; vit needs square images"
        )));
    }
    Ok(probes)
}
