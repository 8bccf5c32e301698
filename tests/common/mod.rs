//! Shared helpers for the integration tests: a temporary workspace holding a pipeline file,
//! and a way to run the real `engine` binary in it with a hard time limit.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of the binary under test.
pub const ENGINE: &str = env!("CARGO_BIN_EXE_engine");

/// No single engine invocation in these tests should come near this.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// What one `engine` invocation did.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// stdout parsed as one JSON value; panics with both streams if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON value ({e})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// A temporary folder holding `pipeline.yaml` (and whatever the test writes beside it). Its
/// default cache is `.engine/` inside it.
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(pipeline: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("engine-it-")
            .tempdir()
            .expect("create a temp dir");
        let ws = Self { dir };
        ws.write("pipeline.yaml", pipeline);
        ws
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The file's text, or "" when it does not exist.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.join(rel)).unwrap_or_default()
    }

    /// Lines of a side file the stages append to: one line per execution.
    pub fn lines(&self, rel: &str) -> Vec<String> {
        self.read(rel).lines().map(str::to_string).collect()
    }

    /// How many times `word` appears as a whole line in the side file `rel`.
    pub fn count_line(&self, rel: &str, word: &str) -> usize {
        self.lines(rel)
            .iter()
            .filter(|l| l.as_str() == word)
            .count()
    }

    /// Runs `engine ARGS` with this workspace as the current folder.
    pub fn engine(&self, args: &[&str]) -> Outcome {
        let child = self.command(args).spawn().expect("start the engine binary");
        wait_with_limit(child, COMMAND_LIMIT)
    }

    /// A command for `engine ARGS` in this workspace, with a clean environment for the
    /// variables the engine reads.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ENGINE);
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("ENGINE_CACHE_DIR")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// `engine run pipeline.yaml --json EXTRA`, expecting exit code 0; returns the JSON.
    pub fn run_ok(&self, extra: &[&str]) -> Value {
        let mut args = vec!["run", "pipeline.yaml", "--json"];
        args.extend_from_slice(extra);
        let out = self.engine(&args);
        out.expect_code(0);
        out.json()
    }

    /// Relative paths of every file under `rel` (recursively), sorted.
    pub fn files_under(&self, rel: &str) -> Vec<String> {
        let root = self.join(rel);
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out.sort();
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// Waits for `child`, collecting its output; kills it and panics past `limit`.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Outcome {
    let start = Instant::now();
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("wait for the engine") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("engine did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Outcome {
        // A signal death has no code; -1 never equals an expected code.
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
        elapsed,
    }
}

fn reader(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stream {
            let mut bytes = Vec::new();
            let _ = s.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// The stage object named `name` in a `{"stages": [...]}` document.
pub fn stage<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage '{name}' in {doc:#}"))
}

/// `name -> status` of every stage in a `{"stages": [...]}` document, in order.
pub fn statuses(doc: &Value) -> Vec<(String, String)> {
    doc["stages"]
        .as_array()
        .expect("a stages list")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("?").to_string(),
                s["status"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// Names of the stages with `status`, in order.
pub fn with_status(doc: &Value, status: &str) -> Vec<String> {
    statuses(doc)
        .into_iter()
        .filter(|(_, s)| s == status)
        .map(|(n, _)| n)
        .collect()
}

/// `(name, output tree)` of every stage in a `{"stages": [...]}` document, sorted by name.
pub fn trees(doc: &Value) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = doc["stages"]
        .as_array()
        .expect("a stages list")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_string(),
                s["tree"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    t.sort();
    t
}

/// The bytes of a stage output file, read through the object path the JSON gives.
pub fn output_text(stage: &Value, file: &str) -> String {
    let path = stage["outputs"][file]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no output '{file}' in {stage:#}"));
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

pub fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub mod raw;
pub mod reject;
