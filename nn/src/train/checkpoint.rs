//! Checkpoints: a directory with the weights as safetensors (every parameter and buffer under
//! its stable dotted name, readable by numpy/PyTorch users) and the model spec as JSON.

use std::path::Path;

use dfdx::tensor_ops::Device;
use serde::{Deserialize, Serialize};

use crate::error::CheckpointError;
use crate::models::InputShape;
use crate::{
    collect_params, collect_params_mut, Dev, Float, HasParams, Init, Model, ModelSpec, NnError,
    VarBuilder,
};

pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const SPEC_FILE: &str = "model.json";

/// The JSON half of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    pub model: ModelSpec,
    pub input: InputShape,
}

fn ck_err(path: &Path, source: impl Into<CheckpointError>) -> NnError {
    NnError::Checkpoint {
        path: path.to_path_buf(),
        source: source.into(),
    }
}

/// Writes `dir/weights.safetensors` and `dir/model.json` (the directory must exist).
pub fn save_checkpoint<E: Float>(model: &Model<E>, dir: &Path) -> Result<(), NnError>
where
    Dev: Device<E>,
{
    let params = collect_params(model);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(name, p)| (name.clone(), p.shape.clone(), E::encode_le(&p.to_vec())))
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(E::SAFETENSORS_DTYPE, shape.clone(), data)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ck_err(dir, e))?;
    let weights = dir.join(WEIGHTS_FILE);
    let buf = safetensors::serialize(views, &None).map_err(|e| ck_err(&weights, e))?;
    std::fs::write(&weights, buf).map_err(|e| ck_err(&weights, e))?;
    let meta = CheckpointMeta {
        model: model.spec().clone(),
        input: model.input_shape(),
    };
    let spec = dir.join(SPEC_FILE);
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| ck_err(&spec, e))?;
    std::fs::write(&spec, json).map_err(|e| ck_err(&spec, e))
}

/// Rebuilds the model saved in `dir` and loads its weights (every name must match).
pub fn load_checkpoint<E: Float>(dev: &Dev, dir: &Path) -> Result<Model<E>, NnError>
where
    Dev: Device<E>,
{
    let spec_path = dir.join(SPEC_FILE);
    let text = std::fs::read(&spec_path).map_err(|e| ck_err(&spec_path, e))?;
    let meta: CheckpointMeta = serde_json::from_slice(&text).map_err(|e| ck_err(&spec_path, e))?;
    let init = Init::default();
    let mut model = Model::build(&meta.model, meta.input, VarBuilder::new(dev, &init, 0))?;
    let loaded = load_weights(&mut model, &dir.join(WEIGHTS_FILE), |n| Some(n.to_string()))?;
    let expected = collect_params(&model).len();
    if loaded.len() != expected {
        return Err(ck_err(
            dir,
            CheckpointError::MissingTensors {
                loaded: loaded.len(),
                expected,
            },
        ));
    }
    Ok(model)
}

/// Loads tensors from a safetensors file into `model`: file tensor `n` goes to parameter
/// `rename(n)` (`None` skips it), e.g. to map `encoder.*` onto `backbone.*`. Every renamed
/// tensor must exist in the model with the same shape. Returns the names loaded.
pub fn load_weights<E: Float, M: HasParams<E>>(
    model: &mut M,
    path: &Path,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, NnError>
where
    Dev: Device<E>,
{
    let bytes = std::fs::read(path).map_err(|e| ck_err(path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ck_err(path, e))?;
    let mut params = collect_params_mut(model);
    let mut loaded = Vec::new();
    let mut names = file.names();
    names.sort();
    for name in names {
        let Some(target) = rename(name) else { continue };
        let view = file.tensor(name).map_err(|e| ck_err(path, e))?;
        let Some((_, p)) = params.iter_mut().find(|(n, _)| *n == target) else {
            let (name, target) = (name.to_string(), target);
            return Err(ck_err(
                path,
                CheckpointError::UnknownTensor { name, target },
            ));
        };
        if view.shape() != p.shape.as_slice() {
            return Err(ck_err(
                path,
                CheckpointError::ShapeMismatch {
                    name: name.to_string(),
                    target,
                    file: view.shape().to_vec(),
                    model: p.shape.clone(),
                },
            ));
        }
        let values: Option<Vec<E>> = match view.dtype() {
            safetensors::Dtype::F32 => f32::decode_le(view.data())
                .map(|v| v.into_iter().map(|x| E::of_f64(x as f64)).collect()),
            safetensors::Dtype::F64 => {
                f64::decode_le(view.data()).map(|v| v.into_iter().map(E::of_f64).collect())
            }
            dtype => {
                let name = name.to_string();
                return Err(ck_err(path, CheckpointError::Dtype { name, dtype }));
            }
        };
        let values = values.ok_or_else(|| {
            let name = name.to_string();
            ck_err(path, CheckpointError::Truncated { name })
        })?;
        p.set_vec(values)?;
        loaded.push(target);
    }
    Ok(loaded)
}
