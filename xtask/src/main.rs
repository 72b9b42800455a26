//! Project automation, run as `cargo xtask <task>`.
//!
//! `cargo xtask --help` lists the tasks (parsed with clap, so the list is
//! always the one the code accepts).

mod bench;
mod ci;
mod codegen;
mod demo;
mod deploy;
mod fuzz;
mod image;
mod soak;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Project automation: `cargo xtask <task>`.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the whole system on a simulated StarlingX node.
    Demo {
        /// Keep the simulated node's directory afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Run what CI runs, each step timed; every step by default.
    Ci {
        /// The steps to run.
        #[arg(value_parser = ci_steps())]
        steps: Vec<String>,
    },
    /// Run every benchmark and write target/bench/report.json (arguments go
    /// to `cargo bench`, e.g. `-p devplugin-api`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Soak the release binaries against the emulators (kubelet restarts,
    /// hotplug storms, API faults, kill -9) and write target/soak/report.json.
    Soak {
        /// The cluster time the labeller part compresses (e.g. 1h, 10m).
        #[arg(long)]
        duration: Option<String>,
        /// The CI size: every scenario, fewer times (under a minute).
        #[arg(long)]
        quick: bool,
        /// Replay a run: the seed a failed run printed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// OCI image archives in target/images (static release binaries).
    Image {
        /// Inspect them with skopeo, umoci and runc where installed.
        #[arg(long)]
        check: bool,
        /// Build everything a second time elsewhere and compare digests.
        #[arg(long)]
        verify_reproducible: bool,
    },
    /// Render deploy/overlays.
    Manifests {
        /// Regenerate the Ansible role's manifest template.
        #[arg(long)]
        write: bool,
    },
    /// Regenerate (or check) the gRPC code from the .proto files.
    Codegen {
        /// Only check that the generated code is fresh.
        #[arg(long)]
        check: bool,
    },
    /// Run a cargo-fuzz target on nightly (lists the targets without one).
    Fuzz {
        /// CRATE/TARGET.
        target: Option<String>,
        /// How long to run it.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// The CI steps, with what each checks, as clap's possible values.
fn ci_steps() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        ci::STEPS
            .iter()
            .map(|(name, help)| clap::builder::PossibleValue::new(*name).help(*help)),
    )
}

fn main() -> ExitCode {
    // `bench` hands everything after it to `cargo bench` unchanged (a
    // leading `--`, `--help` included), which clap would not.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "bench") {
        return finish(bench::task(&args[2..]));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.task {
        Task::Ci { steps } => ci::task(&steps),
        Task::Demo { keep } => demo::task(keep),
        Task::Manifests { write } => deploy::task(write),
        Task::Image {
            check,
            verify_reproducible,
        } => image::task(check, verify_reproducible),
        Task::Bench { cargo_args } => bench::task(&cargo_args),
        Task::Soak {
            duration,
            quick,
            seed,
        } => soak::task(duration.as_deref(), quick, seed),
        Task::Fuzz { target, seconds } => fuzz::task(target.as_deref(), seconds),
        Task::Codegen { check } => codegen::task(check),
    };
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
