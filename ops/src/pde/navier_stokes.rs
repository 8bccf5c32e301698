//! 2-D incompressible Navier-Stokes in vorticity form (Kolmogorov flow),
//! `docs/methods/operator-learning.md` §1 "Navier-Stokes": w_t + u . grad w = nu Lap w + f,
//! u = (psi_y, -psi_x), Lap psi = -w, f = -4 cos(4 y), on the periodic [0, 2 pi)^2.
//!
//! Pseudo-spectral: the state is w_hat `[n, n]` (row-major `[ky, kx]`, integer wavenumbers
//! because the period is 2 pi); the advection term is formed in physical space and dealiased
//! with the 2/3 rule. Time stepping: Crank-Nicolson on diffusion, Heun (explicit trapezoid) on
//! advection and forcing, second order overall (the scheme of the FNO reference data generator).

use std::f64::consts::PI;

use rand::Rng;
use rand_distr::StandardNormal;
use rustfft::num_complex::Complex64;

use std::ops::Range;

use super::fft::{derivative_wavenumber, wavenumber, Fft2, FftWork, RealFft2, RealFftWork};

/// Amplitude of the paper's forcing f = -4 cos(4 y).
pub const FORCING_AMPLITUDE: f64 = 4.0;
/// Wavenumber of the forcing.
pub const FORCING_WAVENUMBER: f64 = 4.0;
/// `docs/methods/operator-learning.md` §1: initial vorticity is a Gaussian random field with these
/// parameters.
pub const GRF_ALPHA: f64 = 2.5;
pub const GRF_TAU: f64 = 3.0;

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum NsError {
    /// dt * max(|u| + |v|) / dx exceeded 1 (or the state is no longer finite).
    Unstable { cfl: f64, time: f64 },
}

/// Everything about the grid that does not depend on the sample: wavenumbers, dealiasing band,
/// the forcing's transform, FFT plans.
///
/// The state w_hat is the unnormalised FFT of w in [`RealFft2`]'s half layout `[h, n]` (entry
/// `ix * n + iy`, kx = ix >= 0). Only the modes inside the 2/3-rule band (|kx|, |ky| <=
/// floor(n / 3), the entries of `segments`) are ever nonzero; every loop visits only those.
pub struct KolmogorovGrid {
    fft: RealFft2,
    /// Complex plans for [`random_vorticity`] (once per sample, full spectrum).
    complex: Fft2,
    n: usize,
    /// Largest kept |k| per axis, floor(n / 3).
    band: usize,
    /// Index ranges of the in-band entries of a half-layout spectrum.
    segments: Vec<Range<usize>>,
    /// |k|^2, 1/|k|^2 (0 at k = 0), kx and ky per half-layout entry `[h * n]`.
    spec_k2: Vec<f64>,
    spec_inv_k2: Vec<f64>,
    spec_kx: Vec<f64>,
    spec_ky: Vec<f64>,
    /// FFT of the forcing, half layout, projected onto the band.
    forcing_hat: Vec<Complex64>,
    /// |k|^2 and the 2/3-rule mask (1 inside, 0 outside) in the full `[ky, kx]` layout `[n, n]`
    /// of [`random_vorticity`].
    k2: Vec<f64>,
    dealias: Vec<f64>,
}

/// Per-sample buffers.
pub struct NsWork {
    fft: RealFftWork,
    complex: FftWork,
    /// Spectra of u, v, w_x, w_y (half layout; zero outside the band, always).
    spectra: [Vec<Complex64>; 4],
    /// The same four fields in physical space `[n, n]`.
    fields: [Vec<f64>; 4],
    /// u w_x + v w_y `[n, n]`.
    product: Vec<f64>,
    advection: Vec<Complex64>,
    advection_predicted: Vec<Complex64>,
    predicted: Vec<Complex64>,
    /// Crank-Nicolson factors (1 - dt nu k^2 / 2) / (1 + dt nu k^2 / 2) and dt / (1 + ..) for
    /// the (nu, dt) in `factors_for`.
    decay: Vec<f64>,
    gain: Vec<f64>,
    factors_for: Option<(u64, u64)>,
}

impl KolmogorovGrid {
    /// `forcing_amplitude` 4 is the paper's f = -4 cos(4 y); 0 switches forcing off (tests).
    pub fn new(n: usize, forcing_amplitude: f64) -> Self {
        let fft = RealFft2::new(n);
        let h = fft.h();
        let band = n / 3;
        let mut k2 = vec![0.0; n * n];
        let mut dealias = vec![0.0; n * n];
        let mut forcing = vec![0.0; n * n];
        for iy in 0..n {
            let ky = wavenumber(iy, n);
            let y = 2.0 * PI * iy as f64 / n as f64;
            for ix in 0..n {
                let kx = wavenumber(ix, n);
                k2[iy * n + ix] = kx * kx + ky * ky;
                if 3.0 * kx.abs() <= n as f64 && 3.0 * ky.abs() <= n as f64 {
                    dealias[iy * n + ix] = 1.0;
                }
                forcing[iy * n + ix] = -forcing_amplitude * (FORCING_WAVENUMBER * y).cos();
            }
        }
        // In band, no bin is a Nyquist bin (3 (n/2) > n), so the first-derivative wavenumbers
        // equal the plain ones.
        let segments: Vec<Range<usize>> = (0..=band)
            .flat_map(|ix| [ix * n..ix * n + band + 1, ix * n + n - band..ix * n + n])
            .collect();
        let (mut spec_k2, mut spec_inv_k2) = (vec![0.0; h * n], vec![0.0; h * n]);
        let (mut spec_kx, mut spec_ky) = (vec![0.0; h * n], vec![0.0; h * n]);
        for ix in 0..h {
            for iy in 0..n {
                let j = ix * n + iy;
                let (kx, ky) = (derivative_wavenumber(ix, n), derivative_wavenumber(iy, n));
                let (kx_sq, ky_sq) = (wavenumber(ix, n).powi(2), wavenumber(iy, n).powi(2));
                spec_kx[j] = kx;
                spec_ky[j] = ky;
                spec_k2[j] = kx_sq + ky_sq;
                spec_inv_k2[j] = if j == 0 { 0.0 } else { 1.0 / spec_k2[j] };
            }
        }
        let mut grid = Self {
            complex: Fft2::new(n),
            n,
            band,
            segments,
            spec_k2,
            spec_inv_k2,
            spec_kx,
            spec_ky,
            forcing_hat: Vec::new(),
            k2,
            dealias,
            fft,
        };
        let mut work = grid.work();
        grid.forcing_hat = grid.to_spectral(&forcing, &mut work);
        grid
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// kx columns the transforms compute: 0..=band.
    fn cols(&self) -> usize {
        self.band + 1
    }

    pub fn work(&self) -> NsWork {
        let spectrum = vec![Complex64::new(0.0, 0.0); self.fft.h() * self.n];
        let field = vec![0.0; self.n * self.n];
        NsWork {
            fft: self.fft.work(),
            complex: self.complex.work(),
            spectra: std::array::from_fn(|_| spectrum.clone()),
            fields: std::array::from_fn(|_| field.clone()),
            product: field,
            advection: spectrum.clone(),
            advection_predicted: spectrum.clone(),
            predicted: spectrum,
            decay: vec![0.0; self.spec_k2.len()],
            gain: vec![0.0; self.spec_k2.len()],
            factors_for: None,
        }
    }

    /// Physical `[n, n]` real field -> its FFT (half layout), projected onto the 2/3-rule band
    /// the solver keeps (exact for fields from [`random_vorticity`]).
    pub fn to_spectral(&self, w: &[f64], work: &mut NsWork) -> Vec<Complex64> {
        let spectrum = &mut work.advection;
        self.fft.forward(w, spectrum, self.cols(), &mut work.fft);
        let mut hat = vec![Complex64::new(0.0, 0.0); spectrum.len()];
        for segment in &self.segments {
            hat[segment.clone()].copy_from_slice(&spectrum[segment.clone()]);
        }
        hat
    }

    /// FFT (half layout) -> physical real field `[n, n]`.
    pub fn to_physical(&self, w_hat: &[Complex64], work: &mut NsWork) -> Vec<f64> {
        let mut w = vec![0.0; self.n * self.n];
        self.fft.inverse(w_hat, &mut w, self.cols(), &mut work.fft);
        let scale = 1.0 / (self.n * self.n) as f64;
        for v in w.iter_mut() {
            *v *= scale;
        }
        w
    }

    /// `docs/methods/operator-learning.md` §1 (NS): FFT(u . grad w) of `w_hat` into `out` (valid on
    /// the band's entries only: the caller reads nothing else, which is the 2/3-rule dealiasing),
    /// with psi_hat = w_hat / |k|^2, u_hat = i ky psi_hat, v_hat = -i kx psi_hat. Returns
    /// max(|u| + |v|) for the CFL check.
    fn advection(
        &self,
        w_hat: &[Complex64],
        out: &mut [Complex64],
        fft: &mut RealFftWork,
        spectra: &mut [Vec<Complex64>; 4],
        fields: &mut [Vec<f64>; 4],
        product: &mut [f64],
    ) -> f64 {
        // i a for a complex a.
        let i_times = |a: Complex64| Complex64::new(-a.im, a.re);
        // The inverse transforms are unnormalised: fold their 1/n^2 in here.
        let scale = 1.0 / (self.n * self.n) as f64;
        let [u_hat, v_hat, wx_hat, wy_hat] = spectra;
        for segment in &self.segments {
            for j in segment.clone() {
                let w = w_hat[j] * scale;
                let psi = w * self.spec_inv_k2[j];
                let (kx, ky) = (self.spec_kx[j], self.spec_ky[j]);
                u_hat[j] = i_times(psi * ky);
                v_hat[j] = -i_times(psi * kx);
                wx_hat[j] = i_times(w * kx);
                wy_hat[j] = i_times(w * ky);
            }
        }
        for (spectrum, field) in spectra.iter().zip(fields.iter_mut()) {
            self.fft.inverse(spectrum, field, self.cols(), fft);
        }
        let [u, v, wx, wy] = fields;
        let mut speed: f64 = 0.0;
        for j in 0..product.len() {
            let s = u[j].abs() + v[j].abs();
            // NaN compares false: a non-finite state must still fail the CFL check.
            if s.is_nan() {
                speed = f64::INFINITY;
            } else if s > speed {
                speed = s;
            }
            product[j] = u[j] * wx[j] + v[j] * wy[j];
        }
        self.fft.forward(product, out, self.cols(), fft);
        speed
    }

    /// One Crank-Nicolson/Heun step of length `dt` with viscosity `nu`
    /// (`docs/methods/operator-learning.md` §1, NS):
    /// w* = [(1 - dt nu k^2 / 2) w - dt N(w) + dt f] / (1 + dt nu k^2 / 2),
    /// w' = [(1 - dt nu k^2 / 2) w - dt (N(w) + N(w*)) / 2 + dt f] / (1 + dt nu k^2 / 2).
    /// Returns the CFL number dt max(|u| + |v|) / dx of the state at the start of the step.
    pub fn step(&self, w_hat: &mut [Complex64], nu: f64, dt: f64, work: &mut NsWork) -> f64 {
        let NsWork {
            fft,
            spectra,
            fields,
            product,
            advection,
            advection_predicted,
            predicted,
            decay,
            gain,
            factors_for,
            ..
        } = work;
        if *factors_for != Some((nu.to_bits(), dt.to_bits())) {
            for segment in &self.segments {
                for j in segment.clone() {
                    let half = 0.5 * dt * nu * self.spec_k2[j];
                    decay[j] = (1.0 - half) / (1.0 + half);
                    gain[j] = dt / (1.0 + half);
                }
            }
            *factors_for = Some((nu.to_bits(), dt.to_bits()));
        }
        let speed = self.advection(w_hat, advection, fft, spectra, fields, product);
        for segment in &self.segments {
            for j in segment.clone() {
                predicted[j] = decay[j] * w_hat[j] + gain[j] * (self.forcing_hat[j] - advection[j]);
            }
        }
        self.advection(
            predicted,
            advection_predicted,
            fft,
            spectra,
            fields,
            product,
        );
        for segment in &self.segments {
            for j in segment.clone() {
                w_hat[j] = decay[j] * w_hat[j]
                    + gain[j]
                        * (self.forcing_hat[j] - 0.5 * (advection[j] + advection_predicted[j]));
            }
        }
        speed * dt / (2.0 * PI / self.n as f64)
    }

    /// `steps` steps of length `dt`, starting at time `t0` (only used in the error).
    pub fn advance(
        &self,
        w_hat: &mut [Complex64],
        nu: f64,
        dt: f64,
        steps: usize,
        t0: f64,
        work: &mut NsWork,
    ) -> Result<(), NsError> {
        for s in 0..steps {
            let cfl = self.step(w_hat, nu, dt, work);
            if cfl.is_nan() || cfl > 1.0 {
                return Err(NsError::Unstable {
                    cfl,
                    time: t0 + s as f64 * dt,
                });
            }
        }
        Ok(())
    }
}

/// `docs/methods/operator-learning.md` §1 (NS): initial vorticity ~ Gaussian random field
/// N(0, s^2 (-Lap + tau^2)^-alpha) on [0, 2 pi)^2 with s = tau^(alpha - 1) (the FNO generator's
/// scaling, whose Laplacian eigenvalues are |k|^2 on this period), mean zero:
/// w(x) = Re sum_{k != 0} s (|k|^2 + tau^2)^(-alpha/2) (a_k + i b_k) e^{i k.x}, a_k, b_k ~ N(0, 1),
/// restricted to the 2/3-rule band (the modes the solver resolves; beyond it the amplitude is
/// below 1% of mode 1's at n >= 32). Returns `[n, n]`.
pub fn random_vorticity(
    rng: &mut impl Rng,
    grid: &KolmogorovGrid,
    work: &mut NsWork,
    alpha: f64,
    tau: f64,
) -> Vec<f64> {
    let n = grid.n;
    let s = tau.powf(alpha - 1.0);
    let mut coeff = vec![Complex64::new(0.0, 0.0); n * n];
    for (j, c) in coeff.iter_mut().enumerate() {
        let a: f64 = rng.sample(StandardNormal);
        let b: f64 = rng.sample(StandardNormal);
        let k2 = grid.k2[j];
        if k2 > 0.0 && grid.dealias[j] > 0.0 {
            // The inverse FFT divides by n^2; pre-multiply so the sum is unnormalised.
            let amplitude = s * (k2 + tau * tau).powf(-alpha / 2.0) * (n * n) as f64;
            *c = Complex64::new(a, b) * amplitude;
        }
    }
    grid.complex.inverse(&mut coeff, &mut work.complex);
    coeff.iter().map(|c| c.re).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    fn field(n: usize, f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
        let mut out = vec![0.0; n * n];
        for iy in 0..n {
            for ix in 0..n {
                let (x, y) = (
                    2.0 * PI * ix as f64 / n as f64,
                    2.0 * PI * iy as f64 / n as f64,
                );
                out[iy * n + ix] = f(x, y);
            }
        }
        out
    }

    fn run(grid: &KolmogorovGrid, w0: &[f64], nu: f64, t: f64, steps: usize) -> Vec<f64> {
        let mut work = grid.work();
        let mut hat = grid.to_spectral(w0, &mut work);
        grid.advance(&mut hat, nu, t / steps as f64, steps, 0.0, &mut work)
            .unwrap();
        grid.to_physical(&hat, &mut work)
    }

    #[test]
    fn taylor_green_mode_decays_as_exp_minus_2_nu_m2_t() {
        // w = cos(m x) cos(m y) is a Laplacian eigenfunction, so u . grad w = 0 and, with the
        // forcing off, w(t) = exp(-2 nu m^2 t) w(0).
        let (n, m, nu, t) = (16, 3.0, 0.05, 1.0);
        let grid = KolmogorovGrid::new(n, 0.0);
        let w0 = field(n, |x, y| (m * x).cos() * (m * y).cos());
        let w = run(&grid, &w0, nu, t, 200);
        let decay = (-2.0 * nu * m * m * t).exp();
        let want: Vec<f64> = w0.iter().map(|v| v * decay).collect();
        // CN's per-step error is O((nu k^2 dt)^3): relative error ~ 1e-6 here.
        let err = rel_l2(&w, &want);
        assert!(err < 1e-5, "relative error {err:e}");
    }

    #[test]
    fn laminar_kolmogorov_flow_is_steady() {
        // w = -cos(4 y) / (4 nu) balances nu Lap w + f with f = -4 cos(4 y) and has no
        // advection; CN keeps it to rounding.
        let (n, nu) = (16, 0.1);
        let grid = KolmogorovGrid::new(n, FORCING_AMPLITUDE);
        let w0 = field(n, |_, y| -(4.0 * y).cos() / (4.0 * nu));
        let w = run(&grid, &w0, nu, 0.5, 50);
        let err = rel_l2(&w, &w0);
        assert!(err < 1e-13, "relative drift {err:e}");
        // The opposite sign of the forcing would not be steady: the test can fail.
        let wrong = field(n, |_, y| (4.0 * y).cos() / (4.0 * nu));
        assert!(rel_l2(&run(&grid, &wrong, nu, 0.5, 50), &wrong) > 0.1);
    }

    #[test]
    fn time_step_halving_converges_at_second_order() {
        let (n, nu, t) = (32, 1.0 / 100.0, 0.5);
        let grid = KolmogorovGrid::new(n, FORCING_AMPLITUDE);
        let mut rng = StdRng::seed_from_u64(4);
        let w0 = random_vorticity(&mut rng, &grid, &mut grid.work(), GRF_ALPHA, GRF_TAU);
        let reference = run(&grid, &w0, nu, t, 400);
        let errors: Vec<f64> = [25, 50, 100]
            .iter()
            .map(|&steps| rel_l2(&run(&grid, &w0, nu, t, steps), &reference))
            .collect();
        for pair in errors.windows(2) {
            let order = (pair[0] / pair[1]).log2();
            assert!(
                (1.8..2.3).contains(&order),
                "errors {errors:?}, order {order}"
            );
        }
    }

    #[test]
    fn random_vorticity_is_real_mean_free_and_smooth() {
        let n = 32;
        let grid = KolmogorovGrid::new(n, FORCING_AMPLITUDE);
        let mut work = grid.work();
        let w = random_vorticity(&mut StdRng::seed_from_u64(9), &grid, &mut work, 2.5, 3.0);
        assert!(w.iter().sum::<f64>().abs() < 1e-10);
        let var = w.iter().map(|v| v * v).sum::<f64>() / (n * n) as f64;
        // E var = sum_{k != 0} s^2 (|k|^2 + 9)^-2.5 with s^2 = 27 (about 2.0 on 32^2).
        let expected: f64 = grid
            .k2
            .iter()
            .zip(&grid.dealias)
            .filter(|(&k2, &m)| k2 > 0.0 && m > 0.0)
            .map(|(k2, _)| 27.0 * (k2 + 9.0).powf(-2.5))
            .sum();
        assert!(
            var > 0.3 * expected && var < 3.0 * expected,
            "{var} vs {expected}"
        );
    }

    #[test]
    fn an_unstable_step_is_reported() {
        let n = 16;
        let grid = KolmogorovGrid::new(n, FORCING_AMPLITUDE);
        let w0 = field(n, |x, y| 50.0 * (x.sin() + (2.0 * y).cos()));
        let mut work = grid.work();
        let mut hat = grid.to_spectral(&w0, &mut work);
        let err = grid.advance(&mut hat, 1e-3, 1.0, 3, 0.0, &mut work);
        assert!(matches!(err, Err(NsError::Unstable { .. })), "{err:?}");
    }
}
