//! `engine`: declarative, content-hashed ML experiment pipelines.
//!
//! [`spec`] reads a YAML pipeline, [`plan`] expands it into stage instances in topological
//! order, [`key_doc`] and [`node_keys`] hash what each result depends on, and [`exec`] runs
//! what is stale against the [`cache`] crate's store, in parallel. The numerical work lives in
//! the `ops` crate; this crate never computes anything itself.

pub mod error;
pub mod exec;
pub mod executor;
pub mod experiments;
mod heartbeat;
pub mod key_doc;
pub mod node_keys;
pub mod ops_doc;
pub mod outcome;
pub mod plan;
pub mod progress;
pub mod report;
mod reuse;
mod scheduler;
pub mod slurm;
pub mod spec;
pub mod staleness;
pub mod status;
pub mod table;
pub mod watch;
pub mod worker;
