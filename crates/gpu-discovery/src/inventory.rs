//! The inventory: every DRM card of the node, its state, and whether it is
//! advertised. Serialises to the JSON documented in `docs/inventory.md`.

use std::path::PathBuf;

use serde::{Serialize, Serializer};

use crate::sysfs::AttrError;

/// The version of the JSON shape.
pub const SCHEMA: u32 = 1;

/// What the node has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// Always [`SCHEMA`].
    pub schema: u32,
    /// Intel display functions, in card-number order.
    pub gpus: Vec<Gpu>,
    /// Entries that are not ours or could not be read, with the reason.
    pub skipped: Vec<Skipped>,
}

impl Inventory {
    /// The GPUs the device plugin advertises (and the labeller counts).
    pub fn advertised(&self) -> impl Iterator<Item = &Gpu> {
        self.gpus.iter().filter(|g| g.advertised)
    }

    /// The GPU with this card name.
    #[must_use]
    pub fn card(&self, name: &str) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.card == name)
    }

    /// The inventory as pretty JSON (`docs/inventory.md`).
    #[must_use]
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Whether a card can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CardState {
    /// Driver bound and device nodes present.
    Usable,
    /// An Intel display function whose driver is unbound or whose device
    /// nodes are missing: advertised as Unhealthy if it was advertised.
    Degraded,
}

/// An entry of `class/drm` that is not one of our GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The entry name (`card3`).
    pub entry: String,
    /// Why it was not used (shown as text in the inventory JSON).
    #[serde(serialize_with = "display")]
    pub reason: SkipReason,
}

/// Why an entry of `class/drm` is not one of our GPUs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SkipReason {
    /// Its `device` link cannot be resolved.
    #[error("cannot resolve {}: {error}", link.display())]
    Unresolvable {
        /// The `device` link.
        link: PathBuf,
        /// The OS error's text.
        error: String,
    },
    /// Its device is not a PCI function.
    #[error("not a PCI device: {} resolves to {}", link.display(), target.display())]
    NotPci {
        /// The `device` link.
        link: PathBuf,
        /// Where it leads.
        target: PathBuf,
    },
    /// An attribute of the device could not be read or parsed.
    #[error(transparent)]
    Attribute(#[from] AttrError),
    /// Another vendor's device.
    #[error("vendor {0:#06x} is not Intel (0x8086)")]
    NotIntel(u32),
    /// Not a display-class function.
    #[error("class {0:#08x} is not a display class (0x0300xx VGA or 0x0380xx display controller)")]
    NotDisplay(u32),
    /// Bound to a driver that is neither `i915` nor `xe`.
    #[error("bound to driver {0}, not i915 or xe")]
    OtherDriver(String),
}

fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The SR-IOV role of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SriovRole {
    /// A physical function that can have VFs.
    Pf,
    /// A virtual function.
    Vf,
    /// Neither.
    None,
}

/// SR-IOV facts of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sriov {
    /// The role.
    pub role: SriovRole,
    /// Enabled VFs (PF only).
    pub num_vfs: Option<u32>,
    /// Supported VFs (PF only).
    pub total_vfs: Option<u32>,
    /// The VFs' PCI addresses, in VF order (PF only).
    pub vfs: Vec<String>,
    /// The PF's PCI address (VF only).
    pub physfn: Option<String>,
}

/// The kind of a DRM device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// `cardN` (primary node).
    Card,
    /// `renderDN` (render node).
    Render,
}

/// A device node of a card, present in devfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceNode {
    /// Primary or render node.
    pub kind: NodeKind,
    /// The node's name (`renderD129`).
    pub name: String,
    /// Its path on the host (`/dev/dri/renderD129`), for the kubelet.
    pub host_path: PathBuf,
}

/// One Intel display function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// The DRM card name (`card1`).
    pub card: String,
    /// The card number.
    #[serde(skip)]
    pub index: u32,
    /// Usable or degraded.
    pub state: CardState,
    /// Why the card is degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// PCI address (`0000:03:00.0`).
    pub pci_address: String,
    /// PCI vendor id (`0x8086`).
    #[serde(serialize_with = "hex4")]
    pub vendor_id: u16,
    /// PCI device id (`0x56c0`).
    #[serde(serialize_with = "hex4")]
    pub device_id: u16,
    /// PCI class (`0x030000`).
    #[serde(serialize_with = "hex6")]
    pub class: u32,
    /// The bound kernel driver, if any.
    pub driver: Option<String>,
    /// SR-IOV role and relations.
    pub sriov: Sriov,
    /// NUMA node, `None` for no affinity (`-1`).
    pub numa_node: Option<u32>,
    /// The CPUs local to the device (`0-15`).
    pub local_cpus: Option<String>,
    /// Device nodes present in devfs, primary first.
    pub device_nodes: Vec<DeviceNode>,
    /// `by-path` links for this PCI address, host paths.
    pub by_path: Vec<PathBuf>,
    /// Tiles (xe: `device/tile*`; i915: `gt/gt*`); at least 1.
    pub tiles: u32,
    /// Local memory, when the kernel exposes it.
    pub vram_bytes: Option<u64>,
    /// hwmon temperature inputs (millidegrees C), sysfs paths.
    pub temperature_inputs: Vec<PathBuf>,
    /// MEI device nodes of the GPU's firmware interface, host paths.
    pub mei: Vec<PathBuf>,
    /// PCI addresses of the bridges above the device (root port first).
    pub pci_path: Vec<String>,
    /// Whether the device plugin advertises it.
    pub advertised: bool,
    /// Why it is not advertised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the kernel's uevents said about its health, while it holds
    /// (wedged, resetting); set by the watcher, never by a plain scan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_health: Option<String>,
    /// Attributes that were unreadable or garbage but not needed to use
    /// the card.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// How the kernel's wedged verdict starts in [`Gpu::kernel_health`].
pub(crate) const WEDGED: &str = "the kernel declared it wedged";

impl Gpu {
    /// Why the card is unhealthy, by the rules the device plugin and the
    /// DRA driver share: a degraded card (driver unbound, device nodes
    /// missing), or what the kernel's uevents said (wedged, a hang, a
    /// reset). `None` when healthy. (The plugin's optional temperature
    /// limit comes on top.)
    #[must_use]
    pub fn unhealthy_reason(&self) -> Option<String> {
        (self.state == CardState::Degraded)
            .then(|| self.state_reason.clone().unwrap_or_default())
            .or_else(|| self.kernel_health.clone())
    }

    /// Whether the kernel declared the card wedged: unusable until
    /// recovered (a rebind or a bus reset), so work on it must stop.
    #[must_use]
    pub fn wedged(&self) -> bool {
        self.kernel_health
            .as_deref()
            .is_some_and(|h| h.starts_with(WEDGED))
    }

    /// The primary and render nodes' host paths.
    pub fn node_paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.device_nodes.iter().map(|n| &n.host_path)
    }
}

fn hex4<S: Serializer>(v: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#06x}"))
}

fn hex6<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#08x}"))
}
