//! Flags.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Shared GPUs through consumable capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sharing {
    /// When the cluster keeps `allowMultipleAllocations` (gate
    /// DRAConsumableCapacity).
    Auto,
    /// Required: refuse to start without it.
    On,
    /// Whole GPUs only.
    Off,
}

/// How a PF and its VFs are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sriov {
    /// Counters when the cluster keeps them (gate DRAPartitionableDevices),
    /// else the PF is not published while it has VFs.
    Auto,
    /// Counters required: refuse to start without them.
    Counters,
    /// The PF is not published while it has VFs (the device plugin's rule).
    HidePf,
}

/// Device taints for health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Taints {
    /// When the cluster keeps them (gate DRADeviceTaints); else unhealthy
    /// GPUs are withheld.
    Auto,
    /// Required: refuse to start without them.
    On,
    /// Unhealthy GPUs are withheld.
    Off,
}

/// The Intel GPU DRA driver (`gpu.intel.com`).
#[derive(Debug, Parser)]
#[command(name = "intel-gpu-dra", version, about, long_about = None)]
#[command(args_override_self = true)]
pub struct Cli {
    /// This node's name (the pool and the slices' owner).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where sysfs is read.
    #[arg(long, default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// Where devfs is read (reported paths stay under /dev).
    #[arg(long, default_value = "/dev")]
    pub devfs_root: PathBuf,
    /// A kubeconfig (default: in-cluster credentials).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubelet's plugin registration directory.
    #[arg(long, default_value = "/var/lib/kubelet/plugins_registry")]
    pub registry_dir: PathBuf,
    /// The driver's data directory (DRA socket, checkpoint).
    #[arg(long, default_value = "/var/lib/kubelet/plugins/gpu.intel.com")]
    pub plugin_dir: PathBuf,
    /// Where CDI specs are written.
    #[arg(long, default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
    /// Where the node's boot ID is read: a record made in another boot is
    /// prepared again in full instead of written back (device nodes are
    /// numbered anew at every boot).
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id")]
    pub boot_id_file: PathBuf,
    /// How long the main loop, a rescan or a prepare may go without
    /// progress before `/healthz` fails, in milliseconds.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub stall_limit_ms: u64,
    /// Also take kernel-format uevents from this netlink port as the
    /// kernel's (a test kernel in a hermetic namespace; never on a real
    /// node, where only the kernel's port 0 is believed).
    #[arg(long, hide = true)]
    pub trust_uevent_port: Option<u32>,
    /// Shared GPUs.
    #[arg(long, value_enum, default_value_t = Sharing::Auto)]
    pub sharing: Sharing,
    /// SR-IOV PFs and VFs.
    #[arg(long, value_enum, default_value_t = Sriov::Auto)]
    pub sriov: Sriov,
    /// Health as device taints.
    #[arg(long, value_enum, default_value_t = Taints::Auto)]
    pub taints: Taints,
    /// The node's owner lock, shared with the device plugin (`none`: no
    /// lock).
    #[arg(long, default_value = gpu_discovery::owner::DEFAULT_OWNER_LOCK)]
    pub owner_lock: String,
    /// Device ids to use (`0x56c0,0xe20b`; default all).
    #[arg(long)]
    pub allow_ids: Option<String>,
    /// Device ids to leave alone.
    #[arg(long)]
    pub deny_ids: Option<String>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (`none`: not).
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub http_address: String,
    /// Log level or filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}
