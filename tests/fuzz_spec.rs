//! Fuzzing the pipeline parser, validator and planner: random and mutated YAML must never
//! panic, hang or blow up. `FUZZ_SECONDS=600 cargo test --release --test fuzz_spec -- --nocapture`
//! runs the long campaign; the default is a few seconds so the suite stays fast. Inputs that
//! once broke something live in `tests/fuzz_corpus/` and are replayed on every run.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::plan::{self, PlanOptions};
use engine::spec::Pipeline;
use ops::Registry;

const SEEDS: &[&str] = &[
    include_str!("../examples/demo/pipeline.yaml"),
    "name: demo\nvars: {n: 3, words: [a, b]}\nstages:\n  make:\n    op: shell\n    cmd: \"seq ${vars.n} > $ENGINE_OUT/numbers.txt\"\n  square:\n    op: shell\n    matrix: {p: [2, 3]}\n    inputs: {numbers: make}\n    cmd: \"awk '{print $1^${matrix.p}}' $ENGINE_IN_NUMBERS/numbers.txt > $ENGINE_OUT/out.txt\"\n  total:\n    op: shell\n    inputs: {parts: \"square[*]\"}\n    deps: [scripts/total.sh]\n    cmd: \"bash scripts/total.sh\"\n",
    "vars: {a: &x [1, 2], b: *x}\nstages:\n  s:\n    op: shell\n    matrix: {p: \"${vars.a}\", q: \"${vars.b}\"}\n    retries: 2\n    timeout: 10m\n    resources: {cpus: 2, mem: 4G}\n    seed: \"${matrix.p}\"\n    cmd: [echo, \"${matrix.q}\"]\n  t:\n    op: shell\n    inputs: {x: \"s[p=1,*]\", y: \"s[p=2,q=2]\"}\n    env: {A: 1}\n    outs: [o.txt]\n    cmd: echo\n",
];

/// Fragments that exercise the grammar's corners.
const TOKENS: &[&str] = &[
    "${",
    "}",
    "${vars.",
    "${matrix.",
    "$${",
    "[*]",
    "[k=v]",
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    "- ",
    "\n",
    "  ",
    "&a ",
    "*a",
    "<<: *a",
    "!!binary ",
    "!tag ",
    "'",
    "\"",
    "#",
    "---\n",
    "...",
    "op: ",
    "matrix: ",
    "inputs: ",
    "stages:",
    "vars:",
    "max_stages: 1",
    "1e309",
    "-1",
    "0",
    "null",
    "~",
    "true",
    ".inf",
    "../",
    "/etc/passwd",
    ".engine/x",
    "\t",
    "\u{feff}",
    "\u{0}",
    "s[*]",
    "x: [1, 1]",
    "? ",
    "|\n",
    ">\n",
    "timeout: 1e300",
    "1: a\n\"1\": b",
    "outs: [r]",
    "a/b",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &str) -> String {
    let mut bytes = input.as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(7) {
            0 if !bytes.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                bytes.splice(at..at, t.iter().copied());
            }
            2 if !bytes.is_empty() => {
                let i = at.min(bytes.len() - 1);
                bytes[i] = (rng.next() & 0x7f) as u8;
            }
            3 => {
                // Duplicate a line.
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let l = lines[rng.below(lines.len())];
                    let pos = text.find(l).unwrap_or(0);
                    bytes.splice(pos..pos, format!("{l}\n").into_bytes());
                }
            }
            4 => {
                // A big matrix.
                let n = 1 + rng.below(2000);
                let list: Vec<String> = (0..n).map(|i| i.to_string()).collect();
                let t = format!(
                    "\n  big{}:\n    op: shell\n    cmd: x\n    matrix: {{a: [{}], b: [{}]}}\n",
                    rng.below(9),
                    list.join(","),
                    list.join(",")
                );
                bytes.extend(t.into_bytes());
            }
            5 => {
                // Deep nesting.
                let depth = 1 + rng.below(300);
                let t = format!(
                    "\nvars: {{d: {}1{}}}\n",
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                bytes.extend(t.into_bytes());
            }
            _ => {
                let t = TOKENS[rng.below(TOKENS.len())];
                bytes.extend(t.as_bytes());
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parses and plans; any Err is fine, a panic or a slow case is a bug.
fn check(text: &str, registry: &Registry) {
    let started = Instant::now();
    let file = std::env::temp_dir().join("fuzz-pipeline.yaml");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Ok(p) = Pipeline::from_str(text, &file, &["vars.extra=1".to_string()]) {
            let limit = 10_000;
            if let Ok(plan) = plan::build(
                p,
                registry,
                &PlanOptions {
                    max_stages: Some(limit),
                    ..PlanOptions::default()
                },
            ) {
                assert!(plan.nodes.len() <= limit, "plan exceeds the stage limit");
            }
        }
    }));
    if result.is_err() {
        let dump = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crash.yaml");
        let _ = std::fs::write(&dump, text);
        panic!(
            "the parser/planner panicked; input saved to {}",
            dump.display()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "one input took {:?}:\n{text}",
        started.elapsed()
    );
}

#[test]
fn corpus_regressions_still_pass() {
    let registry = Registry::builtin();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz_corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/fuzz_corpus exists") {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        check(&text, &registry);
        n += 1;
    }
    assert!(n > 0, "the corpus is empty");
}

#[test]
fn random_and_mutated_pipelines_never_panic() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let registry = Registry::builtin();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut executions = 0u64;
    let mut pool: Vec<String> = SEEDS.iter().map(|s| s.to_string()).collect();
    while Instant::now() < deadline {
        let base = pool[rng.below(pool.len())].clone();
        let input = mutate(&mut rng, &base);
        check(&input, &registry);
        // Inputs that still parse are good parents for deeper mutations.
        if pool.len() < 512 && Pipeline::from_str(&input, Path::new("f.yaml"), &[]).is_ok() {
            pool.push(input);
        }
        executions += 1;
    }
    eprintln!(
        "fuzz: {executions} executions in {seconds} s, pool {}",
        pool.len()
    );
    assert!(executions > 0);
}
