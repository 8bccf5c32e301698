//! Runtime-shaped neural-network layers, models and training on dfdx.
//!
//! A library of its own: it knows nothing of the engine (no ops, stages, cache or params of a
//! pipeline). `ops`' `train`, `evaluate`, NAS and operator-learning ops build on it.
//!
//! dfdx's own `nn` modules fix their sizes in const generics; the models here are chosen at run
//! time from a `model:` block, so every layer is built from dfdx tensor ops on `usize` shapes.
//!
//! Conventions that hold across the module:
//! - Parameters are [`Param`]s: a flat 1-D tensor plus its logical shape. Layers reshape them when
//!   they use them (a contiguous reshape keeps the tensor's gradient id), which lets optimisers,
//!   checkpoints and gradient clipping treat every parameter alike. Parameters are enumerated by
//!   stable dotted names (`blocks.0.conv.weight`) through [`HasParams`].
//! - Parameters never carry a tape. The input of a forward pass carries it (`x.traced(..)`), and
//!   every op records the backward pass for all of its operands; a tensor whose value is used
//!   twice is split with `with_empty_tape` (same gradient id, empty tape) and the tapes merge
//!   again when the branches meet.
//! - Layers and models are built from their sizes (or spec) and a [`VarBuilder`], which carries
//!   the device, the layer's dotted name, the init and the RNG: `Linear::new(c, 10, vb.pp("head"))`.
//! - Images are `(batch, channels, height, width)`; models map such a batch to `(batch, outputs)`
//!   (class logits, or a field flattened per sample).
//! - Everything runs on [`Dev`]: dfdx's `Cpu`, or its `Cuda` with the `cuda` feature. Layers use
//!   dfdx's device-generic ops; the few host kernels (convolution, pooling, BatchNorm, GELU) reach
//!   memory only through `tensor::{host_read, take_grad, with_grad_mut}`, which on CUDA copy
//!   through the host (correct, slow). Code is generic over the float type so that gradient
//!   checks can run in `f64`.

mod builder;
mod error;
mod init;
pub mod layers;
pub mod models;
mod tensor;
pub mod train;

#[cfg(test)]
mod gradcheck;

pub use builder::VarBuilder;
pub use error::{CheckpointError, NnError};
pub use init::{Init, InitScheme, VarianceHook};
pub use models::{Model, ModelSpec};
pub use tensor::{
    collect_params, collect_params_mut, from_vec, open_device, Dev, DevError, Float, HasParams,
    Param, ParamKind, Tensor1, Tensor2, Tensor3, Tensor4,
};
