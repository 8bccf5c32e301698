//! Input that used to be accepted silently, or to crash, is refused at plan time (issue 13):
//! exit code 2, a message naming `file:line:column`, the field and a fix, nothing run, and
//! the cache and workspace exactly as they were.
//!
//! As in `bad_input.rs`, each case first runs a good pipeline into the workspace's cache, then
//! runs the bad pipeline `bad.yaml` from the same folder and compares every file of the
//! workspace (cache included) before and after.

mod common;

use common::reject::{expect_at, expect_field, expect_fix, expect_message, one_stage, Fixture};

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
