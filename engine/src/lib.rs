//! `engine`: declarative, content-hashed ML experiment pipelines.
//!
//! [`spec`] reads a YAML pipeline, [`plan`] expands it into stage instances in topological
//! order, [`key`] hashes what each result depends on, and [`exec`] runs what is stale against
//! the [`cache`] crate's store, in parallel. The numerical work lives in the `ops` crate; this
//! crate never computes anything itself.

pub mod exec;
pub mod executor;
pub mod key;
pub mod keys;
pub mod ops_doc;
pub mod plan;
pub mod progress;
pub mod report;
pub mod slurm;
pub mod spec;
pub mod status;
pub mod watch;
pub mod worker;
