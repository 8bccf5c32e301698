//! Smoke-size runs of the paper pipelines through the binary (filled in with the pipelines).
