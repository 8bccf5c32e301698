//! The `engine` command line: turns arguments into validated requests once, at the edge, and
//! library errors into messages for people. Exit codes: 0 ok, 1 a stage failed, 2 bad input,
//! 130 interrupted.

mod cli;

fn main() {
    // A stage's command supervisor is this binary started again; it never reaches the CLI.
    ops::supervisor::serve_or_offer();
    keep_freed_memory();
    std::process::exit(cli::main());
}

/// glibc hands large freed blocks back to the kernel at once and takes them again on the next
/// training step; the page faults cost nb201 training about a quarter of its time
/// (bench/RESULTS_training.md). Keeping freed memory mapped avoids that churn.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
