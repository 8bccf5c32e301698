//! What a stage's processes can do to the engine's promises: outlive a killed engine, run twice
//! at once after a take-over, write into an output after it was hashed, write into the store
//! through an input, hold the output pipes past a timeout, hand the engine a FIFO as
//! `metrics.json`, print more than fits in memory. Each test drives the real binary and fails
//! on an engine without the mechanism it checks (issue 13, defects 2, 3, 4 and 9).

mod common;

use std::time::{Duration, Instant};

use common::raw::sigkill;
use common::Workspace;

fn wait_for_file(ws: &Workspace, rel: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ws.join(rel).exists() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn pids(ws: &Workspace, rel: &str) -> Vec<i32> {
    ws.lines(rel)
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `engine verify` exits 0 and reports no problem.
fn assert_verified(ws: &Workspace) {
    let out = ws.engine(&["verify", "pipeline.yaml", "--json"]);
    out.expect_code(0);
    assert_eq!(
        out.json()["problems"],
        serde_json::json!([]),
        "{}",
        out.stdout
    );
}

#[test]
fn a_killed_engine_takes_its_stage_processes_with_it() {
    // The stage leaves a child in its own session; both must die with the engine.
    let ws = Workspace::new(
        "stages:\n  slow:\n    op: shell\n    cmd: \"setsid sh -c 'echo $$ >> pids; exec sleep 60' & echo $$ >> pids; sleep 60\"\n",
    );
    let mut engine = ws
        .command(&["run", "pipeline.yaml"])
        .spawn()
        .expect("start the engine");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids(&ws, "pids").len() < 2 {
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigkill(&mut engine);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stage_pids = pids(&ws, "pids");
    while stage_pids.iter().any(|&p| pid_alive(p)) {
        assert!(
            Instant::now() < deadline,
            "stage processes {stage_pids:?} outlived the killed engine"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_take_over_never_runs_beside_the_killed_owners_stage() {
    // The stage ignores SIGTERM, so the killed owner's copy lives through the grace period.
    // `flock -n` records an overlap if a second copy starts while the first one lives.
    let ws = Workspace::new(
        "stages:\n  slow:\n    op: shell\n    cmd: \"trap '' TERM; flock -n stage.lock -c 'echo start >> trace; touch started; sleep 3; echo end >> trace' || echo OVERLAP >> trace; echo ok > $ENGINE_OUT/o\"\n",
    );
    let mut owner = ws
        .command(&["run", "pipeline.yaml"])
        .spawn()
        .expect("start the engine");
    wait_for_file(&ws, "started", "the first run never started its stage");
    let waiter = ws
        .command(&["run", "pipeline.yaml", "--json"])
        .spawn()
        .expect("start the second engine");
    std::thread::sleep(Duration::from_millis(300));
    sigkill(&mut owner);
    let out = common::wait_with_limit(waiter, Duration::from_secs(60));
    out.expect_code(0);
    assert_eq!(
        ws.lines("trace"),
        ["start", "start", "end"],
        "{}",
        out.stderr
    );
    assert_verified(&ws);
}

/// A background child writes into an output file after the command exits, through a
/// descriptor it holds (so the write reaches the file even after it moved into the store).
fn background_writer(launch: &str) {
    let ws = Workspace::new(&format!(
        "stages:\n  s:\n    op: shell\n    cmd: \"echo ok > $ENGINE_OUT/a; exec 3>>$ENGINE_OUT/a; {launch} sh -c 'sleep 1; echo TAMPERED >&3; echo wrote >> $ENGINE_WORKSPACE/wrote' &\"\n"
    ));
    let doc = ws.run_ok(&[]);
    let stage = common::stage(&doc, "s");
    assert_eq!(common::output_text(stage, "a"), "ok\n");
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        common::output_text(stage, "a"),
        "ok\n",
        "the child changed a stored object"
    );
    assert_eq!(
        ws.read("wrote"),
        "",
        "the background child was still running"
    );
    assert_verified(&ws);
    let again = ws.run_ok(&[]);
    assert_eq!(common::with_status(&again, "cached"), ["s"]);
}

#[test]
fn a_background_child_cannot_change_a_stored_output() {
    background_writer("");
}

#[test]
fn a_background_child_in_a_new_session_cannot_change_a_stored_output() {
    background_writer("setsid");
}

#[test]
fn a_timeout_stops_a_stage_whose_grandchild_holds_the_pipes() {
    let ws = Workspace::new(
        "stages:\n  s:\n    op: shell\n    timeout: 1s\n    cmd: \"setsid sleep 60 & sleep 60\"\n",
    );
    let out = ws.engine(&["run", "pipeline.yaml"]);
    out.expect_code(1);
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    assert!(out.elapsed < Duration::from_secs(15), "{:?}", out.elapsed);
}

#[test]
fn a_command_that_leaves_a_pipe_holder_behind_finishes_when_it_exits() {
    let ws = Workspace::new(
        "stages:\n  s:\n    op: shell\n    cmd: \"setsid sleep 60 & echo ok > $ENGINE_OUT/o\"\n",
    );
    let out = ws.engine(&["run", "pipeline.yaml"]);
    out.expect_code(0);
    assert!(out.elapsed < Duration::from_secs(15), "{:?}", out.elapsed);
}

#[test]
fn metrics_json_that_is_not_a_regular_file_fails_the_stage_at_once() {
    for make in [
        "mkfifo $ENGINE_OUT/metrics.json",
        "ln -s /dev/zero $ENGINE_OUT/metrics.json",
    ] {
        let ws = Workspace::new(&format!(
            "stages:\n  s:\n    op: shell\n    cmd: \"{make}\"\n"
        ));
        let out = ws.engine(&["run", "pipeline.yaml"]);
        out.expect_code(1);
        assert!(
            out.stderr.contains("not a regular file"),
            "{make}: {}",
            out.stderr
        );
        assert!(
            out.elapsed < Duration::from_secs(15),
            "{make}: {:?}",
            out.elapsed
        );
    }
}

#[test]
fn a_stage_that_writes_through_its_input_fails_and_nothing_built_on_it_is_cached() {
    let pipeline = |b_cmd: &str| {
        format!(
            "stages:\n  a:\n    op: shell\n    cmd: \"echo data > $ENGINE_OUT/x\"\n  b:\n    op: shell\n    inputs: {{a: a}}\n    cmd: \"{b_cmd}\"\n"
        )
    };
    let ws = Workspace::new(&pipeline(
        "chmod u+w $ENGINE_IN_A/x; echo bad >> $ENGINE_IN_A/x; cat $ENGINE_IN_A/x > $ENGINE_OUT/y",
    ));
    let out = ws.engine(&["run", "pipeline.yaml"]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("changed its input a/x"),
        "{}",
        out.stderr
    );
    // A well-behaved b now: a's damaged result is recomputed, b reads the original bytes.
    ws.write(
        "pipeline.yaml",
        &pipeline("cat $ENGINE_IN_A/x > $ENGINE_OUT/y"),
    );
    let doc = ws.run_ok(&[]);
    assert_eq!(common::with_status(&doc, "ran"), ["a", "b"]);
    assert_eq!(common::output_text(common::stage(&doc, "b"), "y"), "data\n");
    assert_verified(&ws);
}

#[test]
fn a_stage_that_only_changes_an_inputs_mode_succeeds_and_the_store_is_restored() {
    let ws = Workspace::new(
        "stages:\n  a:\n    op: shell\n    cmd: \"echo data > $ENGINE_OUT/x\"\n  b:\n    op: shell\n    inputs: {a: a}\n    cmd: \"chmod 666 $ENGINE_IN_A/x; cat $ENGINE_IN_A/x > $ENGINE_OUT/y\"\n",
    );
    let doc = ws.run_ok(&[]);
    let x = common::stage(&doc, "a")["outputs"]["x"]["path"]
        .as_str()
        .expect("a's output path")
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&x).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o222, 0, "the object is writable again: {mode:o}");
    assert_verified(&ws);
}

#[test]
fn a_stage_log_of_hundreds_of_megabytes_is_streamed_not_held_in_memory() {
    let ws = Workspace::new(
        "stages:\n  loud:\n    op: shell\n    cmd: \"head -c 200000000 /dev/zero | tr '\\\\0' 'a'; echo; echo last line\"\n",
    );
    let child = ws
        .command(&["run", "pipeline.yaml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the engine");
    // The engine's own (anonymous) memory, sampled while it runs: hashing the stored log
    // maps the file, and mapped file pages are page cache, not the engine's memory.
    let mut child = child;
    let status_file = format!("/proc/{}/status", child.id());
    let mut max_anon_kib = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the engine") {
            break status;
        }
        let anon = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("RssAnon:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        max_anon_kib = max_anon_kib.max(anon);
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    assert!(max_anon_kib > 0, "never sampled the engine's memory");
    assert!(
        max_anon_kib < 64 * 1024,
        "the engine held {} MiB for a 200 MB log",
        max_anon_kib / 1024
    );
    let logs = ws.engine(&["logs", "pipeline.yaml", "loud"]);
    logs.expect_code(0);
    assert!(logs.stdout.ends_with("last line\n"));
    assert!(logs.stdout.len() > 200_000_000);
}
