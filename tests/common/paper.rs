//! Shared helpers for the paper-pipeline smoke tests: run a file of `pipelines/` through the
//! real `engine` binary with `--set` overrides and its own cache folder, and read the `--json`
//! result.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `pipelines/NAME` of this repository.
pub fn pipeline(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pipelines")
        .join(name)
}

/// `engine ARGS PIPELINE --cache-dir CACHE --set S...`, ignoring any `ENGINE_CACHE_DIR`.
pub fn engine<S: AsRef<OsStr>>(args: &[&str], pipeline: &Path, cache: &Path, sets: &[S]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
    cmd.args(args).arg(pipeline).arg("--cache-dir").arg(cache);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env_remove("ENGINE_CACHE_DIR")
        .output()
        .expect("the engine binary runs")
}

/// `engine run --json -j 2`; panics with both streams on failure.
pub fn run<S: AsRef<OsStr>>(pipeline: &Path, cache: &Path, sets: &[S]) -> Value {
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
pub fn report<S: AsRef<OsStr>>(
    pipeline: &Path,
    cache: &Path,
    out: &Path,
    sets: &[S],
) -> Result<String, String> {
    let o = engine(
        &["report", "--out", out.to_str().unwrap()],
        pipeline,
        cache,
        sets,
    );
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

/// Every stage of a run result.
pub fn all_stages(r: &Value) -> &Vec<Value> {
    r["stages"].as_array().expect("a stages list")
}

/// The stages named `prefix` or `prefix[...]` (a matrix's instances).
pub fn stages<'a>(r: &'a Value, prefix: &str) -> Vec<&'a Value> {
    all_stages(r)
        .iter()
        .filter(|s| {
            let n = s["name"].as_str().unwrap();
            n == prefix || n.starts_with(&format!("{prefix}["))
        })
        .collect()
}

pub fn stage<'a>(r: &'a Value, name: &str) -> &'a Value {
    all_stages(r)
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {r}"))
}

/// The stored file `file` of stage `name`'s output, parsed as JSON.
pub fn output_json(r: &Value, name: &str, file: &str) -> Value {
    let path = stage(r, name)["outputs"][file]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("stage {name} has no output {file}: {}", stage(r, name)));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub fn metric(r: &Value, name: &str, key: &str) -> f64 {
    stage(r, name)["metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("stage {name} has no metric {key}: {}", stage(r, name)))
}

/// The `--set` overrides that shrink both operator-learning pipelines to smoke size (8 x 8 grid,
/// tiny FNO, 2 epochs), plus `extra` (the time-dependent one also shortens its windows).
pub fn operator_smoke_sets(extra: &[&str]) -> Vec<String> {
    [
        "vars.resolution=8",
        "vars.width=4",
        "vars.modes=[2,2]",
        "vars.layers=1",
        "vars.head_width=8",
        "vars.unlabeled=32",
        "vars.pool=24",
        "vars.val=4",
        "vars.test=4",
        "vars.ood_test=4",
        "vars.ood_pool=2",
        "vars.Ns=[4,16]",
        "vars.icl_n=16",
        "vars.seeds=[0,1]",
        "vars.Js=[0,2]",
        "vars.pretrain_epochs=2",
        "vars.finetune_epochs=2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}
