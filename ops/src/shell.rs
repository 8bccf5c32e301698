//! The `shell` op: runs a command with its inputs and output folder in the environment.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::{parse_params, Metrics, Op, OpError, ParamError, RunContext};

/// Lines a command prints that start with this marker are shown as the stage's progress.
pub const PROGRESS_MARKER: &str = "::progress::";

/// Runs `cmd` with `sh -c` (a string) or directly (an argv list), in the workspace folder.
pub struct ShellOp;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellParams {
    pub cmd: ShellCommand,
    /// Workspace files or folders read by the command; their content is part of the key.
    #[serde(default)]
    pub deps: Vec<String>,
    /// Workspace paths the command writes; captured and restored after a cache hit.
    #[serde(default)]
    pub outs: Vec<String>,
    /// Extra environment variables; part of the key.
    #[serde(default)]
    pub env: BTreeMap<String, Scalar>,
}

/// `cmd: "a string for sh -c"` or `cmd: [argv, list]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a command string or a list of arguments")]
pub enum ShellCommand {
    Shell(String),
    Argv(Vec<Scalar>),
}

/// A YAML scalar usable as an environment value or argument.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string, number or boolean")]
pub enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Str(s) => f.write_str(s),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Op for ShellOp {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "run a command (sh -c) with ENGINE_OUT, ENGINE_IN_<NAME> and ENGINE_SEED set"
    }

    fn validate(&self, params: &Value) -> Result<(), ParamError> {
        let p: ShellParams = parse_params(params)?;
        if let ShellCommand::Argv(argv) = &p.cmd {
            if argv.is_empty() {
                return Err(ParamError::new("cmd", "the argument list is empty")
                    .with_fix("give the program to run as the first element"));
            }
        }
        for key in p.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ParamError::new(
                    format!("env.{key}"),
                    "not a valid environment variable name",
                ));
            }
        }
        Ok(())
    }

    fn deps(&self, params: &Value) -> Vec<String> {
        parse_params::<ShellParams>(params)
            .map(|p| p.deps)
            .unwrap_or_default()
    }

    fn outs(&self, params: &Value) -> Vec<String> {
        parse_params::<ShellParams>(params)
            .map(|p| p.outs)
            .unwrap_or_default()
    }

    fn run(&self, ctx: &mut RunContext<'_>) -> Result<(), OpError> {
        let params: ShellParams = parse_params(ctx.params)?;
        let mut command = match &params.cmd {
            ShellCommand::Shell(line) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(line);
                c
            }
            ShellCommand::Argv(argv) => {
                let mut c = Command::new(argv[0].to_string());
                c.args(argv[1..].iter().map(|a| a.to_string()));
                c
            }
        };
        command
            .current_dir(ctx.workspace)
            .env("ENGINE_OUT", ctx.out_dir)
            .env("ENGINE_SEED", ctx.seed.to_string())
            .env("ENGINE_CPUS", ctx.cpus.to_string())
            .env("ENGINE_WORKSPACE", ctx.workspace);
        for (name, input) in ctx.inputs {
            command.env(input_var(name), input.root());
        }
        for (key, value) in &params.env {
            command.env(key, value.to_string());
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches the engine only, which then stops
            // the whole group (the command and everything it started) on purpose.
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| OpError::io(format!("cannot start {:?}", params.cmd), e))?;
        crate::children::register(child.id());
        let outcome = supervise(&mut child, ctx);
        crate::children::unregister(child.id());
        let status = outcome?;
        if !status.success() {
            return Err(OpError::Failed(match status.code() {
                Some(code) => format!("command exited with status {code}"),
                None => "command was killed by a signal".to_string(),
            }));
        }
        ctx.metrics = read_metrics(&ctx.out_dir.join("metrics.json"))?;
        Ok(())
    }
}

/// `ENGINE_IN_<NAME>`: upper case, anything but letters and digits becomes `_`.
pub fn input_var(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("ENGINE_IN_{cleaned}")
}

enum Stream {
    Line(Vec<u8>),
    Closed,
}

/// Copies the child's output into the log, forwards progress lines, and stops the child's
/// process group on cancellation.
fn supervise(
    child: &mut Child,
    ctx: &mut RunContext<'_>,
) -> Result<std::process::ExitStatus, OpError> {
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(spawn_reader(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(spawn_reader(err, tx.clone()));
    }
    drop(tx);
    let mut open_streams = readers.len();
    let mut status = None;
    loop {
        if ctx.cancel.is_cancelled() {
            terminate_group(child);
            for r in readers {
                let _ = r.join();
            }
            return Err(OpError::Cancelled);
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Stream::Line(line)) => {
                if let Some(rest) = line.strip_prefix(PROGRESS_MARKER.as_bytes()) {
                    ctx.progress.report(String::from_utf8_lossy(rest).trim());
                }
                ctx.log
                    .write_all(&line)
                    .map_err(|e| OpError::io("cannot write the stage log", e))?;
            }
            Ok(Stream::Closed) => open_streams -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open_streams = 0,
        }
        if status.is_none() {
            status = child
                .try_wait()
                .map_err(|e| OpError::io("cannot wait for the command", e))?;
        }
        if let (Some(status), 0) = (status, open_streams) {
            for r in readers {
                let _ = r.join();
            }
            return Ok(status);
        }
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    tx: mpsc::Sender<Stream>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(Stream::Line(line)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Stream::Closed);
    })
}

/// SIGTERM to the group, then SIGKILL if it has not gone within two seconds.
fn terminate_group(child: &mut Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above. The group may hold grandchildren that outlived the leader.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// `metrics.json` in the output folder: a flat object of name -> number.
fn read_metrics(path: &Path) -> Result<Metrics, OpError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Metrics::new()),
        Err(e) => return Err(OpError::io(format!("cannot read {}", path.display()), e)),
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        OpError::Failed(format!(
            "metrics.json is not valid JSON ({e}); write a flat object of name -> number"
        ))
    })?;
    let Value::Object(map) = value else {
        return Err(OpError::Failed(
            "metrics.json must be a flat object of name -> number".to_string(),
        ));
    };
    let mut metrics = Metrics::new();
    for (name, value) in map {
        let number = value.as_f64().ok_or_else(|| {
            OpError::Failed(format!(
                "metrics.json: '{name}' is {value}, not a number; metrics are flat name -> number"
            ))
        })?;
        metrics.insert(name, number);
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CancelFlag, Input, Progress};
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    fn run(
        params: Value,
        inputs: BTreeMap<String, Input>,
    ) -> (Result<(), OpError>, Metrics, String) {
        let ws = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let cancel = CancelFlag::new();
        let progress = Progress::silent();
        let mut log = Vec::new();
        let mut ctx = RunContext {
            params: &params,
            inputs: &inputs,
            out_dir: out.path(),
            workspace: ws.path(),
            seed: 7,
            cpus: 1,
            cancel: &cancel,
            progress: &progress,
            log: &mut log,
            metrics: Metrics::new(),
        };
        let result = ShellOp.run(&mut ctx);
        let metrics = ctx.metrics.clone();
        (result, metrics, String::from_utf8_lossy(&log).into_owned())
    }

    #[test]
    fn writes_metrics_and_log() {
        let (result, metrics, log) = run(
            json!({"cmd": "echo hello; echo \"{\\\"acc\\\": 0.5, \\\"seed\\\": $ENGINE_SEED}\" > $ENGINE_OUT/metrics.json"}),
            BTreeMap::new(),
        );
        result.unwrap();
        assert_eq!(metrics.get("acc"), Some(&0.5));
        assert_eq!(metrics.get("seed"), Some(&7.0));
        assert!(log.contains("hello"));
    }

    #[test]
    fn failing_command_reports_status() {
        let (result, _, _) = run(json!({"cmd": "exit 3"}), BTreeMap::new());
        let err = result.unwrap_err().to_string();
        assert!(err.contains("status 3"), "{err}");
    }

    #[test]
    fn argv_form_and_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.txt"), "42").unwrap();
        let mut inputs = BTreeMap::new();
        inputs.insert("my-data".to_string(), Input::One(dir.path().to_path_buf()));
        let (result, _, log) = run(
            json!({"cmd": ["sh", "-c", "cat $ENGINE_IN_MY_DATA/x.txt"]}),
            inputs,
        );
        result.unwrap();
        assert!(log.contains("42"), "{log}");
    }

    #[test]
    fn bad_metrics_fail_the_stage() {
        let (result, _, _) = run(
            json!({"cmd": "echo '{\"a\": \"x\"}' > $ENGINE_OUT/metrics.json"}),
            BTreeMap::new(),
        );
        assert!(result.unwrap_err().to_string().contains("not a number"));
    }

    #[test]
    fn validation_names_the_field() {
        let err = ShellOp
            .validate(&json!({"cmd": "x", "bogus": 1}))
            .unwrap_err();
        assert!(err.message.contains("bogus"), "{err:?}");
        let err = ShellOp
            .validate(&json!({"cmd": "x", "deps": 3}))
            .unwrap_err();
        assert_eq!(err.path, "deps");
    }

    #[test]
    fn cancellation_kills_the_group() {
        let ws = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let cancel = CancelFlag::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let progress = Progress::new(move |m| seen2.lock().unwrap().push(m.to_string()));
        let params = json!({"cmd": "echo '::progress:: step 1'; sleep 30 & sleep 30"});
        let inputs = BTreeMap::new();
        let mut log = Vec::new();
        let c2 = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c2.cancel();
        });
        let start = Instant::now();
        let mut ctx = RunContext {
            params: &params,
            inputs: &inputs,
            out_dir: out.path(),
            workspace: ws.path(),
            seed: 0,
            cpus: 1,
            cancel: &cancel,
            progress: &progress,
            log: &mut log,
            metrics: Metrics::new(),
        };
        let result = ShellOp.run(&mut ctx);
        t.join().unwrap();
        assert!(matches!(result, Err(OpError::Cancelled)));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(seen.lock().unwrap().as_slice(), ["step 1"]);
    }
}
