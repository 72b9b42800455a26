//! Project automation, run as `cargo xtask <task>`.
//!
//! Tasks:
//! - `ci [STEP…]`: everything CI checks (see [`ci::STEPS`]), each step timed.
//! - `bench`: every benchmark target, merged into `target/bench/report.json`.
//! - `demo [--keep]`: the whole system on a simulated node.
//! - `codegen [--check]`: the device plugin API's generated code.
//! - `fuzz [CRATE/TARGET]`: a `cargo fuzz` target on nightly (opt-in).

mod bench;
mod ci;
mod codegen;
mod demo;
mod deploy;
mod fuzz;
mod image;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  demo [--keep]  run the whole system on a simulated StarlingX node
  ci [STEP...]   run what CI runs (steps: fmt clippy test tidy deny); all steps by default
  bench          run every benchmark and write target/bench/report.json
  image [--check] [--verify-reproducible]
                 OCI image archives in target/images (static release binaries)
  manifests [--write]
                 render deploy/overlays (--write: regenerate the Ansible template)
  codegen [--check]
                 regenerate (or check) the gRPC code from the .proto files
  fuzz [CRATE/TARGET] [--seconds N]
                 run a cargo-fuzz target on nightly (lists the targets without one)
  help           this text
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result = match task.as_deref() {
        Some("ci") => ci::task(&rest),
        Some("demo") => demo::task(&rest),
        Some("manifests") => deploy::task(&rest),
        Some("image") => image::task(&rest),
        Some("bench") => bench::task(&rest),
        Some("fuzz") => fuzz::task(&rest),
        Some("codegen") => codegen::task(&rest),
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprint!("xtask: unknown task `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
