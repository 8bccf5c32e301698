//! 2-D complex FFTs on square n x n grids (rustfft) and the integer wavenumber conventions every
//! spectral solver here shares.
//!
//! Layout: row-major `[H, W]` = `[y, x]`; entry `(iy, ix)` sits at `iy * n + ix`. The forward
//! transform is unnormalised, the inverse divides by n^2 (numpy's `fft2`/`ifft2` convention).

use std::sync::Arc;

use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
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

/// 2-D real-to-complex transforms of real `[n, n]` fields (rows with `realfft`, columns with
/// rustfft), for the solvers' inner loops.
///
/// Spectrum layout ("half, transposed"): `[h, n]` with h = n/2 + 1, entry `(ix, iy)` at
/// `ix * n + iy`, where ix is the kx bin 0..=n/2 and iy the ky bin in fftfreq order. The
/// transposed layout saves the transpose back after the column pass; the missing kx < 0 half
/// is the complex conjugate of the kept one (the field is real). Both directions are
/// unnormalised: `inverse(forward(a)) == n^2 a`, so callers fold 1/n^2 into their multipliers.
///
/// `cols` limits both directions to the kx bins 0..cols (the others are neither computed by
/// `forward` nor read by `inverse`, which treats them as 0): a 2/3-dealiased solver skips a
/// third of the column transforms that way.
pub struct RealFft2 {
    n: usize,
    h: usize,
    r2c: Arc<dyn RealToComplex<f64>>,
    c2r: Arc<dyn ComplexToReal<f64>>,
    col_forward: Arc<dyn Fft<f64>>,
    col_inverse: Arc<dyn Fft<f64>>,
}

/// Per-thread buffers for [`RealFft2`].
pub struct RealFftWork {
    /// `[n, h]` row spectra.
    rows: Vec<Complex64>,
    /// `[h, n]` copy of an inverse's input (the column pass works in place).
    columns: Vec<Complex64>,
    /// One real row (realfft uses its input as scratch).
    row: Vec<f64>,
    scratch: Vec<Complex64>,
}

impl RealFft2 {
    pub fn new(n: usize) -> Self {
        let mut real = RealFftPlanner::<f64>::new();
        let mut complex = FftPlanner::<f64>::new();
        Self {
            n,
            h: n / 2 + 1,
            r2c: real.plan_fft_forward(n),
            c2r: real.plan_fft_inverse(n),
            col_forward: complex.plan_fft_forward(n),
            col_inverse: complex.plan_fft_inverse(n),
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// kx bins kept: n/2 + 1.
    pub fn h(&self) -> usize {
        self.h
    }

    pub fn work(&self) -> RealFftWork {
        let scratch = [
            self.r2c.get_scratch_len(),
            self.c2r.get_scratch_len(),
            self.col_forward.get_inplace_scratch_len(),
            self.col_inverse.get_inplace_scratch_len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let zero = Complex64::new(0.0, 0.0);
        RealFftWork {
            rows: vec![zero; self.n * self.h],
            columns: vec![zero; self.n * self.h],
            row: vec![0.0; self.n],
            scratch: vec![zero; scratch],
        }
    }

    /// Unnormalised forward transform of `field` `[n, n]` into `out` `[h, n]` (layout above);
    /// only the kx bins 0..cols are written.
    pub fn forward(
        &self,
        field: &[f64],
        out: &mut [Complex64],
        cols: usize,
        work: &mut RealFftWork,
    ) {
        let (n, h) = (self.n, self.h);
        let cols = cols.min(h);
        debug_assert_eq!(field.len(), n * n);
        debug_assert_eq!(out.len(), h * n);
        for (src, dst) in field.chunks_exact(n).zip(work.rows.chunks_exact_mut(h)) {
            work.row.copy_from_slice(src);
            // Lengths are right by construction; realfft's only other error is for c2r input.
            let _ = self
                .r2c
                .process_with_scratch(&mut work.row, dst, &mut work.scratch);
        }
        transpose_rect(&work.rows, [n, h], cols, out, n);
        self.col_forward
            .process_with_scratch(&mut out[..cols * n], &mut work.scratch);
    }

    /// Unnormalised inverse transform of `spectrum` `[h, n]` into `out` `[n, n]`, reading only
    /// the kx bins 0..cols. `spectrum` is left unchanged.
    pub fn inverse(
        &self,
        spectrum: &[Complex64],
        out: &mut [f64],
        cols: usize,
        work: &mut RealFftWork,
    ) {
        let (n, h) = (self.n, self.h);
        let cols = cols.min(h);
        debug_assert_eq!(spectrum.len(), h * n);
        debug_assert_eq!(out.len(), n * n);
        let columns = &mut work.columns[..cols * n];
        columns.copy_from_slice(&spectrum[..cols * n]);
        self.col_inverse
            .process_with_scratch(columns, &mut work.scratch);
        transpose_rect(columns, [cols, n], n, &mut work.rows, h);
        for (src, dst) in work.rows.chunks_exact_mut(h).zip(out.chunks_exact_mut(n)) {
            src[cols..].fill(Complex64::new(0.0, 0.0));
            // The kx = 0 and Nyquist bins of a real field's row spectrum are real; drop the
            // rounding-level imaginary parts the column pass leaves (realfft would flag them).
            src[0].im = 0.0;
            if n % 2 == 0 {
                src[h - 1].im = 0.0;
            }
            let _ = self.c2r.process_with_scratch(src, dst, &mut work.scratch);
        }
    }
}

/// `dst[c * stride + r] = src[r * cols + c]` for `src` `[rows, cols]`, columns c < `keep` only
/// (`dst` `[keep, stride]`, stride >= rows), in 8 x 8 tiles for cache locality.
fn transpose_rect(
    src: &[Complex64],
    [rows, cols]: [usize; 2],
    keep: usize,
    dst: &mut [Complex64],
    stride: usize,
) {
    const TILE: usize = 8;
    debug_assert!(src.len() >= rows * cols && keep == 0 || dst.len() >= (keep - 1) * stride + rows);
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..keep).step_by(TILE) {
            let c1 = (c0 + TILE).min(keep);
            for r in r0..r1 {
                let row = &src[r * cols..r * cols + cols];
                for c in c0..c1 {
                    dst[c * stride + r] = row[c];
                }
            }
        }
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
    fn real_transforms_match_the_naive_dft() {
        for n in [6, 7, 12] {
            let a: Vec<f64> = (0..n * n)
                .map(|i| (i as f64 * 0.37).sin() + 0.2 * (i as f64 * 1.3).cos())
                .collect();
            let want = naive_dft(&to_complex(&a), n, -1.0);
            let fft = RealFft2::new(n);
            let (h, mut work) = (fft.h(), fft.work());
            let mut spectrum = vec![Complex64::new(0.0, 0.0); h * n];
            fft.forward(&a, &mut spectrum, h, &mut work);
            for ix in 0..h {
                for iy in 0..n {
                    let (got, want) = (spectrum[ix * n + iy], want[iy * n + ix]);
                    assert!(
                        (got - want).norm() < 1e-12,
                        "n {n} ({ix}, {iy}): {got} vs {want}"
                    );
                }
            }
            let mut back = vec![0.0; n * n];
            fft.inverse(&spectrum, &mut back, h, &mut work);
            for (x, y) in back.iter().zip(&a) {
                assert!((x / (n * n) as f64 - y).abs() < 1e-14);
            }
        }
    }

    #[test]
    fn column_limited_real_transforms_match_the_full_ones() {
        let (n, cols) = (12, 5);
        let fft = RealFft2::new(n);
        let (h, mut work) = (fft.h(), fft.work());
        // A spectrum with kx < cols only (a real field's: the kx = 0 column Hermitian in ky).
        let field: Vec<f64> = (0..n * n)
            .map(|i| {
                let (y, x) = ((i / n) as f64, (i % n) as f64);
                let t = 2.0 * std::f64::consts::PI / n as f64;
                (t * (2.0 * x + y)).cos() + (t * (4.0 * x - 3.0 * y)).sin() + (t * 5.0 * y).cos()
            })
            .collect();
        let mut full = vec![Complex64::new(0.0, 0.0); h * n];
        fft.forward(&field, &mut full, h, &mut work);
        let mut limited = vec![Complex64::new(7.0, 7.0); h * n];
        fft.forward(&field, &mut limited, cols, &mut work);
        assert_eq!(limited[..cols * n], full[..cols * n]);
        assert!(limited[cols * n..]
            .iter()
            .all(|&v| v == Complex64::new(7.0, 7.0)));
        // Garbage past `cols` is not read.
        let (mut a, mut b) = (vec![0.0; n * n], vec![0.0; n * n]);
        fft.inverse(&full, &mut a, h, &mut work);
        fft.inverse(&limited, &mut b, cols, &mut work);
        for ((x, y), f) in a.iter().zip(&b).zip(&field) {
            assert!((x - y).abs() < 1e-12 && (x / (n * n) as f64 - f).abs() < 1e-13);
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
