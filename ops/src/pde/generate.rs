//! Drawing and solving samples in parallel: one independent random stream per sample index, so a
//! seed gives the same bytes on any number of threads.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::elliptic::{conductivity, EllipticGrid, EllipticWork, DIFFUSIVITY};
use super::navier_stokes::{self, KolmogorovGrid, NsError, NsWork};
use super::params::{Config, Problem, Window};
use super::reaction_diffusion::{self, FitzHughNagumo, RdWork};
use super::source;
use crate::seed::derive_seed;
use crate::{CancelFlag, OpError};

/// `docs/methods/operator-learning.md` §1, Helmholtz: a draw whose max |u| exceeds this is redrawn.
pub const HELMHOLTZ_MAX_ABS_U: f64 = 2.0;
/// Redraws of one Helmholtz sample before the range is declared unusable.
pub const HELMHOLTZ_MAX_DRAWS: u32 = 1000;

/// A generated dataset in memory (row-major, f32 like the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub config: Config,
    /// Stage seed mixed with the params' seed; sample i draws from `derive_seed(seed, i)`.
    pub seed: u64,
    /// `[N, C, n, n]`.
    pub x: Vec<f32>,
    /// `[N, C_y, n, n]` when labeled.
    pub y: Option<Vec<f32>>,
    /// `[N, k]`, columns `config.coeff_names()`.
    pub coeffs: Vec<f64>,
    /// Poisson/Helmholtz: ||f||_F (1/n)^2 per sample `[N]` (`docs/methods/operator-learning.md` §1,
    /// "Model input and scaling").
    pub f_norm: Option<Vec<f64>>,
    /// Helmholtz draws rejected for max |u| > 2, over the whole dataset.
    pub redraws: u64,
}

/// What a sample reports besides the fields it writes in place.
struct SampleInfo {
    coeffs: Vec<f64>,
    f_norm: Option<f64>,
    redraws: u32,
}

/// One sample's random stream and output slots, handed to the per-problem sampler.
struct Slot<'a> {
    rng: StdRng,
    index: usize,
    n: usize,
    /// `[C, n, n]`.
    x: &'a mut [f32],
    /// `[C_y, n, n]` when labeled.
    y: Option<&'a mut [f32]>,
}

/// Per-run precomputation shared by every thread.
enum Solver {
    Spectral(EllipticGrid, source::BumpBasis),
    ReactionDiffusion(FitzHughNagumo),
    NavierStokes(KolmogorovGrid),
}

/// Per-thread buffers of the Poisson/Helmholtz path (all `[n, n]` but `t`, `[12, n]`).
struct EllipticBuffers {
    solver: EllipticWork,
    f: Vec<f64>,
    u: Vec<f64>,
    t: Vec<f64>,
}

/// Per-thread buffers.
enum Work {
    Spectral(Box<EllipticBuffers>),
    ReactionDiffusion(RdWork),
    NavierStokes(Box<NsWork>),
}

impl Solver {
    fn new(config: &Config) -> Self {
        let n = config.resolution;
        match &config.problem {
            Problem::Poisson { .. } | Problem::Helmholtz { .. } => {
                Solver::Spectral(EllipticGrid::new(n), source::BumpBasis::new(n))
            }
            Problem::ReactionDiffusion { du, dv, k, .. } => {
                Solver::ReactionDiffusion(FitzHughNagumo {
                    du: *du,
                    dv: *dv,
                    k: *k,
                    reaction: true,
                })
            }
            Problem::NavierStokes { .. } => {
                Solver::NavierStokes(KolmogorovGrid::new(n, navier_stokes::FORCING_AMPLITUDE))
            }
        }
    }

    fn work(&self, n: usize) -> Work {
        match self {
            Solver::Spectral(grid, _) => Work::Spectral(Box::new(EllipticBuffers {
                solver: grid.work(),
                f: vec![0.0; n * n],
                u: vec![0.0; n * n],
                t: vec![0.0; source::LATTICE * n],
            })),
            Solver::ReactionDiffusion(_) => Work::ReactionDiffusion(RdWork::new(n)),
            Solver::NavierStokes(grid) => Work::NavierStokes(Box::new(grid.work())),
        }
    }
}

/// How often [`generate`] reports progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Generates `config.samples` samples on `threads` threads (a private rayon pool), calling
/// `progress(done)` now and then (on the calling thread) and stopping with `Cancelled` once
/// `cancel` is raised.
pub fn generate(
    config: &Config,
    stage_seed: u64,
    threads: usize,
    cancel: &CancelFlag,
    progress: &mut dyn FnMut(usize),
) -> Result<Dataset, OpError> {
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| OpError::Failed(format!("cannot start {threads} worker threads: {e}")))?;
    let seed = derive_seed(stage_seed, config.seed);
    let n = config.resolution;
    let solver = Solver::new(config);
    let (c_in, c_out) = config.channels();
    let total = config.samples;
    let (sx, sy) = (c_in * n * n, c_out * n * n);
    // Samples write their fields straight into these (no per-sample copies).
    let mut x = dataset_buffer(total * sx);
    let mut y = config.labeled.then(|| dataset_buffer(total * sy));
    // One parallel pass over all samples (rayon balances the load by work stealing; no barrier
    // per batch), run from a helper thread while this thread reports progress every
    // PROGRESS_EVERY, since `progress` may only be called here. Samples check `cancel`
    // themselves. Sample i depends on i only, so the output never depends on the scheduling.
    let done = AtomicUsize::new(0);
    let caller = std::thread::current();
    let run = |work: &mut Work, k: usize, x: &mut [f32], y: Option<&mut [f32]>| {
        if cancel.is_cancelled() {
            return Err(OpError::Cancelled);
        }
        let info = sample(config, &solver, work, seed, k, x, y);
        done.fetch_add(1, Ordering::Relaxed);
        info
    };
    let mut all = || -> Result<Vec<SampleInfo>, OpError> {
        pool.install(|| match y.as_mut() {
            Some(y) => x
                .par_chunks_mut(sx)
                .zip(y.par_chunks_mut(sy))
                .enumerate()
                .map_init(
                    || solver.work(n),
                    |work, (k, (x, y))| run(work, k, x, Some(y)),
                )
                .collect(),
            None => x
                .par_chunks_mut(sx)
                .enumerate()
                .map_init(|| solver.work(n), |work, (k, x)| run(work, k, x, None))
                .collect(),
        })
    };
    let infos = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let infos = all();
            caller.unpark();
            infos
        });
        let mut reported = 0;
        while !worker.is_finished() {
            std::thread::park_timeout(PROGRESS_EVERY);
            let now = done.load(Ordering::Relaxed);
            if now != reported && !worker.is_finished() {
                progress(now);
                reported = now;
            }
        }
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    progress(total);
    let mut coeffs = Vec::with_capacity(total * config.coeff_names().len());
    let mut f_norm = Vec::new();
    let mut redraws = 0u64;
    for info in infos {
        coeffs.extend_from_slice(&info.coeffs);
        f_norm.extend(info.f_norm);
        redraws += u64::from(info.redraws);
    }
    Ok(Dataset {
        config: config.clone(),
        seed,
        x,
        y,
        coeffs,
        f_norm: (!f_norm.is_empty()).then_some(f_norm),
        redraws,
    })
}

/// Stores an f64 field into its f32 slot.
fn store(out: &mut [f32], field: &[f64]) {
    for (o, v) in out.iter_mut().zip(field) {
        *o = *v as f32;
    }
}

/// `[C, n, n]` into `out`: the field then each value as a constant channel.
fn store_with_constant_channels(out: &mut [f32], field: &[f64], constants: &[f64]) {
    let (head, rest) = out.split_at_mut(field.len());
    store(head, field);
    for (plane, &c) in rest.chunks_mut(field.len()).zip(constants) {
        plane.fill(c as f32);
    }
}

/// `docs/methods/operator-learning.md` §1, "Model input and scaling": ||f||_F * (1/n)^2 of `f`
/// `[n, n]`.
fn source_norm(f: &[f64], n: usize) -> f64 {
    source::sum_by(f, |v| v * v).sqrt() / (n * n) as f64
}

/// A zeroed f32 buffer for a whole dataset. Where the kernel offers transparent huge pages on
/// request (Linux THP "madvise" mode), a large one asks for them: the dataset is written once,
/// page by page, and with 4 KiB pages the kernel's page faults took about a third of 64 x 64
/// Poisson generation (perf). Only a hint: the content is the same either way.
fn dataset_buffer(len: usize) -> Vec<f32> {
    let buffer = vec![0.0f32; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let start = buffer.as_ptr() as usize;
        let (first, end) = (
            start.next_multiple_of(HUGE_PAGE),
            (start + std::mem::size_of_val(buffer.as_slice())) / HUGE_PAGE * HUGE_PAGE,
        );
        if end >= first + 2 * HUGE_PAGE {
            // SAFETY: [first, end) lies inside `buffer`'s allocation and MADV_HUGEPAGE changes
            // no content; a failure (no THP support) is harmless and ignored.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    buffer
}

/// Draws (and, when labeled, solves) sample `index`, writing its input `[C, n, n]` into `x`
/// and, when labeled, its solution `[C_y, n, n]` into `y`.
fn sample(
    config: &Config,
    solver: &Solver,
    work: &mut Work,
    seed: u64,
    index: usize,
    x: &mut [f32],
    y: Option<&mut [f32]>,
) -> Result<SampleInfo, OpError> {
    let slot = Slot {
        rng: StdRng::seed_from_u64(derive_seed(seed, index as u64)),
        index,
        n: config.resolution,
        x,
        y,
    };
    match (&config.problem, solver, work) {
        (Problem::Poisson { e }, Solver::Spectral(grid, basis), Work::Spectral(work)) => {
            Ok(sample_poisson(e, grid, basis, work, slot))
        }
        (Problem::Helmholtz { omega }, Solver::Spectral(grid, basis), Work::Spectral(work)) => {
            sample_helmholtz(omega, grid, basis, work, slot)
        }
        (
            Problem::ReactionDiffusion { window, .. },
            Solver::ReactionDiffusion(model),
            Work::ReactionDiffusion(work),
        ) => sample_reaction_diffusion(window, model, work, slot),
        (
            Problem::NavierStokes { re, window },
            Solver::NavierStokes(grid),
            Work::NavierStokes(work),
        ) => sample_navier_stokes(re, window, grid, work, slot),
        _ => Err(OpError::Failed(
            "internal: pde.generate paired a problem with another equation's solver".to_string(),
        )),
    }
}

/// `docs/methods/operator-learning.md` §1, Poisson: one draw, always usable.
fn sample_poisson(
    e: &[f64; 2],
    grid: &EllipticGrid,
    basis: &source::BumpBasis,
    work: &mut EllipticBuffers,
    slot: Slot<'_>,
) -> SampleInfo {
    let Slot {
        mut rng,
        index,
        n,
        x,
        y,
    } = slot;
    // `docs/methods/operator-learning.md` §1, Poisson: e ~ U[lo, hi], theta ~ U[0, 2 pi], bump
    // source with mean removed; stored coefficients 0.01 [K11, K22, K12].
    let e = rng.gen_range(e[0]..=e[1]);
    let theta = rng.gen_range(0.0..std::f64::consts::TAU);
    let vf = source::volume_fraction(index);
    let EllipticBuffers { solver, f, u, t } = work;
    basis.source_into(&source::draw_amplitudes(&mut rng, vf), true, t, f);
    let k = conductivity(e, theta);
    let scaled = k.map(|v| DIFFUSIVITY * v);
    store_with_constant_channels(x, f, &scaled);
    if let Some(y) = y {
        grid.solve_poisson(solver, f, k, u);
        store(y, u);
    }
    SampleInfo {
        coeffs: vec![scaled[0], scaled[1], scaled[2], e, theta, vf],
        f_norm: Some(source_norm(f, n)),
        redraws: 0,
    }
}

/// `docs/methods/operator-learning.md` §1, Helmholtz: draws until max |u| is in range (labeled
/// only).
fn sample_helmholtz(
    omega: &[i64; 2],
    grid: &EllipticGrid,
    basis: &source::BumpBasis,
    work: &mut EllipticBuffers,
    slot: Slot<'_>,
) -> Result<SampleInfo, OpError> {
    let Slot {
        mut rng,
        index,
        n,
        x,
        mut y,
    } = slot;
    // `docs/methods/operator-learning.md` §1, Helmholtz: omega ~ U{lo..hi}, bump source without
    // mean removal, redraw while max |u| > 2 (only checkable when the solver runs, i.e. labeled).
    let vf = source::volume_fraction(index);
    let EllipticBuffers { solver, f, u, t } = work;
    for redraws in 0..HELMHOLTZ_MAX_DRAWS {
        let w = rng.gen_range(omega[0]..=omega[1]) as f64;
        basis.source_into(&source::draw_amplitudes(&mut rng, vf), false, t, f);
        if let Some(y) = y.as_deref_mut() {
            grid.solve_helmholtz(solver, f, w, u);
            let max = u.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            if max.is_nan() || max > HELMHOLTZ_MAX_ABS_U {
                continue;
            }
            store(y, u);
        }
        store_with_constant_channels(x, f, &[DIFFUSIVITY, w]);
        return Ok(SampleInfo {
            coeffs: vec![DIFFUSIVITY, w, vf],
            f_norm: Some(source_norm(f, n)),
            redraws,
        });
    }
    Err(OpError::Failed(format!(
        "helmholtz sample {index}: {HELMHOLTZ_MAX_DRAWS} draws in a row had max|u| > \
         {HELMHOLTZ_MAX_ABS_U} for omega in [{}, {}]; choose another omega range",
        omega[0], omega[1]
    )))
}

/// `docs/methods/operator-learning.md` §1, reaction-diffusion: a random state, burnt in, then the
/// frames.
fn sample_reaction_diffusion(
    window: &Window,
    model: &FitzHughNagumo,
    work: &mut RdWork,
    slot: Slot<'_>,
) -> Result<SampleInfo, OpError> {
    let Slot {
        mut rng,
        index,
        n,
        x,
        y,
    } = slot;
    // `docs/methods/operator-learning.md` §1, reaction-diffusion: u, v ~ N(0, 1) per cell at t = 0.
    let mut state: Vec<f64> = (0..2 * n * n)
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    let coeffs = vec![model.du, model.dv, model.k];
    let Some(y) = y else {
        store(x, &state);
        return Ok(time_info(coeffs));
    };
    let diverged = |e: reaction_diffusion::Diverged| {
        OpError::Failed(format!(
            "reaction_diffusion sample {index}: the state stopped being finite at t = \
             {:.4}; reduce dt (steps of {:.3e} now)",
            e.time,
            window.dt.max(window.burn_in_dt)
        ))
    };
    let rd = |state: &mut [f64], dt, steps, t0, work: &mut RdWork| {
        reaction_diffusion::integrate(model, n, state, dt, steps, t0, work)
    };
    rd(
        &mut state,
        window.burn_in_dt,
        window.burn_in_steps,
        0.0,
        work,
    )
    .map_err(diverged)?;
    store(x, &state);
    for (frame, out) in y.chunks_mut(2 * n * n).enumerate() {
        let t0 = frame_start(window, frame);
        rd(&mut state, window.dt, window.steps_per_frame, t0, work).map_err(diverged)?;
        store(out, &state);
    }
    Ok(time_info(coeffs))
}

/// `docs/methods/operator-learning.md` §1, NS: a random vorticity, burnt in, then the frames.
fn sample_navier_stokes(
    re: &[f64],
    window: &Window,
    grid: &KolmogorovGrid,
    work: &mut NsWork,
    slot: Slot<'_>,
) -> Result<SampleInfo, OpError> {
    let Slot {
        mut rng,
        index,
        n,
        x,
        y,
    } = slot;
    // `docs/methods/operator-learning.md` §1, NS: Re cycles through the list; w0 a GRF(alpha 2.5,
    // tau 3).
    let re = re[index % re.len()];
    let w0 = navier_stokes::random_vorticity(
        &mut rng,
        grid,
        work,
        navier_stokes::GRF_ALPHA,
        navier_stokes::GRF_TAU,
    );
    let Some(y) = y else {
        store(x, &w0);
        return Ok(time_info(vec![re]));
    };
    let nu = 1.0 / re;
    let unstable = |e: NsError| {
        let NsError::Unstable { cfl, time } = e;
        OpError::Failed(format!(
            "navier_stokes sample {index} (Re {re}): CFL number {cfl:.3} > 1 at t = \
             {time:.4}; reduce dt (steps of {:.3e} now) or raise the resolution",
            window.dt.max(window.burn_in_dt)
        ))
    };
    let mut w_hat = grid.to_spectral(&w0, work);
    if window.burn_in_steps > 0 {
        grid.advance(
            &mut w_hat,
            nu,
            window.burn_in_dt,
            window.burn_in_steps,
            0.0,
            work,
        )
        .map_err(unstable)?;
        store(x, &grid.to_physical(&w_hat, work));
    } else {
        store(x, &w0);
    }
    for (frame, out) in y.chunks_mut(n * n).enumerate() {
        let t0 = frame_start(window, frame);
        grid.advance(&mut w_hat, nu, window.dt, window.steps_per_frame, t0, work)
            .map_err(unstable)?;
        store(out, &grid.to_physical(&w_hat, work));
    }
    Ok(time_info(vec![re]))
}

fn frame_start(window: &Window, frame: usize) -> f64 {
    window.t_start + frame as f64 * window.steps_per_frame as f64 * window.dt
}

fn time_info(coeffs: Vec<f64>) -> SampleInfo {
    SampleInfo {
        coeffs,
        f_norm: None,
        redraws: 0,
    }
}
