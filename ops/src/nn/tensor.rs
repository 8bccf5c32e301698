//! Tensor aliases, the float types the layers run on, and named parameters.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use super::NnError;

/// The device every layer runs on. A `cuda` build changes only this alias.
pub type Dev = Cpu;

/// `(n,)`
pub type Tensor1<E, T = NoneTape> = Tensor<(usize,), E, Dev, T>;
/// `(rows, cols)`, e.g. `(batch, features)`
pub type Tensor2<E, T = NoneTape> = Tensor<(usize, usize), E, Dev, T>;
/// `(batch, tokens, features)`
pub type Tensor3<E, T = NoneTape> = Tensor<(usize, usize, usize), E, Dev, T>;
/// `(batch, channels, height, width)`
pub type Tensor4<E, T = NoneTape> = Tensor<(usize, usize, usize, usize), E, Dev, T>;

/// A float type the layers run on: `f32` for training, `f64` for gradient checks.
pub trait Float:
    Dtype + num_traits::Float + rand_distr::uniform::SampleUniform + std::fmt::Display
{
    /// How the type is stored in a safetensors file.
    const SAFETENSORS_DTYPE: safetensors::Dtype;
    fn of_f64(x: f64) -> Self;
    fn into_f64(self) -> f64;
    /// Little-endian bytes of `values`, as safetensors stores them.
    fn encode_le(values: &[Self]) -> Vec<u8>;
    /// Values from little-endian bytes; `None` when the length is not a multiple of the size.
    fn decode_le(bytes: &[u8]) -> Option<Vec<Self>>;
}

macro_rules! impl_float {
    ($t:ty, $dtype:expr) => {
        impl Float for $t {
            const SAFETENSORS_DTYPE: safetensors::Dtype = $dtype;
            fn of_f64(x: f64) -> Self {
                x as $t
            }
            fn into_f64(self) -> f64 {
                self as f64
            }
            fn encode_le(values: &[Self]) -> Vec<u8> {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            fn decode_le(bytes: &[u8]) -> Option<Vec<Self>> {
                const N: usize = std::mem::size_of::<$t>();
                if bytes.len() % N != 0 {
                    return None;
                }
                let mut out = Vec::with_capacity(bytes.len() / N);
                for chunk in bytes.chunks_exact(N) {
                    let mut b = [0u8; N];
                    b.copy_from_slice(chunk);
                    out.push(<$t>::from_le_bytes(b));
                }
                Some(out)
            }
        }
    };
}
impl_float!(f32, safetensors::Dtype::F32);
impl_float!(f64, safetensors::Dtype::F64);

/// Whether the optimiser updates a parameter or it is state saved with the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Learned by the optimiser (weights, biases, norm scales).
    Trainable,
    /// Saved and loaded, never optimised (BatchNorm running statistics).
    Buffer,
}

/// One named tensor of a model: a flat `(numel,)` tensor plus its logical shape.
///
/// Layers reshape `value` to `shape` when they use it; the reshape of a contiguous tensor keeps
/// its gradient id, so the gradient of the flat tensor is the gradient of the parameter.
#[derive(Clone, Debug)]
pub struct Param<E: Float> {
    pub value: Tensor1<E>,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl<E: Float> Param<E>
where
    Dev: Device<E>,
{
    /// A parameter holding `values` (row-major in `shape`).
    pub fn from_vec(
        dev: &Dev,
        values: Vec<E>,
        shape: Vec<usize>,
        kind: ParamKind,
    ) -> Result<Self, NnError> {
        let numel: usize = shape.iter().product();
        if values.len() != numel {
            return Err(NnError::shape("parameter values", numel, values.len()));
        }
        let value = dev.try_tensor_from_vec(values, (numel,))?;
        Ok(Self { value, shape, kind })
    }

    pub fn numel(&self) -> usize {
        self.value.shape().0
    }

    pub fn to_vec(&self) -> Vec<E> {
        self.value.as_vec()
    }

    /// Replaces the values, keeping shape and kind (a new gradient id).
    pub fn set_vec(&mut self, values: Vec<E>) -> Result<(), NnError> {
        if values.len() != self.numel() {
            return Err(NnError::shape(
                "parameter values",
                self.numel(),
                values.len(),
            ));
        }
        let dev = self.value.device().clone();
        self.value = dev.try_tensor_from_vec(values, (self.numel(),))?;
        Ok(())
    }

    pub fn vec1(&self) -> Tensor1<E> {
        self.value.clone()
    }

    /// The parameter viewed as `(a, b)`; panics only on an internal shape bug.
    pub fn mat2(&self) -> Result<Tensor2<E>, NnError> {
        match self.shape[..] {
            [a, b] => Ok(self.value.clone().try_reshape_like(&(a, b))?),
            _ => Err(NnError::shape("rank-2 parameter", "2 dims", &self.shape)),
        }
    }

    pub fn ten3(&self) -> Result<Tensor3<E>, NnError> {
        match self.shape[..] {
            [a, b, c] => Ok(self.value.clone().try_reshape_like(&(a, b, c))?),
            _ => Err(NnError::shape("rank-3 parameter", "3 dims", &self.shape)),
        }
    }

    pub fn ten4(&self) -> Result<Tensor4<E>, NnError> {
        match self.shape[..] {
            [a, b, c, d] => Ok(self.value.clone().try_reshape_like(&(a, b, c, d))?),
            _ => Err(NnError::shape("rank-4 parameter", "4 dims", &self.shape)),
        }
    }
}

/// A layer or model whose parameters can be enumerated by stable dotted names.
///
/// `prefix` is the name of `self` (empty at the root); implementations call [`join`] to name
/// their own tensors and children, so names read like `stages.1.cells.0.edges.2.conv.weight`.
pub trait HasParams<E: Float> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<E>)>);
    fn visit_params_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Param<E>)>);
}

/// `prefix.name`, or `name` at the root.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// All parameters of `m`, in a stable order, with their names.
pub fn collect_params<E: Float, M: HasParams<E> + ?Sized>(m: &M) -> Vec<(String, &Param<E>)> {
    let mut out = Vec::new();
    m.visit_params("", &mut out);
    out
}

/// All parameters of `m`, mutably, in the same order as [`collect_params`].
pub fn collect_params_mut<E: Float, M: HasParams<E> + ?Sized>(
    m: &mut M,
) -> Vec<(String, &mut Param<E>)> {
    let mut out = Vec::new();
    m.visit_params_mut("", &mut out);
    out
}

impl<E: Float, M: HasParams<E>> HasParams<E> for Vec<M> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<E>)>) {
        for (i, m) in self.iter().enumerate() {
            m.visit_params(&join(prefix, &i.to_string()), out);
        }
    }
    fn visit_params_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Param<E>)>) {
        for (i, m) in self.iter_mut().enumerate() {
            m.visit_params_mut(&join(prefix, &i.to_string()), out);
        }
    }
}

impl<E: Float, M: HasParams<E>> HasParams<E> for Option<M> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<E>)>) {
        if let Some(m) = self {
            m.visit_params(prefix, out);
        }
    }
    fn visit_params_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Param<E>)>) {
        if let Some(m) = self {
            m.visit_params_mut(prefix, out);
        }
    }
}

impl<E: Float> HasParams<E> for Param<E> {
    fn visit_params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Param<E>)>) {
        out.push((prefix.to_string(), self));
    }
    fn visit_params_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Param<E>)>) {
        out.push((prefix.to_string(), self));
    }
}

/// Implements [`HasParams`] for a struct by listing its fields (parameters or sub-layers).
macro_rules! impl_has_params {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl<E: $crate::nn::Float> $crate::nn::HasParams<E> for $ty<E> {
            fn visit_params<'a>(
                &'a self,
                prefix: &str,
                out: &mut Vec<(String, &'a $crate::nn::Param<E>)>,
            ) {
                $( $crate::nn::HasParams::visit_params(
                    &self.$field, &$crate::nn::tensor::join(prefix, stringify!($field)), out); )*
            }
            fn visit_params_mut<'a>(
                &'a mut self,
                prefix: &str,
                out: &mut Vec<(String, &'a mut $crate::nn::Param<E>)>,
            ) {
                $( $crate::nn::HasParams::visit_params_mut(
                    &mut self.$field, &$crate::nn::tensor::join(prefix, stringify!($field)), out); )*
            }
        }
    };
}
pub(crate) use impl_has_params;

/// A host-side vector as a tensor of `shape` on `dev`.
pub fn from_vec<S: dfdx::shapes::Shape, E: Float>(
    dev: &Dev,
    values: Vec<E>,
    shape: S,
) -> Result<Tensor<S, E, Dev>, NnError>
where
    Dev: Device<E>,
{
    if values.len() != shape.num_elements() {
        return Err(NnError::shape(
            "tensor data",
            shape.num_elements(),
            values.len(),
        ));
    }
    Ok(dev.try_tensor_from_vec(values, shape)?)
}

/// The host memory behind a CPU gradient buffer. A separate function so that
/// `<Cpu as Storage<E>>::Vec` normalises to `CachableVec<E>`: inside functions that carry a
/// `Dev: Device<E>` bound the projection stays opaque.
pub(crate) fn host_mut<E: dfdx::shapes::Unit>(v: &mut <Cpu as Storage<E>>::Vec) -> &mut [E] {
    v
}
