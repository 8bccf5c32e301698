//! What the store must never do to a user, driven through the real binary: move or chmod a
//! user's file reached through a link in a stage's output, widen a file's permissions, merge
//! two file names into one, keep results computed from damaged inputs, lose a result to a
//! concurrent gc, reap another machine's scratch, stay stuck on a damaged database, hang on a
//! FIFO, or restore through a symlinked folder. Each test fails without the mechanism it checks.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::raw::{engine, json_of, run};

/// stdout and stderr together, for messages whichever stream they go to.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn assert_verified(dir: &Path, context: &str) {
    let out = run(dir, &["verify", "p.yaml", "--json"]);
    let v = json_of(&out);
    assert_eq!(v["problems"], serde_json::json!([]), "{context}: {v}");
    assert!(out.status.success(), "{context}: {}", text(&out));
}

/// Every file under `root` (not following links) with its bytes and mode.
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap(), mode(&p)));
            }
        }
    }
    out.sort();
    out
}

fn write_pipeline(dir: &Path, cmd: &str) {
    std::fs::write(
        dir.join("p.yaml"),
        format!("stages:\n  s:\n    op: shell\n    cmd: '{cmd}'\n"),
    )
    .unwrap();
}

/// A stage that links user files into its output, at every shape: after the run, after gc
/// has dropped the result (the stage's key changed), the user's files are all there, byte
/// for byte, with their modes; and the store verifies.
#[test]
fn links_in_an_output_never_move_or_change_a_users_files() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("far.txt"), "outside the workspace").unwrap();
    std::fs::set_permissions(
        outside.path().join("far.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let far = outside.path().display().to_string();
    let cases = [
        ("folder", "ln -s \"$PWD/data\" $ENGINE_OUT/data".to_string()),
        (
            "file",
            "ln -s \"$PWD/data/a.txt\" $ENGINE_OUT/a.txt".to_string(),
        ),
        (
            "at depth",
            "mkdir -p $ENGINE_OUT/sub/deeper && ln -s \"$PWD/data\" $ENGINE_OUT/sub/deeper/d"
                .to_string(),
        ),
        (
            "link inside a linked folder",
            "ln -s \"$PWD/other\" data/inner && ln -s \"$PWD/data\" $ENGINE_OUT/data".to_string(),
        ),
        (
            "outside the workspace",
            format!("ln -s {far} $ENGINE_OUT/far"),
        ),
        (
            "relative, inside the workspace",
            "ln -s ../../../../data $ENGINE_OUT/rel && test -f $ENGINE_OUT/rel/a.txt".to_string(),
        ),
        (
            "hard link",
            "ln \"$PWD/data/a.txt\" $ENGINE_OUT/a.txt".to_string(),
        ),
    ];
    for (what, cmd) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("data/nested")).unwrap();
        std::fs::create_dir_all(ws.join("other")).unwrap();
        std::fs::write(ws.join("data/a.txt"), "user data a").unwrap();
        std::fs::set_permissions(
            ws.join("data/a.txt"),
            std::fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        std::fs::write(ws.join("data/b.bin"), vec![7u8; 10_000]).unwrap();
        std::fs::write(ws.join("data/nested/c.txt"), "user data c").unwrap();
        std::fs::set_permissions(
            ws.join("data/nested/c.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(ws.join("other/o.txt"), "other user data").unwrap();
        write_pipeline(ws, &cmd);
        let first = run(ws, &["run", "p.yaml", "--json"]);
        // The link inside the linked folder is made by the stage itself; snapshot after.
        let before = (snapshot(&ws.join("data")), snapshot(&ws.join("other")));
        let far_before = snapshot(outside.path());
        assert!(first.status.success(), "{what}: {}", text(&first));
        let tree = json_of(&first)["stages"][0]["outputs"].clone();
        assert!(
            tree.as_object().is_some_and(|o| !o.is_empty()),
            "{what}: nothing stored: {tree}"
        );
        assert_verified(ws, what);
        // A new key, then gc keeping only what the pipeline uses now: the old result goes.
        write_pipeline(ws, &format!("{cmd}; true"));
        let gc = run(ws, &["gc", "--pipeline", "p.yaml"]);
        assert!(gc.status.success(), "{what}: {}", text(&gc));
        assert!(
            text(&gc).contains("1 records dropped"),
            "{what}: {}",
            text(&gc)
        );
        let after = (snapshot(&ws.join("data")), snapshot(&ws.join("other")));
        assert_eq!(before, after, "{what}: the user's files changed");
        assert_eq!(
            far_before,
            snapshot(outside.path()),
            "{what}: outside files changed"
        );
        assert_eq!(
            std::fs::read_to_string(ws.join("data/a.txt")).unwrap(),
            "user data a"
        );
        assert_eq!(mode(&ws.join("data/a.txt")), 0o664, "{what}");
        assert_eq!(
            std::fs::read_to_string(outside.path().join("far.txt")).unwrap(),
            "outside the workspace"
        );
        assert_eq!(mode(&outside.path().join("far.txt")), 0o640, "{what}");
        assert_verified(ws, &format!("{what}, after gc"));
    }
}

/// A dangling link or a link loop in an output fails the stage with the link's path.
#[test]
fn dangling_links_and_link_loops_fail_the_stage_naming_the_link() {
    for (cmd, link, words) in [
        (
            "ln -s \"$PWD/nothing\" $ENGINE_OUT/dangling",
            "dangling",
            "link to nothing",
        ),
        (
            "mkdir $ENGINE_OUT/d && ln -s .. $ENGINE_OUT/d/up",
            "d/up",
            "link loop",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_pipeline(dir.path(), cmd);
        let out = run(dir.path(), &["run", "p.yaml"]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains(link) && t.contains(words), "{cmd}: {t}");
    }
}

/// A 0600 output (and a 0600 workspace `out`) is restored 0600, not 0644; its object is 0400;
/// a new cache folder is 0700. Ordinary outputs keep the tree bytes they always had.
#[test]
fn permissions_are_never_widened() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    std::fs::write(
        ws.join("p.yaml"),
        "stages:\n  s:\n    op: shell\n    outs: [secret.txt]\n    cmd: 'umask 077; echo key > secret.txt; echo key > $ENGINE_OUT/k'\n  t:\n    op: shell\n    inputs: {x: s}\n    cmd: 'stat -c %a $ENGINE_IN_X/k > $ENGINE_OUT/m'\n  plain:\n    op: shell\n    cmd: 'echo x > $ENGINE_OUT/o'\n",
    )
    .unwrap();
    let first = json_of(&run(ws, &["run", "p.yaml", "--json"]));
    assert_eq!(mode(&ws.join(".engine")), 0o700);
    let stage = |v: &Value, name: &str| -> Value {
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    let s = stage(&first, "s");
    let object = PathBuf::from(s["outputs"]["k"]["path"].as_str().unwrap());
    assert_eq!(mode(&object), 0o400);
    let t = stage(&first, "t");
    let m = std::fs::read_to_string(t["outputs"]["m"]["path"].as_str().unwrap()).unwrap();
    assert_eq!(m.trim(), "400", "the input is as private as its source");
    // Restored from the cache.
    std::fs::remove_file(ws.join("secret.txt")).unwrap();
    let second = run(ws, &["run", "p.yaml", "--json"]);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(json_of(&second)["counts"]["ran"], 0);
    assert_eq!(
        std::fs::read_to_string(ws.join("secret.txt")).unwrap(),
        "key\n"
    );
    assert_eq!(mode(&ws.join("secret.txt")), 0o600);
    // The tree of an ordinary output is byte for byte what it was before modes were recorded.
    let blob = blake3::hash(b"x\n").to_hex().to_string();
    let old =
        format!(r#"{{"entries":[{{"path":"o","blob":"{blob}","size":2,"executable":false}}]}}"#);
    assert_eq!(
        stage(&first, "plain")["tree"].as_str().unwrap(),
        blake3::hash(old.as_bytes()).to_hex().to_string()
    );
}

/// Two names that are not UTF-8 would collapse into one lossy name: the stage fails instead,
/// naming the file.
#[test]
fn a_file_name_that_is_not_utf8_fails_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    write_pipeline(
        dir.path(),
        "touch $ENGINE_OUT/ok \"$ENGINE_OUT/$(printf \"a\\377\")\" \"$ENGINE_OUT/$(printf \"a\\376\")\"",
    );
    let out = run(dir.path(), &["run", "p.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not valid UTF-8"), "{}", text(&out));
}

/// Corrupting the output of `a` makes `verify --repair` drop `a` and everything computed from
/// it (`b`, and `c` from `b`), so that all three rerun; `u` is untouched.
#[test]
fn repair_drops_everything_computed_from_a_damaged_result() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    std::fs::write(
        ws.join("p.yaml"),
        "stages:\n  a: {op: shell, cmd: \"echo a > $ENGINE_OUT/o\"}\n  b: {op: shell, inputs: {x: a}, cmd: \"cat $ENGINE_IN_X/o > $ENGINE_OUT/o; echo b >> $ENGINE_OUT/o\"}\n  c: {op: shell, inputs: {x: b}, cmd: \"cat $ENGINE_IN_X/o > $ENGINE_OUT/o; echo c >> $ENGINE_OUT/o\"}\n  u: {op: shell, cmd: \"echo u > $ENGINE_OUT/o\"}\n",
    )
    .unwrap();
    let first = json_of(&run(ws, &["run", "p.yaml", "--json"]));
    let a = first["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "a")
        .unwrap()["outputs"]["o"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&a, "A\n").unwrap();
    let repair = run(ws, &["verify", "p.yaml", "--repair", "--json"]);
    assert!(repair.status.success(), "{}", text(&repair));
    let v = json_of(&repair);
    assert_eq!(v["repaired_runs"], 3, "{v}");
    let again = json_of(&run(ws, &["run", "p.yaml", "--json"]));
    assert_eq!(again["counts"]["ran"], 3, "{again}");
    assert_verified(ws, "after the reruns");
}

/// gc takes its lock before deciding what the pipeline uses: a result recorded by a run that
/// was in progress when gc started is kept.
#[test]
fn gc_during_a_run_keeps_what_the_run_records() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    std::fs::write(
        ws.join("p.yaml"),
        "stages:\n  slow: {op: shell, cmd: \"sleep 1.5; echo done > $ENGINE_OUT/o\"}\n",
    )
    .unwrap();
    let runner = engine()
        .current_dir(ws)
        .args(["run", "p.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let gc = run(ws, &["gc", "--pipeline", "p.yaml"]);
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(
        text(&gc).contains("waiting for running engine processes"),
        "gc did not overlap the run: {}",
        text(&gc)
    );
    let out = runner.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&gc).contains("0 records dropped"), "{}", text(&gc));
    let status = json_of(&run(ws, &["status", "p.yaml", "--json"]));
    assert_eq!(status["stages"][0]["status"], "cached", "{status}");
    assert_verified(ws, "after gc during a run");
}

/// Scratch folders of another pid space (another host or container sharing the cache) are
/// never reaped, legacy-named ones only by gc; a dead process of our own pid space is.
#[test]
fn scratch_of_other_machines_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    write_pipeline(ws, "echo x > $ENGINE_OUT/o");
    assert!(run(ws, &["run", "p.yaml"]).status.success());
    let tmp = ws.join(".engine/tmp");
    let ours = tmp.join(format!("o{}-999999999-0-0", cache::pid_space_id()));
    let elsewhere = tmp.join("offffffffffff-1-0-0");
    let legacy = tmp.join("999999999-0-0");
    for d in [&ours, &elsewhere, &legacy] {
        std::fs::create_dir_all(d.join("out0")).unwrap();
        std::fs::write(d.join("out0/f"), "live work").unwrap();
    }
    let status = run(ws, &["status", "p.yaml"]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(!ours.exists(), "our dead process's scratch is reaped");
    assert!(
        elsewhere.join("out0/f").exists(),
        "another machine's live scratch"
    );
    assert!(legacy.join("out0/f").exists(), "legacy scratch outside gc");
    let gc = run(ws, &["gc", "--cache-dir", ".engine"]);
    assert!(gc.status.success(), "{}", text(&gc));
    assert!(
        !legacy.exists(),
        "gc, under the exclusive lock, reaps legacy leftovers"
    );
    assert!(elsewhere.join("out0/f").exists());
}

/// A truncated or overwritten cache.db: every command says how to recover, and
/// `verify --repair` recovers, keeping the objects.
#[test]
fn a_damaged_database_is_recovered_by_verify_repair() {
    for damage in ["truncate", "garbage"] {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        write_pipeline(ws, "echo x > $ENGINE_OUT/o");
        assert!(run(ws, &["run", "p.yaml"]).status.success());
        let db = ws.join(".engine/cache.db");
        let len = std::fs::metadata(&db).unwrap().len();
        match damage {
            // Cut inside the schema page.
            "truncate" => std::fs::OpenOptions::new()
                .write(true)
                .open(&db)
                .unwrap()
                .set_len(1000)
                .unwrap(),
            _ => std::fs::write(&db, vec![0xa5u8; len as usize]).unwrap(),
        }
        let objects_before = snapshot(&ws.join(".engine/objects")).len();
        for args in [
            &["status", "p.yaml"][..],
            &["run", "p.yaml"],
            &["verify", "p.yaml"],
            &["gc", "--cache-dir", ".engine"],
        ] {
            let out = run(ws, args);
            assert!(!out.status.success(), "{damage} {args:?}: {}", text(&out));
            assert!(
                text(&out).contains("engine verify --repair"),
                "{damage} {args:?}: {}",
                text(&out)
            );
        }
        let repair = run(ws, &["verify", "p.yaml", "--repair"]);
        assert!(repair.status.success(), "{damage}: {}", text(&repair));
        assert!(text(&repair).contains("moved it to"), "{}", text(&repair));
        let moved: Vec<String> = std::fs::read_dir(ws.join(".engine"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cache.db.broken-"))
            .collect();
        assert!(!moved.is_empty(), "{damage}");
        assert_eq!(snapshot(&ws.join(".engine/objects")).len(), objects_before);
        let again = run(ws, &["run", "p.yaml", "--json"]);
        assert!(again.status.success(), "{}", text(&again));
        assert_eq!(json_of(&again)["counts"]["ran"], 1);
        assert_verified(ws, damage);
    }
}

/// A FIFO or /dev/zero among `deps` is an error naming it, at once, not a hang.
#[test]
fn special_files_in_deps_are_errors_not_hangs() {
    for (name, make) in [
        ("fifo", "mkfifo fifo"),
        ("zero", "ln -s /dev/zero zero"),
        ("folder", "mkdir folder && mkfifo folder/pipe"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        assert!(Command::new("sh")
            .args(["-c", make])
            .current_dir(ws)
            .status()
            .unwrap()
            .success());
        std::fs::write(
            ws.join("p.yaml"),
            format!("stages:\n  s: {{op: shell, deps: [{name}], cmd: \"echo > $ENGINE_OUT/o\"}}\n"),
        )
        .unwrap();
        for cmd in ["status", "run"] {
            let mut child = engine()
                .current_dir(ws)
                .args([cmd, "p.yaml"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{cmd} with a {name} dep hangs");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = child.wait_with_output().unwrap();
            let t = text(&out);
            let kind = if name == "zero" {
                "character device"
            } else {
                "FIFO"
            };
            assert!(t.contains(kind) && t.contains(name), "{cmd} {name}: {t}");
            if cmd == "run" {
                assert!(!out.status.success(), "{name}: {t}");
            }
        }
    }
}

/// An `outs` path whose folder in the workspace is a symlink is not restored through it.
#[test]
fn outs_are_not_restored_through_a_symlinked_folder() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    std::fs::create_dir_all(ws.join("results")).unwrap();
    std::fs::write(
        ws.join("p.yaml"),
        "stages:\n  s: {op: shell, outs: [results/r.txt], cmd: \"echo r > results/r.txt; echo > $ENGINE_OUT/o\"}\n",
    )
    .unwrap();
    assert!(run(ws, &["run", "p.yaml"]).status.success());
    // The user makes `results` a link to a folder elsewhere; the out is gone from it.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::remove_dir_all(ws.join("results")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), ws.join("results")).unwrap();
    let out = run(ws, &["run", "p.yaml"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        // Refused at plan time (exit 2); the store refuses it too when a restore gets there.
        text(&out).contains("results")
            && (text(&out).contains("symlink") || text(&out).contains("symbolic link")),
        "{}",
        text(&out)
    );
    assert!(
        !elsewhere.path().join("r.txt").exists(),
        "restored into the link's target"
    );
}
