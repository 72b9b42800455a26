//! Declarative descriptions of fake nodes, loadable from TOML or JSON.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::FakeNodeError;

/// A node: its GPUs (and other display devices).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// A name for messages (`starlingx-edge`).
    #[serde(default)]
    pub name: String,
    /// The PCI display functions with DRM cards.
    #[serde(default, rename = "gpu")]
    pub gpus: Vec<GpuSpec>,
}

/// SR-IOV on a physical function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SriovSpec {
    /// `sriov_totalvfs`.
    pub total_vfs: u32,
    /// `sriov_numvfs`: this many VFs exist, each its own card.
    #[serde(default)]
    pub enabled_vfs: u32,
    /// The card number of the first VF; the others follow.
    #[serde(default)]
    pub first_vf_card: u32,
}

/// Ways a card's tree can be broken, for robustness tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Broken {
    /// `vendor` holds text that is not a number.
    GarbageVendor,
    /// `device` holds bytes that are not UTF-8.
    NonUtf8Device,
    /// `class` is larger than any attribute.
    OversizedClass,
    /// `numa_node` holds garbage.
    GarbageNuma,
    /// `sriov_numvfs` holds garbage (on a PF).
    GarbageNumVfs,
    /// `class/drm/cardN` is a link that loops.
    LoopingLink,
    /// `class/drm/cardN` points nowhere.
    DanglingLink,
    /// The card's device directory is not a PCI function.
    NotPci,
    /// `vendor` is missing.
    MissingVendor,
}

/// One PCI display function with a DRM card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSpec {
    /// The card number (`cardN`).
    pub card: u32,
    /// The render node number (default `128 + card`).
    pub render: Option<u32>,
    /// The PCI address (default `0000:<card + 3>:00.0`).
    pub pci_address: Option<String>,
    /// PCI addresses of the bridges above it, root port first.
    pub bridges: Vec<String>,
    /// `vendor`.
    pub vendor: String,
    /// `device`.
    pub device: String,
    /// `class`.
    pub class: String,
    /// The bound driver, none for unbound.
    pub driver: Option<String>,
    /// `numa_node` (-1 for none).
    pub numa_node: i32,
    /// `local_cpulist`.
    pub local_cpulist: Option<String>,
    /// Tiles: xe `tileN/`, i915 `gt/gtN`.
    pub tiles: u32,
    /// xe: `tileN/physical_vram_size_bytes` per tile.
    pub vram_bytes_per_tile: Option<u64>,
    /// i915 (out-of-tree): `lmem_total_bytes`.
    pub lmem_total_bytes: Option<u64>,
    /// Connector names (`DP-1`).
    pub connectors: Vec<String>,
    /// The MEI node number, if the GPU has a firmware interface.
    pub mei: Option<u32>,
    /// A hwmon temperature input with this value (millidegrees C).
    pub temperature_mdeg: Option<i64>,
    /// SR-IOV physical function.
    pub sriov: Option<SriovSpec>,
    /// Whether udev made the `by-path` links.
    pub by_path: bool,
    /// Whether the device nodes exist in devfs.
    pub nodes: bool,
    /// Damage to apply.
    pub broken: Vec<Broken>,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            card: 0,
            render: None,
            pci_address: None,
            bridges: Vec::new(),
            vendor: "0x8086".into(),
            device: "0x56a0".into(),
            class: "0x030000".into(),
            driver: Some("i915".into()),
            numa_node: -1,
            local_cpulist: None,
            tiles: 1,
            vram_bytes_per_tile: None,
            lmem_total_bytes: None,
            connectors: Vec::new(),
            mei: None,
            temperature_mdeg: None,
            sriov: None,
            by_path: true,
            nodes: true,
            broken: Vec::new(),
        }
    }
}

impl GpuSpec {
    /// A card with defaults: an i915 Arc A770 at `0000:<card + 3>:00.0`.
    #[must_use]
    pub fn new(card: u32) -> Self {
        Self {
            card,
            ..Self::default()
        }
    }

    /// The render node number.
    #[must_use]
    pub fn render_number(&self) -> u32 {
        self.render.unwrap_or(128 + self.card)
    }

    /// The PCI address.
    #[must_use]
    pub fn address(&self) -> String {
        self.pci_address
            .clone()
            .unwrap_or_else(|| format!("0000:{:02x}:00.0", (self.card + 3) % 256))
    }

    /// The VFs this PF spec creates, as card specs.
    #[must_use]
    pub fn vf_specs(&self) -> Vec<GpuSpec> {
        let Some(sriov) = &self.sriov else {
            return Vec::new();
        };
        let pf = self.address();
        (0..sriov.enabled_vfs)
            .map(|i| {
                let card = sriov.first_vf_card + i;
                GpuSpec {
                    card,
                    render: None,
                    pci_address: Some(vf_address(&pf, i + 1)),
                    bridges: self.bridges.clone(),
                    vendor: self.vendor.clone(),
                    device: self.device.clone(),
                    class: self.class.clone(),
                    driver: self.driver.clone(),
                    numa_node: self.numa_node,
                    local_cpulist: self.local_cpulist.clone(),
                    tiles: 1,
                    vram_bytes_per_tile: None,
                    lmem_total_bytes: None,
                    connectors: Vec::new(),
                    mei: None,
                    temperature_mdeg: None,
                    sriov: None,
                    by_path: self.by_path,
                    nodes: true,
                    broken: Vec::new(),
                }
            })
            .collect()
    }

    /// Builder: the PCI device id.
    #[must_use]
    pub fn device(mut self, id: &str) -> Self {
        self.device = id.into();
        self
    }

    /// Builder: the bound driver (`None` for unbound).
    #[must_use]
    pub fn driver(mut self, driver: Option<&str>) -> Self {
        self.driver = driver.map(Into::into);
        self
    }

    /// Builder: the PCI address.
    #[must_use]
    pub fn at(mut self, address: &str) -> Self {
        self.pci_address = Some(address.into());
        self
    }

    /// Builder: SR-IOV with `enabled` of `total` VFs, numbered from
    /// `first_vf_card`.
    #[must_use]
    pub fn sriov(mut self, total: u32, enabled: u32, first_vf_card: u32) -> Self {
        self.sriov = Some(SriovSpec {
            total_vfs: total,
            enabled_vfs: enabled,
            first_vf_card,
        });
        self
    }

    /// Builder: damage.
    #[must_use]
    pub fn broken(mut self, how: Broken) -> Self {
        self.broken.push(how);
        self
    }
}

/// The address of the `n`-th function after `pf` (VF `n - 1`).
fn vf_address(pf: &str, n: u32) -> String {
    let (prefix, devfn) = pf.split_at(pf.len().saturating_sub(4));
    let mut parts = devfn.split('.');
    let dev = parts
        .next()
        .and_then(|d| u32::from_str_radix(d, 16).ok())
        .unwrap_or(0);
    let func = parts
        .next()
        .and_then(|f| f.parse::<u32>().ok())
        .unwrap_or(0);
    let devfn = dev * 8 + func + n;
    format!("{prefix}{:02x}.{}", (devfn / 8) % 32, devfn % 8)
}

impl NodeSpec {
    /// Loads a description from a `.toml` or `.json` file.
    ///
    /// # Errors
    /// When the file cannot be read or does not describe a node.
    pub fn load(path: &Path) -> Result<Self, FakeNodeError> {
        let text = std::fs::read_to_string(path).map_err(|source| FakeNodeError::Io {
            path: path.to_owned(),
            source,
        })?;
        let json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&text, json).map_err(|message| FakeNodeError::Spec {
            path: path.to_owned(),
            message,
        })
    }

    fn parse(text: &str, json: bool) -> Result<Self, String> {
        if json {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            toml::from_str(text).map_err(|e| e.to_string())
        }
    }

    /// A StarlingX edge server: an Alder Lake iGPU (card0) and a Flex 170
    /// (card1) with 4 of its 31 VFs enabled (card2 – card5), on NUMA node 0.
    #[must_use]
    pub fn starlingx_edge() -> Self {
        Self::builtin(include_str!("../nodes/starlingx-edge.toml"))
    }

    /// The demo's and the soak's node: [`NodeSpec::starlingx_edge`] plus an
    /// Arc B580 on `xe` (card8 at `0000:8a:00.0`), so both resources exist.
    #[must_use]
    pub fn starlingx_edge_with_arc() -> Self {
        let mut spec = Self::starlingx_edge();
        spec.name = "starlingx-edge-with-arc".to_owned();
        spec.gpus.push(
            GpuSpec::new(8)
                .at("0000:8a:00.0")
                .device("0xe20b")
                .driver(Some("xe")),
        );
        spec
    }

    /// A workstation with an Arc B580 on `xe` (card0) and a Lunar Lake-class
    /// iGPU on `xe` (card1).
    #[must_use]
    pub fn battlemage_workstation() -> Self {
        Self::builtin(include_str!("../nodes/battlemage-workstation.toml"))
    }

    /// A dense node for stress figures: `pfs` Flex 170 PFs, each with `vfs`
    /// VFs enabled (`pfs × (vfs + 1)` cards; PF `i` is card `i × 32`, its
    /// VFs follow), spread over two NUMA nodes.
    #[must_use]
    pub fn flex_vfs(pfs: u32, vfs: u32) -> Self {
        let mut spec = Self {
            name: format!("flex-{pfs}x{vfs}"),
            gpus: Vec::new(),
        };
        for i in 0..pfs {
            let mut pf = GpuSpec::new(i * 32)
                .device("0x56c0")
                .at(&format!("0000:{:02x}:00.0", (0x10 + i * 8) % 256))
                .sriov(31, vfs.min(31), i * 32 + 1);
            pf.class = "0x038000".into();
            pf.numa_node = i32::try_from(i * 2 / pfs.max(1)).unwrap_or(0);
            pf.lmem_total_bytes = Some(16 << 30);
            pf.temperature_mdeg = Some(45_000);
            pf.mei = Some(i);
            spec.gpus.push(pf);
        }
        spec
    }

    fn builtin(text: &str) -> Self {
        // The shipped descriptions are tested to parse.
        Self::parse(text, false).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vf_addresses_follow_the_pf() {
        assert_eq!(vf_address("0000:4d:00.0", 1), "0000:4d:00.1");
        assert_eq!(vf_address("0000:4d:00.0", 7), "0000:4d:00.7");
        assert_eq!(vf_address("0000:4d:00.0", 8), "0000:4d:01.0");
        assert_eq!(vf_address("0000:4d:00.0", 31), "0000:4d:03.7");
    }

    #[test]
    fn builtin_descriptions_parse() {
        for text in [
            include_str!("../nodes/starlingx-edge.toml"),
            include_str!("../nodes/battlemage-workstation.toml"),
        ] {
            let spec = NodeSpec::parse(text, false).unwrap();
            assert!(!spec.gpus.is_empty());
        }
        assert_eq!(NodeSpec::starlingx_edge().gpus.len(), 2);
    }

    #[test]
    fn json_and_toml_describe_the_same() {
        let spec = NodeSpec::starlingx_edge();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(NodeSpec::parse(&json, true).unwrap(), spec);
        assert!(NodeSpec::parse("[[gpu]]\ncard = 1\nunknown = 2\n", false).is_err());
    }
}
