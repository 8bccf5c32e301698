//! Running pipelines through a real Slurm cluster (`tests/slurm/start-cluster.sh` starts a
//! single-node one). In CI (CI set) a missing cluster fails these tests; elsewhere they skip
//! with a printed reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One test at a time: they share the cluster's two CPUs and its queue.
static CLUSTER: Mutex<()> = Mutex::new(());

fn cluster_ready() -> bool {
    let ok = Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output()
        .map(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "no Slurm cluster: .ci/run must start one with tests/slurm/start-cluster.sh"
        );
        eprintln!("skipped: no Slurm cluster (run tests/slurm/start-cluster.sh as root)");
    }
    ok
}

/// A folder with an `sbatch` wrapper that counts submissions before calling the real one.
struct Workspace {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Workspace {
    fn new(pipeline: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), pipeline).unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let real = which("sbatch");
        let wrapper = bin.join("sbatch");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\ncase \"$*\" in *--version*) ;; *) echo submit >> '{}' ;; esac\nexec '{}' \"$@\"\n",
                dir.path().join("submissions.log").display(),
                real.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Self { dir, bin }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn engine(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_engine"));
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.current_dir(self.path())
            .env("PATH", path)
            .env_remove("ENGINE_CACHE_DIR");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.engine().args(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.engine()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn lines(&self, file: &str) -> usize {
        std::fs::read_to_string(self.path().join(file))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn wait_for_lines(&self, file: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.lines(file) < n {
            assert!(Instant::now() < deadline, "{file} never reached {n} lines");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn trees(v: &Value) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["tree"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    t.sort();
    t
}

fn our_active_jobs(ws: &Workspace) -> usize {
    let out = Command::new("squeue")
        .args(["-h", "-o", "%i %o"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(ws.path().to_str().unwrap()))
        .count()
}

const MATRIX: &str = r#"
name: cluster
stages:
  make:
    op: shell
    cmd: "seq 5 > $ENGINE_OUT/n.txt; echo make >> executions.log"
  power:
    op: shell
    matrix: {p: [1, 2, 3]}
    inputs: {n: make}
    cmd: "awk '{print $1^${matrix.p}}' $ENGINE_IN_N/n.txt > $ENGINE_OUT/v.txt; echo power >> executions.log"
  total:
    op: shell
    inputs: {parts: "power[*]"}
    cmd: "cat $ENGINE_IN_PARTS/*/v.txt | sort -n > $ENGINE_OUT/all.txt; echo total >> executions.log"
"#;

#[test]
fn a_matrix_runs_through_slurm_like_it_runs_locally_and_cached_stages_submit_nothing() {
    let _guard = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    if !cluster_ready() {
        return;
    }
    let local = Workspace::new(MATRIX);
    let expected = json_of(&local.run(&["run", "p.yaml", "--json"]));
    let ws = Workspace::new(MATRIX);
    let out = ws.run(&["run", "p.yaml", "--executor", "slurm", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert_eq!(v["counts"]["ran"], 5);
    assert_eq!(
        trees(&v),
        trees(&expected),
        "Slurm outputs differ from the local run's"
    );
    let submitted = ws.lines("submissions.log");
    assert_eq!(submitted, 6, "5 stages + 1 filesystem probe");

    let again = ws.run(&["run", "p.yaml", "--executor", "slurm", "--json"]);
    assert_eq!(json_of(&again)["counts"]["cached"], 5);
    assert_eq!(
        ws.lines("submissions.log"),
        submitted,
        "cached stages must submit nothing"
    );
}

#[test]
fn a_killed_driver_is_restarted_and_adopts_its_jobs() {
    let _guard = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    if !cluster_ready() {
        return;
    }
    let ws = Workspace::new(
        "stages:\n  a: {op: shell, cmd: \"echo a >> executions.log; sleep 4; echo a > $ENGINE_OUT/o\"}\n  b: {op: shell, cmd: \"echo b >> executions.log; sleep 4; echo b > $ENGINE_OUT/o\"}\n",
    );
    let mut driver = ws.spawn(&["run", "p.yaml", "--executor", "slurm"]);
    ws.wait_for_lines("executions.log", 2);
    // SAFETY: kill(2) on the child we spawned.
    unsafe {
        libc::kill(driver.id() as i32, libc::SIGKILL);
    }
    let _ = driver.wait();
    let submitted = ws.lines("submissions.log");
    let out = ws.run(&["run", "p.yaml", "--executor", "slurm", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("adopted Slurm job").count(), 2, "{err}");
    assert_eq!(json_of(&out)["counts"]["ran"], 2);
    assert_eq!(
        ws.lines("submissions.log"),
        submitted,
        "the restarted driver resubmitted"
    );
    assert_eq!(ws.lines("executions.log"), 2, "a stage executed twice");
    let verify = ws.run(&["verify", "p.yaml"]);
    assert!(verify.status.success());
}

#[test]
fn ctrl_c_on_the_driver_cancels_its_jobs_and_records_nothing() {
    let _guard = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    if !cluster_ready() {
        return;
    }
    let ws = Workspace::new("stages:\n  slow: {op: shell, cmd: \"echo s >> executions.log; sleep 60; echo x > $ENGINE_OUT/o\"}\n");
    let driver = ws.spawn(&["run", "p.yaml", "--executor", "slurm"]);
    ws.wait_for_lines("executions.log", 1);
    assert_eq!(our_active_jobs(&ws), 1);
    // SAFETY: kill(2) on the child we spawned.
    unsafe {
        libc::kill(driver.id() as i32, libc::SIGINT);
    }
    let started = Instant::now();
    let out = driver.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while our_active_jobs(&ws) > 0 {
        assert!(Instant::now() < deadline, "the job was not cancelled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = json_of(&ws.run(&["status", "p.yaml", "--json"]));
    assert_eq!(status["stages"][0]["status"], "stale");
    assert_eq!(
        status["stages"][0]["never_run"], true,
        "a cancelled job left a record"
    );
}

#[test]
fn a_job_over_its_time_limit_is_retried_then_reported() {
    let _guard = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    if !cluster_ready() {
        return;
    }
    let ws = Workspace::new(
        "stages:\n  slow:\n    op: shell\n    retries: 1\n    resources: {time: \"0:02\"}\n    cmd: \"echo s >> executions.log; sleep 300\"\n",
    );
    let out = ws.run(&["run", "p.yaml", "--executor", "slurm", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resubmitting"), "{err}");
    assert!(err.contains("ended without a result"), "{err}");
    assert_eq!(ws.lines("executions.log"), 2, "one retry expected");
    assert_eq!(json_of(&out)["counts"]["failed"], 1);
}
