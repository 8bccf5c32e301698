//! Smoke-size runs of the architecture-aware pipelines (`pipelines/arch_aware_lr.yaml`,
//! `nb201_rerank.yaml`, `connectivity.yaml`) through the real `engine` binary: the real files,
//! shrunk with `--set`, each in its own cache folder; values are checked, not just exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn pipeline(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipelines")
        .join(name)
}

fn engine(args: &[&str], pipeline: &Path, cache: &Path, sets: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
    cmd.args(args).arg(pipeline).arg("--cache-dir").arg(cache);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.output().expect("the engine binary runs")
}

/// `engine run --json -j 2`; panics with both streams on failure.
fn run(pipeline: &Path, cache: &Path, sets: &[&str]) -> Value {
    let out = engine(&["run", "--json", "-j", "2"], pipeline, cache, sets);
    assert!(
        out.status.success(),
        "engine run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

/// `engine report --out DIR`: the Markdown text, or the error output.
fn report(pipeline: &Path, cache: &Path, out: &Path, sets: &[&str]) -> Result<String, String> {
    let mut args = vec!["report", "--out"];
    let out_s = out.to_str().unwrap();
    args.push(out_s);
    let o = engine(&args, pipeline, cache, sets);
    if o.status.success() {
        Ok(std::fs::read_to_string(out.join("report.md")).unwrap())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn stages<'a>(r: &'a Value, prefix: &str) -> Vec<&'a Value> {
    r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let n = s["name"].as_str().unwrap();
            n == prefix || n.starts_with(&format!("{prefix}["))
        })
        .collect()
}

fn stage<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {r}"))
}

fn metric(r: &Value, name: &str, key: &str) -> f64 {
    stage(r, name)["metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("stage {name} has no metric {key}: {}", stage(r, name)))
}

#[test]
fn arch_aware_lr_predicts_chain_lrs_by_the_formula_and_correlates() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let p = pipeline("arch_aware_lr.yaml");
    let sets = [
        "vars.samples=300",
        "vars.width=8",
        "vars.cnn_width=2",
        "vars.seeds=[0]",
        "vars.lr_grid=[0.05, 0.4, 3.2]",
        "vars.chains=[\"2_02_002\", \"2_02_002_0002_00002\"]",
        "vars.mlp_topologies=[\"2_02_002\", \"2_21_112\"]",
        "vars.cnn_topologies=[\"2_02_002\"]",
        "vars.kernels=[3, 7]",
    ];
    let r = run(&p, &cache, &sets);
    // 3 grid points for each of 2 bases, 2 chains, 2 topologies and 2 CNN cells.
    assert_eq!(stages(&r, "probe_mlp_depth").len(), 6);
    assert_eq!(stages(&r, "probe_cnn").len(), 6);
    let base = metric(&r, "pick_base_mlp", "lr_star");
    assert!([0.05, 0.4, 3.2].contains(&base), "{base}");
    // A chain of depth d: one path with L = d + 3; base "1": L = 3. eta* = eta_base sqrt(27 / L^3).
    for (topology, d) in [("2_02_002", 3.0f64), ("2_02_002_0002_00002", 5.0)] {
        let name = format!("pick_mlp_depth[topology={topology}]");
        let want = base * (27.0 / (d + 3.0).powi(3)).sqrt();
        let got = metric(&r, &name, "lr_predicted");
        assert!((got - want).abs() < 1e-12 * want, "{name}: {got} vs {want}");
        let probed = metric(&r, &name, "lr_star");
        assert!([0.05, 0.4, 3.2].contains(&probed), "{probed}");
    }
    // CNN k = 7 against k = 3: the same cell predicts 3/7 of the LR.
    let k3 = metric(&r, "pick_cnn[topology=2_02_002,kernel=3]", "lr_predicted");
    let k7 = metric(&r, "pick_cnn[topology=2_02_002,kernel=7]", "lr_predicted");
    assert!((k7 / k3 - 3.0 / 7.0).abs() < 1e-12, "{k3} {k7}");
    // Pearson r, where defined (two points whose probed LRs differ), is within [-1, 1].
    let mut all_defined = true;
    for family in ["mlp_depth", "mlp_topology", "cnn"] {
        let m = &stage(&r, &format!("correlation[family={family}]"))["metrics"];
        assert_eq!(m["n"], 2.0, "{m}");
        match m["pearson_r"].as_f64() {
            Some(v) => assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&v), "{m}"),
            None => all_defined = false,
        }
    }
    let out = ws.path().join("report");
    match report(&p, &cache, &out, &sets) {
        Ok(md) => {
            assert!(all_defined);
            assert!(md.contains("pearson_r") && md.contains("0.962"), "{md}");
            assert!(out.join("depth_predicted_vs_probed.svg").exists());
        }
        // With 2 points per family a probed LR can be constant: r is then undefined, not made up.
        Err(e) => assert!(!all_defined && e.contains("pearson_r"), "{e}"),
    }
}

#[test]
fn nb201_rerank_runs_both_recipes_and_trains_only_added_cells() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let p = pipeline("nb201_rerank.yaml");
    let small = [
        "vars.samples=240",
        "vars.channels=2",
        "vars.epochs=1",
        "vars.top_k_table=[100]",
    ];
    let three = "vars.archs=[\"3_30_243\", \"3_23_241\", \"4_12_104\"]";
    let mut sets: Vec<&str> = small.to_vec();
    sets.push(three);
    let r = run(&p, &cache, &sets);
    assert_eq!(stages(&r, "train_benchmark").len(), 6);
    assert_eq!(stages(&r, "train_arch_aware").len(), 6);
    // "3_30_243": paths 0-3 (conv1x1), 0-1-3 (conv3x3, pool), 0-2-3 (conv3x3, conv3x3):
    // d = 1, 1, 2 -> L = 2, 2, 3 -> sum L^3 = 43; base "0_00_100": L = [1].
    let lr = metric(&r, "train_arch_aware[arch=3_30_243,seed=0]", "lr");
    assert!((lr - 0.46 / 43f64.sqrt()).abs() < 1e-12, "{lr}");
    assert_eq!(
        metric(&r, "train_benchmark[arch=3_30_243,seed=0]", "lr"),
        0.1
    );
    let tau = metric(&r, "rerank", "tau_all");
    assert!((-1.0..=1.0).contains(&tau), "{tau}");
    assert_eq!(metric(&r, "rerank", "num_archs"), 3.0);
    let md = report(&p, &cache, &ws.path().join("report"), &sets).unwrap();
    assert!(
        md.contains("tau_vs_top_k") && md.contains("0.85-0.9"),
        "{md}"
    );

    // One more cell: only its 2 x 2 train stages run.
    let four = "vars.archs=[\"3_30_243\", \"3_23_241\", \"4_12_104\", \"2_44_120\"]";
    let mut sets: Vec<&str> = small.to_vec();
    sets.push(four);
    let r = run(&p, &cache, &sets);
    let ran: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ran" && s["op"] == "train")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(ran.len(), 4, "{ran:?}");
    assert!(ran.iter().all(|n| n.contains("arch=2_44_120")), "{ran:?}");
    assert_eq!(stage(&r, "data")["status"], "cached");
    assert_eq!(metric(&r, "rerank", "num_archs"), 4.0);
}

#[test]
fn connectivity_orders_the_bounds_and_filters_the_nb201_space() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let p = pipeline("connectivity.yaml");
    let sets = [
        "vars.samples=200",
        "vars.width=8",
        "vars.epochs=2",
        "vars.epoch_points=[1, 2]",
        "vars.seeds=[0]",
    ];
    let r = run(&p, &cache, &sets);
    let bound = |cell: &str| metric(&r, &format!("nngp[cell={cell}]"), "lambda_min_bound");
    // connectivity-convergence.md §1: chain < parallel < mixed.
    let (chain, parallel, mixed) = (bound("2_02_002"), bound("1_10_222"), bound("2_21_112"));
    assert!(
        chain < parallel && parallel < mixed,
        "{chain} {parallel} {mixed}"
    );
    for b in ["space", "paper_nb201", "reference_nb201"] {
        let name = format!("nas_filter[box={b}]");
        assert_eq!(metric(&r, &name, "space_size"), 15625.0);
        let f = metric(&r, &name, "fraction_kept");
        assert!(f > 0.0 && f < 1.0, "{name}: {f}");
    }
    let first = metric(&r, "loss_curve[cell=2_02_002,epoch=1]", "train_loss");
    assert!(first.is_finite() && first > 0.0);
    let md = report(&p, &cache, &ws.path().join("report"), &sets).unwrap();
    assert!(
        md.contains("lambda_min_bound") && md.contains("fraction_kept"),
        "{md}"
    );
}
