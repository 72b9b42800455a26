//! Each hotplug source against fake nodes, and end to end in a hermetic
//! namespace with synthetic kernel uevents.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::sync::Arc;
use std::time::Duration;

use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec, inject_uevent};
use gpu_discovery::uevent::kernel_message;
use gpu_discovery::{
    CardState, DiscoveryConfig, Inventory, InventoryWatcher, Source, WatcherConfig,
};
use tokio::sync::watch;

const LIMIT: Duration = Duration::from_secs(10);
const CHILD_ENV: &str = "GPU_DISCOVERY_HOTPLUG_CHILD";

async fn until(
    rx: &mut watch::Receiver<Arc<Inventory>>,
    what: &str,
    f: impl Fn(&Inventory) -> bool,
) {
    tokio::time::timeout(LIMIT, rx.wait_for(|inv| f(inv)))
        .await
        .unwrap_or_else(|_| panic!("no inventory where {what} within {LIMIT:?}"))
        .unwrap();
}

fn cards(inv: &Inventory) -> Vec<&str> {
    inv.gpus.iter().map(|g| g.card.as_str()).collect()
}

fn node(dir: &std::path::Path) -> FakeNode {
    FakeNode::build(
        dir,
        &NodeSpec {
            name: "t".into(),
            gpus: vec![GpuSpec::new(0)],
        },
    )
    .unwrap()
}

fn slow(node: &FakeNode) -> WatcherConfig {
    // No safety rescan within the test: only events can explain a change.
    WatcherConfig::new(DiscoveryConfig::new(node.sysfs_root(), node.devfs_root()))
        .rescan_every(Duration::from_secs(3600))
        .trust_uevent_port(fake_gpu_node::FAKE_KERNEL_PORT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devfs_events_follow_add_remove_and_lost_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let w = InventoryWatcher::spawn(slow(&node).without_uevents()).unwrap();
    assert_eq!(w.sources(), [Source::DevfsInotify]);
    let mut rx = w.subscribe();
    assert_eq!(cards(&w.current()), ["card0"]);

    node.add_gpu(&GpuSpec::new(1).device("0xe20b").driver(Some("xe")))
        .unwrap();
    until(&mut rx, "card1 appeared", |i| {
        cards(i) == ["card0", "card1"]
    })
    .await;
    node.add_gpu(&GpuSpec::new(2)).unwrap();
    until(&mut rx, "card2 appeared", |i| {
        cards(i) == ["card0", "card1", "card2"]
    })
    .await;
    // Device nodes vanish (udev or a driver problem): the card degrades.
    node.remove_device_nodes(1).unwrap();
    until(&mut rx, "card1 degraded", |i| {
        i.card("card1")
            .is_some_and(|g| g.state == CardState::Degraded)
    })
    .await;
    // A hot-unplug removes the nodes with the device.
    node.remove_gpu(2).unwrap();
    until(&mut rx, "card2 gone", |i| cards(i) == ["card0", "card1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_event_sources_the_fallback_rescan_follows() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let config = slow(&node)
        .without_uevents()
        .without_inotify()
        .fallback_rescan_every(Duration::from_millis(50));
    let w = InventoryWatcher::spawn(config).unwrap();
    assert!(w.sources().is_empty());
    let mut rx = w.subscribe();
    node.add_gpu(&GpuSpec::new(1)).unwrap();
    until(&mut rx, "card1 appeared", |i| cards(i).len() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_node_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let config = slow(&node)
        .without_uevents()
        .without_inotify()
        .fallback_rescan_every(Duration::from_millis(10));
    let w = InventoryWatcher::spawn(config).unwrap();
    let mut rx = w.subscribe();
    let waited = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
    assert!(waited.is_err(), "nothing changed, nothing is published");
    assert!(
        w.rescans() >= 3,
        "the fallback rescans ran: {}",
        w.rescans()
    );
}

/// The child half of the namespace test: runs only when the parent sets
/// the environment variable, inside `unshare --user --map-root-user --net`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uevent_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let node = node(std::path::Path::new(&dir));
    let w = InventoryWatcher::spawn(slow(&node).without_inotify()).unwrap();
    assert_eq!(w.sources(), [Source::Uevents]);
    let mut rx = w.subscribe();
    // The tree changes; only the uevent tells the watcher.
    node.add_gpu(&GpuSpec::new(1).at("0000:05:00.0")).unwrap();
    let msg = kernel_message(
        "add",
        "/devices/pci0000:00/0000:05:00.0/drm/card1",
        &[("SUBSYSTEM", "drm"), ("DEVNAME", "dri/card1")],
    );
    inject_uevent(&msg).unwrap();
    until(&mut rx, "card1 appeared after the uevent", |i| {
        cards(i) == ["card0", "card1"]
    })
    .await;
    node.remove_gpu(1).unwrap();
    inject_uevent(&kernel_message(
        "remove",
        "/devices/pci0000:00/0000:05:00.0",
        &[("SUBSYSTEM", "pci")],
    ))
    .unwrap();
    until(&mut rx, "card1 gone after the uevent", |i| {
        cards(i) == ["card0"]
    })
    .await;
    // The kernel's order on removal: the device node goes, then `remove`
    // is sent, and only then the sysfs directory goes. The uevent alone
    // removes the card.
    node.add_gpu(&GpuSpec::new(2).at("0000:06:00.0")).unwrap();
    inject_uevent(&kernel_message(
        "add",
        "/devices/pci0000:00/0000:06:00.0/drm/card2",
        &[("SUBSYSTEM", "drm"), ("DEVNAME", "dri/card2")],
    ))
    .unwrap();
    until(&mut rx, "card2 appeared", |i| {
        cards(i) == ["card0", "card2"]
    })
    .await;
    // `device_del` (drivers/base/core.c): the devtmpfs node and the class
    // link go before the remove uevent; the device directory after it.
    std::fs::remove_file(node.devfs_root().join("dri/card2")).unwrap();
    let class_link = node.sysfs_root().join("class/drm/card2");
    let target = std::fs::read_link(&class_link).unwrap();
    std::fs::remove_file(&class_link).unwrap();
    inject_uevent(&kernel_message(
        "remove",
        "/devices/pci0000:00/0000:06:00.0/drm/card2",
        &[("SUBSYSTEM", "drm"), ("DEVNAME", "dri/card2")],
    ))
    .unwrap();
    until(
        &mut rx,
        "card2 gone on its remove uevent, sysfs still there",
        |i| cards(i) == ["card0"],
    )
    .await;
    assert!(
        node.sysfs_root()
            .join("devices/pci0000:00/0000:06:00.0/drm/card2")
            .exists()
    );
    // The fake node finds a card by its class link: put it back to clear up.
    std::os::unix::fs::symlink(&target, &class_link).unwrap();
    node.remove_gpu(2).unwrap();
    // Kernel health events: wedged until recovered; i915's reset cycle.
    let card0 = "/devices/pci0000:00/0000:00:02.0/drm/card0";
    let health = |i: &Inventory| i.card("card0").and_then(|g| g.kernel_health.clone());
    // Forged by a process of the namespace (any port but the kernel's),
    // as the kernel's or as udev's: refused and counted, the card stays
    // healthy and in place.
    let wedged = kernel_message(
        "change",
        card0,
        &[
            ("SUBSYSTEM", "drm"),
            ("DEVNAME", "dri/card0"),
            ("WEDGED", "rebind"),
        ],
    );
    let removed = kernel_message(
        "remove",
        card0,
        &[("SUBSYSTEM", "drm"), ("DEVNAME", "dri/card0")],
    );
    let mut udev_format = b"libudev\0".to_vec();
    udev_format.extend_from_slice(&wedged);
    let before = w.refused_uevents();
    fake_gpu_node::send_uevent_from(4242, 1, &wedged).unwrap();
    fake_gpu_node::send_uevent_from(4243, 1, &removed).unwrap();
    fake_gpu_node::send_uevent_from(4244, 2, &udev_format).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.refused_uevents() < before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "forged uevents not refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let now = w.current();
    assert!(health(&now).is_none(), "a forged WEDGED took no effect");
    assert!(
        now.card("card0").is_some(),
        "a forged remove took no effect"
    );
    for (props, sick) in [
        (&[("WEDGED", "rebind,bus-reset")][..], true),
        (&[("WEDGED", "none")][..], false),
        (&[("ERROR", "1")][..], true),
        (&[("ERROR", "0")][..], false),
        // A reset on its own (healthy before it) makes the card sick too.
        (&[("RESET", "1")][..], true),
        (&[("ERROR", "0")][..], false),
    ] {
        let mut all = vec![("SUBSYSTEM", "drm"), ("DEVNAME", "dri/card0")];
        all.extend_from_slice(props);
        inject_uevent(&kernel_message("change", card0, &all)).unwrap();
        until(&mut rx, &format!("card0 health after {props:?}"), |i| {
            health(i).is_some() == sick
        })
        .await;
    }
    // A foreign event (network) is not a reason to rescan.
    let before = w.rescans();
    inject_uevent(&kernel_message(
        "add",
        "/devices/virtual/net/veth9",
        &[("SUBSYSTEM", "net")],
    ))
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.rescans(), before);
}

#[test]
fn uevents_end_to_end_in_a_hermetic_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "uevent_child",
        "--nocapture",
        "--test-threads",
        "1",
    ];
    let out =
        match fake_gpu_node::run_hermetic(&exe, &args, (CHILD_ENV, dir.path().to_str().unwrap())) {
            Ok(out) => out,
            Err(reason) => {
                eprintln!("SKIPPED uevents_end_to_end_in_a_hermetic_namespace: {reason}");
                return;
            }
        };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the namespaced child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}

/// The libudev monitor opens (feature `libudev`; CI installs libudev-dev).
#[cfg(feature = "libudev")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libudev_monitor_opens() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    let w = InventoryWatcher::spawn(
        slow(&node)
            .without_uevents()
            .without_inotify()
            .with_libudev(),
    )
    .unwrap();
    assert_eq!(w.sources(), [Source::Libudev]);
}
