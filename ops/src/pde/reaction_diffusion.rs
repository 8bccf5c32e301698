//! 2-D diffusion-reaction (FitzHugh-Nagumo type, PDEBench), `docs/methods/operator-learning.md` §1
//! "Reaction-diffusion": u_t = Du Lap u + u - u^3 - k - v, v_t = Dv Lap v + u - v on [-1, 1]^2
//! with no-flux (Neumann) boundaries.
//!
//! Integrator (the paper leaves it free; PDEBench used finite volumes + RK45): cell-centred finite
//! volumes on n x n cells of width h = 2 / n, 5-point Laplacian with mirror ghost cells (zero
//! flux through every wall), classical fourth-order Runge-Kutta with a fixed step. Explicit, so
//! dt is bounded by the diffusion stability limit checked in [`stable_dt`].

/// Side length of the domain [-1, 1]^2.
pub const DOMAIN_LENGTH: f64 = 2.0;
/// Real-axis stability bound of classical RK4 (|z| <= 2.785 on the negative real axis), with a
/// margin.
const RK4_REAL_LIMIT: f64 = 2.5;

/// Model coefficients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitzHughNagumo {
    pub du: f64,
    pub dv: f64,
    pub k: f64,
    /// false drops every non-diffusive term (tests use the pure heat equation).
    pub reaction: bool,
}

/// `docs/methods/operator-learning.md` §1: Du = 1e-3, Dv = 5e-3, k = 5e-3.
pub const PDEBENCH: FitzHughNagumo = FitzHughNagumo {
    du: 1e-3,
    dv: 5e-3,
    k: 5e-3,
    reaction: true,
};

/// The state stopped being finite (the step was too large for the reaction's stiffness).
#[derive(Debug, Clone, PartialEq)]
pub struct Diverged {
    pub time: f64,
}

/// Largest dt for which the diffusion part is RK4-stable on n cells: the 5-point Laplacian's
/// most negative eigenvalue is -8 / h^2, so dt * 8 max(Du, Dv) / h^2 <= 2.5.
pub fn stable_dt(model: &FitzHughNagumo, n: usize) -> f64 {
    let h = DOMAIN_LENGTH / n as f64;
    RK4_REAL_LIMIT * h * h / (8.0 * model.du.max(model.dv))
}

/// Stage buffers, each `[n, n]`.
pub struct RdWork {
    acc_u: Vec<f64>,
    acc_v: Vec<f64>,
    stage_u: Vec<f64>,
    stage_v: Vec<f64>,
    rate_u: Vec<f64>,
    rate_v: Vec<f64>,
}

impl RdWork {
    pub fn new(n: usize) -> Self {
        let z = vec![0.0; n * n];
        Self {
            acc_u: z.clone(),
            acc_v: z.clone(),
            stage_u: z.clone(),
            stage_v: z.clone(),
            rate_u: z.clone(),
            rate_v: z,
        }
    }
}

/// Finite-volume Laplacian with zero-flux walls: (sum of the 4 neighbours - 4 a) / h^2, a
/// neighbour outside the domain replaced by the cell itself. `a`, `out` `[n, n]`, 1/h^2 in
/// `inv_h2` (units: 1 / length^2).
fn laplacian(a: &[f64], n: usize, inv_h2: f64, out: &mut [f64]) {
    for iy in 0..n {
        let up = if iy == 0 { 0 } else { iy - 1 };
        let down = if iy + 1 == n { n - 1 } else { iy + 1 };
        for ix in 0..n {
            let left = if ix == 0 { 0 } else { ix - 1 };
            let right = if ix + 1 == n { n - 1 } else { ix + 1 };
            let c = a[iy * n + ix];
            out[iy * n + ix] =
                (a[up * n + ix] + a[down * n + ix] + a[iy * n + left] + a[iy * n + right]
                    - 4.0 * c)
                    * inv_h2;
        }
    }
}

/// `docs/methods/operator-learning.md` §1 (reaction-diffusion) right-hand side: (u_t, v_t) of the
/// state (u, v), all `[n, n]`.
fn rates(
    model: &FitzHughNagumo,
    n: usize,
    u: &[f64],
    v: &[f64],
    rate_u: &mut [f64],
    rate_v: &mut [f64],
) {
    let h = DOMAIN_LENGTH / n as f64;
    let inv_h2 = 1.0 / (h * h);
    laplacian(u, n, inv_h2, rate_u);
    laplacian(v, n, inv_h2, rate_v);
    for j in 0..n * n {
        rate_u[j] *= model.du;
        rate_v[j] *= model.dv;
        if model.reaction {
            let (a, b) = (u[j], v[j]);
            rate_u[j] += a - a * a * a - model.k - b;
            rate_v[j] += a - b;
        }
    }
}

/// Classical RK4 for `steps` steps of `dt` from time `t0` (only used in the error), updating
/// the state `[2, n, n]` = (u, v) in place.
pub fn integrate(
    model: &FitzHughNagumo,
    n: usize,
    state: &mut [f64],
    dt: f64,
    steps: usize,
    t0: f64,
    work: &mut RdWork,
) -> Result<(), Diverged> {
    let (u, v) = state.split_at_mut(n * n);
    let RdWork {
        acc_u,
        acc_v,
        stage_u,
        stage_v,
        rate_u,
        rate_v,
    } = work;
    for s in 0..steps {
        rates(model, n, u, v, rate_u, rate_v);
        for j in 0..n * n {
            acc_u[j] = rate_u[j];
            acc_v[j] = rate_v[j];
            stage_u[j] = u[j] + 0.5 * dt * rate_u[j];
            stage_v[j] = v[j] + 0.5 * dt * rate_v[j];
        }
        for (weight, next) in [(2.0, 0.5 * dt), (2.0, dt)] {
            rates(model, n, stage_u, stage_v, rate_u, rate_v);
            for j in 0..n * n {
                acc_u[j] += weight * rate_u[j];
                acc_v[j] += weight * rate_v[j];
                stage_u[j] = u[j] + next * rate_u[j];
                stage_v[j] = v[j] + next * rate_v[j];
            }
        }
        rates(model, n, stage_u, stage_v, rate_u, rate_v);
        let mut finite = true;
        for j in 0..n * n {
            u[j] += dt / 6.0 * (acc_u[j] + rate_u[j]);
            v[j] += dt / 6.0 * (acc_v[j] + rate_v[j]);
            finite &= u[j].is_finite() && v[j].is_finite();
        }
        if !finite {
            return Err(Diverged {
                time: t0 + (s + 1) as f64 * dt,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    use std::f64::consts::PI;

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Cell-centred cosine cos(pi m (j + 1/2) / n) along x times cos(pi l (i + 1/2) / n) along y:
    /// an exact eigenvector of the Neumann finite-volume Laplacian, eigenvalue
    /// -(4 / h^2) (sin^2(pi m / 2n) + sin^2(pi l / 2n)).
    fn neumann_mode(n: usize, m: f64, l: f64) -> (Vec<f64>, f64) {
        let h = DOMAIN_LENGTH / n as f64;
        let mut a = vec![0.0; n * n];
        for iy in 0..n {
            for ix in 0..n {
                a[iy * n + ix] = (PI * m * (ix as f64 + 0.5) / n as f64).cos()
                    * (PI * l * (iy as f64 + 0.5) / n as f64).cos();
            }
        }
        let s = |k: f64| (PI * k / (2.0 * n as f64)).sin().powi(2);
        (a, -4.0 / (h * h) * (s(m) + s(l)))
    }

    #[test]
    fn heat_equation_mode_decays_at_the_discrete_and_continuous_rates() {
        let model = FitzHughNagumo {
            reaction: false,
            ..PDEBENCH
        };
        let (m, l, t) = (2.0, 1.0, 2.0);
        let mut errors_vs_continuous = Vec::new();
        for n in [16, 32, 64] {
            let (u0, lambda) = neumann_mode(n, m, l);
            let mut state = [u0.clone(), u0.clone()].concat();
            let steps = 200;
            integrate(
                &model,
                n,
                &mut state,
                t / steps as f64,
                steps,
                0.0,
                &mut RdWork::new(n),
            )
            .unwrap();
            let (u, v) = state.split_at(n * n);
            let want_u: Vec<f64> = u0
                .iter()
                .map(|a| a * (model.du * lambda * t).exp())
                .collect();
            let want_v: Vec<f64> = u0
                .iter()
                .map(|a| a * (model.dv * lambda * t).exp())
                .collect();
            assert!(
                max_abs_diff(u, &want_u) < 1e-12,
                "n {n}: u off the discrete decay"
            );
            assert!(
                max_abs_diff(v, &want_v) < 1e-12,
                "n {n}: v off the discrete decay"
            );
            // Continuous Neumann eigenvalue on [-1, 1]^2: -(pi / 2)^2 (m^2 + l^2).
            let continuous = -(PI / DOMAIN_LENGTH).powi(2) * (m * m + l * l);
            errors_vs_continuous.push((lambda - continuous).abs());
        }
        for pair in errors_vs_continuous.windows(2) {
            let order = (pair[0] / pair[1]).log2();
            assert!((1.9..2.1).contains(&order), "spatial order {order}");
        }
    }

    #[test]
    fn time_step_halving_converges_at_fourth_order() {
        let n = 16;
        let mut rng = StdRng::seed_from_u64(2);
        let s0: Vec<f64> = (0..2 * n * n)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let t = 0.5;
        let solve = |steps: usize| {
            let mut state = s0.clone();
            integrate(
                &PDEBENCH,
                n,
                &mut state,
                t / steps as f64,
                steps,
                0.0,
                &mut RdWork::new(n),
            )
            .unwrap();
            state
        };
        let reference = solve(1280);
        let errors: Vec<f64> = [40, 80, 160]
            .iter()
            .map(|&s| max_abs_diff(&solve(s), &reference))
            .collect();
        for pair in errors.windows(2) {
            let order = (pair[0] / pair[1]).log2();
            assert!(
                (3.6..4.4).contains(&order),
                "errors {errors:?}, order {order}"
            );
        }
    }

    #[test]
    fn no_flux_walls_conserve_the_pure_diffusion_mass() {
        let n = 12;
        let model = FitzHughNagumo {
            reaction: false,
            ..PDEBENCH
        };
        let mut rng = StdRng::seed_from_u64(8);
        let mut state: Vec<f64> = (0..2 * n * n)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let before: f64 = state.iter().sum();
        integrate(&model, n, &mut state, 0.05, 100, 0.0, &mut RdWork::new(n)).unwrap();
        assert!((state.iter().sum::<f64>() - before).abs() < 1e-11);
    }

    #[test]
    fn divergence_is_reported_not_returned_as_data() {
        let n = 8;
        let mut state = [vec![10.0; n * n], vec![0.0; n * n]].concat();
        let err = integrate(&PDEBENCH, n, &mut state, 1.0, 20, 0.0, &mut RdWork::new(n));
        assert!(err.is_err());
        assert!(stable_dt(&PDEBENCH, 32) > 0.1 && stable_dt(&PDEBENCH, 32) < 0.3);
    }
}
