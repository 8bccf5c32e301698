//! Throughput of `pde.generate`'s generator (the code path the op runs, minus the file write):
//! 64x64 Poisson samples/s and 64x64 Navier-Stokes solver steps/s. Run by `bench/pde/run.sh`
//! next to the numpy/scipy reference; prints one JSON object.
//!
//! cargo run --release -p ops --example pde_bench -- [--threads 2] [--poisson-samples 2048]
//!     [--ns-samples 16] [--ns-steps 200] [--resolution 64]

use std::time::Instant;

use ops::pde::{generate, PdeGenerateOp};
use ops::{CancelFlag, TypedOp};
use serde_json::{json, Value};

fn arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a positive integer")),
    }
}

/// Best of `repeats` wall times of one generation, in seconds.
fn time(params: Value, threads: usize, repeats: usize) -> Result<f64, String> {
    let config =
        PdeGenerateOp::config(&params).map_err(|e| format!("{}: {}", e.path, e.message))?;
    let cancel = CancelFlag::new();
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        let data =
            generate(&config, 0, threads, &cancel, &mut |_| {}).map_err(|e| e.to_string())?;
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(data);
    }
    Ok(best)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let threads = arg(&args, "--threads", 2)?;
    let n = arg(&args, "--resolution", 64)?;
    let poisson_samples = arg(&args, "--poisson-samples", 2048)?;
    let ns_samples = arg(&args, "--ns-samples", 16)?;
    let ns_steps = arg(&args, "--ns-steps", 200)?;
    let repeats = arg(&args, "--repeats", 3)?;

    let poisson = |labeled: bool| {
        json!({"equation": "poisson", "resolution": n, "samples": poisson_samples,
               "labeled": labeled, "split": "pretrain"})
    };
    let t_labeled = time(poisson(true), threads, repeats)?;
    let t_unlabeled = time(poisson(false), threads, repeats)?;
    // dt 1e-3 over ns_steps * 1e-3 time units: exactly ns_steps CN/Heun steps per sample.
    let ns = json!({"equation": "navier_stokes", "resolution": n, "samples": ns_samples,
                    "re": 1000, "dt": 1e-3, "t_end": ns_steps as f64 * 1e-3});
    let t_ns = time(ns, threads, repeats)?;
    let out = json!({
        "impl": "rust",
        "threads": threads,
        "resolution": n,
        "poisson_samples": poisson_samples,
        "poisson_labeled_samples_per_s": poisson_samples as f64 / t_labeled,
        "poisson_unlabeled_samples_per_s": poisson_samples as f64 / t_unlabeled,
        "ns_samples": ns_samples,
        "ns_steps": ns_steps,
        "ns_steps_per_s": (ns_samples * ns_steps) as f64 / t_ns,
    });
    println!("{out}");
    Ok(())
}
