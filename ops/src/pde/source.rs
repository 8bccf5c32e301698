//! The Gaussian-bump source term shared by Poisson and Helmholtz
//! (`docs/methods/operator-learning.md` §1, "Source": 12 x 12 lattice, sigma 1/32, spacing 1/16,
//! centred on (0.5, 0.5)).

use rand::Rng;

/// Bumps per lattice axis.
pub const LATTICE: usize = 12;
/// Distance between neighbouring bump centres (unit square).
pub const SPACING: f64 = 1.0 / 16.0;
/// Standard deviation of every bump.
pub const SIGMA: f64 = 1.0 / 32.0;
/// The "volume fraction" of switched-off bumps cycles through these across a dataset.
pub const VOLUME_FRACTIONS: [f64; 4] = [0.2, 0.4, 0.6, 0.8];

/// vf of the sample with dataset index `index` (`docs/methods/operator-learning.md` §1: vf cycles
/// across the dataset).
pub fn volume_fraction(index: usize) -> f64 {
    VOLUME_FRACTIONS[index % VOLUME_FRACTIONS.len()]
}

/// Centre of lattice bump `m` along one axis: 0.5 + (m - 5.5) / 16, so 0.15625 ..= 0.84375.
pub fn centre(m: usize) -> f64 {
    0.5 + (m as f64 - (LATTICE as f64 - 1.0) / 2.0) * SPACING
}

/// `docs/methods/operator-learning.md` §1: each of the 144 bumps is on with probability 1 - vf with
/// amplitude U[1e-3, 1]; if none is on, one (chosen uniformly) is forced on. Returns `[12, 12]`
/// amplitudes `[row = y, col = x]`, 0 for bumps that are off.
pub fn draw_amplitudes(rng: &mut impl Rng, vf: f64) -> [f64; LATTICE * LATTICE] {
    let mut amplitudes = [0.0; LATTICE * LATTICE];
    let mut any = false;
    for a in amplitudes.iter_mut() {
        let on = rng.gen::<f64>() < 1.0 - vf;
        let amplitude = rng.gen_range(1e-3..1.0);
        if on {
            *a = amplitude;
            any = true;
        }
    }
    if !any {
        let forced = rng.gen_range(0..LATTICE * LATTICE);
        amplitudes[forced] = rng.gen_range(1e-3..1.0);
    }
    amplitudes
}

/// `docs/methods/operator-learning.md` §1: f(x, y) = sum_b a_b exp(-|(x, y) - c_b|^2 / (2 sigma^2))
/// on the grid x_j = j / n of the periodic unit square, distances taken to the nearest periodic
/// image. The Gaussian is separable, so f = G^T A G with G `[12, n]`: O(12 n^2), not O(144 n^2)
/// exps. `amplitudes` `[12, 12]`; returns `[n, n]` (row = y).
pub fn render(amplitudes: &[f64; LATTICE * LATTICE], n: usize) -> Vec<f64> {
    let basis = BumpBasis::new(n);
    let mut f = vec![0.0; n * n];
    basis.render_into(amplitudes, &mut vec![0.0; LATTICE * n], &mut f);
    f
}

/// The sample-independent factor G `[12, n]` of [`render`], computed once per grid size.
pub struct BumpBasis {
    n: usize,
    g: Vec<f64>,
}

impl BumpBasis {
    pub fn new(n: usize) -> Self {
        let mut g = vec![0.0; LATTICE * n];
        for m in 0..LATTICE {
            let c = centre(m);
            for j in 0..n {
                let mut d = j as f64 / n as f64 - c;
                d -= d.round();
                g[m * n + j] = (-d * d / (2.0 * SIGMA * SIGMA)).exp();
            }
        }
        Self { n, g }
    }

    /// The paper's per-sample source: [`render`] into `f` `[n, n]` (with `t` `[12, n]` as
    /// scratch), then [`normalise`]. On x86-64 CPUs with AVX2 the same code runs compiled for
    /// AVX2 (twice SSE2's vector width); the arithmetic, and so every bit of the result, is the
    /// same (no fused multiply-add, reductions in a fixed order).
    pub fn source_into(
        &self,
        amplitudes: &[f64; LATTICE * LATTICE],
        remove_mean: bool,
        t: &mut [f64],
        f: &mut [f64],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { self.source_avx2(amplitudes, remove_mean, t, f) };
        }
        self.render_into(amplitudes, t, f);
        normalise(f, remove_mean);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn source_avx2(
        &self,
        amplitudes: &[f64; LATTICE * LATTICE],
        remove_mean: bool,
        t: &mut [f64],
        f: &mut [f64],
    ) {
        self.render_into(amplitudes, t, f);
        normalise(f, remove_mean);
    }

    /// [`render`] into `f` `[n, n]`, with `t` `[12, n]` as scratch.
    #[inline(always)]
    pub fn render_into(&self, amplitudes: &[f64; LATTICE * LATTICE], t: &mut [f64], f: &mut [f64]) {
        let (n, g) = (self.n, &self.g);
        // t[my, ix] = sum_mx A[my, mx] G[mx, ix]
        t.fill(0.0);
        for my in 0..LATTICE {
            for mx in 0..LATTICE {
                let a = amplitudes[my * LATTICE + mx];
                if a != 0.0 {
                    let row = &g[mx * n..(mx + 1) * n];
                    for (out, gv) in t[my * n..(my + 1) * n].iter_mut().zip(row) {
                        *out += a * gv;
                    }
                }
            }
        }
        // f[iy, ix] = sum_my G[my, iy] t[my, ix]
        f.fill(0.0);
        for (iy, row) in f.chunks_exact_mut(n).enumerate() {
            for my in 0..LATTICE {
                let gy = g[my * n + iy];
                for (out, tv) in row.iter_mut().zip(&t[my * n..(my + 1) * n]) {
                    *out += gy * tv;
                }
            }
        }
    }
}

/// Independent partial sums per lane, so the compiler can vectorise reductions (a single
/// running sum is one long dependency chain).
const LANES: usize = 8;

/// sum of `map(v)` over `values`, in [`LANES`] partial sums combined in a fixed order (the same
/// result on every run and thread).
#[inline(always)]
pub fn sum_by(values: &[f64], map: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0.0; LANES];
    for chunk in values.chunks(LANES) {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += map(v);
        }
    }
    lanes.iter().sum()
}

/// `docs/methods/operator-learning.md` §1: f /= max(f), then (Poisson only) f -= mean(f).
/// max(f) > 0 because every amplitude is at least 1e-3 and at least one bump is on.
#[inline(always)]
pub fn normalise(f: &mut [f64], remove_mean: bool) {
    let mut lanes = [f64::NEG_INFINITY; LANES];
    for chunk in f.chunks(LANES) {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            if v > *lane {
                *lane = v;
            }
        }
    }
    let max = lanes.into_iter().fold(f64::NEG_INFINITY, f64::max);
    for v in f.iter_mut() {
        *v /= max;
    }
    if remove_mean {
        let mean = sum_by(f, |v| v) / f.len() as f64;
        for v in f.iter_mut() {
            *v -= mean;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn lattice_geometry_and_width() {
        assert_eq!(centre(0), 0.15625);
        assert_eq!(centre(11), 0.84375);
        assert!((centre(6) - centre(5) - SPACING).abs() < 1e-15);
        // One bump at lattice (row 2, col 9), amplitude 0.5, on a grid of 128 where its centre
        // falls on a node: x = 0.71875 = 92/128, y = 0.28125 = 36/128.
        let n = 128;
        let mut a = [0.0; LATTICE * LATTICE];
        a[2 * LATTICE + 9] = 0.5;
        let f = render(&a, n);
        let (iy, ix) = (36, 92);
        assert!((f[iy * n + ix] - 0.5).abs() < 1e-15);
        let argmax = f
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(i, _)| i)
            .unwrap();
        assert_eq!(argmax, iy * n + ix);
        // Four grid steps = 1/32 = one sigma away: value 0.5 exp(-1/2), in x and in y.
        let one_sigma = 0.5 * (-0.5f64).exp();
        assert!((f[iy * n + ix + 4] - one_sigma).abs() < 1e-15);
        assert!((f[(iy - 4) * n + ix] - one_sigma).abs() < 1e-15);
        // Diagonal: separable product, exp(-1).
        assert!((f[(iy + 4) * n + ix + 4] - 0.5 * (-1.0f64).exp()).abs() < 1e-15);
    }

    #[test]
    fn volume_fraction_cycles_and_controls_the_on_fraction() {
        let vfs: Vec<f64> = (0..6).map(volume_fraction).collect();
        assert_eq!(vfs, [0.2, 0.4, 0.6, 0.8, 0.2, 0.4]);
        let mut rng = StdRng::seed_from_u64(3);
        for vf in VOLUME_FRACTIONS {
            let draws = 200;
            let on: usize = (0..draws)
                .map(|_| {
                    draw_amplitudes(&mut rng, vf)
                        .iter()
                        .filter(|&&a| a > 0.0)
                        .count()
                })
                .sum();
            let frac = on as f64 / (draws * LATTICE * LATTICE) as f64;
            // 28800 Bernoulli draws: std of the fraction < 0.003.
            assert!(
                (frac - (1.0 - vf)).abs() < 0.015,
                "vf {vf}: on fraction {frac}"
            );
        }
    }

    #[test]
    fn a_draw_never_has_every_bump_off() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let a = draw_amplitudes(&mut rng, 1.0);
            let on: Vec<f64> = a.iter().copied().filter(|&v| v > 0.0).collect();
            assert_eq!(on.len(), 1);
            assert!((1e-3..1.0).contains(&on[0]));
        }
    }

    #[test]
    fn normalisation_scales_then_centres() {
        let mut f = vec![1.0, 2.0, 4.0, 1.0];
        normalise(&mut f, false);
        assert_eq!(f, [0.25, 0.5, 1.0, 0.25]);
        normalise(&mut f, true);
        assert_eq!(f, [-0.25, 0.0, 0.5, -0.25]);
    }
}
