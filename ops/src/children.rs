//! Process groups started by ops, so the engine can stop them all on a second Ctrl-C.

use std::collections::BTreeSet;
use std::sync::Mutex;

static GROUPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

pub(crate) fn register(pgid: u32) {
    if let Ok(mut groups) = GROUPS.lock() {
        groups.insert(pgid);
    }
}

pub(crate) fn unregister(pgid: u32) {
    if let Ok(mut groups) = GROUPS.lock() {
        groups.remove(&pgid);
    }
}

/// SIGKILLs every process group an op started that is still running. Safe to call from a
/// signal-handling thread.
pub fn kill_all_children() {
    let groups = match GROUPS.lock() {
        Ok(groups) => groups.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for pgid in groups {
        // SAFETY: kill(2) on a process group id we started; no memory is involved.
        unsafe {
            libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
        }
    }
}
