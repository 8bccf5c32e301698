//! The fixture of the bad-input tests: a workspace whose cache holds a good pipeline's
//! results, and checks that a refused pipeline ran nothing, changed nothing and says where.

use std::collections::{BTreeMap, BTreeSet};

use super::{Outcome, Workspace};

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
pub struct Fixture {
    pub ws: Workspace,
    /// Extra arguments every command gets (a `--cache-dir`).
    args: Vec<String>,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    pub fn with_args(args: &[&str]) -> Self {
        Self::prepared(args, |_| {})
    }

    /// `prepare` runs on the workspace before the good pipeline does (links, folders).
    pub fn prepared(args: &[&str], prepare: impl FnOnce(&Workspace)) -> Self {
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

    pub fn engine(&self, args: &[&str]) -> Outcome {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.args.iter().map(String::as_str));
        self.ws.engine(&all)
    }

    /// Every file of the workspace with its bytes, the pipeline being refused excepted.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
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
    pub fn reject_with(&self, command: &str, yaml: &str, extra: &[&str]) -> Outcome {
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

    pub fn reject(&self, yaml: &str, extra: &[&str]) -> Outcome {
        self.reject_with("run", yaml, extra)
    }
}

/// The message names `bad.yaml:LINE:COL` and the dotted field.
pub fn expect_at(out: &Outcome, line: usize, col: usize, field: &str) {
    let location = format!("error: bad.yaml:{line}:{col}: ");
    assert!(
        out.stderr.starts_with(&location),
        "expected {location:?} in\n{}",
        out.stderr
    );
    if !field.is_empty() {
        assert!(
            out.stderr.contains(&format!("{location}{field}: ")),
            "field {field} in\n{}",
            out.stderr
        );
    }
}

/// Some `bad.yaml:LINE:COL` position is named (for cases whose exact position is not pinned);
/// returns what follows it.
pub fn expect_located(out: &Outcome) -> &str {
    let rest = out.stderr.strip_prefix("error: bad.yaml:").unwrap_or("");
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().and_then(|l| l.parse::<usize>().ok());
    let col = parts.next().and_then(|c| c.parse::<usize>().ok());
    assert!(
        line.is_some_and(|l| l > 0) && col.is_some_and(|c| c > 0),
        "no line:column in\n{}",
        out.stderr
    );
    parts.next().unwrap_or("")
}

/// A `fix:` line containing `hint`.
pub fn expect_fix(out: &Outcome, hint: &str) {
    let fix = out
        .stderr
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("fix: "))
        .unwrap_or_else(|| panic!("no `fix:` line in\n{}", out.stderr));
    assert!(fix.contains(hint), "fix {fix:?} does not contain {hint:?}");
}

pub fn expect_message(out: &Outcome, text: &str) {
    assert!(out.stderr.contains(text), "{text:?} not in\n{}", out.stderr);
}

/// Some `bad.yaml:LINE:COL: FIELD` is named (for cases whose position is not pinned).
pub fn expect_field(out: &Outcome, field: &str) {
    let after = expect_located(out);
    assert!(
        after.starts_with(&format!(" {field}: ")),
        "field {field} not named in\n{}",
        out.stderr
    );
}

/// A one-stage pipeline with `extra` lines added to stage `a` (indented 4 spaces).
pub fn one_stage(extra: &str) -> String {
    format!("stages:\n  a:\n    op: shell\n    cmd: \"echo a >> bad-ran.log\"\n{extra}")
}
