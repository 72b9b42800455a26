//! Hotplug figures:
//! - `discovery.event_to_inventory_ms_p50` / `_p99`: a synthetic kernel
//!   uevent injected → the watcher publishes the new inventory (in a
//!   hermetic user+net namespace, so the re-executed child may send to the
//!   kernel's group; skipped where namespaces are not permitted);
//! - `discovery.idle_cpu_ms_per_30s`: CPU time of the process while the
//!   watcher follows an unchanging node (measured over 6 s, scaled).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::time::{Duration, Instant};

use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec, inject_uevent};
use gpu_discovery::uevent::kernel_message;
use gpu_discovery::{DiscoveryConfig, InventoryWatcher, WatcherConfig};

const CHILD_ENV: &str = "GPU_DISCOVERY_BENCH_CHILD";
const EVENTS: usize = 300;
const IDLE: Duration = Duration::from_secs(6);

fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

fn starlingx_node(dir: &std::path::Path) -> FakeNode {
    FakeNode::build(dir, &NodeSpec::starlingx_edge()).unwrap()
}

async fn events_child() {
    let mut report = Report::new("gpu_discovery_hotplug_events");
    let dir = tempfile::tempdir().unwrap();
    let node = starlingx_node(dir.path());
    let config = WatcherConfig::new(DiscoveryConfig::new(node.sysfs_root(), node.devfs_root()))
        .rescan_every(Duration::from_secs(3600))
        .without_inotify();
    let w = InventoryWatcher::spawn(config).unwrap();
    let mut rx = w.subscribe();
    let gpu = GpuSpec::new(9)
        .at("0000:09:00.0")
        .device("0xe20b")
        .driver(Some("xe"));
    let mut samples = Samples::new();
    for i in 0..EVENTS {
        let adding = i % 2 == 0;
        if adding {
            node.add_gpu(&gpu).unwrap();
        } else {
            node.remove_gpu(9).unwrap();
        }
        let action = if adding { "add" } else { "remove" };
        let msg = kernel_message(
            action,
            "/devices/pci0000:00/0000:09:00.0/drm/card9",
            &[("SUBSYSTEM", "drm")],
        );
        let start = Instant::now();
        inject_uevent(&msg).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|inv| inv.card("card9").is_some() == adding),
        )
        .await
        .expect("the watcher followed the uevent")
        .unwrap();
        samples.push(start.elapsed());
        // Let the trailing edge of the burst pass before the next event.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    report.metric(
        "discovery.event_to_inventory_ms_p50",
        samples.percentile_ms(50.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "discovery.event_to_inventory_ms_p99",
        samples.percentile_ms(99.0).unwrap_or(f64::NAN),
    );
    report.finish().unwrap();
}

fn events_in_namespace(report: &mut Report) {
    let exe = std::env::current_exe().unwrap();
    match fake_gpu_node::run_hermetic(&exe, &["--bench"], (CHILD_ENV, "1")) {
        Ok(out) => assert!(
            out.status.success(),
            "the namespaced benchmark child failed: {out:?}"
        ),
        Err(reason) => {
            for name in [
                "discovery.event_to_inventory_ms_p50",
                "discovery.event_to_inventory_ms_p99",
            ] {
                report.skip(
                    name,
                    &format!("uevent injection needs a hermetic namespace: {reason}"),
                );
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        events_child().await;
        return;
    }
    let mut report = Report::new("gpu_discovery_hotplug");
    events_in_namespace(&mut report);

    let dir = tempfile::tempdir().unwrap();
    let node = starlingx_node(dir.path());
    let w = InventoryWatcher::spawn(WatcherConfig::new(DiscoveryConfig::new(
        node.sysfs_root(),
        node.devfs_root(),
    )))
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_time();
    tokio::time::sleep(IDLE).await;
    let used = cpu_time() - before;
    report.metric(
        "discovery.idle_cpu_ms_per_30s",
        used.as_secs_f64() * 1000.0 * 30.0 / IDLE.as_secs_f64(),
    );
    println!("idle rescans: {} (sources {:?})", w.rescans(), w.sources());
    report.finish().unwrap();
}
