//! The binary driven directly by `std::process`, for tests that work in a bare temporary
//! folder with `p.yaml` (the hardening and store tests), and the pieces they share with the
//! other tests that kill engines.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// `engine` with the variables it reads cleared.
pub fn engine() -> Command {
    let mut c = Command::new(super::ENGINE);
    c.env_remove("ENGINE_CACHE_DIR").env("NO_COLOR", "1");
    c
}

/// `engine ARGS` in `dir`, to the end.
pub fn run(dir: &Path, args: &[&str]) -> Output {
    engine()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("engine starts")
}

/// `engine ARGS` in `dir`, started, with its output piped.
pub fn spawn(dir: &Path, args: &[&str]) -> Child {
    engine()
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("engine starts")
}

/// stdout as one JSON value; panics with both streams if it is not.
pub fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// SIGKILL to a child, then reaps it.
pub fn sigkill(child: &mut Child) {
    // SAFETY: kill(2) on a pid we spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// A small deterministic generator (xorshift), so random shapes are reproducible by seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Up to two distinct earlier stage indices (none for stage 0): random DAG edges.
    pub fn upstreams(&mut self, i: u64) -> Vec<u64> {
        let mut inputs = Vec::new();
        if i > 0 {
            for _ in 0..self.below(3) {
                let u = self.below(i);
                if !inputs.contains(&u) {
                    inputs.push(u);
                }
            }
        }
        inputs
    }
}
