//! The command line, including the Go plugin's spellings.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::plan::{ByPath, MonitoringMode, Policy};

/// The plan's choices as flag values: the plan itself stays free of clap.
macro_rules! flag_values {
    ($ty:ty { $($variant:ident => $name:literal: $help:literal,)* }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$ty>::$variant),*]
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $(<$ty>::$variant => clap::builder::PossibleValue::new($name).help($help),)*
                })
            }
        }
    };
}

flag_values!(ByPath {
    Single => "single": "Each allocated card's own pci-<address>-* links",
    All => "all": "The whole by-path directory",
    None => "none": "No by-path mounts",
});
flag_values!(MonitoringMode {
    Single => "single": "One resource, gpu.intel.com/monitoring",
    Split => "split": "One per driver: gpu.intel.com/i915_monitoring, .../xe_monitoring",
});
flag_values!(Policy {
    None => "none": "The kubelet's order, spreading over cards first",
    Balanced => "balanced": "Take from the card with the most free shares",
    Packed => "packed": "Fill card after card",
});

/// Kubernetes device plugin for Intel GPUs: advertises `gpu.intel.com/i915`
/// and `gpu.intel.com/xe` to the kubelet.
#[derive(Debug, Parser)]
#[command(name = "intel-gpu-plugin", version, about, long_about = None)]
// A flag given twice takes its last value, as Go's flag package does.
#[command(args_override_self = true)]
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
    /// Also take kernel-format uevents from this netlink port as the
    /// kernel's (a test kernel in a hermetic namespace; never on a real
    /// node, where only the kernel's port 0 is believed).
    #[arg(long, hide = true)]
    pub trust_uevent_port: Option<u32>,
    /// Where CDI specs are written (and where `inspect` looks for them).
    #[arg(long, default_value = "/var/run/cdi", global = true)]
    pub cdi_dir: PathBuf,
    /// The node's GPU owner lock, shared with the DRA driver
    /// (`/run/intel-gpu/owner.lock` in the shipped manifests): nothing is
    /// served until it is held. Default: no lock.
    #[arg(long)]
    pub owner_lock: Option<PathBuf>,
    /// How long a card missing from the inventory keeps its CDI spec, in
    /// milliseconds (the kubelet replays cached Allocate answers, CDI names
    /// included, when it restarts a container).
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub cdi_grace_ms: u64,
    /// How long the main loop, a rescan, or a blocking read may go without
    /// progress before `/healthz` fails, in milliseconds.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub stall_limit_ms: u64,
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
    /// Health management: report a GPU Unhealthy above `--temp-limit`
    /// (hwmon, read without waking suspended GPUs). Kernel events (wedged,
    /// reset) and missing device nodes count always.
    #[arg(long, global = true)]
    pub health_management: bool,
    /// The temperature limit of health management, °C (default 100, as
    /// the Go plugin's).
    #[arg(long, global = true, value_parser = parse_temp_limit)]
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

/// A temperature limit: a number of °C from 1 to 200 (not NaN, not
/// infinite: either would make every GPU healthy or unhealthy for good).
fn parse_temp_limit(s: &str) -> Result<f64, String> {
    let t: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a temperature in °C such as 90"))?;
    if !(1.0..=200.0).contains(&t) {
        return Err(format!("{s:?} is out of range: from 1 to 200 °C"));
    }
    Ok(t)
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

/// The Go plugin's default temperature limit, °C.
pub const DEFAULT_TEMP_LIMIT: f64 = 100.0;

impl Cli {
    /// The temperature limit in force: only with health management, as in
    /// the Go plugin.
    #[must_use]
    pub fn temp_limit(&self) -> Option<f64> {
        self.health_management
            .then(|| self.temp_limit.unwrap_or(DEFAULT_TEMP_LIMIT))
    }

    /// Warnings about flags that are accepted but have no effect.
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.temp_limit.is_some() && !self.health_management {
            out.push(
                "-temp-limit has no effect without -health-management (as in the Go plugin)"
                    .to_owned(),
            );
        }
        out
    }

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

/// Flags of the Go plugin and of its klog (`klog.InitFlags`, klog v2.140)
/// that are accepted and ignored, with why: `(name, takes a value, why)`.
/// Go's bool flags never take the next argument as their value.
const GO_IGNORED: &[(&str, bool, &str)] = &[
    (
        "gpu-temp-limit",
        true,
        "hwmon gives no separate GPU temperature; -temp-limit applies to the hottest input",
    ),
    (
        "memory-temp-limit",
        true,
        "hwmon gives no separate memory temperature; -temp-limit applies to the hottest input",
    ),
    (
        "xpumd-endpoint",
        true,
        "health comes from sysfs, hwmon and kernel events, without xpumd",
    ),
    (
        "wsl",
        false,
        "WSL is not supported; the plugin runs as on Linux",
    ),
    (
        "resource-manager",
        false,
        "fractional resources are not supported (Dynamic Resource Allocation is the planned way)",
    ),
    ("logtostderr", false, "logs always go to standard error"),
    ("alsologtostderr", false, "logs always go to standard error"),
    (
        "legacy_stderr_threshold_behavior",
        false,
        "logs always go to standard error",
    ),
    ("add_dir_header", false, "log lines have their own format"),
    ("skip_headers", false, "log lines have their own format"),
    ("skip_log_headers", false, "log lines have their own format"),
    ("one_output", false, "logs always go to standard error"),
    (
        "stderrthreshold",
        true,
        "logs always go to standard error; use -v or --log-level",
    ),
    (
        "alsologtostderrthreshold",
        true,
        "logs always go to standard error; use -v or --log-level",
    ),
    ("log_dir", true, "logs always go to standard error"),
    ("log_file", true, "logs always go to standard error"),
    (
        "log_file_max_size",
        true,
        "logs always go to standard error",
    ),
    ("log_backtrace_at", true, "not supported"),
    (
        "vmodule",
        true,
        "use --log-level with per-module directives",
    ),
];
/// Boolean flags (Go accepts `-flag=true`).
const BOOLEAN: &[&str] = &["enable-monitoring", "health-management", "json"];

/// Whether `name` is one of our long flags.
/// Every long flag of ours (subcommands' included), `help` and `version`.
fn our_flags() -> std::collections::BTreeSet<String> {
    use clap::CommandFactory as _;
    let cmd = Cli::command();
    cmd.get_arguments()
        .chain(cmd.get_subcommands().flat_map(clap::Command::get_arguments))
        .filter_map(|a| a.get_long().map(str::to_owned))
        .chain(["help".to_owned(), "version".to_owned()])
        .collect()
}

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
    // Built once, and only when some flag is single-dash.
    let mut ours: Option<std::collections::BTreeSet<String>> = None;
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
        if let Some((_, takes_value, why)) = GO_IGNORED.iter().find(|(n, _, _)| *n == name) {
            if value.is_none() && *takes_value {
                rest.pop();
            }
            let w = format!("-{name} is accepted and ignored: {why}");
            if !warnings.contains(&w) {
                warnings.push(w);
            }
            continue;
        }
        // A Go-style flag that neither this plugin nor the Go plugin knows
        // (a newer Go release's, say): warned about and ignored, so an
        // in-place switch never crash-loops on it. `--` flags stay ours and
        // strict.
        if !arg.starts_with("--") && !ours.get_or_insert_with(our_flags).contains(name.as_str()) {
            if value.is_none()
                && rest
                    .last()
                    .is_some_and(|n| !n.starts_with('-') && n != "inspect")
            {
                rest.pop();
            }
            warnings.push(format!(
                "-{name} is not a flag of this plugin or of the Go plugin; ignored"
            ));
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
                &["p", "--health-management", "--bypath=none"],
            ),
            (&["p", "-gpu-temp-limit", "90", "-h"], &["p", "-h"]),
            (
                &["p", "-logtostderr", "-shared-dev-num", "2"],
                &["p", "--shared-dev-num", "2"],
            ),
            (&["p", "-logtostderr=false", "-log_dir", "/tmp"], &["p"]),
            (&["p", "-xpumd-endpoint", "/run/x.sock", "-wsl"], &["p"]),
            (&["p", "inspect", "--json"], &["p", "inspect", "--json"]),
        ];
        for (input, want) in cases {
            assert_eq!(t(input).0, *want, "{input:?}");
        }
        assert!(t(&["p", "-health-management"]).1.is_empty());
        // Unknown Go-style flags are ignored with a warning; ours stay strict.
        let (args, warnings) = t(&["p", "-future-flag", "x", "-other=1", "-newbool", "inspect"]);
        assert_eq!(args, ["p", "inspect"]);
        assert_eq!(warnings.len(), 3);
        assert_eq!(t(&["p", "--future-flag"]).0, ["p", "--future-flag"]);
        // Each ignored flag warns once.
        assert_eq!(
            t(&["p", "-logtostderr", "-logtostderr=true", "-wsl"])
                .1
                .len(),
            2
        );
    }

    /// Counts, durations and the temperature limit are range-checked at
    /// parse time: a huge `--cdi-grace-ms` or `--stall-limit-ms` would
    /// overflow the `Instant` arithmetic it feeds (a panic in a debug
    /// build), a NaN limit would make every GPU healthy for good.
    #[test]
    fn numbers_are_range_checked() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("intel-gpu-plugin").chain(args.iter().copied()))
        };
        for (flag, ok, bad) in [
            ("--cdi-grace-ms", "0", "18446744073709551615"),
            ("--cdi-grace-ms", "86400000", "86400001"),
            ("--stall-limit-ms", "100", "99"),
            ("--stall-limit-ms", "3600000", "18446744073709551615"),
            ("--shared-dev-num", "1000", "0"),
            ("--shared-dev-num", "1", "1001"),
            ("--temp-limit", "90", "NaN"),
            ("--temp-limit", "200", "inf"),
            ("--temp-limit", "1", "0.5"),
        ] {
            assert!(parse(&[flag, ok]).is_ok(), "{flag} {ok}");
            let err = parse(&[flag, bad]).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag} {bad}: {err}");
        }
    }
}
