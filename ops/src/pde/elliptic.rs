//! Spectral solvers for the two time-independent problems of `docs/methods/operator-learning.md`
//! §1: anisotropic Poisson and Helmholtz on the periodic unit square [0, 1)^2.
//!
//! Grid x_j = j / n, row-major `[y, x]`; Fourier mode k = (kx, ky) integer is exp(2 pi i k.x).
//! Computations are f64.

use std::f64::consts::PI;

use rustfft::num_complex::Complex64;

use super::fft::{derivative_wavenumber, wavenumber, RealFft2, RealFftWork};

/// Diffusion prefactor of both PDEs (the 0.01 in -div(0.01 K grad u) and 0.01 Lap u).
pub const DIFFUSIVITY: f64 = 0.01;

/// `docs/methods/operator-learning.md` §1, Poisson: K = R(-theta) diag(1, e) R(theta) with
/// R(t) = [[cos t, -sin t], [sin t, cos t]]. Returns [K11, K22, K12] (dimensionless, eigenvalues
/// 1 and e).
pub fn conductivity(e: f64, theta: f64) -> [f64; 3] {
    let (s, c) = theta.sin_cos();
    [c * c + e * s * s, s * s + e * c * c, (e - 1.0) * s * c]
}

/// `docs/methods/operator-learning.md` §1, Poisson: Fourier symbol of -div(0.01 K grad .) at
/// integer mode (kx, ky): 0.01 * 4 pi^2 (K11 kx^2 + K22 ky^2 + 2 K12 kx' ky'), where kx', ky' are
/// the first-derivative wavenumbers (0 at Nyquist, so the operator maps real fields to real
/// fields).
pub fn poisson_symbol(k: [f64; 3], ix: usize, iy: usize, n: usize) -> f64 {
    let (kx, ky) = (wavenumber(ix, n), wavenumber(iy, n));
    let (kxd, kyd) = (derivative_wavenumber(ix, n), derivative_wavenumber(iy, n));
    DIFFUSIVITY * 4.0 * PI * PI * (k[0] * kx * kx + k[1] * ky * ky + 2.0 * k[2] * kxd * kyd)
}

/// `docs/methods/operator-learning.md` §1, Helmholtz: Fourier symbol of 0.01 Lap + omega at integer
/// mode (kx, ky): omega - 0.01 * 4 pi^2 (kx^2 + ky^2).
pub fn helmholtz_symbol(omega: f64, ix: usize, iy: usize, n: usize) -> f64 {
    let (kx, ky) = (wavenumber(ix, n), wavenumber(iy, n));
    omega - DIFFUSIVITY * 4.0 * PI * PI * (kx * kx + ky * ky)
}

/// Wavenumber tables of one grid size in [`RealFft2`]'s half layout, shared by every thread.
pub struct EllipticGrid {
    fft: RealFft2,
    /// kx^2 and the first-derivative kx per half-spectrum column bin `[h]`.
    kx2: Vec<f64>,
    kxd: Vec<f64>,
    /// ky^2 and the first-derivative ky per bin `[n]`.
    ky2: Vec<f64>,
    kyd: Vec<f64>,
}

/// Per-thread buffers for [`EllipticGrid`].
pub struct EllipticWork {
    fft: RealFftWork,
    /// `[h, n]`.
    spectrum: Vec<Complex64>,
}

impl EllipticGrid {
    pub fn new(n: usize) -> Self {
        let fft = RealFft2::new(n);
        let h = fft.h();
        let square = |i: usize| wavenumber(i, n) * wavenumber(i, n);
        Self {
            kx2: (0..h).map(square).collect(),
            kxd: (0..h).map(|i| derivative_wavenumber(i, n)).collect(),
            ky2: (0..n).map(square).collect(),
            kyd: (0..n).map(|i| derivative_wavenumber(i, n)).collect(),
            fft,
        }
    }

    pub fn n(&self) -> usize {
        self.fft.n()
    }

    pub fn work(&self) -> EllipticWork {
        EllipticWork {
            fft: self.fft.work(),
            spectrum: vec![Complex64::new(0.0, 0.0); self.fft.h() * self.fft.n()],
        }
    }

    /// FFT of `f`, times `multiplier(ix, iy)` (the 1/n^2 of the inverse folded in), inverse
    /// FFT into `u`. Both `[n, n]`.
    fn apply(
        &self,
        work: &mut EllipticWork,
        f: &[f64],
        u: &mut [f64],
        multiplier: impl Fn(usize, usize) -> f64,
    ) {
        let (n, h) = (self.fft.n(), self.fft.h());
        self.fft.forward(f, &mut work.spectrum, h, &mut work.fft);
        for (ix, column) in work.spectrum.chunks_exact_mut(n).enumerate() {
            for (iy, v) in column.iter_mut().enumerate() {
                *v *= multiplier(ix, iy);
            }
        }
        self.fft.inverse(&work.spectrum, u, h, &mut work.fft);
    }

    /// `docs/methods/operator-learning.md` §1, Poisson: u_hat = f_hat / poisson_symbol,
    /// u_hat(0) = 0, then u -= mean(u). `f` `[n, n]` (mean zero after the source normalisation);
    /// u into `u`.
    pub fn solve_poisson(&self, work: &mut EllipticWork, f: &[f64], k: [f64; 3], u: &mut [f64]) {
        let n = self.fft.n();
        let scale = DIFFUSIVITY * 4.0 * PI * PI * (n * n) as f64;
        self.apply(work, f, u, |ix, iy| {
            if ix == 0 && iy == 0 {
                0.0
            } else {
                let symbol = k[0] * self.kx2[ix]
                    + k[1] * self.ky2[iy]
                    + 2.0 * k[2] * self.kxd[ix] * self.kyd[iy];
                1.0 / (scale * symbol)
            }
        });
        let mean = super::source::sum_by(u, |v| v) / u.len() as f64;
        for v in u.iter_mut() {
            *v -= mean;
        }
    }

    /// `docs/methods/operator-learning.md` §1, Helmholtz: u_hat = -f_hat / helmholtz_symbol, 0
    /// where the symbol is 0. `f` `[n, n]`; u into `u`.
    pub fn solve_helmholtz(&self, work: &mut EllipticWork, f: &[f64], omega: f64, u: &mut [f64]) {
        let n = self.fft.n();
        let scale = 1.0 / (n * n) as f64;
        self.apply(work, f, u, |ix, iy| {
            let symbol = omega - DIFFUSIVITY * 4.0 * PI * PI * (self.kx2[ix] + self.ky2[iy]);
            if symbol == 0.0 {
                0.0
            } else {
                -scale / symbol
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pde::fft::tests::naive_dft;
    use crate::pde::fft::to_complex;
    use crate::pde::source;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Applies a Fourier multiplier to a real field with the naive DFT (independent of rustfft).
    fn apply_symbol(u: &[f64], n: usize, symbol: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        let mut hat = naive_dft(&to_complex(u), n, -1.0);
        for iy in 0..n {
            for ix in 0..n {
                hat[iy * n + ix] *= symbol(ix, iy);
            }
        }
        let back = naive_dft(&hat, n, 1.0);
        back.iter().map(|c| c.re / (n * n) as f64).collect()
    }

    fn bump_source(n: usize, seed: u64, remove_mean: bool) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut f = source::render(&source::draw_amplitudes(&mut rng, 0.6), n);
        source::normalise(&mut f, remove_mean);
        f
    }

    fn poisson(n: usize, f: &[f64], k: [f64; 3]) -> Vec<f64> {
        let grid = EllipticGrid::new(n);
        let mut u = vec![0.0; n * n];
        grid.solve_poisson(&mut grid.work(), f, k, &mut u);
        u
    }

    fn helmholtz(n: usize, f: &[f64], omega: f64) -> Vec<f64> {
        let grid = EllipticGrid::new(n);
        let mut u = vec![0.0; n * n];
        grid.solve_helmholtz(&mut grid.work(), f, omega, &mut u);
        u
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn conductivity_has_eigenvalues_one_and_e() {
        let [k11, k22, k12] = conductivity(7.5, 0.9);
        assert!((k11 + k22 - 8.5).abs() < 1e-13, "trace");
        assert!((k11 * k22 - k12 * k12 - 7.5).abs() < 1e-12, "determinant");
        assert_eq!(conductivity(3.0, 0.0), [1.0, 3.0, 0.0]);
    }

    #[test]
    fn poisson_spectral_residual_is_machine_precision() {
        // Even n: exercises the Nyquist row and column.
        let n = 16;
        let f = bump_source(n, 11, true);
        let k = conductivity(12.3, 2.2);
        let u = poisson(n, &f, k);
        let lu = apply_symbol(&u, n, |ix, iy| poisson_symbol(k, ix, iy, n));
        let residual = max_abs_diff(&lu, &f);
        assert!(residual < 1e-12, "max |L u - f| = {residual:e}");
        assert!(u.iter().sum::<f64>().abs() < 1e-12, "mean(u) = 0");
    }

    #[test]
    fn poisson_single_mode_matches_the_analytic_solution() {
        // f = cos(2 pi (a x + b y)) -> u = f / (0.01 4 pi^2 (K11 a^2 + K22 b^2 + 2 K12 a b)).
        let (n, a, b) = (12, 2.0, -3.0);
        let (e, theta) = (4.0, 0.6);
        let [k11, k22, k12] = conductivity(e, theta);
        let lambda = 0.01 * 4.0 * PI * PI * (k11 * a * a + k22 * b * b + 2.0 * k12 * a * b);
        let mut f = vec![0.0; n * n];
        for iy in 0..n {
            for ix in 0..n {
                let (x, y) = (ix as f64 / n as f64, iy as f64 / n as f64);
                f[iy * n + ix] = (2.0 * PI * (a * x + b * y)).cos();
            }
        }
        let u = poisson(n, &f, [k11, k22, k12]);
        let want: Vec<f64> = f.iter().map(|v| v / lambda).collect();
        let err = max_abs_diff(&u, &want);
        assert!(err < 1e-13 * (1.0 / lambda), "error {err:e}");
    }

    #[test]
    fn helmholtz_spectral_residual_is_machine_precision() {
        let n = 16;
        let f = bump_source(n, 5, false);
        let omega = 13.0;
        let u = helmholtz(n, &f, omega);
        // 0.01 Lap u + omega u = -f
        let lu = apply_symbol(&u, n, |ix, iy| helmholtz_symbol(omega, ix, iy, n));
        let minus_f: Vec<f64> = f.iter().map(|v| -v).collect();
        let residual = max_abs_diff(&lu, &minus_f);
        assert!(residual < 1e-12, "max |L u + f| = {residual:e}");
    }

    #[test]
    fn helmholtz_single_mode_matches_the_analytic_solution() {
        // f = sin(2 pi (a x + b y)) -> u = -f / (omega - 0.01 4 pi^2 (a^2 + b^2)).
        let (n, a, b, omega) = (10, 1.0, 3.0, 7.0);
        let denominator = omega - 0.01 * 4.0 * PI * PI * (a * a + b * b);
        let mut f = vec![0.0; n * n];
        for iy in 0..n {
            for ix in 0..n {
                let (x, y) = (ix as f64 / n as f64, iy as f64 / n as f64);
                f[iy * n + ix] = (2.0 * PI * (a * x + b * y)).sin();
            }
        }
        let u = helmholtz(n, &f, omega);
        let want: Vec<f64> = f.iter().map(|v| -v / denominator).collect();
        assert!(max_abs_diff(&u, &want) < 1e-13);
    }

    #[test]
    fn helmholtz_zeroes_a_resonant_mode() {
        // omega equal to the symbol of mode (1, 0): that mode of f is dropped, the rest solved.
        let n = 8;
        let omega = 0.01 * 4.0 * PI * PI;
        let mut f = vec![0.0; n * n];
        for iy in 0..n {
            for ix in 0..n {
                let x = ix as f64 / n as f64;
                f[iy * n + ix] = (2.0 * PI * x).cos() + 1.0;
            }
        }
        assert_eq!(helmholtz_symbol(omega, 1, 0, n), 0.0);
        let u = helmholtz(n, &f, omega);
        for v in &u {
            assert!(
                (v + 1.0 / omega).abs() < 1e-12,
                "only the constant mode remains: {v}"
            );
        }
    }
}
