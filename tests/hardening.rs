//! The engine's promises under abuse: SIGKILL at any moment, concurrent processes on one
//! cache, corrupted objects, gc during a run, a full or read-only disk. Each test drives the
//! real binary and would fail without the mechanism it checks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::raw::{engine, json_of, run, sigkill, spawn, stderr, Rng};

/// `engine verify` must exit 0 and report no problem.
fn assert_verified(dir: &Path, context: &str) {
    let out = run(dir, &["verify", "p.yaml", "--json"]);
    let v = json_of(&out);
    assert_eq!(
        v["problems"],
        serde_json::json!([]),
        "{context}: verify found problems: {v}"
    );
    assert!(
        out.status.success(),
        "{context}: verify failed: {}",
        stderr(&out)
    );
}

/// 30 shell stages with random short sleeps, random output sizes and random DAG edges.
fn chaos_pipeline(seed: u64) -> String {
    let mut rng = Rng(seed | 1);
    let mut text = String::from("name: chaos\nstages:\n");
    for i in 0..30 {
        let sleep = rng.below(15) as f64 / 100.0;
        let size = rng.below(200_000);
        let inputs = rng.upstreams(i);
        text.push_str(&format!("  s{i}:\n    op: shell\n"));
        if !inputs.is_empty() {
            text.push_str("    inputs: {");
            let parts: Vec<String> = inputs.iter().map(|u| format!("in{u}: s{u}")).collect();
            text.push_str(&parts.join(", "));
            text.push_str("}\n");
        }
        let cats: String = inputs
            .iter()
            .map(|u| format!(" $ENGINE_IN_IN{u}/out"))
            .collect();
        text.push_str(&format!(
            "    cmd: \"sleep {sleep}; head -c {size} /dev/zero | tr '\\\\0' '{c}' > $ENGINE_OUT/out; cat{cats} /dev/null >> $ENGINE_OUT/out; echo s{i} >> $ENGINE_OUT/out\"\n",
            c = (b'a' + (i % 26) as u8) as char
        ));
    }
    text
}

fn trees(out: &Output) -> Vec<(String, String)> {
    common::trees(&json_of(out))
}

#[test]
fn kill_nine_at_any_moment_leaves_a_consistent_cache() {
    let clean = tempfile::tempdir().unwrap();
    let text = chaos_pipeline(42);
    std::fs::write(clean.path().join("p.yaml"), &text).unwrap();
    let reference = run(clean.path(), &["run", "p.yaml", "-j", "2", "--json"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let expected = trees(&reference);
    assert_eq!(expected.len(), 30);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), &text).unwrap();
    let mut rng = Rng(7);
    for attempt in 0..25 {
        let mut child = spawn(dir.path(), &["run", "p.yaml", "-j", "2"]);
        std::thread::sleep(Duration::from_millis(rng.below(400) + 20));
        sigkill(&mut child);
        assert_verified(dir.path(), &format!("after kill {attempt}"));
    }
    let finished = run(dir.path(), &["run", "p.yaml", "-j", "2", "--json"]);
    assert!(finished.status.success(), "{}", stderr(&finished));
    assert_eq!(
        trees(&finished),
        expected,
        "outputs differ from a clean run"
    );
    assert_verified(dir.path(), "at the end");
    // Nothing left in scratch once no process runs.
    let again = run(dir.path(), &["run", "p.yaml", "--json"]);
    assert_eq!(json_of(&again)["counts"]["ran"], 0);
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join(".engine/tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "scratch leftovers: {tmp:?}");
}

fn counting_pipeline(stages: usize, sleep: &str) -> String {
    let mut text = String::from("name: count\nstages:\n");
    for i in 0..stages {
        let input = if i % 3 == 2 {
            format!("\n    inputs: {{up: s{}}}", i - 1)
        } else {
            String::new()
        };
        text.push_str(&format!(
            "  s{i}:\n    op: shell{input}\n    cmd: \"echo s{i} >> executions.log; sleep {sleep}; echo {i} > $ENGINE_OUT/o\"\n"
        ));
    }
    text
}

fn executions(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(dir.join("executions.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn concurrent(processes: usize) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), counting_pipeline(12, "0.2")).unwrap();
    let children: Vec<Child> = (0..processes)
        .map(|_| spawn(dir.path(), &["run", "p.yaml", "-j", "2"]))
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "a concurrent run failed: {err}");
        assert!(!err.to_lowercase().contains("lock"), "lock error: {err}");
    }
    let mut expected: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    expected.sort();
    assert_eq!(
        executions(dir.path()),
        expected,
        "each stage must execute exactly once"
    );
    assert_verified(dir.path(), "after concurrent runs");
}

#[test]
fn two_concurrent_runs_execute_each_stage_once() {
    concurrent(2);
}

#[test]
fn four_concurrent_runs_execute_each_stage_once() {
    concurrent(4);
}

#[test]
fn a_dead_claim_owner_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    // The first execution blocks; a takeover finds the marker and finishes at once.
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  slow:\n    op: shell\n    cmd: \"echo start >> executions.log; if [ ! -f marker ]; then touch marker; sleep 20; fi; echo done > $ENGINE_OUT/o\"\n",
    )
    .unwrap();
    let mut owner = spawn(dir.path(), &["run", "p.yaml"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.path().join("marker").exists() {
        assert!(
            Instant::now() < deadline,
            "the first run never started its stage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let waiter = spawn(dir.path(), &["run", "p.yaml", "--json"]);
    std::thread::sleep(Duration::from_millis(500));
    sigkill(&mut owner);
    let started = Instant::now();
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "takeover took {:?}",
        started.elapsed()
    );
    assert!(
        stderr(&out).contains("being run by another engine process"),
        "{}",
        stderr(&out)
    );
    assert_eq!(json_of(&out)["counts"]["ran"], 1);
    assert_eq!(executions(dir.path()).len(), 2);
    // Stop the orphaned sleep of the killed owner.
    let _ = Command::new("pkill").args(["-f", "sleep 20"]).status();
}

#[test]
fn a_corrupted_or_missing_object_is_recomputed_with_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  a: {op: shell, cmd: \"echo alpha > $ENGINE_OUT/o\"}\n  b: {op: shell, cmd: \"echo beta > $ENGINE_OUT/o\"}\n",
    )
    .unwrap();
    let first = run(dir.path(), &["run", "p.yaml", "--json"]);
    assert!(first.status.success());
    let v = json_of(&first);
    let blob = |name: &str| -> PathBuf {
        let s = v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap();
        PathBuf::from(s["outputs"]["o"]["path"].as_str().unwrap())
    };
    // Flip a byte in a's output and delete b's.
    let a = blob("a");
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[0] ^= 0xff;
    std::fs::set_permissions(&a, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&a, &bytes).unwrap();
    std::fs::remove_file(blob("b")).unwrap();

    let report = json_of(&run(dir.path(), &["verify", "p.yaml", "--json"]));
    assert_eq!(report["bad_runs"].as_array().unwrap().len(), 2, "{report}");

    let second = run(dir.path(), &["run", "p.yaml", "--json"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(json_of(&second)["counts"]["ran"], 2);
    assert_eq!(
        stderr(&second)
            .matches("warning: the cached result")
            .count(),
        1,
        "{}",
        stderr(&second)
    );
    assert_eq!(std::fs::read_to_string(&a).unwrap(), "alpha\n");
    assert_verified(dir.path(), "after recomputation");
}

#[test]
fn verify_repair_drops_records_so_stages_rerun() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  a: {op: shell, cmd: \"echo x > $ENGINE_OUT/o\"}\n",
    )
    .unwrap();
    let first = json_of(&run(dir.path(), &["run", "p.yaml", "--json"]));
    let tree = first["stages"][0]["tree"].as_str().unwrap().to_string();
    let obj = dir
        .path()
        .join(".engine/objects")
        .join(&tree[..2])
        .join(&tree[2..]);
    std::fs::remove_file(obj).unwrap();
    let out = run(dir.path(), &["verify", "p.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(dir.path(), &["verify", "p.yaml", "--repair"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped 1 records"));
    let status = json_of(&run(dir.path(), &["status", "p.yaml", "--json"]));
    assert_eq!(status["stages"][0]["status"], "stale");
}

#[test]
fn gc_never_deletes_what_a_running_process_holds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  a: {op: shell, cmd: \"echo a > $ENGINE_OUT/o\"}\n  b: {op: shell, inputs: {x: a}, cmd: \"sleep 1.5; cat $ENGINE_IN_X/o > $ENGINE_OUT/o\"}\n",
    )
    .unwrap();
    let runner = spawn(dir.path(), &["run", "p.yaml"]);
    std::thread::sleep(Duration::from_millis(500));
    // Keep nothing: if gc ran now it would delete a's result while b still needs it.
    let gc = run(
        dir.path(),
        &["gc", "--cache-dir", ".engine", "--older-than", "0s"],
    );
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(
        stderr(&gc).contains("waiting for running engine processes"),
        "{}",
        stderr(&gc)
    );
    let out = runner.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the run failed while gc ran: {}",
        stderr(&out)
    );
    assert_verified(dir.path(), "after gc during a run");
}

/// Mounts a small tmpfs, or explains why not. Outside CI a missing privilege skips the test.
struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            assert!(
                std::env::var("CI").is_err(),
                "CI must be able to mount a tmpfs (runs as root)"
            );
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Self(dir))
    }
    fn remount(&self, mode: &str) {
        let s = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success());
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_full_disk_stops_the_run_with_a_clear_error_and_records_nothing_partial() {
    let Some(fs) = Tmpfs::mount("1m") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = fs.0.join("cache");
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  small: {op: shell, cmd: \"echo ok > $ENGINE_OUT/o\"}\n  big: {op: shell, inputs: {s: small}, cmd: \"head -c 3000000 /dev/zero > $ENGINE_OUT/big\"}\n",
    )
    .unwrap();
    let cache_arg = cache.to_str().unwrap();
    let out = run(
        dir.path(),
        &["run", "p.yaml", "--cache-dir", cache_arg, "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("FAILED big"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let v = json_of(&out);
    assert_eq!(v["counts"]["failed"], 1);
    let verify = run(dir.path(), &["verify", "--cache-dir", cache_arg, "--json"]);
    assert_eq!(json_of(&verify)["problems"], serde_json::json!([]));
    // The good result survived and is reused.
    let status = json_of(&run(
        dir.path(),
        &["status", "p.yaml", "--cache-dir", cache_arg, "--json"],
    ));
    assert_eq!(status["stages"][0]["status"], "cached");
}

#[test]
fn a_read_only_cache_gives_a_clear_error_and_keeps_its_results() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = fs.0.join("cache");
    let cache_arg = cache.to_str().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  a: {op: shell, cmd: \"echo ${vars.v} > $ENGINE_OUT/o\"}\nvars: {v: 1}\n",
    )
    .unwrap();
    assert!(
        run(dir.path(), &["run", "p.yaml", "--cache-dir", cache_arg])
            .status
            .success()
    );
    fs.remount("ro");
    let out = run(
        dir.path(),
        &[
            "run",
            "p.yaml",
            "--cache-dir",
            cache_arg,
            "--set",
            "vars.v=2",
        ],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("Read-only file system") || stderr(&out).contains("readonly"),
        "{}",
        stderr(&out)
    );
    fs.remount("rw");
    let status = json_of(&run(
        dir.path(),
        &["status", "p.yaml", "--cache-dir", cache_arg, "--json"],
    ));
    assert_eq!(status["stages"][0]["status"], "cached");
    let verify = run(dir.path(), &["verify", "--cache-dir", cache_arg, "--json"]);
    assert_eq!(json_of(&verify)["problems"], serde_json::json!([]));
}

/// Reads a child's stderr lines on a thread so the test can wait for a given line.
fn line_reader(stream: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for(rx: &std::sync::mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return;
            }
        }
    }
    panic!("no line containing {needle:?}; saw:\n{}", seen.join("\n"));
}

#[test]
fn watch_reruns_exactly_the_stage_whose_dep_changed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("input.txt"), "one\n").unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "stages:\n  reader:\n    op: shell\n    deps: [input.txt]\n    cmd: \"echo reader >> executions.log; cat input.txt > $ENGINE_OUT/o\"\n  other:\n    op: shell\n    cmd: \"echo other >> executions.log; echo x > $ENGINE_OUT/o\"\n",
    )
    .unwrap();
    let mut child = engine()
        .current_dir(dir.path())
        .args(["watch", "p.yaml", "--debounce", "200ms"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let rx = line_reader(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    wait_for(&rx, "watching", &mut seen);
    assert_eq!(executions(dir.path()), ["other", "reader"]);

    std::fs::write(dir.path().join("input.txt"), "two\n").unwrap();
    wait_for(&rx, "changed:", &mut seen);
    wait_for(&rx, "watching", &mut seen);
    assert_eq!(executions(dir.path()), ["other", "reader", "reader"]);
    assert!(
        seen.iter()
            .any(|l| l.contains("deps file input.txt changed")),
        "{}",
        seen.join("\n")
    );

    // An invalid pipeline mid-edit is reported; watching goes on.
    std::fs::write(dir.path().join("p.yaml"), "stages: [\n").unwrap();
    wait_for(&rx, "malformed YAML", &mut seen);
    wait_for(&rx, "still watching", &mut seen);
    assert!(
        child.try_wait().unwrap().is_none(),
        "watch exited on a bad pipeline"
    );

    // SAFETY: kill(2) on the child we spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(executions(dir.path()).len(), 3);
}
