//! Operator learning with unsupervised pretraining and in-context learning (arXiv 2402.15734):
//! `pde.dataset`, `pretrain.mask`, `eval.in_context`.
//!
//! Implements §1 ("Model input and scaling"), §3 and §5 of
//! `docs/methods/operator-learning.md`. Fine-tuning (§4) is the `train` op with an
//! `init` input and `init_map: {"encoder.*": "*"}`: `fno2d_mae`'s `encoder.lift.*` /
//! `encoder.layers.*` load into `fno2d`'s `lift.*` / `layers.*`, bridge and decoder are skipped,
//! the head stays fresh.

pub mod dataset;
pub mod icl;
pub mod pretrain;

use std::path::Path;
use std::sync::Arc;

use crate::pde::{PdeMeta, DATA_FILE};
use crate::{fail, OpError, Registry};

/// Adds this module's ops to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(Arc::new(dataset::PdeDatasetOp));
    registry.register(Arc::new(pretrain::PretrainMaskOp));
    registry.register(Arc::new(icl::InContextOp));
}

/// A `pde.generate` artifact in memory: `x` row-major `[n, c, h, w]`, `y` `[n, c_y, h, w]` when
/// labeled (c_y = 1 for Poisson/Helmholtz; the stored frames, times the state's channels, for the
/// time-dependent equations).
#[derive(Clone, Debug)]
pub struct PdeData {
    pub meta: PdeMeta,
    pub samples: usize,
    pub channels: usize,
    /// c_y.
    pub target_channels: usize,
    pub resolution: usize,
    pub x: Vec<f32>,
    pub y: Option<Vec<f32>>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads `data.safetensors` + `meta.json` written by `pde.generate` in `dir`.
pub fn read_pde(dir: &Path) -> Result<PdeData, OpError> {
    let meta = crate::pde::read_meta(dir)?;
    let path = dir.join(DATA_FILE);
    let bytes = std::fs::read(&path).map_err(|e| OpError::io(path.display().to_string(), e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let tensor = |name: &str, want: usize| -> Result<Vec<f32>, OpError> {
        let t = file
            .tensor(name)
            .map_err(|e| fail(format!("{}: {name}: {e}", path.display())))?;
        let v = f32s(t.data());
        if t.dtype() != safetensors::Dtype::F32 || v.len() != want {
            return Err(fail(format!(
                "{}: {name} is {:?} {:?}; meta.json implies F32 with {want} values",
                path.display(),
                t.dtype(),
                t.shape()
            )));
        }
        Ok(v)
    };
    let (s, c, n) = (meta.samples, meta.channels.len(), meta.resolution);
    let c_y = meta.target_channels.len();
    let x = tensor("x", s * c * n * n)?;
    let y = if meta.labeled {
        Some(tensor("y", s * c_y * n * n)?)
    } else {
        None
    };
    Ok(PdeData {
        samples: s,
        channels: c,
        target_channels: c_y,
        resolution: n,
        meta,
        x,
        y,
    })
}

/// `docs/methods/operator-learning.md` §1, "Model input and scaling": per sample i, every input
/// channel is divided by s_i = f_norm_i / median_train(f_norm), then coefficient channel c
/// (channels 1..) by its training median magnitude. `reference` is the *training* pool's meta (the
/// data's own meta for a training set), so test/OOD sets are normalised with in-distribution
/// scales. Targets are not scaled. Returns the scaled `x` `[n, c, h, w]`.
///
/// The time-dependent equations carry no scaling (the paper defines it for Poisson/Helmholtz;
/// their inputs, a state at t_start, are O(1) already): their `x` comes back unchanged, after
/// the same check that `reference` is the same equation.
pub fn scale_inputs(data: &PdeData, reference: &PdeMeta) -> Result<Vec<f32>, OpError> {
    if data.meta.scaling.is_none() && reference.scaling.is_none() {
        if reference.equation != data.meta.equation {
            return Err(fail(format!(
                "the `scales` input is {}, the data {}; point `scales` at a pool of the same \
                 equation",
                reference.equation.name(),
                data.meta.equation.name()
            )));
        }
        return Ok(data.x.clone());
    }
    let own = data.meta.scaling.as_ref().ok_or_else(|| {
        fail(format!(
            "{} data carries no scaling (only Poisson/Helmholtz do)",
            data.meta.equation.name()
        ))
    })?;
    let reference_scaling = reference.scaling.as_ref().ok_or_else(|| {
        fail("the `scales` input carries no scaling; point it at a Poisson/Helmholtz pool")
    })?;
    if reference.equation != data.meta.equation
        || reference_scaling.coeff_channels != own.coeff_channels
    {
        return Err(fail(format!(
            "the `scales` input is {} with coefficient channels {:?}, the data {} with {:?}; \
             point `scales` at the training pool of the same equation",
            reference.equation.name(),
            reference_scaling.coeff_channels,
            data.meta.equation.name(),
            own.coeff_channels
        )));
    }
    if own.f_norm.len() != data.samples || data.channels != own.coeff_channels.len() + 1 {
        return Err(fail("meta.json scaling does not match the data's shape"));
    }
    let median = reference_scaling.f_norm_median;
    let plane = data.resolution * data.resolution;
    let mut x = data.x.clone();
    for (i, sample) in x.chunks_mut(data.channels * plane).enumerate() {
        let s = own.f_norm[i] / median;
        let s = if s.is_finite() && s > 0.0 { s } else { 1.0 };
        for (c, chan) in sample.chunks_mut(plane).enumerate() {
            let coeff = if c == 0 {
                1.0
            } else {
                let m = reference_scaling.coeff_channel_medians[c - 1];
                if m > 0.0 && m.is_finite() {
                    m
                } else {
                    1.0
                }
            };
            let div = s * coeff;
            for v in chan.iter_mut() {
                *v = (*v as f64 / div) as f32;
            }
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pde::{generate, Config};
    use crate::CancelFlag;
    use serde_json::json;

    fn written(params: serde_json::Value, dir: &Path) -> PdeData {
        let config = Config::from_value(&params).unwrap();
        let data = generate(&config, 0, 1, &CancelFlag::new(), &mut |_| {}).unwrap();
        crate::pde::output::write(dir, &data).unwrap();
        read_pde(dir).unwrap()
    }

    #[test]
    fn time_dependent_data_reads_all_target_channels_and_is_not_rescaled() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let rd = written(
            json!({"equation": "reaction_diffusion", "resolution": 8, "samples": 3,
                   "t_end": 0.02, "frames": 2}),
            a.path(),
        );
        // (u, v) at 2 frames: 4 target channels.
        assert_eq!((rd.channels, rd.target_channels), (2, 4));
        assert_eq!(rd.y.as_ref().unwrap().len(), 3 * 4 * 8 * 8);
        assert_eq!(scale_inputs(&rd, &rd.meta).unwrap(), rd.x);
        let ns = written(
            json!({"equation": "navier_stokes", "resolution": 8, "samples": 2, "t_end": 0.02}),
            b.path(),
        );
        assert_eq!((ns.channels, ns.target_channels), (1, 1));
        let err = scale_inputs(&ns, &rd.meta).unwrap_err().to_string();
        assert!(err.contains("same equation"), "{err}");
    }
}
