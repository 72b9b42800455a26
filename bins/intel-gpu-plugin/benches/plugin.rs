//! Plugin figures, the release binary against fake nodes and the kubelet
//! emulator:
//! - `plugin.startup_ms`: exec → registered with its list (p50 of 10);
//! - `plugin.allocate_us_p99`: Allocate of one ID at 512 cards × 8 shares;
//! - `plugin.rss_kib`: resident memory at 512 cards × 8 shares;
//! - `plugin.idle_cpu_ms_per_30s`: CPU while nothing changes (6 s, scaled);
//! - `plugin.hotplug_add_ms_p50`/`_p99`, `plugin.hotplug_remove_ms_p50`/
//!   `_p99`: a GPU plugged or unplugged in the kernel's order (sysfs, nodes,
//!   uevents, udev's links as fake-gpu-node's `plug_gpu`/`unplug_gpu` take
//!   them, uevents injected in a hermetic namespace; skipped where not
//!   permitted) → the kubelet emulator has the new list, timed from the
//!   kernel's uevent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec, inject_uevent};
use kubelet_emulator::KubeletEmulator;

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-plugin");
const CHILD_ENV: &str = "INTEL_GPU_PLUGIN_BENCH_CHILD";
const I915: &str = "gpu.intel.com/i915";

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(node: &FakeNode, kubelet: &Path, cdi: &Path, shares: &str) -> Plugin {
    let child = Command::new(BIN)
        // The hermetic namespace's test kernel (uevents are believed only
        // from the kernel's port otherwise).
        .arg("--trust-uevent-port")
        .arg(fake_gpu_node::FAKE_KERNEL_PORT.to_string())
        .arg("--sysfs-root")
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .arg("--kubelet-dir")
        .arg(kubelet)
        .arg("--cdi-dir")
        .arg(cdi)
        .args([
            "--shared-dev-num",
            shares,
            "--http-address",
            "",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Plugin(child)
}

fn node_512(root: &Path) -> FakeNode {
    FakeNode::build(root, &NodeSpec::flex_vfs(16, 31)).unwrap()
}

fn proc_stat(pid: u32) -> (Duration, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), in clock ticks.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = 100; // USER_HZ on Linux
    (Duration::from_millis(ticks * 1000 / hz), rss)
}

async fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("kubelet");
    std::fs::create_dir(&k).unwrap();
    let c = dir.path().join("cdi");
    (dir, k, c)
}

async fn startup(report: &mut Report) {
    let mut samples = Samples::new();
    for _ in 0..10 {
        let (dir, k, c) = dirs().await;
        let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::starlingx_edge()).unwrap();
        let kubelet = KubeletEmulator::start(&k).await.unwrap();
        let start = Instant::now();
        let _p = start_plugin(&node, &k, &c, "1");
        kubelet
            .wait_until(Duration::from_secs(10), |v| {
                v.devices(I915).is_some_and(|d| d.devices().len() == 5)
            })
            .await
            .unwrap();
        samples.push(start.elapsed());
    }
    report.metric(
        "plugin.startup_ms",
        samples.percentile_ms(50.0).unwrap_or(f64::NAN),
    );
}

fn start_plugin(node: &FakeNode, k: &Path, c: &Path, shares: &str) -> Plugin {
    start(node, k, c, shares)
}

async fn at_512(report: &mut Report) {
    let (dir, k, c) = dirs().await;
    let node = node_512(&dir.path().join("node"));
    let kubelet = KubeletEmulator::start(&k).await.unwrap();
    let p = start_plugin(&node, &k, &c, "8");
    kubelet
        .wait_until(Duration::from_secs(30), |v| {
            v.devices(I915)
                .is_some_and(|d| d.devices().len() == 496 * 8)
        })
        .await
        .unwrap();
    let mut samples = Samples::new();
    for i in 0..1000u32 {
        let card = 1 + (i % 31);
        let id = format!("card{card}-{}", i % 8);
        let start = Instant::now();
        kubelet.allocate(I915, &[&id]).await.unwrap();
        samples.push(start.elapsed());
    }
    report.metric(
        "plugin.allocate_us_p99",
        samples.percentile_us(99.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "plugin.allocate_us_p50",
        samples.percentile_us(50.0).unwrap_or(f64::NAN),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, rss) = proc_stat(p.0.id());
    report.metric("plugin.rss_kib", rss as f64);
    let (before, _) = proc_stat(p.0.id());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (after, _) = proc_stat(p.0.id());
    report.metric(
        "plugin.idle_cpu_ms_per_30s",
        (after - before).as_secs_f64() * 1000.0 * 5.0,
    );
}

async fn hotplug_child() {
    let mut report = Report::new("intel_gpu_plugin_hotplug");
    let (dir, k, c) = dirs().await;
    let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::starlingx_edge()).unwrap();
    let kubelet = KubeletEmulator::start(&k).await.unwrap();
    let _p = start_plugin(&node, &k, &c, "1");
    kubelet
        .wait_until(Duration::from_secs(10), |v| {
            v.devices(I915).is_some_and(|d| d.devices().len() == 5)
        })
        .await
        .unwrap();
    let gpu = GpuSpec::new(9).at("0000:09:00.0");
    let mut added = Samples::new();
    let mut removed = Samples::new();
    for i in 0..200 {
        let adding = i % 2 == 0;
        // The kernel's order (fake-gpu-node's plug/unplug): on add, sysfs and
        // nodes exist before the `add` uevent and udev's by-path links come
        // after it; on removal, the node goes, then `remove`, then sysfs.
        // The clock starts at the kernel's uevent (the last one of a burst).
        let mut sent = Instant::now();
        let mut announce = |e: &fake_gpu_node::KernelEvent| {
            inject_uevent(&e.to_kernel_message()).unwrap();
            sent = Instant::now();
        };
        if adding {
            node.plug_gpu(&gpu, &mut announce).unwrap();
        } else {
            node.unplug_gpu(9, &mut announce).unwrap();
        }
        let want = if adding { 6 } else { 5 };
        kubelet
            .wait_until(Duration::from_secs(10), |v| {
                v.devices(I915).is_some_and(|d| d.devices().len() == want)
            })
            .await
            .unwrap();
        let took = sent.elapsed();
        if adding {
            added.push(took);
        } else {
            removed.push(took);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for (name, samples) in [("add", &added), ("remove", &removed)] {
        report.metric(
            &format!("plugin.hotplug_{name}_ms_p50"),
            samples.percentile_ms(50.0).unwrap_or(f64::NAN),
        );
        report.metric(
            &format!("plugin.hotplug_{name}_ms_p99"),
            samples.percentile_ms(99.0).unwrap_or(f64::NAN),
        );
    }
    report.finish().unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        hotplug_child().await;
        return;
    }
    let mut report = Report::new("intel_gpu_plugin");
    let exe = std::env::current_exe().unwrap();
    match fake_gpu_node::run_hermetic(&exe, &["--bench"], (CHILD_ENV, "1")) {
        Ok(out) => assert!(
            out.status.success(),
            "the namespaced hotplug benchmark failed: {out:?}"
        ),
        Err(reason) => {
            for name in [
                "plugin.hotplug_add_ms_p50",
                "plugin.hotplug_add_ms_p99",
                "plugin.hotplug_remove_ms_p50",
                "plugin.hotplug_remove_ms_p99",
            ] {
                report.skip(
                    name,
                    &format!("uevent injection needs a hermetic namespace: {reason}"),
                );
            }
        }
    }
    startup(&mut report).await;
    at_512(&mut report).await;
    report.finish().unwrap();
}
