//! Training throughput of `nn`: one model trained for a fixed number of steps on one fixed
//! random batch, through the same `train_step` the `train` op runs. Run by
//! `bench/training/run.sh` next to the PyTorch equivalents in `bench/training/torch_bench.py`;
//! prints one JSON object (steps/s, peak RSS).
//!
//! cargo run --release -p nn --example train_bench -- <mlp|nb201|fno2d> <steps> [--warmup 3]
//!     [--dfdx-cache]
//!
//! `--dfdx-cache` turns on dfdx's allocation cache (off in `engine` today): a what-if for the
//! profile in bench/RESULTS_training.md, not how the `train` op runs.
//!
//! Threads come from RAYON_NUM_THREADS (dfdx's matmuls run on rayon's global pool).

use std::time::Instant;

use nn::layers::ForwardCtx;
use nn::models::InputShape;
use nn::train::{train_step, LossKind, Optimizer, OptimizerSpec, Target};
use nn::{from_vec, Dev, Init, Model, ModelSpec, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// One benchmark configuration; `torch_bench.py` mirrors every field.
struct Case {
    spec: serde_json::Value,
    input: InputShape,
    batch: usize,
    loss: LossKind,
    optimizer: OptimizerSpec,
    lr: f64,
}

fn case(model: &str) -> Result<Case, String> {
    let sgd = OptimizerSpec::Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    };
    Ok(match model {
        // 3072 -> 256, cell "2_12_012" (3 Linear(256, 256)+ReLU edges, 2 skips), -> 10.
        "mlp" => Case {
            spec: json!({"kind": "mlp_dag", "topology": "2_12_012", "width": 256, "classes": 10}),
            input: InputShape {
                channels: 3,
                height: 32,
                width: 32,
            },
            batch: 128,
            loss: LossKind::CrossEntropy,
            optimizer: sgd,
            lr: 0.05,
        },
        // Every NAS-Bench-201 op appears once or more: conv3x3, conv1x1, avg pool, skip.
        "nb201" => Case {
            spec: json!({"kind": "nb201",
                "cell": "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|",
                "channels": 16, "cells_per_stage": 1, "classes": 10}),
            input: InputShape {
                channels: 3,
                height: 32,
                width: 32,
            },
            batch: 64,
            loss: LossKind::CrossEntropy,
            optimizer: sgd,
            lr: 0.1,
        },
        "fno2d" => Case {
            spec: json!({"kind": "fno2d", "width": 32, "modes": [12, 12], "layers": 4,
                "head_width": 128, "out_channels": 1}),
            input: InputShape {
                channels: 1,
                height: 64,
                width: 64,
            },
            batch: 8,
            loss: LossKind::Mse,
            optimizer: OptimizerSpec::Adamw {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 1e-4,
            },
            lr: 1e-3,
        },
        other => return Err(format!("unknown model {other:?}; use mlp, nb201 or fno2d")),
    })
}

/// A `kB` field of /proc/self/status, in MiB.
fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn flag(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a non-negative integer")),
    }
}

fn main() -> Result<(), String> {
    // The same allocator settings as the engine binary (engine/src/main.rs).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: train_bench <mlp|nb201|fno2d> <steps> [--warmup N] [--dfdx-cache]";
    let model_name = args.get(1).ok_or(usage)?.clone();
    let steps: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .filter(|&s| s > 0)
        .ok_or(usage)?;
    let warmup = flag(&args, "--warmup", 3)?;
    let c = case(&model_name)?;

    let dev = Dev::default();
    let dfdx_cache = args.iter().any(|a| a == "--dfdx-cache");
    if dfdx_cache {
        use dfdx::tensor::Cache;
        dev.try_enable_cache().map_err(|e| format!("{e:?}"))?;
    }
    let spec = ModelSpec::from_json(c.spec.clone()).map_err(|e| e.to_string())?;
    let mut model: Model<f32> =
        Model::build(&spec, c.input, VarBuilder::new(&dev, &Init::default(), 0))
            .map_err(|e| e.to_string())?;
    let mut opt = Optimizer::new(c.optimizer.clone(), vec![]).map_err(|e| e.to_string())?;

    // One fixed batch: inputs U[-1, 1), labels or a target field.
    let mut rng = StdRng::seed_from_u64(1);
    let InputShape {
        channels,
        height,
        width,
    } = c.input;
    let n_in = c.batch * channels * height * width;
    let xs: Vec<f32> = (0..n_in).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let x = from_vec(&dev, xs, (c.batch, channels, height, width)).map_err(|e| e.to_string())?;
    let target = match c.loss {
        LossKind::CrossEntropy => {
            Target::Labels((0..c.batch).map(|_| rng.gen_range(0..10)).collect())
        }
        _ => {
            let per: usize = model.output_shape().iter().product();
            let ys: Vec<f32> = (0..c.batch * per)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            Target::Values(from_vec(&dev, ys, (c.batch, per)).map_err(|e| e.to_string())?)
        }
    };
    let mut ctx = ForwardCtx::train(0);
    let rss_before = proc_status_mib("VmRSS:");

    let mut step = 0u64;
    let mut run = |n: usize, step: &mut u64| -> Result<f64, String> {
        let mut last = f64::NAN;
        for _ in 0..n {
            let r = train_step(
                &mut model,
                &mut opt,
                x.clone(),
                &target,
                c.loss,
                c.lr,
                None,
                &mut ctx,
                *step,
            )
            .map_err(|e| e.to_string())?;
            *step += 1;
            last = r.loss;
        }
        Ok(last)
    };
    let first_loss = run(warmup, &mut step)?;
    let start = Instant::now();
    let last_loss = run(steps, &mut step)?;
    let seconds = start.elapsed().as_secs_f64();

    let out = json!({
        "impl": "engine",
        "model": model_name,
        "batch": c.batch,
        "params": model.num_trainable(),
        "warmup": warmup,
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps as f64 / seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": proc_status_mib("VmHWM:"),
        "loss_after_warmup": first_loss,
        "loss_last": last_loss,
        "rayon_threads": rayon::current_num_threads(),
        "dfdx_cache": dfdx_cache,
    });
    println!("{out}");
    Ok(())
}
