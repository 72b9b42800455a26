//! Intel GPU DRA driver figures, the release binary against the emulators
//! (1.34 with the DRA gates on) on the StarlingX edge node:
//! - `dra.gpu_hotplug_ms_p50`/`_p99`: a GPU plugged or unplugged in the
//!   kernel's order (fake-gpu-node's `plug_gpu`/`unplug_gpu`: sysfs and
//!   device nodes, the uevent, then udev's links; on removal the reverse),
//!   uevents injected in a hermetic namespace; the clock runs from the
//!   kernel's last uevent to the API server holding a ResourceSlice pool
//!   with (or without) the device; skipped where namespaces are not
//!   allowed;
//! - `dra.gpu_startup_ms`: exec → registered with the kubelet and the
//!   node's devices published (median of 10; the kubelet's plugin watcher
//!   reconciles every second, so registration is measured separately from
//!   publication: this figure is exec → slices published);
//! - `dra.gpu_rss_kib`: the driver's resident memory after the hotplug
//!   run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use apiserver_emulator::{ApiServer, DraApi};
use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec, inject_uevent};
use kubelet_emulator::{KubeletVersion, PluginWatcher};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-dra");
const CHILD_ENV: &str = "INTEL_GPU_DRA_BENCH_CHILD";
const NODE: &str = "edge-0";
const NEW: &str = "0000-09-00-0-0x56a0";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, node: &FakeNode) -> Driver {
    let child = Command::new(BIN)
        .args([
            "--node-name",
            NODE,
            "--http-address",
            "none",
            "--log-level",
            "warn",
        ])
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        // The hermetic namespace's test kernel.
        .arg("--trust-uevent-port")
        .arg(fake_gpu_node::FAKE_KERNEL_PORT.to_string())
        .arg("--sysfs-root")
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .arg("--registry-dir")
        .arg(dir.join("plugins_registry"))
        .arg("--plugin-dir")
        .arg(dir.join("plugins/gpu.intel.com"))
        .arg("--cdi-dir")
        .arg(dir.join("cdi"))
        .arg("--owner-lock")
        .arg(dir.join("owner.lock"))
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("BENCH_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    Driver(child)
}

fn devices(slices: &BTreeMap<String, Value>) -> Vec<String> {
    slices
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["name"].as_str().map(str::to_owned))
        .collect()
}

/// Waits, woken by each change the emulator stores (no polling to
/// compete with the driver for the two cores).
async fn until(api: &ApiServer, what: &str, f: impl Fn(&[String]) -> bool) {
    api.wait_resource_slices(Duration::from_secs(10), |s| f(&devices(s)))
        .await
        .unwrap_or_else(|s| panic!("{what}: {:?}", devices(&s)));
}

async fn setup() -> (tempfile::TempDir, FakeNode, ApiServer) {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(
        &dir.path().join("node"),
        &NodeSpec::starlingx_edge_with_arc(),
    )
    .unwrap();
    let api = ApiServer::start().await.unwrap();
    api.set_dra(DraApi::V1_34.with_all_gates());
    api.add_node(NODE);
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    (dir, node, api)
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn hotplug_child() {
    let mut report = Report::new("intel_gpu_dra_hotplug");
    // A new network namespace starts with loopback down.
    fake_gpu_node::loopback_up().unwrap();
    let (dir, node, api) = setup().await;
    let _kubelet =
        PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_34).unwrap();
    let driver = start(dir.path(), &node);
    until(&api, "7 devices", |d| d.len() == 7).await;
    let gpu = GpuSpec::new(9).at("0000:09:00.0").device("0x56a0");
    let mut samples = Samples::new();
    for i in 0..200 {
        let adding = i % 2 == 0;
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
        until(&api, "the slices follow", |d| {
            d.iter().any(|d| d == NEW) == adding
        })
        .await;
        samples.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    report.metric(
        "dra.gpu_hotplug_ms_p50",
        samples.percentile_ms(50.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "dra.gpu_hotplug_ms_p99",
        samples.percentile_ms(99.0).unwrap_or(f64::NAN),
    );
    report.metric("dra.gpu_rss_kib", rss_kib(driver.0.id()));
    report.finish().unwrap();
}

async fn startup(report: &mut Report) {
    let mut samples = Samples::new();
    for _ in 0..10 {
        let (dir, node, api) = setup().await;
        let _kubelet =
            PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_34)
                .unwrap();
        let t = Instant::now();
        let _driver = start(dir.path(), &node);
        until(&api, "7 devices", |d| d.len() == 7).await;
        samples.push(t.elapsed());
    }
    report.metric(
        "dra.gpu_startup_ms",
        samples.percentile_ms(50.0).unwrap_or(f64::NAN),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        hotplug_child().await;
        return;
    }
    let mut report = Report::new("intel_gpu_dra");
    let exe = std::env::current_exe().unwrap();
    match fake_gpu_node::run_hermetic(&exe, &["--bench"], (CHILD_ENV, "1")) {
        Ok(out) => assert!(
            out.status.success(),
            "the namespaced hotplug benchmark failed: {out:?}"
        ),
        Err(reason) => {
            for name in [
                "dra.gpu_hotplug_ms_p50",
                "dra.gpu_hotplug_ms_p99",
                "dra.gpu_rss_kib",
            ] {
                report.skip(
                    name,
                    &format!("uevent injection needs a hermetic namespace: {reason}"),
                );
            }
        }
    }
    startup(&mut report).await;
    report.finish().unwrap();
}
