//! Which machine and process namespace this process lives in, so that "is the process that
//! owns this scratch folder (or claim) still alive?" is only asked where a pid means the same
//! process: on the same host, the same boot, in the same pid namespace.

use std::sync::OnceLock;

/// This machine's name (`gethostname`), or `unknown`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A short id (12 hex digits) of the pid space this process is in: a blake3 of the host name,
/// the kernel's boot id and the pid namespace. Two processes with the same id can test each
/// other's pids with `kill(pid, 0)`; with different ids a pid says nothing (another host
/// sharing the cache, a container, a reboot). Where `/proc` cannot be read the missing parts
/// hash as empty, which only makes the id coarser (host name alone), as it was before.
pub fn pid_space_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let pid_ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        for part in [hostname(), boot_id, pid_ns] {
            hasher.update(part.as_bytes());
            hasher.update(b"\0");
        }
        hasher.finalize().to_hex()[..12].to_string()
    })
}

/// Whether `pid` is a live process in this pid space (see [`pid_space_id`]).
pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(pid, 0) only checks that the process exists; it sends nothing.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_space_id_is_stable_and_short() {
        let id = pid_space_id();
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(pid_space_id(), id);
        assert!(process_alive(std::process::id() as i32));
        assert!(!process_alive(0));
    }
}
