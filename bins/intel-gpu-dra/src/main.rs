//! `intel-gpu-dra`: the Kubernetes DRA driver for Intel GPUs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gpu_discovery::{DiscoveryConfig, IdFilter};
use intel_gpu_dra::cli::Cli;
use intel_gpu_dra::run::{RunConfig, run};

/// Exit code for unusable flags.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
                "intel-gpu-dra: {}",
                text.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
            );
            return ExitCode::from(USAGE);
        }
    };
    let Ok(filter) = tracing_subscriber::EnvFilter::try_new(&cli.log_level) else {
        eprintln!(
            "intel-gpu-dra: --log-level {:?} is not a level such as info or debug",
            cli.log_level
        );
        return ExitCode::from(USAGE);
    };
    // Colours only for a person at a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if cli.node_name.is_empty() {
        eprintln!("intel-gpu-dra: --node-name (or NODE_NAME) is empty");
        return ExitCode::from(USAGE);
    }
    let filter = match IdFilter::parse(cli.allow_ids.as_deref(), cli.deny_ids.as_deref()) {
        Ok(parsed) => {
            for w in parsed.warnings {
                tracing::warn!("{w}");
            }
            parsed.filter
        }
        Err(e) => {
            eprintln!("intel-gpu-dra: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let http = match cli.http_address.as_str() {
        "none" | "" => None,
        a => match a.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                eprintln!(
                    "intel-gpu-dra: --http-address {a:?} is not an address such as 0.0.0.0:8081"
                );
                return ExitCode::from(USAGE);
            }
        },
    };
    let config = RunConfig {
        node: cli.node_name,
        discovery: DiscoveryConfig::new(cli.sysfs_root, cli.devfs_root).filter(filter),
        kubeconfig: cli.kubeconfig,
        registry_dir: cli.registry_dir,
        plugin_dir: cli.plugin_dir,
        cdi_dir: cli.cdi_dir,
        trust_uevent_port: cli.trust_uevent_port,
        stall_limit: std::time::Duration::from_millis(cli.stall_limit_ms),
        boot_id_file: cli.boot_id_file,
        sharing: cli.sharing,
        sriov: cli.sriov,
        taints: cli.taints,
        owner_lock: match cli.owner_lock.as_str() {
            "none" | "" => None,
            p => Some(PathBuf::from(p)),
        },
        http,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("intel-gpu-dra: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intel-gpu-dra: {e:#}");
            ExitCode::FAILURE
        }
    }
}
