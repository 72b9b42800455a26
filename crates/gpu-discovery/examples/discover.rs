//! Prints a node's GPU inventory as JSON (`docs/inventory.md`).
//!
//! `cargo run -p gpu-discovery --example discover -- --sysfs-root DIR
//! --devfs-root DIR [--host-dev DIR] [--allow-ids LIST | --deny-ids LIST]`

use std::process::ExitCode;

use gpu_discovery::{DiscoveryConfig, IdFilter, scan};

fn main() -> ExitCode {
    let mut sysfs = None;
    let mut devfs = None;
    let mut host_dev = None;
    let mut allow = None;
    let mut deny = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--sysfs-root" => &mut sysfs,
            "--devfs-root" => &mut devfs,
            "--host-dev" => &mut host_dev,
            "--allow-ids" => &mut allow,
            "--deny-ids" => &mut deny,
            other => {
                eprintln!("discover: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        };
        let Some(value) = args.next() else {
            eprintln!("discover: {flag} needs a value");
            return ExitCode::from(2);
        };
        *slot = Some(value);
    }
    let (Some(sysfs), Some(devfs)) = (sysfs, devfs) else {
        eprintln!(
            "usage: discover --sysfs-root DIR --devfs-root DIR [--host-dev DIR] [--allow-ids LIST | --deny-ids LIST]"
        );
        return ExitCode::from(2);
    };
    let filter = match IdFilter::parse(allow.as_deref(), deny.as_deref()) {
        Ok(parsed) => {
            for w in parsed.warnings {
                eprintln!("discover: warning: {w}");
            }
            parsed.filter
        }
        Err(e) => {
            eprintln!("discover: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = DiscoveryConfig::new(sysfs, devfs).filter(filter);
    if let Some(h) = host_dev {
        config = config.host_dev(h);
    }
    match scan(&config) {
        Ok(inventory) => {
            println!("{}", inventory.to_json());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let source = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            eprintln!("discover: {e}{source}");
            ExitCode::FAILURE
        }
    }
}
