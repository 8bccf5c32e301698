//! The dataset artifact every `data.*` op writes and `train`/`evaluate` read.
//!
//! A dataset is a folder with `train.safetensors`, `val.safetensors`, `test.safetensors` and
//! `meta.json`. Each split holds `x`, f32 `[N, C, H, W]`, and `y`: i64 class labels `[N]`
//! (classification) or f32 fields `[N, C', H', W']` (regression). numpy/PyTorch users read the
//! splits with `safetensors.numpy.load_file`. A split may be empty (`N = 0`).

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::fail;
use crate::{OpError, Outputs};

pub const META_FILE: &str = "meta.json";
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// What the targets are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Regression,
}

/// Per-channel standardisation applied to `x` (statistics of the training split).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetMeta {
    pub task: Task,
    /// Number of classes (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
    /// `[C, H, W]` of one input sample.
    pub shape: [usize; 3],
    /// `[C', H', W']` of one target (regression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_shape: Option<[usize; 3]>,
    /// Samples per split.
    pub samples: BTreeMap<String, usize>,
    /// The op that made the dataset.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalization: Option<Normalization>,
}

impl DatasetMeta {
    fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }
    fn target_len(&self) -> usize {
        self.target_shape.map_or(1, |s| s.iter().product())
    }
}

/// Targets of a split.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    Labels(Vec<usize>),
    /// Row-major `[N, target_len]`.
    Values(Vec<f32>),
}

/// One split in memory: `x` row-major `[n, sample_len]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub n: usize,
    pub x: Vec<f32>,
    pub y: Targets,
}

impl Split {
    fn sample_len(&self) -> usize {
        self.x.len().checked_div(self.n).unwrap_or(0)
    }

    fn target_len(&self) -> usize {
        match &self.y {
            Targets::Labels(_) => 1,
            Targets::Values(v) => v.len().checked_div(self.n).unwrap_or(0),
        }
    }

    /// The samples at `indices`, in that order.
    pub fn gather(&self, indices: &[usize]) -> Split {
        let (s, t) = (self.sample_len(), self.target_len());
        let mut x = Vec::with_capacity(indices.len() * s);
        for &i in indices {
            x.extend_from_slice(&self.x[i * s..(i + 1) * s]);
        }
        let y = match &self.y {
            Targets::Labels(l) => Targets::Labels(indices.iter().map(|&i| l[i]).collect()),
            Targets::Values(v) => {
                let mut out = Vec::with_capacity(indices.len() * t);
                for &i in indices {
                    out.extend_from_slice(&v[i * t..(i + 1) * t]);
                }
                Targets::Values(out)
            }
        };
        Split {
            n: indices.len(),
            x,
            y,
        }
    }

    /// The first `n` samples (all when `n >= self.n`).
    pub fn head(&self, n: usize) -> Split {
        let idx: Vec<usize> = (0..n.min(self.n)).collect();
        self.gather(&idx)
    }
}

/// Train/val/test fractions of the data that is split by seeded permutation.
#[derive(Clone, Copy, Debug)]
pub struct Fractions {
    pub val: f64,
    pub test: f64,
}

impl Fractions {
    /// Both in [0, 1) and leaving some training data.
    pub fn check(&self) -> Result<(), crate::ParamError> {
        for (field, v) in [("val_fraction", self.val), ("test_fraction", self.test)] {
            if !(0.0..1.0).contains(&v) {
                return Err(crate::ParamError::new(
                    field,
                    format!("{v} must be in [0, 1)"),
                ));
            }
        }
        if self.val + self.test >= 1.0 {
            return Err(crate::ParamError::new(
                "val_fraction",
                format!(
                    "val_fraction + test_fraction = {} leaves no training data",
                    self.val + self.test
                ),
            )
            .with_fix("keep val_fraction + test_fraction below 1"));
        }
        Ok(())
    }

    /// How many of `n` samples go to val and to test: `round(val n)` and `round(test n)`
    /// (half away from zero), the latter cut to what val leaves.
    fn counts(&self, n: usize) -> (usize, usize) {
        let n_val = ((self.val * n as f64).round() as usize).min(n);
        let n_test = ((self.test * n as f64).round() as usize).min(n - n_val);
        (n_val, n_test)
    }
}

/// Splits `all` by a permutation drawn from `seed`: the first `round(val n)` permuted samples
/// are val, the next `round(test n)` test, the rest train.
pub fn split_by_permutation(all: &Split, fractions: Fractions, seed: u64) -> [Split; 3] {
    let mut idx: Vec<usize> = (0..all.n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let (n_val, n_test) = fractions.counts(all.n);
    let val = all.gather(&idx[..n_val]);
    let test = all.gather(&idx[n_val..n_val + n_test]);
    let train = all.gather(&idx[n_val + n_test..]);
    [train, val, test]
}

/// Splits the labelled samples `all` class by class: one generator seeded with `seed` permutes
/// the indices of class 0 (in `all`'s order), then of class 1, and so on; of class c's `n_c`
/// permuted indices the first `round(val n_c)` are val, the next `round(test n_c)` test, the
/// rest train. Every split keeps `all`'s order, so its head is as mixed as `all`. Regression
/// targets count as one class.
pub fn split_stratified(all: &Split, fractions: Fractions, seed: u64) -> [Split; 3] {
    let classes: Vec<usize> = match &all.y {
        Targets::Labels(l) => l.clone(),
        Targets::Values(_) => vec![0; all.n],
    };
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &c) in classes.iter().enumerate() {
        by_class.entry(c).or_default().push(i);
    }
    // 0 train, 1 val, 2 test: the order of `SPLITS`.
    let mut split_of = vec![0usize; all.n];
    let mut rng = StdRng::seed_from_u64(seed);
    for idx in by_class.values_mut() {
        idx.shuffle(&mut rng);
        let (n_val, n_test) = fractions.counts(idx.len());
        for (k, &i) in idx.iter().enumerate() {
            split_of[i] = if k < n_val {
                1
            } else if k < n_val + n_test {
                2
            } else {
                0
            };
        }
    }
    [0, 1, 2].map(|s| {
        let idx: Vec<usize> = (0..all.n).filter(|&i| split_of[i] == s).collect();
        all.gather(&idx)
    })
}

/// Standardises every channel of every split with the training split's mean and std.
pub fn standardize(splits: &mut [Split; 3], channels: usize) -> Normalization {
    let c = channels.max(1);
    let (mut sum, mut sq, mut count) = (vec![0.0f64; c], vec![0.0f64; c], vec![0usize; c]);
    let train = &splits[0];
    let plane = train.sample_len() / c;
    for (i, v) in train.x.iter().enumerate() {
        let ch = (i / plane.max(1)) % c;
        sum[ch] += *v as f64;
        sq[ch] += (*v as f64) * (*v as f64);
        count[ch] += 1;
    }
    let mean: Vec<f64> = (0..c).map(|k| sum[k] / count[k].max(1) as f64).collect();
    let std: Vec<f64> = (0..c)
        .map(|k| {
            let var = sq[k] / count[k].max(1) as f64 - mean[k] * mean[k];
            let s = var.max(0.0).sqrt();
            if s > 1e-12 {
                s
            } else {
                1.0
            }
        })
        .collect();
    for split in splits.iter_mut() {
        let plane = split.sample_len() / c;
        for (i, v) in split.x.iter_mut().enumerate() {
            let ch = (i / plane.max(1)) % c;
            *v = ((*v as f64 - mean[ch]) / std[ch]) as f32;
        }
    }
    Normalization { mean, std }
}

fn io(path: &Path, e: impl std::fmt::Display) -> OpError {
    fail(format!("{}: {e}", path.display()))
}

/// Writes the three splits and `meta.json` into `dir`; `meta.samples` is filled in here.
pub fn write_dataset(
    dir: &Path,
    mut meta: DatasetMeta,
    splits: &[Split; 3],
) -> Result<(), OpError> {
    meta.samples.clear();
    for (name, split) in SPLITS.iter().zip(splits) {
        let mut x_shape = vec![split.n];
        x_shape.extend(meta.shape);
        let x_bytes: Vec<u8> = split.x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (y_dtype, y_shape, y_bytes) = match &split.y {
            Targets::Labels(l) => (
                safetensors::Dtype::I64,
                vec![split.n],
                l.iter()
                    .flat_map(|&v| (v as i64).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            Targets::Values(v) => {
                let mut shape = vec![split.n];
                shape.extend(meta.target_shape.unwrap_or([1, 1, 1]));
                (
                    safetensors::Dtype::F32,
                    shape,
                    v.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            }
        };
        let path = dir.join(format!("{name}.safetensors"));
        let views = [
            (
                "x",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, x_shape, &x_bytes),
            ),
            (
                "y",
                safetensors::tensor::TensorView::new(y_dtype, y_shape, &y_bytes),
            ),
        ];
        let mut ok = Vec::new();
        for (n, v) in views {
            ok.push((n, v.map_err(|e| io(&path, e))?));
        }
        let bytes = safetensors::serialize(ok, &None).map_err(|e| io(&path, e))?;
        std::fs::write(&path, bytes).map_err(|e| OpError::io(path.display().to_string(), e))?;
        meta.samples.insert((*name).to_string(), split.n);
    }
    let path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| io(&path, e))?;
    std::fs::write(&path, json).map_err(|e| OpError::io(path.display().to_string(), e))
}

/// Writes the dataset as the stage's result and reports `train_samples`, `val_samples` and
/// `test_samples`.
pub fn write_splits(
    out: &mut Outputs<'_>,
    meta: DatasetMeta,
    splits: &[Split; 3],
) -> Result<(), OpError> {
    write_dataset(out.dir(), meta, splits)?;
    for (name, s) in SPLITS.iter().zip(splits) {
        out.metric(format!("{name}_samples"), s.n as f64);
    }
    Ok(())
}

/// Reads `meta.json` of the dataset in `dir`.
pub fn read_meta(dir: &Path) -> Result<DatasetMeta, OpError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read(&path).map_err(|e| {
        fail(format!(
            "{}: {e}; is this input a dataset (the output of a data.* stage)?",
            path.display()
        ))
    })?;
    serde_json::from_slice(&text).map_err(|e| io(&path, e))
}

/// Reads split `name` of the dataset in `dir`, checking it against `meta`.
pub fn read_split(dir: &Path, meta: &DatasetMeta, name: &str) -> Result<Split, OpError> {
    let path = dir.join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).map_err(|e| OpError::io(path.display().to_string(), e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(&path, e))?;
    let x = file.tensor("x").map_err(|e| io(&path, e))?;
    let n = x.shape().first().copied().unwrap_or(0);
    let mut want = vec![n];
    want.extend(meta.shape);
    if x.dtype() != safetensors::Dtype::F32 || x.shape() != want.as_slice() {
        return Err(io(
            &path,
            format!(
                "x is {:?} {:?}; meta.json says F32 {want:?}",
                x.dtype(),
                x.shape()
            ),
        ));
    }
    let xs = f32s(x.data()).ok_or_else(|| io(&path, "x: truncated data"))?;
    let y = file.tensor("y").map_err(|e| io(&path, e))?;
    let targets = match meta.task {
        Task::Classification => {
            let classes = meta.classes.unwrap_or(0);
            if y.dtype() != safetensors::Dtype::I64 || y.shape() != [n] {
                return Err(io(
                    &path,
                    format!("y is {:?} {:?}; expected I64 [{n}]", y.dtype(), y.shape()),
                ));
            }
            let mut labels = Vec::with_capacity(n);
            for chunk in y.data().chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                let v = i64::from_le_bytes(b);
                if v < 0 || v as usize >= classes {
                    return Err(io(
                        &path,
                        format!("label {v} is outside 0..{classes} (meta.json classes)"),
                    ));
                }
                labels.push(v as usize);
            }
            Targets::Labels(labels)
        }
        Task::Regression => {
            let mut want = vec![n];
            want.extend(meta.target_shape.unwrap_or([1, 1, 1]));
            if y.dtype() != safetensors::Dtype::F32 || y.shape() != want.as_slice() {
                return Err(io(
                    &path,
                    format!(
                        "y is {:?} {:?}; expected F32 {want:?}",
                        y.dtype(),
                        y.shape()
                    ),
                ));
            }
            Targets::Values(f32s(y.data()).ok_or_else(|| io(&path, "y: truncated data"))?)
        }
    };
    let split = Split {
        n,
        x: xs,
        y: targets,
    };
    let (s, t) = (meta.sample_len(), meta.target_len());
    let y_len = match &split.y {
        Targets::Labels(l) => l.len(),
        Targets::Values(v) => v.len() / t.max(1),
    };
    if split.x.len() != n * s || y_len != n {
        return Err(io(&path, "x and y hold different numbers of samples"));
    }
    Ok(split)
}

fn f32s(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.chunks_exact(4).remainder().is_empty() {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Split {
        Split {
            n,
            x: (0..n * 2).map(|v| v as f32).collect(),
            y: Targets::Labels((0..n).map(|i| i % 3).collect()),
        }
    }

    #[test]
    fn permutation_splits_partition_and_round_trip() {
        let all = toy(20);
        let splits = split_by_permutation(
            &all,
            Fractions {
                val: 0.25,
                test: 0.1,
            },
            7,
        );
        assert_eq!([splits[0].n, splits[1].n, splits[2].n], [13, 5, 2]);
        let mut seen: Vec<f32> = splits.iter().flat_map(|s| s.x.iter().copied()).collect();
        seen.sort_by(f32::total_cmp);
        assert_eq!(seen, all.x);
        assert_eq!(
            split_by_permutation(
                &all,
                Fractions {
                    val: 0.25,
                    test: 0.1
                },
                7
            ),
            splits
        );
        let dir = tempfile::tempdir().unwrap();
        let meta = DatasetMeta {
            task: Task::Classification,
            classes: Some(3),
            shape: [1, 1, 2],
            target_shape: None,
            samples: BTreeMap::new(),
            source: "test".into(),
            normalization: None,
        };
        write_dataset(dir.path(), meta, &splits).unwrap();
        let meta = read_meta(dir.path()).unwrap();
        assert_eq!(meta.samples["val"], 5);
        for (name, s) in SPLITS.iter().zip(&splits) {
            assert_eq!(&read_split(dir.path(), &meta, name).unwrap(), s);
        }
        assert!(Fractions {
            val: 0.5,
            test: 0.5
        }
        .check()
        .is_err());
    }
}
