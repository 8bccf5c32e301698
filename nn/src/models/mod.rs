//! Models built at run time from a `model:` spec.
//!
//! A [`ModelSpec`] is the validated, serialisable description (it travels with checkpoints);
//! [`Model::build`] turns it, the shape of one input sample and a [`VarBuilder`] (device, init
//! and seeded RNG) into weights.
//! Every model maps `(batch, c, h, w)` to `(batch, outputs)`: class logits, or a field
//! flattened per sample (see [`Model::output_shape`]).

mod dag;
mod fno;
mod nb201;
pub mod topology;
mod vit;

pub use dag::{CnnDag, CnnDagSpec, MlpDag, MlpDagSpec, ReluConvBn};
pub use fno::{Fno2d, Fno2dMae, Fno2dMaeSpec, Fno2dSpec, FourierLayer};
pub use nb201::{Nb201, Nb201Spec, ReductionBlock};
pub use topology::Dag;
pub use vit::{tokenizer_geometry, PatchMerging, Vit, VitBlock, VitSpec, VitStage};

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use crate::layers::ForwardCtx;
use crate::{Dev, Float, HasParams, NnError, Param, Tensor2, Tensor4, VarBuilder};

/// The `model:` block of a stage, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    /// An MLP whose cell is a DAG of linear layers.
    MlpDag(MlpDagSpec),
    /// A CNN whose cell is a DAG of convolutions.
    CnnDag(CnnDagSpec),
    /// The NAS-Bench-201 network around one cell.
    Nb201(Nb201Spec),
    /// A 2-D Fourier neural operator.
    Fno2d(Fno2dSpec),
    /// The masked-autoencoder FNO of operator pretraining.
    Fno2dMae(Fno2dMaeSpec),
    /// A ViT of the As-ViT space.
    Vit(VitSpec),
}

impl ModelSpec {
    /// Parses a spec from JSON, naming the offending field on error. The error is the same
    /// [`NnError::InvalidSpec`] (field, message) as [`ModelSpec::check`]'s, which callers turn
    /// into a params error on that field; serde's message is its text.
    pub fn from_json(value: serde_json::Value) -> Result<Self, NnError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            NnError::spec(
                if path == "." {
                    "model".to_string()
                } else {
                    format!("model.{path}")
                },
                e.inner().to_string(),
            )
        })
    }

    /// Checks what does not depend on the input shape (topology and cell strings, positive
    /// sizes, odd kernels) without drawing weights, so that a stage's params can be rejected
    /// before anything runs. [`Model::build`] repeats these checks.
    pub fn check(&self) -> Result<(), NnError> {
        match self {
            ModelSpec::MlpDag(s) => dag::cell_topology(&s.topology, s.width, s.classes).map(drop),
            ModelSpec::CnnDag(s) => {
                dag::cell_topology(&s.topology, s.width, s.classes)?;
                dag::odd_kernel(s.kernel)
            }
            ModelSpec::Nb201(s) => {
                Dag::parse_nb201("model.cell", &s.cell)?;
                dag::positive("model.channels", s.channels)?;
                dag::positive("model.cells_per_stage", s.cells_per_stage)?;
                dag::positive("model.classes", s.classes)
            }
            ModelSpec::Fno2d(s) => s.validate(),
            ModelSpec::Fno2dMae(s) => Fno2dSpec {
                width: s.width,
                modes: s.modes,
                layers: s.layers,
                head_width: s.head_width,
                out_channels: 1,
            }
            .validate(),
            ModelSpec::Vit(s) => s.validate(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ModelSpec::MlpDag(_) => "mlp_dag",
            ModelSpec::CnnDag(_) => "cnn_dag",
            ModelSpec::Nb201(_) => "nb201",
            ModelSpec::Fno2d(_) => "fno2d",
            ModelSpec::Fno2dMae(_) => "fno2d_mae",
            ModelSpec::Vit(_) => "vit",
        }
    }
}

/// Shape of one input sample: channels, height, width (an MLP flattens it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

#[derive(Clone, Debug)]
enum Net<E: Float> {
    MlpDag(Box<MlpDag<E>>),
    CnnDag(Box<CnnDag<E>>),
    Nb201(Box<Nb201<E>>),
    Fno2d(Box<Fno2d<E>>),
    Fno2dMae(Box<Fno2dMae<E>>),
    Vit(Box<Vit<E>>),
}

/// A built model: its spec, input shape and weights.
#[derive(Clone, Debug)]
pub struct Model<E: Float> {
    spec: ModelSpec,
    input: InputShape,
    net: Net<E>,
}

impl<E: Float> Model<E>
where
    Dev: Device<E>,
{
    /// Builds the weights of `spec` for inputs of shape `input`, drawn by `vb` (the root
    /// builder: parameter names in the init hook are the model's own, `stem`, `blocks.0...`).
    pub fn build(spec: &ModelSpec, input: InputShape, vb: VarBuilder) -> Result<Self, NnError> {
        if input.channels == 0 || input.height == 0 || input.width == 0 {
            return Err(NnError::spec(
                "input",
                format!("empty input shape {input:?}"),
            ));
        }
        let grid = (input.channels, input.height, input.width);
        let net = match spec {
            ModelSpec::MlpDag(s) => {
                let features = input.channels * input.height * input.width;
                Net::MlpDag(Box::new(MlpDag::new(s, features, vb)?))
            }
            ModelSpec::CnnDag(s) => Net::CnnDag(Box::new(CnnDag::new(s, input.channels, vb)?)),
            ModelSpec::Nb201(s) => {
                // Both reductions halve the map on two branches that must agree (stride-2 conv
                // rounds up, 2x2 pooling rounds down), as in the reference implementation.
                if input.height / 4 * 4 != input.height || input.width / 4 * 4 != input.width {
                    return Err(NnError::spec(
                        "input",
                        format!(
                            "nb201 needs height and width divisible by 4, got {}x{}",
                            input.height, input.width
                        ),
                    ));
                }
                Net::Nb201(Box::new(Nb201::new(s, input.channels, vb)?))
            }
            ModelSpec::Fno2d(s) => Net::Fno2d(Box::new(Fno2d::new(s, grid, vb)?)),
            ModelSpec::Fno2dMae(s) => Net::Fno2dMae(Box::new(Fno2dMae::new(s, grid, vb)?)),
            ModelSpec::Vit(s) => {
                if input.height != input.width {
                    return Err(NnError::spec(
                        "input",
                        format!(
                            "vit needs square images, got {}x{}",
                            input.height, input.width
                        ),
                    ));
                }
                s.validate()?;
                s.grids(input.height, 1)?;
                Net::Vit(Box::new(Vit::new(s, input.channels, vb)?))
            }
        };
        Ok(Self {
            spec: spec.clone(),
            input,
            net,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn input_shape(&self) -> InputShape {
        self.input
    }

    /// Shape of one output sample: `[classes]`, or `[channels, h, w]` for field models.
    pub fn output_shape(&self) -> Vec<usize> {
        match &self.spec {
            ModelSpec::MlpDag(s) => vec![s.classes],
            ModelSpec::CnnDag(s) => vec![s.classes],
            ModelSpec::Nb201(s) => vec![s.classes],
            ModelSpec::Fno2d(s) => vec![s.out_channels, self.input.height, self.input.width],
            ModelSpec::Fno2dMae(_) => {
                vec![self.input.channels, self.input.height, self.input.width]
            }
            ModelSpec::Vit(s) => vec![s.classes],
        }
    }

    /// `(batch, c, h, w)` -> `(batch, outputs)`.
    pub fn forward<T: Tape<E, Dev>>(
        &mut self,
        x: Tensor4<E, T>,
        ctx: &mut ForwardCtx,
    ) -> Result<Tensor2<E, T>, NnError> {
        let (_, c, h, w) = *x.shape();
        let want = (self.input.channels, self.input.height, self.input.width);
        if (c, h, w) != want {
            return Err(NnError::shape(
                "model input (channels, height, width)",
                want,
                (c, h, w),
            ));
        }
        match &mut self.net {
            Net::MlpDag(m) => m.forward(x),
            Net::CnnDag(m) => m.forward(x, ctx),
            Net::Nb201(m) => m.forward(x, ctx),
            Net::Fno2d(m) => m.forward(x),
            Net::Fno2dMae(m) => m.forward(x),
            Net::Vit(m) => m.forward(x),
        }
    }

    /// The ViT inside, for re-tokenization and the As-ViT indicators; `None` for other kinds.
    pub fn vit(&self) -> Option<&Vit<E>> {
        match &self.net {
            Net::Vit(m) => Some(m),
            _ => None,
        }
    }

    pub fn vit_mut(&mut self) -> Option<&mut Vit<E>> {
        match &mut self.net {
            Net::Vit(m) => Some(m),
            _ => None,
        }
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        crate::collect_params(self)
            .iter()
            .filter(|(_, p)| p.kind == crate::ParamKind::Trainable)
            .map(|(_, p)| p.numel())
            .sum()
    }
}

impl<E: Float> HasParams<E> for Model<E> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<E>)>) {
        match &self.net {
            Net::MlpDag(m) => m.visit_params(prefix, out),
            Net::CnnDag(m) => m.visit_params(prefix, out),
            Net::Nb201(m) => m.visit_params(prefix, out),
            Net::Fno2d(m) => m.visit_params(prefix, out),
            Net::Fno2dMae(m) => m.visit_params(prefix, out),
            Net::Vit(m) => m.visit_params(prefix, out),
        }
    }
    fn visit_params_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Param<E>)>) {
        match &mut self.net {
            Net::MlpDag(m) => m.visit_params_mut(prefix, out),
            Net::CnnDag(m) => m.visit_params_mut(prefix, out),
            Net::Nb201(m) => m.visit_params_mut(prefix, out),
            Net::Fno2d(m) => m.visit_params_mut(prefix, out),
            Net::Fno2dMae(m) => m.visit_params_mut(prefix, out),
            Net::Vit(m) => m.visit_params_mut(prefix, out),
        }
    }
}

#[cfg(test)]
mod tests;
