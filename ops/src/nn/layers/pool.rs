//! Average pooling.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rayon::prelude::*;

use crate::nn::tensor::{host_read, take_grad, with_grad_mut};
use crate::nn::{Dev, Float, NnError, Tensor2, Tensor4};

/// Average over `kernel x kernel` windows. With `count_include_pad = false` the padded border
/// windows average only the real pixels (PyTorch's `count_include_pad=False`, used by
/// NAS-Bench-201's `avg_pool_3x3`).
///
/// A host kernel (window sums forward, the scaled gradient spread over each window backward),
/// planes in parallel; on CUDA it copies through the host (slow path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub count_include_pad: bool,
}

impl AvgPool2d {
    fn out_size(&self, n: usize) -> Option<usize> {
        (n + 2 * self.padding)
            .checked_sub(self.kernel)
            .map(|r| r / self.stride + 1)
    }

    /// `(batch, c, h, w)` -> `(batch, c, h', w')`.
    pub fn forward<E: Float, T: Tape<E, Dev>>(
        &self,
        x: Tensor4<E, T>,
    ) -> Result<Tensor4<E, T>, NnError>
    where
        Dev: Device<E>,
    {
        if self.kernel == 0 || self.stride == 0 {
            return Err(NnError::spec(
                "avg_pool",
                "kernel and stride must be positive",
            ));
        }
        let (b, c, h, w) = *x.shape();
        let (Some(ho), Some(wo)) = (self.out_size(h), self.out_size(w)) else {
            return Err(NnError::shape(
                "avg pool input",
                format!(">= kernel {}", self.kernel),
                (h, w),
            ));
        };
        let (kernel, stride, padding) = (self.kernel, self.stride, self.padding);
        // Per output position along one axis: the input range of its window and, for
        // count_include_pad, the full window size; otherwise the real pixels only.
        let windows = |n: usize, out: usize| -> Vec<(usize, usize)> {
            (0..out)
                .map(|o| {
                    let start = (o * stride) as isize - padding as isize;
                    let lo = start.max(0) as usize;
                    let hi = ((start + kernel as isize).max(0) as usize).min(n);
                    (lo, hi.max(lo))
                })
                .collect()
        };
        let (rows, colsw) = (windows(h, ho), windows(w, wo));
        let full = (kernel * kernel) as f64;
        let count_include_pad = self.count_include_pad;
        // 1 / (pixels averaged) for output (i, j).
        let inv: Vec<E> = rows
            .iter()
            .flat_map(|&(a, b)| {
                colsw.iter().map(move |&(c, d)| {
                    let n = if count_include_pad {
                        full
                    } else {
                        ((b - a) * (d - c)) as f64
                    };
                    E::of_f64(1.0 / n.max(1.0))
                })
            })
            .collect();
        let x = x.try_contiguous()?;
        let (x, mut tape) = x.split_tape();
        let xv = host_read(&x);
        let (hw, l) = (h * w, ho * wo);
        let mut y = vec![E::zero(); b * c * l];
        y.par_chunks_mut(l)
            .zip(xv.par_chunks(hw))
            .for_each(|(yp, xp)| {
                for (i, &(a, bb)) in rows.iter().enumerate() {
                    for (j, &(cc, d)) in colsw.iter().enumerate() {
                        let mut acc = E::zero();
                        for r in a..bb {
                            for v in &xp[r * w + cc..r * w + d] {
                                acc += *v;
                            }
                        }
                        yp[i * wo + j] = acc * inv[i * wo + j];
                    }
                }
            });
        drop(xv);
        let out = x.device().try_tensor_from_vec(y, (b, c, ho, wo))?;
        let out_id = out.clone();
        tape.add_backward_op(move |grads| {
            let go = take_grad(grads, &out_id)?;
            with_grad_mut(grads, &x, |gx| {
                gx.par_chunks_mut(hw)
                    .zip(go.par_chunks(l))
                    .for_each(|(gp, gop)| {
                        for (i, &(a, bb)) in rows.iter().enumerate() {
                            for (j, &(cc, d)) in colsw.iter().enumerate() {
                                let g = gop[i * wo + j] * inv[i * wo + j];
                                for r in a..bb {
                                    for v in &mut gp[r * w + cc..r * w + d] {
                                        *v += g;
                                    }
                                }
                            }
                        }
                    })
            })?;
            Ok(())
        });
        Ok(out.put_tape(tape))
    }
}

/// Global average pooling: `(batch, c, h, w)` -> `(batch, c)`.
pub fn global_avg_pool<E: Float, T: Tape<E, Dev>>(
    x: Tensor4<E, T>,
) -> Result<Tensor2<E, T>, NnError>
where
    Dev: Device<E>,
{
    Ok(x.try_mean::<(usize, usize), Axes2<2, 3>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_input_grad, rand_tensor};

    #[test]
    fn avg_pool_excluding_padding_averages_real_pixels() {
        let dev = Dev::default();
        let x = rand_tensor(&dev, (1, 2, 4, 5), 1);
        let pool = AvgPool2d {
            kernel: 3,
            stride: 1,
            padding: 1,
            count_include_pad: false,
        };
        let y = pool.forward(x.clone()).unwrap();
        assert_eq!(*y.shape(), (1, 2, 4, 5));
        let (xv, yv) = (x.as_vec(), y.as_vec());
        for c in 0..2 {
            for i in 0..4usize {
                for j in 0..5usize {
                    let mut acc = Vec::new();
                    for p in i.saturating_sub(1)..(i + 2).min(4) {
                        for q in j.saturating_sub(1)..(j + 2).min(5) {
                            acc.push(xv[(c * 4 + p) * 5 + q]);
                        }
                    }
                    let want = acc.iter().sum::<f64>() / acc.len() as f64;
                    assert!((yv[(c * 4 + i) * 5 + j] - want).abs() < 1e-12);
                }
            }
        }
        check_input_grad(&x, |t| pool.forward(t), 1e-6);
        let strided = AvgPool2d {
            kernel: 2,
            stride: 2,
            padding: 0,
            count_include_pad: true,
        };
        assert_eq!(*strided.forward(x.clone()).unwrap().shape(), (1, 2, 2, 2));
        check_input_grad(&x, |t| strided.forward(t), 1e-6);
    }

    #[test]
    fn global_pool_is_the_spatial_mean() {
        let dev = Dev::default();
        let x = rand_tensor(&dev, (2, 3, 2, 2), 2);
        let y = global_avg_pool(x.clone()).unwrap().as_vec();
        let xv = x.as_vec();
        for bc in 0..6 {
            let want = xv[bc * 4..bc * 4 + 4].iter().sum::<f64>() / 4.0;
            assert!((y[bc] - want).abs() < 1e-12);
        }
        check_input_grad(&x, global_avg_pool, 1e-6);
    }
}
