//! Running a stage's command so that nothing it starts outlives it.
//!
//! A command runs under a *supervisor*: a child of the engine, forked without exec, that makes
//! itself the subreaper of everything below it (`PR_SET_CHILD_SUBREAPER`). Every process the
//! command starts, in a new process group or a new session (`setsid`, a double fork), stays its
//! descendant and is re-parented to it when its own parent dies, so the supervisor can find and
//! kill all of them. The supervisor
//! - dies with the engine: `PR_SET_PDEATHSIG` sends it SIGTERM when the engine dies, `kill -9`
//!   included;
//! - on SIGTERM (a stop, a timeout, the engine's death) sends SIGTERM to the command's process
//!   group, waits up to [`GRACE`] for the command to exit, then kills every process left;
//! - when the command exits, kills every process it left behind (a background child still
//!   holding an output file must not change it after it is hashed) and exits only once it has
//!   no descendant left, so the engine sees the command's output pipes close only then;
//! - holds a shared `flock` on a folder (the stage's output folder) for its whole life, so the
//!   store can tell the leftovers of a dead engine whose stage processes still live from dead
//!   work (see `cache::Store`'s scratch clean-up and claim take-over).
//!
//! It reports the command's pid, a failure to start it and its wait status through a pipe.
//! Between `fork` and `_exit` the supervisor and the command's child call only
//! async-signal-safe functions (the engine is multi-threaded): raw system calls on memory
//! prepared before the fork, no allocation, no locks.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a stopped command has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);

/// Exit code of a supervisor that could not set itself up (its parent had already died).
const SUPERVISOR_SETUP_FAILED: libc::c_int = 120;

/// The command's status pipe, as the supervisor and the command's child see it.
const STATUS_FD: RawFd = 3;
/// The locked folder, as the supervisor sees it.
const LOCK_FD: RawFd = 4;

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// A path, or a name looked up in the command's `PATH`.
    pub program: OsString,
    /// The arguments after the program name.
    pub args: Vec<OsString>,
    /// The complete environment of the command.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    /// A folder the supervisor holds a shared `flock` on for as long as any process of the
    /// command lives.
    pub lock_folder: Option<PathBuf>,
}

/// How a supervised command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signalled(i32),
    /// The program could not be started (`errno`).
    NotStarted(i32),
    /// The supervisor died without reporting (it was killed with SIGKILL).
    Unknown,
}

/// A running supervisor and its command.
pub struct Supervised {
    supervisor: libc::pid_t,
    /// Forked by this process (then reaped with waitpid), or by the stage host.
    our_child: bool,
    pidfd: Option<OwnedFd>,
    command: Option<libc::pid_t>,
    status: File,
    records: Vec<Record>,
    reaped: bool,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    tag: u8,
    value: i32,
}

const TAG_SUPERVISOR: u8 = b'Q';
const TAG_PID: u8 = b'P';
const TAG_NOT_STARTED: u8 = b'E';
const TAG_STATUS: u8 = b'S';

/// What the command's child needs to start the command.
struct Launch {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
}

/// Everything the forked supervisor reads: prepared before the fork so that it never
/// allocates.
struct Prepared {
    parent: libc::pid_t,
    launch: Launch,
    devnull: RawFd,
    out_w: RawFd,
    err_w: RawFd,
    status_w: RawFd,
    lock: Option<RawFd>,
}

/// The first argument that makes this binary the stage host ([`host_main`]).
const SERVE_ARG: &str = "__engine-stage-host";

/// Set by [`serve_or_offer`]: commands are started through the stage host.
static HOSTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Call first thing in `main` of a binary that runs shell commands. When the process was
/// started as the stage host it runs as one and exits; otherwise it lets
/// [`Supervised::spawn`] start commands through a stage host: one small process per engine
/// (this binary started again, once) that forks a supervisor per command. A supervisor is
/// then a fork of a small process, not of the engine (whose every page written meanwhile, a
/// training step's tensors say, would be copied) and not a new exec per stage (glibc's
/// start-up costs over a millisecond here). Without this call (a library's tests) each
/// supervisor is a fork of its parent.
pub fn serve_or_offer() {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(OsStr::new(SERVE_ARG)) {
        let rest: Vec<OsString> = args.collect();
        host_main(&rest)
    }
    HOSTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The engine's connection to its stage host, started on first use.
static HOST: std::sync::Mutex<Option<std::os::unix::net::UnixStream>> = std::sync::Mutex::new(None);

/// Starts the stage host. It is started from a thread that lives until the host exits:
/// `PR_SET_PDEATHSIG` fires when the *thread* that started a process ends, not the process.
fn start_host() -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("engine-stage-host".into())
        .spawn(move || {
            let child = std::process::Command::new("/proc/self/exe")
                .arg(SERVE_ARG)
                .arg(std::process::id().to_string())
                .stdin(OwnedFd::from(theirs))
                .stdout(std::process::Stdio::null())
                .process_group(0)
                .spawn();
            match child {
                Ok(mut child) => {
                    let _ = tx.send(Ok(()));
                    let _ = child.wait();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the stage host's thread ended"))??;
    Ok(ours)
}

/// Hands one command to the stage host (starting it, or a new one if it died), with the
/// three descriptors its supervisor writes to.
fn send_to_host(payload: &[u8], fds: [RawFd; 3]) -> std::io::Result<()> {
    let mut host = HOST.lock().unwrap_or_else(|p| p.into_inner());
    for attempt in 0..2 {
        if host.is_none() {
            *host = Some(start_host()?);
        }
        let sock = host.as_ref().expect("just set").as_raw_fd();
        match send_request(sock, payload, fds) {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt == 0
                    && matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) =>
            {
                *host = None;
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("the stage host keeps failing"))
}

/// A request: an 8-byte length carrying the descriptors (SCM_RIGHTS), then the payload.
fn send_request(sock: RawFd, payload: &[u8], fds: [RawFd; 3]) -> std::io::Result<()> {
    let header = (payload.len() as u64).to_le_bytes();
    let mut iov = libc::iovec {
        iov_base: header.as_ptr() as *mut libc::c_void,
        iov_len: header.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr and the control buffer are ours and outlive the call; the CMSG macros
    // stay inside the buffer, which has room for one header and three descriptors.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of_val(&fds) as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&fds) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) != header.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let mut sent = 0;
        while sent < payload.len() {
            let n = libc::send(
                sock,
                payload[sent..].as_ptr().cast(),
                payload.len() - sent,
                libc::MSG_NOSIGNAL,
            );
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            sent += n as usize;
        }
    }
    Ok(())
}

/// The host's side of [`send_request`]: the descriptors and the payload, or `None` once the
/// engine has closed the connection.
fn recv_request(sock: RawFd) -> Option<([RawFd; 3], Vec<u8>)> {
    let mut header = [0u8; 8];
    let mut fds = [-1 as RawFd; 3];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as in `send_request`; the descriptors are read only from a SCM_RIGHTS header.
    let got = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            std::ptr::copy_nonoverlapping(
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.as_mut_ptr(),
                fds.len(),
            );
        }
        n
    };
    if got <= 0 {
        return None;
    }
    // SAFETY: reading from the socket the host was started with, into buffers we own.
    let mut stream = unsafe { std::mem::ManuallyDrop::new(File::from_raw_fd(sock)) };
    stream.read_exact(&mut header[got as usize..]).ok()?;
    let mut payload = vec![0u8; u64::from_le_bytes(header) as usize];
    stream.read_exact(&mut payload).ok()?;
    Some((fds, payload))
}

/// Byte strings, each as a little-endian u32 length and its bytes.
fn encode(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

fn decode(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        items.push(bytes.get(4..4 + len)?);
        bytes = &bytes[4 + len..];
    }
    Some(items)
}

/// The request payload: engine pid, lock folder (or empty), cwd, program path, argument
/// count, the arguments (argv[0] first), then the environment as `KEY=VALUE` entries.
fn request_payload(spec: &CommandSpec, program: &Path) -> Vec<u8> {
    let engine = std::process::id().to_string();
    let lock = spec
        .lock_folder
        .as_deref()
        .map(|p| p.as_os_str().as_bytes())
        .unwrap_or(b"");
    let argc = (spec.args.len() + 1).to_string();
    let env: Vec<Vec<u8>> = spec
        .env
        .iter()
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
        .collect();
    let mut items: Vec<&[u8]> = vec![
        engine.as_bytes(),
        lock,
        spec.cwd.as_os_str().as_bytes(),
        program.as_os_str().as_bytes(),
        argc.as_bytes(),
        spec.program.as_bytes(),
    ];
    items.extend(spec.args.iter().map(|a| a.as_bytes()));
    items.extend(env.iter().map(Vec::as_slice));
    encode(&items)
}

/// The stage host: forks a supervisor ([`hosted_supervisor`]) for each request until the
/// engine closes the connection, and dies with the engine (its supervisors then stop their
/// commands: their own death signal is tied to the host).
fn host_main(args: &[OsString]) -> ! {
    // SAFETY: process-wide settings of this single-threaded process; no memory is involved.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"engine-stages".as_ptr(), 0, 0, 0);
        let parent: libc::pid_t = args
            .first()
            .and_then(|a| a.to_str())
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::getppid() != parent
        {
            libc::_exit(SUPERVISOR_SETUP_FAILED);
        }
        // Supervisors are reaped by the kernel; the engine learns of their end from the
        // status pipe closing.
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    while let Some((fds, payload)) = recv_request(0) {
        // SAFETY: this process is single-threaded, so the child may do anything.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            hosted_supervisor(fds, &payload);
        }
        for fd in fds {
            // SAFETY: descriptors received for this request, ours to close.
            unsafe {
                libc::close(fd);
            }
        }
    }
    std::process::exit(0)
}

/// A supervisor forked by the host: takes the request's descriptors, locks the folder, ties
/// itself to the host and checks that the engine still lives, then runs the command.
fn hosted_supervisor(fds: [RawFd; 3], payload: &[u8]) -> ! {
    // SAFETY: this is a fresh fork of the single-threaded host; everything below is plain
    // system calls on descriptors and memory it owns.
    unsafe {
        libc::setpgid(0, 0);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        let host = libc::getppid();
        let moved: Vec<RawFd> = fds
            .iter()
            .map(|&fd| libc::fcntl(fd, libc::F_DUPFD, 10))
            .collect();
        libc::dup2(moved[0], 1);
        libc::dup2(moved[1], 2);
        libc::dup2(moved[2], STATUS_FD);
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        libc::dup2(devnull, 0);
        let Some(items) = decode(payload) else {
            libc::_exit(SUPERVISOR_SETUP_FAILED);
        };
        let field = |i: usize| items.get(i).copied().unwrap_or(b"");
        let engine: libc::pid_t = std::str::from_utf8(field(0))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let lock = match field(1) {
            b"" => None,
            folder => match lock_shared(Path::new(OsStr::from_bytes(folder))) {
                Ok(f) => Some(f),
                Err(_) => libc::_exit(SUPERVISOR_SETUP_FAILED),
            },
        };
        // The lock is taken before these checks, so a take-over that found it free (the
        // engine was already dead) meets no command started after it.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::getppid() != host
            || engine <= 0
            || libc::kill(engine, 0) != 0
        {
            libc::_exit(SUPERVISOR_SETUP_FAILED);
        }
        let first_free = match &lock {
            Some(f) => {
                libc::dup2(f.as_raw_fd(), LOCK_FD);
                LOCK_FD + 1
            }
            None => STATUS_FD + 1,
        };
        close_from(first_free);
        std::mem::forget(lock);
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(LOCK_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let argc: usize = std::str::from_utf8(field(4))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let owned = |range: std::ops::Range<usize>| -> Option<Vec<CString>> {
            items
                .get(range)?
                .iter()
                .map(|b| CString::new(*b).ok())
                .collect()
        };
        let (Some(argv_c), Some(envp_c), Ok(cwd), Ok(program)) = (
            owned(5..5 + argc),
            owned(5 + argc..items.len()),
            CString::new(field(2)),
            CString::new(field(3)),
        ) else {
            libc::_exit(SUPERVISOR_SETUP_FAILED);
        };
        let launch = Launch {
            program,
            argv: null_terminated(&argv_c),
            envp: null_terminated(&envp_c),
            cwd,
        };
        run_command(&launch)
    }
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn cstring(what: &str, s: &OsStr) -> std::io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The program's path as `execve` needs it: a name without `/` is looked up in the command's
/// own `PATH` (as a shell would), relative paths are taken from `cwd`.
fn resolve_program(spec: &CommandSpec) -> std::io::Result<PathBuf> {
    let program = Path::new(&spec.program);
    if spec.program.as_bytes().contains(&b'/') {
        return Ok(spec.cwd.join(program));
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let candidate = spec.cwd.join(dir).join(program);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        use std::os::unix::fs::PermissionsExt;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            return Ok(candidate);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} not found in PATH", program.display()),
    ))
}

/// Forks the supervisor from this process, without exec (a binary that did not call
/// [`serve_or_offer`]): the fork keeps a copy-on-write image of the parent for as long as the
/// command runs.
fn spawn_fork(
    spec: &CommandSpec,
    program: &Path,
    out_w: OwnedFd,
    err_w: OwnedFd,
    status_w: OwnedFd,
) -> std::io::Result<libc::pid_t> {
    let program = cstring("program", program.as_os_str())?;
    let argv_c = std::iter::once(cstring("program", &spec.program))
        .chain(spec.args.iter().map(|a| cstring("argument", a)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let envp_c = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring("environment variable", &kv)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let cwd = cstring("folder", spec.cwd.as_os_str())?;
    let devnull = File::open("/dev/null")?;
    let lock = match &spec.lock_folder {
        Some(folder) => Some(lock_shared(folder)?),
        None => None,
    };
    let prepared = Prepared {
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        launch: Launch {
            program,
            argv: null_terminated(&argv_c),
            envp: null_terminated(&envp_c),
            cwd,
        },
        devnull: devnull.as_raw_fd(),
        out_w: out_w.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        status_w: status_w.as_raw_fd(),
        lock: lock.as_ref().map(|f| f.as_raw_fd()),
    };
    // Signals stay blocked across the fork: a handler of the engine's (Ctrl-C) must never
    // run in the child. The supervisor keeps them blocked and waits for them.
    // SAFETY: sigset_t is plain data, filled by sigfillset before use; pthread_sigmask
    // changes this thread's mask only.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the child runs only `supervisor_main`, which calls async-signal-safe
    // functions on `prepared` (memory the fork copied) and never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { supervisor_main(&prepared) }
    }
    let fork_error = std::io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop((out_w, err_w, status_w, devnull, lock, argv_c, envp_c));
    if pid < 0 {
        return Err(fork_error);
    }
    // Both sides set the group, so it is in place whoever runs first.
    // SAFETY: setpgid on our own child; an error (it already exited) is harmless.
    unsafe {
        libc::setpgid(pid, pid);
    }
    Ok(pid)
}

/// A folder, open, with a shared `flock` on it.
fn lock_shared(folder: &Path) -> std::io::Result<File> {
    let f = File::open(folder)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

impl Supervised {
    /// Starts the supervisor, which starts the command with stdin from `/dev/null` and stdout
    /// and stderr as the pipes `stdout` and `stderr`.
    pub fn spawn(spec: &CommandSpec) -> std::io::Result<Self> {
        let program = resolve_program(spec)?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        let hosted = HOSTED.load(std::sync::atomic::Ordering::SeqCst);
        let forked = if hosted {
            send_to_host(
                &request_payload(spec, &program),
                [out_w.as_raw_fd(), err_w.as_raw_fd(), status_w.as_raw_fd()],
            )?;
            drop((out_w, err_w, status_w));
            None
        } else {
            Some(spawn_fork(spec, &program, out_w, err_w, status_w)?)
        };
        let mut me = Self {
            supervisor: forked.unwrap_or(0),
            our_child: forked.is_some(),
            pidfd: None,
            command: None,
            status: File::from(status_r),
            records: Vec::new(),
            reaped: false,
            stdout: Some(File::from(out_r)),
            stderr: Some(File::from(err_r)),
        };
        // The supervisor reports its pid, then the command's right after starting it (or
        // exits).
        while let Some(record) = me.read_record() {
            match record.tag {
                TAG_SUPERVISOR => me.supervisor = record.value,
                TAG_PID => {
                    me.command = Some(record.value);
                    break;
                }
                _ => me.records.push(record),
            }
        }
        if me.supervisor == 0 {
            me.reaped = true;
            return Err(std::io::Error::other(
                "the stage host could not start a supervisor (the engine is ending?)",
            ));
        }
        if !me.our_child {
            // Signals go through a pidfd: the host, not us, reaps the supervisor, so its pid
            // could be reused once it is gone.
            // SAFETY: pidfd_open returns a new descriptor or -1; no memory is involved.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, me.supervisor, 0) };
            if fd >= 0 {
                // SAFETY: a descriptor just created and owned by nobody else.
                me.pidfd = Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            }
        }
        Ok(me)
    }

    /// The supervisor's pid (its process group too).
    pub fn supervisor_pid(&self) -> u32 {
        self.supervisor as u32
    }

    /// The command's pid (its process group too), once it started.
    pub fn command_pid(&self) -> Option<u32> {
        self.command.map(|p| p as u32)
    }

    fn read_record(&mut self) -> Option<Record> {
        let mut buf = [0u8; 5];
        match self.status.read_exact(&mut buf) {
            Ok(()) => Some(Record {
                tag: buf[0],
                value: i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]),
            }),
            Err(_) => None,
        }
    }

    /// True once the supervisor has exited (and with it every process of the command).
    pub fn try_wait(&mut self) -> std::io::Result<bool> {
        self.wait_for(libc::WNOHANG)
    }

    fn wait_for(&mut self, flags: libc::c_int) -> std::io::Result<bool> {
        if self.reaped {
            return Ok(true);
        }
        if !self.our_child {
            return self.wait_for_status_end(flags & libc::WNOHANG == 0);
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child, writing into a local.
            let r = unsafe { libc::waitpid(self.supervisor, &mut status, flags) };
            if r == self.supervisor {
                self.reaped = true;
                return Ok(true);
            }
            if r == 0 {
                return Ok(false);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// A hosted supervisor has exited once its status pipe is closed: it holds the pipe until
    /// its last moment (the command's child closes its copy when it execs).
    fn wait_for_status_end(&mut self, block: bool) -> std::io::Result<bool> {
        loop {
            let mut poll = libc::pollfd {
                fd: self.status.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one descriptor we own, writing into a local.
            let r = unsafe { libc::poll(&mut poll, 1, if block { -1 } else { 0 }) };
            if r == 0 {
                return Ok(false);
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            match self.read_record() {
                Some(record) => self.records.push(record),
                None => {
                    self.reaped = true;
                    return Ok(true);
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signals a process we started (through a pidfd when the host started it);
        // no memory is involved.
        unsafe {
            match &self.pidfd {
                Some(fd) => {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        sig,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
                None => {
                    libc::kill(self.supervisor, sig);
                }
            }
        }
    }

    /// Asks the supervisor to stop the command: SIGTERM to its group, then after [`GRACE`]
    /// SIGKILL to every process left.
    pub fn terminate(&self) {
        if !self.reaped {
            self.signal(libc::SIGTERM);
        }
    }

    /// Stops the command and waits for the supervisor: [`terminate`](Self::terminate), and if
    /// the supervisor has not exited well after the grace period, SIGKILL to it and the
    /// command's group.
    pub fn stop(&mut self) -> std::io::Result<()> {
        self.terminate();
        let deadline = Instant::now() + GRACE + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.try_wait()? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        self.wait_for(0).map(|_| ())
    }

    /// SIGKILL to the command's group and SIGTERM to the supervisor, which then kills what
    /// is left at once (its command is dead). For the engine's own hard exit.
    pub fn kill(&self) {
        if self.reaped {
            return;
        }
        if let Some(c) = self.command {
            // SAFETY: kill(2) on the group of a command whose supervisor has not exited
            // (the supervisor kills the group before it exits); no memory is involved.
            unsafe {
                libc::kill(-c, libc::SIGKILL);
            }
        }
        self.signal(libc::SIGTERM);
    }

    /// How the command ended; call after [`try_wait`](Self::try_wait) returned true.
    pub fn ended(&mut self) -> Ended {
        while let Some(record) = self.read_record() {
            self.records.push(record);
        }
        let mut ended = Ended::Unknown;
        for r in &self.records {
            match r.tag {
                TAG_NOT_STARTED => return Ended::NotStarted(r.value),
                TAG_STATUS if libc::WIFEXITED(r.value) => {
                    ended = Ended::Exited(libc::WEXITSTATUS(r.value))
                }
                TAG_STATUS if libc::WIFSIGNALED(r.value) => {
                    ended = Ended::Signalled(libc::WTERMSIG(r.value))
                }
                _ => {}
            }
        }
        ended
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.stop();
        }
    }
}

/// Writes one status record. Async-signal-safe.
unsafe fn report(tag: u8, value: i32) {
    let v = value.to_le_bytes();
    let buf = [tag, v[0], v[1], v[2], v[3]];
    libc::write(STATUS_FD, buf.as_ptr().cast(), buf.len());
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The supervisor forked without exec ([`spawn_fork`]): ties itself to the engine, takes its
/// descriptors, runs the command. Async-signal-safe only.
unsafe fn supervisor_main(p: &Prepared) -> ! {
    if libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGTERM as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
        || libc::getppid() != p.parent
    {
        // The engine died before the supervisor could tie itself to it.
        libc::_exit(SUPERVISOR_SETUP_FAILED);
    }
    libc::setpgid(0, 0);
    // Descriptors to their fixed numbers. The sources are first moved above the targets so
    // that no dup2 overwrites a source still needed.
    let status = libc::fcntl(p.status_w, libc::F_DUPFD, 10);
    let lock = p.lock.map(|l| libc::fcntl(l, libc::F_DUPFD, 10));
    libc::dup2(p.devnull, 0);
    libc::dup2(p.out_w, 1);
    libc::dup2(p.err_w, 2);
    libc::dup2(status, STATUS_FD);
    let first_free = match lock {
        Some(l) => {
            libc::dup2(l, LOCK_FD);
            LOCK_FD + 1
        }
        None => STATUS_FD + 1,
    };
    close_from(first_free);
    // Closed in the command's child by exec: only the supervisor holds the lock.
    libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    libc::fcntl(LOCK_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    run_command(&p.launch)
}

/// Becomes the subreaper, starts the command, supervises it, reports, exits.
/// Async-signal-safe only.
unsafe fn run_command(launch: &Launch) -> ! {
    report(TAG_SUPERVISOR, libc::getpid());
    libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0);
    // Children are waited for, never ignored.
    libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    let command = libc::fork();
    if command == 0 {
        command_main(launch);
    }
    if command < 0 {
        report(TAG_NOT_STARTED, errno());
        libc::_exit(0);
    }
    libc::setpgid(command, command);
    report(TAG_PID, command);
    let status = supervise(command);
    report(TAG_STATUS, status);
    libc::_exit(0);
}

/// The command's child: its own process group, default signal handling, exec.
/// Async-signal-safe only.
unsafe fn command_main(p: &Launch) -> ! {
    libc::setpgid(0, 0);
    // The engine ignores SIGPIPE (Rust's default) and the supervisor blocks everything;
    // the command starts with neither.
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    if libc::chdir(p.cwd.as_ptr()) != 0 {
        report(TAG_NOT_STARTED, errno());
        libc::_exit(127);
    }
    libc::execve(p.program.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
    report(TAG_NOT_STARTED, errno());
    libc::_exit(127);
}

/// Waits for the command, or for a stop signal; then kills every descendant. Returns the
/// command's wait status. Async-signal-safe only.
unsafe fn supervise(command: libc::pid_t) -> libc::c_int {
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        libc::sigaddset(&mut set, sig);
    }
    let mut command_status: Option<libc::c_int> = None;
    let mut stop_at: Option<libc::timespec> = None;
    loop {
        let wait = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &wait);
        if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) && stop_at.is_none() {
            libc::kill(-command, libc::SIGTERM);
            let mut t = monotonic_now();
            t.tv_sec += GRACE.as_secs() as libc::time_t;
            stop_at = Some(t);
        }
        reap(command, &mut command_status);
        if command_status.is_some() {
            break;
        }
        if let Some(t) = stop_at {
            let now = monotonic_now();
            if (now.tv_sec, now.tv_nsec) >= (t.tv_sec, t.tv_nsec) {
                break;
            }
        }
    }
    libc::kill(-command, libc::SIGKILL);
    // Every process left is, or becomes once its parent is killed, a child of ours.
    // Only when some are left is `/proc` scanned: usually the command left none.
    loop {
        if reap(command, &mut command_status) {
            break;
        }
        kill_children();
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 2_000_000,
        };
        libc::nanosleep(&pause, std::ptr::null_mut());
    }
    // Only a command that was never reaped has no status; it cannot happen (it is our child
    // and we reaped until none was left), but report a kill rather than success.
    command_status.unwrap_or(libc::SIGKILL)
}

/// Reaps every exited child; true when no child is left at all. Async-signal-safe.
unsafe fn reap(command: libc::pid_t, command_status: &mut Option<libc::c_int>) -> bool {
    loop {
        let mut status = 0;
        let r = libc::waitpid(-1, &mut status, libc::WNOHANG);
        if r > 0 {
            if r == command {
                *command_status = Some(status);
            }
            continue;
        }
        if r == 0 {
            return false;
        }
        if errno() == libc::EINTR {
            continue;
        }
        return true;
    }
}

unsafe fn monotonic_now() -> libc::timespec {
    let mut t: libc::timespec = std::mem::zeroed();
    libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t);
    t
}

/// Closes every descriptor from `first` up. Async-signal-safe.
unsafe fn close_from(first: RawFd) {
    if libc::syscall(
        libc::SYS_close_range,
        first as libc::c_uint,
        libc::c_uint::MAX,
        0,
    ) == 0
    {
        return;
    }
    // Kernels before 5.9.
    let mut limit: libc::rlimit = std::mem::zeroed();
    let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
        limit.rlim_cur.min(65_536) as RawFd
    } else {
        4096
    };
    for fd in first..max {
        libc::close(fd);
    }
}

/// SIGKILLs every process whose parent is this one, found by scanning `/proc` (the
/// `children` file needs a kernel option many kernels lack). Async-signal-safe.
unsafe fn kill_children() {
    let me = libc::getpid();
    let proc_fd = libc::open(
        c"/proc".as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if proc_fd < 0 {
        return;
    }
    // getdents64 needs 8-byte alignment.
    let mut buf = [0u64; 1024];
    loop {
        let n = libc::syscall(
            libc::SYS_getdents64,
            proc_fd,
            buf.as_mut_ptr(),
            std::mem::size_of_val(&buf),
        );
        if n <= 0 {
            break;
        }
        let bytes = std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize);
        let mut off = 0usize;
        while off + 19 < bytes.len() {
            // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
            let reclen = u16::from_ne_bytes([bytes[off + 16], bytes[off + 17]]) as usize;
            if reclen == 0 {
                break;
            }
            let name = &bytes[off + 19..(off + reclen).min(bytes.len())];
            off += reclen;
            let Some(pid) = parse_pid(name, 0) else {
                continue;
            };
            if pid != me && parent_of(pid) == Some(me) {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    libc::close(proc_fd);
}

/// The decimal number at the start of `s`, up to `end` (or the end of `s`), as a pid.
fn parse_pid(s: &[u8], end: u8) -> Option<libc::pid_t> {
    let mut pid: libc::pid_t = 0;
    let mut digits = 0;
    for &b in s {
        if b == end {
            break;
        }
        if !b.is_ascii_digit() || digits > 9 {
            return None;
        }
        pid = pid * 10 + (b - b'0') as libc::pid_t;
        digits += 1;
    }
    (digits > 0).then_some(pid)
}

/// The parent pid in `/proc/<pid>/stat`. Async-signal-safe.
unsafe fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    // "/proc/" + up to 10 digits + "/stat" + NUL
    let mut path = [0u8; 32];
    let prefix = b"/proc/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut v = pid;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 || n == digits.len() {
            break;
        }
    }
    let mut at = prefix.len();
    for i in (0..n).rev() {
        path[at] = digits[i];
        at += 1;
    }
    path[at..at + 5].copy_from_slice(b"/stat");
    let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return None;
    }
    let mut stat = [0u8; 512];
    let len = libc::read(fd, stat.as_mut_ptr().cast(), stat.len());
    libc::close(fd);
    if len <= 0 {
        return None;
    }
    let stat = &stat[..len as usize];
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = stat.get(close + 2..)?;
    let after_state = rest.iter().position(|&b| b == b' ')? + 1;
    parse_pid(rest.get(after_state..)?, b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> CommandSpec {
        CommandSpec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: std::env::vars_os().collect(),
            cwd: std::env::temp_dir(),
            lock_folder: None,
        }
    }

    fn run_to_end(s: &mut Supervised) -> (String, Ended) {
        let mut out = String::new();
        s.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        while !s.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(5));
        }
        (out, s.ended())
    }

    fn alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks existence.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    #[test]
    fn reports_output_and_exit_status() {
        let mut s = Supervised::spawn(&spec("echo hi; exit 7")).unwrap();
        assert!(s.command_pid().is_some());
        let (out, ended) = run_to_end(&mut s);
        assert_eq!(out, "hi\n");
        assert_eq!(ended, Ended::Exited(7));
    }

    #[test]
    fn a_missing_program_is_not_started() {
        let mut spec = spec("");
        spec.program = "./definitely-not-here".into();
        let mut s = Supervised::spawn(&spec).unwrap();
        let (_, ended) = run_to_end(&mut s);
        assert_eq!(ended, Ended::NotStarted(libc::ENOENT));
    }

    #[test]
    fn leftovers_in_new_sessions_die_with_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // A grandchild in its own session that holds stdout open and would live 30 s.
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & sleep 0.3; echo done",
            pidfile.display()
        );
        let start = Instant::now();
        let mut s = Supervised::spawn(&spec(&script)).unwrap();
        let (out, ended) = run_to_end(&mut s);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(out, "done\n");
        assert_eq!(ended, Ended::Exited(0));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !alive(pid),
            "the setsid grandchild {pid} outlived its stage"
        );
    }

    #[test]
    fn stop_terminates_the_whole_tree_and_releases_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec("trap '' TERM; sleep 30 & setsid sleep 30 & wait");
        spec.lock_folder = Some(dir.path().to_path_buf());
        let mut s = Supervised::spawn(&spec).unwrap();
        let locked = File::open(dir.path()).unwrap();
        // SAFETY: flock on a descriptor we own.
        let try_lock = || unsafe { libc::flock(locked.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(try_lock(), 0, "the supervisor holds the folder's lock");
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        s.stop().unwrap();
        assert!(start.elapsed() < GRACE + Duration::from_secs(3));
        assert!(matches!(s.ended(), Ended::Signalled(_)), "{:?}", s.ended());
        assert_eq!(try_lock(), 0, "the lock is released once the tree is gone");
    }

    #[test]
    fn parses_proc_stat_with_odd_names() {
        assert_eq!(parse_pid(b"1234\0", 0), Some(1234));
        assert_eq!(parse_pid(b"self\0", 0), None);
        assert_eq!(parse_pid(b"42 7", b' '), Some(42));
        // SAFETY: reads our own /proc entry.
        let parent = unsafe { parent_of(libc::getpid()) };
        assert_eq!(parent, Some(unsafe { libc::getppid() }));
    }
}
