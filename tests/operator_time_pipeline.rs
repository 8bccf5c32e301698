//! Smoke-size run of `pipelines/operator_learning_time.yaml` (Navier-Stokes and
//! reaction-diffusion) through the real `engine` binary: the real file shrunk with `--set` (8 x 8
//! grid, short window, tiny model, 2 epochs), then `engine report` and a one-param rerun that
//! must recompute only that branch.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/paper.rs"]
mod paper;

use paper::{all_stages as stages, metric};

const PIPELINE: &str = "operator_learning_time.yaml";

fn engine<S: AsRef<OsStr>>(args: &[&str], cache: &Path, sets: &[S]) -> Output {
    paper::engine(args, &paper::pipeline(PIPELINE), cache, sets)
}

fn run<S: AsRef<OsStr>>(cache: &Path, sets: &[S]) -> Value {
    paper::run(&paper::pipeline(PIPELINE), cache, sets)
}

fn small() -> Vec<String> {
    paper::operator_smoke_sets(&[
        "vars.ns_t_end=0.1",
        "vars.rd_t_end=0.1",
        "vars.finetune_min_steps=1",
    ])
}

#[test]
fn time_dependent_pipeline_runs_reports_and_reruns_one_branch() {
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
    // NS: 4 generate + 3 dataset + 4 pretrain + 2 N x 2 init x 2 seeds + 2 J x 2 seeds;
    // reaction-diffusion: 2 generate + 1 dataset + 4 pretrain + 8 fine-tunes.
    assert_eq!(
        stages(&r).len(),
        (4 + 3 + 4 + 8 + 4) + (2 + 1 + 4 + 8),
        "{r:#}"
    );
    assert!(stages(&r).iter().all(|s| s["status"] == "ran"));
    for pde in ["ns", "rd"] {
        // Pretrained and scratch fine-tuning load the same encoder tensors.
        let pre = metric(
            &r,
            &format!("{pde}_finetune[N=16,init=pretrained,seed=0]"),
            "init_tensors",
        );
        let scr = metric(
            &r,
            &format!("{pde}_finetune[N=16,init=scratch,seed=0]"),
            "init_tensors",
        );
        assert!(pre >= 3.0 && pre == scr, "{pde}: {pre} {scr}");
        // r = 0.6 on 8 x 8 masks floor(38.4) = 38 pixels, whatever the channel count.
        let masked = metric(
            &r,
            &format!("{pde}_pretrain[init=pretrained,mask_ratio=0.6]"),
            "masked_pixels",
        );
        assert_eq!(masked, 38.0);
        let err = metric(
            &r,
            &format!("{pde}_finetune[N=16,init=pretrained,seed=1]"),
            "test_rel_l2",
        );
        assert!(err.is_finite() && err > 0.0, "{pde}: {err}");
    }
    // J = 0 is no ICL; J = 2 uses K = floor(20 sqrt 2) = 28 points.
    let name = "ns_icl[J=0,seed=0]";
    assert_eq!(metric(&r, name, "rel_l2"), metric(&r, name, "rel_l2_icl"));
    assert_eq!(metric(&r, "ns_icl[J=2,seed=1]", "k"), 28.0);

    let out = ws.path().join("report");
    let rep = engine(&["report", "--out", out.to_str().unwrap()], &cache, &sets);
    assert!(
        rep.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rep.stdout),
        String::from_utf8_lossy(&rep.stderr)
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for table in ["ns_rel_l2_vs_n", "rd_rel_l2_vs_n", "ns_ood_rel_l2_with_icl"] {
        assert!(md.contains(table), "{table} missing: {md}");
    }
    assert!(out.join("rd_data_efficiency.svg").exists());

    // One changed fine-tuning param: only the fine-tunes rerun, with the ICL stages that read
    // the changed models; data and pretraining stay cached.
    let mut one = sets.clone();
    one.push("vars.finetune_epochs=3".into());
    let r3 = run(&cache, &one);
    for s in stages(&r3) {
        let n = s["name"].as_str().unwrap();
        let ran = s["status"] == "ran";
        let should = n.contains("_finetune[") || n.starts_with("ns_icl[");
        assert_eq!(ran, should, "{n}: {}", s["status"]);
    }
}
