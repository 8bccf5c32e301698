//! The error type of the arch module.

use crate::ParamError;

/// Everything the training-free analysis can reject.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArchError {
    /// A failure of the model layer's parser other than a bad spec (not expected in practice).
    #[error("{0}")]
    Topology(String),

    /// `docs/methods/arch-aware.md` §3: a DAG without an input->output path is not a network.
    #[error(
        "topology {topology:?} has no input->output path through existing edges, so it is not \
         a valid network; make at least one chain of non-zero edges lead from node 0 to the \
         last node"
    )]
    NoPath { field: String, topology: String },

    #[error(
        "topology {topology:?} has more than {limit} input->output paths; use fewer nodes or \
         sparser connections"
    )]
    TooManyPaths { topology: String, limit: usize },

    /// A setting out of range (base LR, kernel size, box, batch ...).
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl ArchError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ArchError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl ArchError {
    /// The param path this error is about (empty when it is not about one param).
    pub fn field(&self) -> &str {
        match self {
            ArchError::Invalid { field, .. } | ArchError::NoPath { field, .. } => field,
            ArchError::TooManyPaths { .. } => "topology",
            ArchError::Topology(_) => "",
        }
    }
}

impl From<ArchError> for ParamError {
    fn from(e: ArchError) -> Self {
        let message = match &e {
            ArchError::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        };
        ParamError::new(e.field(), message)
    }
}
