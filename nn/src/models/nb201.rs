//! The NAS-Bench-201 network (Dong & Yang 2020; `docs/methods/training-free-nas.md`):
//! stem Conv3x3 + BN; three stages of N cells at C, 2C, 4C channels joined by residual
//! reduction blocks; BN + ReLU; global average pooling; Linear.

use dfdx::{tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use super::dag::{eval_cell, positive, ReluConvBn};
use super::topology::Dag;
use crate::layers::{
    add_n, global_avg_pool, relu, AvgPool2d, BatchNorm2d, Conv2d, ConvGeometry, ForwardCtx, Linear,
};
use crate::tensor::{impl_has_params, join};
use crate::{Dev, Float, NnError, Tensor2, Tensor4, VarBuilder};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nb201Spec {
    /// The cell: an arch string `|nor_conv_3x3~0|+|...|` or the digit form `"3_33_133"` /
    /// `"333133"` (0 none, 1 skip, 2 conv1x1, 3 conv3x3, 4 avgpool3x3).
    pub cell: String,
    /// Channels of the first stage, C (benchmark: 16).
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Cells per stage, N (benchmark: 5).
    #[serde(default = "default_cells")]
    pub cells_per_stage: usize,
    /// Classes of the classifier head.
    pub classes: usize,
}

fn default_channels() -> usize {
    16
}
fn default_cells() -> usize {
    5
}

/// One edge of a NAS-Bench-201 cell (ops with parameters hold them).
#[derive(Clone, Debug)]
pub enum CellOp<E: Float> {
    Skip,
    AvgPool,
    Conv(Box<ReluConvBn<E>>),
}

#[derive(Clone, Debug)]
pub struct Cell<E: Float> {
    /// One slot per edge position; `None` for `none` edges.
    pub edges: Vec<Option<CellOp<E>>>,
}

impl<E: Float> crate::HasParams<E> for Cell<E> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a crate::Param<E>)>) {
        for (i, e) in self.edges.iter().enumerate() {
            if let Some(CellOp::Conv(c)) = e {
                c.visit_params(&join(&join(prefix, "edges"), &i.to_string()), out);
            }
        }
    }
    fn visit_params_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut crate::Param<E>)>,
    ) {
        for (i, e) in self.edges.iter_mut().enumerate() {
            if let Some(CellOp::Conv(c)) = e {
                c.visit_params_mut(&join(&join(prefix, "edges"), &i.to_string()), out);
            }
        }
    }
}

const POOL3: AvgPool2d = AvgPool2d {
    kernel: 3,
    stride: 1,
    padding: 1,
    count_include_pad: false,
};

impl<E: Float> Cell<E>
where
    Dev: Device<E>,
{
    /// The cell `dag` at `c` channels; edge `pos` is built by `vb.pp("edges").pp(pos)`.
    fn new(dag: &Dag, c: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let conv = |kernel, pos| -> Result<_, NnError> {
            let op = ReluConvBn::new(c, c, ConvGeometry::same(kernel), vb.pp("edges").pp(pos))?;
            Ok(Some(CellOp::Conv(Box::new(op))))
        };
        let edges = dag
            .edges()
            .map(|(pos, _, _, op)| match op {
                1 => Ok(Some(CellOp::Skip)),
                2 => conv(1, pos),
                3 => conv(3, pos),
                4 => Ok(Some(CellOp::AvgPool)),
                _ => Ok(None),
            })
            .collect::<Result<_, NnError>>()?;
        Ok(Self { edges })
    }

    fn forward<T: Tape<E, Dev>>(
        &mut self,
        dag: &Dag,
        x: Tensor4<E, T>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor4<E, T>, NnError> {
        let edges = &mut self.edges;
        eval_cell(dag, x, |pos, _, v| match &mut edges[pos] {
            Some(CellOp::Conv(op)) => op.forward(v, ctx),
            Some(CellOp::AvgPool) => POOL3.forward(v),
            _ => Ok(v),
        })
    }
}

/// ResNet basic block with stride 2: ReLUConvBN(3x3, stride 2) -> ReLUConvBN(3x3), plus the
/// shortcut AvgPool(2, 2) -> Conv1x1 (NAS-Bench-201's `ResNetBasicblock`).
#[derive(Clone, Debug)]
pub struct ReductionBlock<E: Float> {
    pub conv_a: ReluConvBn<E>,
    pub conv_b: ReluConvBn<E>,
    pub shortcut: Conv2d<E>,
}
impl_has_params!(ReductionBlock {
    conv_a,
    conv_b,
    shortcut
});

impl<E: Float> ReductionBlock<E>
where
    Dev: Device<E>,
{
    /// `c_in -> c_out` channels at half the resolution; conv_a, conv_b, shortcut drawn in order.
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let down = ConvGeometry {
            kernel: 3,
            stride: 2,
            padding: 1,
            dilation: 1,
        };
        let same = ConvGeometry::same(3);
        Ok(Self {
            conv_a: ReluConvBn::new(c_in, c_out, down, vb.pp("conv_a"))?,
            conv_b: ReluConvBn::new(c_out, c_out, same, vb.pp("conv_b"))?,
            shortcut: Conv2d::no_bias(c_in, c_out, ConvGeometry::same(1), vb.pp("shortcut"))?,
        })
    }

    fn forward<T: Tape<E, Dev>>(
        &mut self,
        x: Tensor4<E, T>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor4<E, T>, NnError> {
        let pool = AvgPool2d {
            kernel: 2,
            stride: 2,
            padding: 0,
            count_include_pad: true,
        };
        let skip = self.shortcut.forward(pool.forward(x.with_empty_tape())?)?;
        let y = self.conv_b.forward(self.conv_a.forward(x, ctx)?, ctx)?;
        add_n(vec![y, skip])
    }
}

/// A stage entry: a cell or a reduction block.
#[derive(Clone, Debug)]
pub enum Nb201Block<E: Float> {
    Cell(Cell<E>),
    Reduction(Box<ReductionBlock<E>>),
}

impl<E: Float> crate::HasParams<E> for Nb201Block<E> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a crate::Param<E>)>) {
        match self {
            Nb201Block::Cell(c) => c.visit_params(prefix, out),
            Nb201Block::Reduction(r) => r.visit_params(prefix, out),
        }
    }
    fn visit_params_mut<'a>(
        &'a mut self,
        prefix: &str,
        out: &mut Vec<(String, &'a mut crate::Param<E>)>,
    ) {
        match self {
            Nb201Block::Cell(c) => c.visit_params_mut(prefix, out),
            Nb201Block::Reduction(r) => r.visit_params_mut(prefix, out),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Nb201<E: Float> {
    dag: Dag,
    pub stem: Conv2d<E>,
    pub stem_bn: BatchNorm2d<E>,
    /// Cells and reduction blocks in order, named `blocks.<i>` (3N + 2 of them).
    pub blocks: Vec<Nb201Block<E>>,
    pub last_bn: BatchNorm2d<E>,
    pub classifier: Linear<E>,
}
impl_has_params!(Nb201 {
    stem,
    stem_bn,
    blocks,
    last_bn,
    classifier
});

impl<E: Float> Nb201<E>
where
    Dev: Device<E>,
{
    pub fn new(spec: &Nb201Spec, in_channels: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let dag = Dag::parse_nb201("model.cell", &spec.cell)?;
        positive("model.channels", spec.channels)?;
        positive("model.cells_per_stage", spec.cells_per_stage)?;
        positive("model.classes", spec.classes)?;
        let c = spec.channels;
        let stem = Conv2d::no_bias(in_channels, c, ConvGeometry::same(3), vb.pp("stem"))?;
        let mut blocks = Vec::new();
        for (stage, width) in [c, 2 * c, 4 * c].into_iter().enumerate() {
            if stage > 0 {
                let vb = vb.pp("blocks").pp(blocks.len());
                let reduction = ReductionBlock::new(width / 2, width, vb)?;
                blocks.push(Nb201Block::Reduction(Box::new(reduction)));
            }
            for _ in 0..spec.cells_per_stage {
                let vb = vb.pp("blocks").pp(blocks.len());
                blocks.push(Nb201Block::Cell(Cell::new(&dag, width, vb)?));
            }
        }
        Ok(Self {
            dag,
            stem,
            stem_bn: BatchNorm2d::new(c, vb.pp("stem_bn"))?,
            blocks,
            last_bn: BatchNorm2d::new(4 * c, vb.pp("last_bn"))?,
            classifier: Linear::new(4 * c, spec.classes, vb.pp("classifier"))?,
        })
    }

    /// `(batch, c, h, w)` -> `(batch, classes)`; h and w must survive two stride-2 reductions.
    pub fn forward<T: Tape<E, Dev>>(
        &mut self,
        x: Tensor4<E, T>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor2<E, T>, NnError> {
        let mut z = self.stem_bn.forward(self.stem.forward(x)?, ctx)?;
        for block in &mut self.blocks {
            z = match block {
                Nb201Block::Cell(cell) => cell.forward(&self.dag, z, ctx)?,
                Nb201Block::Reduction(r) => r.forward(z, ctx)?,
            };
        }
        let z = relu(self.last_bn.forward(z, ctx)?)?;
        self.classifier.forward(global_avg_pool(z)?)
    }
}
