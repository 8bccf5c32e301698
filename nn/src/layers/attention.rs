//! Multi-head self-attention (Vaswani et al. 2017, §3.2.2), optionally within non-overlapping
//! windows of a token grid (Swin-style partitioning, as in the As-ViT space;
//! `docs/methods/asvit.md`).

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use super::Linear;
use crate::tensor::impl_has_params;
use crate::{Dev, Float, NnError, Tensor3, VarBuilder};

/// y = Proj(concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h) on `(batch, tokens, dim)`.
#[derive(Clone, Debug)]
pub struct MultiHeadSelfAttention<E: Float> {
    pub q: Linear<E>,
    pub k: Linear<E>,
    pub v: Linear<E>,
    pub proj: Linear<E>,
    pub heads: usize,
}
impl_has_params!(MultiHeadSelfAttention { q, k, v, proj });

type Tensor4T<E, T> = Tensor<(usize, usize, usize, usize), E, Dev, T>;

impl<E: Float> MultiHeadSelfAttention<E>
where
    Dev: Device<E>,
{
    /// `heads` heads over `dim` features (a multiple of `heads`); q, k, v and proj drawn in
    /// that order.
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self, NnError> {
        if heads == 0 || dim / heads * heads != dim {
            return Err(NnError::spec(
                vb.name(),
                format!("dim {dim} must be a positive multiple of heads {heads}"),
            ));
        }
        Ok(Self {
            q: Linear::new(dim, dim, vb.pp("q"))?,
            k: Linear::new(dim, dim, vb.pp("k"))?,
            v: Linear::new(dim, dim, vb.pp("v"))?,
            proj: Linear::new(dim, dim, vb.pp("proj"))?,
            heads,
        })
    }

    /// Global attention over all tokens: `(batch, n, dim)` -> same.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor3<E, T>) -> Result<Tensor3<E, T>, NnError> {
        let (b, n, d) = *x.shape();
        let (h, dh) = (self.heads, d / self.heads);
        let split = |t: Tensor3<E, T>| -> Result<Tensor4T<E, T>, NnError> {
            Ok(t.try_reshape_like(&(b, n, h, dh))?
                .try_permute::<_, Axes4<0, 2, 1, 3>>()?
                .try_contiguous()?)
        };
        let q = split(self.q.forward3(x.with_empty_tape())?)?;
        let k = split(self.k.forward3(x.with_empty_tape())?)?;
        let v = split(self.v.forward3(x)?)?;
        let kt = k.try_permute::<_, Axes4<0, 1, 3, 2>>()?.try_contiguous()?;
        // (b, h, n, dh) x (b, h, dh, n) -> (b, h, n, n), softmax over keys.
        let scores = q
            .try_matmul(kt)?
            .try_mul(E::of_f64(1.0 / (dh as f64).sqrt()))?;
        let attn = scores.try_softmax::<Axis<3>>()?;
        let y = attn
            .try_matmul(v)?
            .try_permute::<_, Axes4<0, 2, 1, 3>>()?
            .try_contiguous()?;
        self.proj.forward3(y.try_reshape_like(&(b, n, d))?)
    }

    /// Attention within non-overlapping `window x window` blocks of a `grid = (gh, gw)` token
    /// grid (row-major tokens); `window` must divide both sides.
    pub fn forward_windowed<T: Tape<E, Dev>>(
        &self,
        x: Tensor3<E, T>,
        (gh, gw): (usize, usize),
        window: usize,
    ) -> Result<Tensor3<E, T>, NnError> {
        let (b, n, d) = *x.shape();
        if gh * gw != n || window == 0 || gh / window * window != gh || gw / window * window != gw {
            return Err(NnError::shape(
                "windowed attention grid (window must divide both sides)",
                format!("{gh}x{gw} = {n} tokens, window {window}"),
                (n, window),
            ));
        }
        let (nh, nw) = (gh / window, gw / window);
        // (b, nh, ws, nw, ws, d) -> (b, nh, nw, ws, ws, d) -> (b nh nw, ws ws, d)
        let windows = x
            .try_reshape_like(&(b, nh, window, nw, window, d))?
            .try_permute::<_, Axes6<0, 1, 3, 2, 4, 5>>()?
            .try_contiguous()?
            .try_reshape_like(&(b * nh * nw, window * window, d))?;
        let y = self.forward(windows)?;
        let y = y
            .try_reshape_like(&(b, nh, nw, window, window, d))?
            .try_permute::<_, Axes6<0, 1, 3, 2, 4, 5>>()?
            .try_contiguous()?
            .try_reshape_like(&(b, n, d))?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use crate::Init;

    fn attn(dim: usize, heads: usize) -> MultiHeadSelfAttention<f64> {
        let (dev, init) = (Dev::default(), Init::default());
        MultiHeadSelfAttention::new(dim, heads, VarBuilder::new(&dev, &init, 0).pp("attn")).unwrap()
    }

    /// Direct loops over the definition.
    fn naive(
        a: &MultiHeadSelfAttention<f64>,
        x: &[f64],
        (b, n, d): (usize, usize, usize),
    ) -> Vec<f64> {
        let lin = |l: &Linear<f64>, row: &[f64]| -> Vec<f64> {
            let (w, bias) = (l.weight.to_vec(), l.bias.as_ref().unwrap().to_vec());
            (0..d)
                .map(|o| bias[o] + (0..d).map(|i| w[o * d + i] * row[i]).sum::<f64>())
                .collect()
        };
        let (h, dh) = (a.heads, d / a.heads);
        let mut out = Vec::new();
        for bi in 0..b {
            let rows: Vec<&[f64]> = (0..n)
                .map(|t| &x[(bi * n + t) * d..(bi * n + t + 1) * d])
                .collect();
            let q: Vec<Vec<f64>> = rows.iter().map(|r| lin(&a.q, r)).collect();
            let k: Vec<Vec<f64>> = rows.iter().map(|r| lin(&a.k, r)).collect();
            let v: Vec<Vec<f64>> = rows.iter().map(|r| lin(&a.v, r)).collect();
            for qt in &q {
                let mut concat = vec![0.0; d];
                for hh in 0..h {
                    let s: Vec<f64> = (0..n)
                        .map(|u| {
                            (0..dh)
                                .map(|j| qt[hh * dh + j] * k[u][hh * dh + j])
                                .sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for u in 0..n {
                        let p = (s[u] - m).exp() / z;
                        for j in 0..dh {
                            concat[hh * dh + j] += p * v[u][hh * dh + j];
                        }
                    }
                }
                out.extend(lin(&a.proj, &concat));
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_and_gradients() {
        let dev = Dev::default();
        let mut a = attn(4, 2);
        let x = rand_tensor(&dev, (2, 3, 4), 1);
        let y = a.forward(x.clone()).unwrap().as_vec();
        for (p, q) in y.iter().zip(naive(&a, &x.as_vec(), (2, 3, 4))) {
            assert!((p - q).abs() < 1e-10);
        }
        check_input_grad(&x, |t| a.forward(t), 1e-6);
        check_param_grads(&mut a, &x, |m, t| m.forward(t), 6, 1e-6);
    }

    #[test]
    fn windows_attend_only_within_themselves() {
        let dev = Dev::default();
        let a = attn(4, 1);
        // A 2x4 grid with window 2: tokens 0,1,4,5 form the first window.
        let x = rand_tensor(&dev, (1, 8, 4), 2);
        let y = a.forward_windowed(x.clone(), (2, 4), 2).unwrap().as_vec();
        let xv = x.as_vec();
        let first: Vec<f64> = [0, 1, 4, 5]
            .iter()
            .flat_map(|&t| xv[t * 4..t * 4 + 4].to_vec())
            .collect();
        let want = naive(&a, &first, (1, 4, 4));
        for (slot, &t) in [0usize, 1, 4, 5].iter().enumerate() {
            for j in 0..4 {
                assert!((y[t * 4 + j] - want[slot * 4 + j]).abs() < 1e-10);
            }
        }
        check_input_grad(&x, |t| a.forward_windowed(t, (2, 4), 2), 1e-6);
        assert!(a.forward_windowed(x, (2, 4), 3).is_err());
    }
}
