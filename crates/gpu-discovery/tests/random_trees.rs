//! Random fake nodes: scanning never panics, and every card is either
//! listed with a state or skipped with a reason — exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeSet;

use fake_gpu_node::{Broken, FakeNode, GpuSpec, NodeSpec};
use gpu_discovery::{DiscoveryConfig, SriovRole, scan};
use proptest::prelude::*;

fn broken() -> impl Strategy<Value = Vec<Broken>> {
    proptest::collection::vec(
        prop_oneof![
            Just(Broken::GarbageVendor),
            Just(Broken::NonUtf8Device),
            Just(Broken::OversizedClass),
            Just(Broken::GarbageNuma),
            Just(Broken::GarbageNumVfs),
            Just(Broken::LoopingLink),
            Just(Broken::DanglingLink),
            Just(Broken::MissingVendor),
        ],
        0..2,
    )
}

fn gpu(card: u32) -> impl Strategy<Value = GpuSpec> {
    (
        prop_oneof![Just("0x8086"), Just("0x10de"), Just("0x1002")],
        prop_oneof![
            Just("0x030000"),
            Just("0x038000"),
            Just("0x120000"),
            Just("0x030200")
        ],
        prop_oneof![
            Just(Some("i915")),
            Just(Some("xe")),
            Just(None),
            Just(Some("vfio-pci"))
        ],
        any::<bool>(),
        0u32..4,
        -1i32..3,
        broken(),
        proptest::option::of(0u32..3),
    )
        .prop_map(
            move |(vendor, class, driver, nodes, tiles, numa, broken, vfs)| {
                let mut g = GpuSpec::new(card).driver(driver);
                g.vendor = vendor.into();
                g.class = class.into();
                g.nodes = nodes;
                g.tiles = tiles;
                g.numa_node = numa;
                g.broken = broken;
                if let Some(n) = vfs {
                    g = g.sriov(7, n, 100 + card * 8);
                }
                g
            },
        )
}

fn spec() -> impl Strategy<Value = NodeSpec> {
    proptest::collection::btree_set(0u32..12, 0..5).prop_flat_map(|cards| {
        let gpus: Vec<_> = cards.into_iter().map(gpu).collect();
        gpus.prop_map(|gpus| NodeSpec {
            name: "random".into(),
            gpus,
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_card_is_listed_or_skipped_exactly_once(spec in spec()) {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(dir.path(), &spec).unwrap();
        let inv = scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap();

        let on_disk: BTreeSet<String> = std::fs::read_dir(node.sysfs_root().join("class/drm"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.strip_prefix("card").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())))
            .collect();
        let mut seen: Vec<String> = inv.gpus.iter().map(|g| g.card.clone()).collect();
        seen.extend(inv.skipped.iter().map(|s| s.entry.clone()));
        let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
        prop_assert_eq!(seen.len(), seen_set.len(), "a card was listed twice");
        prop_assert_eq!(seen_set, on_disk);

        for s in &inv.skipped {
            prop_assert!(!s.reason.to_string().is_empty());
        }
        for g in &inv.gpus {
            prop_assert_eq!(g.advertised, g.reason.is_none());
            prop_assert!(g.tiles >= 1);
            if g.sriov.role == SriovRole::Pf && g.sriov.num_vfs.unwrap_or(0) > 0 {
                prop_assert!(!g.advertised, "a PF with VFs is never advertised");
            }
        }
        let cards: Vec<u32> = inv.gpus.iter().map(|g| g.index).collect();
        prop_assert!(cards.windows(2).all(|w| w[0] < w[1]), "numeric order");
        // The JSON always renders.
        let json = inv.to_json();
        prop_assert!(json.starts_with('{'), "json: {}", json);
    }
}
