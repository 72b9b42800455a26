//! The inventory over fake nodes: every rule, table-driven.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use fake_gpu_node::{Broken, FakeNode, GpuSpec, NodeSpec};
use gpu_discovery::{CardState, DiscoveryConfig, Driver, IdFilter, Inventory, SriovRole, scan};

fn node(gpus: Vec<GpuSpec>) -> (tempfile::TempDir, FakeNode) {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(
        dir.path(),
        &NodeSpec {
            name: "t".into(),
            gpus,
        },
    )
    .unwrap();
    (dir, node)
}

fn config(node: &FakeNode) -> DiscoveryConfig {
    DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())
}

fn inventory(gpus: Vec<GpuSpec>) -> Inventory {
    let (_dir, node) = node(gpus);
    scan(&config(&node)).unwrap()
}

/// `(card, advertised)` pairs in inventory order, and skipped entries.
fn summary(inv: &Inventory) -> (Vec<(String, bool)>, Vec<String>) {
    (
        inv.gpus
            .iter()
            .map(|g| (g.card.clone(), g.advertised))
            .collect(),
        inv.skipped.iter().map(|s| s.entry.clone()).collect(),
    )
}

fn pairs(v: &[(&str, bool)]) -> Vec<(String, bool)> {
    v.iter().map(|(c, a)| ((*c).to_owned(), *a)).collect()
}

#[test]
fn starlingx_edge_server_advertises_igpu_and_vfs_not_the_pf() {
    let (_dir, node) = node(NodeSpec::starlingx_edge().gpus);
    let inv = scan(&config(&node)).unwrap();
    let (gpus, skipped) = summary(&inv);
    assert_eq!(
        gpus,
        pairs(&[
            ("card0", true),
            ("card1", false),
            ("card2", true),
            ("card3", true),
            ("card4", true),
            ("card5", true)
        ])
    );
    assert!(skipped.is_empty());
    let pf = inv.card("card1").unwrap();
    assert_eq!(pf.sriov.role, SriovRole::Pf);
    assert_eq!((pf.sriov.num_vfs, pf.sriov.total_vfs), (Some(4), Some(31)));
    assert_eq!(
        pf.sriov.vfs,
        [
            "0000:4d:00.1",
            "0000:4d:00.2",
            "0000:4d:00.3",
            "0000:4d:00.4"
        ]
    );
    assert!(pf.reason.as_deref().unwrap().contains("4 VFs enabled"));
    assert_eq!(
        pf.pci_path,
        ["0000:4a:01.0", "0000:4b:00.0", "0000:4c:01.0"]
    );
    assert_eq!(pf.vram_bytes, Some(17_179_869_184));
    assert_eq!(pf.mei, [std::path::PathBuf::from("/dev/mei1")]);
    assert_eq!(pf.temperature_inputs.len(), 1);
    assert_eq!(pf.class, 0x038000);
    let vf = inv.card("card4").unwrap();
    assert_eq!(vf.sriov.role, SriovRole::Vf);
    assert_eq!(vf.sriov.physfn.as_deref(), Some("0000:4d:00.0"));
    assert_eq!(vf.pci_address, "0000:4d:00.3");
    assert_eq!(vf.numa_node, Some(0));
    let igpu = inv.card("card0").unwrap();
    assert_eq!(igpu.device_id, 0x4680);
    assert_eq!(igpu.local_cpus.as_deref(), Some("0-31"));
    let nodes: Vec<_> = igpu.node_paths().map(|p| p.display().to_string()).collect();
    assert_eq!(nodes, ["/dev/dri/card0", "/dev/dri/renderD128"]);
    let by_path: Vec<_> = igpu
        .by_path
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        by_path,
        [
            "/dev/dri/by-path/pci-0000:00:02.0-card",
            "/dev/dri/by-path/pci-0000:00:02.0-render"
        ]
    );
}

#[test]
fn cards_are_in_numeric_order() {
    let inv = inventory(vec![GpuSpec::new(10), GpuSpec::new(2), GpuSpec::new(1)]);
    let cards: Vec<_> = inv.gpus.iter().map(|g| g.card.as_str()).collect();
    assert_eq!(cards, ["card1", "card2", "card10"]);
}

#[test]
fn a_pf_without_vfs_is_advertised() {
    let inv = inventory(vec![GpuSpec::new(0).device("0x56c0").sriov(31, 0, 0)]);
    let pf = inv.card("card0").unwrap();
    assert_eq!(pf.sriov.role, SriovRole::Pf);
    assert_eq!(pf.sriov.num_vfs, Some(0));
    assert!(pf.advertised);
}

#[test]
fn mixed_drivers_and_the_enabled_driver_set() {
    let gpus = vec![
        GpuSpec::new(0),
        GpuSpec::new(1).device("0xe20b").driver(Some("xe")),
    ];
    let (_dir, node) = node(gpus);
    let all = scan(&config(&node)).unwrap();
    assert_eq!(summary(&all).0, pairs(&[("card0", true), ("card1", true)]));
    let i915_only = scan(&config(&node).drivers([Driver::I915])).unwrap();
    assert_eq!(
        summary(&i915_only).0,
        pairs(&[("card0", true), ("card1", false)])
    );
    let reason = i915_only.card("card1").unwrap().reason.clone().unwrap();
    assert_eq!(reason, "driver xe is not among the enabled drivers (i915)");
}

#[test]
fn allow_and_deny_lists_including_go_style_input() {
    let gpus = vec![
        GpuSpec::new(0).device("0x56a0"),
        GpuSpec::new(1).device("0x56c0"),
        GpuSpec::new(2).device("0x0bd5"),
    ];
    let (_dir, node) = node(gpus);
    let cases: &[(Option<&str>, Option<&str>, &[bool])] = &[
        (None, None, &[true, true, true]),
        (Some("0x56a0,0x0bd5"), None, &[true, false, true]),
        (Some(" 0x56A0 , 0BD5"), None, &[true, false, true]),
        (None, Some("0x56c0"), &[true, false, true]),
        (None, Some("56c0,0x56a0"), &[false, false, true]),
    ];
    for (allow, deny, want) in cases {
        let filter = IdFilter::parse(*allow, *deny).unwrap().filter;
        let inv = scan(&config(&node).filter(filter)).unwrap();
        let got: Vec<bool> = inv.gpus.iter().map(|g| g.advertised).collect();
        assert_eq!(&got, want, "allow {allow:?} deny {deny:?}");
    }
}

#[test]
fn foreign_and_unsupported_devices_are_skipped_with_reasons() {
    let mut nvidia = GpuSpec::new(1);
    nvidia.vendor = "0x10de".into();
    nvidia.driver = Some("nouveau".into());
    let mut accel = GpuSpec::new(2);
    accel.class = "0x120000".into();
    let vfio = GpuSpec::new(3).driver(Some("vfio-pci"));
    let inv = inventory(vec![GpuSpec::new(0), nvidia, accel, vfio]);
    assert_eq!(summary(&inv).0, pairs(&[("card0", true)]));
    // Typed, so a caller can act on the reason ...
    assert!(matches!(
        inv.skipped.iter().map(|s| &s.reason).collect::<Vec<_>>()[..],
        [
            gpu_discovery::SkipReason::NotIntel(0x10de),
            gpu_discovery::SkipReason::NotDisplay(0x12_0000),
            gpu_discovery::SkipReason::OtherDriver(_),
        ]
    ));
    // ... and worded for the operator.
    let reasons: Vec<(&str, String)> = inv
        .skipped
        .iter()
        .map(|s| (s.entry.as_str(), s.reason.to_string()))
        .collect();
    let reasons: Vec<(&str, &str)> = reasons.iter().map(|(e, r)| (*e, r.as_str())).collect();
    assert_eq!(
        reasons,
        [
            ("card1", "vendor 0x10de is not Intel (0x8086)"),
            (
                "card2",
                "class 0x120000 is not a display class (0x0300xx VGA or 0x0380xx display controller)"
            ),
            ("card3", "bound to driver vfio-pci, not i915 or xe"),
        ]
    );
}

#[test]
fn degraded_cards_stay_advertised_with_their_reason() {
    let mut no_nodes = GpuSpec::new(1);
    no_nodes.nodes = false;
    let (_dir, node) = node(vec![
        GpuSpec::new(0).driver(None),
        no_nodes,
        GpuSpec::new(2),
    ]);
    let inv = scan(&config(&node)).unwrap();
    let states: Vec<(CardState, bool, Option<&str>)> = inv
        .gpus
        .iter()
        .map(|g| (g.state, g.advertised, g.state_reason.as_deref()))
        .collect();
    let dri = node.devfs_root().join("dri");
    let missing = format!(
        "device nodes missing from {}: card1, renderD129",
        dri.display()
    );
    assert_eq!(
        states,
        [
            (CardState::Degraded, false, Some("no driver is bound")),
            (CardState::Degraded, true, Some(missing.as_str())),
            (CardState::Usable, true, None),
        ]
    );
    // In place: unbinding a usable card degrades it; rebinding restores it.
    node.unbind_driver(2).unwrap();
    assert_eq!(
        scan(&config(&node)).unwrap().card("card2").unwrap().state,
        CardState::Degraded
    );
    node.bind_driver(2, "i915").unwrap();
    assert_eq!(
        scan(&config(&node)).unwrap().card("card2").unwrap().state,
        CardState::Usable
    );
}

#[test]
fn broken_variants_never_hide_the_other_cards() {
    let cases: &[(Broken, &str)] = &[
        (
            Broken::GarbageVendor,
            "holds \"intel, probably\", not a hexadecimal number",
        ),
        (Broken::MissingVendor, "vendor is missing"),
        (Broken::NonUtf8Device, "device is not UTF-8"),
        (Broken::OversizedClass, "class is larger than 4096 bytes"),
        (Broken::LoopingLink, "cannot resolve"),
        (Broken::DanglingLink, "cannot resolve"),
        (Broken::NotPci, "not a PCI device"),
    ];
    for (how, want) in cases {
        let inv = inventory(vec![
            GpuSpec::new(0),
            GpuSpec::new(1).broken(*how),
            GpuSpec::new(2),
        ]);
        assert_eq!(
            summary(&inv).0,
            pairs(&[("card0", true), ("card2", true)]),
            "{how:?}"
        );
        assert_eq!(inv.skipped.len(), 1, "{how:?}");
        assert_eq!(inv.skipped[0].entry, "card1");
        assert!(
            inv.skipped[0].reason.to_string().contains(want),
            "{how:?}: {}",
            inv.skipped[0].reason
        );
    }
}

#[test]
fn garbage_optional_attributes_become_warnings() {
    let mut numa = GpuSpec::new(0).broken(Broken::GarbageNuma);
    numa.numa_node = 1;
    let pf = GpuSpec::new(1)
        .device("0x56c0")
        .sriov(31, 2, 2)
        .broken(Broken::GarbageNumVfs);
    let inv = inventory(vec![numa, pf]);
    let g0 = inv.card("card0").unwrap();
    assert_eq!(g0.numa_node, None);
    assert!(g0.advertised);
    assert!(
        g0.warnings[0].contains("holds \"NaN\", not a NUMA node number"),
        "{:?}",
        g0.warnings
    );
    // The VF count is unreadable: the VF links decide, and the PF is not
    // advertised next to its VFs.
    let g1 = inv.card("card1").unwrap();
    assert_eq!(g1.sriov.num_vfs, Some(2));
    assert!(!g1.advertised);
    assert_eq!(
        summary(&inv).0,
        pairs(&[
            ("card0", true),
            ("card1", false),
            ("card2", true),
            ("card3", true)
        ])
    );
}

#[test]
fn tiles_and_memory_by_driver() {
    let mut xe = GpuSpec::new(0).device("0xe20b").driver(Some("xe"));
    xe.tiles = 2;
    xe.vram_bytes_per_tile = Some(8 << 30);
    let mut i915 = GpuSpec::new(1).device("0x0bd5");
    i915.tiles = 2;
    let plain = GpuSpec::new(2);
    let mut zero = GpuSpec::new(3);
    zero.tiles = 0;
    let inv = inventory(vec![xe, i915, plain, zero]);
    let got: Vec<(u32, Option<u64>)> = inv.gpus.iter().map(|g| (g.tiles, g.vram_bytes)).collect();
    assert_eq!(got, [(2, Some(16 << 30)), (2, None), (1, None), (1, None)]);
}

#[test]
fn a_node_without_drm_has_no_gpus_and_host_paths_follow_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let inv = scan(&DiscoveryConfig::new(
        dir.path().join("sys"),
        dir.path().join("dev"),
    ))
    .unwrap();
    assert!(inv.gpus.is_empty() && inv.skipped.is_empty());

    let (_d, node) = node(vec![GpuSpec::new(0)]);
    let inv = scan(&config(&node).host_dev("/host/dev")).unwrap();
    let paths: Vec<_> = inv.gpus[0]
        .node_paths()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(paths, ["/host/dev/dri/card0", "/host/dev/dri/renderD128"]);
}

#[test]
fn hotplug_in_place() {
    let (_dir, node) = node(vec![GpuSpec::new(0)]);
    let cfg = config(&node);
    node.add_gpu(&GpuSpec::new(1).device("0xe20b").driver(Some("xe")))
        .unwrap();
    assert_eq!(
        summary(&scan(&cfg).unwrap()).0,
        pairs(&[("card0", true), ("card1", true)])
    );
    node.remove_gpu(0).unwrap();
    assert_eq!(summary(&scan(&cfg).unwrap()).0, pairs(&[("card1", true)]));
}

/// Only by-path links that resolve, inside devfs, to one of the card's own
/// device nodes are offered (intel-device-plugins-for-kubernetes#2296: a
/// stale simpledrm link bind-mounted into a pod fails its start).
#[test]
fn by_path_links_are_offered_only_when_they_resolve_to_the_cards_own_nodes() {
    let (_dir, node) = node(vec![GpuSpec::new(0), GpuSpec::new(1)]);
    let config = config(&node);
    let before = scan(&config).unwrap();
    let card0 = before.card("card0").unwrap();
    let bdf = card0.pci_address.clone();
    let by_path = node.devfs_root().join("dri/by-path");
    let plant = |name: &str, target: &str| {
        std::os::unix::fs::symlink(target, by_path.join(format!("pci-{bdf}-{name}"))).unwrap();
    };
    // simpledrm's framebuffer node, gone once i915 took over.
    plant("platform-simple-framebuffer.0-card", "../card9");
    // Another card's node.
    plant("x-other", "../card1");
    // Out of the device directory, absolute and relative.
    plant("x-abs", "/etc/passwd");
    plant("x-up", "../../../etc/passwd");
    plant("x-deep", "../card0/x");
    std::fs::write(by_path.join(format!("pci-{bdf}-x-file")), "").unwrap();
    let inv = scan(&config).unwrap();
    let g = inv.card("card0").unwrap();
    let names: Vec<_> = g
        .by_path
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [format!("pci-{bdf}-card"), format!("pci-{bdf}-render")]
    );
    let skipped: Vec<_> = g
        .warnings
        .iter()
        .filter(|w| w.contains("skipped"))
        .collect();
    assert_eq!(skipped.len(), 6, "{skipped:?}");
    assert!(
        skipped
            .iter()
            .any(|w| w.contains("simple-framebuffer") && w.contains("card9"))
    );
    // The other card keeps its own.
    assert_eq!(inv.card("card1").unwrap().by_path.len(), 2);
    // by-path itself a link elsewhere: nothing offered from it.
    let elsewhere = node.devfs_root().join("elsewhere");
    std::fs::rename(&by_path, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &by_path).unwrap();
    let inv = scan(&config).unwrap();
    assert!(inv.card("card1").unwrap().by_path.is_empty());
}
