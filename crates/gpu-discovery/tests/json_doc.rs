//! The inventory JSON is pinned by the example in `docs/inventory.md`: the
//! document shows exactly what `scan` produces for the node described
//! there. On a mismatch, the test prints the JSON to paste.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;

use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
use gpu_discovery::{DiscoveryConfig, scan};

/// The node of the document: the Battlemage workstation plus a foreign
/// display adapter.
fn documented_node() -> NodeSpec {
    let mut spec = NodeSpec::battlemage_workstation();
    let mut other = GpuSpec::new(2).at("0000:05:00.0").driver(Some("nouveau"));
    other.vendor = "0x10de".into();
    spec.gpus.push(other);
    spec
}

fn json_block(markdown: &str) -> Option<&str> {
    let start = markdown.find("```json\n")? + "```json\n".len();
    let len = markdown[start..].find("```")?;
    Some(&markdown[start..start + len])
}

#[test]
fn docs_inventory_example_is_what_scan_produces() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), &documented_node()).unwrap();
    let inv = scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap();
    // Sysfs paths carry the temporary root: show them as on a host.
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let produced = inv.to_json().replace(&root.display().to_string(), "") + "\n";

    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/inventory.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let shown = json_block(&doc).expect("docs/inventory.md has a ```json block");
    assert!(
        shown == produced,
        "docs/inventory.md is out of date; its JSON block should be:\n{produced}"
    );

    // The fields the schema promises are there.
    let v: serde_json::Value = serde_json::from_str(&produced).unwrap();
    assert_eq!(v["schema"], 1);
    for field in [
        "card",
        "state",
        "pci_address",
        "vendor_id",
        "device_id",
        "class",
        "driver",
        "sriov",
        "numa_node",
        "device_nodes",
        "by_path",
        "tiles",
        "vram_bytes",
        "advertised",
    ] {
        assert!(v["gpus"][0].get(field).is_some(), "missing {field}");
    }
    assert_eq!(v["skipped"][0]["entry"], "card2");
}
