//! Smoke-size run of `pipelines/operator_learning.yaml` through the real `engine` binary: the
//! real file shrunk with `--set` (8 x 8 grid, tiny model, 1-2 epochs), then `engine report`,
//! a one-param rerun that must recompute only that branch, and a report on a missing stage.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/paper.rs"]
mod paper;

use paper::{all_stages as stages, metric};

const PIPELINE: &str = "operator_learning.yaml";

fn engine<S: AsRef<OsStr>>(args: &[&str], cache: &Path, sets: &[S]) -> Output {
    paper::engine(args, &paper::pipeline(PIPELINE), cache, sets)
}

fn run<S: AsRef<OsStr>>(cache: &Path, sets: &[S]) -> Value {
    paper::run(&paper::pipeline(PIPELINE), cache, sets)
}

/// Smoke sizes; `min_steps` off, so that a changed `finetune_epochs` changes the models.
fn small() -> Vec<String> {
    paper::operator_smoke_sets(&["vars.finetune_min_steps=1"])
}

#[test]
fn operator_learning_pipeline_runs_reports_and_reruns_one_branch() {
    let started = Instant::now();
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let sets = small();
    let r = run(&cache, &sets);
    let cold = started.elapsed();
    assert!(
        cold < Duration::from_secs(60),
        "cold smoke run took {cold:?}"
    );
    // 2 pdes x (4 generate + 3 dataset + 4 pretrain + 2 N x 2 init x 2 seeds + 2 J x 2 seeds).
    assert_eq!(stages(&r).len(), 2 * (4 + 3 + 4 + 8 + 4), "{r:#}");
    assert!(stages(&r).iter().all(|s| s["status"] == "ran"));
    // The pretrained init loaded the encoder (lift + 1 Fourier layer), scratch loaded its own
    // untrained encoder the same way.
    let pre = metric(
        &r,
        "finetune[pde=poisson,N=16,init=pretrained,seed=0]",
        "init_tensors",
    );
    let scr = metric(
        &r,
        "finetune[pde=poisson,N=16,init=scratch,seed=0]",
        "init_tensors",
    );
    assert!(pre >= 3.0 && pre == scr, "{pre} {scr}");
    let steps = metric(
        &r,
        "pretrain[pde=helmholtz,init=pretrained,mask_ratio=0.6]",
        "steps",
    );
    assert_eq!(steps, 2.0 * (32f64 / 8.0).ceil());
    assert_eq!(
        metric(
            &r,
            "pretrain[pde=helmholtz,init=scratch,mask_ratio=0.6]",
            "steps"
        ),
        0.0
    );
    // r = 0.6 on 8 x 8 masks floor(38.4) = 38 pixels.
    assert_eq!(
        metric(
            &r,
            "pretrain[pde=poisson,init=pretrained,mask_ratio=0.6]",
            "masked_pixels"
        ),
        38.0
    );
    // J = 0 is no ICL: the two errors agree; J = 2 uses K = floor(20 sqrt 2) = 28 points.
    let name = "icl[pde=poisson,J=0,seed=0]";
    assert_eq!(metric(&r, name, "rel_l2"), metric(&r, name, "rel_l2_icl"));
    assert_eq!(metric(&r, "icl[pde=poisson,J=2,seed=1]", "k"), 28.0);
    assert!(metric(&r, "icl[pde=helmholtz,J=2,seed=1]", "rel_l2_icl").is_finite());

    let out = ws.path().join("report");
    let rep = engine(&["report", "--out", out.to_str().unwrap()], &cache, &sets);
    assert!(
        rep.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rep.stdout),
        String::from_utf8_lossy(&rep.stderr)
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("rel_l2_vs_n_poisson") && md.contains("ood_rel_l2_with_icl"),
        "{md}"
    );
    assert!(
        md.contains("0.259"),
        "the paper's statement is beside the table: {md}"
    );
    assert!(out.join("ood_vs_j.svg").exists());

    // One changed fine-tuning param: only finetune reruns, with the icl stages that read the
    // changed models; data and pretraining stay cached.
    let mut one = sets.clone();
    one.push("vars.finetune_epochs=3".into());
    let r3 = run(&cache, &one);
    for s in stages(&r3) {
        let n = s["name"].as_str().unwrap();
        let ran = s["status"] == "ran";
        let should = n.starts_with("finetune[") || n.starts_with("icl[");
        assert_eq!(ran, should, "{n}: {}", s["status"]);
    }

    // A report over a pipeline whose stage has no cached result names that stage.
    let mut missing = sets.clone();
    missing.push("vars.Js=[0,2,4]".into());
    missing.push("vars.ood_pool=4".into());
    let bad = engine(
        &["report", "--out", out.to_str().unwrap()],
        &cache,
        &missing,
    );
    assert_eq!(bad.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(text.contains("icl[pde=poisson,J=4"), "{text}");
}
