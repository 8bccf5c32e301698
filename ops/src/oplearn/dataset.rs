//! `pde.dataset`: a labeled `pde.generate` artifact -> the ml dataset format `train`,
//! `evaluate` and `eval.in_context` read, with the note's input scaling (section 1).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{fail, read_pde, scale_inputs};
use crate::ml::dataset::{write_dataset, DatasetMeta, Split, Targets, Task};
use crate::{parse_params, LegacyOp as Op, OpError, ParamError, RunContext};

/// The input holding the data to convert.
pub const DATA_INPUT: &str = "data";
/// Optional input: the training pool whose medians scale this data (default: the data itself).
pub const SCALES_INPUT: &str = "scales";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Keep only the first N samples of the pool (deterministic: the pool's own order).
    #[serde(default)]
    samples: Option<usize>,
    /// Samples for the val split (taken after the training samples).
    #[serde(default)]
    val: usize,
    /// Samples for the test split (the last ones).
    #[serde(default)]
    test: usize,
}

/// Splits in pool order: train = the first `kept - val - test`, then val, then test, so that
/// `train`'s `samples: N` takes nested subsets (the first N) that cycle through the source's
/// void fractions evenly.
fn split_ranges(kept: usize, val: usize, test: usize) -> Option<[std::ops::Range<usize>; 3]> {
    let train = kept.checked_sub(val + test)?;
    Some([0..train, train..train + val, train + val..kept])
}

pub struct PdeDatasetOp;

impl Op for PdeDatasetOp {
    fn name(&self) -> &'static str {
        "pde.dataset"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "scale a labeled pde.generate pool (note section 1) into train/val/test dataset splits"
    }
    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        let p: Params = parse_params(params)?;
        if p.samples == Some(0) {
            return Err(ParamError::new("samples", "must be at least 1"));
        }
        if let Some(n) = p.samples {
            if p.val + p.test > n {
                return Err(ParamError::new(
                    "val",
                    format!("val {} + test {} exceed samples {n}", p.val, p.test),
                ));
            }
        }
        Ok(())
    }
    fn required_inputs(&self, _params: &Value) -> Vec<String> {
        vec![DATA_INPUT.to_string()]
    }

    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let p: Params = parse_params(ctx.params)?;
        let dir = crate::ml::one_input(ctx, DATA_INPUT)?.to_path_buf();
        let data = read_pde(&dir)?;
        let reference = if ctx.inputs.contains_key(SCALES_INPUT) {
            crate::pde::read_meta(crate::ml::one_input(ctx, SCALES_INPUT)?)?
        } else {
            data.meta.clone()
        };
        let Some(y) = &data.y else {
            return Err(fail(
                "the `data` input is unlabeled (labeled: false); pde.dataset needs solutions",
            ));
        };
        let x = scale_inputs(&data, &reference)?;
        let kept = p.samples.unwrap_or(data.samples).min(data.samples);
        let Some(ranges) = split_ranges(kept, p.val, p.test) else {
            return Err(fail(format!(
                "val {} + test {} exceed the {kept} samples kept",
                p.val, p.test
            )));
        };
        let (n, c, c_y) = (data.resolution, data.channels, data.target_channels);
        let (sx, sy) = (c * n * n, c_y * n * n);
        let splits = ranges.map(|r| Split {
            n: r.len(),
            x: x[r.start * sx..r.end * sx].to_vec(),
            y: Targets::Values(y[r.start * sy..r.end * sy].to_vec()),
        });
        let meta = DatasetMeta {
            task: Task::Regression,
            classes: None,
            shape: [c, n, n],
            target_shape: Some([c_y, n, n]),
            samples: BTreeMap::new(),
            source: "pde.dataset".into(),
            normalization: None,
        };
        write_dataset(ctx.out_dir, meta, &splits)?;
        let scales = reference.scaling.as_ref().map(|s| s.f_norm_median);
        let _ = writeln!(
            ctx.log,
            "pde.dataset: {} {kept} samples -> train {} val {} test {}; f_norm median {scales:?}",
            data.meta.equation.name(),
            splits[0].n,
            splits[1].n,
            splits[2].n
        );
        for (name, s) in ["train", "val", "test"].iter().zip(&splits) {
            ctx.metrics.insert(format!("{name}_samples"), s.n as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_in_pool_order_and_refuse_overdraw() {
        assert_eq!(split_ranges(10, 2, 3), Some([0..5, 5..7, 7..10]));
        assert_eq!(split_ranges(4, 0, 4), Some([0..0, 0..0, 0..4]));
        assert_eq!(split_ranges(4, 3, 2), None);
    }
}
