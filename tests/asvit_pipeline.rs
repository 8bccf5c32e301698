//! Smoke-size run of `pipelines/asvit.yaml` through the real `engine` binary: the real file,
//! shrunk with `--set`, in its own cache folder; values are checked, not just exit codes.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use serde_json::Value;

#[path = "common/paper.rs"]
mod paper;

use paper::metric;

const PIPELINE: &str = "asvit.yaml";

fn engine<S: AsRef<OsStr>>(args: &[&str], cache: &Path, sets: &[S]) -> Output {
    paper::engine(args, &paper::pipeline(PIPELINE), cache, sets)
}

fn run<S: AsRef<OsStr>>(cache: &Path, sets: &[S]) -> Value {
    paper::run(&paper::pipeline(PIPELINE), cache, sets)
}

#[test]
fn asvit_searches_scales_and_retokenizes() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let sets = [
        "stages.data.op=data.synthetic_images",
        "stages.data.samples=200",
        "vars.size=16",
        "vars.hidden=8",
        "vars.probe={hidden: 8, image_size: 16, points: 8, batch: 4, repeats: 1}",
        "vars.tau_samples=3",
        "vars.tau_topologies=[0, 1, 2]",
        "vars.tau_seeds=[0, 1]",
        "vars.search_steps=2",
        "vars.scale_steps=1",
        "vars.budget=100000000",
        "vars.target=90000000",
        "vars.members=[0, 1]",
        "vars.epochs=2",
        "vars.retokenize=[[1, 2], [2, 1]]",
        "vars.batch_size=32",
    ];
    let r = run(&cache, &sets);
    assert_eq!(metric(&r, "sample", "num_scored"), 3.0);
    // 2 steps x 2 draws, plus the policy's argmax when it was not drawn.
    assert!(metric(&r, "seed_search", "num_scored") <= 5.0);
    let tau = metric(&r, "tau[accuracy=test_accuracy]", "tau_length_distortion");
    assert!((-1.0..=1.0).contains(&tau), "{tau}");
    assert_eq!(metric(&r, "tau[accuracy=test_accuracy]", "n"), 3.0);
    // Two seeds per topology: the noise floor is measured in the same run.
    let seed_tau = metric(&r, "tau[accuracy=test_accuracy]", "seed_tau");
    assert!((-1.0..=1.0).contains(&seed_tau), "{seed_tau}");
    // One growth step: seed + one member, each one block deeper than the last.
    assert_eq!(metric(&r, "scale", "members"), 2.0);
    let seed_params = metric(&r, "train_family[member=0]", "params");
    let grown = metric(&r, "train_family[member=1]", "params");
    assert!(grown > seed_params, "{seed_params} -> {grown}");
    assert_eq!(
        grown,
        metric(&r, "scale", "final_params"),
        "train built the family's model"
    );
    assert_eq!(grown, metric(&r, "train_family_retok[member=1]", "params"));
    // 16 px: 4 x 4 tokens at factor 1, 2 x 2 at factor 2.
    assert_eq!(
        metric(&r, "train_family_retok[member=1]", "tokens_first_epoch"),
        4.0
    );
    assert_eq!(
        metric(&r, "train_family_retok[member=1]", "tokens_last_epoch"),
        16.0
    );
    assert_eq!(
        metric(&r, "train_family[member=1]", "tokens_first_epoch"),
        16.0
    );
    assert!(
        metric(
            &r,
            "train_family_retok[member=0]",
            "retokenize_fixed_estimate_time_s"
        ) > 0.0
    );
    let frac = metric(
        &r,
        "train_family_retok[member=1]",
        "retokenize_macs_fraction",
    );
    assert!(frac > 0.0 && frac < 1.0, "{frac}");

    let out = ws.path().join("report");
    let o = engine(&["report", "--out", out.to_str().unwrap()], &cache, &sets);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("MACs per image") && md.contains("tau_length_distortion"),
        "{md}"
    );

    // A second run reuses everything.
    let r = run(&cache, &sets);
    let ran: Vec<&Value> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ran")
        .collect();
    assert!(ran.is_empty(), "{ran:?}");
}
