//! PDE data generation for operator learning (arXiv 2402.15734): `pde.generate`.
//!
//! Implements section 1 of `docs/methods/operator-learning.md`: Poisson and Helmholtz
//! (spectral, [`elliptic`]), FitzHugh-Nagumo reaction-diffusion ([`reaction_diffusion`]) and
//! Kolmogorov-flow Navier-Stokes ([`navier_stokes`]), with the Gaussian-bump source of
//! [`source`]. [`params`] validates the YAML, [`generate`] draws and solves samples in parallel
//! (deterministic for a seed on any thread count), [`output`] writes the artifact.

pub mod elliptic;
pub mod fft;
pub mod generate;
pub mod navier_stokes;
pub mod output;
pub mod params;
pub mod reaction_diffusion;
pub mod source;

use std::sync::Arc;
use std::time::Instant;

pub use generate::{generate, Dataset};
pub use output::{read_meta, PdeMeta, DATA_FILE, META_FILE};
pub use params::{Config, Equation, GenerateParams, Problem, Split};

use crate::{OpError, Outputs, ParamError, Registry, RunContext, TypedOp};

/// Adds this module's ops to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(Arc::new(PdeGenerateOp));
}

/// `pde.generate`: draws PDE inputs (and solves them when `labeled`) into a dataset artifact.
pub struct PdeGenerateOp;

impl TypedOp for PdeGenerateOp {
    const NAME: &'static str = "pde.generate";
    /// 2: real-to-complex transforms (results differ from 1 at rounding level).
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "generate a Poisson/Helmholtz/reaction-diffusion/Navier-Stokes dataset (spectral solvers)";
    type Params = GenerateParams;
    type Config = Config;

    fn resolve(p: GenerateParams) -> Result<Config, ParamError> {
        Config::resolve(p)
    }

    fn run(
        &self,
        config: &Config,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let _span = tracing::info_span!(
            "pde.generate",
            equation = config.equation.name(),
            samples = config.samples,
            resolution = config.resolution
        )
        .entered();
        let started = Instant::now();
        let total = config.samples;
        let progress = ctx.progress;
        let mut report = |done: usize| progress.report(&format!("{done}/{total} samples"));
        let data = generate(config, ctx.seed, ctx.cpus, ctx.cancel, &mut report)?;
        let solve_seconds = started.elapsed().as_secs_f64();
        let meta = output::write(out.dir(), &data)?;
        let seconds = started.elapsed().as_secs_f64();
        let log = |e| OpError::io("cannot write the stage log", e);
        writeln!(
            ctx.log,
            "pde.generate: {total} {} samples at {n}x{n}, labeled {}, {} threads, {solve_seconds:.3} s \
             generating, {seconds:.3} s in all\nsolver: {}",
            config.equation.name(),
            config.labeled,
            ctx.cpus.max(1),
            meta.solver,
            n = config.resolution,
        )
        .map_err(log)?;
        out.metric("samples", total as f64);
        out.metric("seconds", seconds);
        out.metric("samples_per_s", total as f64 / solve_seconds.max(1e-9));
        if config.equation == Equation::Helmholtz {
            out.metric("redraws", data.redraws as f64);
        }
        if let (Some(window), true) = (config.window(), config.labeled) {
            let steps = (window.total_steps() * total) as f64;
            out.metric("steps_per_s", steps / solve_seconds.max(1e-9));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::OpRun;
    use crate::{CancelFlag, Metrics};
    use serde_json::{json, Value};
    use std::collections::BTreeMap;
    use std::path::Path;

    fn run_op(params: Value, cpus: usize, out: &Path) -> Result<Metrics, OpError> {
        OpRun::new(params)
            .seed(17)
            .cpus(cpus)
            .out(out)
            .run(&PdeGenerateOp)
            .result
    }

    fn tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(dir.join(DATA_FILE)).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensors()
            .into_iter()
            .map(|(name, view)| {
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (name, (view.shape().to_vec(), values))
            })
            .collect()
    }

    #[test]
    fn same_bytes_on_one_and_two_threads() {
        for params in [
            json!({"equation": "poisson", "resolution": 16, "samples": 9}),
            json!({"equation": "helmholtz", "resolution": 16, "samples": 9}),
            json!({"equation": "navier_stokes", "resolution": 16, "samples": 5, "t_end": 0.1,
                   "split": "pretrain"}),
            json!({"equation": "reaction_diffusion", "resolution": 12, "samples": 5,
                   "t_end": 0.1, "frames": 2}),
        ] {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            run_op(params.clone(), 1, a.path()).unwrap();
            run_op(params.clone(), 2, b.path()).unwrap();
            for file in [DATA_FILE, META_FILE] {
                let (x, y) = (
                    std::fs::read(a.path().join(file)).unwrap(),
                    std::fs::read(b.path().join(file)).unwrap(),
                );
                assert!(
                    x == y,
                    "{file} differs between 1 and 2 threads for {params}"
                );
            }
        }
    }

    #[test]
    fn poisson_artifact_layout_and_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = run_op(
            json!({"equation": "poisson", "resolution": 16, "samples": 8, "split": "ood"}),
            2,
            dir.path(),
        )
        .unwrap();
        assert_eq!(metrics["samples"], 8.0);
        assert!(metrics["samples_per_s"] > 0.0);
        let t = tensors(dir.path());
        let (x_shape, x) = &t["x"];
        assert_eq!(x_shape, &[8, 4, 16, 16]);
        assert_eq!(t["y"].0, [8, 1, 16, 16]);
        let (c_shape, coeffs) = &t["coeffs"];
        assert_eq!(c_shape, &[8, 6]);
        let meta = read_meta(dir.path()).unwrap();
        assert_eq!(meta.coeff_names, ["k11", "k22", "k12", "e", "theta", "vf"]);
        let plane = 256;
        for i in 0..8 {
            let row = &coeffs[i * 6..(i + 1) * 6];
            // OOD split: e in [15, 50]; vf cycles; channel 1..3 are the constant coefficients.
            assert!((15.0..=50.0).contains(&row[3]), "e = {}", row[3]);
            assert_eq!(row[5], source::VOLUME_FRACTIONS[i % 4] as f32);
            for c in 1..4 {
                let ch = &x[(i * 4 + c) * plane..(i * 4 + c + 1) * plane];
                assert!(ch.iter().all(|&v| v == row[c - 1]));
            }
            // Source channel: max 1 before the mean was removed.
            let f = &x[i * 4 * plane..(i * 4 + 1) * plane];
            let mean = f.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64;
            assert!(mean.abs() < 1e-6);
        }
        let scaling = meta.scaling.unwrap();
        assert_eq!(scaling.f_norm.len(), 8);
        assert_eq!(scaling.f_norm_median, output::median(&scaling.f_norm));
        assert_eq!(scaling.coeff_channels, ["k11", "k22", "k12"]);
        assert!(scaling.coeff_channel_medians.iter().all(|m| *m > 0.0));
        // f_norm is ||f||_F / n^2 of the stored channel.
        let f0 = &x[..plane];
        let norm = f0.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt() / 256.0;
        assert!((norm - scaling.f_norm[0]).abs() < 1e-6 * norm);
    }

    #[test]
    fn unlabeled_sets_have_no_y_and_the_same_inputs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let params = json!({"equation": "navier_stokes", "resolution": 16, "samples": 3,
                            "t_end": 0.05, "labeled": false});
        let metrics = run_op(params, 1, a.path()).unwrap();
        assert!(!metrics.contains_key("steps_per_s"));
        let unlabeled = tensors(a.path());
        assert!(!unlabeled.contains_key("y"));
        let meta = read_meta(a.path()).unwrap();
        assert!(!meta.labeled && !meta.tensors.contains_key("y"));
        run_op(
            json!({"equation": "navier_stokes", "resolution": 16, "samples": 3, "t_end": 0.05}),
            1,
            b.path(),
        )
        .unwrap();
        let labeled = tensors(b.path());
        assert_eq!(
            labeled["x"], unlabeled["x"],
            "t_start 0: the input is w0 either way"
        );
        assert_eq!(labeled["y"].0, [3, 1, 16, 16]);
        // Poisson: unlabeled inputs equal labeled ones too.
        let (c, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let p = json!({"equation": "poisson", "resolution": 16, "samples": 4});
        run_op(p, 1, c.path()).unwrap();
        run_op(
            json!({"equation": "poisson", "resolution": 16, "samples": 4, "labeled": false}),
            1,
            d.path(),
        )
        .unwrap();
        let (tc, td) = (tensors(c.path()), tensors(d.path()));
        assert_eq!(tc["x"], td["x"]);
        assert!(!td.contains_key("y"));
    }

    #[test]
    fn helmholtz_labels_respect_the_redraw_bound() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = run_op(
            json!({"equation": "helmholtz", "resolution": 16, "samples": 12, "split": "pretrain"}),
            2,
            dir.path(),
        )
        .unwrap();
        let t = tensors(dir.path());
        assert!(t["y"].1.iter().all(|v| v.abs() <= 2.0));
        let omegas: Vec<f32> = t["coeffs"].1.chunks(3).map(|r| r[1]).collect();
        assert!(omegas
            .iter()
            .all(|w| w.fract() == 0.0 && (1.0..=20.0).contains(w)));
        assert_eq!(
            metrics["redraws"],
            read_meta(dir.path()).unwrap().redraws as f64
        );
    }

    #[test]
    fn cancellation_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let config = PdeGenerateOp::config(&json!({"equation": "poisson", "samples": 50})).unwrap();
        let cancel = CancelFlag::new();
        cancel.cancel();
        let result = generate(&config, 0, 2, &cancel, &mut |_| {});
        assert!(matches!(result, Err(OpError::Cancelled)));
        drop(dir);
    }

    #[test]
    fn every_param_is_documented() {
        let rows = crate::Op::params_doc(&PdeGenerateOp);
        assert_eq!(rows.len(), 13);
        assert!(rows.iter().all(|r| !r.doc.is_empty()), "{rows:#?}");
        assert!(rows[0].path == "equation" && rows[0].required);
        assert_eq!(rows[1].default, Some(json!(32)));
    }

    #[test]
    fn the_registry_knows_the_op() {
        let registry = Registry::builtin();
        let op = registry.get("pde.generate").unwrap();
        let err = op
            .plan(&json!({"equation": "poisson", "resolution": 2}))
            .unwrap_err();
        assert_eq!(err.path, "resolution");
    }
}
