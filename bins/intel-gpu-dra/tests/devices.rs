//! The published devices of the StarlingX edge node (iGPU on i915, a Flex
//! 170 PF with 4 VFs on i915, a B580 on xe) in each mode.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeSet;

use dra_api::slices::CounterLayout;
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
use gpu_discovery::{DiscoveryConfig, Inventory, scan};
use intel_gpu_dra::devices::{Mode, Published, TAINT_GONE, publish};
use intel_gpu_dra::prepare::edits;

const IGPU: &str = "0000-00-02-0-0x4680";
const PF: &str = "0000-4d-00-0-0x56c0";
const B580: &str = "0000-8a-00-0-0xe20b";

fn node() -> (tempfile::TempDir, FakeNode, DiscoveryConfig) {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge_with_arc()).unwrap();
    let config = DiscoveryConfig::new(node.sysfs_root(), node.devfs_root());
    (dir, node, config)
}

fn inventory(config: &DiscoveryConfig) -> Inventory {
    scan(config).unwrap()
}

fn names(p: &Published) -> Vec<String> {
    p.set
        .devices()
        .iter()
        .map(|d| d.name().to_owned())
        .collect()
}

fn vfs(p: &Published) -> usize {
    names(p)
        .iter()
        .filter(|n| n.starts_with("0000-4d-00-") && n.as_str() != PF)
        .count()
}

#[test]
fn whole_gpus_and_no_pf_while_it_has_vfs() {
    let (_dir, _node, config) = node();
    let p = publish(&inventory(&config), &config, Mode::PLAIN, &BTreeSet::new()).unwrap();
    let n = names(&p);
    assert!(
        n.contains(&IGPU.to_owned()) && n.contains(&B580.to_owned()),
        "{n:?}"
    );
    assert!(!n.contains(&PF.to_owned()), "the PF has VFs: {n:?}");
    assert_eq!(vfs(&p), 4);
    assert!(p.withheld[PF].contains("VFs"), "{:?}", p.withheld);
    let text = format!("{:?}", p.set.devices());
    for want in [
        "\"model\": String(\"B580\")",
        "\"family\": String(\"B Series\")",
        "\"driver\": String(\"xe\")",
        "\"type\": String(\"vf\")",
        "\"type\": String(\"gpu\")",
        "\"pciId\": String(\"0xe20b\")",
        "\"health\": String(\"Healthy\")",
        "\"resource.kubernetes.io/pciBusID\": String(\"0000:8a:00.0\")",
        "\"resource.kubernetes.io/pcieRoot\": String(\"pci0000:4a\")",
        "\"resource.kubernetes.io/pcieRoot\": String(\"pci0000:00\")",
        "\"numaNode\": Int(0)",
        "\"millicores\": \"1000\"",
    ] {
        assert!(text.contains(want), "{want} missing from {text}");
    }
    assert!(
        p.set
            .devices()
            .iter()
            .all(|d| !d.allows_multiple_allocations())
    );
}

#[test]
fn counters_publish_the_pf_beside_its_vfs() {
    let (_dir, _node, config) = node();
    for layout in [CounterLayout::SameSlice, CounterLayout::OwnSlices] {
        let mode = Mode {
            counters: Some(layout),
            ..Mode::PLAIN
        };
        let p = publish(&inventory(&config), &config, mode, &BTreeSet::new()).unwrap();
        assert!(names(&p).contains(&PF.to_owned()));
        assert_eq!(vfs(&p), 4);
        let sets = p.set.counter_sets();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].name(), PF);
        let pf = p.set.devices().iter().find(|d| d.name() == PF).unwrap();
        assert!(pf.draws_from(PF));
        let text = format!("{:?}", p.set.counter_sets());
        assert!(text.contains("\"slots\": \"4\""), "{text}");
        assert!(
            format!("{pf:?}").contains("\"memory\": \"16384Mi\""),
            "{pf:?}"
        );
        let drawing = p.set.devices().iter().filter(|d| d.draws_from(PF)).count();
        assert_eq!(drawing, 5, "the PF and its 4 VFs");
    }
}

#[test]
fn shared_gpus_split_by_capacity_but_not_those_drawing_counters() {
    let (_dir, _node, config) = node();
    let mode = Mode {
        shared: true,
        counters: Some(CounterLayout::SameSlice),
        taints: true,
    };
    let p = publish(&inventory(&config), &config, mode, &BTreeSet::new()).unwrap();
    for d in p.set.devices() {
        let shared = d.allows_multiple_allocations();
        assert_eq!(shared, !d.draws_from(PF), "{}", d.name());
        assert_eq!(p.facts[d.name()].shared, shared);
    }
    let b580 = format!("{:?}", p.set.devices().iter().find(|d| d.name() == B580));
    assert!(b580.contains("default: \"1000\""), "{b580}");
}

#[test]
fn health_becomes_taints_or_withholds() {
    let (_dir, node, config) = node();
    // The B580's device nodes vanish (degraded): NoSchedule with taints,
    // withheld without.
    node.remove_device_nodes(8).unwrap();
    let inv = inventory(&config);
    let tainted = publish(
        &inv,
        &config,
        Mode {
            taints: true,
            ..Mode::PLAIN
        },
        &BTreeSet::new(),
    )
    .unwrap();
    let b580 = tainted
        .set
        .devices()
        .iter()
        .find(|d| d.name() == B580)
        .unwrap();
    assert_eq!(b580.taints().len(), 1);
    assert_eq!(b580.taints()[0].key, "gpu.intel.com/unhealthy");
    assert!(format!("{b580:?}").contains("Unhealthy"));
    let plain = publish(&inv, &config, Mode::PLAIN, &BTreeSet::new()).unwrap();
    assert!(!names(&plain).contains(&B580.to_owned()));
    assert!(
        plain.withheld[B580].contains("no device taints"),
        "{:?}",
        plain.withheld
    );

    // A wedged card: NoExecute.
    let mut wedged = inventory(&config);
    for g in &mut wedged.gpus {
        if g.card == "card0" {
            g.kernel_health = Some("the kernel declared it wedged (recovery: rebind)".into());
        }
    }
    let p = publish(
        &wedged,
        &config,
        Mode {
            taints: true,
            ..Mode::PLAIN
        },
        &BTreeSet::new(),
    )
    .unwrap();
    let igpu = p.set.devices().iter().find(|d| d.name() == IGPU).unwrap();
    assert_eq!(igpu.taints()[0].key, "gpu.intel.com/wedged");
    assert_eq!(format!("{:?}", igpu.taints()[0].effect), "NoExecute");
}

#[test]
fn a_prepared_gpu_that_leaves_stays_tainted_until_unprepared() {
    let (_dir, node, config) = node();
    node.remove_gpu(8).unwrap();
    let mode = Mode {
        taints: true,
        ..Mode::PLAIN
    };
    let prepared: BTreeSet<String> = [B580.to_owned()].into();
    let p = publish(&inventory(&config), &config, mode, &prepared).unwrap();
    let gone = p.set.devices().iter().find(|d| d.name() == B580).unwrap();
    assert_eq!(gone.taints()[0].key, TAINT_GONE);
    assert!(!p.facts.contains_key(B580), "nothing to prepare with");
    let p = publish(&inventory(&config), &config, mode, &BTreeSet::new()).unwrap();
    assert!(
        !names(&p).contains(&B580.to_owned()),
        "unprepared: gone for good"
    );
}

#[test]
fn names_follow_the_pci_address_not_the_card_number() {
    let (_dir, node, config) = node();
    let before =
        names(&publish(&inventory(&config), &config, Mode::PLAIN, &BTreeSet::new()).unwrap());
    // The B580 comes back as another card number.
    node.remove_gpu(8).unwrap();
    node.add_gpu(
        &GpuSpec::new(12)
            .at("0000:8a:00.0")
            .device("0xe20b")
            .driver(Some("xe")),
    )
    .unwrap();
    let after =
        names(&publish(&inventory(&config), &config, Mode::PLAIN, &BTreeSet::new()).unwrap());
    assert_eq!(before, after);
}

#[test]
fn edits_give_nodes_links_and_render_environment() {
    let (_dir, _node, config) = node();
    let p = publish(&inventory(&config), &config, Mode::PLAIN, &BTreeSet::new()).unwrap();
    let e = edits(&p.facts[B580], 0);
    let text = serde_json::to_string(&e).unwrap();
    assert!(text.contains("\"/dev/dri/card8\""), "{text}");
    assert!(text.contains("RENDER_DEVICE=/dev/dri/renderD"), "{text}");
    assert!(text.contains("RENDER_DEVICE_0=/dev/dri/renderD"), "{text}");
    assert!(
        text.contains("/dev/dri/by-path/pci-0000:8a:00.0-card"),
        "{text}"
    );
    let second = serde_json::to_string(&edits(&p.facts[IGPU], 1)).unwrap();
    assert!(!second.contains("RENDER_DEVICE="), "{second}");
    assert!(second.contains("RENDER_DEVICE_1="), "{second}");
}

#[test]
fn a_vf_is_never_published_while_its_pf_is_prepared() {
    let (_dir, _node, config) = node();
    let mode = Mode {
        counters: Some(CounterLayout::SameSlice),
        ..Mode::PLAIN
    };
    let prepared: BTreeSet<String> = [PF.to_owned()].into();
    let p = publish(&inventory(&config), &config, mode, &prepared).unwrap();
    assert_eq!(vfs(&p), 0, "{:?}", names(&p));
    assert!(names(&p).contains(&PF.to_owned()));
    assert!(p.withheld["0000-4d-00-1-0x56c0"].contains("PF is prepared"));
}

#[test]
fn with_counters_a_pf_whose_vfs_are_elsewhere_stays_hidden() {
    let (_dir, node, config) = node();
    // The VFs lose their driver (given to VMs): none is published here.
    for card in 2..=5 {
        node.unbind_driver(card).unwrap();
    }
    let mode = Mode {
        counters: Some(CounterLayout::OwnSlices),
        ..Mode::PLAIN
    };
    let p = publish(&inventory(&config), &config, mode, &BTreeSet::new()).unwrap();
    assert!(!names(&p).contains(&PF.to_owned()), "{:?}", names(&p));
    assert!(
        p.withheld[PF].contains("none is published"),
        "{:?}",
        p.withheld
    );
}

#[test]
fn prepare_keeps_a_pf_and_its_vfs_with_one_claim_and_names_a_twice_allocated_device_once() {
    use dra_api::{Allocated, ClaimRef, Driver};
    use std::sync::{Arc, RwLock};
    let (_dir, _node, config) = node();
    let mode = Mode {
        counters: Some(CounterLayout::SameSlice),
        shared: true,
        ..Mode::PLAIN
    };
    let p = publish(&inventory(&config), &config, mode, &BTreeSet::new()).unwrap();
    let current = Arc::new(RwLock::new(p.facts));
    let driver = intel_gpu_dra::prepare::GpuDriver::new("edge-0", current);
    let claim = |uid: &str| ClaimRef {
        namespace: "default".into(),
        name: uid.into(),
        uid: uid.into(),
    };
    let on = |device: &str| Allocated {
        request: "gpu".into(),
        pool: "edge-0".into(),
        device: device.into(),
    };
    driver
        .prepare(&claim("a"), &[on("0000-4d-00-2-0x56c0")])
        .unwrap();
    let err = driver.prepare(&claim("b"), &[on(PF)]).unwrap_err();
    assert!(err.0.contains("shares SR-IOV PF"), "{err}");
    // Another VF of the same PF is fine.
    driver
        .prepare(&claim("c"), &[on("0000-4d-00-3-0x56c0")])
        .unwrap();
    // A shared B580 twice in one claim: the same edits for both (the
    // framework makes them one CDI device).
    let twice = driver.prepare(&claim("d"), &[on(B580), on(B580)]).unwrap();
    assert_eq!(twice[0].edits, twice[1].edits);
    assert!(!twice[0].edits.device_nodes.is_empty());
    driver.unprepare(&claim("a"), None).unwrap();
    driver.unprepare(&claim("c"), None).unwrap();
    driver.prepare(&claim("b"), &[on(PF)]).unwrap();
}

/// A record rebuilt from a CDI spec is unverified (anyone who can write
/// the CDI directory can plant one): it reserves no device; a record read
/// from the checkpoint does.
#[test]
fn rebuilt_records_reserve_nothing_read_ones_do() {
    use dra_api::{Allocated, ClaimRef, Driver, PreparedClaim, PreparedDevice};
    use std::collections::BTreeMap;
    use std::sync::{Arc, RwLock};
    let (_dir, _node, config) = node();
    let p = publish(&inventory(&config), &config, Mode::PLAIN, &BTreeSet::new()).unwrap();
    let driver = intel_gpu_dra::prepare::GpuDriver::new("edge-0", Arc::new(RwLock::new(p.facts)));
    let record = |rebuilt| PreparedClaim {
        namespace: String::new(),
        name: String::new(),
        devices: vec![PreparedDevice {
            requests: vec![],
            pool: String::new(),
            device: B580.into(),
            cdi_device_ids: vec![],
        }],
        cdi_devices: vec![],
        rebuilt,
    };
    let claim = ClaimRef {
        namespace: "default".into(),
        name: "real".into(),
        uid: "00000000-0000-4000-8000-000000000001".into(),
    };
    let on = Allocated {
        request: "gpu".into(),
        pool: "edge-0".into(),
        device: B580.into(),
    };
    let mut planted = BTreeMap::new();
    planted.insert(
        "deadbeef-0000-4000-8000-000000000000".to_owned(),
        record(true),
    );
    driver.restore(&planted);
    assert!(driver.prepared_devices().is_empty());
    driver.prepare(&claim, std::slice::from_ref(&on)).unwrap();
    let other = intel_gpu_dra::prepare::GpuDriver::new("edge-0", {
        let p = publish(&inventory(&config), &config, Mode::PLAIN, &BTreeSet::new()).unwrap();
        Arc::new(RwLock::new(p.facts))
    });
    let mut read = BTreeMap::new();
    read.insert(
        "deadbeef-0000-4000-8000-000000000000".to_owned(),
        record(false),
    );
    other.restore(&read);
    assert!(
        other.prepare(&claim, &[on]).is_err(),
        "a read record holds its device"
    );
}
