//! The Fourier layer's spectral convolution (FNO; `docs/methods/operator-learning.md` §2).

use dfdx::{shapes::*, tensor::*, tensor_ops::*};

use crate::tensor::{from_vec, impl_has_params};
use crate::{Dev, Float, NnError, Param, ParamKind, Tensor2, Tensor3, Tensor4, VarBuilder};

/// y = irfft2(W . rfft2(x)) (both "ortho"), keeping modes kx in [0, m1) and [H - m1, H) of the
/// first spatial axis and ky in [0, m2) of the second (rfft) axis, zero elsewhere.
///
/// The truncated transforms are dense matrix products with precomputed cos/sin matrices, exact
/// and backend-agnostic. Complex weights are real pairs `weight_re`, `weight_im` of shape
/// `(m2, 2 m1, c_in, c_out)`: mode (ky, k) with k < m1 meaning kx = k and k >= m1 meaning
/// kx = H - 2 m1 + k. Init (1 / (c_in c_out)) U[0, 1) for both parts, as in the paper's code.
#[derive(Clone, Debug)]
pub struct SpectralConv2d<E: Float> {
    pub weight_re: Param<E>,
    pub weight_im: Param<E>,
    pub modes: (usize, usize),
}
impl_has_params!(SpectralConv2d {
    weight_re,
    weight_im
});

/// Real and imaginary parts of a complex tensor.
struct Complex<S: Shape, E: Float, T> {
    re: Tensor<S, E, Dev, T>,
    im: Tensor<S, E, Dev, T>,
}

/// A complex `(a, b, c, d)` tensor.
type Complex4<E, T> = Complex<(usize, usize, usize, usize), E, T>;

/// DFT matrices for an `h x w` grid and modes `(m1, m2)`, all with the ortho 1/sqrt(n) scale:
/// - `fw_cos`, `fw_sin` `(w, m2)`: rfft along w, X[ky] = sum_w x[w] (cos - i sin)(2 pi ky w / W);
/// - `fh_cos`, `fh_sin` `(h, 2 m1)`: forward DFT along h onto the kept rows (transposed);
/// - `ih_cos`, `ih_sin` `(2 m1, h)`: inverse DFT from the kept rows back to h (transposed);
/// - `iw_cos`, `iw_sin` `(m2, w)`: c2r along w, x[w] = sum_ky c_ky (Re cos - Im sin), with
///   c = 1 for ky = 0 and the Nyquist mode, 2 otherwise (Hermitian symmetry of a real signal).
struct DftMatrices<E: Float> {
    fw_cos: Tensor2<E>,
    fw_sin: Tensor2<E>,
    fh_cos: Tensor2<E>,
    fh_sin: Tensor2<E>,
    ih_cos: Tensor2<E>,
    ih_sin: Tensor2<E>,
    iw_cos: Tensor2<E>,
    iw_sin: Tensor2<E>,
}

impl<E: Float> DftMatrices<E>
where
    Dev: Device<E>,
{
    fn new(dev: &Dev, (h, w): (usize, usize), (m1, m2): (usize, usize)) -> Result<Self, NnError> {
        let tau = 2.0 * std::f64::consts::PI;
        let kx = |k: usize| if k < m1 { k } else { h - 2 * m1 + k };
        let (sh, sw) = (1.0 / (h as f64).sqrt(), 1.0 / (w as f64).sqrt());
        let mat = |rows: usize,
                   cols: usize,
                   f: &dyn Fn(usize, usize) -> f64|
         -> Result<Tensor2<E>, NnError> {
            let v = (0..rows * cols)
                .map(|i| E::of_f64(f(i / cols, i % cols)))
                .collect();
            from_vec(dev, v, (rows, cols))
        };
        let c = |ky: usize| if ky == 0 || 2 * ky == w { 1.0 } else { 2.0 };
        Ok(Self {
            fw_cos: mat(w, m2, &|x, ky| {
                sw * (tau * (ky * x) as f64 / w as f64).cos()
            })?,
            fw_sin: mat(w, m2, &|x, ky| {
                -sw * (tau * (ky * x) as f64 / w as f64).sin()
            })?,
            fh_cos: mat(h, 2 * m1, &|y, k| {
                sh * (tau * (kx(k) * y) as f64 / h as f64).cos()
            })?,
            fh_sin: mat(h, 2 * m1, &|y, k| {
                -sh * (tau * (kx(k) * y) as f64 / h as f64).sin()
            })?,
            ih_cos: mat(2 * m1, h, &|k, y| {
                sh * (tau * (kx(k) * y) as f64 / h as f64).cos()
            })?,
            ih_sin: mat(2 * m1, h, &|k, y| {
                sh * (tau * (kx(k) * y) as f64 / h as f64).sin()
            })?,
            iw_cos: mat(m2, w, &|ky, x| {
                c(ky) * sw * (tau * (ky * x) as f64 / w as f64).cos()
            })?,
            iw_sin: mat(m2, w, &|ky, x| {
                -c(ky) * sw * (tau * (ky * x) as f64 / w as f64).sin()
            })?,
        })
    }
}

/// `(rows, k) @ (k, n)` applied to the last axis of a 4-D tensor.
fn matmul_last<E: Float, T: Tape<E, Dev>>(
    x: Tensor4<E, T>,
    m: &Tensor2<E>,
) -> Result<Tensor4<E, T>, NnError>
where
    Dev: Device<E>,
{
    let (a, b, c, k) = *x.shape();
    let n = m.shape().1;
    let y = x
        .try_contiguous()?
        .try_reshape_like(&(a * b * c, k))?
        .try_matmul(m.clone())?;
    Ok(y.try_reshape_like(&(a, b, c, n))?)
}

/// (a + ib)(c + id) on the last axis: re = a C - b D, im = a D + b C for real matrices C, D.
fn complex_matmul_last<E: Float, T: Tape<E, Dev>>(
    x: Complex4<E, T>,
    (c, d): (&Tensor2<E>, &Tensor2<E>),
) -> Result<Complex4<E, T>, NnError>
where
    Dev: Device<E>,
{
    let (re_c, re_d) = (
        matmul_last(x.re.with_empty_tape(), c)?,
        matmul_last(x.re, d)?,
    );
    let (im_c, im_d) = (
        matmul_last(x.im.with_empty_tape(), c)?,
        matmul_last(x.im, d)?,
    );
    Ok(Complex {
        re: re_c.try_sub(im_d)?,
        im: re_d.try_add(im_c)?,
    })
}

impl<E: Float> SpectralConv2d<E>
where
    Dev: Device<E>,
{
    /// `c_in -> c_out` keeping `modes`; the weights come from `vb`'s RNG whatever its init.
    pub fn new(
        c_in: usize,
        c_out: usize,
        modes: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self, NnError> {
        let (m1, m2) = modes;
        if c_in == 0 || c_out == 0 || m1 == 0 || m2 == 0 {
            return Err(NnError::spec(
                "spectral_conv",
                "channels and modes must be positive",
            ));
        }
        let shape = vec![m2, 2 * m1, c_in, c_out];
        let n = m2 * 2 * m1 * c_in * c_out;
        let scale = 1.0 / (c_in * c_out) as f64;
        let re = vb.unit_uniform(scale, n);
        let im = vb.unit_uniform(scale, n);
        Ok(Self {
            weight_re: vb.param(re, shape.clone(), ParamKind::Trainable)?,
            weight_im: vb.param(im, shape, ParamKind::Trainable)?,
            modes,
        })
    }

    /// Whether an `h x w` grid holds the kept modes without overlap (m1 <= h/2, m2 <= w/2 + 1).
    pub fn fits(&self, h: usize, w: usize) -> bool {
        2 * self.modes.0 <= h && self.modes.1 <= w / 2 + 1
    }

    /// `(batch, c_in, h, w)` -> `(batch, c_out, h, w)`.
    pub fn forward<T: Tape<E, Dev>>(&self, x: Tensor4<E, T>) -> Result<Tensor4<E, T>, NnError> {
        let (b, c_in, h, w) = *x.shape();
        let [m2, k, wc_in, c_out] = self.weight_re.shape[..] else {
            return Err(NnError::shape(
                "spectral weight",
                "4 dims",
                &self.weight_re.shape,
            ));
        };
        if c_in != wc_in {
            return Err(NnError::shape("spectral conv input channels", wc_in, c_in));
        }
        if !self.fits(h, w) {
            return Err(NnError::shape(
                "spectral conv grid (needs h >= 2 m1 and w >= 2 (m2 - 1))",
                self.modes,
                (h, w),
            ));
        }
        let dft = DftMatrices::new(x.device(), (h, w), self.modes)?;
        // rfft along w: (b, c, h, w) -> (b, c, h, m2), real input so no imaginary cross terms.
        let xr = matmul_last(x.with_empty_tape(), &dft.fw_cos)?;
        let xi = matmul_last(x, &dft.fw_sin)?;
        // DFT along h onto the kept rows: (b, c, m2, h) -> (b, c, m2, k).
        let swap = |t: Tensor4<E, T>| t.try_permute::<_, Axes4<0, 1, 3, 2>>();
        let spec = complex_matmul_last(
            Complex {
                re: swap(xr)?,
                im: swap(xi)?,
            },
            (&dft.fh_cos, &dft.fh_sin),
        )?;
        // Mode mixing, per mode (ky, k): out[b, o] = sum_i X[b, i] W[i, o] (complex).
        let modes_first = |t: Tensor4<E, T>| -> Result<Tensor3<E, T>, NnError> {
            Ok(t.try_permute::<_, Axes4<2, 3, 0, 1>>()?
                .try_contiguous()?
                .try_reshape_like(&(m2 * k, b, c_in))?)
        };
        let (sr, si) = (modes_first(spec.re)?, modes_first(spec.im)?);
        let wr = self
            .weight_re
            .value
            .clone()
            .try_reshape_like(&(m2 * k, c_in, c_out))?;
        let wi = self
            .weight_im
            .value
            .clone()
            .try_reshape_like(&(m2 * k, c_in, c_out))?;
        let yr = sr
            .with_empty_tape()
            .try_matmul(wr.clone())?
            .try_sub(si.with_empty_tape().try_matmul(wi.clone())?)?;
        let yi = sr.try_matmul(wi)?.try_add(si.try_matmul(wr)?)?;
        // Back to (b, o, m2, k), inverse DFT along h: -> (b, o, m2, h).
        let batch_first = |t: Tensor3<E, T>| -> Result<Tensor4<E, T>, NnError> {
            Ok(t.try_reshape_like(&(m2, k, b, c_out))?
                .try_permute::<_, Axes4<2, 3, 0, 1>>()?)
        };
        let spat = complex_matmul_last(
            Complex {
                re: batch_first(yr)?,
                im: batch_first(yi)?,
            },
            (&dft.ih_cos, &dft.ih_sin),
        )?;
        // c2r along w: (b, o, h, m2) -> (b, o, h, w).
        let out = matmul_last(swap(spat.re)?, &dft.iw_cos)?
            .try_add(matmul_last(swap(spat.im)?, &dft.iw_sin)?)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_input_grad, check_param_grads, rand_tensor};
    use crate::Init;

    fn layer(c_in: usize, c_out: usize, modes: (usize, usize), seed: u64) -> SpectralConv2d<f64> {
        let (dev, init) = (Dev::default(), Init::default());
        SpectralConv2d::new(c_in, c_out, modes, VarBuilder::new(&dev, &init, seed)).unwrap()
    }

    /// Direct 2-D sums: X = (1/sqrt(HW)) sum x e^{-i 2 pi (kx h/H + ky w/W)} on the kept modes,
    /// Y = X W, y = Re (1/sqrt(HW)) sum c_ky Y e^{+i 2 pi (kx h/H + ky w/W)}.
    fn naive(
        l: &SpectralConv2d<f64>,
        x: &[f64],
        (b, c_in, h, w): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let (m1, m2) = l.modes;
        let c_out = l.weight_re.shape[3];
        let (wr, wi) = (l.weight_re.to_vec(), l.weight_im.to_vec());
        let tau = 2.0 * std::f64::consts::PI;
        let norm = 1.0 / ((h * w) as f64).sqrt();
        let kxs: Vec<usize> = (0..2 * m1)
            .map(|k| if k < m1 { k } else { h - 2 * m1 + k })
            .collect();
        let mut y = vec![0.0; b * c_out * h * w];
        for bi in 0..b {
            for ky in 0..m2 {
                for (k, &kx) in kxs.iter().enumerate() {
                    let mut xs = vec![(0.0, 0.0); c_in];
                    for (i, xsi) in xs.iter_mut().enumerate() {
                        for p in 0..h {
                            for q in 0..w {
                                let v = x[((bi * c_in + i) * h + p) * w + q];
                                let ang =
                                    tau * ((kx * p) as f64 / h as f64 + (ky * q) as f64 / w as f64);
                                xsi.0 += norm * v * ang.cos();
                                xsi.1 -= norm * v * ang.sin();
                            }
                        }
                    }
                    let c = if ky == 0 || 2 * ky == w { 1.0 } else { 2.0 };
                    for o in 0..c_out {
                        let (mut yr, mut yi) = (0.0, 0.0);
                        for (i, (a, bb)) in xs.iter().enumerate() {
                            let idx = ((ky * 2 * m1 + k) * c_in + i) * c_out + o;
                            yr += a * wr[idx] - bb * wi[idx];
                            yi += a * wi[idx] + bb * wr[idx];
                        }
                        for p in 0..h {
                            for q in 0..w {
                                let ang =
                                    tau * ((kx * p) as f64 / h as f64 + (ky * q) as f64 / w as f64);
                                y[((bi * c_out + o) * h + p) * w + q] +=
                                    c * norm * (yr * ang.cos() - yi * ang.sin());
                            }
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_a_naive_dft() {
        let dev = Dev::default();
        for (modes, (h, w)) in [((2, 3), (6, 8)), ((1, 2), (5, 7)), ((3, 5), (6, 8))] {
            let l = layer(2, 3, modes, 1);
            let x = rand_tensor(&dev, (2, 2, h, w), 2);
            let y = l.forward(x.clone()).unwrap().as_vec();
            let want = naive(&l, &x.as_vec(), (2, 2, h, w));
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-10, "{modes:?} {h}x{w}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn unit_weights_pass_band_limited_fields_unchanged() {
        // With W = 1 on every kept mode, irfft2(rfft2(x)) restricted to the kept band is x
        // itself when x only has frequencies inside it (|kx| < m1, ky < m2).
        let dev = Dev::default();
        let (h, w) = (8, 8);
        let mut l = layer(1, 1, (3, 3), 0);
        let n = l.weight_re.numel();
        l.weight_re.set_vec(vec![1.0; n]).unwrap();
        l.weight_im.set_vec(vec![0.0; n]).unwrap();
        let tau = 2.0 * std::f64::consts::PI;
        let field: Vec<f64> = (0..h * w)
            .map(|i| {
                let (p, q) = ((i / w) as f64, (i % w) as f64);
                0.3 + (tau * (2.0 * p / 8.0 + q / 8.0)).cos()
                    + 0.5 * (tau * (2.0 * q / 8.0 - p / 8.0)).sin()
            })
            .collect();
        let x = from_vec(&dev, field.clone(), (1, 1, h, w)).unwrap();
        let y = l.forward(x).unwrap().as_vec();
        for (a, b) in y.iter().zip(&field) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Dev::default();
        let mut l = layer(2, 2, (2, 2), 3);
        let x = rand_tensor(&dev, (2, 2, 4, 5), 4);
        check_input_grad(&x, |t| l.forward(t), 1e-6);
        check_param_grads(&mut l, &x, |m, t| m.forward(t), 8, 1e-6);
        assert!(l.forward(rand_tensor(&dev, (1, 2, 3, 5), 1)).is_err());
    }
}
