//! `discovery.scan_ms_512`: a full scan of a 512-card node (16 Flex 170 PFs
//! × 31 VFs), against `discovery.scan_baseline_ms_512`: a naive walk that
//! reads the same files without any processing, in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::hint::black_box;
use std::path::Path;

use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, NodeSpec};
use gpu_discovery::{DiscoveryConfig, scan};

const SAMPLES: usize = 30;

fn node_512(root: &Path) -> FakeNode {
    FakeNode::build(root, &NodeSpec::flex_vfs(16, 31)).unwrap()
}

/// Reads what `scan` reads, processing nothing.
fn naive_walk(sys: &Path, dev: &Path) -> usize {
    let mut bytes = 0;
    // The same primitive as scan: open and read, no stat.
    let read = |p: &Path| {
        let mut buf = Vec::new();
        std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut buf))
            .unwrap_or(0)
    };
    let by_path: Vec<_> = std::fs::read_dir(dev.join("dri/by-path"))
        .unwrap()
        .flatten()
        .collect();
    bytes += by_path.len();
    for entry in std::fs::read_dir(sys.join("class/drm")).unwrap().flatten() {
        let card = entry.path();
        let Ok(d) = std::fs::canonicalize(card.join("device")) else {
            continue;
        };
        for attr in [
            "vendor",
            "class",
            "device",
            "numa_node",
            "local_cpulist",
            "sriov_totalvfs",
            "sriov_numvfs",
        ] {
            bytes += read(&d.join(attr));
        }
        bytes += std::fs::read_link(d.join("driver"))
            .map(|p| p.as_os_str().len())
            .unwrap_or(0);
        bytes += std::fs::canonicalize(d.join("physfn"))
            .map(|p| p.as_os_str().len())
            .unwrap_or(0);
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            bytes += e.file_name().len();
        }
        for e in std::fs::read_dir(d.join("drm"))
            .into_iter()
            .flatten()
            .flatten()
        {
            bytes += usize::from(dev.join("dri").join(e.file_name()).exists());
        }
        for e in std::fs::read_dir(card.join("gt"))
            .into_iter()
            .flatten()
            .flatten()
        {
            bytes += e.file_name().len();
        }
        bytes += read(&card.join("lmem_total_bytes"));
        for e in std::fs::read_dir(d.join("hwmon"))
            .into_iter()
            .flatten()
            .flatten()
        {
            bytes += std::fs::read_dir(e.path()).into_iter().flatten().count();
        }
    }
    bytes
}

fn main() {
    let mut report = Report::new("gpu_discovery_scan");
    let dir = tempfile::tempdir().unwrap();
    let node = node_512(dir.path());
    let config = DiscoveryConfig::new(node.sysfs_root(), node.devfs_root());
    let inv = scan(&config).unwrap();
    assert_eq!(inv.gpus.len(), 512, "the node has 512 cards");
    assert_eq!(inv.advertised().count(), 496);

    // Warm the dentry cache for both, then interleave the samples so that
    // machine noise hits both alike.
    black_box(naive_walk(&node.sysfs_root(), &node.devfs_root()));
    let mut ours = Samples::new();
    let mut baseline = Samples::new();
    for _ in 0..SAMPLES {
        ours.time(1, || scan(&config).unwrap());
        baseline.time(1, || naive_walk(&node.sysfs_root(), &node.devfs_root()));
    }
    let ours_ms = ours.percentile_ms(50.0).unwrap_or(f64::NAN);
    let base_ms = baseline.percentile_ms(50.0).unwrap_or(f64::NAN);
    report.metric("discovery.scan_ms_512", ours_ms);
    report.metric("discovery.scan_baseline_ms_512", base_ms);
    println!("ratio scan / naive walk: {:.2}", ours_ms / base_ms);
    report.finish().unwrap();
}
