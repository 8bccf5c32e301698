//! Losses (on taped tensors) and metrics (on values).

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use serde::{Deserialize, Serialize};

use crate::tensor::from_vec;
use crate::{Dev, Float, NnError, Tensor2};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Mean over the batch of -log softmax(logits)[label].
    CrossEntropy,
    /// Mean over all elements of (pred - target)^2.
    Mse,
    /// Sum of squared errors divided by the batch size (`docs/methods/operator-learning.md` §4).
    SumOfSquares,
}

/// What a batch is scored against: class labels, or values shaped like the model output.
#[derive(Clone, Debug)]
pub enum Target<E: Float> {
    Labels(Vec<usize>),
    Values(Tensor2<E>),
}

/// loss = -(1/B) sum_b log softmax(logits_b)[y_b]; logits `(batch, classes)`.
pub fn cross_entropy<E: Float, T: Tape<E, Dev>>(
    logits: Tensor2<E, T>,
    labels: &[usize],
) -> Result<Tensor<Rank0, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    let (b, c) = *logits.shape();
    if labels.len() != b {
        return Err(NnError::shape("labels per batch", b, labels.len()));
    }
    let mut onehot = vec![E::zero(); b * c];
    for (i, &y) in labels.iter().enumerate() {
        if y >= c {
            return Err(NnError::shape("class label", format!("< {c} classes"), y));
        }
        onehot[i * c + y] = E::of_f64(-1.0 / b as f64);
    }
    let onehot = from_vec(logits.device(), onehot, (b, c))?;
    let logp = logits.try_log_softmax::<Axis<1>>()?;
    Ok(logp.try_mul(onehot)?.try_sum::<Rank0, _>()?)
}

fn squared_error<E: Float, T: Tape<E, Dev>>(
    pred: Tensor2<E, T>,
    target: &Tensor2<E>,
) -> Result<Tensor<Rank0, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    if pred.shape() != target.shape() {
        return Err(NnError::shape("target", *pred.shape(), *target.shape()));
    }
    Ok(pred
        .try_sub(target.clone())?
        .try_square()?
        .try_sum::<Rank0, _>()?)
}

/// loss = (1 / (B N)) sum (pred - target)^2.
pub fn mse<E: Float, T: Tape<E, Dev>>(
    pred: Tensor2<E, T>,
    target: &Tensor2<E>,
) -> Result<Tensor<Rank0, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    let (b, n) = *pred.shape();
    Ok(squared_error(pred, target)?.try_mul(E::of_f64(1.0 / (b * n).max(1) as f64))?)
}

/// loss = (1 / B) sum (pred - target)^2.
pub fn sum_of_squares<E: Float, T: Tape<E, Dev>>(
    pred: Tensor2<E, T>,
    target: &Tensor2<E>,
) -> Result<Tensor<Rank0, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    let b = pred.shape().0;
    Ok(squared_error(pred, target)?.try_mul(E::of_f64(1.0 / b.max(1) as f64))?)
}

/// The loss `kind` of `pred` against `target`, with a clear error when they do not fit.
pub fn loss<E: Float, T: Tape<E, Dev>>(
    kind: LossKind,
    pred: Tensor2<E, T>,
    target: &Target<E>,
) -> Result<Tensor<Rank0, E, Dev, T>, NnError>
where
    Dev: Device<E>,
{
    match (kind, target) {
        (LossKind::CrossEntropy, Target::Labels(y)) => cross_entropy(pred, y),
        (LossKind::Mse, Target::Values(t)) => mse(pred, t),
        (LossKind::SumOfSquares, Target::Values(t)) => sum_of_squares(pred, t),
        (LossKind::CrossEntropy, Target::Values(_)) => Err(NnError::config(
            "loss",
            "cross_entropy needs class labels as targets",
        )),
        (_, Target::Labels(_)) => Err(NnError::config(
            "loss",
            "mse and sum_of_squares need value targets, not labels",
        )),
    }
}

/// Fraction of rows of `logits` (`(batch, classes)`, row-major) whose arg-max is the label.
pub fn accuracy<E: Float>(logits: &[E], classes: usize, labels: &[usize]) -> f64 {
    if labels.is_empty() || classes == 0 {
        return 0.0;
    }
    let correct = logits
        .chunks(classes)
        .zip(labels)
        .filter(|(row, &y)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, E::neg_infinity()),
                    |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                );
            best.0 == y
        })
        .count();
    correct as f64 / labels.len() as f64
}

/// Mean over samples of ||pred - target||_2 / ||target||_2 (`docs/methods/operator-learning.md`
/// §4); rows of `per_sample` values.
pub fn relative_l2<E: Float>(pred: &[E], target: &[E], per_sample: usize) -> f64 {
    if per_sample == 0 || pred.is_empty() {
        return 0.0;
    }
    let rows = pred.chunks(per_sample).zip(target.chunks(per_sample));
    let mut total = 0.0;
    let mut n = 0;
    for (p, t) in rows {
        let err: f64 = p
            .iter()
            .zip(t)
            .map(|(a, b)| (a.into_f64() - b.into_f64()).powi(2))
            .sum();
        let norm: f64 = t.iter().map(|b| b.into_f64().powi(2)).sum();
        total += (err / norm.max(f64::MIN_POSITIVE)).sqrt();
        n += 1;
    }
    total / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, rand_tensor};

    #[test]
    fn cross_entropy_matches_formula_and_gradient() {
        let dev = Dev::default();
        let logits = rand_tensor(&dev, (3, 4), 1);
        let labels = [1, 3, 0];
        let l = cross_entropy(logits.clone(), &labels).unwrap().array();
        let v = logits.as_vec();
        let mut want = 0.0;
        for (r, &y) in labels.iter().enumerate() {
            let row = &v[r * 4..r * 4 + 4];
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            want += lse - row[y];
        }
        assert!((l - want / 3.0).abs() < 1e-12);
        check_input_grad(&logits, |t| cross_entropy(t, &labels), 1e-6);
        assert!(cross_entropy(logits, &[0, 4, 1]).is_err());
    }

    #[test]
    fn squared_losses_and_metrics() {
        let dev = Dev::default();
        let p = from_vec(&dev, vec![1.0f64, 2.0, 3.0, 4.0], (2, 2)).unwrap();
        let t = from_vec(&dev, vec![1.0f64, 0.0, 3.0, 0.0], (2, 2)).unwrap();
        assert_eq!(mse(p.clone(), &t).unwrap().array(), 5.0);
        assert_eq!(sum_of_squares(p.clone(), &t).unwrap().array(), 10.0);
        check_input_grad(&p, |x| sum_of_squares(x, &t), 1e-6);
        let rel = relative_l2(&p.as_vec(), &t.as_vec(), 2);
        assert!((rel - 0.5 * (2.0 / 1.0 + 4.0 / 3.0)).abs() < 1e-12);
        assert_eq!(
            accuracy(&[0.1f64, 0.9, 0.8, 0.2, 0.3, 0.7], 2, &[1, 0, 0]),
            2.0 / 3.0
        );
        assert!(loss(LossKind::CrossEntropy, p, &Target::Values(t)).is_err());
    }
}
