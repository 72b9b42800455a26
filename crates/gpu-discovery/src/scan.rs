//! Reading the inventory from sysfs and devfs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::{DiscoveryConfig, Driver};
use crate::inventory::{
    CardState, DeviceNode, Gpu, Inventory, NodeKind, SCHEMA, SkipReason, Skipped, Sriov, SriovRole,
};
use crate::sysfs::{
    AttrError, is_pci_address, link_basename, list_dir, numbered, numbered_among, numbered_entries,
    read_attr, read_dec, read_hex,
};

/// The PCI vendor id of Intel.
pub const INTEL_VENDOR: u16 = 0x8086;

/// Why the inventory could not be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The DRM class directory exists but cannot be listed.
    #[error("could not list DRM devices in {}", path.display())]
    ClassDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the inventory. A node without a DRM class directory has no GPUs;
/// a broken card is skipped or degraded with its reason, never hiding the
/// others.
///
/// # Errors
/// Only when `<sysfs>/class/drm` exists but cannot be listed.
pub fn scan(config: &DiscoveryConfig) -> Result<Inventory, DiscoveryError> {
    let class_dir = config.sysfs_root().join("class/drm");
    let mut cards: Vec<(u32, String)> = Vec::new();
    match std::fs::read_dir(&class_dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                if let Some(name) = entry.file_name().to_str()
                    && let Some(n) = numbered(name, "card")
                {
                    cards.push((n, name.to_owned()));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DiscoveryError::ClassDir {
                path: class_dir,
                source,
            });
        }
    }
    cards.sort();

    let ctx = Context::new(config);
    let mut inventory = Inventory {
        schema: SCHEMA,
        gpus: Vec::new(),
        skipped: Vec::new(),
    };
    for (index, name) in cards {
        match read_card(config, &ctx, &class_dir, index, &name) {
            Ok(gpu) => inventory.gpus.push(gpu),
            Err(reason) => inventory.skipped.push(Skipped {
                entry: name,
                reason,
            }),
        }
    }
    decide_advertised(config, &mut inventory.gpus);
    Ok(inventory)
}

/// Applies the advertisable predicate to every GPU.
fn decide_advertised(config: &DiscoveryConfig, gpus: &mut [Gpu]) {
    for gpu in gpus {
        let reason = not_advertised_reason(config, gpu);
        gpu.advertised = reason.is_none();
        gpu.reason = reason;
    }
}

/// The advertisable predicate: usable or degraded cards of the configured
/// drivers, minus PFs that have VFs enabled, filtered by device id. `None`
/// when the card is advertised, else why not.
#[must_use]
pub fn not_advertised_reason(config: &DiscoveryConfig, gpu: &Gpu) -> Option<String> {
    reason(config, gpu, true)
}

/// [`not_advertised_reason`] without the SR-IOV rule: for a DRA driver
/// that publishes a PF beside its VFs and keeps them apart with shared
/// counters (a PF with VFs is then admitted like any other card).
#[must_use]
pub fn not_published_reason_keeping_pfs(config: &DiscoveryConfig, gpu: &Gpu) -> Option<String> {
    reason(config, gpu, false)
}

fn reason(config: &DiscoveryConfig, gpu: &Gpu, hide_pf_with_vfs: bool) -> Option<String> {
    let Some(driver) = &gpu.driver else {
        // No resource to put it under: the resource is the driver's.
        return Some("no driver is bound".to_owned());
    };
    {
        let enabled =
            Driver::from_name(driver).is_some_and(|d| config.enabled_drivers().contains(&d));
        if !enabled {
            return Some(format!(
                "driver {driver} is not among the enabled drivers ({})",
                config.drivers_text()
            ));
        }
    }
    if hide_pf_with_vfs
        && gpu.sriov.role == SriovRole::Pf
        && let Some(n) = gpu.sriov.num_vfs.filter(|n| *n > 0)
    {
        return Some(format!(
            "SR-IOV physical function with {n} VFs enabled: its VFs are advertised instead"
        ));
    }
    if !config.id_filter().admits(gpu.device_id) {
        return Some(format!(
            "device id {:#06x} is not admitted ({})",
            gpu.device_id,
            config.id_filter()
        ));
    }
    None
}

/// What every card's reading shares: read once per scan, not once per card
/// (a node can have hundreds of VF cards).
struct Context {
    /// `<devfs>/dri`.
    dri: PathBuf,
    /// `<host dev>/dri`.
    host_dri: PathBuf,
    /// The names in `<devfs>/dri/by-path`, sorted.
    by_path: Vec<String>,
    /// The resolved `<sysfs>/devices`.
    devices: PathBuf,
}

impl Context {
    fn new(config: &DiscoveryConfig) -> Self {
        let dri = config.devfs_root().join("dri");
        let devices = config.sysfs_root().join("devices");
        Self {
            // Links are resolved as text relative to this directory: it
            // must be one, not a link to somewhere else.
            by_path: if std::fs::symlink_metadata(dri.join("by-path")).is_ok_and(|m| m.is_dir()) {
                list_dir(&dri.join("by-path"))
            } else {
                Vec::new()
            },
            host_dri: config.host_dev_prefix().join("dri"),
            devices: std::fs::canonicalize(&devices).unwrap_or(devices),
            dri,
        }
    }

    /// The by-path link names of a PCI address.
    fn by_path_of<'a>(&'a self, bdf: &str) -> impl Iterator<Item = &'a String> {
        let prefix = format!("pci-{bdf}-");
        // Sorted: the matches are one contiguous run.
        let start = self
            .by_path
            .partition_point(|n| n.as_str() < prefix.as_str());
        self.by_path[start..]
            .iter()
            .take_while(move |n| n.starts_with(&prefix))
    }
}

/// The name of the node in `<devfs>/dri` that the by-path link `name`
/// points at, resolved without following anything: udev writes relative
/// targets (`../card1`; systemd `src/udev/udev-node.c`, `node_symlink`
/// makes the target relative to the link's directory); an absolute
/// target is taken as a host path (`/dev/dri/card1`) or one inside the
/// devfs root. Anything that leaves `<devfs>/dri`, or goes deeper, is
/// refused.
fn by_path_target(dri: &Path, host_dri: &Path, name: &str) -> Result<String, String> {
    use std::path::Component;
    let link = dri.join("by-path").join(name);
    let target = std::fs::read_link(&link).map_err(|e| format!("not a readable link ({e})"))?;
    let start = if let Ok(rest) = target.strip_prefix(dri) {
        rest.to_owned()
    } else if let Ok(rest) = target.strip_prefix(host_dri) {
        rest.to_owned()
    } else if target.is_absolute() {
        return Err(format!(
            "it points outside the device directory, at {}",
            target.display()
        ));
    } else {
        Path::new("by-path").join(&target)
    };
    // Lexically, relative to <devfs>/dri.
    let mut parts: Vec<String> = Vec::new();
    for c in start.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir if parts.pop().is_some() => {}
            _ => {
                return Err(format!(
                    "it points outside the device directory, at {}",
                    target.display()
                ));
            }
        }
    }
    match parts.as_slice() {
        [node] => Ok(node.clone()),
        _ => Err(format!(
            "it points at {}, not a device node",
            target.display()
        )),
    }
}

fn read_card(
    config: &DiscoveryConfig,
    ctx: &Context,
    class_dir: &Path,
    index: u32,
    name: &str,
) -> Result<Gpu, SkipReason> {
    let card_dir = class_dir.join(name);
    let link = card_dir.join("device");
    let dev = std::fs::canonicalize(&link).map_err(|e| SkipReason::Unresolvable {
        link: link.clone(),
        error: e.to_string(),
    })?;
    let bdf = dev
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| is_pci_address(n))
        .map(str::to_owned)
        .ok_or_else(|| SkipReason::NotPci {
            link: link.clone(),
            target: dev.clone(),
        })?;

    let vendor = read_hex(&dev.join("vendor"), 0xffff)?;
    if vendor != u32::from(INTEL_VENDOR) {
        return Err(SkipReason::NotIntel(vendor));
    }
    let class = read_hex(&dev.join("class"), 0xff_ffff)?;
    if !matches!(class >> 8, 0x0300 | 0x0380) {
        return Err(SkipReason::NotDisplay(class));
    }
    let device_path = dev.join("device");
    let device_id = read_hex(&device_path, 0xffff)?;
    let device_id = u16::try_from(device_id).map_err(|_| {
        AttrError::Garbage(device_path, format!("{device_id:#x}"), "a 16-bit device ID")
    })?;

    let driver = link_basename(&dev.join("driver"));
    if let Some(d) = &driver
        && Driver::from_name(d).is_none()
    {
        return Err(SkipReason::OtherDriver(d.clone()));
    }

    let mut warnings = Vec::new();
    // The function's directory is listed once for SR-IOV, tiles and MEI.
    let dev_entries = list_dir(&dev);
    let sriov = read_sriov(&dev, &dev_entries, &mut warnings);
    let numa_node = match read_dec::<i64>(&dev.join("numa_node"), "a NUMA node number") {
        Ok(n) => u32::try_from(n).ok(),
        Err(AttrError::Missing(_)) => None,
        Err(e) => {
            warnings.push(e.to_string());
            None
        }
    };
    let local_cpus = read_attr(&dev.join("local_cpulist"))
        .ok()
        .filter(|s| !s.is_empty());

    // Device nodes: names from sysfs, presence from devfs.
    let (dri, host_dri) = (&ctx.dri, &ctx.host_dri);
    let mut wanted: Vec<(NodeKind, String)> = vec![(NodeKind::Card, name.to_owned())];
    for entry in list_dir(&dev.join("drm")) {
        if numbered(&entry, "renderD").is_some() {
            wanted.push((NodeKind::Render, entry));
        }
    }
    let mut device_nodes = Vec::new();
    let mut missing = Vec::new();
    for (kind, node) in wanted {
        if dri.join(&node).exists() {
            device_nodes.push(DeviceNode {
                kind,
                host_path: host_dri.join(&node),
                name: node,
            });
        } else {
            missing.push(node);
        }
    }
    // Only links that resolve, inside devfs, to one of this card's own
    // nodes: a stale link (simpledrm's or efifb's framebuffer, a renumbered
    // card) bind-mounted into a container fails the container's start.
    let own: Vec<&str> = device_nodes.iter().map(|n| n.name.as_str()).collect();
    let mut by_path = Vec::new();
    for link in ctx.by_path_of(&bdf) {
        match by_path_target(dri, host_dri, link) {
            Ok(node) if own.contains(&node.as_str()) => {
                by_path.push(host_dri.join("by-path").join(link));
            }
            Ok(node) => warnings.push(format!(
                "by-path link {link} skipped: it points at {node}, not at a device node of {name} present in {}",
                dri.display()
            )),
            Err(why) => warnings.push(format!("by-path link {link} skipped: {why}")),
        }
    }

    let (state, state_reason) = match (&driver, missing.is_empty()) {
        (None, _) => (CardState::Degraded, Some("no driver is bound".to_owned())),
        (Some(_), false) => (
            CardState::Degraded,
            Some(format!(
                "device nodes missing from {}: {}",
                dri.display(),
                missing.join(", ")
            )),
        ),
        (Some(_), true) => (CardState::Usable, None),
    };

    let tile_dirs = numbered_among(&dev_entries, "tile");
    let gts = numbered_entries(&card_dir.join("gt"), "gt");
    let tiles = match driver.as_deref() {
        Some("xe") => tile_dirs.len(),
        Some(_) => gts.len(),
        None => tile_dirs.len().max(gts.len()),
    };
    let tiles = u32::try_from(tiles).unwrap_or(u32::MAX).max(1);
    let vram_bytes = read_vram(&dev, &card_dir, &tile_dirs, &mut warnings);

    Ok(Gpu {
        card: name.to_owned(),
        index,
        state,
        state_reason,
        pci_address: bdf,
        vendor_id: INTEL_VENDOR,
        device_id,
        class,
        driver,
        sriov,
        numa_node,
        local_cpus,
        device_nodes,
        by_path,
        tiles,
        vram_bytes,
        temperature_inputs: temperature_inputs(&dev),
        mei: mei_nodes(&dev, &dev_entries, config.host_dev_prefix()),
        pci_path: pci_path(&ctx.devices, &dev),
        advertised: false,
        reason: None,
        kernel_health: None,
        warnings,
    })
}

fn read_sriov(dev: &Path, entries: &[String], warnings: &mut Vec<String>) -> Sriov {
    let physfn = dev.join("physfn");
    if physfn.symlink_metadata().is_ok() {
        let pf = std::fs::canonicalize(&physfn)
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .filter(|n| is_pci_address(n));
        if pf.is_none() {
            warnings.push(format!(
                "{} does not lead to a PCI function",
                physfn.display()
            ));
        }
        return Sriov {
            role: SriovRole::Vf,
            num_vfs: None,
            total_vfs: None,
            vfs: Vec::new(),
            physfn: pf,
        };
    }
    let total = match read_dec::<u32>(&dev.join("sriov_totalvfs"), "a VF count") {
        Ok(t) => t,
        Err(AttrError::Missing(_)) => {
            return Sriov {
                role: SriovRole::None,
                num_vfs: None,
                total_vfs: None,
                vfs: Vec::new(),
                physfn: None,
            };
        }
        Err(e) => {
            warnings.push(e.to_string());
            0
        }
    };
    let vfs: Vec<String> = numbered_among(entries, "virtfn")
        .into_iter()
        .filter_map(|(_, n)| {
            let target = std::fs::canonicalize(dev.join(&n)).ok()?;
            target
                .file_name()?
                .to_str()
                .filter(|s| is_pci_address(s))
                .map(str::to_owned)
        })
        .collect();
    let num = match read_dec::<u32>(&dev.join("sriov_numvfs"), "a VF count") {
        Ok(n) => n,
        Err(e) => {
            // Unknown: trust the VF links, so a PF with VFs is never
            // advertised next to them.
            warnings.push(e.to_string());
            u32::try_from(vfs.len()).unwrap_or(u32::MAX)
        }
    };
    Sriov {
        role: SriovRole::Pf,
        num_vfs: Some(num),
        total_vfs: Some(total),
        vfs,
        physfn: None,
    }
}

fn read_vram(
    dev: &Path,
    card_dir: &Path,
    tiles: &[(u32, String)],
    warnings: &mut Vec<String>,
) -> Option<u64> {
    let mut total: Option<u64> = None;
    for (_, tile) in tiles {
        match read_dec::<u64>(
            &dev.join(tile).join("physical_vram_size_bytes"),
            "a byte count",
        ) {
            Ok(v) => total = Some(total.unwrap_or(0).saturating_add(v)),
            Err(AttrError::Missing(_)) => {}
            Err(e) => warnings.push(e.to_string()),
        }
    }
    if total.is_some() {
        return total;
    }
    match read_dec::<u64>(&card_dir.join("lmem_total_bytes"), "a byte count") {
        Ok(v) => Some(v),
        Err(AttrError::Missing(_)) => None,
        Err(e) => {
            warnings.push(e.to_string());
            None
        }
    }
}

fn temperature_inputs(dev: &Path) -> Vec<PathBuf> {
    let hwmon = dev.join("hwmon");
    let mut out = Vec::new();
    for (_, h) in numbered_entries(&hwmon, "hwmon") {
        for name in list_dir(&hwmon.join(&h)) {
            if name.starts_with("temp") && name.ends_with("_input") {
                out.push(hwmon.join(&h).join(name));
            }
        }
    }
    out
}

fn mei_nodes(dev: &Path, entries: &[String], host_dev: &Path) -> Vec<PathBuf> {
    let mut names = BTreeSet::new();
    for entry in entries {
        // Every `*.mei-*` child (`i915.mei-gscfi`, DG2's `i915.mei-gsc`,
        // `xe.mei-gscfi`), as the Go plugin globs `device/*.mei-*/mei`.
        if entry.contains(".mei-") {
            for (n, mei) in numbered_entries(&dev.join(entry).join("mei"), "mei") {
                names.insert((n, mei));
            }
        }
    }
    names.into_iter().map(|(_, m)| host_dev.join(m)).collect()
}

/// PCI addresses between the host bridge (`pciDDDD:BB`) and the device.
fn pci_path(devices: &Path, dev: &Path) -> Vec<String> {
    let Ok(rel) = dev.strip_prefix(devices) else {
        return Vec::new();
    };
    let parts: Vec<String> = rel
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .filter(|c| is_pci_address(c))
        .map(str::to_owned)
        .collect();
    match parts.split_last() {
        Some((_, bridges)) => bridges.to_vec(),
        None => Vec::new(),
    }
}
