//! Links `engine` as a position-dependent executable. Each shell stage starts the binary again
//! as its supervisor (`ops::supervisor`); as a PIE, every start paid the dynamic loader about
//! 12,500 relocations (over a millisecond here), a fixed-address executable none.
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
