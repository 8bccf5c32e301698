//! The proxy networks the indicators run on: the NAS-Bench-201 macro skeleton
//! (`docs/methods/training-free-nas.md` §1) at a chosen width, depth and number of stages,
//! with a *set* of ops on each edge mixed by equal weights, so that one type serves single cells
//! (one op per edge) and TE-NAS's pruning supernets (§4).
//!
//! Weights are drawn per component from a seed derived from (seed, block, edge, op): removing an
//! op from a supernet leaves every other weight as it was ("same weights", §4), and two cells
//! that share an op on an edge share its initial weights (common random numbers across
//! candidates). The forward pass can record the sign pattern of every ReLU input.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use super::space::{OpSets, EDGE_NODES, NUM_EDGES};
use crate::seed::derive_seed;
use nn::layers::{
    global_avg_pool, relu, AvgPool2d, BatchNorm2d, Conv2d, ConvGeometry, ForwardCtx, Linear,
};
use nn::models::{ReductionBlock, ReluConvBn};
use nn::{Dev, HasParams, Init, NnError, Param, Tensor2, Tensor4, VarBuilder};

/// Shape of a proxy network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Channels of the first stage, C.
    pub channels: usize,
    /// Cells per stage, N.
    pub cells_per_stage: usize,
    /// Stages kept, 1..=3 (the thin network for linear regions keeps only the first).
    pub stages: usize,
    pub classes: usize,
    /// The Conv3x3 + BN stem; without it the input feeds the first cell directly, so
    /// `in_channels` must equal `channels` (the linear-region network of VITA-Group/TENAS
    /// `linear_region_counter.py` has none).
    pub stem: bool,
}

/// NB201's `avg_pool_3x3` edge.
const POOL3: AvgPool2d = AvgPool2d {
    kernel: 3,
    stride: 1,
    padding: 1,
    count_include_pad: false,
};

/// The ReLU inputs seen in one forward pass: `(values, values per sample)` per ReLU.
#[derive(Debug, Default)]
pub struct SignRecorder {
    chunks: Vec<(Vec<f64>, usize)>,
}

impl SignRecorder {
    /// Records one ReLU input `(batch, c, h, w)`.
    pub fn push<T: Tape<f64, Dev>>(&mut self, x: &Tensor4<f64, T>) {
        let (b, c, h, w) = *x.shape();
        if b > 0 {
            self.chunks.push((x.as_vec(), c * h * w));
        }
    }

    /// Number of ReLU units per sample.
    pub fn units(&self) -> usize {
        self.chunks.iter().map(|(_, n)| n).sum()
    }

    /// Per sample, the bits `1[relu input > 0]` of every ReLU unit, packed 64 to a word.
    pub fn patterns(&self, batch: usize) -> Vec<Vec<u64>> {
        let words = self.units().div_ceil(64);
        let mut out = vec![vec![0u64; words]; batch];
        let mut bit = 0usize;
        for (values, per) in &self.chunks {
            for (i, row) in out.iter_mut().enumerate() {
                let sample = values.get(i * per..(i + 1) * per).unwrap_or(&[]);
                for (j, v) in sample.iter().enumerate() {
                    if *v > 0.0 {
                        let b = bit + j;
                        row[b / 64] |= 1 << (b % 64);
                    }
                }
            }
            bit += per;
        }
        out
    }
}

/// A cell whose edges each hold a list of `(op code, weights of parameterised ops)`.
#[derive(Clone, Debug)]
struct MixedCell {
    edges: Vec<Vec<(u8, Option<ReluConvBn<f64>>)>>,
}

impl HasParams<f64> for MixedCell {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<f64>)>) {
        for (pos, ops) in self.edges.iter().enumerate() {
            for (op, conv) in ops {
                if let Some(c) = conv {
                    c.visit_params(&format!("{prefix}.cell.edges.{pos}.{op}"), out);
                }
            }
        }
    }
    fn visit_params_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut Param<f64>)>,
    ) {
        for (pos, ops) in self.edges.iter_mut().enumerate() {
            for (op, conv) in ops {
                if let Some(c) = conv {
                    c.visit_params_mut(&format!("{prefix}.cell.edges.{pos}.{op}"), out);
                }
            }
        }
    }
}

impl MixedCell {
    /// Block `block` of the net at `c` channels; each op's weights come from their own stream
    /// of `seed`, so they are the same in every supernet that has the op on that edge.
    fn new(
        sets: &OpSets,
        c: usize,
        seed: u64,
        block: usize,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        let mut edges = Vec::with_capacity(NUM_EDGES);
        for pos in 0..NUM_EDGES {
            let mut ops = Vec::new();
            for op in sets.ops(pos) {
                let stream = ((block as u64 * 16 + pos as u64) * 8 + op as u64) + 1000;
                let vb = vb
                    .pp("edges")
                    .pp(pos)
                    .pp(op)
                    .with_seed(derive_seed(seed, stream));
                let conv = match op {
                    2 | 3 => {
                        let geometry = ConvGeometry::same(if op == 2 { 1 } else { 3 });
                        Some(ReluConvBn::new(c, c, geometry, vb)?)
                    }
                    _ => None,
                };
                ops.push((op, conv));
            }
            edges.push(ops);
        }
        Ok(Self { edges })
    }

    /// `docs/methods/training-free-nas.md` §1: node j = sum over incoming edges; an edge with k ops
    /// outputs (1/k) sum of its ops (`none` contributes zero but counts in k); output = node 3.
    fn forward<T: Tape<f64, Dev>>(
        &mut self,
        x: Tensor4<f64, T>,
        ctx: &ForwardCtx,
        rec: &mut Option<&mut SignRecorder>,
    ) -> Result<Tensor4<f64, T>, NnError> {
        let shape = *x.shape();
        let dev = x.device().clone();
        // Each node's value feeds several edges: its tape moves to `shared` and every consumer
        // gets the value with an empty tape; the tapes merge again at the output.
        let (v0, mut shared) = x.split_tape();
        let mut values = vec![v0];
        for t in 1..=3 {
            let mut acc: Option<Tensor4<f64, T>> = None;
            for (pos, &(tt, s)) in EDGE_NODES.iter().enumerate() {
                if tt != t {
                    continue;
                }
                let ops = &mut self.edges[pos];
                let k = ops.len();
                for (op, conv) in ops.iter_mut() {
                    let v = values[s].clone().put_tape(T::default());
                    let out = match (*op, conv) {
                        (1, _) => v,
                        (4, _) => POOL3.forward(v)?,
                        (2 | 3, Some(c)) => {
                            if let Some(r) = rec.as_deref_mut() {
                                r.push(&values[s]);
                            }
                            c.forward(v, ctx)?
                        }
                        _ => continue,
                    };
                    let out = if k > 1 {
                        out.try_mul(1.0 / k as f64)?
                    } else {
                        out
                    };
                    acc = Some(match acc {
                        None => out,
                        // Two skip edges can hand over the same tensor (same gradient id), and
                        // dfdx cannot add a tensor to itself: scaling by one (exact) gives the
                        // addend its own id (as in `nn::models::dag::eval_cell`).
                        Some(a) => a.try_add(out.try_mul(1.0)?)?,
                    });
                }
            }
            let value = match acc {
                Some(v) => v,
                None => dev.try_zeros_like(&shape)?.put_tape(T::default()),
            };
            let (v, tape) = value.split_tape();
            shared = shared.merge(tape);
            values.push(v);
        }
        let out = values.pop().unwrap_or_else(|| dev.zeros_like(&shape));
        Ok(out.put_tape(shared))
    }
}

/// NB201's residual reduction block: ReLUConvBN(3x3, stride 2) -> ReLUConvBN(3x3), plus
/// AvgPool(2, 2) -> Conv1x1 on the shortcut.
#[derive(Clone, Debug)]
struct Reduction {
    conv_a: ReluConvBn<f64>,
    conv_b: ReluConvBn<f64>,
    shortcut: Conv2d<f64>,
}

impl HasParams<f64> for Reduction {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<f64>)>) {
        self.conv_a
            .visit_params(&format!("{prefix}.reduction.conv_a"), out);
        self.conv_b
            .visit_params(&format!("{prefix}.reduction.conv_b"), out);
        self.shortcut
            .visit_params(&format!("{prefix}.reduction.shortcut"), out);
    }
    fn visit_params_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut Param<f64>)>,
    ) {
        self.conv_a
            .visit_params_mut(&format!("{prefix}.reduction.conv_a"), out);
        self.conv_b
            .visit_params_mut(&format!("{prefix}.reduction.conv_b"), out);
        self.shortcut
            .visit_params_mut(&format!("{prefix}.reduction.shortcut"), out);
    }
}

impl Reduction {
    /// NB201's reduction block, with its weights drawn as nn's `ReductionBlock` draws them.
    fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let ReductionBlock {
            conv_a,
            conv_b,
            shortcut,
        } = ReductionBlock::new(c_in, c_out, vb)?;
        Ok(Self {
            conv_a,
            conv_b,
            shortcut,
        })
    }

    fn forward<T: Tape<f64, Dev>>(
        &mut self,
        x: Tensor4<f64, T>,
        ctx: &ForwardCtx,
        rec: &mut Option<&mut SignRecorder>,
    ) -> Result<Tensor4<f64, T>, NnError> {
        let pool = AvgPool2d {
            kernel: 2,
            stride: 2,
            padding: 0,
            count_include_pad: true,
        };
        let skip = self.shortcut.forward(pool.forward(x.with_empty_tape())?)?;
        if let Some(r) = rec.as_deref_mut() {
            r.push(&x);
        }
        let a = self.conv_a.forward(x, ctx)?;
        if let Some(r) = rec.as_deref_mut() {
            r.push(&a);
        }
        let y = self.conv_b.forward(a, ctx)?;
        Ok(y.try_add(skip)?)
    }
}

#[derive(Clone, Debug)]
enum Block {
    Cell(MixedCell),
    Reduction(Box<Reduction>),
}

/// Stem Conv3x3 + BN; `stages` stages of N cells at C, 2C, 4C joined by reductions; BN + ReLU;
/// global average pooling; Linear (`docs/methods/training-free-nas.md` §1).
#[derive(Clone, Debug)]
pub struct ProxyNet {
    stem: Option<(Conv2d<f64>, BatchNorm2d<f64>)>,
    blocks: Vec<Block>,
    last_bn: BatchNorm2d<f64>,
    classifier: Linear<f64>,
}

impl HasParams<f64> for ProxyNet {
    fn visit_params<'a>(&'a self, _prefix: &str, out: &mut Vec<(String, &'a Param<f64>)>) {
        if let Some((stem, bn)) = &self.stem {
            stem.visit_params("stem", out);
            bn.visit_params("stem_bn", out);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let name = format!("blocks.{i}");
            match b {
                Block::Cell(c) => c.visit_params(&name, out),
                Block::Reduction(r) => r.visit_params(&name, out),
            }
        }
        self.last_bn.visit_params("last_bn", out);
        self.classifier.visit_params("classifier", out);
    }
    fn visit_params_mut<'a>(
        &'a mut self,
        _prefix: &str,
        out: &mut Vec<(String, &'a mut Param<f64>)>,
    ) {
        if let Some((stem, bn)) = &mut self.stem {
            stem.visit_params_mut("stem", out);
            bn.visit_params_mut("stem_bn", out);
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let name = format!("blocks.{i}");
            match b {
                Block::Cell(c) => c.visit_params_mut(&name, out),
                Block::Reduction(r) => r.visit_params_mut(&name, out),
            }
        }
        self.last_bn.visit_params_mut("last_bn", out);
        self.classifier.visit_params_mut("classifier", out);
    }
}

/// Which parameters a per-sample gradient covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamSet {
    /// Every trainable weight tensor: conv kernels, BN gammas, the classifier matrix; no biases
    /// (`docs/methods/training-free-nas.md` §2, kappa).
    Weights,
    /// G's set (arXiv 2108.11939 §3.3 as VITA-Group/TEGNAS `ntk.py` takes it: parameters
    /// whose names contain both `weight` and `cell`): the weight tensors of the cells *and* of
    /// the reduction blocks, which the reference stores among its cells (conv kernels, BN
    /// gammas); no BN biases. So G exists for conv-free cells too.
    Cells,
}

impl ParamSet {
    /// Whether the parameter named `name` belongs to this set.
    pub fn selects(self, name: &str) -> bool {
        match self {
            ParamSet::Weights => name.ends_with(".weight"),
            ParamSet::Cells => {
                (name.contains(".cell.") || name.contains(".reduction."))
                    && name.ends_with(".weight")
            }
        }
    }
}

impl ProxyNet {
    /// Builds the network for the supernet `sets`, weights drawn from `seed`.
    pub fn new(dev: &Dev, cfg: &NetConfig, sets: &OpSets, seed: u64) -> Result<Self, NnError> {
        for (field, v) in [
            ("in_channels", cfg.in_channels),
            ("channels", cfg.channels),
            ("cells_per_stage", cfg.cells_per_stage),
            ("classes", cfg.classes),
        ] {
            if v == 0 {
                return Err(NnError::spec(field, "must be positive"));
            }
        }
        if !cfg.stem && cfg.in_channels != cfg.channels {
            return Err(NnError::spec(
                "in_channels",
                format!(
                    "{} input channels without a stem need channels = {} too",
                    cfg.in_channels, cfg.in_channels
                ),
            ));
        }
        if !(1..=3).contains(&cfg.stages) {
            return Err(NnError::spec(
                "stages",
                format!("{} is not in 1..=3", cfg.stages),
            ));
        }
        let init = Init::default();
        // Stem, each reduction and the classifier draw from streams of their own.
        let vb = VarBuilder::new(dev, &init, derive_seed(seed, 1));
        let c = cfg.channels;
        let stem = match cfg.stem {
            true => Some((
                Conv2d::no_bias(cfg.in_channels, c, ConvGeometry::same(3), vb.pp("stem"))?,
                BatchNorm2d::new(c, vb.pp("stem_bn"))?,
            )),
            false => None,
        };
        let mut blocks = Vec::new();
        for stage in 0..cfg.stages {
            let width = c << stage;
            if stage > 0 {
                let vb = vb.with_seed(derive_seed(seed, 100 + blocks.len() as u64));
                let vb = vb.pp("blocks").pp(blocks.len()).pp("reduction");
                let reduction = Reduction::new(width / 2, width, vb)?;
                blocks.push(Block::Reduction(Box::new(reduction)));
            }
            for _ in 0..cfg.cells_per_stage {
                let (block, vb) = (blocks.len(), vb.pp("blocks").pp(blocks.len()));
                let cell = MixedCell::new(sets, width, seed, block, vb.pp("cell"))?;
                blocks.push(Block::Cell(cell));
            }
        }
        let last = c << (cfg.stages - 1);
        let head = vb.with_seed(derive_seed(seed, 2));
        Ok(Self {
            stem,
            blocks,
            last_bn: BatchNorm2d::new(last, vb.pp("last_bn"))?,
            classifier: Linear::new(last, cfg.classes, head.pp("classifier"))?,
        })
    }

    /// `(batch, c, h, w)` -> `(batch, classes)`; `rec` collects every ReLU input.
    pub fn forward<T: Tape<f64, Dev>>(
        &mut self,
        x: Tensor4<f64, T>,
        ctx: &ForwardCtx,
        mut rec: Option<&mut SignRecorder>,
    ) -> Result<Tensor2<f64, T>, NnError> {
        let mut z = match &mut self.stem {
            Some((stem, bn)) => bn.forward(stem.forward(x)?, ctx)?,
            None => x,
        };
        for block in &mut self.blocks {
            z = match block {
                Block::Cell(cell) => cell.forward(z, ctx, &mut rec)?,
                Block::Reduction(r) => r.forward(z, ctx, &mut rec)?,
            };
        }
        let z = self.last_bn.forward(z, ctx)?;
        if let Some(r) = rec {
            r.push(&z);
        }
        self.classifier.forward(global_avg_pool(relu(z)?)?)
    }

    /// Number of scalars `set` covers.
    pub fn num_params(&self, set: ParamSet) -> usize {
        nn::collect_params(self)
            .iter()
            .filter(|(n, p)| p.kind == nn::ParamKind::Trainable && set.selects(n))
            .map(|(_, p)| p.numel())
            .sum()
    }

    /// Row i: d(sum_k f_k(x_i)) / d theta over the parameters of `set`, with BatchNorm in
    /// training mode over the whole batch (`docs/methods/training-free-nas.md` §2). One backward
    /// pass per sample, as in the reference code.
    pub fn per_sample_gradients(
        &mut self,
        x: &Tensor4<f64>,
        set: ParamSet,
    ) -> Result<Vec<Vec<f64>>, NnError> {
        let b = x.shape().0;
        let ctx = ForwardCtx::train(0);
        let mut rows = Vec::with_capacity(b);
        for i in 0..b {
            let y = self.forward(x.clone().traced(Gradients::leaky()), &ctx, None)?;
            let (bb, k) = *y.shape();
            let mut mask = vec![0.0f64; bb * k];
            for m in mask.iter_mut().skip(i * k).take(k) {
                *m = 1.0;
            }
            let mask = x.device().try_tensor_from_vec(mask, (bb, k))?;
            let l = y.try_mul(mask)?.try_sum::<Rank0, _>()?;
            let mut grads = l.try_backward()?;
            let mut row = Vec::new();
            for (name, p) in nn::collect_params(self) {
                if p.kind == nn::ParamKind::Trainable && set.selects(&name) {
                    grads.try_alloc_for(&p.value)?;
                    row.extend(grads.get(&p.value).as_vec());
                }
            }
            rows.push(row);
        }
        Ok(rows)
    }
}
