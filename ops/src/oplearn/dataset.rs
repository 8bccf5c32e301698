//! `pde.dataset`: a labeled `pde.generate` artifact -> the ml dataset format `train`,
//! `evaluate` and `eval.in_context` read, with the input scaling of
//! `docs/methods/operator-learning.md` §1 ("Model input and scaling").

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{read_pde, scale_inputs};
use crate::dataset::{write_splits, DatasetMeta, Split, Targets, Task};
use crate::fail;
use crate::{Count, OpError, Outputs, ParamError, RunContext, TypedOp};

/// The input holding the data to convert.
pub const DATA_INPUT: &str = "data";
/// Optional input: the training pool whose medians scale this data (default: the data itself).
pub const SCALES_INPUT: &str = "scales";

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PdeDatasetParams {
    /// Keep only the first N samples of the pool (deterministic: the pool's own order).
    pub samples: Option<Count>,
    /// Samples for the val split (taken after the training samples).
    pub val: usize,
    /// Samples for the test split (the last ones).
    pub test: usize,
}

/// Splits in pool order: train = the first `kept - val - test`, then val, then test, so that
/// `train`'s `samples: N` takes nested subsets (the first N) that cycle through the source's
/// void fractions evenly.
fn split_ranges(kept: usize, val: usize, test: usize) -> Option<[std::ops::Range<usize>; 3]> {
    let train = kept.checked_sub(val + test)?;
    Some([0..train, train..train + val, train + val..kept])
}

pub struct PdeDatasetOp;

impl TypedOp for PdeDatasetOp {
    const NAME: &'static str = "pde.dataset";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "scale a labeled pde.generate pool (arXiv 2402.15734 §3; docs/methods/operator-learning.md §1) into train/val/test dataset splits";
    type Params = PdeDatasetParams;
    type Config = PdeDatasetParams;

    fn resolve(p: PdeDatasetParams) -> Result<PdeDatasetParams, ParamError> {
        if let Some(n) = p.samples {
            if p.val + p.test > n.get() {
                return Err(ParamError::new(
                    "val",
                    format!("val {} + test {} exceed samples {n}", p.val, p.test),
                ));
            }
        }
        Ok(p)
    }
    fn required_inputs(_: &PdeDatasetParams) -> Vec<String> {
        vec![DATA_INPUT.to_string()]
    }

    fn run(
        &self,
        p: &PdeDatasetParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let dir = ctx.one_input(DATA_INPUT)?.to_path_buf();
        let data = read_pde(&dir)?;
        let reference = if ctx.inputs.contains_key(SCALES_INPUT) {
            crate::pde::read_meta(ctx.one_input(SCALES_INPUT)?)?
        } else {
            data.meta.clone()
        };
        let Some(y) = &data.y else {
            return Err(fail(
                "the `data` input is unlabeled (labeled: false); pde.dataset needs solutions",
            ));
        };
        let x = scale_inputs(&data, &reference)?;
        let kept = p.samples.map_or(data.samples, Count::get).min(data.samples);
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
            source: Self::NAME.into(),
            normalization: None,
        };
        write_splits(out, meta, &splits)?;
        let scales = reference.scaling.as_ref().map(|s| s.f_norm_median);
        let _ = writeln!(
            ctx.log,
            "pde.dataset: {} {kept} samples -> train {} val {} test {}; f_norm median {scales:?}",
            data.meta.equation.name(),
            splits[0].n,
            splits[1].n,
            splits[2].n
        );
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
