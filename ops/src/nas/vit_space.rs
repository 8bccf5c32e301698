//! The As-ViT search space and its training-free scores (`docs/methods/asvit.md` §1-2):
//! topologies of 13 categorical choices, the length distortion L_E and the NTK condition number
//! of `vit` models, and the seed search (random sampling, REINFORCE) that `search` runs with
//! `space: vit`; `models.json`, the list of `{label, model}` that a vit search and `scale`
//! write and a `train` stage reads with `model_from`.

use std::collections::HashMap;

use dfdx::shapes::HasShape;
use dfdx::tensor::{Gradients, Trace};
use dfdx::tensor_ops::{Backward, SumTo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::indicators::{condition_number, Failure, Images, Indicator};
use super::rank::{best_by_rank_sum, ChangingRange};
use super::search::ReinforceConfig;
use crate::seed::derive_seed;
use crate::{OpError, Outputs};
use nn::models::{InputShape, VitSpec};
use nn::{collect_params, open_device, Init, Model, ModelSpec, NnError, ParamKind, VarBuilder};

/// The file listing models a `train` stage can take with `model_from`.
pub const MODELS_FILE: &str = "models.json";

/// One entry of [`MODELS_FILE`].
#[derive(Serialize)]
struct ListedModel {
    label: String,
    model: ModelSpec,
}

/// Writes [`MODELS_FILE`]: one `{label, model}` per (label, spec), in order.
pub fn write_models(
    out: &Outputs<'_>,
    models: impl IntoIterator<Item = (String, VitSpec)>,
) -> Result<(), OpError> {
    let list: Vec<ListedModel> = models
        .into_iter()
        .map(|(label, spec)| ListedModel {
            label,
            model: ModelSpec::Vit(spec),
        })
        .collect();
    out.write_json(MODELS_FILE, &list)
}

/// The 13 categorical choices of the space (`docs/methods/asvit.md` §1): tokenizer and merging
/// kernels, windows per side (stage 4 is global), MLP expansions, heads of the last stage.
pub const CHOICES: [(&str, &[usize]); 13] = [
    ("kernel1", &[4, 5, 6, 7, 8]),
    ("kernel2", &[2, 3, 4]),
    ("kernel3", &[2, 3, 4]),
    ("kernel4", &[2, 3, 4]),
    ("split1", &[2, 4, 8]),
    ("split2", &[1, 2, 4]),
    ("split3", &[1, 2]),
    ("split4", &[1]),
    ("expansion1", &[2, 3, 4, 5, 6]),
    ("expansion2", &[2, 3, 4, 5, 6]),
    ("expansion3", &[2, 3, 4, 5, 6]),
    ("expansion4", &[2, 3, 4, 5, 6]),
    ("heads", &[16, 32, 64]),
];

/// One point of the space: the part of a [`VitSpec`] that search chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VitTopology {
    /// Kernel of the tokenizer (stage 1) and of the three merging layers.
    pub kernels: [usize; 4],
    /// Windows per side of each stage's attention (stage 4 is global: 1).
    pub splits: [usize; 4],
    /// MLP expansion ratio of each stage.
    pub expansions: [usize; 4],
    /// Heads of the last stage (stage 1 has an eighth of them, each later stage twice the one
    /// before).
    pub heads: usize,
}

impl VitTopology {
    /// Number of topologies: about 4.6M (`docs/methods/asvit.md` §1).
    pub fn space_size() -> usize {
        CHOICES.iter().map(|(_, o)| o.len()).product()
    }

    /// The topology with option `idx[j]` of choice j.
    pub fn from_indices(idx: &[usize; 13]) -> Self {
        let v = |j: usize| CHOICES[j].1[idx[j]];
        Self {
            kernels: [v(0), v(1), v(2), v(3)],
            splits: [v(4), v(5), v(6), v(7)],
            expansions: [v(8), v(9), v(10), v(11)],
            heads: v(12),
        }
    }

    /// The option index of every choice; `None` when a value is outside the space.
    pub fn indices(&self) -> Option<[usize; 13]> {
        let vals = [
            self.kernels[0],
            self.kernels[1],
            self.kernels[2],
            self.kernels[3],
            self.splits[0],
            self.splits[1],
            self.splits[2],
            self.splits[3],
            self.expansions[0],
            self.expansions[1],
            self.expansions[2],
            self.expansions[3],
            self.heads,
        ];
        let mut idx = [0; 13];
        for (j, v) in vals.iter().enumerate() {
            idx[j] = CHOICES[j].1.iter().position(|o| o == v)?;
        }
        Some(idx)
    }

    pub fn random(rng: &mut impl Rng) -> Self {
        let mut idx = [0; 13];
        for (j, (_, opts)) in CHOICES.iter().enumerate() {
            idx[j] = rng.gen_range(0..opts.len());
        }
        Self::from_indices(&idx)
    }

    /// `K8444_S2111_E3246_H32`.
    pub fn label(&self) -> String {
        let cat = |v: &[usize; 4]| v.iter().map(|x| x.to_string()).collect::<String>();
        format!(
            "K{}_S{}_E{}_H{}",
            cat(&self.kernels),
            cat(&self.splits),
            cat(&self.expansions),
            self.heads
        )
    }

    /// The model at width `hidden` with `depths` blocks per stage.
    pub fn spec(&self, hidden: usize, depths: [usize; 4], classes: usize) -> VitSpec {
        VitSpec {
            kernels: self.kernels.to_vec(),
            splits: self.splits.to_vec(),
            expansions: self.expansions.to_vec(),
            heads: self.heads,
            depths: Some(depths.to_vec()),
            hidden,
            classes,
        }
    }
}

/// `points` points of a unit circle x(theta_k) = U [cos theta_k, sin theta_k],
/// theta_k = 2 pi k / points, in R^dim; U a random orthonormal 2-frame (Gram-Schmidt of two
/// Gaussian vectors). Row-major `(points, dim)`.
pub fn random_circle(dim: usize, points: usize, rng: &mut StdRng) -> Vec<f64> {
    let gauss = |rng: &mut StdRng| -> Vec<f64> {
        (0..dim)
            .map(|_| Distribution::<f64>::sample(&StandardNormal, rng))
            .collect()
    };
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let mut u = gauss(rng);
    let nu = norm(&u);
    u.iter_mut().for_each(|a| *a /= nu);
    let mut v = gauss(rng);
    let dot: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
    v.iter_mut().zip(&u).for_each(|(b, a)| *b -= dot * a);
    let nv = norm(&v);
    v.iter_mut().for_each(|b| *b /= nv);
    let mut out = Vec::with_capacity(points * dim);
    for k in 0..points {
        let t = 2.0 * std::f64::consts::PI * k as f64 / points as f64;
        out.extend(u.iter().zip(&v).map(|(a, b)| a * t.cos() + b * t.sin()));
    }
    out
}

/// Length of the closed polygon through `points` rows of width `width` (row-major): the
/// finite-difference arc length sum_k ||f(x_{k+1}) - f(x_k)||, k mod points.
pub fn closed_polygon_length(rows: &[f64], points: usize, width: usize) -> f64 {
    (0..points)
        .map(|k| {
            let (a, b) = (k * width, ((k + 1) % points) * width);
            (0..width)
                .map(|j| (rows[b + j] - rows[a + j]).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .sum()
}

/// `docs/methods/asvit.md` §2, length distortion L_E, the finite-difference estimator: the arc
/// length of f(circle) over `points` points of a random unit circle in input space (`dim` values
/// per input), mean over `repeats` circles. `f` maps `(points, dim)` rows to `(points, width)` rows
/// and gets the repeat index (a fresh initialization per repeat).
pub fn length_distortion(
    dim: usize,
    points: usize,
    repeats: usize,
    seed: u64,
    mut f: impl FnMut(usize, Vec<f64>) -> Result<(Vec<f64>, usize), NnError>,
) -> Result<f64, Failure> {
    const IND: Indicator = Indicator::LengthDistortion;
    let mut sum = 0.0;
    for r in 0..repeats.max(1) {
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 8_000 + r as u64));
        let circle = random_circle(dim, points, &mut rng);
        let (rows, width) = f(r, circle).map_err(|e| Failure::Network {
            indicator: IND.name(),
            message: e.to_string(),
        })?;
        sum += closed_polygon_length(&rows, points, width);
    }
    crate::nas::indicators::finite(IND, sum / repeats.max(1) as f64)
}

/// The std of the Linear weights a ViT is scored at.
pub const SCORING_LINEAR_STD: f64 = 0.02;

/// What `search.json` records as the scoring init.
pub const SCORING_INIT: &str = "Linear weights trunc_normal(std 0.02, [-2, 2]), Linear biases 0; \
     the conv tokenizer and LayerNorms at their defaults";

/// The init a ViT is scored at: the reference's (VITA-Group/AsViT `transformer.py`
/// `_init_weights`): every Linear weight from a truncated normal of std 0.02 with zero bias, the
/// conv tokenizer at PyTorch's default. Patch merging there is a Linear without bias; here its
/// bias is zero at init, which gives the same function and, since kappa takes weights only, the
/// same NTK. Under the uniform default init L_E ranks topologies differently (it falls with the
/// product of kernel sizes instead of rising; the test below checks the reference behaviour).
pub fn scoring_init() -> Init {
    Init::default().with_linear_trunc_normal(SCORING_LINEAR_STD)
}

/// Scores `vit` specs on a fixed indicator list (L_E and/or kappa).
pub struct VitScorer {
    pub indicators: Vec<Indicator>,
    pub points: usize,
    pub repeats: usize,
    /// Images for the NTK; their shape is the input shape of every scored model.
    pub images: Images,
    pub seed: u64,
}

impl VitScorer {
    fn input(&self) -> InputShape {
        let (_, c, h, w) = self.images.shape;
        InputShape {
            channels: c,
            height: h,
            width: w,
        }
    }

    fn build(&self, spec: &VitSpec, repeat: usize) -> Result<Model<f64>, NnError> {
        let (dev, init) = (open_device()?, scoring_init());
        let vb = VarBuilder::new(&dev, &init, derive_seed(self.seed, 7_000 + repeat as u64));
        Model::build(&ModelSpec::Vit(spec.clone()), self.input(), vb)
    }

    /// `docs/methods/asvit.md` §2: L_E of the pooled last-stage features with every LayerNorm as
    /// identity.
    pub fn length_distortion(&self, spec: &VitSpec) -> Result<f64, Failure> {
        let input = self.input();
        let dim = input.channels * input.height * input.width;
        length_distortion(dim, self.points, self.repeats, self.seed, |r, circle| {
            let mut m = self.build(spec, r)?;
            let vit = m
                .vit_mut()
                .ok_or_else(|| NnError::spec("model", "not a vit"))?;
            vit.set_identity_norms(true);
            let x = nn::from_vec(
                &open_device()?,
                circle,
                (self.points, input.channels, input.height, input.width),
            )?;
            let y = vit.features(x)?;
            let width = y.shape().1;
            Ok((y.as_vec(), width))
        })
    }

    /// `docs/methods/asvit.md` §2: kappa of the NTK of the pooled features: row i is
    /// d(sum_k f_k(x_i)) / d theta over every weight tensor (names ending in `weight`: linear and
    /// conv matrices, LayerNorm gammas; no biases), LayerNorms on; mean over repeats. One sample
    /// per backward pass (a ViT has no batch coupling).
    pub fn ntk(&self, spec: &VitSpec) -> Result<f64, Failure> {
        const IND: Indicator = Indicator::Ntk;
        let net = |e: NnError| Failure::Network {
            indicator: IND.name(),
            message: e.to_string(),
        };
        let (b, c, h, w) = self.images.shape;
        let per = c * h * w;
        let dev = open_device().map_err(net)?;
        let mut sum = 0.0;
        for r in 0..self.repeats.max(1) {
            let m = self.build(spec, r).map_err(net)?;
            let vit = m
                .vit()
                .ok_or_else(|| net(NnError::spec("model", "not a vit")))?;
            let mut rows = Vec::with_capacity(b);
            for i in 0..b {
                let xi = nn::from_vec(
                    &dev,
                    self.images.x[i * per..(i + 1) * per].to_vec(),
                    (1, c, h, w),
                )
                .map_err(net)?;
                let y = vit.features(xi.traced(Gradients::leaky())).map_err(net)?;
                let grads = y
                    .try_sum::<dfdx::shapes::Rank0, _>()
                    .and_then(|l| l.try_backward())
                    .map_err(|e| net(e.into()))?;
                let mut grads = grads;
                let mut row = Vec::new();
                for (name, p) in collect_params(&m) {
                    if p.kind == ParamKind::Trainable && name.ends_with("weight") {
                        grads.try_alloc_for(&p.value).map_err(|e| net(e.into()))?;
                        row.extend(grads.get(&p.value).as_vec());
                    }
                }
                rows.push(row);
            }
            sum += condition_number(&rows)?;
        }
        crate::nas::indicators::finite(IND, sum / self.repeats.max(1) as f64)
    }

    /// One result per indicator, in order; one failing leaves the others.
    pub fn score(&self, spec: &VitSpec) -> Vec<Result<f64, Failure>> {
        self.indicators
            .iter()
            .map(|ind| match ind {
                Indicator::LengthDistortion => self.length_distortion(spec),
                Indicator::Ntk => self.ntk(spec),
                other => Err(Failure::Network {
                    indicator: other.name(),
                    message: "not measured on ViTs".into(),
                }),
            })
            .collect()
    }
}

/// One scored topology.
#[derive(Clone, Debug)]
pub struct VitRecord {
    pub topology: VitTopology,
    pub phase: String,
    /// One result per indicator.
    pub results: Vec<Result<f64, Failure>>,
}

impl VitRecord {
    pub fn values(&self) -> Vec<Option<f64>> {
        self.results
            .iter()
            .map(|r| r.as_ref().ok().copied())
            .collect()
    }

    /// The first failed indicator's failure, if any.
    pub fn failure(&self) -> Option<&Failure> {
        self.results.iter().find_map(|r| r.as_ref().err())
    }
}

/// The trajectory of a ViT search: every topology scored once, batches in parallel.
pub struct VitEvaluator<'a> {
    pub scorer: &'a VitScorer,
    pub hidden: usize,
    pub classes: usize,
    pool: &'a rayon::ThreadPool,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    pub records: Vec<VitRecord>,
    index: HashMap<VitTopology, usize>,
}

impl<'a> VitEvaluator<'a> {
    pub fn new(
        scorer: &'a VitScorer,
        hidden: usize,
        classes: usize,
        pool: &'a rayon::ThreadPool,
        cancelled: &'a (dyn Fn() -> bool + Sync),
    ) -> Self {
        Self {
            scorer,
            hidden,
            classes,
            pool,
            cancelled,
            records: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub fn spec(&self, t: &VitTopology) -> VitSpec {
        t.spec(self.hidden, [1; 4], self.classes)
    }

    /// Scores the topologies not seen before; returns each one's record index.
    pub fn score(&mut self, tops: &[VitTopology], phase: &str) -> Result<Vec<usize>, OpError> {
        if (self.cancelled)() {
            return Err(OpError::Cancelled);
        }
        let mut todo: Vec<VitTopology> = Vec::new();
        for t in tops {
            if !self.index.contains_key(t) && !todo.contains(t) {
                todo.push(*t);
            }
        }
        let specs: Vec<VitSpec> = todo.iter().map(|t| self.spec(t)).collect();
        let scorer = self.scorer;
        let scored: Vec<Vec<Result<f64, Failure>>> = self
            .pool
            .install(|| specs.par_iter().map(|s| scorer.score(s)).collect());
        for (t, results) in todo.into_iter().zip(scored) {
            self.index.insert(t, self.records.len());
            self.records.push(VitRecord {
                topology: t,
                phase: phase.to_string(),
                results,
            });
        }
        Ok(tops.iter().map(|t| self.index[t]).collect())
    }

    /// The rank-sum best of every record.
    pub fn best(&self) -> Result<usize, OpError> {
        let table: Vec<Vec<Option<f64>>> = self.records.iter().map(VitRecord::values).collect();
        best_by_rank_sum(&table, &self.scorer.indicators).ok_or_else(|| {
            OpError::Failed(format!(
                "every topology failed its indicators; the last failure: {}",
                self.records
                    .last()
                    .and_then(VitRecord::failure)
                    .map_or_else(|| "none scored".to_string(), ToString::to_string)
            ))
        })
    }
}

/// The random baseline of As-ViT (arXiv 2202.11921): `samples` distinct topologies, scored in one parallel batch.
pub fn random_vit_search(
    ev: &mut VitEvaluator<'_>,
    samples: usize,
    seed: u64,
) -> Result<usize, OpError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tops: Vec<VitTopology> = Vec::with_capacity(samples);
    let mut tries = 0;
    while tops.len() < samples && tries < samples * 100 {
        let t = VitTopology::random(&mut rng);
        if !tops.contains(&t) {
            tops.push(t);
        }
        tries += 1;
    }
    ev.score(&tops, "sample")?;
    ev.best()
}

/// The answer's record index, the final choice probabilities and every reward.
pub type ReinforceOutcome = (usize, Vec<Vec<f64>>, Vec<f64>);

/// As-ViT's seed search (arXiv 2202.11921 §3.2): independent categoricals over the 13 choices
/// (logits 1e-3 N(0, 1)), reward = changing-range -Delta(kappa) + Delta(L_E) (arXiv 2108.11939
/// §3.3), EMA baseline, Adam ascending the REINFORCE objective. The answer is the policy's
/// argmax after the last step (VITA-Group/AsViT `search/reinforce.py`), scored like every other
/// topology; not the best topology seen. Returns the answer's record index, the final choice
/// probabilities and every reward.
pub fn reinforce_vit_search(
    ev: &mut VitEvaluator<'_>,
    cfg: &ReinforceConfig,
    seed: u64,
) -> Result<ReinforceOutcome, OpError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut logits: Vec<Vec<f64>> = CHOICES
        .iter()
        .map(|(_, o)| {
            (0..o.len())
                .map(|_| 1e-3 * Distribution::<f64>::sample(&StandardNormal, &mut rng))
                .collect()
        })
        .collect();
    let softmax = |l: &[f64]| -> Vec<f64> {
        let m = l.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    let mut m1: Vec<Vec<f64>> = logits.iter().map(|l| vec![0.0; l.len()]).collect();
    let mut m2 = m1.clone();
    let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
    let mut baseline = 0.0;
    let indicators = ev.scorer.indicators.clone();
    let mut reward_fn = ChangingRange::new(&indicators, cfg.window);
    let mut rewards = Vec::new();
    for step in 0..cfg.steps {
        let probs: Vec<Vec<f64>> = logits.iter().map(|l| softmax(l)).collect();
        let draws: Vec<[usize; 13]> = (0..cfg.batch.max(1))
            .map(|_| {
                let mut idx = [0; 13];
                for (j, p) in probs.iter().enumerate() {
                    let u: f64 = rng.gen();
                    let mut acc = 0.0;
                    idx[j] = p.len() - 1;
                    for (o, q) in p.iter().enumerate() {
                        acc += q;
                        if u < acc {
                            idx[j] = o;
                            break;
                        }
                    }
                }
                idx
            })
            .collect();
        let tops: Vec<VitTopology> = draws.iter().map(VitTopology::from_indices).collect();
        let ids = ev.score(&tops, &format!("step {}", step + 1))?;
        let mut grad: Vec<Vec<f64>> = logits.iter().map(|l| vec![0.0; l.len()]).collect();
        for (idx, &i) in draws.iter().zip(&ids) {
            let r = reward_fn.reward(&ev.records[i].values());
            rewards.push(r);
            let adv = r - baseline;
            baseline = cfg.momentum * baseline + (1.0 - cfg.momentum) * r;
            for (j, g) in grad.iter_mut().enumerate() {
                for (o, gv) in g.iter_mut().enumerate() {
                    let onehot = if o == idx[j] { 1.0 } else { 0.0 };
                    *gv += adv * (onehot - probs[j][o]) / draws.len() as f64;
                }
            }
        }
        let t = (step + 1) as i32;
        for j in 0..logits.len() {
            for o in 0..logits[j].len() {
                let g = grad[j][o];
                m1[j][o] = beta1 * m1[j][o] + (1.0 - beta1) * g;
                m2[j][o] = beta2 * m2[j][o] + (1.0 - beta2) * g * g;
                let mh = m1[j][o] / (1.0 - beta1.powi(t));
                let vh = m2[j][o] / (1.0 - beta2.powi(t));
                logits[j][o] += cfg.lr * mh / (vh.sqrt() + eps);
            }
        }
    }
    let probs: Vec<Vec<f64>> = logits.iter().map(|l| softmax(l)).collect();
    let mut argmax = [0usize; 13];
    for (j, p) in probs.iter().enumerate() {
        argmax[j] = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
            .unwrap_or(0);
    }
    let answer = ev.score(&[VitTopology::from_indices(&argmax)], "argmax")?[0];
    Ok((answer, probs, rewards))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_distortion_of_a_scaled_rotation_is_known_exactly() {
        // f(x) = s Q x with Q orthogonal maps the unit circle to a circle of radius s: the
        // closed polygon through M equally spaced points has length 2 M s sin(pi / M), which
        // tends to 2 pi s.
        let (dim, m, s) = (6, 64, 2.5);
        // Q: a permutation with sign flips (orthogonal).
        let perm = [3, 0, 5, 1, 4, 2];
        let sign = [1.0, -1.0, 1.0, 1.0, -1.0, 1.0];
        let l = length_distortion(dim, m, 3, 11, |_, x| {
            let rows: Vec<f64> = x
                .chunks(dim)
                .flat_map(|row| (0..dim).map(move |i| s * sign[i] * row[perm[i]]))
                .collect();
            Ok((rows, dim))
        })
        .unwrap();
        let exact = 2.0 * m as f64 * s * (std::f64::consts::PI / m as f64).sin();
        assert!((l - exact).abs() < 1e-9, "{l} vs {exact}");
        assert!((l - 2.0 * std::f64::consts::PI * s).abs() < 0.01);
        // Projecting onto one coordinate never lengthens the curve.
        let proj = length_distortion(dim, m, 1, 11, |_, x| {
            Ok((x.chunks(dim).map(|r| r[0]).collect(), 1))
        })
        .unwrap();
        assert!(proj < 2.0 * std::f64::consts::PI && proj > 0.0);
        let nan = length_distortion(dim, m, 1, 11, |_, x| Ok((vec![f64::NAN; x.len()], dim)));
        assert!(matches!(nan, Err(Failure::NonFinite { .. })));
    }

    #[test]
    fn the_space_has_the_papers_size_and_round_trips() {
        assert_eq!(VitTopology::space_size(), 4_556_250);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let t = VitTopology::random(&mut rng);
            assert_eq!(VitTopology::from_indices(&t.indices().unwrap()), t);
            t.spec(32, [1; 4], 10).validate().unwrap();
            t.spec(32, [1; 4], 10).grids(32, 2).unwrap();
        }
        let seed = VitTopology {
            kernels: [8, 4, 4, 4],
            splits: [2, 1, 1, 1],
            expansions: [3, 2, 4, 6],
            heads: 32,
        };
        assert_eq!(seed.label(), "K8444_S2111_E3246_H32");
    }

    fn scorer(indicators: Vec<Indicator>) -> VitScorer {
        let mut rng = StdRng::seed_from_u64(3);
        let (b, c, s) = (4, 1, 16);
        VitScorer {
            indicators,
            points: 12,
            repeats: 1,
            images: Images {
                x: (0..b * c * s * s)
                    .map(|_| Distribution::<f64>::sample(&StandardNormal, &mut rng))
                    .collect(),
                shape: (b, c, s, s),
            },
            seed: 5,
        }
    }

    #[test]
    fn vit_indicators_are_finite_and_seeded() {
        let sc = scorer(vec![Indicator::LengthDistortion, Indicator::Ntk]);
        let t = VitTopology {
            kernels: [4, 2, 2, 2],
            splits: [2, 1, 1, 1],
            expansions: [2, 2, 2, 2],
            heads: 16,
        };
        let spec = t.spec(4, [1; 4], 3);
        let a: Vec<f64> = sc.score(&spec).into_iter().map(Result::unwrap).collect();
        assert!(a.iter().all(|v| v.is_finite() && *v > 0.0), "{a:?}");
        assert!(a[1] >= 1.0, "a condition number is at least 1: {a:?}");
        assert_eq!(
            sc.score(&spec)
                .into_iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>(),
            a
        );
        // A wider network maps the circle to a different length.
        let b = sc.score(&t.spec(8, [1; 4], 3))[0].clone().unwrap();
        assert_ne!(a[0], b);
    }

    #[test]
    fn the_scoring_vit_has_the_reference_init() {
        let sc = scorer(vec![Indicator::LengthDistortion]);
        let t = VitTopology {
            kernels: [4, 2, 2, 2],
            splits: [2, 1, 1, 1],
            expansions: [4, 4, 4, 4],
            heads: 16,
        };
        let m = sc.build(&t.spec(16, [1; 4], 3), 0).unwrap();
        let (mut linear, mut tokenizer) = (Vec::new(), Vec::new());
        for (name, p) in collect_params(&m) {
            let v = p.value.as_vec();
            if name.contains("tokenizer") || name.contains("patch_embed") {
                tokenizer.extend(v);
            } else if name.ends_with(".bias") && !name.contains("norm") {
                assert!(v.iter().all(|x| *x == 0.0), "{name} bias is not zero");
            } else if name.ends_with(".weight") && !name.contains("norm") {
                linear.extend(v);
            }
        }
        let std = (linear.iter().map(|x| x * x).sum::<f64>() / linear.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.002, "Linear weight std {std}");
        // The conv tokenizer keeps PyTorch's uniform default, whose std is far above 0.02 here.
        assert!(!tokenizer.is_empty());
        let tok = (tokenizer.iter().map(|x| x * x).sum::<f64>() / tokenizer.len() as f64).sqrt();
        assert!(tok > 0.05, "tokenizer std {tok}");
    }

    /// arXiv 2202.11921's reference behaviour, the check the As-ViT review used: at the
    /// reference init, L_E rises with the product of the kernel sizes (larger kernels see more of
    /// the input per token); under the uniform default init it falls.
    #[test]
    fn length_distortion_rises_with_kernel_sizes_at_the_reference_init() {
        let mut sc = scorer(vec![Indicator::LengthDistortion]);
        sc.points = 16;
        sc.repeats = 3;
        let le = |kernels: [usize; 4]| {
            let t = VitTopology {
                kernels,
                splits: [1, 1, 1, 1],
                expansions: [2, 2, 2, 2],
                heads: 16,
            };
            sc.length_distortion(&t.spec(16, [1; 4], 3)).unwrap()
        };
        let (small, large) = (le([4, 2, 2, 2]), le([8, 4, 4, 4]));
        assert!(
            large > small,
            "L_E {large} at kernels 8,4,4,4 <= {small} at 4,2,2,2"
        );
    }

    #[test]
    fn random_returns_the_rank_sum_best_and_reinforce_the_policys_argmax() {
        let sc = scorer(vec![Indicator::LengthDistortion]);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let never = || false;
        let mut ev = VitEvaluator::new(&sc, 8, 3, &pool, &never);
        let best = random_vit_search(&mut ev, 5, 1).unwrap();
        assert_eq!(ev.records.len(), 5);
        let top = ev
            .records
            .iter()
            .map(|r| r.values()[0].unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(ev.records[best].values()[0].unwrap(), top);
        let mut ev = VitEvaluator::new(&sc, 8, 3, &pool, &never);
        let cfg = ReinforceConfig {
            steps: 3,
            lr: 0.08,
            momentum: 0.9,
            window: 20,
            batch: 2,
        };
        let (answer, probs, rewards) = reinforce_vit_search(&mut ev, &cfg, 2).unwrap();
        assert_eq!(rewards.len(), 6);
        assert_eq!(probs.len(), 13);
        assert!(probs
            .iter()
            .all(|p| (p.iter().sum::<f64>() - 1.0).abs() < 1e-9));
        // The answer is the policy's argmax (the reference), scored, not the best seen.
        let argmax: Vec<usize> = probs
            .iter()
            .map(|p| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap())
            .collect();
        let want = VitTopology::from_indices(&argmax.try_into().unwrap());
        assert_eq!(ev.records[answer].topology, want);
        assert!(ev.records[answer].values()[0].is_some());
    }
}
