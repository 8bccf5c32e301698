//! Experiments, targets and selectors, strict overrides, tables, exports, paths and checkouts,
//! through the real binary; and the CLI defects found by using it as a new user would.

mod common;

use std::process::Command;

use common::{stage, Workspace};
use serde_json::Value;

/// A sweep: `train` writes metrics from its matrix values and vars, so every number below is
/// known in advance. Every execution appends the instance's name to runs.log.
const SWEEP: &str = r#"
name: sweep
vars:
  lr: 0.1
  epochs: 3
  opt: {kind: sgd, momentum: 0.9}
stages:
  data:
    op: shell
    cmd: "echo data >> runs.log; seq 10 > $ENGINE_OUT/d.txt"
  train:
    op: shell
    matrix: {seed: [0, 1, 2], width: [4, 8]}
    inputs: {data: data}
    cmd: >-
      echo train-${matrix.seed}-${matrix.width} >> runs.log;
      echo "{\"acc\": $(python3 -c "print(0.5 + ${vars.lr} * ${matrix.width} / 10 + ${matrix.seed} / 100)"), \"steps\": $((${vars.epochs} * 10))}" > $ENGINE_OUT/metrics.json;
      echo '[{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]' > $ENGINE_OUT/history.json
  summary:
    op: shell
    inputs: {runs: "train[*]"}
    cmd: "echo summary >> runs.log; echo '{\"n\": 6}' > $ENGINE_OUT/metrics.json"
"#;

fn runs(ws: &Workspace) -> Vec<String> {
    let mut lines = ws.lines("runs.log");
    lines.sort();
    let _ = std::fs::remove_file(ws.join("runs.log"));
    lines
}

fn ok(ws: &Workspace, args: &[&str]) -> String {
    let out = ws.engine(args);
    out.expect_code(0);
    out.stdout
}

fn bad(ws: &Workspace, args: &[&str]) -> String {
    let out = ws.engine(args);
    out.expect_code(2);
    out.stderr
}

fn sweep() -> Workspace {
    Workspace::new(SWEEP)
}

fn records(csv_or_json: &str) -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(csv_or_json).expect("a JSON list of records")
}

#[test]
fn named_runs_are_listed_shown_diffed_and_removed() {
    let ws = sweep();
    ok(&ws, &["run", "pipeline.yaml", "--name", "base"]);
    assert_eq!(runs(&ws).len(), 8);
    ok(
        &ws,
        &[
            "run",
            "pipeline.yaml",
            "--set",
            "vars.lr=0.2",
            "--name",
            "lr02",
        ],
    );
    // data is shared; the 6 trainings and the summary ran again.
    assert_eq!(runs(&ws).len(), 7);
    ok(
        &ws,
        &[
            "run",
            "pipeline.yaml",
            "--set",
            "vars.opt.kind=adam",
            "--name",
            "adam",
        ],
    );
    assert!(
        runs(&ws).is_empty(),
        "vars.opt is used by no stage: all cached"
    );

    let list = records(&ok(
        &ws,
        &["exp", "list", "pipeline.yaml", "--format", "json"],
    ));
    let names: Vec<&str> = list
        .iter()
        .map(|r| r["experiment"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "lr02", "adam"]);
    assert_eq!(list[0]["ran"], 8);
    assert_eq!(list[1]["ran"], 7);
    assert_eq!(list[1]["cached"], 1);
    assert_eq!(list[2]["cached"], 8);
    assert_eq!(list[1]["overrides"], "vars.lr=0.2");

    // Only the params that differ are columns; the default metrics are the final stage's.
    let show = records(&ok(
        &ws,
        &["exp", "show", "pipeline.yaml", "--format", "json"],
    ));
    let columns: Vec<&String> = show[0].as_object().unwrap().keys().collect();
    assert!(columns.contains(&&"vars.lr".to_string()), "{columns:?}");
    assert!(columns.contains(&&"vars.opt.kind".to_string()));
    assert!(!columns.contains(&&"vars.epochs".to_string()));
    assert!(!columns.contains(&&"vars.opt.momentum".to_string()));
    assert_eq!(show[0]["summary.n"], 6);
    assert_eq!(show[1]["vars.lr"], 0.2);

    // A selector with variables in another order, sorting by a metric, largest first.
    let show = records(&ok(
        &ws,
        &[
            "exp",
            "show",
            "pipeline.yaml",
            "--metrics",
            "train[width=8,seed=2].acc,steps",
            "--sort-by",
            "train[seed=2,width=8].acc",
            "--desc",
            "--format",
            "json",
        ],
    ));
    let order: Vec<&str> = show
        .iter()
        .map(|r| r["experiment"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["lr02", "base", "adam"]);
    let acc = show[0]["train[seed=2,width=8].acc"].as_f64().unwrap();
    assert!((acc - (0.5 + 0.2 * 0.8 + 0.02)).abs() < 1e-9, "{acc}");
    assert!(show[0].get("train[seed=1,width=8].acc").is_none());
    assert_eq!(show[0]["train[seed=1,width=4].steps"], 30);

    // --only-changed drops metrics equal everywhere (steps, n) but keeps acc.
    let show = records(&ok(
        &ws,
        &[
            "exp",
            "show",
            "pipeline.yaml",
            "--only-changed",
            "--metrics",
            "acc,steps",
            "--format",
            "json",
        ],
    ));
    let columns: Vec<&String> = show[0].as_object().unwrap().keys().collect();
    assert!(columns.iter().any(|c| c.ends_with(".acc")), "{columns:?}");
    assert!(
        !columns.iter().any(|c| c.ends_with(".steps")),
        "{columns:?}"
    );

    let csv = ok(&ws, &["exp", "show", "pipeline.yaml", "--format", "csv"]);
    assert!(
        csv.starts_with("experiment,created,vars.lr,vars.opt.kind,summary.n\n"),
        "{csv}"
    );
    let md = ok(&ws, &["exp", "show", "pipeline.yaml", "--format", "md"]);
    assert!(md.starts_with("| experiment |"), "{md}");

    let diff = ok(&ws, &["exp", "diff", "pipeline.yaml", "base", "lr02"]);
    assert!(diff.contains("vars.lr: 0.1 -> 0.2"), "{diff}");
    assert!(diff.contains("1 of 8 share their key"), "{diff}");
    assert!(diff.contains("= data"), "{diff}");
    assert!(
        diff.contains("metric acc: 0.58 -> 0.66  (+0.08, +13.8%)"),
        "{diff}"
    );
    assert!(diff.contains("metric steps: 30 (same)"), "{diff}");
    let json: Value = serde_json::from_str(&ok(
        &ws,
        &["exp", "diff", "pipeline.yaml", "base", "adam", "--json"],
    ))
    .unwrap();
    assert_eq!(json["shared"], 8);

    let e = bad(&ws, &["exp", "diff", "pipeline.yaml", "base", "lr2"]);
    assert!(
        e.contains("there is no experiment 'lr2'") && e.contains("lr02"),
        "{e}"
    );
    let e = bad(&ws, &["exp", "show", "pipeline.yaml", "--sort-by", "nope"]);
    assert!(e.contains("no column 'nope'"), "{e}");
    let e = bad(&ws, &["run", "pipeline.yaml", "--name", "a/b"]);
    assert!(e.contains("not a valid experiment name"), "{e}");

    // gc keeps what an experiment refers to, until it is removed.
    ok(&ws, &["run", "pipeline.yaml", "--set", "vars.lr=0.3"]);
    runs(&ws);
    ok(&ws, &["gc", "--pipeline", "pipeline.yaml"]);
    ok(&ws, &["run", "pipeline.yaml", "--set", "vars.lr=0.2"]);
    assert!(runs(&ws).is_empty(), "lr02's results survived gc");
    ok(&ws, &["exp", "remove", "pipeline.yaml", "lr02"]);
    ok(&ws, &["gc", "--pipeline", "pipeline.yaml"]);
    ok(&ws, &["run", "pipeline.yaml", "--set", "vars.lr=0.2"]);
    assert_eq!(
        runs(&ws).len(),
        7,
        "lr02's results went once it was removed"
    );
    let e = bad(&ws, &["exp", "remove", "pipeline.yaml", "lr02"]);
    assert!(e.contains("no experiment named lr02"), "{e}");
}

#[test]
fn overrides_are_strict_and_inspectable() {
    let ws = sweep();
    let e = bad(&ws, &["run", "pipeline.yaml", "--set", "vars.epoch=3"]);
    assert!(e.contains("the pipeline has no 'vars.epoch'"), "{e}");
    assert!(e.contains("did you mean 'vars.epochs'?"), "{e}");
    assert!(e.contains("+vars.epoch="), "{e}");
    let e = bad(&ws, &["run", "pipeline.yaml", "--set", "vars.opt.knd=adam"]);
    assert!(e.contains("did you mean 'vars.opt.kind'?"), "{e}");
    let e = bad(
        &ws,
        &[
            "run",
            "pipeline.yaml",
            "--set",
            "stages.train.matrix.sed=[1]",
        ],
    );
    assert!(
        e.contains("did you mean 'stages.train.matrix.seed'?"),
        "{e}"
    );
    let e = bad(&ws, &["run", "pipeline.yaml", "--set", "+vars.lr=1"]);
    assert!(e.contains("already set"), "{e}");
    // Adding a key, forcing one, and an inline mapping.
    let config = ok(
        &ws,
        &[
            "config",
            "pipeline.yaml",
            "--set",
            "+vars.extra=5",
            "--set",
            "++vars.lr=0.4",
            "--set",
            "vars.opt={kind: adam, betas: [0.9, 0.99]}",
            "--json",
        ],
    );
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["vars"]["extra"], 5);
    assert_eq!(config["vars"]["lr"], 0.4);
    assert_eq!(config["vars"]["opt"]["betas"][1], 0.99);
    // vars are resolved into the stages.
    let cmd = config["stages"]["train"]["params"]["cmd"].as_str().unwrap();
    assert!(cmd.contains("0.4 *"), "{cmd}");
    // The expanded form lists every instance with its inputs resolved.
    let yaml = ok(&ws, &["config", "pipeline.yaml", "--expand"]);
    let doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let summary = &doc["instances"]["summary"]["inputs"]["runs"];
    assert_eq!(summary.as_sequence().map(|s| s.len()), Some(6), "{yaml}");
    assert_eq!(
        doc["instances"]["train[seed=1,width=8]"]["inputs"]["data"].as_str(),
        Some("data")
    );

    // A params file: its leaves override like --set, and --set wins over it.
    ws.write("params.yaml", "vars:\n  lr: 0.7\n  epochs: 4\n");
    let config: Value = serde_json::from_str(&ok(
        &ws,
        &[
            "config",
            "pipeline.yaml",
            "--params-file",
            "params.yaml",
            "--set",
            "vars.epochs=5",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(config["vars"]["lr"], 0.7);
    assert_eq!(config["vars"]["epochs"], 5);
    ws.write("typo.yaml", "vars:\n  lr: 0.7\n  epoch: 4\n");
    let e = bad(&ws, &["run", "pipeline.yaml", "--params-file", "typo.yaml"]);
    assert!(e.contains("typo.yaml line 3 (vars.epoch)"), "{e}");
    assert!(e.contains("did you mean 'vars.epochs'?"), "{e}");
    // Nothing ran on any of these errors.
    assert!(!ws.join(".engine/cache.db").exists() || runs(&ws).is_empty());
}

#[test]
fn targets_and_selectors_name_instances_everywhere() {
    let ws = sweep();
    // Only the target and what it needs.
    ok(&ws, &["run", "pipeline.yaml", "train[width=8,seed=1]"]);
    assert_eq!(runs(&ws), ["data", "train-1-8"]);
    ok(&ws, &["run", "pipeline.yaml", "train[seed=2,*]"]);
    assert_eq!(runs(&ws), ["train-2-4", "train-2-8"]);
    // A partial selector without `*` takes every match on the command line too.
    let status = ok(&ws, &["status", "pipeline.yaml", "train[seed=0]"]);
    assert_eq!(status.lines().count(), 3, "{status}");
    assert!(
        status.contains("train[seed=0,width=4]  never run"),
        "{status}"
    );
    let e = bad(&ws, &["run", "pipeline.yaml", "train[seed=5]"]);
    assert!(
        e.contains("'seed=5' matches no instance") && e.contains("0, 1, 2"),
        "{e}"
    );
    let e = bad(&ws, &["run", "pipeline.yaml", "trian"]);
    assert!(e.contains("did you mean 'train'?"), "{e}");
    ok(&ws, &["run", "pipeline.yaml"]);
    runs(&ws);
    // --force, show, logs and why take selectors as well.
    ok(
        &ws,
        &["run", "pipeline.yaml", "--force", "train[width=4,*]"],
    );
    assert_eq!(runs(&ws), ["train-0-4", "train-1-4", "train-2-4"]);
    let show: Value = serde_json::from_str(&ok(
        &ws,
        &["show", "pipeline.yaml", "train[width=8,seed=0]", "--json"],
    ))
    .unwrap();
    assert_eq!(show["name"], "train[seed=0,width=8]");
    assert_eq!(show["metrics"]["steps"], 30.0);
    let logs = ok(&ws, &["logs", "pipeline.yaml", "train[seed=1]"]);
    assert!(logs.contains("==> train[seed=1,width=4] <=="), "{logs}");
    let why = ok(&ws, &["why", "pipeline.yaml", "train[width=4,seed=2]"]);
    assert!(why.contains("train[seed=2,width=4]: cached"), "{why}");

    // The stored path of one output, and a checkout of several instances.
    let path = ok(
        &ws,
        &[
            "path",
            "pipeline.yaml",
            "train[seed=0,width=4]",
            "metrics.json",
        ],
    );
    let text = std::fs::read_to_string(path.trim()).unwrap();
    assert!(text.contains("\"steps\": 30"), "{text}");
    let e = bad(
        &ws,
        &["path", "pipeline.yaml", "train[seed=0]", "metrics.json"],
    );
    assert!(e.contains("names 2 instances"), "{e}");
    let e = bad(
        &ws,
        &[
            "path",
            "pipeline.yaml",
            "train[seed=0,width=4]",
            "metric.json",
        ],
    );
    assert!(e.contains("did you mean 'metrics.json'?"), "{e}");
    ok(
        &ws,
        &[
            "checkout",
            "pipeline.yaml",
            "train[seed=1,*]",
            "--to",
            "out",
        ],
    );
    assert_eq!(
        ws.files_under("out"),
        [
            "seed=1,width=4/history.json",
            "seed=1,width=4/metrics.json",
            "seed=1,width=8/history.json",
            "seed=1,width=8/metrics.json"
        ]
    );
    // A user's file is never overwritten without --force.
    ws.write("mine/metrics.json", "mine");
    let e = bad(
        &ws,
        &["checkout", "pipeline.yaml", "summary", "--to", "mine"],
    );
    assert!(e.contains("exist already") && e.contains("--force"), "{e}");
    assert_eq!(ws.read("mine/metrics.json"), "mine");
    ok(
        &ws,
        &[
            "checkout",
            "pipeline.yaml",
            "summary",
            "--to",
            "mine",
            "--force",
        ],
    );
    assert!(ws.read("mine/metrics.json").contains("\"n\": 6"));
    let e = bad(
        &ws,
        &["checkout", "pipeline.yaml", "summary", "--to", ".engine/x"],
    );
    assert!(e.contains("the cache is there"), "{e}");
}

#[test]
fn tables_and_exports_of_stage_instances() {
    let ws = sweep();
    ok(&ws, &["run", "pipeline.yaml"]);
    let table = ok(&ws, &["table", "pipeline.yaml", "train"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "seed  width   acc  steps", "{table}");
    assert_eq!(lines[2], "   0      4  0.54     30", "{table}");
    let mean = records(&ok(
        &ws,
        &[
            "table",
            "pipeline.yaml",
            "train",
            "--mean-over",
            "seed",
            "--metrics",
            "acc",
            "--sort-by",
            "acc",
            "--desc",
            "--format",
            "json",
        ],
    ));
    assert_eq!(mean.len(), 2);
    assert_eq!(mean[0]["width"], 8);
    assert_eq!(mean[0]["n"], 3);
    let (m, s) = (
        mean[0]["acc (mean)"].as_f64().unwrap(),
        mean[0]["acc (std)"].as_f64().unwrap(),
    );
    assert!(
        (m - 0.59).abs() < 1e-9 && (s - 0.01).abs() < 1e-9,
        "{m} {s}"
    );
    let e = bad(
        &ws,
        &["table", "pipeline.yaml", "train", "--mean-over", "sed"],
    );
    assert!(e.contains("did you mean 'seed'?"), "{e}");

    // Export: one row per instance with matrix values, params, metrics, key and status.
    let rows = records(&ok(&ws, &["export", "pipeline.yaml", "--format", "json"]));
    assert_eq!(rows.len(), 8);
    let t = rows
        .iter()
        .find(|r| r["name"] == "train[seed=2,width=8]")
        .unwrap();
    assert_eq!(t["status"], "cached");
    assert_eq!(t["matrix.seed"], 2);
    assert_eq!(t["metrics.steps"], 30);
    assert_eq!(t["op"], "shell");
    assert!(t["params.cmd"].as_str().unwrap().contains("train-2-8"));
    assert_eq!(t["key"].as_str().map(str::len), Some(64));
    assert!(t["duration_s"].as_f64().unwrap() >= 0.0);
    assert!(rows[0]["metrics.acc"].is_null());
    let csv = ok(&ws, &["export", "pipeline.yaml", "summary"]);
    assert_eq!(
        csv.lines().count(),
        1 + 8,
        "summary needs every instance: {csv}"
    );
    assert!(
        csv.starts_with("name,stage,op,op_version,status,key,"),
        "{csv}"
    );
    ok(
        &ws,
        &[
            "export",
            "pipeline.yaml",
            "--format",
            "parquet",
            "--out",
            "e.parquet",
        ],
    );
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(ws.join("e.parquet")).unwrap();
    let reader = SerializedFileReader::new(file).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 8);
    let fields: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    assert!(fields.contains(&"metrics.acc".to_string()), "{fields:?}");
    let e = bad(&ws, &["export", "pipeline.yaml", "--format", "parquet"]);
    assert!(e.contains("--out"), "{e}");
}

/// `engine ... | head -1` must never panic with "Broken pipe".
#[test]
fn printing_into_a_closed_pipe_does_not_panic() {
    let ws = sweep();
    ok(&ws, &["run", "pipeline.yaml"]);
    // Enough stages that the output outgrows one pipe buffer write.
    let engine = env!("CARGO_BIN_EXE_engine");
    for (i, args) in [
        "run pipeline.yaml --dry-run",
        "status pipeline.yaml",
        "export pipeline.yaml",
        "dag pipeline.yaml",
    ]
    .iter()
    .cycle()
    .take(20)
    .enumerate()
    {
        let script = format!(
            "'{engine}' {args} --set '+vars.pad=\"{}\"' | head -1 > /dev/null; echo ${{PIPESTATUS[0]}}",
            "x".repeat(i)
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(ws.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!stderr.contains("panicked"), "{args}: {stderr}");
        assert!(
            code == "0" || code == "141",
            "{args}: exit {code}, {stderr}"
        );
    }
}

#[test]
fn a_failed_stage_and_integer_metrics_read_plainly() {
    let ws = Workspace::new(
        r#"
name: f
stages:
  a:
    op: shell
    cmd: "echo boom >&2; exit 3"
  c:
    op: shell
    cmd: "echo '{\"count\": 295}' > $ENGINE_OUT/metrics.json"
"#,
    );
    ws.engine(&["run", "pipeline.yaml"]).expect_code(1);
    let status = ok(&ws, &["status", "pipeline.yaml"]);
    assert!(
        status.contains("a  failed: command exited with status 3 (attempt of "),
        "{status}"
    );
    assert!(!status.contains("never run"), "{status}");
    let show = ok(&ws, &["show", "pipeline.yaml", "c"]);
    assert!(show.contains("metric    count = 295\n"), "{show}");
    let json: Value =
        serde_json::from_str(&ok(&ws, &["status", "pipeline.yaml", "--json"])).unwrap();
    assert_eq!(stage(&json, "a")["failed"], true);
}

/// The shipped ML example has a report: `engine report` on it works once it ran (smoke size).
#[test]
fn the_ml_example_reports_its_accuracies() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ws =
        Workspace::new(&std::fs::read_to_string(root.join("examples/ml/pipeline.yaml")).unwrap());
    let small = ["--set", "stages.data.samples=200", "--set", "vars.epochs=1"];
    let mut args = vec!["run", "pipeline.yaml"];
    args.extend(small);
    ok(&ws, &args);
    let mut args = vec!["report", "pipeline.yaml", "--out", "report"];
    args.extend(small);
    let md = ok(&ws, &args);
    assert!(md.contains("Test accuracy"), "{md}");
    assert!(md.contains("cnn") && md.contains("mlp"), "{md}");
}
