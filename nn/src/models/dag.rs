//! DAG-cell networks: `mlp_dag` and `cnn_dag` (`docs/methods/arch-aware.md` §1), and
//! the cell evaluation that NAS-Bench-201 shares.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use super::topology::Dag;
use crate::layers::{
    add_n, global_avg_pool, relu, BatchNorm2d, Conv2d, ConvGeometry, ForwardCtx, Linear,
};
use crate::tensor::impl_has_params;
use crate::{Dev, Float, NnError, Tensor2, Tensor4, VarBuilder};

/// Evaluates a cell: z(0) = input, z(t) = sum over existing edges (s, t) of edge(z(s)).
///
/// A node without incoming edges is a zero tensor (as in the reference code, whose `none` edges
/// multiply by 0), and its outgoing edges still run. `edge(position, op, x)` computes one edge.
/// Each node's value is used by several edges, so its tape is moved to a shared tape and every
/// consumer gets the value with an empty tape; all tapes meet again in the output. A node's
/// incoming edges are summed by one [`add_n`] (which also takes the same tensor twice, as two
/// skip edges from one node hand over).
pub(crate) fn eval_cell<S: Shape, E: Float, T: Tape<E, Dev>>(
    dag: &Dag,
    input: Tensor<S, E, Dev, T>,
    mut edge: impl FnMut(usize, u8, Tensor<S, E, Dev, T>) -> Result<Tensor<S, E, Dev, T>, NnError>,
) -> Result<Tensor<S, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    let shape = *input.shape();
    let dev = input.device().clone();
    let (v0, mut shared) = input.split_tape();
    let mut values = vec![v0];
    let mut incoming: Vec<Vec<Tensor<S, E, Dev, T>>> =
        (0..dag.nodes()).map(|_| Vec::new()).collect();
    for (pos, t, s, op) in dag.edges() {
        if op != 0 {
            let out = edge(pos, op, values[s].clone().put_tape(T::default()))?;
            incoming[t].push(out);
        }
        if s + 1 == t {
            // Last source of node t: its value is complete.
            let mut addends = std::mem::take(&mut incoming[t]);
            let value = match addends.len() {
                0 => dev.try_zeros_like(&shape)?.put_tape(T::default()),
                1 => addends
                    .pop()
                    .ok_or_else(|| NnError::shape("cell node", 1, 0))?,
                _ => add_n(addends)?,
            };
            let (v, tape) = value.split_tape();
            shared = shared.merge(tape);
            values.push(v);
        }
    }
    let out = values.pop().unwrap_or_else(|| dev.zeros_like(&shape));
    Ok(out.put_tape(shared))
}

/// `mlp_dag`: flatten -> stem Linear(in, w) + ReLU -> DAG cell of Linear(w, w) + ReLU (digit 2)
/// and identity (digit 1) edges -> readout Linear(w, classes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MlpDagSpec {
    /// Cell topology, e.g. `"2_02_002"`: digits 0 zero, 1 skip, 2 linear.
    pub topology: String,
    /// Width of every node.
    pub width: usize,
    /// Classes of the classifier head.
    pub classes: usize,
}

#[derive(Clone, Debug)]
pub struct MlpDag<E: Float> {
    dag: Dag,
    pub stem: Linear<E>,
    /// One slot per edge position of the topology; `None` for zero and skip edges.
    pub edges: Vec<Option<Linear<E>>>,
    pub readout: Linear<E>,
}
impl_has_params!(MlpDag {
    stem,
    edges,
    readout
});

impl<E: Float> MlpDag<E>
where
    Dev: Device<E>,
{
    pub fn new(spec: &MlpDagSpec, in_features: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let dag = cell_topology(&spec.topology, spec.width, spec.classes)?;
        let w = spec.width;
        let stem = Linear::new(in_features, w, vb.pp("stem"))?;
        let edges = dag
            .edges()
            .map(|(pos, _, _, op)| match op {
                2 => Linear::new(w, w, vb.pp("edges").pp(pos)).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let readout = Linear::new(w, spec.classes, vb.pp("readout"))?;
        Ok(Self {
            dag,
            stem,
            edges,
            readout,
        })
    }

    /// `(batch, c, h, w)` (flattened) -> `(batch, classes)`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor2<E, T>, NnError> {
        let (b, c, h, w) = *x.shape();
        let x = x.try_reshape_like(&(b, c * h * w))?;
        let z = relu(self.stem.forward(x)?)?;
        let z = eval_cell(&self.dag, z, |pos, op, v| match (op, &self.edges[pos]) {
            (2, Some(l)) => relu(l.forward(v)?),
            _ => Ok(v),
        })?;
        self.readout.forward(z)
    }
}

/// `cnn_dag`: stem Conv3x3(c_in, w) + BN + ReLU -> DAG cell of ReLU-Conv(k x k)-BN (digit 2) and
/// identity (digit 1) edges at width w -> global average pool -> Linear(w, classes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CnnDagSpec {
    /// Cell topology, e.g. `"2_02_002"`: digits 0 zero, 1 skip, 2 convolution.
    pub topology: String,
    /// Channels of every node.
    pub width: usize,
    /// Odd kernel size q of the convolutions.
    #[serde(default = "default_kernel")]
    pub kernel: usize,
    /// Classes of the classifier head.
    pub classes: usize,
}

fn default_kernel() -> usize {
    3
}

/// ReLU -> Conv(k x k, no bias) -> BatchNorm: the parameterised edge of CNN cells.
#[derive(Clone, Debug)]
pub struct ReluConvBn<E: Float> {
    pub conv: Conv2d<E>,
    pub bn: BatchNorm2d<E>,
}
impl_has_params!(ReluConvBn { conv, bn });

impl<E: Float> ReluConvBn<E>
where
    Dev: Device<E>,
{
    pub fn new(
        c_in: usize,
        c_out: usize,
        geometry: ConvGeometry,
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        Ok(Self {
            conv: Conv2d::no_bias(c_in, c_out, geometry, vb.pp("conv"))?,
            bn: BatchNorm2d::new(c_out, vb.pp("bn"))?,
        })
    }

    pub fn forward<T: Tape<E, Dev>>(
        &mut self,
        x: Tensor4<E, T>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor4<E, T>, NnError> {
        let y = self.conv.forward_relu_input(x)?;
        self.bn.forward(y, ctx)
    }
}

#[derive(Clone, Debug)]
pub struct CnnDag<E: Float> {
    dag: Dag,
    pub stem: Conv2d<E>,
    pub stem_bn: BatchNorm2d<E>,
    pub edges: Vec<Option<ReluConvBn<E>>>,
    pub readout: Linear<E>,
}
impl_has_params!(CnnDag {
    stem,
    stem_bn,
    edges,
    readout
});

impl<E: Float> CnnDag<E>
where
    Dev: Device<E>,
{
    pub fn new(spec: &CnnDagSpec, in_channels: usize, vb: VarBuilder) -> Result<Self, NnError> {
        let dag = cell_topology(&spec.topology, spec.width, spec.classes)?;
        odd_kernel(spec.kernel)?;
        let w = spec.width;
        let stem = Conv2d::no_bias(in_channels, w, ConvGeometry::same(3), vb.pp("stem"))?;
        let edges = dag
            .edges()
            .map(|(pos, _, _, op)| match op {
                2 => ReluConvBn::new(
                    w,
                    w,
                    ConvGeometry::same(spec.kernel),
                    vb.pp("edges").pp(pos),
                )
                .map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let readout = Linear::new(w, spec.classes, vb.pp("readout"))?;
        Ok(Self {
            dag,
            stem,
            stem_bn: BatchNorm2d::new(w, vb.pp("stem_bn"))?,
            edges,
            readout,
        })
    }

    /// `(batch, c, h, w)` -> `(batch, classes)`.
    pub fn forward<T: Tape<E, Dev>>(
        &mut self,
        x: Tensor4<E, T>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor2<E, T>, NnError> {
        let z = relu(self.stem_bn.forward(self.stem.forward(x)?, ctx)?)?;
        let edges = &mut self.edges;
        let z = eval_cell(&self.dag, z, |pos, op, v| match (op, &mut edges[pos]) {
            (2, Some(e)) => e.forward(v, ctx),
            _ => Ok(v),
        })?;
        self.readout.forward(global_avg_pool(z)?)
    }
}

/// The cell of `mlp_dag` / `cnn_dag` (digits 0 to 2), checked to connect input to output, with
/// positive `width` and `classes`.
pub(crate) fn cell_topology(topology: &str, width: usize, classes: usize) -> Result<Dag, NnError> {
    let dag = Dag::parse_digits("model.topology", topology, 2)?;
    if !dag.connects_input_to_output() {
        return Err(NnError::spec(
            "model.topology",
            format!("{topology:?} has no input-to-output path; it is not a valid network"),
        ));
    }
    positive("model.width", width)?;
    positive("model.classes", classes)?;
    Ok(dag)
}

/// `cnn_dag`'s kernel, odd so that same padding keeps the map size.
pub(crate) fn odd_kernel(kernel: usize) -> Result<(), NnError> {
    if kernel % 2 != 1 {
        return Err(NnError::spec(
            "model.kernel",
            format!("kernel {kernel} must be odd (same padding)"),
        ));
    }
    Ok(())
}

pub(crate) fn positive(field: &str, v: usize) -> Result<(), NnError> {
    if v == 0 {
        return Err(NnError::spec(field, "must be at least 1"));
    }
    Ok(())
}
