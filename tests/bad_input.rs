//! Bad pipelines: each is refused with exit code 2 and a message naming `file:line:column`,
//! the offending field and a fix, and leaves an existing cache exactly as it was.
//!
//! Every case first runs a good pipeline into the workspace's cache, snapshots every file of
//! the workspace and its cache (bytes included), runs the bad pipeline `bad.yaml` from the same folder (so it
//! uses the same cache), and compares.

mod common;

use common::reject::{expect_at, expect_fix, expect_located, expect_message, one_stage, Fixture};

#[test]
fn malformed_yaml() {
    let f = Fixture::new();
    let out = f.reject("stages:\n  a:\n    op: shell\n    cmd: echo a: b\n", &[]);
    expect_at(&out, 4, 16, "");
    expect_message(&out, "malformed YAML");
    expect_fix(&out, "quot");

    let out = f.reject("stages:\n  a:\n    op: shell\n   cmd: x\n", &[]);
    expect_at(&out, 4, 4, "");
    expect_fix(&out, "indentation");
}

#[test]
fn unknown_top_level_key() {
    let f = Fixture::new();
    let out = f.reject("name: x\nstagse:\n  a: {op: shell, cmd: x}\n", &[]);
    expect_at(&out, 2, 1, "stagse");
    expect_fix(&out, "did you mean 'stages'?");
}

#[test]
fn unknown_op_suggests_the_closest() {
    let f = Fixture::new();
    let out = f.reject(
        "stages:\n  a:\n    op: shel\n    cmd: \"echo a >> bad-ran.log\"\n",
        &[],
    );
    expect_at(&out, 3, 5, "stages.a.op");
    expect_message(&out, "unknown op 'shel'");
    expect_fix(&out, "did you mean 'shell'?");
}

#[test]
fn unknown_param() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    bogus: 1\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.params.bogus");
    expect_message(&out, "unknown field `bogus`");
    expect_fix(&out, "remove 'bogus'");
    // Near-miss spelling gets a suggestion.
    let out = f.reject(&one_stage("    dep: [data.txt]\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.params.dep");
    expect_fix(&out, "did you mean 'deps'?");
    // From the command line.
    let out = f.reject(&one_stage(""), &["--set", "stages.a.params.bogus=1"]);
    expect_message(&out, "--set stages.a.params.bogus=1");
    expect_fix(&out, "remove 'bogus'");
}

#[test]
fn mistyped_param_is_located() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    deps: 3\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.params.deps");
    expect_message(&out, "expected a sequence");
    let out = f.reject(&one_stage("    env: [1]\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.params.env");
}

#[test]
fn mistyped_param_has_a_fix() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    deps: 3\n"), &[]);
    expect_fix(&out, "deps");
    let out = f.reject("stages:\n  a:\n    op: shell\n    cmd: 5\n", &[]);
    expect_at(&out, 4, 5, "stages.a.params.cmd");
    expect_fix(&out, "cmd");
}

#[test]
fn mistyped_stage_field() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    retries: -1\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.retries");
    let out = f.reject(&one_stage("    timeout: soon\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.timeout");
    expect_fix(&out, "10m");
}

#[test]
fn reference_to_an_unknown_stage() {
    let f = Fixture::new();
    let yaml = "stages:\n  make:\n    op: shell\n    cmd: \"echo >> bad-ran.log\"\n  b:\n    op: shell\n    cmd: x\n    inputs: {x: maek}\n";
    let out = f.reject(yaml, &[]);
    expect_at(&out, 8, 14, "stages.b.inputs.x");
    expect_message(&out, "unknown stage 'maek'");
    expect_fix(&out, "did you mean 'make'?");
}

#[test]
fn reference_to_an_unknown_matrix_value() {
    let f = Fixture::new();
    let yaml = |r: &str| {
        format!(
            "stages:\n  sq:\n    op: shell\n    matrix: {{p: [1, 2]}}\n    cmd: \"echo >> bad-ran.log\"\n  b:\n    op: shell\n    cmd: x\n    inputs: {{x: \"{r}\"}}\n"
        )
    };
    let out = f.reject(&yaml("sq[p=5]"), &[]);
    expect_at(&out, 9, 14, "stages.b.inputs.x");
    expect_message(&out, "'p=5' matches no instance of stage 'sq'");
    expect_fix(&out, "'p' takes: 1, 2");
    // An unknown matrix variable.
    let out = f.reject(&yaml("sq[q=1]"), &[]);
    expect_at(&out, 9, 14, "stages.b.inputs.x");
    expect_fix(&out, "p");
    // A matrix stage referenced without a selector.
    let out = f.reject(&yaml("sq"), &[]);
    expect_fix(&out, "sq[*]");
}

#[test]
fn cycle_prints_its_path() {
    let f = Fixture::new();
    let yaml = "stages:\n  a:\n    op: shell\n    cmd: \"echo >> bad-ran.log\"\n    inputs: {x: b}\n  b:\n    op: shell\n    cmd: x\n    inputs: {x: a}\n";
    let out = f.reject(yaml, &[]);
    expect_located(&out);
    expect_message(&out, "cycle");
    assert!(
        out.stderr.contains("a -> b -> a") || out.stderr.contains("b -> a -> b"),
        "no cycle path in\n{}",
        out.stderr
    );
    expect_fix(&out, "remove");
    // A longer cycle lists every stage on it once, and closes it.
    let yaml = "stages:\n  a: {op: shell, cmd: x, inputs: {i: c}}\n  b: {op: shell, cmd: x, inputs: {i: a}}\n  c: {op: shell, cmd: x, inputs: {i: b}}\n  free: {op: shell, cmd: x}\n";
    let out = f.reject(yaml, &[]);
    let path = out
        .stderr
        .split("cycle: ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or_else(|| panic!("no cycle path in\n{}", out.stderr));
    let hops: Vec<&str> = path.split(" -> ").collect();
    assert_eq!(hops.len(), 4, "{path}");
    assert_eq!(hops[0], hops[3], "{path}");
    let mut on_cycle = hops[..3].to_vec();
    on_cycle.sort();
    assert_eq!(on_cycle, ["a", "b", "c"], "{path}");
}

#[test]
fn cycle_through_deps_and_outs() {
    let f = Fixture::new();
    let yaml = "stages:\n  a:\n    op: shell\n    cmd: \"echo >> bad-ran.log\"\n    outs: [x.txt]\n    deps: [y.txt]\n  b:\n    op: shell\n    cmd: x\n    outs: [y.txt]\n    deps: [x.txt]\n";
    let out = f.reject(yaml, &[]);
    expect_located(&out);
    assert!(
        out.stderr.contains("a -> b -> a") || out.stderr.contains("b -> a -> b"),
        "no cycle path in\n{}",
        out.stderr
    );
}

#[test]
fn duplicate_names_after_expansion() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    matrix: {p: [1, \"1\"]}\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.matrix");
    expect_message(&out, "'a[p=1]'");
    expect_fix(&out, "differ");
}

#[test]
fn unresolved_interpolation() {
    let f = Fixture::new();
    let out = f.reject(
        "vars: {n: 1}\nstages:\n  a:\n    op: shell\n    cmd: \"echo ${vars.nope}\"\n",
        &[],
    );
    expect_at(&out, 5, 5, "stages.a.params.cmd");
    expect_message(&out, "${vars.nope}");
    expect_fix(&out, "vars.nope");
    let out = f.reject(
        "stages:\n  a:\n    op: shell\n    matrix: {p: [1]}\n    cmd: \"echo ${matrix.q}\"\n",
        &[],
    );
    expect_at(&out, 5, 5, "stages.a.params.cmd");
    expect_message(&out, "${matrix.q}");
    expect_fix(&out, "p");
}

#[test]
fn paths_escaping_the_workspace() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    deps: [../x]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.deps.0");
    expect_message(&out, "leaves the pipeline's folder");
    expect_fix(&out, "inside the folder");
    let out = f.reject(&one_stage("    outs: [sub/../../x]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_fix(&out, "inside the folder");
}

#[test]
fn paths_into_the_cache() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    deps: [.engine/cache.db]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.deps.0");
    expect_message(&out, "cache");
    expect_fix(&out, "inputs:");
    let out = f.reject(&one_stage("    outs: [./.engine/objects/ab]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_message(&out, "cache");
    // An absolute path into the cache.
    let abs = f.ws.join(".engine/objects/x");
    let out = f.reject(
        &one_stage(&format!("    outs: [\"{}\"]\n", abs.display())),
        &[],
    );
    expect_at(&out, 5, 12, "stages.a.params.outs.0");
    expect_fix(&out, "relative");
}

#[test]
fn paths_into_a_custom_cache_dir() {
    let f = Fixture::with_args(&["--cache-dir", "mycache"]);
    let out = f.reject(&one_stage("    deps: [mycache/cache.db]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.deps.0");
    expect_message(&out, "cache");
    assert!(
        !f.ws.join(".engine").exists(),
        "the default cache was created"
    );
}

#[test]
fn empty_matrix() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    matrix: {}\n"), &[]);
    expect_at(&out, 5, 5, "stages.a.matrix");
    expect_message(&out, "empty");
    expect_fix(&out, "remove `matrix:`");
    let out = f.reject(&one_stage("    matrix: {p: []}\n"), &[]);
    expect_at(&out, 5, 14, "stages.a.matrix.p");
    expect_fix(&out, "at least one value");
}

#[test]
fn matrix_past_the_limit() {
    let f = Fixture::new();
    let big = "    matrix: {p: [1, 2, 3, 4], q: [1, 2, 3]}\n";
    let out = f.reject(&format!("max_stages: 10\n{}", one_stage(big)), &[]);
    expect_at(&out, 6, 5, "stages.a.matrix");
    expect_message(&out, "past 10 stages");
    expect_fix(&out, "max_stages");
    let out = f.reject(&one_stage(big), &["--max-stages", "10"]);
    expect_at(&out, 5, 5, "stages.a.matrix");
    expect_message(&out, "past 10 stages");
    // The limit counts every stage: 3 + 4*3 = 15 > 12 although the matrix alone fits.
    let three = "  b: {op: shell, cmd: x}\n  c: {op: shell, cmd: x}\n  d: {op: shell, cmd: x}\n";
    let yaml = format!("stages:\n{three}  a:\n    op: shell\n    cmd: x\n{big}");
    let out = f.reject(&yaml, &["--max-stages", "12"]);
    expect_message(&out, "past 12 stages");
    // The flag raises the file's limit too.
    f.ws.write("ok.yaml", &format!("max_stages: 10\n{}", one_stage(big)));
    let dag = f.engine(&["dag", "ok.yaml", "--max-stages", "12"]);
    dag.expect_code(0);
    assert_eq!(dag.stdout.lines().count(), 12, "{}", dag.stdout);
}

#[test]
fn matrix_past_the_default_limit() {
    let f = Fixture::new();
    // 1000 x 101 = 101,000 > 100,000; 1000 x 100 fits exactly.
    let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let yaml = |q: usize| {
        one_stage(&format!(
            "    matrix: {{p: [{}], q: [{}]}}\n",
            values(1000),
            values(q)
        ))
    };
    let out = f.reject(&yaml(101), &[]);
    expect_at(&out, 5, 5, "stages.a.matrix");
    expect_message(&out, "past 100000 stages");
    // Astronomically large products are refused the same way, not overflowed.
    let huge: String = (0..12)
        .map(|i| format!("v{i}: [{}], ", values(100)))
        .collect();
    let out = f.reject(
        &one_stage(&format!(
            "    matrix: {{{}}}\n",
            huge.trim_end_matches(", ")
        )),
        &[],
    );
    expect_message(&out, "past 100000 stages");
}

#[test]
fn set_for_an_unknown_stage() {
    let f = Fixture::new();
    let out = f.reject(&one_stage(""), &["--set", "stages.b.params.cmd=x"]);
    expect_message(&out, "--set stages.b.params.cmd=x");
    expect_message(&out, "no stage 'b'");
    expect_fix(&out, "a");
    let out = f.reject(
        &one_stage("  ab:\n    op: shell\n    cmd: x\n"),
        &["--set", "stages.abc.params.cmd=x"],
    );
    expect_fix(&out, "did you mean 'ab'?");
}

#[test]
fn missing_deps_file() {
    let f = Fixture::new();
    let out = f.reject(&one_stage("    deps: [missing.txt]\n"), &[]);
    expect_at(&out, 5, 12, "stages.a.params.deps.0");
    expect_message(&out, "'missing.txt'");
    expect_fix(&out, "create the file");
}

#[test]
fn missing_deps_file_leaves_the_stat_cache_untouched() {
    let f = Fixture::new();
    f.ws.write("present.txt", "x\n");
    // Older than the stat cache's racy window, so the engine would remember its hash.
    let touched = std::process::Command::new("touch")
        .args(["-d", "2020-01-01", "present.txt"])
        .current_dir(f.ws.path())
        .status()
        .expect("run touch");
    assert!(touched.success());
    f.reject(&one_stage("    deps: [present.txt, missing.txt]\n"), &[]);
}

#[test]
fn every_command_refuses_bad_input() {
    let f = Fixture::new();
    f.ws.write("bad.yaml", "stages:\n  a:\n    op: shel\n    cmd: x\n");
    for args in [
        vec!["status", "bad.yaml"],
        vec!["why", "bad.yaml", "a"],
        vec!["dag", "bad.yaml"],
        vec!["show", "bad.yaml", "a"],
        vec!["logs", "bad.yaml", "a"],
        vec!["run", "bad.yaml", "--dry-run"],
    ] {
        let out = f.engine(&args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("error: bad.yaml:3:5: stages.a.op"),
            "{args:?}: {}",
            out.stderr
        );
    }
    let out = f.engine(&["run", "nope.yaml"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("nope.yaml"), "{}", out.stderr);
    expect_fix(&out, "path");
}
