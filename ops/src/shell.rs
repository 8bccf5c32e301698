//! The `shell` op: runs a command with its inputs and output folder in the environment.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::supervisor::{CommandSpec, Ended, Supervised};
use crate::{Metrics, OpError, Outputs, ParamError, RunContext, TypedOp};

/// Lines a command prints that start with this marker are shown as the stage's progress.
pub const PROGRESS_MARKER: &str = "::progress::";

/// Runs `cmd` with `sh -c` (a string) or directly (an argv list), in the workspace folder.
pub struct ShellOp;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShellParams {
    /// The command: a string run with `sh -c`, or an argument list run directly (no shell).
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
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged, expecting = "a command string or a list of arguments")]
pub enum ShellCommand {
    Shell(String),
    Argv(Vec<Scalar>),
}

/// A YAML scalar usable as an environment value or argument.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
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

impl TypedOp for ShellOp {
    const NAME: &'static str = "shell";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "run a command (sh -c) with ENGINE_OUT, ENGINE_IN_<NAME> and ENGINE_SEED set";
    type Params = ShellParams;
    type Config = ShellParams;

    fn resolve(p: ShellParams) -> Result<ShellParams, ParamError> {
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
        Ok(p)
    }

    fn deps(p: &ShellParams) -> Vec<String> {
        p.deps.clone()
    }

    fn outs(p: &ShellParams) -> Vec<String> {
        p.outs.clone()
    }

    fn run(
        &self,
        params: &ShellParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let (program, args): (OsString, Vec<OsString>) = match &params.cmd {
            ShellCommand::Shell(line) => ("sh".into(), vec!["-c".into(), line.into()]),
            ShellCommand::Argv(argv) => (
                argv[0].to_string().into(),
                argv[1..].iter().map(|a| a.to_string().into()).collect(),
            ),
        };
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        env.insert("ENGINE_OUT".into(), ctx.out_dir.into());
        env.insert("ENGINE_SEED".into(), ctx.seed.to_string().into());
        env.insert("ENGINE_CPUS".into(), ctx.cpus.to_string().into());
        env.insert("ENGINE_WORKSPACE".into(), ctx.workspace.into());
        for (name, input) in ctx.inputs {
            env.insert(input_var(name).into(), input.root().into());
        }
        for (key, value) in &params.env {
            env.insert(key.into(), value.to_string().into());
        }
        let spec = CommandSpec {
            program,
            args,
            env: env.into_iter().collect(),
            cwd: ctx.workspace.to_path_buf(),
            // Held until the last process of the command is gone: the store's clean-up and a
            // take-over of this stage wait for it.
            lock_folder: Some(ctx.out_dir.to_path_buf()),
        };
        let describe = || format!("{:?}", params.cmd);
        let mut child = Supervised::spawn(&spec)
            .map_err(|e| OpError::io(format!("cannot start {}", describe()), e))?;
        crate::children::register(&child);
        let outcome = supervise(&mut child, ctx);
        crate::children::unregister(&child);
        let ended = outcome?;
        match ended {
            Ended::Exited(0) => {}
            Ended::Exited(code) => {
                return Err(OpError::Failed(format!(
                    "command exited with status {code}"
                )))
            }
            Ended::Signalled(sig) => {
                return Err(OpError::Failed(format!(
                    "command was killed by signal {sig}"
                )))
            }
            Ended::NotStarted(errno) => {
                return Err(OpError::io(
                    format!("cannot start {}", describe()),
                    std::io::Error::from_raw_os_error(errno),
                ))
            }
            Ended::Unknown => {
                return Err(OpError::Failed(
                    "the command's supervisor was killed; its outcome is unknown".to_string(),
                ))
            }
        }
        out.set_metrics(read_metrics(&out.path(crate::METRICS_FILE))?);
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

/// A piece of a command's output, as read.
enum Stream {
    Chunk(usize, Vec<u8>),
    Closed,
}

/// Bytes read from a pipe at once; with [`CHANNEL_CHUNKS`], bounds what a command's output
/// holds in memory however much it prints.
const CHUNK: usize = 64 * 1024;
const CHANNEL_CHUNKS: usize = 16;
/// Progress lines are shown up to this many bytes (logged whole).
const MAX_PROGRESS_LINE: usize = 4096;
/// After the supervisor has exited, how long its output pipes may stay open (only a process
/// outside the stage's tree, handed the pipe on purpose, can hold them).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// Copies the command's output into the log as it comes, forwards progress lines, and stops
/// the command on cancellation. Returns once the supervisor has exited, which it does only
/// when every process of the command is gone.
fn supervise(child: &mut Supervised, ctx: &mut RunContext<'_>) -> Result<Ended, OpError> {
    let (tx, rx) = mpsc::sync_channel(CHANNEL_CHUNKS);
    let mut readers = Vec::new();
    for (i, stream) in [child.stdout.take(), child.stderr.take()]
        .into_iter()
        .enumerate()
    {
        if let Some(stream) = stream {
            readers.push(spawn_reader(i, stream, tx.clone()));
        }
    }
    drop(tx);
    let mut lines = [Vec::new(), Vec::new()];
    let mut open_streams = readers.len();
    let mut exited_at: Option<Instant> = None;
    let mut cancelled = false;
    loop {
        if ctx.cancel.is_cancelled() && !cancelled {
            cancelled = true;
            child
                .stop()
                .map_err(|e| OpError::io("cannot stop the command", e))?;
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Stream::Chunk(i, bytes)) => {
                ctx.log
                    .write_all(&bytes)
                    .map_err(|e| OpError::io("cannot write the stage log", e))?;
                forward_progress(&mut lines[i], &bytes, ctx);
            }
            Ok(Stream::Closed) => open_streams -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open_streams = 0,
        }
        if exited_at.is_none()
            && child
                .try_wait()
                .map_err(|e| OpError::io("cannot wait for the command", e))?
        {
            exited_at = Some(Instant::now());
        }
        let Some(at) = exited_at else { continue };
        let drained = open_streams == 0;
        if drained || at.elapsed() > DRAIN_AFTER_EXIT {
            if drained {
                for r in readers {
                    let _ = r.join();
                }
            } else {
                let _ = writeln!(
                    ctx.log,
                    "engine: the command's output is still held open by a process outside \
                     the stage; the rest is not logged"
                );
            }
            if cancelled {
                return Err(OpError::Cancelled);
            }
            return Ok(child.ended());
        }
    }
}

/// Shows complete lines that start with [`PROGRESS_MARKER`]; `line` holds the first
/// [`MAX_PROGRESS_LINE`] bytes of the unfinished one (a longer progress line is shown cut).
fn forward_progress(line: &mut Vec<u8>, bytes: &[u8], ctx: &RunContext<'_>) {
    for piece in bytes.split_inclusive(|&b| b == b'\n') {
        let room = MAX_PROGRESS_LINE.saturating_sub(line.len());
        line.extend_from_slice(&piece[..piece.len().min(room)]);
        if piece.ends_with(b"\n") {
            if let Some(rest) = line.strip_prefix(PROGRESS_MARKER.as_bytes()) {
                ctx.progress.report(String::from_utf8_lossy(rest).trim());
            }
            line.clear();
        }
    }
}

fn spawn_reader(
    index: usize,
    mut stream: impl Read + Send + 'static,
    tx: mpsc::SyncSender<Stream>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        loop {
            let mut chunk = vec![0u8; CHUNK];
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(Stream::Chunk(index, chunk)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Stream::Closed);
    })
}

/// The largest `metrics.json` read; a flat object of numbers is far smaller.
const MAX_METRICS_BYTES: u64 = 16 * 1024 * 1024;

/// `metrics.json` in the output folder: a flat object of name -> number.
fn read_metrics(path: &Path) -> Result<Metrics, OpError> {
    // Only a regular file, opened without following a link and without blocking: a FIFO or a
    // link to a device (`/dev/zero`) must fail the stage, not hang or exhaust the engine.
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Metrics::new()),
        Err(e) => return Err(OpError::io(format!("cannot read {}", path.display()), e)),
    };
    if !meta.file_type().is_file() {
        return Err(OpError::Failed(
            "metrics.json is not a regular file (a link, FIFO or device); write a flat JSON \
             object of name -> number"
                .to_string(),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| OpError::io(format!("cannot read {}", path.display()), e))?;
    let mut bytes = Vec::new();
    file.take(MAX_METRICS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| OpError::io(format!("cannot read {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_METRICS_BYTES {
        return Err(OpError::Failed(format!(
            "metrics.json is larger than {} MiB; write a flat object of name -> number",
            MAX_METRICS_BYTES >> 20
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| OpError::Failed("metrics.json is not UTF-8 text".to_string()))?;
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
    use crate::testing::OpRun;
    use crate::{CancelFlag, Op, Progress};
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};

    fn run(params: Value, inputs: &[(&str, &Path)]) -> (Result<Metrics, OpError>, String) {
        let mut run = OpRun::new(params).seed(7);
        for (name, dir) in inputs {
            run = run.input(name, *dir);
        }
        let output = run.run(&ShellOp);
        (output.result, output.log)
    }

    #[test]
    fn writes_metrics_and_log() {
        let (result, log) = run(
            json!({"cmd": "echo hello; echo \"{\\\"acc\\\": 0.5, \\\"seed\\\": $ENGINE_SEED}\" > $ENGINE_OUT/metrics.json"}),
            &[],
        );
        let metrics = result.unwrap();
        assert_eq!(metrics.get("acc"), Some(&0.5));
        assert_eq!(metrics.get("seed"), Some(&7.0));
        assert!(log.contains("hello"));
    }

    #[test]
    fn failing_command_reports_status() {
        let (result, _) = run(json!({"cmd": "exit 3"}), &[]);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("status 3"), "{err}");
    }

    #[test]
    fn argv_form_and_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.txt"), "42").unwrap();
        let (result, log) = run(
            json!({"cmd": ["sh", "-c", "cat $ENGINE_IN_MY_DATA/x.txt"]}),
            &[("my-data", dir.path())],
        );
        result.unwrap();
        assert!(log.contains("42"), "{log}");
    }

    #[test]
    fn bad_metrics_fail_the_stage() {
        let (result, _) = run(
            json!({"cmd": "echo '{\"a\": \"x\"}' > $ENGINE_OUT/metrics.json"}),
            &[],
        );
        assert!(result.unwrap_err().to_string().contains("not a number"));
    }

    #[test]
    fn validation_names_the_field() {
        let err = ShellOp.plan(&json!({"cmd": "x", "bogus": 1})).unwrap_err();
        assert!(err.message.contains("bogus"), "{err:?}");
        let err = ShellOp.plan(&json!({"cmd": "x", "deps": 3})).unwrap_err();
        assert_eq!(err.path, "deps");
    }

    #[test]
    fn progress_lines_are_joined_across_reads_and_cut_when_long() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let progress = Progress::new(move |m| seen2.lock().unwrap().push(m.to_string()));
        let params = json!({"cmd": "printf '::progress:: half'; sleep 0.2; printf ' done\\n'; printf '::progress:: %05000d\\n' 7; echo '::progress:: last'"});
        let output = OpRun::new(params).progress(progress).run(&ShellOp);
        output.metrics();
        let log = output.log;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], "half done");
        assert_eq!(seen[1].len(), MAX_PROGRESS_LINE - PROGRESS_MARKER.len() - 1);
        assert_eq!(seen[2], "last");
        // The log keeps the long line whole.
        assert!(log.len() > 5000);
    }

    #[test]
    fn cancellation_kills_the_group() {
        let cancel = CancelFlag::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let progress = Progress::new(move |m| seen2.lock().unwrap().push(m.to_string()));
        let params = json!({"cmd": "echo '::progress:: step 1'; sleep 30 & sleep 30"});
        let c2 = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c2.cancel();
        });
        let start = Instant::now();
        let result = OpRun::new(params)
            .cancel(&cancel)
            .progress(progress)
            .run(&ShellOp)
            .result;
        t.join().unwrap();
        assert!(matches!(result, Err(OpError::Cancelled)));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(seen.lock().unwrap().as_slice(), ["step 1"]);
    }
}
