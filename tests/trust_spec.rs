//! Input that used to be accepted silently, or to crash, is refused at plan time (issue 13):
//! exit code 2, a message naming `file:line:column`, the field and a fix, nothing run, and
//! the cache and workspace exactly as they were.
//!
//! As in `bad_input.rs`, each case first runs a good pipeline into the workspace's cache, then
//! runs the bad pipeline `bad.yaml` from the same folder and compares every file of the
//! workspace (cache included) before and after.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Outcome, Workspace};

const GOOD: &str = r#"
name: good
stages:
  make:
    op: shell
    deps: [data.txt]
    cmd: "echo good >> runs.log; cat data.txt > $ENGINE_OUT/data.txt"
  use:
    op: shell
    inputs: {d: make}
    cmd: "echo good >> runs.log; cat $ENGINE_IN_D/data.txt > $ENGINE_OUT/copy.txt"
"#;

/// A workspace whose cache holds the good pipeline's results.
struct Fixture {
    ws: Workspace,
    /// Extra arguments every command gets (a `--cache-dir`).
    args: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_args(&[])
    }

    fn with_args(args: &[&str]) -> Self {
        Self::prepared(args, |_| {})
    }

    /// `prepare` runs on the workspace before the good pipeline does (links, folders).
    fn prepared(args: &[&str], prepare: impl FnOnce(&Workspace)) -> Self {
        let ws = Workspace::new(GOOD);
        ws.write("data.txt", "payload\n");
        prepare(&ws);
        let f = Self {
            ws,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let out = f.engine(&["run", "pipeline.yaml", "--json"]);
        out.expect_code(0);
        assert_eq!(out.json()["counts"]["ran"], 2, "{}", out.stdout);
        // `status` closes the database cleanly, so snapshots compare settled files only.
        f.engine(&["status", "pipeline.yaml"]).expect_code(0);
        f
    }

    fn engine(&self, args: &[&str]) -> Outcome {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.args.iter().map(String::as_str));
        self.ws.engine(&all)
    }

    /// Every file of the workspace with its bytes, the pipeline being refused excepted.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.ws
            .files_under("")
            .into_iter()
            .filter(|rel| rel != "bad.yaml")
            .map(|rel| {
                let bytes = std::fs::read(self.ws.join(&rel)).unwrap_or_default();
                (rel, bytes)
            })
            .collect()
    }

    /// Runs `engine COMMAND bad.yaml EXTRA` with `yaml` as bad.yaml: exit code 2, a message
    /// that starts with `error: bad.yaml`, nothing on stdout, nothing executed, every file of
    /// the workspace unchanged, and the good results still cached.
    fn reject_with(&self, command: &str, yaml: &str, extra: &[&str]) -> Outcome {
        self.ws.write("bad.yaml", yaml);
        let before = self.snapshot();
        let mut args = vec![command, "bad.yaml"];
        args.extend_from_slice(extra);
        let out = self.engine(&args);
        out.expect_code(2);
        assert!(out.stderr.starts_with("error: bad.yaml"), "{}", out.stderr);
        assert_eq!(out.stdout, "", "bad input printed on stdout");
        assert_eq!(
            self.ws.read("bad-ran.log"),
            "",
            "a stage of the bad pipeline ran"
        );
        let after = self.snapshot();
        let changed: BTreeSet<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        assert!(
            changed.is_empty(),
            "bad input changed the workspace or cache: {changed:?}\n{}",
            out.stderr
        );
        let again = self.engine(&["run", "pipeline.yaml", "--json"]);
        again.expect_code(0);
        assert_eq!(again.json()["counts"]["cached"], 2, "{}", again.stdout);
        self.engine(&["status", "pipeline.yaml"]).expect_code(0);
        out
    }

    fn reject(&self, yaml: &str, extra: &[&str]) -> Outcome {
        self.reject_with("run", yaml, extra)
    }
}

/// The message names `bad.yaml:LINE:COL` and the dotted field.
fn expect_at(out: &Outcome, line: usize, col: usize, field: &str) {
    let location = format!("error: bad.yaml:{line}:{col}: {field}: ");
    assert!(
        out.stderr.starts_with(&location),
        "expected {location:?} in\n{}",
        out.stderr
    );
}

/// Some `bad.yaml:LINE:COL: FIELD` is named (for cases whose position is not pinned).
fn expect_field(out: &Outcome, field: &str) {
    let rest = out.stderr.strip_prefix("error: bad.yaml:").unwrap_or("");
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().and_then(|l| l.parse::<usize>().ok());
    let col = parts.next().and_then(|c| c.parse::<usize>().ok());
    assert!(
        line.is_some_and(|l| l > 0) && col.is_some_and(|c| c > 0),
        "no line:column in\n{}",
        out.stderr
    );
    let after = parts.next().unwrap_or("");
    assert!(
        after.starts_with(&format!(" {field}: ")),
        "field {field} not named in\n{}",
        out.stderr
    );
}

/// A `fix:` line containing `hint`.
fn expect_fix(out: &Outcome, hint: &str) {
    let fix = out
        .stderr
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("fix: "))
        .unwrap_or_else(|| panic!("no `fix:` line in\n{}", out.stderr));
    assert!(fix.contains(hint), "fix {fix:?} does not contain {hint:?}");
}

fn expect_message(out: &Outcome, text: &str) {
    assert!(out.stderr.contains(text), "{text:?} not in\n{}", out.stderr);
}

/// A one-stage pipeline with `extra` lines added to stage `a` (indented 4 spaces).
fn one_stage(extra: &str) -> String {
    format!("stages:\n  a:\n    op: shell\n    cmd: \"echo a >> bad-ran.log\"\n{extra}")
}

// ---- defect 8: the cache folder and `outs` ----

#[test]
fn cache_folder_inside_an_outs_folder_is_refused() {
    let f = Fixture::with_args(&["--cache-dir", "results/cache"]);
    let out = f.reject(&one_stage("    outs: [results]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_message(&out, "holds the engine's cache folder");
    expect_message(&out, "cache.db");
    expect_fix(&out, "--cache-dir");
    // Spelled differently, it is the same folder.
    let out = f.reject(&one_stage("    outs: [./x/../results/]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_message(&out, "holds the engine's cache folder");
    // A dep holding the cache is refused as well: it would change on every run.
    let out = f.reject(&one_stage("    deps: [results]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.deps.0");
    expect_message(&out, "holds the engine's cache folder");
}

#[test]
fn outs_inside_a_cache_reached_through_a_link_or_dots_are_refused() {
    // --cache-dir names the cache through a symlink; `outs` names the real folder.
    let f = Fixture::prepared(&["--cache-dir", "cachelink"], |ws| {
        std::fs::create_dir(ws.join("realcache")).unwrap();
        std::os::unix::fs::symlink("realcache", ws.join("cachelink")).unwrap();
    });
    let out = f.reject(&one_stage("    outs: [realcache/objects/x]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_message(&out, "points into the engine's cache");
    expect_fix(&out, "inputs:");
    // ... and with `..` in the flag.
    let f = Fixture::prepared(&["--cache-dir", "sub/../realcache"], |ws| {
        std::fs::create_dir_all(ws.join("sub")).unwrap();
    });
    let out = f.reject(&one_stage("    outs: [realcache/cache.db]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_message(&out, "points into the engine's cache");
}

// ---- defect 9: `${vars.x}` splicing ----

#[test]
fn one_string_may_not_splice_past_one_mebibyte() {
    let f = Fixture::new();
    let big = "x".repeat(60_000);
    let cmd = "${vars.big}".repeat(20);
    let yaml = format!(
        "vars:\n  big: {big}\nstages:\n  a:\n    op: shell\n    cmd: \"echo {cmd} >> bad-ran.log\"\n"
    );
    let out = f.reject(&yaml, &["--dry-run"]);
    expect_at(&out, 6, 5, "stages.a.params.cmd");
    expect_message(&out, "1 MiB");
    expect_message(&out, "${vars.big}");
    expect_fix(&out, "deps:");
}

#[test]
fn splicing_over_a_matrix_may_not_pass_the_pipeline_total() {
    let f = Fixture::new();
    // 10 x 50 KB per instance: under the per-string limit; 200 instances make 100 MB.
    let big = "y".repeat(50_000);
    let cmd = "${vars.big}".repeat(10);
    let values: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let yaml = format!(
        "vars:\n  big: {big}\nstages:\n  a:\n    op: shell\n    matrix: {{p: [{}]}}\n    cmd: \"echo ${{matrix.p}} {cmd} >> bad-ran.log\"\n",
        values.join(", ")
    );
    let out = f.reject(&yaml, &["--dry-run"]);
    expect_at(&out, 7, 5, "stages.a.params.cmd");
    expect_message(&out, "64 MiB");
    expect_message(&out, "whole pipeline");
    expect_fix(&out, "shrink the matrix");
}

// ---- defect 10: names that collide ----

#[test]
fn matrix_values_that_share_a_list_input_folder_are_refused() {
    let f = Fixture::new();
    let yaml = "stages:\n  m:\n    op: shell\n    matrix: {p: [a/b, a_b]}\n    cmd: \"echo >> bad-ran.log\"\n  c:\n    op: shell\n    inputs: {parts: \"m[*]\"}\n    cmd: \"ls $ENGINE_IN_PARTS >> bad-ran.log\"\n";
    let out = f.reject(yaml, &[]);
    expect_at(&out, 8, 14, "stages.c.inputs.parts");
    expect_message(&out, "m[p=a/b]");
    expect_message(&out, "m[p=a_b]");
    expect_message(&out, "'p=a_b'");
    expect_fix(&out, "differ");
    // Taken one at a time, the same instances are fine.
    f.ws.write(
        "ok.yaml",
        &yaml.replace("\"m[*]\"", "\"m[p=a/b]\", other: \"m[p=a_b]\""),
    );
    f.engine(&["dag", "ok.yaml"]).expect_code(0);
}

#[test]
fn inputs_that_become_one_variable_are_refused() {
    let f = Fixture::new();
    let yaml = "stages:\n  up:\n    op: shell\n    cmd: \"echo >> bad-ran.log\"\n  b:\n    op: shell\n    inputs:\n      a-b: up\n      a_b: up\n    cmd: \"echo $ENGINE_IN_A_B >> bad-ran.log\"\n";
    let out = f.reject(yaml, &[]);
    expect_at(&out, 9, 7, "stages.b.inputs.a_b");
    expect_message(&out, "'a-b' and 'a_b'");
    expect_message(&out, "ENGINE_IN_A_B");
    expect_fix(&out, "rename one");
    // Upper and lower case collide the same way.
    let out = f.reject(&yaml.replace("a-b", "A_B"), &[]);
    expect_message(&out, "'A_B' and 'a_b'");
    // A name that is a path would put the input outside its folder.
    let out = f.reject(&yaml.replace("a-b", "../../x"), &[]);
    expect_at(&out, 8, 7, "stages.b.inputs.../../x");
    expect_fix(&out, "letters");
}

#[test]
fn two_stages_writing_one_path_are_refused() {
    let f = Fixture::new();
    let two = |first: &str, second: &str| {
        format!(
            "stages:\n  a:\n    op: shell\n    cmd: \"echo >> bad-ran.log\"\n    outs: [{first}]\n  b:\n    op: shell\n    cmd: \"echo >> bad-ran.log\"\n    outs: [{second}]\n"
        )
    };
    let out = f.reject(&two("results/x.txt", "results/x.txt"), &[]);
    expect_at(&out, 9, 12, "stages.b.params.outs.0");
    expect_message(&out, "'results/x.txt' is also an output of a");
    expect_message(&out, "stages.a.params.outs.0 at line 5:12");
    expect_fix(&out, "its own output path");
    // One inside the other, either way round.
    let out = f.reject(&two("results", "results/x.txt"), &[]);
    expect_at(&out, 9, 12, "stages.b.params.outs.0");
    expect_message(
        &out,
        "'results/x.txt' lies inside 'results', an output of a",
    );
    let out = f.reject(&two("results/x.txt", "./results"), &[]);
    expect_at(&out, 9, 12, "stages.b.params.outs.0");
    expect_message(&out, "'results' holds 'results/x.txt', an output of a");
    // Every instance of a matrix writing one file.
    let out = f.reject(
        &one_stage("    matrix: {p: [1, 2]}\n    outs: [results/x.txt]\n"),
        &[],
    );
    expect_field(&out, "stages.a.params.outs.0");
    expect_message(&out, "a[p=2]");
    expect_message(&out, "a[p=1]");
    expect_fix(&out, "${matrix.p}");
    // Names that only share a prefix are different paths.
    f.ws.write("ok.yaml", &two("results", "results-2/x.txt"));
    f.engine(&["dag", "ok.yaml"]).expect_code(0);
}

// ---- defect 11: writes outside the workspace ----

const REPORTED: &str = "name: rep\nstages:\n  fit:\n    op: shell\n    matrix: {n: [1, 2]}\n    cmd: \"echo '{\\\"score\\\": ${matrix.n}}' > $ENGINE_OUT/metrics.json\"\nreport:\n  tables:\n    - {name: scores, stage: fit, rows: n, metric: score}\n  plots:\n    - {name: curve, stage: fit, x: n, y: score}\n";

#[test]
fn report_names_must_be_plain_file_names() {
    let f = Fixture::new();
    // The results exist, so nothing but the name stops the report from writing.
    f.ws.write("bad.yaml", REPORTED);
    f.engine(&["run", "bad.yaml"]).expect_code(0);
    f.engine(&["status", "bad.yaml"]).expect_code(0);
    let out = f.reject_with(
        "report",
        &REPORTED.replace("name: curve", "name: ../../x"),
        &[],
    );
    expect_at(&out, 11, 8, "report.plots.0.name");
    expect_message(&out, "'../../x' is not a plain file name");
    expect_fix(&out, "no '/'");
    let out = f.reject_with(
        "report",
        &REPORTED.replace("name: scores", "name: a/b"),
        &[],
    );
    expect_at(&out, 9, 8, "report.tables.0.name");
    // Two plots of one name would overwrite each other's files.
    let twice = REPORTED.replace(
        "    - {name: curve, stage: fit, x: n, y: score}\n",
        "    - {name: curve, stage: fit, x: n, y: score}\n    - {name: curve, stage: fit, x: n, y: score}\n",
    );
    let out = f.reject_with("report", &twice, &[]);
    expect_at(&out, 12, 8, "report.plots.1.name");
    expect_message(&out, "report.plots.0.name");
    // The pipeline's name picks the default folder: it may not leave reports/.
    let out = f.reject_with(
        "report",
        &REPORTED.replace("name: rep", "name: ../outside"),
        &[],
    );
    expect_at(&out, 1, 1, "name");
    expect_fix(&out, "--out");
    assert!(!f.ws.join("outside").exists());
    assert!(!f.ws.join("reports").exists());
    // The good report still works.
    f.ws.write("bad.yaml", REPORTED);
    f.engine(&["report", "bad.yaml"]).expect_code(0);
    assert!(f.ws.join("reports/rep/curve.svg").is_file());
}

#[test]
fn outs_through_a_symlink_are_refused() {
    let elsewhere = tempfile::tempdir().unwrap();
    let f = Fixture::prepared(&[], |ws| {
        std::os::unix::fs::symlink(elsewhere.path(), ws.join("results")).unwrap();
        std::fs::create_dir_all(ws.join("deep/real")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), ws.join("deep/real/link")).unwrap();
    });
    let yaml = |outs: &str| {
        one_stage(&format!(
            "    outs: [{outs}]\n    cmd: \"echo a >> bad-ran.log; mkdir -p {outs}; echo x > {outs}/f\"\n"
        ))
        .replacen("    cmd: \"echo a >> bad-ran.log\"\n", "", 1)
    };
    let out = f.reject(&yaml("results"), &[]);
    expect_at(&out, 4, 12, "stages.a.params.outs.0");
    expect_message(&out, "symlink 'results'");
    expect_fix(&out, "real folder");
    let out = f.reject(&yaml("deep/real/link/sub"), &[]);
    expect_at(&out, 4, 12, "stages.a.params.outs.0");
    expect_message(&out, "symlink 'deep/real/link'");
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "something was written through the link"
    );
    // A folder that does not exist yet is fine.
    f.ws.write("ok.yaml", &yaml("deep/real/new"));
    f.engine(&["dag", "ok.yaml"]).expect_code(0);
}

// ---- defect 12: messages instead of panics and wrong exit codes ----

#[test]
fn absurd_timeouts_are_refused_not_panicked_on() {
    let f = Fixture::new();
    for value in ["1e300", "-5", "0", "31536001", "\"1000000years\"", "\"0s\""] {
        let out = f.reject(&one_stage(&format!("    timeout: {value}\n")), &[]);
        expect_at(&out, 5, 5, "stages.a.timeout");
        expect_message(&out, "365 days");
        expect_fix(&out, "10m");
    }
}

#[test]
fn a_byte_order_mark_is_accepted() {
    let f = Fixture::new();
    f.ws.write(
        "bom.yaml",
        "\u{feff}name: bom\nstages:\n  a: {op: shell, cmd: \"echo bom > $ENGINE_OUT/o\"}\n",
    );
    let out = f.engine(&["run", "bom.yaml", "--json"]);
    out.expect_code(0);
    assert_eq!(out.json()["counts"]["ran"], 1, "{}", out.stdout);
    // Positions still count from the first visible character.
    f.ws.write("bad.yaml", "\u{feff}stages:\n  a:\n    op: shel\n");
    let out = f.engine(&["dag", "bad.yaml"]);
    out.expect_code(2);
    expect_at(&out, 3, 5, "stages.a.op");
}

#[test]
fn keys_that_become_one_string_are_refused() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    env:\n      1: a\n      \"1\": b\n"), &[]);
    expect_at(&out, 7, 7, "stages.a.env.1");
    expect_message(&out, "lines 6 and 7");
    expect_fix(&out, "keep one");
    let out = f.reject(
        "vars:\n  true: 1\n  \"true\": 2\nstages:\n  a: {op: shell, cmd: x}\n",
        &[],
    );
    expect_at(&out, 3, 3, "vars.true");
}

#[test]
fn a_cache_dir_that_is_a_file_is_bad_input() {
    let f = Fixture::new();
    f.ws.write("not-a-folder", "x\n");
    f.ws.write("bad.yaml", &one_stage(""));
    for dir in ["not-a-folder", "not-a-folder/sub"] {
        let out = f.engine(&["run", "bad.yaml", "--cache-dir", dir]);
        out.expect_code(2);
        assert!(
            out.stderr.starts_with("error: --cache-dir "),
            "{}",
            out.stderr
        );
        expect_message(&out, "not-a-folder");
        expect_message(&out, "is a file");
        expect_fix(&out, "pass a folder");
        assert_eq!(f.ws.read("bad-ran.log"), "");
        assert_eq!(f.ws.read("not-a-folder"), "x\n");
    }
}

#[test]
fn huge_retries_max_stages_and_seeds_are_clean_errors() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    retries: 1e300\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.retries");
    expect_fix(&out, "retries: 2");
    let out = f.reject(
        &format!("max_stages: 18446744073709551615\n{}", one_stage("")),
        &[],
    );
    expect_at(&out, 1, 1, "max_stages");
    expect_fix(&out, "10000000");
    let out = f.reject(&format!("max_stages: 1e300\n{}", one_stage("")), &[]);
    expect_at(&out, 1, 1, "max_stages");
    let out = f.reject(&one_stage(""), &["--max-stages", "18446744073709551615"]);
    expect_message(&out, "--max-stages 18446744073709551615");
    expect_fix(&out, "--max-stages");
    for seed in ["1e300", "-1"] {
        let out = f.reject(&one_stage(&format!("    seed: {seed}\n")), &[]);
        expect_at(&out, 5, 5, "stages.a.seed");
        expect_message(&out, "non-negative integer");
    }
    // Past u64 the YAML reader itself refuses the number, at its position.
    let out = f.reject(&one_stage("    seed: 18446744073709551616\n"), &[]);
    expect_message(&out, "bad.yaml:5:11");
    expect_message(&out, "stages.a.seed");
    // The largest seed is a seed like any other.
    f.ws.write(
        "seed.yaml",
        "stages:\n  a: {op: shell, seed: 18446744073709551615, cmd: \"echo $ENGINE_SEED > $ENGINE_OUT/s\"}\n",
    );
    let out = f.engine(&["run", "seed.yaml", "--json"]);
    out.expect_code(0);
    let stage = common::stage(&out.json(), "a").clone();
    assert_eq!(
        common::output_text(&stage, "s").trim(),
        "18446744073709551615"
    );
}
