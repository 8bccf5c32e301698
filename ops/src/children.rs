//! Commands started by ops, so the engine can stop them all on a second Ctrl-C.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::supervisor::Supervised;

/// (supervisor pid, command pid or 0) of every running command.
static RUNNING: Mutex<BTreeSet<(u32, u32)>> = Mutex::new(BTreeSet::new());

fn entry(child: &Supervised) -> (u32, u32) {
    (child.supervisor_pid(), child.command_pid().unwrap_or(0))
}

pub(crate) fn register(child: &Supervised) {
    if let Ok(mut running) = RUNNING.lock() {
        running.insert(entry(child));
    }
}

pub(crate) fn unregister(child: &Supervised) {
    if let Ok(mut running) = RUNNING.lock() {
        running.remove(&entry(child));
    }
}

/// SIGKILLs the process group of every command an op started that is still running, and tells
/// its supervisor to kill whatever of it is left (the supervisor also does that by itself
/// when the engine exits). Safe to call from a signal-handling thread.
pub fn kill_all_children() {
    let running = match RUNNING.lock() {
        Ok(running) => running.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for (supervisor, command) in running {
        // SAFETY: kill(2) on processes this engine started; no memory is involved.
        unsafe {
            if command != 0 {
                libc::kill(-(command as libc::pid_t), libc::SIGKILL);
            }
            libc::kill(supervisor as libc::pid_t, libc::SIGTERM);
        }
    }
}
