//! The command line, including the Go plugin's spellings.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::plan::{ByPath, MonitoringMode, Policy};

/// Kubernetes device plugin for Intel GPUs: advertises `gpu.intel.com/i915`
/// and `gpu.intel.com/xe` to the kubelet.
#[derive(Debug, Parser)]
#[command(name = "intel-gpu-plugin", version, about, long_about = None)]
pub struct Cli {
    /// What to do (default: run the plugin).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Where sysfs is read.
    #[arg(long, default_value = "/sys", global = true)]
    pub sysfs_root: PathBuf,
    /// Where devfs is read (reported paths stay under /dev).
    #[arg(long, default_value = "/dev", global = true)]
    pub devfs_root: PathBuf,
    /// Root prefix for both /sys and /dev (the Go plugin's -prefix).
    #[arg(long, global = true)]
    pub prefix: Option<PathBuf>,
    /// The kubelet's device plugin directory.
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    pub kubelet_dir: PathBuf,
    /// Where CDI specs are written.
    #[arg(long, default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
    /// Advertise each GPU this many times (cardN-0 … cardN-(N-1)).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub shared_dev_num: u32,
    /// GetPreferredAllocation policy.
    #[arg(long, value_enum, default_value_t = Policy::None)]
    pub allocation_policy: Policy,
    /// by-path mounts.
    #[arg(long, value_enum, default_value_t = ByPath::Single, global = true)]
    pub bypath: ByPath,
    /// Offer a monitoring resource with one device `all`.
    #[arg(long, global = true)]
    pub enable_monitoring: bool,
    /// One monitoring resource or one per driver.
    #[arg(long, value_enum, default_value_t = MonitoringMode::Single, global = true)]
    pub monitoring_mode: MonitoringMode,
    /// Advertise only these PCI device ids (comma list, e.g. 0x56a0,0x56c0).
    #[arg(long, global = true)]
    pub allow_ids: Option<String>,
    /// Advertise all but these PCI device ids.
    #[arg(long, global = true)]
    pub deny_ids: Option<String>,
    /// Report a GPU Unhealthy above this temperature (°C, from hwmon).
    #[arg(long, global = true)]
    pub temp_limit: Option<f64>,
    /// Address of /metrics, /healthz and /readyz ("" turns it off).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_address: String,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// What the plugin sees and would do: cards with state and reason,
    /// resources with IDs, health and topology, and the Allocate answer for
    /// one ID of each.
    Inspect {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// The HTTP address, if enabled.
    ///
    /// # Errors
    /// When the address does not parse.
    pub fn http(&self) -> Result<Option<SocketAddr>, String> {
        if self.http_address.is_empty() {
            return Ok(None);
        }
        self.http_address.parse().map(Some).map_err(|_| {
            format!(
                "--http-address {:?} is not an address such as 0.0.0.0:8080",
                self.http_address
            )
        })
    }

    /// sysfs and devfs roots, `--prefix` applied.
    #[must_use]
    pub fn roots(&self) -> (PathBuf, PathBuf) {
        match &self.prefix {
            Some(p) => (p.join("sys"), p.join("dev")),
            None => (self.sysfs_root.clone(), self.devfs_root.clone()),
        }
    }
}

/// Flags of the Go plugin that are accepted but not needed here.
const GO_IGNORED: &[&str] = &["health-management", "gpu-temp-limit", "memory-temp-limit"];
/// Boolean flags (Go accepts `-flag=true`).
const BOOLEAN: &[&str] = &["enable-monitoring", "health-management", "json"];

/// Translates the Go plugin's spellings into ours: `-flag`, `-flag=v` and
/// `-flag v` become `--flag`; `-v=N`/`-v N` becomes `--log-level`;
/// `-flag=true|false` for booleans; ignored Go flags are dropped with a
/// warning. Returns the new arguments and the warnings.
#[must_use]
pub fn translate_go_flags(args: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut out = Vec::with_capacity(args.len());
    let mut warnings = Vec::new();
    let mut it = args.into_iter();
    if let Some(program) = it.next() {
        out.push(program);
    }
    let mut rest: Vec<String> = it.collect();
    rest.reverse();
    while let Some(arg) = rest.pop() {
        let Some(body) = arg.strip_prefix('-') else {
            out.push(arg);
            continue;
        };
        let body = body.strip_prefix('-').unwrap_or(body);
        if body.is_empty() || arg.len() == 2 && !arg.starts_with("-v") {
            // `--`, `-h`, `-V`: leave alone.
            out.push(arg);
            continue;
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (body.to_owned(), None),
        };
        if name == "v" {
            let value = value.or_else(|| rest.pop()).unwrap_or_default();
            let level = match value.parse::<u32>() {
                Ok(0) => "info",
                Ok(1..=3) => "debug",
                Ok(_) => "trace",
                Err(_) => {
                    warnings.push(format!(
                        "-v {value:?} is not a number; keeping the log level"
                    ));
                    continue;
                }
            };
            out.push("--log-level".into());
            out.push(level.into());
            continue;
        }
        if GO_IGNORED.contains(&name.as_str()) {
            if value.is_none() && !BOOLEAN.contains(&name.as_str()) {
                rest.pop();
            }
            warnings.push(format!("-{name} is accepted but not needed: health comes from sysfs and hwmon without a sidecar"));
            continue;
        }
        if BOOLEAN.contains(&name.as_str()) {
            match value.as_deref() {
                None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => {
                    out.push(format!("--{name}"))
                }
                Some("false" | "0" | "f" | "F" | "FALSE" | "False") => {}
                Some(other) => {
                    out.push(format!("--{name}={other}"));
                }
            }
            continue;
        }
        match value {
            Some(v) => out.push(format!("--{name}={v}")),
            None => out.push(format!("--{name}")),
        }
    }
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(args: &[&str]) -> (Vec<String>, Vec<String>) {
        translate_go_flags(args.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn go_spellings() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["p", "-shared-dev-num=2"], &["p", "--shared-dev-num=2"]),
            (
                &["p", "-shared-dev-num", "2"],
                &["p", "--shared-dev-num", "2"],
            ),
            (
                &["p", "--shared-dev-num", "2"],
                &["p", "--shared-dev-num", "2"],
            ),
            (&["p", "-v=4"], &["p", "--log-level", "trace"]),
            (&["p", "-v", "2"], &["p", "--log-level", "debug"]),
            (&["p", "-enable-monitoring"], &["p", "--enable-monitoring"]),
            (&["p", "-enable-monitoring=false"], &["p"]),
            (&["p", "-prefix=/host"], &["p", "--prefix=/host"]),
            (
                &["p", "-health-management", "-bypath=none"],
                &["p", "--bypath=none"],
            ),
            (&["p", "-gpu-temp-limit", "90", "-h"], &["p", "-h"]),
            (&["p", "inspect", "--json"], &["p", "inspect", "--json"]),
        ];
        for (input, want) in cases {
            assert_eq!(t(input).0, *want, "{input:?}");
        }
        assert_eq!(t(&["p", "-health-management"]).1.len(), 1);
    }
}
