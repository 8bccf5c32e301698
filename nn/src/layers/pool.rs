//! Average pooling.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rayon::prelude::*;

use super::conv::Im2col;
use super::ConvGeometry;
use crate::tensor::{grad_buffer_apply, grad_buffer_to_host, host_read};
use crate::{Dev, Float, NnError, Tensor2, Tensor4};

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
        let kernel = self.kernel;
        let geom = ConvGeometry {
            kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: 1,
        };
        // The pooling windows are those of a convolution with this geometry.
        let Some(g) = Im2col::new(geom, 1, h, w) else {
            return Err(NnError::shape(
                "avg pool input",
                format!(">= kernel {kernel}"),
                (h, w),
            ));
        };
        let windows = Windows::<E>::new(g, self.count_include_pad);
        let (ho, wo) = (g.ho, g.wo);
        let x = x.try_contiguous()?;
        let (x, mut tape) = x.split_tape();
        let xv = host_read(&x);
        // Backward needs only the gradient ids of input and output, not their values.
        let (dev, x) = (x.device().clone(), x.ghost());
        let (hw, l) = (h * w, ho * wo);
        let mut y = vec![E::zero(); b * c * l];
        y.par_chunks_mut(l)
            .zip(xv.par_chunks(hw))
            .for_each(|(yp, xp)| windows.average_plane(yp, xp));
        drop(xv);
        let out = dev.try_tensor_from_vec(y, (b, c, ho, wo))?;
        let out_id = out.ghost();
        tape.add_backward_op(move |grads| {
            let go = grad_buffer_to_host::<E>(grads.get_or_alloc_mut(&out_id)?)?;
            grad_buffer_apply::<E, _>(grads.get_or_alloc_mut(&x)?, |gx| {
                gx.par_chunks_mut(hw)
                    .zip(go.par_chunks(l))
                    .for_each(|(gp, gop)| windows.spread_plane(gp, gop))
            })?;
            Ok(())
        });
        Ok(out.put_tape(tape))
    }
}

/// The pooling windows of one input size, shared by forward and backward.
struct Windows<E> {
    g: Im2col,
    /// Per output row: the input rows `[lo, hi)` of its window.
    rows: Vec<(usize, usize)>,
    /// Per kernel column offset q: the output columns `[lo, hi)` j whose input column
    /// j stride + q - padding is inside.
    col_ranges: Vec<(usize, usize)>,
    /// 1 / (pixels averaged) for output (i, j).
    inv: Vec<E>,
}

impl<E: Float> Windows<E> {
    fn new(g: Im2col, count_include_pad: bool) -> Self {
        let ConvGeometry {
            kernel,
            stride,
            padding,
            ..
        } = g.geom;
        let (h, w, ho, wo) = (g.h, g.w, g.ho, g.wo);
        let rows: Vec<(usize, usize)> = (0..ho)
            .map(|i| {
                let start = (i * stride) as isize - padding as isize;
                let lo = start.max(0) as usize;
                let hi = ((start + kernel as isize).max(0) as usize).min(h);
                (lo, hi.max(lo))
            })
            .collect();
        let col_ranges: Vec<(usize, usize)> = (0..kernel).map(|q| g.valid(q, w, wo)).collect();
        let full = (kernel * kernel) as f64;
        let inv: Vec<E> = rows
            .iter()
            .flat_map(|&(a, b)| {
                let col_ranges = &col_ranges;
                (0..wo).map(move |j| {
                    let n = if count_include_pad {
                        full
                    } else {
                        let cols = col_ranges
                            .iter()
                            .filter(|&&(lo, hi)| (lo..hi).contains(&j))
                            .count();
                        ((b - a) * cols) as f64
                    };
                    E::of_f64(1.0 / n.max(1.0))
                })
            })
            .collect();
        Self {
            g,
            rows,
            col_ranges,
            inv,
        }
    }

    /// One plane's forward: `yp` `(h', w')`, zeroed, <- window averages of `xp` `(h, w)`.
    fn average_plane(&self, yp: &mut [E], xp: &[E]) {
        let (w, wo) = (self.g.w, self.g.wo);
        let (stride, padding) = (self.g.geom.stride, self.g.geom.padding);
        // Each output row is the sum, over the rows of its window and the kernel's column
        // offsets, of shifted input row pieces (contiguous for stride 1, so vectorised).
        for (i, (yr, &(a, bb))) in yp.chunks_exact_mut(wo).zip(&self.rows).enumerate() {
            for r in a..bb {
                let xr = &xp[r * w..(r + 1) * w];
                for (q, &(lo, hi)) in self.col_ranges.iter().enumerate() {
                    let x0 = lo * stride + q - padding;
                    let dst = &mut yr[lo..hi.max(lo)];
                    if stride == 1 {
                        for (d, s) in dst.iter_mut().zip(&xr[x0..]) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in dst.iter_mut().zip(xr[x0..].iter().step_by(stride)) {
                            *d += *s;
                        }
                    }
                }
            }
            for (v, &f) in yr.iter_mut().zip(&self.inv[i * wo..(i + 1) * wo]) {
                *v *= f;
            }
        }
    }

    /// One plane's backward: `gp` `(h, w)` += the output gradient `gop` `(h', w')`, scaled,
    /// spread over each window.
    fn spread_plane(&self, gp: &mut [E], gop: &[E]) {
        let (w, wo) = (self.g.w, self.g.wo);
        let (stride, padding) = (self.g.geom.stride, self.g.geom.padding);
        let mut gs = vec![E::zero(); wo];
        for (i, &(a, bb)) in self.rows.iter().enumerate() {
            for ((s, &gv), &f) in gs
                .iter_mut()
                .zip(&gop[i * wo..(i + 1) * wo])
                .zip(&self.inv[i * wo..(i + 1) * wo])
            {
                *s = gv * f;
            }
            for r in a..bb {
                let gr = &mut gp[r * w..(r + 1) * w];
                for (q, &(lo, hi)) in self.col_ranges.iter().enumerate() {
                    let x0 = lo * stride + q - padding;
                    let src = &gs[lo..hi.max(lo)];
                    if stride == 1 {
                        for (d, s) in gr[x0..].iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in gr[x0..].iter_mut().step_by(stride).zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        }
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
    use crate::gradcheck::{check_input_grad, rand_tensor};

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
