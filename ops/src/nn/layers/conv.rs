//! 2-D convolution.

use dfdx::{shapes::*, tensor::*, tensor_ops::*};
use rand::rngs::StdRng;

use crate::nn::tensor::{host_mut, impl_has_params};
use crate::nn::{Dev, Float, Init, NnError, Param, ParamKind, Tensor3, Tensor4};

/// Cross-correlation of `(batch, in, h, w)` with W: `(out, in, k, k)`, plus b: `(out,)`;
/// out size = (h + 2 padding - dilation (k - 1) - 1) / stride + 1 (groups = 1).
#[derive(Clone, Debug)]
pub struct Conv2d<E: Float> {
    pub weight: Param<E>,
    pub bias: Option<Param<E>>,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}
impl_has_params!(Conv2d { weight, bias });

/// Geometry of a [`Conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvGeometry {
    /// Stride 1, dilation 1, padding that keeps odd-kernel outputs the input size.
    pub fn same(kernel: usize) -> Self {
        Self {
            kernel,
            stride: 1,
            padding: kernel / 2,
            dilation: 1,
        }
    }
}

impl<E: Float> Conv2d<E>
where
    Dev: Device<E>,
{
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &Dev,
        name: &str,
        in_channels: usize,
        out_channels: usize,
        geometry: ConvGeometry,
        bias: bool,
        init: &Init,
        rng: &mut StdRng,
    ) -> Result<Self, NnError> {
        let ConvGeometry {
            kernel,
            stride,
            padding,
            dilation,
        } = geometry;
        if in_channels == 0 || out_channels == 0 || kernel == 0 || stride == 0 || dilation == 0 {
            return Err(NnError::spec(
                name,
                format!(
                    "conv2d needs positive channels, kernel, stride and dilation \
                     (in {in_channels}, out {out_channels}, kernel {kernel}, stride {stride}, \
                     dilation {dilation})"
                ),
            ));
        }
        let area = kernel * kernel;
        let (fan_in, fan_out) = (in_channels * area, out_channels * area);
        let w = init.weights(name, fan_in, fan_out, out_channels * fan_in, rng);
        let weight = Param::from_vec(
            dev,
            w,
            vec![out_channels, in_channels, kernel, kernel],
            ParamKind::Trainable,
        )?;
        let bias = if bias {
            let b = init.biases(name, fan_in, fan_out, out_channels, rng);
            Some(Param::from_vec(
                dev,
                b,
                vec![out_channels],
                ParamKind::Trainable,
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            dilation,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.weight.shape[1]
    }

    pub fn out_channels(&self) -> usize {
        self.weight.shape[0]
    }

    pub fn kernel(&self) -> usize {
        self.weight.shape[2]
    }

    /// Output side length for an input side `n`, or `None` if the kernel does not fit.
    pub fn out_size(&self, n: usize) -> Option<usize> {
        let span = self.dilation * (self.kernel() - 1) + 1;
        (n + 2 * self.padding)
            .checked_sub(span)
            .map(|r| r / self.stride + 1)
    }

    /// `(batch, in, h, w)` -> `(batch, out, h', w')`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor4<E, T>, NnError> {
        let (_, c, h, w) = *x.shape();
        if c != self.in_channels() {
            return Err(NnError::shape(
                "conv2d input channels",
                self.in_channels(),
                c,
            ));
        }
        if self.out_size(h).is_none() || self.out_size(w).is_none() {
            let span = self.dilation * (self.kernel() - 1) + 1;
            return Err(NnError::shape(
                "conv2d input size (kernel larger than the padded input)",
                format!("sides >= {}", span.saturating_sub(2 * self.padding)),
                (h, w),
            ));
        }
        let geom = ConvGeometry {
            kernel: self.kernel(),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
        };
        let (b, o) = (x.shape().0, self.out_channels());
        let (ho, wo) = (self.out_size(h).unwrap_or(0), self.out_size(w).unwrap_or(0));
        // y = W (o, c k k) . cols (c k k, ho wo) per sample: a batched matmul on im2col columns.
        let cols = unfold(x, geom)?;
        let ckk = cols.shape().1;
        let w = self
            .weight
            .value
            .clone()
            .try_reshape_like(&(o, ckk))?
            .retaped::<T>()
            .try_broadcast_like::<_, Axis<0>>(&(b, o, ckk))?;
        let y = w.try_matmul(cols)?.try_reshape_like(&(b, o, ho, wo))?;
        match &self.bias {
            Some(bias) => {
                let shape = *y.shape();
                Ok(y.try_add(
                    bias.vec1()
                        .try_broadcast_like::<_, Axes3<0, 2, 3>>(&shape)?,
                )?)
            }
            None => Ok(y),
        }
    }
}

/// im2col: `(batch, c, h, w)` -> `(batch, c k k, h' w')`; row `(c, p, q)`, column `(i, j)`
/// holds x[c, i stride + p dilation - padding, j stride + q dilation - padding] (0 outside).
///
/// dfdx 0.13 gates its conv2d and pool2d kernels behind the nightly compiler, so convolution and
/// pooling are this op plus a matmul or a mean. The backward pass is col2im: each column
/// gradient is added back to the pixel it was read from. The kernel runs on host memory (CPU).
pub fn unfold<E: Float, T: Tape<E, Dev>>(
    x: Tensor4<E, T>,
    geom: ConvGeometry,
) -> Result<Tensor3<E, T>, NnError>
where
    Dev: Device<E>,
{
    let (b, c, h, w) = *x.shape();
    let ConvGeometry {
        kernel: k,
        stride,
        padding,
        dilation,
    } = geom;
    let out = |n: usize| {
        (n + 2 * padding)
            .checked_sub(dilation * (k - 1) + 1)
            .map(|r| r / stride + 1)
    };
    let (Some(ho), Some(wo)) = (out(h), out(w)) else {
        return Err(NnError::shape(
            "unfold input (kernel larger than padded input)",
            k,
            (h, w),
        ));
    };
    let (rows, l, chw) = (c * k * k, ho * wo, c * h * w);
    // Source offset within one sample for every (row, column); NONE marks padding.
    const NONE: usize = usize::MAX;
    let mut src = vec![NONE; rows * l];
    for ch in 0..c {
        for p in 0..k {
            for q in 0..k {
                let row = (ch * k + p) * k + q;
                for i in 0..ho {
                    let y = (i * stride + p * dilation) as isize - padding as isize;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    for j in 0..wo {
                        let xx = (j * stride + q * dilation) as isize - padding as isize;
                        if xx >= 0 && xx < w as isize {
                            src[row * l + i * wo + j] = ch * h * w + y as usize * w + xx as usize;
                        }
                    }
                }
            }
        }
    }
    let x = x.try_contiguous()?;
    let (x, mut tape) = x.split_tape();
    let xv = x.as_vec();
    let mut cols = vec![E::zero(); b * rows * l];
    for n in 0..b {
        let (xs, cs) = (
            &xv[n * chw..(n + 1) * chw],
            &mut cols[n * rows * l..(n + 1) * rows * l],
        );
        for (dst, &s) in cs.iter_mut().zip(&src) {
            if s != NONE {
                *dst = xs[s];
            }
        }
    }
    let out = x.device().try_tensor_from_vec(cols, (b, rows, l))?;
    let out_id = out.clone();
    tape.add_backward_op(move |grads| {
        let go: Vec<E> = host_mut::<E>(grads.get_or_alloc_mut(&out_id)?).to_vec();
        let gx = host_mut::<E>(grads.get_or_alloc_mut(&x)?);
        for n in 0..b {
            let gs = &go[n * rows * l..(n + 1) * rows * l];
            let gxs = &mut gx[n * chw..(n + 1) * chw];
            for (g, &s) in gs.iter().zip(&src) {
                if s != NONE {
                    gxs[s] += *g;
                }
            }
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use rand::SeedableRng;

    fn conv(geom: ConvGeometry, bias: bool) -> Conv2d<f64> {
        let mut rng = StdRng::seed_from_u64(0);
        Conv2d::new(
            &Dev::default(),
            "conv",
            2,
            3,
            geom,
            bias,
            &Init::default(),
            &mut rng,
        )
        .unwrap()
    }

    /// Direct definition: y[b,o,i,j] = b[o] + sum_{c,p,q} x[b,c,i s + p d - pad, j s + q d - pad] W[o,c,p,q].
    fn naive(l: &Conv2d<f64>, x: &[f64], (bn, h, w): (usize, usize, usize)) -> Vec<f64> {
        let (o_n, c_n, k) = (l.out_channels(), l.in_channels(), l.kernel());
        let (ho, wo) = (l.out_size(h).unwrap(), l.out_size(w).unwrap());
        let wt = l.weight.to_vec();
        let bias = l.bias.as_ref().map(|b| b.to_vec());
        let mut y = vec![0.0; bn * o_n * ho * wo];
        for b in 0..bn {
            for o in 0..o_n {
                for i in 0..ho {
                    for j in 0..wo {
                        let mut acc = bias.as_ref().map_or(0.0, |bv| bv[o]);
                        for c in 0..c_n {
                            for p in 0..k {
                                for q in 0..k {
                                    let yy = (i * l.stride + p * l.dilation) as isize
                                        - l.padding as isize;
                                    let xx = (j * l.stride + q * l.dilation) as isize
                                        - l.padding as isize;
                                    if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w
                                    {
                                        acc += x
                                            [((b * c_n + c) * h + yy as usize) * w + xx as usize]
                                            * wt[((o * c_n + c) * k + p) * k + q];
                                    }
                                }
                            }
                        }
                        y[((b * o_n + o) * ho + i) * wo + j] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_direct_convolution_for_stride_padding_dilation() {
        let dev = Dev::default();
        for geom in [
            ConvGeometry::same(3),
            ConvGeometry {
                kernel: 3,
                stride: 2,
                padding: 1,
                dilation: 1,
            },
            ConvGeometry {
                kernel: 2,
                stride: 1,
                padding: 0,
                dilation: 2,
            },
            ConvGeometry {
                kernel: 1,
                stride: 1,
                padding: 0,
                dilation: 1,
            },
        ] {
            let l = conv(geom, true);
            let x = rand_tensor(&dev, (2, 2, 5, 6), 4);
            let y = l.forward(x.clone()).unwrap();
            assert_eq!(
                *y.shape(),
                (2, 3, l.out_size(5).unwrap(), l.out_size(6).unwrap())
            );
            let want = naive(&l, &x.as_vec(), (2, 5, 6));
            for (a, b) in y.as_vec().iter().zip(&want) {
                assert!((a - b).abs() < 1e-10, "{geom:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Dev::default();
        let geom = ConvGeometry {
            kernel: 3,
            stride: 2,
            padding: 1,
            dilation: 1,
        };
        let mut l = conv(geom, true);
        let x = rand_tensor(&dev, (2, 2, 5, 5), 5);
        check_input_grad(&x, |t| l.forward(t), 1e-6);
        check_param_grads(&mut l, &x, |m, t| m.forward(t), 10, 1e-6);
    }

    #[test]
    fn rejects_bad_inputs() {
        let l = conv(
            ConvGeometry {
                kernel: 3,
                stride: 1,
                padding: 0,
                dilation: 1,
            },
            false,
        );
        let dev = Dev::default();
        assert!(l.forward(rand_tensor(&dev, (1, 3, 5, 5), 1)).is_err());
        assert!(l.forward(rand_tensor(&dev, (1, 2, 2, 2), 1)).is_err());
    }
}
