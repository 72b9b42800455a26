//! `intel-gpu-plugin`: the Kubernetes device plugin for Intel GPUs.

use std::process::ExitCode;

use clap::Parser;
use gpu_discovery::{DiscoveryConfig, IdFilter, scan};
use intel_gpu_plugin::cli::{Cli, Command, LogFormat, translate_go_flags};
use intel_gpu_plugin::inspect;
use intel_gpu_plugin::plan::Options;
use intel_gpu_plugin::server::{RunConfig, run};

/// Exit code for unusable flags.
const USAGE: u8 = 2;

fn init_logging(cli: &Cli) -> Result<(), String> {
    // The HPACK codec under the `:authority` adapter logs every header at
    // debug: quiet unless asked for by name.
    let directives = if cli.log_level.contains("loona_hpack") {
        cli.log_level.clone()
    } else {
        format!("{},loona_hpack=warn", cli.log_level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).map_err(|_| {
        format!(
            "--log-level {:?} is not a level such as info or debug",
            cli.log_level
        )
    })?;
    // Colours only for a person at a terminal: `kubectl logs` and
    // journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let (args, go_warnings) = translate_go_flags(std::env::args().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
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
                "intel-gpu-plugin: {}",
                text.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(USAGE);
        }
    };
    if let Err(e) = init_logging(&cli) {
        eprintln!("intel-gpu-plugin: {e}");
        return ExitCode::from(USAGE);
    }
    for w in go_warnings.iter().chain(&cli.warnings()) {
        tracing::warn!("{w}");
    }
    let filter = match IdFilter::parse(cli.allow_ids.as_deref(), cli.deny_ids.as_deref()) {
        Ok(parsed) => {
            for w in parsed.warnings {
                tracing::warn!("{w}");
            }
            parsed.filter
        }
        Err(e) => {
            eprintln!("intel-gpu-plugin: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let http = match cli.http() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("intel-gpu-plugin: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let (sysfs, devfs) = cli.roots();
    let discovery = DiscoveryConfig::new(sysfs, devfs).filter(filter);
    let options = Options {
        shared_dev_num: cli.shared_dev_num,
        bypath: cli.bypath,
        monitoring: cli.enable_monitoring.then_some(cli.monitoring_mode),
        temp_limit: cli.temp_limit(),
        temp_hysteresis: 5.0,
        host_dri: discovery.host_dev_prefix().join("dri"),
    };
    if let Some(Command::Inspect { json }) = cli.command {
        return match scan(&discovery) {
            Ok(inventory) => {
                let report = inspect::report(&inventory, &options, &cli.cdi_dir);
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                } else {
                    print!("{}", inspect::text(&report));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "intel-gpu-plugin: {e}: {}",
                    std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                );
                ExitCode::FAILURE
            }
        };
    }
    let config = RunConfig {
        discovery,
        options,
        policy: cli.allocation_policy,
        kubelet_dir: cli.kubelet_dir,
        cdi_dir: cli.cdi_dir,
        trust_uevent_port: cli.trust_uevent_port,
        cdi_grace: std::time::Duration::from_millis(cli.cdi_grace_ms),
        stall_limit: std::time::Duration::from_millis(cli.stall_limit_ms),
        ignored_flags: go_warnings.len(),
        http,
        owner_lock: cli.owner_lock,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("intel-gpu-plugin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intel-gpu-plugin: {e:#}");
            ExitCode::FAILURE
        }
    }
}
