//! `engine report`: tables and plots from the cache only, complete or not at all.

use std::path::Path;
use std::process::{Command, Output};

fn engine(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .current_dir(dir)
        .args(args)
        .env_remove("ENGINE_CACHE_DIR")
        .output()
        .unwrap()
}

/// Metric value = N * 10 + seed, so every cell's mean and spread is known exactly.
const PIPELINE: &str = r#"
name: rep
stages:
  fit:
    op: shell
    matrix: {N: [8, 16], init: [scratch, pretrained], seed: [0, 1]}
    cmd: "echo '{\"score\": '$(( ${matrix.N} * 10 + ${matrix.seed} ))'}' > $ENGINE_OUT/metrics.json"
  noise:
    op: shell
    cmd: "echo '{\"seed_tau\": 0.75, \"seed_tau_se\": 0.05}' > $ENGINE_OUT/metrics.json"
report:
  title: Scores
  tables:
    - name: by_n
      stage: fit
      rows: N
      columns: init
      metric: score
      digits: 2
      paper: "the paper says something"
      noise: {stage: noise, metric: seed_tau, se: seed_tau_se, label: seed-vs-seed tau}
    - name: unmeasured
      stage: noise
      metric: seed_tau
      noise: {stage: noise, metric: seed_tau_of_nothing, label: other noise}
  plots:
    - name: curve
      stage: fit
      x: N
      y: score
      series: init
      log_x: true
"#;

#[test]
fn a_report_names_missing_stages_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), PIPELINE).unwrap();
    let out = engine(dir.path(), &["report", "p.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fit[N=8,init=scratch,seed=0]"), "{err}");
    assert!(err.contains("never run"), "{err}");
    assert!(
        !dir.path().join("reports").exists(),
        "a partial report was written"
    );
    // Partly run: only the missing instances are named.
    let run = engine(
        dir.path(),
        &["run", "p.yaml", "--set", "stages.fit.matrix.N=[8]"],
    );
    assert!(run.status.success());
    let out = engine(dir.path(), &["report", "p.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fit[N=16,init=scratch,seed=1]"), "{err}");
    assert!(!err.contains("fit[N=8,init=scratch,seed=1]"), "{err}");
}

#[test]
fn a_report_aggregates_seeds_and_draws_plots() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), PIPELINE).unwrap();
    assert!(engine(dir.path(), &["run", "p.yaml"]).status.success());
    let out = engine(dir.path(), &["report", "p.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout);
    // N=8: seeds give 80 and 81: mean 80.5, sample std 0.71.
    assert!(
        md.contains("| 8 | 80.50 ± 0.71 (n=2) | 80.50 ± 0.71 (n=2) |"),
        "{md}"
    );
    assert!(md.contains("| 16 | 160.50 ± 0.71 (n=2) |"), "{md}");
    assert!(md.contains("**Paper:** the paper says something"));
    assert!(
        md.contains(
            "**Noise, same run:** seed-vs-seed tau = 0.75 (standard error 0.05) (stage `noise`)"
        ),
        "{md}"
    );
    // A table without `rows` has one row, named after the stage; a noise metric no instance
    // recorded is reported as not measured.
    assert!(
        md.contains("| stage | seed_tau |") && md.contains("| noise | 0.7500 |"),
        "{md}"
    );
    assert!(
        md.contains("other noise = not measured (stage `noise` recorded no `seed_tau_of_nothing`"),
        "{md}"
    );
    assert!(md.contains("Provenance"));
    let folder = dir.path().join("reports/rep");
    for f in ["report.md", "curve.svg", "curve.png"] {
        let meta = std::fs::metadata(folder.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(meta.len() > 100, "{f} is empty");
    }
    let png = std::fs::read(folder.join("curve.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let html = engine(
        dir.path(),
        &["report", "p.yaml", "--format", "html", "--out", "html"],
    );
    assert!(html.status.success());
    let text = std::fs::read_to_string(dir.path().join("html/report.html")).unwrap();
    assert!(text.contains("<table>") && text.contains("curve.svg"));
}

#[test]
fn a_bad_report_section_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let bad = PIPELINE.replace("rows: N", "rows: n_samples");
    std::fs::write(dir.path().join("p.yaml"), bad).unwrap();
    let out = engine(dir.path(), &["report", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no matrix variable 'n_samples'"), "{err}");
    let typo = PIPELINE.replace("metric: score", "metrc: score");
    std::fs::write(dir.path().join("p.yaml"), typo).unwrap();
    let out = engine(dir.path(), &["report", "p.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrc"));
}

/// A metric some instances leave out (undefined for that run) shows as "–" with the stages
/// named; one that no instance records is a misspelt name, and an error.
#[test]
fn an_undefined_metric_is_shown_as_such_and_a_missing_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = r#"
name: und
stages:
  fit:
    op: shell
    matrix: {N: [1, 2]}
    cmd: "if [ ${matrix.N} = 1 ]; then echo '{\"r\": 0.5, \"n\": 1}'; else echo '{\"n\": 2}'; fi > $ENGINE_OUT/metrics.json"
report:
  tables:
    - {name: r, stage: fit, rows: N, metric: r, digits: 2}
"#;
    std::fs::write(dir.path().join("p.yaml"), p).unwrap();
    assert!(engine(dir.path(), &["run", "p.yaml"]).status.success());
    let out = engine(dir.path(), &["report", "p.yaml"]);
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        md.contains("| 1 | 0.50 |") && md.contains("| 2 | – |"),
        "{md}"
    );
    assert!(
        md.contains("not recorded (undefined for that run) by `fit[N=2]`"),
        "{md}"
    );
    std::fs::write(
        dir.path().join("p.yaml"),
        p.replace("metric: r,", "metric: rr,"),
    )
    .unwrap();
    let out = engine(dir.path(), &["report", "p.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("recorded no metric 'rr'"),
        "{err}"
    );
    assert!(err.contains("its metrics are: n, r"), "{err}");
}
