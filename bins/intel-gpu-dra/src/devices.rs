//! The pure core: from an inventory (and the cluster's DRA features) to
//! the devices published, their attributes, capacity, counters and
//! taints. No I/O here.
//!
//! Names and attributes are Intel's DRA driver's, so DeviceClasses and
//! claims written for it keep working: a device is named after its PCI
//! address and device id (`0000-03-00-0-0x56c0`: stable across restarts,
//! card renumbering and hotplug), and carries `model`, `family`,
//! `driver`, `sriov`, `type` (`gpu` or `vf`), `pciId`, `health`,
//! `resource.kubernetes.io/pciBusID`, `resource.kubernetes.io/pcieRoot`,
//! and capacity `millicores` (1000) and `memory` (local memory, when the
//! kernel tells). Added here: `numaNode` and `tiles`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use dra_api::slices::{
    Attribute, CounterLayout, CounterSet, DeviceError, DeviceSet, DeviceTaint, RequestPolicy,
    SliceDevice, TaintEffect, ValidAmounts,
};
use gpu_discovery::{
    DiscoveryConfig, Gpu, Inventory, SriovRole, not_advertised_reason,
    not_published_reason_keeping_pfs,
};

/// The driver name (Intel's).
pub const DRIVER: &str = "gpu.intel.com";
/// The CDI kind of prepared devices (Intel's: `intel.com/gpu=<name>`).
pub const CDI_KIND: &str = "intel.com/gpu";
/// Taint key of a card that is unhealthy but may recover (NoSchedule).
pub const TAINT_UNHEALTHY: &str = "gpu.intel.com/unhealthy";
/// Taint key of a card the kernel declared wedged (NoExecute).
pub const TAINT_WEDGED: &str = "gpu.intel.com/wedged";
/// Taint key of a card that left the node while prepared (NoExecute).
pub const TAINT_GONE: &str = "gpu.intel.com/gone";
/// The counter a PF's set holds: one slot per VF; the PF takes them all.
pub const SLOTS: &str = "slots";

/// How the devices are published: decided from the cluster's features
/// and the flags at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Shared GPUs through consumable capacity (else one claim per GPU).
    pub shared: bool,
    /// PF beside its VFs, kept apart by counters in this layout (else the
    /// PF is not published while it has VFs).
    pub counters: Option<CounterLayout>,
    /// Health as device taints (else an unhealthy card is withheld).
    pub taints: bool,
}

impl Mode {
    /// Whole GPUs, no counters, no taints: what any 1.34 cluster takes.
    pub const PLAIN: Self = Self {
        shared: false,
        counters: None,
        taints: false,
    };
}

/// What a prepared claim needs of a device: its nodes and links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Card and render nodes, host paths, primary first.
    pub nodes: Vec<PathBuf>,
    /// by-path links, host paths.
    pub by_path: Vec<PathBuf>,
    /// The render node, if any.
    pub render: Option<PathBuf>,
    /// Whether it may be allocated to several claims.
    pub shared: bool,
    /// The SR-IOV family: the PF's device name, for the PF (with VFs)
    /// and its VFs; a PF and a VF of one family are never prepared for
    /// different claims.
    pub family: Option<String>,
    /// Whether it is the family's PF.
    pub is_pf: bool,
}

/// The devices to publish and what prepare needs of each.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// For the slice publisher.
    pub set: DeviceSet,
    /// By device name: the devices present now.
    pub facts: BTreeMap<String, DeviceFacts>,
    /// Devices left out, and why (for logs and `inspect`).
    pub withheld: BTreeMap<String, String>,
}

/// A device's name: its PCI address with `:` and `.` as `-`, then its
/// device id (`0000-03-00-0-0x56c0`).
#[must_use]
pub fn device_name(gpu: &Gpu) -> String {
    format!(
        "{}-{:#06x}",
        gpu.pci_address
            .to_ascii_lowercase()
            .replace([':', '.'], "-"),
        gpu.device_id
    )
}

/// The PCIe root complex (`pci<domain>:<bus>` of the root port, or of the
/// device on a root bus), as `resource.kubernetes.io/pcieRoot` names it.
fn pcie_root(gpu: &Gpu) -> Option<String> {
    let top = gpu.pci_path.first().unwrap_or(&gpu.pci_address);
    let (domain_bus, _) = top.rsplit_once(':')?;
    Some(format!("pci{domain_bus}"))
}

/// Capacity policies of a shared GPU: a claim that asks nothing takes the
/// whole GPU (1000 millicores), as on an exclusive one; one that asks for
/// millicores gets a share, in steps of 10. Memory is accounted in steps
/// of 64 MiB and taken only when asked for (the default is one step).
fn millicores_policy() -> RequestPolicy {
    RequestPolicy {
        default: "1000".into(),
        valid: ValidAmounts::Range {
            min: "10".into(),
            max: Some("1000".into()),
            step: Some("10".into()),
        },
    }
}

fn memory_policy() -> RequestPolicy {
    RequestPolicy {
        default: "64Mi".into(),
        valid: ValidAmounts::Range {
            min: "64Mi".into(),
            max: None,
            step: Some("64Mi".into()),
        },
    }
}

/// Whether the DRA driver publishes this card, and why not.
fn withheld_reason(config: &DiscoveryConfig, gpu: &Gpu, mode: Mode) -> Option<String> {
    if mode.counters.is_some() {
        not_published_reason_keeping_pfs(config, gpu)
    } else {
        not_advertised_reason(config, gpu)
    }
}

/// The devices of `inventory` as `mode` publishes them. `prepared` names
/// the devices prepared for some claim: one of them that is not published
/// now (left the node, or withheld) stays listed, tainted NoExecute (with
/// taints on), so the pods using it are evicted, until unprepared.
///
/// # Errors
/// When the API would refuse the set (a bug, reported rather than
/// published).
pub fn publish(
    inventory: &Inventory,
    config: &DiscoveryConfig,
    mode: Mode,
    prepared: &BTreeSet<String>,
) -> Result<Published, DeviceError> {
    let mut out = Published::default();
    let mut devices = Vec::new();
    let mut sets: BTreeMap<String, u32> = BTreeMap::new();
    let by_address: BTreeMap<&str, &Gpu> = inventory
        .gpus
        .iter()
        .map(|g| (g.pci_address.as_str(), g))
        .collect();
    // A VF's PF, when sysfs names one that is on the node.
    let pf_of = |g: &Gpu| -> Option<&Gpu> {
        g.sriov
            .physfn
            .as_deref()
            .and_then(|a| by_address.get(a).copied())
    };
    let candidates: Vec<&Gpu> = inventory
        .gpus
        .iter()
        .filter(|g| {
            let mut why = withheld_reason(config, g, mode);
            // With counters a VF must name its PF's set: one whose PF
            // cannot be resolved could be allocated beside the PF.
            if why.is_none()
                && mode.counters.is_some()
                && g.sriov.role == SriovRole::Vf
                && pf_of(g).is_none()
            {
                why = Some(
                    "SR-IOV VF whose PF cannot be resolved: it cannot draw from the PF's counters"
                        .to_owned(),
                );
            }
            if let Some(why) = &why {
                out.withheld.insert(device_name(g), why.clone());
            }
            why.is_none()
        })
        .collect();
    let candidate_addresses: BTreeSet<&str> =
        candidates.iter().map(|g| g.pci_address.as_str()).collect();
    let published: Vec<&Gpu> = candidates
        .iter()
        .copied()
        .filter(|g| {
            let pf_prepared = g.sriov.role == SriovRole::Vf
                && pf_of(g).is_some_and(|pf| prepared.contains(&device_name(pf)));
            let why = if pf_prepared {
                // Whatever the mode, a VF is never handed out while its
                // PF is in use.
                Some("SR-IOV VF whose PF is prepared for a claim".to_owned())
            } else if mode.counters.is_some()
                && g.sriov.role == SriovRole::Pf
                && g.sriov.num_vfs.is_some_and(|n| n > 0)
                && !g
                    .sriov
                    .vfs
                    .iter()
                    .any(|a| candidate_addresses.contains(a.as_str()))
            {
                // Its VFs are elsewhere (vfio-pci, filtered): nothing here
                // would keep the PF from being handed out under them.
                Some("SR-IOV PF whose VFs are enabled but none is published here".to_owned())
            } else {
                None
            };
            if let Some(why) = &why {
                out.withheld.insert(device_name(g), why.clone());
            }
            why.is_none()
        })
        .collect();
    let published_addresses: BTreeSet<&str> =
        published.iter().map(|g| g.pci_address.as_str()).collect();
    for gpu in &published {
        let name = device_name(gpu);
        let why = gpu.unhealthy_reason();
        if why.is_some() && !mode.taints {
            out.withheld.insert(
                name,
                format!(
                    "unhealthy ({}) and the cluster keeps no device taints",
                    why.unwrap_or_default()
                ),
            );
            continue;
        }
        let mut d = SliceDevice::new(&name)?;
        let product = gpu_discovery::product(gpu.device_id);
        if let Some(p) = product {
            d = d
                .attribute("model", Attribute::String(p.model.to_owned()))
                .attribute("family", Attribute::String(p.family.to_owned()));
        }
        let vf = gpu.sriov.role == SriovRole::Vf;
        d = d
            .attribute(
                "driver",
                Attribute::String(gpu.driver.clone().unwrap_or_default()),
            )
            .attribute("sriov", Attribute::Bool(gpu.sriov.role != SriovRole::None))
            .attribute(
                "type",
                Attribute::String(if vf { "vf" } else { "gpu" }.to_owned()),
            )
            .attribute(
                "pciId",
                Attribute::String(format!("{:#06x}", gpu.device_id)),
            )
            .attribute(
                "health",
                Attribute::String(
                    if why.is_some() {
                        "Unhealthy"
                    } else {
                        "Healthy"
                    }
                    .to_owned(),
                ),
            )
            .attribute(
                "resource.kubernetes.io/pciBusID",
                Attribute::String(gpu.pci_address.clone()),
            )
            .attribute("tiles", Attribute::Int(i64::from(gpu.tiles)));
        if let Some(root) = pcie_root(gpu) {
            d = d.attribute("resource.kubernetes.io/pcieRoot", Attribute::String(root));
        }
        if let Some(n) = gpu.numa_node {
            d = d.attribute("numaNode", Attribute::Int(i64::from(n)));
        }
        // SR-IOV with counters: the PF's set has a slot per VF; the PF
        // takes all of them, a VF one, so a PF and any VF of it can never
        // be allocated at once.
        let mut draws = None;
        if mode.counters.is_some() {
            if vf {
                if let Some(pf) = pf_of(gpu) {
                    let set = device_name(pf);
                    sets.entry(set.clone()).or_default();
                    draws = Some((set, 1));
                }
            } else if gpu.sriov.role == SriovRole::Pf {
                let vfs = gpu
                    .sriov
                    .vfs
                    .iter()
                    .filter(|a| published_addresses.contains(a.as_str()))
                    .count();
                if vfs > 0 {
                    let n = u32::try_from(vfs).unwrap_or(u32::MAX);
                    sets.insert(name.clone(), n);
                    draws = Some((name.clone(), n));
                }
            }
        }
        let shared = mode.shared && draws.is_none();
        if shared {
            d = d.allow_multiple_allocations().consumable(
                "millicores",
                "1000",
                millicores_policy(),
            );
            // The policy needs `min + step` (128Mi) within the capacity.
            if let Some(bytes) = gpu.vram_bytes.filter(|b| *b >= 128 << 20) {
                d = d.consumable("memory", &format!("{}Mi", bytes >> 20), memory_policy());
            }
        } else {
            d = d.capacity("millicores", "1000");
            if let Some(bytes) = gpu.vram_bytes {
                d = d.capacity("memory", &format!("{}Mi", bytes >> 20));
            }
        }
        if let Some((set, n)) = &draws {
            d = d.consumes(set, &[(SLOTS, &n.to_string())]);
        }
        if why.is_some() {
            let (key, effect) = if gpu.wedged() {
                (TAINT_WEDGED, TaintEffect::NoExecute)
            } else {
                (TAINT_UNHEALTHY, TaintEffect::NoSchedule)
            };
            d = d.taint(DeviceTaint {
                key: key.to_owned(),
                value: None,
                effect,
            });
        }
        let render = gpu
            .device_nodes
            .iter()
            .find(|n| n.kind == gpu_discovery::NodeKind::Render)
            .map(|n| n.host_path.clone());
        let family = match gpu.sriov.role {
            SriovRole::Vf => pf_of(gpu).map(device_name),
            SriovRole::Pf if !gpu.sriov.vfs.is_empty() => Some(name.clone()),
            _ => None,
        };
        out.facts.insert(
            name,
            DeviceFacts {
                nodes: gpu.node_paths().cloned().collect(),
                by_path: gpu.by_path.clone(),
                render,
                shared,
                is_pf: gpu.sriov.role == SriovRole::Pf,
                family,
            },
        );
        devices.push(d);
    }
    // Prepared devices that are gone: NoExecute until unprepared.
    if mode.taints {
        for name in prepared {
            if out.facts.contains_key(name) {
                continue;
            }
            devices.push(
                SliceDevice::new(name)?
                    .attribute("health", Attribute::String("Unhealthy".into()))
                    .taint(DeviceTaint {
                        key: TAINT_GONE.to_owned(),
                        value: None,
                        effect: TaintEffect::NoExecute,
                    }),
            );
        }
    }
    // A PF whose VF count is not known yet (its VFs listed, the PF
    // itself not published): its set still holds a slot per VF.
    for (set, n) in &mut sets {
        if *n == 0 {
            *n = u32::try_from(devices.iter().filter(|d| d.draws_from(set)).count())
                .unwrap_or(u32::MAX);
        }
    }
    out.set = match mode.counters {
        Some(layout) => DeviceSet::with_counters(
            devices,
            sets.iter()
                .map(|(name, n)| CounterSet::new(name).map(|c| c.counter(SLOTS, &n.to_string())))
                .collect::<Result<_, _>>()?,
            layout,
        )?,
        None => DeviceSet::new(devices)?,
    };
    Ok(out)
}
