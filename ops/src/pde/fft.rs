//! 2-D complex FFTs on square n x n grids (rustfft) and the integer wavenumber conventions every
//! spectral solver here shares.
//!
//! Layout: row-major `[H, W]` = `[y, x]`; entry `(iy, ix)` sits at `iy * n + ix`. The forward
//! transform is unnormalised, the inverse divides by n^2 (numpy's `fft2`/`ifft2` convention).

use std::sync::Arc;

use rustfft::num_complex::Complex64;
use rustfft::{Fft, FftPlanner};

/// Plans for one grid size; shared by every thread (plans are immutable).
#[derive(Clone)]
pub struct Fft2 {
    n: usize,
    forward: Arc<dyn Fft<f64>>,
    inverse: Arc<dyn Fft<f64>>,
}

/// Per-thread buffers for [`Fft2`]; one per sample in flight.
pub struct FftWork {
    scratch: Vec<Complex64>,
    transposed: Vec<Complex64>,
}

impl Fft2 {
    pub fn new(n: usize) -> Self {
        let mut planner = FftPlanner::<f64>::new();
        Self {
            n,
            forward: planner.plan_fft_forward(n),
            inverse: planner.plan_fft_inverse(n),
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn work(&self) -> FftWork {
        let len = self
            .forward
            .get_inplace_scratch_len()
            .max(self.inverse.get_inplace_scratch_len());
        FftWork {
            scratch: vec![Complex64::new(0.0, 0.0); len],
            transposed: vec![Complex64::new(0.0, 0.0); self.n * self.n],
        }
    }

    /// In place, unnormalised: X(k) = sum_x a(x) exp(-2 pi i k.x / n). `data` is `[n, n]`.
    pub fn forward(&self, data: &mut [Complex64], work: &mut FftWork) {
        self.both_axes(&*self.forward, data, work);
    }

    /// In place, normalised by 1/n^2 so that `inverse(forward(a)) == a`. `data` is `[n, n]`.
    pub fn inverse(&self, data: &mut [Complex64], work: &mut FftWork) {
        self.both_axes(&*self.inverse, data, work);
        let scale = 1.0 / (self.n * self.n) as f64;
        for v in data.iter_mut() {
            *v *= scale;
        }
    }

    /// [`Self::inverse`] of a spectrum that is 0 wherever |ky| > `band` (a dealiased field):
    /// the first pass skips the all-zero rows. Same result as `inverse` for such input.
    pub fn inverse_band_limited(&self, data: &mut [Complex64], band: usize, work: &mut FftWork) {
        let n = self.n;
        let band = band.min(n / 2);
        if 2 * band + 1 >= n {
            return self.inverse(data, work);
        }
        let (low, rest) = data.split_at_mut((band + 1) * n);
        let high = &mut rest[(n - 2 * band - 1) * n..];
        self.inverse.process_with_scratch(low, &mut work.scratch);
        self.inverse.process_with_scratch(high, &mut work.scratch);
        transpose(data, &mut work.transposed, n);
        self.inverse
            .process_with_scratch(&mut work.transposed, &mut work.scratch);
        transpose(&work.transposed, data, n);
        let scale = 1.0 / (n * n) as f64;
        for v in data.iter_mut() {
            *v *= scale;
        }
    }

    /// [`Self::forward`], but only the modes with |kx| <= `band` are computed; the others are
    /// set to 0 (the caller dealiases them away anyway).
    pub fn forward_band_limited(&self, data: &mut [Complex64], band: usize, work: &mut FftWork) {
        let n = self.n;
        let band = band.min(n / 2);
        if 2 * band + 1 >= n {
            return self.forward(data, work);
        }
        self.forward.process_with_scratch(data, &mut work.scratch);
        transpose(data, &mut work.transposed, n);
        let (low, rest) = work.transposed.split_at_mut((band + 1) * n);
        let (middle, high) = rest.split_at_mut((n - 2 * band - 1) * n);
        self.forward.process_with_scratch(low, &mut work.scratch);
        self.forward.process_with_scratch(high, &mut work.scratch);
        middle.fill(Complex64::new(0.0, 0.0));
        transpose(&work.transposed, data, n);
    }

    /// Rows in one batch, transpose, rows again, transpose back.
    fn both_axes(&self, fft: &dyn Fft<f64>, data: &mut [Complex64], work: &mut FftWork) {
        let n = self.n;
        debug_assert_eq!(data.len(), n * n);
        fft.process_with_scratch(data, &mut work.scratch);
        transpose(data, &mut work.transposed, n);
        fft.process_with_scratch(&mut work.transposed, &mut work.scratch);
        transpose(&work.transposed, data, n);
    }
}

/// `dst[j, i] = src[i, j]` for square `[n, n]` arrays, in 8 x 8 tiles for cache locality.
fn transpose(src: &[Complex64], dst: &mut [Complex64], n: usize) {
    const TILE: usize = 8;
    for i0 in (0..n).step_by(TILE) {
        for j0 in (0..n).step_by(TILE) {
            for i in i0..(i0 + TILE).min(n) {
                for j in j0..(j0 + TILE).min(n) {
                    dst[j * n + i] = src[i * n + j];
                }
            }
        }
    }
}

/// Integer wavenumber of FFT bin `i` of `n` (numpy `fftfreq(n) * n`): 0, 1, .., -n/2, .., -1.
pub fn wavenumber(i: usize, n: usize) -> f64 {
    if 2 * i < n {
        i as f64
    } else {
        i as f64 - n as f64
    }
}

/// Wavenumber for odd (first) derivatives: as [`wavenumber`] but 0 at the Nyquist bin of an even
/// n, where i k would break the Hermitian symmetry of a real field (Trefethen, Spectral Methods
/// in MATLAB, ch. 3). Second derivatives keep the full (n/2)^2.
pub fn derivative_wavenumber(i: usize, n: usize) -> f64 {
    if n.is_multiple_of(2) && 2 * i == n {
        0.0
    } else {
        wavenumber(i, n)
    }
}

/// A real `[n, n]` field as complex (imaginary part 0).
pub fn to_complex(real: &[f64]) -> Vec<Complex64> {
    real.iter().map(|&v| Complex64::new(v, 0.0)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Naive O(n^4) DFT, independent of rustfft: X(ky, kx) = sum a(y, x) e^{-2 pi i (ky y + kx x)/n}.
    pub(crate) fn naive_dft(a: &[Complex64], n: usize, sign: f64) -> Vec<Complex64> {
        let mut out = vec![Complex64::new(0.0, 0.0); n * n];
        for ky in 0..n {
            for kx in 0..n {
                let mut acc = Complex64::new(0.0, 0.0);
                for y in 0..n {
                    for x in 0..n {
                        let phase =
                            sign * 2.0 * std::f64::consts::PI * ((ky * y + kx * x) % n) as f64
                                / n as f64;
                        acc += a[y * n + x] * Complex64::from_polar(1.0, phase);
                    }
                }
                out[ky * n + kx] = acc;
            }
        }
        out
    }

    #[test]
    fn matches_naive_dft_and_round_trips() {
        let n = 6;
        let a: Vec<Complex64> = (0..n * n)
            .map(|i| Complex64::new((i as f64 * 0.37).sin(), (i as f64 * 0.11).cos()))
            .collect();
        let fft = Fft2::new(n);
        let mut work = fft.work();
        let mut b = a.clone();
        fft.forward(&mut b, &mut work);
        let want = naive_dft(&a, n, -1.0);
        for (x, y) in b.iter().zip(&want) {
            assert!((x - y).norm() < 1e-12, "{x} vs {y}");
        }
        fft.inverse(&mut b, &mut work);
        for (x, y) in b.iter().zip(&a) {
            assert!((x - y).norm() < 1e-14);
        }
    }

    #[test]
    fn band_limited_transforms_match_the_full_ones() {
        let (n, band) = (12, 4);
        let fft = Fft2::new(n);
        let mut work = fft.work();
        let mut spectrum = vec![Complex64::new(0.0, 0.0); n * n];
        for iy in 0..n {
            for ix in 0..n {
                if wavenumber(iy, n).abs() <= band as f64 {
                    spectrum[iy * n + ix] = Complex64::new((iy * 7 + ix) as f64, ix as f64 - 3.0);
                }
            }
        }
        let (mut full, mut pruned) = (spectrum.clone(), spectrum);
        fft.inverse(&mut full, &mut work);
        fft.inverse_band_limited(&mut pruned, band, &mut work);
        for (a, b) in full.iter().zip(&pruned) {
            assert!((a - b).norm() < 1e-12);
        }
        let field = full.clone();
        fft.forward(&mut full, &mut work);
        let mut pruned = field;
        fft.forward_band_limited(&mut pruned, band, &mut work);
        for iy in 0..n {
            for ix in 0..n {
                let (a, b) = (full[iy * n + ix], pruned[iy * n + ix]);
                if wavenumber(ix, n).abs() <= band as f64 {
                    assert!((a - b).norm() < 1e-9 * (1.0 + a.norm()));
                } else {
                    assert_eq!(b, Complex64::new(0.0, 0.0));
                }
            }
        }
    }

    #[test]
    fn wavenumbers_follow_fftfreq() {
        let k: Vec<f64> = (0..6).map(|i| wavenumber(i, 6)).collect();
        assert_eq!(k, [0.0, 1.0, 2.0, -3.0, -2.0, -1.0]);
        assert_eq!(derivative_wavenumber(3, 6), 0.0);
        assert_eq!(derivative_wavenumber(2, 5), 2.0);
        assert_eq!(wavenumber(3, 5), -2.0);
    }
}
