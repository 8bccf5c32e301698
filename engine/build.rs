//! Links `engine` as a position-dependent executable. The binary starts itself again as its
//! stage host (`ops::supervisor`), and `exec-stage` runs it per Slurm job; as a PIE every start
//! paid the dynamic loader about 12,500 relocations (over a millisecond here), a
//! fixed-address executable none.
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
