//! The error of running a plan: bad input (a [`SpecError`], with its position and fix) or a
//! cache failure. The binary alone turns it into words and an exit code.

use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cache: {0}")]
    Cache(#[from] cache::CacheError),
}
