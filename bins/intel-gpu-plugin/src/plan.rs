//! The pure core: from an inventory to resources, device lists, allocation
//! answers and CDI specs. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use devplugin_api::cdi;
use devplugin_api::{
    CdiName, ContainerAllocation, Device, DeviceId, DeviceList, DeviceSpec, Health, Mount,
    Permissions, PluginError, ResourceName,
};
use gpu_discovery::{Driver, Inventory};

/// The CDI kind of our devices (the Go plugin's, so specs and names carry
/// over).
pub const CDI_KIND: &str = "intel.cdi.k8s.io/gpu";
/// The file name prefix of our CDI specs.
pub const CDI_PREFIX: &str = "intel.cdi.k8s.io-gpu-";
/// The resource name prefix.
pub const DOMAIN: &str = "gpu.intel.com";
/// The monitoring device's ID.
pub const MONITORING_ID: &str = "all";

/// How by-path links are mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByPath {
    /// Each allocated card's own `pci-<address>-*` links.
    Single,
    /// The whole `by-path` directory.
    All,
    /// No by-path mounts.
    None,
}

/// How the monitoring resource is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitoringMode {
    /// One resource, `gpu.intel.com/monitoring`.
    Single,
    /// One per driver: `gpu.intel.com/i915_monitoring`, `…/xe_monitoring`.
    Split,
}

/// The policy for GetPreferredAllocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The kubelet's order, spreading over cards first.
    None,
    /// Take from the card with the most free shares.
    Balanced,
    /// Fill card after card.
    Packed,
}

/// What the plan depends on besides the inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Shares per card (≥ 1).
    pub shared_dev_num: u32,
    /// By-path mounts.
    pub bypath: ByPath,
    /// The monitoring resource, if enabled.
    pub monitoring: Option<MonitoringMode>,
    /// Unhealthy above this temperature (°C).
    pub temp_limit: Option<f64>,
    /// How far below the limit a hot card must cool to be healthy again.
    pub temp_hysteresis: f64,
    /// The host's `/dev/dri` (for the `all` by-path mount).
    pub host_dri: PathBuf,
}

/// A card as the plugin uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Card {
    /// `cardN`.
    pub name: String,
    /// N.
    pub index: u32,
    /// The resource's driver (its last known one when unbound).
    pub driver: Driver,
    /// Primary and render nodes, host paths.
    pub nodes: Vec<PathBuf>,
    /// by-path links, host paths.
    pub by_path: Vec<PathBuf>,
    /// MEI nodes, host paths.
    pub mei: Vec<PathBuf>,
    /// NUMA node.
    pub numa: Option<u32>,
    /// Health.
    pub health: Health,
    /// Why unhealthy.
    pub why: Option<String>,
    /// Whether its CDI spec is on disk as [`cdi_spec`] renders it: only
    /// then does an Allocate answer name it (set by the server after the
    /// write, never by [`plan`]).
    pub cdi: bool,
}

/// What a resource serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResourceKind {
    /// GPUs of a driver.
    Gpu(Driver),
    /// The monitoring device `all` (of one driver, or of all with `None`).
    Monitoring(Option<Driver>),
}

/// The complete plan for one inventory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Cards by number.
    pub cards: BTreeMap<u32, Card>,
    /// Resources with their device lists.
    pub resources: BTreeMap<ResourceName, (ResourceKind, DeviceList)>,
}

/// Memory between plans: the last driver of each card (so an unbound card
/// stays under its resource, Unhealthy) and which cards are hot.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Card number → last driver seen bound.
    pub last_driver: BTreeMap<u32, Driver>,
    /// Cards over the temperature limit, until they cool below it minus
    /// the hysteresis.
    pub hot: BTreeSet<u32>,
}

/// The resource name of a driver.
#[must_use]
#[allow(clippy::expect_used)] // constant names, valid by construction (tested)
pub fn resource_name(driver: Driver) -> ResourceName {
    ResourceName::new(&format!("{DOMAIN}/{}", driver.name()))
        .expect("gpu.intel.com/<driver> is a valid resource name")
}

/// The monitoring resource name (per driver in split mode).
#[must_use]
#[allow(clippy::expect_used)] // constant names, valid by construction (tested)
pub fn monitoring_name(driver: Option<Driver>) -> ResourceName {
    let short = match driver {
        None => "monitoring".to_owned(),
        Some(d) => format!("{}_monitoring", d.name()),
    };
    ResourceName::new(&format!("{DOMAIN}/{short}"))
        .expect("gpu.intel.com/*monitoring is a valid resource name")
}

/// The ID of share `k` of card `n`.
#[must_use]
pub fn device_id(card: u32, share: u32) -> String {
    format!("card{card}-{share}")
}

/// `cardN-K` → (N, K).
#[must_use]
pub fn parse_id(id: &str) -> Option<(u32, u32)> {
    let (card, share) = id.strip_prefix("card")?.split_once('-')?;
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((num(card)?, num(share)?))
}

/// The plan for `inventory`. `temps` gives each card's hottest reading
/// (°C), when known.
pub fn plan(
    inventory: &Inventory,
    options: &Options,
    memory: &mut Memory,
    temps: &BTreeMap<u32, f64>,
) -> Plan {
    let mut out = Plan::default();
    let present: BTreeSet<u32> = inventory.gpus.iter().map(|g| g.index).collect();
    memory.last_driver.retain(|card, _| present.contains(card));
    memory.hot.retain(|card| present.contains(card));
    for gpu in &inventory.gpus {
        // Advertised cards, and one advertised before whose driver was
        // unbound (a driver reload): it stays under its resource, Unhealthy,
        // until it is bound again or removed. The inventory says why it is
        // not advertised; `inspect` shows both.
        let unbound_known = gpu.driver.is_none() && memory.last_driver.contains_key(&gpu.index);
        if !gpu.advertised && !unbound_known {
            continue;
        }
        let bound = gpu.driver.as_deref().and_then(Driver::from_name);
        if let Some(d) = bound {
            memory.last_driver.insert(gpu.index, d);
        }
        // A card with no driver that we never saw bound has no resource.
        let Some(driver) = bound.or_else(|| memory.last_driver.get(&gpu.index).copied()) else {
            continue;
        };
        let mut why = gpu.unhealthy_reason();
        if let Some(limit) = options.temp_limit {
            match temps.get(&gpu.index) {
                Some(t) => {
                    let hot = if memory.hot.contains(&gpu.index) {
                        *t > limit - options.temp_hysteresis
                    } else {
                        *t > limit
                    };
                    if hot {
                        memory.hot.insert(gpu.index);
                        why.get_or_insert_with(|| {
                            format!("temperature {t:.1} °C is over the limit of {limit} °C")
                        });
                    } else {
                        memory.hot.remove(&gpu.index);
                    }
                }
                // No reading (sensor unreadable, or the GPU runtime-
                // suspended and left asleep): a hot card stays hot.
                None if memory.hot.contains(&gpu.index) => {
                    why.get_or_insert_with(|| {
                        format!(
                            "temperature was over the limit of {limit} °C and cannot be read now"
                        )
                    });
                }
                None => {}
            }
        }
        out.cards.insert(
            gpu.index,
            Card {
                name: gpu.card.clone(),
                index: gpu.index,
                driver,
                nodes: gpu.node_paths().cloned().collect(),
                by_path: gpu.by_path.clone(),
                mei: gpu.mei.clone(),
                numa: gpu.numa_node,
                health: if why.is_some() {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                },
                why,
                cdi: false,
            },
        );
    }
    for driver in Driver::ALL {
        let cards: Vec<&Card> = out.cards.values().filter(|c| c.driver == driver).collect();
        if cards.is_empty() {
            continue;
        }
        let mut devices = Vec::new();
        for c in &cards {
            for share in 0..options.shared_dev_num.max(1) {
                if let Ok(id) = DeviceId::new(&device_id(c.index, share)) {
                    devices.push(Device {
                        id,
                        health: c.health,
                        numa_nodes: c.numa.map(i64::from).into_iter().collect(),
                    });
                }
            }
        }
        let list = DeviceList::new(devices).unwrap_or_default();
        out.resources
            .insert(resource_name(driver), (ResourceKind::Gpu(driver), list));
    }
    if let Some(mode) = options.monitoring {
        let all = || {
            DeviceList::new(
                DeviceId::new(MONITORING_ID)
                    .map(Device::healthy)
                    .into_iter()
                    .collect(),
            )
            .unwrap_or_default()
        };
        match mode {
            MonitoringMode::Single if !out.cards.is_empty() => {
                out.resources.insert(
                    monitoring_name(None),
                    (ResourceKind::Monitoring(None), all()),
                );
            }
            MonitoringMode::Split => {
                for driver in Driver::ALL {
                    if out.cards.values().any(|c| c.driver == driver) {
                        out.resources.insert(
                            monitoring_name(Some(driver)),
                            (ResourceKind::Monitoring(Some(driver)), all()),
                        );
                    }
                }
            }
            MonitoringMode::Single => {}
        }
    }
    out
}

/// What one container gets for `ids` of a resource of `kind`.
///
/// # Errors
/// `InvalidArgument` naming IDs that are not this resource's.
pub fn allocate(
    plan: &Plan,
    kind: &ResourceKind,
    ids: &[&str],
    options: &Options,
) -> Result<ContainerAllocation, PluginError> {
    let mut cards: BTreeSet<u32> = BTreeSet::new();
    let mut monitoring = None;
    let mut bad = Vec::new();
    for id in ids {
        match (kind, parse_id(id)) {
            (ResourceKind::Gpu(d), Some((card, share))) => {
                let ok = share < options.shared_dev_num.max(1)
                    && plan.cards.get(&card).is_some_and(|c| c.driver == *d);
                if ok {
                    cards.insert(card);
                } else {
                    bad.push(*id);
                }
            }
            (ResourceKind::Monitoring(d), _) if *id == MONITORING_ID => monitoring = Some(*d),
            _ => bad.push(*id),
        }
    }
    if !bad.is_empty() {
        return Err(PluginError::InvalidArgument(format!(
            "unknown device IDs: {}",
            bad.join(", ")
        )));
    }
    let mut out = ContainerAllocation::default();
    let mut seen_paths = BTreeSet::new();
    let mut add_node = |out: &mut ContainerAllocation, p: &Path| {
        if seen_paths.insert(p.to_owned()) {
            out.devices.push(DeviceSpec {
                container_path: p.to_owned(),
                host_path: p.to_owned(),
                permissions: Permissions::READ_WRITE,
            });
        }
    };
    if let Some(driver) = monitoring {
        for c in plan
            .cards
            .values()
            .filter(|c| driver.is_none_or(|d| c.driver == d))
        {
            for p in c.nodes.iter().chain(&c.mei) {
                add_node(&mut out, p);
            }
        }
        return Ok(out);
    }
    for card in &cards {
        let Some(c) = plan.cards.get(card) else {
            continue;
        };
        for p in &c.nodes {
            add_node(&mut out, p);
        }
        if options.bypath == ByPath::Single {
            for link in &c.by_path {
                out.mounts.push(Mount {
                    container_path: link.clone(),
                    host_path: link.clone(),
                    read_only: true,
                });
            }
        }
        // Only a spec that is on disk: a runtime fails the whole container
        // on an unresolvable CDI name, while nodes and mounts always work.
        if c.cdi
            && let Ok(name) = CdiName::new(CDI_KIND, &c.name)
        {
            out.cdi_devices.push(name);
        }
    }
    if options.bypath == ByPath::All && !cards.is_empty() {
        let dir = options.host_dri.join("by-path");
        out.mounts.push(Mount {
            container_path: dir.clone(),
            host_path: dir,
            read_only: true,
        });
    }
    Ok(out)
}

/// The preferred `size` IDs of `available`, `must_include` first, by
/// `policy`; deterministic and numeric (`card0-2` before `card0-10`).
/// The framework has checked that the request can be met.
#[must_use]
pub fn prefer<I: AsRef<str> + Clone + PartialEq>(
    policy: Policy,
    available: &[I],
    must_include: &[I],
    size: usize,
) -> Vec<I> {
    let mut chosen: Vec<I> = Vec::with_capacity(size);
    for id in must_include {
        if chosen.len() < size && !chosen.contains(id) {
            chosen.push(id.clone());
        }
    }
    let rest: Vec<&I> = available.iter().filter(|id| !chosen.contains(id)).collect();
    let key = |id: &I| parse_id(id.as_ref()).unwrap_or((u32::MAX, u32::MAX));
    match policy {
        Policy::None => {
            // First one of each card not yet used, in the kubelet's order;
            // then the rest in the kubelet's order.
            let mut used: BTreeSet<u32> = chosen.iter().map(|id| key(id).0).collect();
            let mut second = Vec::new();
            for id in rest {
                if chosen.len() >= size {
                    break;
                }
                let card = key(id).0;
                if used.insert(card) {
                    chosen.push(id.clone());
                } else {
                    second.push(id);
                }
            }
            for id in second {
                if chosen.len() >= size {
                    break;
                }
                chosen.push(id.clone());
            }
        }
        Policy::Packed => {
            let mut sorted = rest;
            sorted.sort_by_key(|id| key(id));
            // Cards already used by must_include first, then by number.
            let used: BTreeSet<u32> = chosen.iter().map(|id| key(id).0).collect();
            sorted.sort_by_key(|id| (!used.contains(&key(id).0), key(id)));
            chosen.extend(
                sorted
                    .into_iter()
                    .take(size.saturating_sub(chosen.len()))
                    .cloned(),
            );
        }
        Policy::Balanced => {
            let mut by_card: BTreeMap<u32, Vec<&I>> = BTreeMap::new();
            for id in rest {
                by_card.entry(key(id).0).or_default().push(id);
            }
            for ids in by_card.values_mut() {
                ids.sort_by_key(|id| std::cmp::Reverse(key(id).1));
            }
            while chosen.len() < size {
                // The card with the most remaining IDs; the lowest number on
                // a tie.
                let Some((&card, _)) = by_card
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .max_by_key(|(c, v)| (v.len(), std::cmp::Reverse(**c)))
                else {
                    break;
                };
                if let Some(id) = by_card.get_mut(&card).and_then(Vec::pop) {
                    chosen.push(id.clone());
                }
            }
        }
    }
    chosen
}

/// The CDI spec of one card (device nodes and, with `single` by-path, its
/// by-path links).
#[must_use]
pub fn cdi_spec(card: &Card, bypath: ByPath) -> cdi::Spec {
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    let edits = cdi::ContainerEdits {
        env: Vec::new(),
        device_nodes: card
            .nodes
            .iter()
            .map(|p| cdi::DeviceNode {
                path: path(p),
                host_path: None,
                permissions: Some("rw".into()),
            })
            .collect(),
        mounts: if bypath == ByPath::Single {
            card.by_path
                .iter()
                .map(|p| cdi::SpecMount {
                    host_path: path(p),
                    container_path: path(p),
                    options: vec!["ro".into(), "bind".into()],
                    kind: None,
                })
                .collect()
        } else {
            Vec::new()
        },
    };
    cdi::Spec {
        kind: CDI_KIND.to_owned(),
        devices: vec![cdi::SpecDevice {
            name: card.name.clone(),
            annotations: BTreeMap::new(),
            container_edits: edits,
        }],
        container_edits: cdi::ContainerEdits::default(),
        annotations: BTreeMap::new(),
    }
}

/// The spec file name of a card, as the Go plugin names it.
#[must_use]
pub fn cdi_file_name(card: &Card) -> String {
    format!("{CDI_PREFIX}{}.yaml", card.name)
}
