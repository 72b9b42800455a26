//! The command line: flags, subcommands and their values.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Labels nodes that have Intel GPUs (`intelgpu=enabled` and the
/// `gpu.intel.com/*` discovery labels) when the cluster enables the GPU
/// plugin, and takes back only what it set.
#[derive(Debug, Parser)]
#[command(name = "intel-gpu-labeler", version, about, long_about = None)]
// A flag given twice takes its last value (as the plugin's).
#[command(args_override_self = true)]
pub(crate) struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The Node to label (default: from the credentials, when they are a
    /// node's own: `system:node:<name>`, asked of the API server).
    #[arg(long, env = "NODE_NAME", global = true)]
    pub node_name: Option<String>,
    /// The server-side apply field manager (host mode next to a DaemonSet
    /// labeller: use another, e.g. intel-gpu-labeler-host).
    #[arg(long, default_value = "intel-gpu-labeler", global = true)]
    pub field_manager: String,
    /// Where sysfs is read.
    #[arg(long, default_value = "/sys", global = true)]
    pub sysfs_root: PathBuf,
    /// Where devfs is read.
    #[arg(long, default_value = "/dev", global = true)]
    pub devfs_root: PathBuf,
    /// Count only these PCI device ids (same as the plugin's flag).
    #[arg(long, global = true)]
    pub allow_ids: Option<String>,
    /// Count all but these PCI device ids (same as the plugin's flag).
    #[arg(long, global = true)]
    pub deny_ids: Option<String>,
    /// An enabled-plugins file; repeatable, in order (default: the
    /// StarlingX locations under --host-root).
    #[arg(long = "enabled-plugins-file", global = true)]
    pub enabled_plugins_files: Vec<PathBuf>,
    /// The root the default StarlingX locations are found under.
    #[arg(long, default_value = "/", global = true)]
    pub host_root: PathBuf,
    /// A ConfigMap `NAMESPACE/NAME` whose `enabled_kube_plugins` key is
    /// consulted after the files.
    #[arg(long, global = true)]
    pub enabled_plugins_configmap: Option<String>,
    /// A kubeconfig (in-cluster configuration when absent).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Where labels go.
    #[arg(long, value_enum, default_value_t = Output::Api, global = true)]
    pub output: Output,
    /// The NFD features directory (with --output nfd-features-file).
    #[arg(
        long,
        default_value = "/etc/kubernetes/node-feature-discovery/features.d",
        global = true
    )]
    pub nfd_features_dir: PathBuf,
    /// How long the NFD feature file stays valid after it is written (NFD
    /// drops its labels after that, e.g. when the labeller died); it is
    /// rewritten when half of it has passed.
    #[arg(long, default_value = "1h", value_parser = duration_in(MINUTE, 30 * DAY), global = true)]
    pub nfd_expiry: Duration,
    /// How long a node without GPUs keeps the plugin label (e.g. 5m, 30s, 0s).
    #[arg(long, default_value = "5m", value_parser = duration_in(Duration::ZERO, 30 * DAY), global = true)]
    pub removal_grace: Duration,
    /// A label prefix the GPU plugin's label (named by the enabled-plugins
    /// content) may have; repeatable (default: unprefixed keys only).
    /// kubernetes.io, k8s.io and their subdomains are never allowed.
    #[arg(long = "allowed-label-prefix", value_name = "PREFIX", value_parser = parse_label_prefix, global = true)]
    pub allowed_label_prefixes: Vec<String>,
    /// Do not set the gpu.intel.com/* discovery labels.
    #[arg(long, global = true)]
    pub no_discovery_labels: bool,
    /// How long a "not enabled" reading must hold (read twice this far
    /// apart, same content) before the plugin label is removed.
    #[arg(long, default_value = "2s", value_parser = duration_in(Duration::ZERO, HOUR), global = true)]
    pub settle: Duration,
    /// Reconcile once and exit (a "not enabled" reading is confirmed by a
    /// second read --settle later first).
    #[arg(long, global = true)]
    pub oneshot: bool,
    /// Print the desired labels as a JSON object; touch nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// How often the daemon reconciles without a trigger.
    #[arg(long, default_value = "60s", value_parser = duration_in(Duration::from_millis(100), DAY), global = true)]
    pub resync: Duration,
    /// How long the daemon loop may spend in one round (reading, deciding,
    /// writing) before /healthz fails and the liveness probe restarts it;
    /// waiting for events does not count.
    #[arg(long, default_value = "5m", value_parser = duration_in(Duration::from_secs(1), HOUR), global = true)]
    pub stall_limit: Duration,
    /// Address of /metrics, /healthz and /readyz ("" turns it off).
    #[arg(long, default_value = "0.0.0.0:8081", global = true)]
    pub http_address: String,
    /// Log level.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub(crate) enum Command {
    /// Label the node (the default).
    Run,
    /// Remove exactly what the labeller owns on the node, and exit.
    Cleanup,
    /// Publish the enabled-plugins file's exact content as the cluster's
    /// ConfigMap (on the StarlingX controllers, which hold the replicated
    /// file), so that every node decides from the same object.
    Publish {
        /// The ConfigMap, NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        configmap: String,
    },
}

/// Where labels go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// The Node object, by server-side apply.
    Api,
    /// An NFD feature file.
    NfdFeaturesFile,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A prefix `--allowed-label-prefix` may name.
fn parse_label_prefix(s: &str) -> Result<String, String> {
    node_labeler::desired::LabelPrefixes::unprefixed_only()
        .allow(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// `90`, `90s`, `5m`, `1h`, `0s`, `250ms`. A number too large for any
/// duration is an error, not an overflow.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration such as 30s, 5m or 1h");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "ms" => return Ok(Duration::from_millis(n)),
        _ => return Err(bad()),
    };
    secs.map(Duration::from_secs).ok_or_else(bad)
}

/// A duration parser that also checks `min..=max`: every duration is
/// added to an `Instant` somewhere (a timer, a deadline), which panics on
/// overflow, and a value outside the range is a mistake anyway.
fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let d = parse_duration(s)?;
        if d < min || d > max {
            return Err(format!(
                "{s:?} is out of range: from {} to {}",
                show(min),
                show(max)
            ));
        }
        Ok(d)
    }
}

/// A range bound as the flags spell it.
fn show(d: Duration) -> String {
    let s = d.as_secs();
    match (d.subsec_millis(), s) {
        (0, 0) => "0s".into(),
        (ms, 0) => format!("{ms}ms"),
        (0, s) if s % 3600 == 0 => format!("{}h", s / 3600),
        (0, s) if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{}ms", d.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        // Too large for any duration: an error, never an overflow panic.
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
        assert!(parse_duration("18446744073709551615m").is_err());
    }

    /// Every duration flag is range-checked at parse time, with a clap
    /// error naming the range.
    #[test]
    fn durations_are_range_checked() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("intel-gpu-labeler").chain(args.iter().copied()))
        };
        for (flag, ok, bad) in [
            ("--resync", "200ms", "2562047788015215h"),
            ("--resync", "1h", "99ms"),
            ("--resync", "24h", "25h"),
            ("--settle", "0s", "2h"),
            ("--removal-grace", "0s", "31d"),
            ("--removal-grace", "720h", "721h"),
            ("--nfd-expiry", "1m", "59s"),
            ("--nfd-expiry", "720h", "18446744073709551615s"),
            ("--stall-limit", "1s", "999ms"),
            ("--stall-limit", "1h", "61m"),
        ] {
            assert!(parse(&[flag, ok]).is_ok(), "{flag} {ok}");
            let err = parse(&[flag, bad]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag} {bad}: {err}");
        }
        let err = parse(&["--resync", "25h"]).unwrap_err().to_string();
        assert!(err.contains("out of range: from 100ms to 24h"), "{err}");
    }
}
