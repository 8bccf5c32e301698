//! The `engine` command line: turns arguments into validated requests once, at the edge, and
//! library errors into messages for people. Exit codes: 0 ok, 1 a stage failed, 2 bad input,
//! 130 interrupted.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
