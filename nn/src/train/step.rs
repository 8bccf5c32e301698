//! One training step, prediction and evaluation.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use super::loss::{accuracy, loss, relative_l2, LossKind, Target};
use super::optim::{clip_grad_norm, Optimizer};
use crate::layers::ForwardCtx;
use crate::{Dev, Float, Model, NnError, Tensor2, Tensor4};

/// What one optimisation step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The batch loss before the update.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Forward, loss, backward, clip, update. A NaN or infinite loss returns
/// [`NnError::NonFiniteLoss`] before any parameter changes, so the caller can stop or record
/// the divergence.
#[allow(clippy::too_many_arguments)]
pub fn train_step<E: Float>(
    model: &mut Model<E>,
    opt: &mut Optimizer<E>,
    x: Tensor4<E>,
    target: &Target<E>,
    kind: LossKind,
    lr: f64,
    clip: Option<f64>,
    ctx: &mut ForwardCtx,
    step: u64,
) -> Result<StepReport, NnError>
where
    Dev: Device<E>,
{
    let y = model.forward(x.traced(Gradients::leaky()), ctx)?;
    let l = loss(kind, y, target)?;
    let value = l.array().into_f64();
    if !value.is_finite() {
        return Err(NnError::NonFiniteLoss { step, value });
    }
    let mut grads = l.try_backward()?;
    let mut g = Optimizer::gradients(model, &mut grads)?;
    drop(grads);
    let grad_norm = clip_grad_norm(&mut g, clip)?;
    opt.step(model, g, lr)?;
    Ok(StepReport {
        loss: value,
        grad_norm,
    })
}

/// The model's outputs in eval mode (running BatchNorm statistics, no dropout, no tape).
pub fn predict<E: Float>(model: &mut Model<E>, x: Tensor4<E>) -> Result<Tensor2<E>, NnError>
where
    Dev: Device<E>,
{
    model.forward(x, &mut ForwardCtx::eval())
}

/// Metrics of a model on a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean of the per-batch losses weighted by batch size.
    pub loss: f64,
    /// For label targets.
    pub accuracy: Option<f64>,
    /// For value targets: mean over samples of ||pred - y|| / ||y||.
    pub relative_l2: Option<f64>,
}

/// Evaluates `model` on all of `x` in eval mode, `batch_size` samples at a time.
pub fn evaluate<E: Float>(
    model: &mut Model<E>,
    x: &Tensor4<E>,
    target: &Target<E>,
    kind: LossKind,
    batch_size: usize,
) -> Result<EvalReport, NnError>
where
    Dev: Device<E>,
{
    let n: usize = x.shape().0;
    let bs = batch_size.max(1);
    let (mut loss_sum, mut preds) = (0.0, Vec::new());
    let mut start = 0;
    while start < n {
        let end = (start + bs).min(n);
        let xb = x.clone().try_slice((start..end, .., .., ..))?;
        let tb = match target {
            Target::Labels(y) => Target::Labels(
                y.get(start..end)
                    .map(<[usize]>::to_vec)
                    .ok_or_else(|| NnError::shape("labels", n, y.len()))?,
            ),
            Target::Values(t) => {
                if t.shape().0 != n {
                    return Err(NnError::shape("target rows", n, t.shape().0));
                }
                Target::Values(t.clone().try_slice((start..end, ..))?)
            }
        };
        let y = predict(model, xb)?;
        preds.extend(y.as_vec());
        loss_sum += loss(kind, y, &tb)?.array().into_f64() * (end - start) as f64;
        start = end;
    }
    let per_sample = preds.len().checked_div(n).unwrap_or(0);
    let (accuracy, relative_l2) = match target {
        Target::Labels(y) => (Some(accuracy(&preds, per_sample, y)), None),
        Target::Values(t) => (None, Some(relative_l2(&preds, &t.as_vec(), per_sample))),
    };
    Ok(EvalReport {
        loss: loss_sum / n.max(1) as f64,
        accuracy,
        relative_l2,
    })
}
