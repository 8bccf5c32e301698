//! Tensor aliases, the float types the layers run on, and named parameters.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use super::NnError;

/// The device every layer runs on: dfdx's `Cpu`, or its `Cuda` (GPU 0) in a build with the
/// `cuda` feature. Nothing else in the layers names a device; the few host kernels go through
/// [`host_read`], [`take_grad`] and [`with_grad_mut`], which know both.
#[cfg(not(feature = "cuda"))]
pub type Dev = Cpu;
/// The device every layer runs on: dfdx's `Cuda` (GPU 0) in this `cuda` build.
#[cfg(feature = "cuda")]
pub type Dev = dfdx::tensor::Cuda;

/// What the device's operations fail with (`<Dev as HasErr>::Err`, named concretely so that
/// `NnError` can convert from it).
#[cfg(not(feature = "cuda"))]
pub type DevError = CpuError;
/// What the device's operations fail with (`<Dev as HasErr>::Err`).
#[cfg(feature = "cuda")]
pub type DevError = dfdx::tensor::CudaError;

/// The device of this build, for a stage. On CPU this cannot fail; in a `cuda` build it opens
/// GPU 0 once per thread (a stage's tensors all meet on one instance; dfdx's `Cuda` is neither
/// `Send` nor `Sync`) and says so when there is none (dfdx's `Cuda::default()` would panic).
pub fn open_device() -> Result<Dev, NnError> {
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Cpu::default())
    }
    #[cfg(feature = "cuda")]
    {
        // Only a success is kept: dfdx's `CudaError` cannot be cloned, and a failure is
        // reported (and retried) on each call.
        thread_local! {
            static GPU: std::cell::OnceCell<Dev> = const { std::cell::OnceCell::new() };
        }
        GPU.with(|gpu| {
            if let Some(dev) = gpu.get() {
                return Ok(dev.clone());
            }
            let dev = dfdx::tensor::Cuda::try_build(0, 0).map_err(NnError::GpuUnavailable)?;
            Ok(gpu.get_or_init(|| dev).clone())
        })
    }
}

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
    /// The error function in this type's precision (`libm::erff` / `libm::erf`).
    fn erf(self) -> Self;
    /// Little-endian bytes of `values`, as safetensors stores them.
    fn encode_le(values: &[Self]) -> Vec<u8>;
    /// Values from little-endian bytes; `None` when the length is not a multiple of the size.
    fn decode_le(bytes: &[u8]) -> Option<Vec<Self>>;
}

macro_rules! impl_float {
    ($t:ty, $dtype:expr, $erf:path) => {
        impl Float for $t {
            const SAFETENSORS_DTYPE: safetensors::Dtype = $dtype;
            fn of_f64(x: f64) -> Self {
                x as $t
            }
            fn into_f64(self) -> f64 {
                self as f64
            }
            fn erf(self) -> Self {
                $erf(self)
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
impl_float!(f32, safetensors::Dtype::F32, libm::erff);
impl_float!(f64, safetensors::Dtype::F64, libm::erf);

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
        impl<E: $crate::Float> $crate::HasParams<E> for $ty<E> {
            fn visit_params<'a>(
                &'a self,
                prefix: &str,
                out: &mut Vec<(String, &'a $crate::Param<E>)>,
            ) {
                $( $crate::HasParams::visit_params(
                    &self.$field, &$crate::tensor::join(prefix, stringify!($field)), out); )*
            }
            fn visit_params_mut<'a>(
                &'a mut self,
                prefix: &str,
                out: &mut Vec<(String, &'a mut $crate::Param<E>)>,
            ) {
                $( $crate::HasParams::visit_params_mut(
                    &mut self.$field, &$crate::tensor::join(prefix, stringify!($field)), out); )*
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

/// The values of a contiguous tensor in host memory, in row-major order: a `memcpy` on the CPU,
/// a device-to-host copy on CUDA. Callers make the tensor contiguous first.
pub(crate) fn host_read<S: Shape, E: Float, T>(t: &Tensor<S, E, Dev, T>) -> Vec<E>
where
    Dev: Device<E>,
{
    let mut v = vec![E::zero(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// Moves the gradient of `t` out of `grads` into host memory, for a backward op that is the
/// only reader of that gradient (the op that created `t`: every consumer of `t` ran its
/// backward before). On the CPU this takes the buffer itself, no copy, and frees it as soon as
/// the caller drops it, so an op's output gradient does not live until backward ends (dfdx keeps
/// every gradient of a `leaky` tape otherwise); the entry left behind is empty. On CUDA it is a
/// device-to-host copy (the slow path of the host kernels).
pub(crate) fn take_grad<S: Shape, E: Float>(
    grads: &mut Gradients<E, Dev>,
    t: &Tensor<S, E, Dev>,
) -> Result<Vec<E>, DevError>
where
    Dev: Device<E>,
{
    grad_buffer_to_host::<E>(grads.get_or_alloc_mut(t)?)
}

/// Runs `f` on the gradient of `t` (allocated as zeros if absent) as a host slice, for host
/// kernels that accumulate into it. On CUDA the buffer is copied to the host and back
/// around `f` (the slow path; correct, but two transfers per call).
pub(crate) fn with_grad_mut<S: Shape, E: Float, R>(
    grads: &mut Gradients<E, Dev>,
    t: &Tensor<S, E, Dev>,
    f: impl FnOnce(&mut [E]) -> R,
) -> Result<R, DevError>
where
    Dev: Device<E>,
{
    grad_buffer_apply::<E, R>(grads.get_or_alloc_mut(t)?, f)
}

// Separate functions so that `<Dev as Storage<E>>::Vec` normalises to the concrete buffer type:
// inside functions that carry a `Dev: Device<E>` bound the projection stays opaque.
//
// Host ops also call the two directly on `grads.get_or_alloc_mut(&t.ghost())?`: a ghost keeps a
// tensor's gradient id without its data, so an op that keeps its own host copy of an input (or
// needs only the id of its output) does not keep the tensor's memory alive until backward.
// (`GhostTensor` cannot be named outside dfdx, hence no wrapper taking one.)

/// [`take_grad`] on a gradient buffer already looked up.
#[cfg(not(feature = "cuda"))]
pub(crate) fn grad_buffer_to_host<E: Unit>(
    v: &mut <Cpu as Storage<E>>::Vec,
) -> Result<Vec<E>, DevError> {
    Ok(std::mem::take::<Vec<E>>(v))
}

/// [`with_grad_mut`] on a gradient buffer already looked up.
#[cfg(not(feature = "cuda"))]
pub(crate) fn grad_buffer_apply<E: Unit, R>(
    v: &mut <Cpu as Storage<E>>::Vec,
    f: impl FnOnce(&mut [E]) -> R,
) -> Result<R, DevError> {
    Ok(f(v))
}

/// [`take_grad`] on a gradient buffer already looked up.
#[cfg(feature = "cuda")]
pub(crate) fn grad_buffer_to_host<E: Unit>(
    v: &mut <dfdx::tensor::Cuda as Storage<E>>::Vec,
) -> Result<Vec<E>, DevError> {
    Ok(v.device().dtoh_sync_copy(v)?)
}

/// [`with_grad_mut`] on a gradient buffer already looked up.
#[cfg(feature = "cuda")]
pub(crate) fn grad_buffer_apply<E: Unit, R>(
    v: &mut <dfdx::tensor::Cuda as Storage<E>>::Vec,
    f: impl FnOnce(&mut [E]) -> R,
) -> Result<R, DevError> {
    let dev = v.device();
    let mut host = dev.dtoh_sync_copy(v)?;
    let r = f(&mut host);
    dev.htod_sync_copy_into(&host, v)?;
    Ok(r)
}
