//! The error type of the nn crate.

use std::path::PathBuf;

use super::tensor::DevError;

/// Everything that can go wrong building, running, training or checkpointing a model.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// The compute device failed (out of memory, wrong element count, a CUDA driver error).
    /// Not a `source`: dfdx's `CudaError` does not implement `std::error::Error`.
    #[error("tensor device error: {0}")]
    Device(DevError),

    /// A `cuda` build could not open GPU 0 (no GPU, or the driver failed); a CPU build never
    /// returns it.
    #[error("this engine was built with CUDA but GPU 0 cannot be opened ({0}); check the driver with nvidia-smi, or use a build without the `cuda` feature")]
    GpuUnavailable(DevError),

    /// A `model:` block (or another layer configuration) is not a valid network.
    #[error("invalid model spec: `{field}`: {message}")]
    InvalidSpec { field: String, message: String },

    /// Data handed to a model or loss does not fit it.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// The training loss became NaN or infinite: the run diverged. Callers decide whether that
    /// stops the stage or is recorded as `diverged = 1`.
    #[error("loss is not finite ({value}) at step {step}: training diverged; lower the learning rate or set `on_divergence: record`")]
    NonFiniteLoss { step: u64, value: f64 },

    /// An optimiser or schedule setting is out of range.
    #[error("invalid training setting `{field}`: {message}")]
    InvalidConfig { field: String, message: String },

    /// Reading or writing the checkpoint file or folder `path` failed.
    #[error("checkpoint {}: {source}", .path.display())]
    Checkpoint {
        path: PathBuf,
        source: CheckpointError,
    },
}

/// What went wrong with a checkpoint (the path is in [`NnError::Checkpoint`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// `model.json` is not a checkpoint's spec, or could not be written.
    #[error(transparent)]
    Json(#[from] serde_json::Error),

    /// The weights file is not valid safetensors, or could not be serialised.
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),

    /// The file lacks some of the model's tensors.
    #[error("{loaded} of the model's {expected} tensors were in the file")]
    MissingTensors { loaded: usize, expected: usize },

    /// A tensor of the file maps to a name the model does not have.
    #[error("tensor {name:?} maps to {target:?}, which the model does not have")]
    UnknownTensor { name: String, target: String },

    /// A tensor's shape differs from the parameter it maps to.
    #[error("tensor {name:?} has shape {file:?}, parameter {target:?} {model:?}")]
    ShapeMismatch {
        name: String,
        target: String,
        file: Vec<usize>,
        model: Vec<usize>,
    },

    /// A tensor is stored in a type other than F32 or F64.
    #[error("tensor {name:?} has dtype {dtype:?}; only F32 and F64 load")]
    Dtype {
        name: String,
        dtype: safetensors::Dtype,
    },

    /// A tensor's data is not a whole number of values.
    #[error("tensor {name:?}: truncated data")]
    Truncated { name: String },
}

impl From<DevError> for NnError {
    fn from(e: DevError) -> Self {
        NnError::Device(e)
    }
}

impl NnError {
    /// An [`NnError::InvalidSpec`] naming `field`.
    pub fn spec(field: impl Into<String>, message: impl Into<String>) -> Self {
        NnError::InvalidSpec {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An [`NnError::InvalidConfig`] naming `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        NnError::InvalidConfig {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An [`NnError::Shape`] for `what`, with the expected and actual shapes in `Debug` form.
    pub fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Debug,
        got: impl std::fmt::Debug,
    ) -> Self {
        NnError::Shape {
            what: what.into(),
            expected: format!("{expected:?}"),
            got: format!("{got:?}"),
        }
    }
}
