//! `eval.in_context`: in-context learning at inference for a fine-tuned operator
//! (`docs/methods/operator-learning.md` §5), with the metrics of §4.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dataset::{read_meta, read_split, Split, Targets};
use crate::fail;
use crate::params_doc::required;
use crate::{Count, OpError, Outputs, ParamError, RunContext, TypedOp};
use nn::train::{load_checkpoint, predict};
use nn::{from_vec, open_device, Model};

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct InContextParams {
    /// J: demos taken from the head of the demo pool's training split (the `demos` input); 0 =
    /// no ICL. Required.
    pub j: Option<usize>,
    /// Pool points per chunk of the gap computation (memory: pixels x K heap + one chunk).
    pub chunk: Count,
    /// Samples per forward pass, and the batch over which the ICL gate's threshold (the mean
    /// cv) is taken, as in the reference.
    pub batch_size: Count,
}

impl Default for InContextParams {
    fn default() -> Self {
        Self {
            j: None,
            chunk: Count(65_536),
            batch_size: Count(64),
        }
    }
}

/// Checked [`InContextParams`].
#[derive(Debug, Clone)]
pub struct InContextConfig {
    j: usize,
    chunk: usize,
    batch_size: usize,
}

/// K = floor(20 sqrt(J)) (section 5, step 3).
pub fn demo_count(j: usize) -> usize {
    (20.0 * (j as f64).sqrt()).floor() as usize
}

/// gap(i, q) = |(p_i - d_q)^2 / p_i^2| (section 5, step 2); NaN (p_i = d_q = 0) ranks last.
fn gap(p: f32, d: f32) -> f64 {
    let (p, d) = (p as f64, d as f64);
    let g = ((p - d) * (p - d) / (p * p)).abs();
    if g.is_nan() {
        f64::INFINITY
    } else {
        g
    }
}

/// A candidate demo point: ordered by gap, then pool index, so the K smallest are unique and
/// independent of how the pool is chunked.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Candidate {
    gap: f64,
    index: usize,
}
impl Eq for Candidate {}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.gap
            .total_cmp(&other.gap)
            .then(self.index.cmp(&other.index))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Section 5, steps 2-4 for one query field: per pixel, the mean of the true demo values at
/// its K smallest gaps and their |std / mean| (cv). `pred` `[P]` = p; `demo_pred`, `demo_true`
/// `[J * P]` = d and the true demo solutions. Pool points are visited `chunk` at a time, each
/// query pixel keeping a max-heap of its K best, so memory is O(P K + chunk) at any J.
/// Empty when K = 0 (no demos).
pub fn icl_stats(
    pred: &[f32],
    demo_pred: &[f32],
    demo_true: &[f32],
    k: usize,
    chunk: usize,
) -> Vec<(f64, f64)> {
    let pool = demo_pred.len();
    let k = k.min(pool);
    if k == 0 || pred.is_empty() {
        return Vec::new();
    }
    let mut heaps: Vec<BinaryHeap<Candidate>> = (0..pred.len())
        .map(|_| BinaryHeap::with_capacity(k + 1))
        .collect();
    let mut start = 0;
    while start < pool {
        let end = (start + chunk.max(1)).min(pool);
        for (i, heap) in heaps.iter_mut().enumerate() {
            let p = pred[i];
            for (q, &d) in demo_pred[start..end].iter().enumerate() {
                let c = Candidate {
                    gap: gap(p, d),
                    index: start + q,
                };
                if heap.len() < k {
                    heap.push(c);
                } else if heap.peek().is_some_and(|top| c < *top) {
                    heap.pop();
                    heap.push(c);
                }
            }
        }
        start = end;
    }
    heaps
        .iter()
        .map(|heap| {
            let vals: Vec<f64> = heap.iter().map(|c| demo_true[c.index] as f64).collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / vals.len() as f64;
            (mean, (var.sqrt() / mean).abs())
        })
        .collect()
}

/// Section 5, steps 2-5 for a batch of query fields: a pixel takes its demo mean where its cv
/// is below the mean cv over every pixel of every field *in the batch* (non-finite cvs left out
/// of the mean and never below it), else keeps its prediction. The threshold is per batch, as
/// the reference computes it (delta-lab-ai/data_efficient_nopt `models/fno.py` `forward_icl`),
/// so a field's result depends on the batch it is evaluated in. Returns the ICL fields and the
/// number of pixels that took the demo mean.
pub fn icl_batch(
    preds: &[&[f32]],
    demo_pred: &[f32],
    demo_true: &[f32],
    k: usize,
    chunk: usize,
) -> (Vec<Vec<f32>>, usize) {
    let stats: Vec<Vec<(f64, f64)>> = preds
        .iter()
        .map(|p| icl_stats(p, demo_pred, demo_true, k, chunk))
        .collect();
    let finite: Vec<f64> = stats
        .iter()
        .flatten()
        .map(|s| s.1)
        .filter(|c| c.is_finite())
        .collect();
    let mean_cv = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let mut used = 0usize;
    let fields = preds
        .iter()
        .zip(&stats)
        .map(|(pred, st)| {
            if st.is_empty() {
                return pred.to_vec();
            }
            pred.iter()
                .zip(st)
                .map(|(&p, &(mean, cv))| {
                    if cv < mean_cv {
                        used += 1;
                        mean as f32
                    } else {
                        p
                    }
                })
                .collect()
        })
        .collect();
    (fields, used)
}

/// [`icl_batch`] on a batch of one field; returns the field and the fraction of its pixels
/// that took the demo mean.
pub fn icl_field(
    pred: &[f32],
    demo_pred: &[f32],
    demo_true: &[f32],
    k: usize,
    chunk: usize,
) -> (Vec<f32>, f64) {
    let (mut fields, used) = icl_batch(&[pred], demo_pred, demo_true, k, chunk);
    (fields.remove(0), used as f64 / pred.len().max(1) as f64)
}

/// Per-field metrics (section 4): relative L2, relative L2 of the fields each divided by its
/// own max |.|, Pearson r, and the least-squares slope of prediction on truth.
pub fn field_metrics(pred: &[f32], truth: &[f32]) -> [f64; 4] {
    let rel = |a: &[f64], b: &[f64]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    };
    let p: Vec<f64> = pred.iter().map(|v| *v as f64).collect();
    let t: Vec<f64> = truth.iter().map(|v| *v as f64).collect();
    let norm = |v: &[f64]| {
        let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        v.iter().map(|x| x / m).collect::<Vec<f64>>()
    };
    let n = p.len() as f64;
    let (mp, mt) = (p.iter().sum::<f64>() / n, t.iter().sum::<f64>() / n);
    let cov: f64 = p.iter().zip(&t).map(|(a, b)| (a - mp) * (b - mt)).sum();
    let vp: f64 = p.iter().map(|a| (a - mp) * (a - mp)).sum();
    let vt: f64 = t.iter().map(|b| (b - mt) * (b - mt)).sum();
    [
        rel(&p, &t),
        rel(&norm(&p), &norm(&t)),
        cov / (vp * vt).sqrt(),
        cov / vt,
    ]
}

fn predict_all(model: &mut Model<f32>, split: &Split, bs: usize) -> Result<Vec<f32>, OpError> {
    let dev = open_device()?;
    let shape = model.input_shape();
    let per = shape.channels * shape.height * shape.width;
    let mut out = Vec::with_capacity(split.n * shape.height * shape.width);
    for start in (0..split.n).step_by(bs.max(1)) {
        let end = (start + bs.max(1)).min(split.n);
        let x = from_vec(
            &dev,
            split.x[start * per..end * per].to_vec(),
            (end - start, shape.channels, shape.height, shape.width),
        )?;
        out.extend(predict(model, x)?.as_vec());
    }
    Ok(out)
}

fn values(split: &Split) -> Result<&[f32], OpError> {
    match &split.y {
        Targets::Values(v) => Ok(v),
        Targets::Labels(_) => Err(fail("eval.in_context needs regression (field) targets")),
    }
}

pub struct InContextOp;

impl TypedOp for InContextOp {
    const NAME: &'static str = "eval.in_context";
    // Version 2: the gate's threshold is the mean cv of the batch, not of one field.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "in-context learning at inference (prediction-similarity demos, cv gate) on an OOD test set";
    type Params = InContextParams;
    type Config = InContextConfig;

    fn resolve(p: InContextParams) -> Result<InContextConfig, ParamError> {
        Ok(InContextConfig {
            j: required(p.j, "j")?,
            chunk: p.chunk.get(),
            batch_size: p.batch_size.get(),
        })
    }
    fn required_inputs(p: &InContextConfig) -> Vec<String> {
        let mut names = vec!["model".to_string(), "test".to_string()];
        if p.j > 0 {
            names.push("demos".to_string());
        }
        names
    }

    fn run(
        &self,
        p: &InContextConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let started = Instant::now();
        let mut model = load_checkpoint::<f32>(&open_device()?, ctx.one_input("model")?)?;
        let test_dir = ctx.one_input("test")?.to_path_buf();
        let test = read_split(&test_dir, &read_meta(&test_dir)?, "test")?;
        if test.n == 0 {
            return Err(fail("the `test` input's test split is empty"));
        }
        let truth = values(&test)?;
        let preds = predict_all(&mut model, &test, p.batch_size)?;
        let plane = truth.len() / test.n;
        if preds.len() != truth.len() {
            return Err(fail(format!(
                "the model predicts {} values per sample, the test targets have {plane}",
                preds.len() / test.n
            )));
        }
        let (demo_pred, demo_true) = if p.j > 0 {
            let dir = ctx.one_input("demos")?.to_path_buf();
            let pool = read_split(&dir, &read_meta(&dir)?, "train")?;
            if pool.n < p.j {
                return Err(fail(format!(
                    "j = {} demos asked for, the demo pool's train split has {}",
                    p.j, pool.n
                )));
            }
            let demos = pool.head(p.j);
            (
                predict_all(&mut model, &demos, p.batch_size)?,
                values(&demos)?.to_vec(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let k = demo_count(p.j);
        let names = ["rel_l2", "norm_rel_l2", "pearson_r", "slope"];
        let (mut base, mut icl) = ([0.0f64; 4], [0.0f64; 4]);
        let mut used = 0usize;
        for batch in (0..test.n).collect::<Vec<_>>().chunks(p.batch_size) {
            ctx.check_cancelled()?;
            let field =
                |s: usize, v: &'_ [f32]| -> Vec<f32> { v[s * plane..(s + 1) * plane].to_vec() };
            let (p_b, t_b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = batch
                .iter()
                .map(|&s| (field(s, &preds), field(s, truth)))
                .unzip();
            let refs: Vec<&[f32]> = p_b.iter().map(Vec::as_slice).collect();
            let (fields, n_used) = icl_batch(&refs, &demo_pred, &demo_true, k, p.chunk);
            used += n_used;
            for ((p_s, t_s), f) in p_b.iter().zip(&t_b).zip(&fields) {
                for (acc, v) in base.iter_mut().zip(field_metrics(p_s, t_s)) {
                    *acc += v / test.n as f64;
                }
                for (acc, v) in icl.iter_mut().zip(field_metrics(f, t_s)) {
                    *acc += v / test.n as f64;
                }
            }
        }
        for (i, name) in names.iter().enumerate() {
            out.metric(*name, base[i]);
            out.metric(format!("{name}_icl"), icl[i]);
        }
        out.metric("j", p.j as f64);
        out.metric("k", k.min(demo_pred.len()) as f64);
        out.metric("icl_pixel_fraction", used as f64 / (test.n * plane) as f64);
        out.metric("test_samples", test.n as f64);
        let _ = writeln!(
            ctx.log,
            "eval.in_context: J {} K {k} on {} OOD samples: rel_l2 {:.4} -> {:.4} with ICL",
            p.j, test.n, base[0], icl[0]
        );
        out.write_metrics_file()?;
        out.metric("wall_time_s", started.elapsed().as_secs_f64());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_rule() {
        let ks: Vec<usize> = [1, 2, 4, 8, 16].iter().map(|&j| demo_count(j)).collect();
        assert_eq!(ks, [20, 28, 40, 56, 80]);
        assert_eq!(demo_count(0), 0);
    }

    /// Hand-made case: two query pixels, pool of 6 points, K = 2.
    /// Pixel 0 (p = 1.0): gaps to d = [1.1, 0.5, 3.0, 0.95, -1.0, 2.0] are
    /// [0.01, 0.25, 4, 0.0025, 4, 1] -> the two smallest are q = 3, 0 with truths 10, 12:
    /// mean 11, cv = 1/11. Pixel 1 (p = 2.0): gaps [0.2025, 0.5625, 0.25, 0.2756, 2.25, 0] ->
    /// q = 5, 0 with truths 40, 12: mean 26, cv = 14/26. Mean cv = 0.315: pixel 0 takes 11,
    /// pixel 1 keeps 2.0.
    #[test]
    fn selection_on_a_hand_made_case() {
        let pred = [1.0f32, 2.0];
        let d = [1.1f32, 0.5, 3.0, 0.95, -1.0, 2.0];
        let t = [12.0f32, 7.0, 0.0, 10.0, 5.0, 40.0];
        for chunk in [1, 2, 4, 6, 100] {
            let (out, frac) = icl_field(&pred, &d, &t, 2, chunk);
            assert_eq!(out, vec![11.0, 2.0], "chunk {chunk}");
            assert_eq!(frac, 0.5);
        }
        // K = 0 (J = 0): predictions unchanged.
        assert_eq!(icl_field(&pred, &d, &t, 0, 3).0, pred.to_vec());
    }

    /// The gate's threshold is the batch's mean cv: field B alone ([1, 1], both cv 1/11) keeps
    /// its predictions (no cv is below its own mean), but batched with the hand-made field A
    /// (cvs 1/11, 14/26) the mean cv is 0.203, so both of B's pixels take the demo mean 11.
    #[test]
    fn the_gate_threshold_is_per_batch() {
        let d = [1.1f32, 0.5, 3.0, 0.95, -1.0, 2.0];
        let t = [12.0f32, 7.0, 0.0, 10.0, 5.0, 40.0];
        let (a, b) = ([1.0f32, 2.0], [1.0f32, 1.0]);
        assert_eq!(icl_field(&b, &d, &t, 2, 6).0, vec![1.0, 1.0]);
        let (fields, used) = icl_batch(&[&a, &b], &d, &t, 2, 6);
        assert_eq!(fields, vec![vec![11.0, 2.0], vec![11.0, 11.0]]);
        assert_eq!(used, 3);
    }

    #[test]
    fn chunking_matches_the_unchunked_computation() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let pixels = 64;
        let pool = 4 * pixels;
        // Quantised values make many exact gap ties, which the index order must break the
        // same way in every chunking.
        let q = |r: &mut rand::rngs::StdRng| (r.gen_range(-8i32..8) as f32) * 0.25;
        let pred: Vec<f32> = (0..pixels).map(|_| q(&mut rng)).collect();
        let d: Vec<f32> = (0..pool).map(|_| q(&mut rng)).collect();
        let t: Vec<f32> = (0..pool).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let k = demo_count(4);
        let whole = icl_field(&pred, &d, &t, k, pool);
        for chunk in [1, 7, 64, 255] {
            assert_eq!(icl_field(&pred, &d, &t, k, chunk), whole, "chunk {chunk}");
        }
        // Against a full sort of every gap.
        let (out, _) = &whole;
        let mut cvs = Vec::new();
        let mut means = Vec::new();
        for &p in &pred {
            let mut all: Vec<Candidate> = d
                .iter()
                .enumerate()
                .map(|(i, &dq)| Candidate {
                    gap: gap(p, dq),
                    index: i,
                })
                .collect();
            all.sort();
            let vals: Vec<f64> = all[..k].iter().map(|c| t[c.index] as f64).collect();
            let mean = vals.iter().sum::<f64>() / k as f64;
            let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / k as f64).sqrt();
            means.push(mean);
            cvs.push((sd / mean).abs());
        }
        let mean_cv = cvs.iter().filter(|c| c.is_finite()).sum::<f64>()
            / cvs.iter().filter(|c| c.is_finite()).count() as f64;
        for (i, &o) in out.iter().enumerate() {
            let want = if cvs[i] < mean_cv {
                means[i] as f32
            } else {
                pred[i]
            };
            assert_eq!(o, want);
        }
    }

    #[test]
    fn metrics_of_a_scaled_field() {
        let t = [1.0f32, -2.0, 3.0, 0.5];
        let p: Vec<f32> = t.iter().map(|v| 2.0 * v).collect();
        let [rel, norm, r, slope] = field_metrics(&p, &t);
        assert!((rel - 1.0).abs() < 1e-12);
        assert!(norm.abs() < 1e-12);
        assert!((r - 1.0).abs() < 1e-12);
        assert!((slope - 2.0).abs() < 1e-12);
    }
}
