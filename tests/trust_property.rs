//! The class check of issue 13: random shell stages that write files, folders, symbolic links
//! (to files and folders, at depth, inside and outside the workspace), hard links to user
//! files, declared `outs`, and background children (in the stage's group and in new
//! sessions) that try to write into outputs and user files after the command exits; the
//! engine is killed (SIGKILL) at random moments and finally run to the end. Properties:
//! 1. no file outside the stages' output folders and declared `outs` changed (bytes, mode,
//!    existence), in the workspace or outside it, even a second after the last run;
//! 2. `engine verify` passes after every kill and at the end;
//! 3. every cached result equals the result of a clean, uninterrupted run.
//!
//! Each case is generated from its seed; a failure names the seed and the pipeline.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::raw::{sigkill, Rng};
use common::Workspace;

/// What a user's file looks like: content (or link target) and permission bits.
type Snapshot = BTreeMap<String, (Vec<u8>, u32)>;

fn snapshot(root: &Path, skip: &[&str]) -> Snapshot {
    let mut out = Snapshot::new();
    for entry in walkdir(root) {
        let rel = entry
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if skip
            .iter()
            .any(|s| rel == *s || rel.starts_with(&format!("{s}/")))
        {
            continue;
        }
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        let content = if meta.file_type().is_symlink() {
            std::fs::read_link(&entry)
                .unwrap()
                .to_string_lossy()
                .into_owned()
                .into_bytes()
        } else if meta.is_file() {
            std::fs::read(&entry).unwrap()
        } else {
            b"<folder>".to_vec()
        };
        out.insert(rel, (content, meta.permissions().mode() & 0o7777));
    }
    out
}

fn walkdir(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The user's files every case starts from: a data folder, a private file, and a folder
/// outside the workspace.
fn user_files(ws: &Workspace, outside: &Path) {
    ws.write("data/a.txt", "alpha\n");
    ws.write("data/b.txt", "bravo\n");
    ws.write("data/sub/c.txt", "charlie\n");
    ws.write("private.txt", "secret\n");
    std::fs::set_permissions(
        ws.join("private.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(outside.join("deep")).unwrap();
    std::fs::write(outside.join("x.txt"), "outside\n").unwrap();
    std::fs::write(outside.join("deep/y.txt"), "outside deep\n").unwrap();
}

/// A random pipeline of `stages` shell stages.
fn pipeline(seed: u64, stages: u64, outside: &Path) -> String {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let o = outside.display();
    let mut text = String::from("name: trust\nstages:\n");
    for i in 0..stages {
        let mut cmd = vec![format!("echo s{i} > $ENGINE_OUT/f0")];
        let mut outs = Vec::new();
        let inputs = rng.upstreams(i);
        for u in &inputs {
            cmd.push(format!("cp -R $ENGINE_IN_IN{u} $ENGINE_OUT/from{u}"));
        }
        for k in 0..1 + rng.below(4) {
            cmd.push(match rng.below(11) {
                0 => format!("echo s{i}-{k} > $ENGINE_OUT/f{}", k + 1),
                1 => format!("mkdir -p $ENGINE_OUT/d{k}/e && echo deep{k} > $ENGINE_OUT/d{k}/e/f"),
                2 => format!("ln -s $ENGINE_WORKSPACE/data $ENGINE_OUT/ldata{k}"),
                3 => format!("ln -s $ENGINE_WORKSPACE/data/a.txt $ENGINE_OUT/lfile{k}"),
                4 => format!("ln -s {o} $ENGINE_OUT/lout{k}"),
                5 => format!(
                    "mkdir -p $ENGINE_OUT/n{k} && ln -s $ENGINE_WORKSPACE/data/sub $ENGINE_OUT/n{k}/deep"
                ),
                6 => format!("ln $ENGINE_WORKSPACE/data/b.txt $ENGINE_OUT/hard{k}"),
                7 => format!("ln -s $ENGINE_WORKSPACE/private.txt $ENGINE_OUT/lpriv{k}"),
                8 => "exec 3>>$ENGINE_OUT/f0; (sleep 0.4; echo late >&3; echo late >> $ENGINE_WORKSPACE/data/a.txt) &".to_string(),
                9 => format!(
                    "exec 4>>$ENGINE_OUT/f0; setsid sh -c 'sleep 0.4; echo late >&4; echo late >> $ENGINE_WORKSPACE/data/b.txt; echo late >> {o}/x.txt' &"
                ),
                _ => {
                    outs.push(format!("results/s{i}.txt"));
                    format!("mkdir -p results && echo out{i} > results/s{i}.txt")
                }
            });
        }
        cmd.push(format!("sleep 0.{}", rng.below(3)));
        text.push_str(&format!("  s{i}:\n    op: shell\n"));
        if !inputs.is_empty() {
            let parts: Vec<String> = inputs.iter().map(|u| format!("in{u}: s{u}")).collect();
            text.push_str(&format!("    inputs: {{{}}}\n", parts.join(", ")));
        }
        if !outs.is_empty() {
            outs.dedup();
            text.push_str(&format!("    outs: [{}]\n", outs.join(", ")));
        }
        // One line each (a line may end in `&`), in a YAML double-quoted string.
        let line = cmd
            .iter()
            .map(|c| c.replace('\\', "\\\\").replace('"', "\\\""))
            .collect::<Vec<_>>()
            .join("\\n");
        text.push_str(&format!("    cmd: \"{line}\"\n"));
    }
    text
}

fn assert_verified(ws: &Workspace, context: &str) {
    let out = ws.engine(&["verify", "pipeline.yaml", "--json"]);
    assert_eq!(
        out.json()["problems"],
        serde_json::json!([]),
        "{context}: {}",
        out.stdout
    );
    out.expect_code(0);
}

fn one_case(seed: u64) {
    let outside = tempfile::tempdir().unwrap();
    let stages = 4 + seed % 3;
    let text = pipeline(seed, stages, outside.path());
    let context = format!("seed {seed}, pipeline:\n{text}");

    // The reference: a clean run, never interrupted.
    let reference = Workspace::new(&text);
    user_files(&reference, outside.path());
    let expected_doc = reference.run_ok(&["-j", "2"]);
    let expected = common::trees(&expected_doc);
    let expected_outs = reference.files_under("results");

    let ws = Workspace::new(&text);
    user_files(&ws, outside.path());
    let skip = [".engine", "results", "pipeline.yaml"];
    let before = snapshot(ws.path(), &skip);
    let outside_before = snapshot(outside.path(), &[]);
    let mut rng = Rng(seed | 1);
    for kill in 0..3 {
        let mut child = ws
            .command(&["run", "pipeline.yaml", "-j", "2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the engine");
        std::thread::sleep(Duration::from_millis(30 + rng.below(700)));
        sigkill(&mut child);
        assert_verified(&ws, &format!("after kill {kill}, {context}"));
    }
    let done = ws.run_ok(&["-j", "2"]);
    assert_eq!(
        common::trees(&done),
        expected,
        "results differ from a clean run, {context}"
    );
    assert_eq!(ws.files_under("results"), expected_outs, "{context}");
    for f in &expected_outs {
        let rel = format!("results/{f}");
        assert_eq!(ws.read(&rel), reference.read(&rel), "{rel}, {context}");
    }
    assert_verified(&ws, &format!("at the end, {context}"));
    // Long enough for any surviving background child to have written.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        snapshot(ws.path(), &skip),
        before,
        "a user's file changed, {context}"
    );
    assert_eq!(
        snapshot(outside.path(), &[]),
        outside_before,
        "a file outside the workspace changed, {context}"
    );
    let again = ws.run_ok(&[]);
    assert_eq!(
        common::with_status(&again, "cached").len() as u64,
        stages,
        "{context}"
    );
}

#[test]
fn random_stages_killed_at_random_moments_never_touch_user_files_nor_cache_wrong_results() {
    let cases: u64 = std::env::var("TRUST_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for seed in 1..=cases {
        one_case(seed);
    }
}
