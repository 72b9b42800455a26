//! The pure plan: resources, shares, health, allocation and the preferred
//! allocation policies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use expect_test::expect;
use std::collections::BTreeMap;
use std::path::PathBuf;

use devplugin_api::Health;
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
use gpu_discovery::{DiscoveryConfig, Driver, Inventory, scan};
use intel_gpu_plugin::plan::*;

fn options(shares: u32) -> Options {
    Options {
        shared_dev_num: shares,
        bypath: ByPath::Single,
        monitoring: None,
        temp_limit: None,
        temp_hysteresis: 5.0,
        host_dri: PathBuf::from("/dev/dri"),
    }
}

fn inventory(spec: &NodeSpec) -> Inventory {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), spec).unwrap();
    scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap()
}

fn ids(list: &devplugin_api::DeviceList) -> Vec<&str> {
    list.devices().iter().map(|d| d.id.as_str()).collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[test]
fn resource_names_are_valid() {
    assert_eq!(resource_name(Driver::I915).as_str(), "gpu.intel.com/i915");
    assert_eq!(resource_name(Driver::Xe).as_str(), "gpu.intel.com/xe");
    assert_eq!(monitoring_name(None).as_str(), "gpu.intel.com/monitoring");
    assert_eq!(
        monitoring_name(Some(Driver::Xe)).as_str(),
        "gpu.intel.com/xe_monitoring"
    );
}

#[test]
fn starlingx_edge_vfs_and_igpu_with_shares_and_numa() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let plan = plan(&inv, &options(2), &mut Memory::default(), &BTreeMap::new());
    assert_eq!(plan.resources.len(), 1);
    let (kind, list) = &plan.resources[&resource_name(Driver::I915)];
    assert_eq!(*kind, ResourceKind::Gpu(Driver::I915));
    assert_eq!(
        ids(list),
        [
            "card0-0", "card0-1", "card2-0", "card2-1", "card3-0", "card3-1", "card4-0", "card4-1",
            "card5-0", "card5-1"
        ]
    );
    assert!(
        list.devices()
            .iter()
            .all(|d| d.numa_nodes == [0] && d.health == Health::Healthy)
    );
}

#[test]
fn allocate_merges_shares_and_gives_nodes_mounts_and_cdi() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let opts = options(3);
    let mut plan = plan(&inv, &opts, &mut Memory::default(), &BTreeMap::new());
    // The server marks what it wrote; card0's and card2's specs are on disk.
    for c in plan.cards.values_mut() {
        c.cdi = true;
    }
    let kind = ResourceKind::Gpu(Driver::I915);
    let a = allocate(&plan, &kind, &["card2-0", "card2-2", "card0-1"], &opts).unwrap();
    let nodes: Vec<String> = a
        .devices
        .iter()
        .map(|d| d.host_path.display().to_string())
        .collect();
    assert_eq!(
        nodes,
        [
            "/dev/dri/card0",
            "/dev/dri/renderD128",
            "/dev/dri/card2",
            "/dev/dri/renderD130"
        ]
    );
    assert!(
        a.devices
            .iter()
            .all(|d| d.container_path == d.host_path && d.permissions.read && d.permissions.write)
    );
    let mounts: Vec<String> = a
        .mounts
        .iter()
        .map(|m| m.host_path.display().to_string())
        .collect();
    assert_eq!(
        mounts,
        [
            "/dev/dri/by-path/pci-0000:00:02.0-card",
            "/dev/dri/by-path/pci-0000:00:02.0-render",
            "/dev/dri/by-path/pci-0000:4d:00.1-card",
            "/dev/dri/by-path/pci-0000:4d:00.1-render",
        ]
    );
    assert!(a.mounts.iter().all(|m| m.read_only));
    let cdi: Vec<&str> = a.cdi_devices.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        cdi,
        ["intel.cdi.k8s.io/gpu=card0", "intel.cdi.k8s.io/gpu=card2"]
    );

    let all = Options {
        bypath: ByPath::All,
        ..opts.clone()
    };
    let a = allocate(&plan, &kind, &["card2-0"], &all).unwrap();
    assert_eq!(a.mounts.len(), 1);
    assert_eq!(a.mounts[0].host_path, PathBuf::from("/dev/dri/by-path"));
    let none = Options {
        bypath: ByPath::None,
        ..opts.clone()
    };
    assert!(
        allocate(&plan, &kind, &["card2-0"], &none)
            .unwrap()
            .mounts
            .is_empty()
    );

    let err = allocate(&plan, &kind, &["card1-0", "card2-3", "card9-0", "x"], &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown device IDs: card1-0, card2-3, card9-0, x"
    );
}

#[test]
fn monitoring_single_and_split() {
    let mut spec = NodeSpec::battlemage_workstation();
    spec.gpus.push(GpuSpec::new(2).at("0000:07:00.0"));
    let inv = inventory(&spec);
    let single = Options {
        monitoring: Some(MonitoringMode::Single),
        ..options(1)
    };
    let p = plan(&inv, &single, &mut Memory::default(), &BTreeMap::new());
    let names: Vec<&str> = p.resources.keys().map(|n| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "gpu.intel.com/i915",
            "gpu.intel.com/monitoring",
            "gpu.intel.com/xe"
        ]
    );
    let a = allocate(&p, &ResourceKind::Monitoring(None), &["all"], &single).unwrap();
    let nodes: Vec<String> = a
        .devices
        .iter()
        .map(|d| d.host_path.display().to_string())
        .collect();
    assert!(nodes.contains(&"/dev/mei0".to_owned()), "{nodes:?}");
    assert_eq!(nodes.len(), 7, "{nodes:?}");
    let split = Options {
        monitoring: Some(MonitoringMode::Split),
        ..options(1)
    };
    let p = plan(&inv, &split, &mut Memory::default(), &BTreeMap::new());
    let names: Vec<&str> = p.resources.keys().map(|n| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "gpu.intel.com/i915",
            "gpu.intel.com/i915_monitoring",
            "gpu.intel.com/xe",
            "gpu.intel.com/xe_monitoring"
        ]
    );
    let a = allocate(
        &p,
        &ResourceKind::Monitoring(Some(Driver::I915)),
        &["all"],
        &split,
    )
    .unwrap();
    assert_eq!(a.devices.len(), 2);
}

#[test]
fn unbound_cards_stay_under_their_last_resource_as_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(
        dir.path(),
        &NodeSpec {
            name: "t".into(),
            gpus: vec![GpuSpec::new(0), GpuSpec::new(1)],
        },
    )
    .unwrap();
    let cfg = DiscoveryConfig::new(node.sysfs_root(), node.devfs_root());
    let mut memory = Memory::default();
    let opts = options(1);
    plan(&scan(&cfg).unwrap(), &opts, &mut memory, &BTreeMap::new());
    node.unbind_driver(1).unwrap();
    let p = plan(&scan(&cfg).unwrap(), &opts, &mut memory, &BTreeMap::new());
    let list = &p.resources[&resource_name(Driver::I915)].1;
    assert_eq!(list.devices()[1].health, Health::Unhealthy);
    assert_eq!(p.cards[&1].why.as_deref(), Some("no driver is bound"));
    node.bind_driver(1, "i915").unwrap();
    let p = plan(&scan(&cfg).unwrap(), &opts, &mut memory, &BTreeMap::new());
    assert_eq!(
        p.resources[&resource_name(Driver::I915)].1.devices()[1].health,
        Health::Healthy
    );
    // Never seen bound: no resource to put it under.
    let p = plan(
        &scan(&cfg).unwrap(),
        &opts,
        &mut Memory::default(),
        &BTreeMap::new(),
    );
    assert_eq!(p.cards.len(), 2);
}

#[test]
fn preferred_policies_numeric_deterministic_and_must_include() {
    // Three cards with 12 shares each; the kubelet lists them shuffled.
    let mut available: Vec<String> = Vec::new();
    for share in [11, 2, 10, 0, 1] {
        for card in [2, 0, 1] {
            available.push(format!("card{card}-{share}"));
        }
    }
    // none: one per card in the kubelet's order, then the rest in order.
    assert_eq!(
        prefer(Policy::None, &available, &[], 4),
        s(&["card2-11", "card0-11", "card1-11", "card2-2"])
    );
    assert_eq!(
        prefer(Policy::None, &available, &s(&["card1-0"]), 3),
        s(&["card1-0", "card2-11", "card0-11"])
    );
    // packed: card by card, shares numerically (2 before 10).
    assert_eq!(
        prefer(Policy::Packed, &available, &[], 4),
        s(&["card0-0", "card0-1", "card0-2", "card0-10"])
    );
    assert_eq!(
        prefer(Policy::Packed, &available, &s(&["card2-10"]), 3),
        s(&["card2-10", "card2-0", "card2-1"])
    );
    // balanced: the card with the most free shares, lowest number on a tie.
    assert_eq!(
        prefer(Policy::Balanced, &available, &[], 4),
        s(&["card0-0", "card1-0", "card2-0", "card0-1"])
    );
    assert_eq!(
        prefer(Policy::Balanced, &available, &s(&["card1-1", "card1-2"]), 4),
        s(&["card1-1", "card1-2", "card0-0", "card2-0"])
    );
    for p in [Policy::None, Policy::Balanced, Policy::Packed] {
        assert_eq!(prefer(p, &available, &[], 15).len(), 15);
        assert_eq!(
            prefer(p, &available, &[], 7),
            prefer(p, &available, &[], 7),
            "deterministic"
        );
    }
}

#[test]
fn ids_parse_numerically() {
    assert_eq!(parse_id("card10-2"), Some((10, 2)));
    for bad in [
        "card-1",
        "card1",
        "cardx-1",
        "card1-",
        "gpu1-0",
        "card1-0-0",
    ] {
        assert_eq!(parse_id(bad), None, "{bad}");
    }
}

#[test]
fn cdi_spec_of_a_card() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let p = plan(&inv, &options(1), &mut Memory::default(), &BTreeMap::new());
    let card = &p.cards[&2];
    assert_eq!(cdi_file_name(card), "intel.cdi.k8s.io-gpu-card2.yaml");
    let json: serde_json::Value =
        serde_json::from_str(&cdi_spec(card, ByPath::Single).to_json()).unwrap();
    expect![[r#"
        {
          "cdiVersion": "0.3.0",
          "devices": [
            {
              "containerEdits": {
                "deviceNodes": [
                  {
                    "path": "/dev/dri/card2",
                    "permissions": "rw"
                  },
                  {
                    "path": "/dev/dri/renderD130",
                    "permissions": "rw"
                  }
                ],
                "mounts": [
                  {
                    "containerPath": "/dev/dri/by-path/pci-0000:4d:00.1-card",
                    "hostPath": "/dev/dri/by-path/pci-0000:4d:00.1-card",
                    "options": [
                      "ro",
                      "bind"
                    ]
                  },
                  {
                    "containerPath": "/dev/dri/by-path/pci-0000:4d:00.1-render",
                    "hostPath": "/dev/dri/by-path/pci-0000:4d:00.1-render",
                    "options": [
                      "ro",
                      "bind"
                    ]
                  }
                ]
              },
              "name": "card2"
            }
          ],
          "kind": "intel.cdi.k8s.io/gpu"
        }"#]]
    .assert_eq(&serde_json::to_string_pretty(&json).unwrap());
}

#[test]
fn temperature_health_has_hysteresis_and_survives_a_missing_reading() {
    let inv = inventory(&NodeSpec {
        name: "t".into(),
        gpus: vec![GpuSpec::new(0)],
    });
    let opts = Options {
        temp_limit: Some(90.0),
        ..options(1)
    };
    let mut memory = Memory::default();
    let mut health = |temp: Option<f64>| {
        let temps: BTreeMap<u32, f64> = temp.map(|t| (0, t)).into_iter().collect();
        let p = plan(&inv, &opts, &mut memory, &temps);
        (p.cards[&0].health, p.cards[&0].why.clone())
    };
    assert_eq!(health(Some(85.0)).0, Health::Healthy);
    let (h, why) = health(Some(95.5));
    assert_eq!(h, Health::Unhealthy);
    assert!(why.unwrap().contains("95.5"));
    // Cooling within the hysteresis is not enough.
    assert_eq!(health(Some(87.0)).0, Health::Unhealthy);
    // An unreadable (or suspended, unread) sensor keeps a hot card hot.
    let (h, why) = health(None);
    assert_eq!(h, Health::Unhealthy);
    assert!(why.unwrap().contains("cannot be read"));
    assert_eq!(health(Some(84.0)).0, Health::Healthy);
    assert_eq!(
        health(Some(88.0)).0,
        Health::Healthy,
        "rising again below the limit"
    );
    assert_eq!(health(None).0, Health::Healthy);
}

#[test]
fn kernel_health_makes_a_card_unhealthy() {
    let mut inv = inventory(&NodeSpec {
        name: "t".into(),
        gpus: vec![GpuSpec::new(0)],
    });
    inv.gpus[0].kernel_health = Some("the kernel declared it wedged (recovery: rebind)".into());
    let p = plan(&inv, &options(1), &mut Memory::default(), &BTreeMap::new());
    assert_eq!(p.cards[&0].health, Health::Unhealthy);
    assert!(p.cards[&0].why.as_deref().unwrap().contains("wedged"));
}

#[test]
fn an_advertised_card_is_in_exactly_one_resource() {
    // Every shipped node and a driverless card: the inventory's word and
    // the plugin's resources agree.
    let mut nodes = vec![
        NodeSpec::starlingx_edge(),
        NodeSpec::battlemage_workstation(),
    ];
    nodes.push(NodeSpec {
        name: "driverless".into(),
        gpus: vec![GpuSpec::new(0).driver(None), GpuSpec::new(1)],
    });
    for spec in nodes {
        let inv = inventory(&spec);
        let p = plan(&inv, &options(2), &mut Memory::default(), &BTreeMap::new());
        for g in &inv.gpus {
            let holders = p
                .resources
                .values()
                .filter(|(kind, list)| {
                    matches!(kind, ResourceKind::Gpu(_))
                        && list
                            .devices()
                            .iter()
                            .any(|d| d.id.as_str().starts_with(&format!("{}-", g.card)))
                })
                .count();
            let want = usize::from(g.advertised);
            assert_eq!(
                holders, want,
                "{}: {} advertised={}",
                spec.name, g.card, g.advertised
            );
        }
    }
}
