//! The error type of the nn crate.

use super::tensor::DevError;

/// Everything that can go wrong building, running, training or checkpointing a model.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// The compute device failed (out of memory, wrong element count, a CUDA driver error).
    /// Held as text: dfdx's `CudaError` is not a `std::error::Error`.
    #[error("tensor device error: {0}")]
    Device(String),

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

    /// Reading or writing a checkpoint failed.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
}

impl From<DevError> for NnError {
    fn from(e: DevError) -> Self {
        NnError::Device(e.to_string())
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
