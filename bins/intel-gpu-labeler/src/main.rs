//! `intel-gpu-labeler`: labels Kubernetes nodes that have Intel GPUs.

mod cli;
mod daemon;
mod metrics;
mod publish;
mod run;

use std::process::ExitCode;

use clap::Parser as _;

pub(crate) use cli::{Cli, Command, LogFormat, Output};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            eprintln!(
                "intel-gpu-labeler: {}",
                text.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    run::main(cli)
}
