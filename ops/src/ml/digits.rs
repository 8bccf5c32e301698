//! `data.digits`: the UCI handwritten digits, shipped inside the binary (`ops/data/`).

use std::collections::BTreeMap;
use std::io::Read;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dataset::{
    split_stratified, standardize, write_splits, DatasetMeta, Fractions, Split, Targets, Task,
};
use crate::fail;
use crate::{OpError, Outputs, ParamError, RunContext, TypedOp};

/// The file scikit-learn ships as `sklearn/datasets/data/digits.csv.gz` (UCI "Optical
/// Recognition of Handwritten Digits", CC BY 4.0; attribution in `ops/data/README.md`),
/// embedded so the op needs no path and runs the same on a cluster node.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// Images in the file.
pub const IMAGES: usize = 1797;
/// Side of the file's images, in pixels.
pub const SIDE: usize = 8;
/// Largest pixel value of the file (pixels are 0..=16).
const MAX_PIXEL: f64 = 16.0;
pub const CLASSES: usize = 10;

/// `data.digits`: the 1,797 handwritten digits of UCI's "Optical Recognition of Handwritten
/// Digits" (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), 8 x 8 pixels of 0..16 with labels 0-9,
/// read from a copy embedded in the binary. Pixels are divided by 16 to [0, 1], optionally
/// upsampled to 16 x 16, then (`standardize`, default) standardised with the training split's
/// mean and std. The split is fixed and stratified ([`split_stratified`] with `split_seed`):
/// the stage seed does not enter it, so every pipeline using the defaults sees the same split:
/// train 1,346, val 0, test 451 (per class round(0.25 n_c), n_c = 178, 182, 177, 183, 181,
/// 182, 181, 179, 174, 180 for digits 0-9). Each split keeps the file's order.
pub struct DigitsOp;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DigitsParams {
    /// Side of the images: 8 (the data's own pixels) or 16 (each image upsampled 2x by
    /// bilinear interpolation with align_corners = false, as PyTorch's `F.interpolate(x,
    /// scale_factor=2, mode="bilinear", align_corners=False)`: sample points at half-pixel
    /// centres, edges clamped).
    pub size: usize,
    /// Fraction of each class held out as the test split: round(fraction x the class's count)
    /// of its permuted images. The defaults give train 1,346 / val 0 / test 451.
    pub test_fraction: f64,
    /// Fraction of each class held out as the val split, taken before test; 0 leaves the val
    /// split empty (then `train` reports test metrics only).
    pub val_fraction: f64,
    /// Seed of the fixed per-class permutation that draws the split; the stage seed does not
    /// enter it, so pipelines using the same value see the same split.
    pub split_seed: u64,
    /// Standardise the pixels (already scaled to [0, 1]) with the training split's mean and
    /// std.
    pub standardize: bool,
}

impl Default for DigitsParams {
    fn default() -> Self {
        Self {
            size: SIDE,
            test_fraction: 0.25,
            val_fraction: 0.0,
            split_seed: 0,
            standardize: true,
        }
    }
}

/// The resolution of the images written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    /// The file's 8 x 8.
    Native,
    /// 16 x 16 by [`upsample_bilinear_2x`].
    Bilinear2x,
}

impl Resolution {
    fn side(self) -> usize {
        match self {
            Resolution::Native => SIDE,
            Resolution::Bilinear2x => 2 * SIDE,
        }
    }
}

/// Checked [`DigitsParams`].
#[derive(Debug, Clone)]
pub struct DigitsConfig {
    resolution: Resolution,
    fractions: Fractions,
    split_seed: u64,
    standardize: bool,
}

/// The embedded file as `[IMAGES, 64]` pixels (0..=16) and labels.
fn read_digits() -> Result<(Vec<u8>, Vec<usize>), OpError> {
    let bad = |m: String| fail(format!("the embedded digits.csv.gz: {m}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    let (mut pixels, mut labels) = (Vec::with_capacity(IMAGES * SIDE * SIDE), Vec::new());
    for (line_no, line) in text.lines().enumerate() {
        let values: Vec<u8> = line
            .split(',')
            .map(|v| v.trim().parse::<u8>())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("line {}: {e}", line_no + 1)))?;
        match values.split_last() {
            Some((&label, image))
                if image.len() == SIDE * SIDE
                    && (label as usize) < CLASSES
                    && image.iter().all(|&v| v as f64 <= MAX_PIXEL) =>
            {
                pixels.extend_from_slice(image);
                labels.push(label as usize);
            }
            _ => {
                return Err(bad(format!(
                    "line {} is not 64 pixels of 0..=16 and a label 0-9",
                    line_no + 1
                )))
            }
        }
    }
    if labels.len() != IMAGES {
        return Err(bad(format!("{} images, expected {IMAGES}", labels.len())));
    }
    Ok((pixels, labels))
}

/// Output pixel `dst` of a 2x upsampling reads source pixels `i0`, `i1` with weights `w0`,
/// `w1`: PyTorch's `area_pixel_compute_source_index` without aligned corners, source
/// coordinate `max((dst + 0.5) / 2 - 0.5, 0)`, the upper neighbour clamped to the last pixel.
fn taps(dst: usize, n: usize) -> (usize, usize, f64, f64) {
    let src = ((dst as f64 + 0.5) / 2.0 - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n - 1);
    let i1 = (i0 + 1).min(n - 1);
    let w1 = src - i0 as f64;
    (i0, i1, 1.0 - w1, w1)
}

/// A row-major `n x n` image upsampled to `2n x 2n` by bilinear interpolation with
/// align_corners = false (PyTorch `F.interpolate(mode="bilinear", align_corners=False)`):
/// interpolation along rows, then columns, with [`taps`]. Interior outputs mix neighbours
/// 3:1 (weights 0.75 and 0.25); the outermost output rows and columns copy the edge pixels.
pub fn upsample_bilinear_2x(img: &[f64], n: usize) -> Vec<f64> {
    let m = 2 * n;
    let mut wide = vec![0.0; n * m];
    for r in 0..n {
        for c in 0..m {
            let (i0, i1, w0, w1) = taps(c, n);
            wide[r * m + c] = w0 * img[r * n + i0] + w1 * img[r * n + i1];
        }
    }
    let mut out = vec![0.0; m * m];
    for r in 0..m {
        let (i0, i1, w0, w1) = taps(r, n);
        for c in 0..m {
            out[r * m + c] = w0 * wide[i0 * m + c] + w1 * wide[i1 * m + c];
        }
    }
    out
}

impl TypedOp for DigitsOp {
    const NAME: &'static str = "data.digits";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "the UCI handwritten digits shipped in the binary (1,797 images of 8x8, 10 classes; \
         CC BY 4.0) as a dataset with a fixed stratified split (defaults: train 1,346, \
         test 451)";
    type Params = DigitsParams;
    type Config = DigitsConfig;

    fn resolve(p: DigitsParams) -> Result<DigitsConfig, ParamError> {
        let resolution = match p.size {
            8 => Resolution::Native,
            16 => Resolution::Bilinear2x,
            other => {
                return Err(ParamError::new(
                    "size",
                    format!("{other} is not a size of the digits (8 x 8 images)"),
                )
                .with_fix(
                    "use `size: 8` for the images as they are or `size: 16` for them \
                     upsampled 2x (bilinear)",
                ))
            }
        };
        let fractions = Fractions {
            val: p.val_fraction,
            test: p.test_fraction,
        };
        fractions.check()?;
        Ok(DigitsConfig {
            resolution,
            fractions,
            split_seed: p.split_seed,
            standardize: p.standardize,
        })
    }

    fn run(
        &self,
        p: &DigitsConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        ctx.check_cancelled()?;
        let (pixels, labels) = read_digits()?;
        let side = p.resolution.side();
        let mut x = Vec::with_capacity(IMAGES * side * side);
        for image in pixels.chunks_exact(SIDE * SIDE) {
            let scaled: Vec<f64> = image.iter().map(|&v| v as f64 / MAX_PIXEL).collect();
            let image = match p.resolution {
                Resolution::Native => scaled,
                Resolution::Bilinear2x => upsample_bilinear_2x(&scaled, SIDE),
            };
            x.extend(image.into_iter().map(|v| v as f32));
        }
        let all = Split {
            n: IMAGES,
            x,
            y: Targets::Labels(labels),
        };
        let mut splits = split_stratified(&all, p.fractions, p.split_seed);
        let normalization = p.standardize.then(|| standardize(&mut splits, 1));
        let meta = DatasetMeta {
            task: Task::Classification,
            classes: Some(CLASSES),
            shape: [1, side, side],
            target_shape: None,
            samples: BTreeMap::new(),
            source: Self::NAME.to_string(),
            normalization,
        };
        write_splits(out, meta, &splits)?;
        let _ = writeln!(
            ctx.log,
            "{IMAGES} digits {side}x{side} (split seed {}): train {}, val {}, test {}",
            p.split_seed, splits[0].n, splits[1].n, splits[2].n
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{read_meta, read_split, SPLITS};
    use crate::testing::{OpRun, RunOutput};
    use crate::Op;
    use serde_json::{json, Value};

    /// Images per digit 0-9 in the shipped file.
    const PER_CLASS: [usize; CLASSES] = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180];

    fn run(params: Value, seed: u64) -> RunOutput {
        let run = OpRun::new(params).seed(seed).run(&DigitsOp);
        run.metrics();
        run
    }

    fn splits(run: &RunOutput) -> [Split; 3] {
        let meta = read_meta(&run.out_dir).unwrap();
        SPLITS.map(|name| read_split(&run.out_dir, &meta, name).unwrap())
    }

    fn per_class(split: &Split) -> [usize; CLASSES] {
        let Targets::Labels(labels) = &split.y else {
            panic!("digits have labels")
        };
        let mut counts = [0; CLASSES];
        for &l in labels {
            counts[l] += 1;
        }
        counts
    }

    fn files(run: &RunOutput) -> Vec<Vec<u8>> {
        [
            "train.safetensors",
            "val.safetensors",
            "test.safetensors",
            "meta.json",
        ]
        .iter()
        .map(|f| std::fs::read(run.out_dir.join(f)).unwrap())
        .collect()
    }

    #[test]
    fn the_shipped_file_holds_1797_labelled_8x8_images() {
        let (pixels, labels) = read_digits().unwrap();
        assert_eq!((pixels.len(), labels.len()), (IMAGES * 64, IMAGES));
        assert_eq!(pixels.iter().max(), Some(&16));
        let mut counts = [0; CLASSES];
        labels.iter().for_each(|&l| counts[l] += 1);
        assert_eq!(counts, PER_CLASS);
        // The first line of the file: a zero.
        assert_eq!(labels[0], 0);
        assert_eq!(&pixels[..8], &[0, 0, 5, 13, 9, 1, 0, 0]);
    }

    #[test]
    fn the_split_is_stratified_fixed_and_ignores_the_stage_seed() {
        let raw = json!({"standardize": false});
        let a = run(raw.clone(), 1);
        let m = a.metrics();
        assert_eq!(
            (m["train_samples"], m["val_samples"], m["test_samples"]),
            (1346.0, 0.0, 451.0)
        );
        let [train, val, test] = splits(&a);
        assert_eq!(train.n + val.n + test.n, IMAGES);
        let (test_counts, train_counts) = (per_class(&test), per_class(&train));
        for (c, &n) in PER_CLASS.iter().enumerate() {
            let want = (0.25 * n as f64).round() as usize;
            assert_eq!(test_counts[c], want, "digit {c}");
            assert_eq!(train_counts[c], n - want, "digit {c}");
        }
        // Every image lands in exactly one split: the pixel sums of all splits are the file's.
        let (pixels, _) = read_digits().unwrap();
        let file_sum: u64 = pixels.iter().map(|&v| v as u64).sum();
        let split_sum: f64 = [&train, &val, &test]
            .iter()
            .flat_map(|s| s.x.iter())
            .map(|&v| v as f64 * 16.0)
            .sum();
        assert_eq!(split_sum.round() as u64, file_sum);
        // The same split for another run, another stage seed, and with standardisation.
        assert_eq!(files(&a), files(&run(raw.clone(), 1)));
        assert_eq!(files(&a), files(&run(raw.clone(), 12345)));
        let standardised = splits(&run(json!({}), 99));
        for (s, t) in standardised.iter().zip([&train, &val, &test]) {
            assert_eq!(s.y, t.y);
        }
        // Another split seed draws other members with the same counts.
        let [other, ..] = splits(&run(json!({"standardize": false, "split_seed": 1}), 1));
        assert_eq!(per_class(&other), per_class(&train));
        assert_ne!(other.x, train.x);
        // A val split is drawn per class too, before test.
        let [train, val, test] = splits(&run(
            json!({"val_fraction": 0.1, "test_fraction": 0.2, "standardize": false}),
            1,
        ));
        let (val_counts, test_counts) = (per_class(&val), per_class(&test));
        for (c, &n) in PER_CLASS.iter().enumerate() {
            assert_eq!(
                val_counts[c],
                (0.1 * n as f64).round() as usize,
                "digit {c}"
            );
            assert_eq!(
                test_counts[c],
                (0.2 * n as f64).round() as usize,
                "digit {c}"
            );
        }
        assert_eq!(train.n + val.n + test.n, IMAGES);
    }

    #[test]
    fn size_16_is_bilinear_upsampling_without_aligned_corners() {
        // 1-D, PyTorch's interpolate(mode="linear", align_corners=False) of [a, b] at scale 2:
        // [a, 0.75a + 0.25b, 0.25a + 0.75b, b]. The 2-D case is that along rows, then columns.
        let up = upsample_bilinear_2x(&[0.0, 4.0, 8.0, 12.0], 2);
        #[rustfmt::skip]
        let want = [
            0.0, 1.0, 3.0, 4.0,
            2.0, 3.0, 5.0, 6.0,
            6.0, 7.0, 9.0, 10.0,
            8.0, 9.0, 11.0, 12.0,
        ];
        assert_eq!(up, want);
        // A constant image stays constant; a 3x3 one-hot centre spreads 3:1 to its neighbours.
        assert!(upsample_bilinear_2x(&[0.5; 9], 3).iter().all(|&v| v == 0.5));
        let mut centre = [0.0; 9];
        centre[4] = 16.0;
        let up = upsample_bilinear_2x(&centre, 3);
        // Output rows and columns 2, 3 read source index 1 with weight 0.75; 1 and 4 with 0.25.
        let w = [0.0, 0.25, 0.75, 0.75, 0.25, 0.0];
        for r in 0..6 {
            for c in 0..6 {
                assert_eq!(up[r * 6 + c], 16.0 * w[r] * w[c], "({r}, {c})");
            }
        }

        let native = splits(&run(json!({"standardize": false}), 1));
        let large = run(json!({"size": 16, "standardize": false}), 1);
        assert_eq!(read_meta(&large.out_dir).unwrap().shape, [1, 16, 16]);
        for (small, big) in native.iter().zip(splits(&large).iter()) {
            assert_eq!((small.n, &small.y), (big.n, &big.y));
            for i in 0..small.n {
                let img: Vec<f64> = small.x[i * 64..(i + 1) * 64]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let want: Vec<f32> = upsample_bilinear_2x(&img, 8)
                    .into_iter()
                    .map(|v| v as f32)
                    .collect();
                assert_eq!(&big.x[i * 256..(i + 1) * 256], want.as_slice(), "image {i}");
            }
        }
    }

    #[test]
    fn standardised_training_pixels_have_mean_0_and_std_1() {
        let out = run(json!({}), 1);
        let meta = read_meta(&out.out_dir).unwrap();
        assert_eq!(
            (meta.task, meta.classes, meta.shape),
            (Task::Classification, Some(10), [1, 8, 8])
        );
        let norm = meta.normalization.clone().unwrap();
        // Raw digits pixels in [0, 1] average about 0.3.
        assert!(norm.mean[0] > 0.2 && norm.mean[0] < 0.4, "{norm:?}");
        let [train, _, test] = splits(&out);
        let n = train.x.len() as f64;
        let mean = train.x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = train
            .x
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-5, "{mean}");
        assert!((var.sqrt() - 1.0).abs() < 1e-5, "{var}");
        // The test split is shifted by the training statistics, not its own.
        let raw = splits(&run(json!({"standardize": false}), 1));
        let want = ((raw[2].x[0] as f64 - norm.mean[0]) / norm.std[0]) as f32;
        assert!((test.x[0] - want).abs() < 1e-6);
    }

    #[test]
    fn bad_params_name_the_field_and_the_fix() {
        let err = DigitsOp.plan(&json!({"size": 12})).unwrap_err();
        assert_eq!(err.path, "size");
        assert!(err.message.contains("12"), "{}", err.message);
        assert!(
            err.fix.as_deref().unwrap().contains("`size: 16`"),
            "{err:?}"
        );
        let err = DigitsOp.plan(&json!({"test_fraction": 1.5})).unwrap_err();
        assert_eq!(err.path, "test_fraction");
        let err = DigitsOp
            .plan(&json!({"val_fraction": 0.5, "test_fraction": 0.5}))
            .unwrap_err();
        assert_eq!(err.path, "val_fraction");
        let err = DigitsOp.plan(&json!({"path": "digits"})).unwrap_err();
        assert!(err.message.starts_with("unknown field `path`"), "{err:?}");
        assert!(DigitsOp.plan(&json!({})).unwrap().deps.is_empty());
    }
}
