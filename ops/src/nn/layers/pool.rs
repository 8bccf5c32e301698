//! Average pooling.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use super::conv::{unfold, ConvGeometry};

use crate::nn::tensor::from_vec;
use crate::nn::{Dev, Float, NnError, Tensor2, Tensor4};

/// Average over `kernel x kernel` windows. With `count_include_pad = false` the padded border
/// windows average only the real pixels (PyTorch's `count_include_pad=False`, used by
/// NAS-Bench-201's `avg_pool_3x3`).
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
        let geom = ConvGeometry {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            dilation: 1,
        };
        let k2 = self.kernel * self.kernel;
        // Mean over each window's k^2 im2col rows, counting padding as zeros.
        let y = unfold(x, geom)?
            .try_reshape_like(&(b, c, k2, ho * wo))?
            .try_mean::<(usize, usize, usize), Axis<2>>()?
            .try_reshape_like(&(b, c, ho, wo))?;
        if self.count_include_pad || self.padding == 0 {
            return Ok(y);
        }
        // Rescale each window by kernel^2 / (real pixels in the window).
        let k2 = k2 as f64;
        let count = |o: usize, n: usize| {
            let start = (o * self.stride) as isize - self.padding as isize;
            (0..self.kernel as isize)
                .filter(|d| (0..n as isize).contains(&(start + d)))
                .count() as f64
        };
        let mut scale = Vec::with_capacity(b * c * ho * wo);
        for _ in 0..b * c {
            for i in 0..ho {
                for j in 0..wo {
                    scale.push(E::of_f64(k2 / (count(i, h) * count(j, w)).max(1.0)));
                }
            }
        }
        let scale: Tensor<_, E, Dev> = from_vec(y.device(), scale, (b, c, ho, wo))?;
        Ok(y.try_mul(scale)?)
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
