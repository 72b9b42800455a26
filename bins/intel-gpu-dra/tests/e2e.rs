//! The driver end to end on the StarlingX edge node of the demo (iGPU,
//! Flex 170 with 4 VFs, B580 on `xe`): the real binary against the
//! emulated 1.34 kubelet and API server, allocation by the emulator's
//! stand-in for the scheduler's allocator.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;
use test_support::ChildGuard;

use apiserver_emulator::{ApiServer, DeviceRequest, DraApi};
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
use gpu_discovery::owner::OwnerLock;
use kubelet_emulator::{ClaimId, KubeletVersion, PluginWatcher};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-dra");
const NODE: &str = "edge-0";
const DRIVER: &str = "gpu.intel.com";
const LIMIT: Duration = Duration::from_secs(15);
const PF: &str = "0000-4d-00-0-0x56c0";
const B580: &str = "0000-8a-00-0-0xe20b";

struct Driver(ChildGuard);

impl Driver {
    fn start(dir: &Path, node: &FakeNode, extra: &[&str]) -> Self {
        let http: &[&str] = if extra.contains(&"--http-address") {
            &[]
        } else {
            &["--http-address", "none"]
        };
        let mut command = Command::new(BIN);
        let command = command
            .args(["--node-name", NODE])
            .args(http)
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .arg("--sysfs-root")
            .arg(node.sysfs_root())
            .arg("--devfs-root")
            .arg(node.devfs_root())
            .arg("--registry-dir")
            .arg(dir.join("plugins_registry"))
            .arg("--plugin-dir")
            .arg(dir.join("plugins").join(DRIVER))
            .arg("--cdi-dir")
            .arg(dir.join("cdi"))
            .arg("--owner-lock")
            .arg(dir.join("owner.lock"))
            .args(extra);
        Self(ChildGuard::spawn(command))
    }

    /// SIGTERM, then waits for it to exit.
    fn stop(self) {
        self.0.stop();
    }
}

async fn until(what: &str, f: impl FnMut() -> bool) {
    test_support::until(what, LIMIT, f).await;
}

/// The devices of the newest published pool.
fn published(api: &ApiServer) -> Vec<Value> {
    api.resource_slices()
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn device<'a>(devices: &'a [Value], name: &str) -> Option<&'a Value> {
    devices.iter().find(|d| d["name"] == name)
}

struct Setup {
    dir: tempfile::TempDir,
    node: FakeNode,
    api: ApiServer,
    kubelet: PluginWatcher,
}

async fn setup(release: DraApi) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(
        &dir.path().join("node"),
        &NodeSpec::starlingx_edge_with_arc(),
    )
    .unwrap();
    let api = ApiServer::start().await.unwrap();
    api.set_dra(release);
    api.add_node(NODE);
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    let kubelet =
        PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_34).unwrap();
    Setup {
        dir,
        node,
        api,
        kubelet,
    }
}

impl Setup {
    async fn registered(&mut self) {
        self.kubelet
            .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
            .await
            .unwrap();
    }

    fn claim(&self, name: &str) -> ClaimId {
        let uid = self.api.create_resource_claim("default", name, json!({}));
        ClaimId {
            namespace: "default".into(),
            name: name.into(),
            uid,
        }
    }

    async fn prepare(&mut self, claim: &ClaimId) -> Result<Vec<String>, String> {
        let answers = self
            .kubelet
            .prepare(DRIVER, std::slice::from_ref(claim))
            .await
            .unwrap();
        answers[&claim.uid]
            .clone()
            .map(|ds| ds.into_iter().flat_map(|d| d.cdi_device_ids).collect())
    }

    fn spec(&self, claim: &ClaimId) -> PathBuf {
        self.dir
            .path()
            .join(format!("cdi/{DRIVER}-claim_{}.json", claim.uid))
    }
}

fn vf() -> DeviceRequest {
    DeviceRequest::new("gpu", DRIVER).attribute("type", json!({"string": "vf"}))
}

fn bus(id: &str) -> DeviceRequest {
    DeviceRequest::new("gpu", DRIVER)
        .attribute("resource.kubernetes.io/pciBusID", json!({"string": id}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_1_34_with_the_gates_gpus_are_shared_and_sriov_never_double_booked() {
    shared_and_sriov(DraApi::V1_34.with_all_gates(), 1).await;
}

/// 1.35 refuses counter sets beside devices: they go into a slice of their
/// own, and the rules hold across the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_1_35_with_the_gates_counters_live_in_their_own_slice() {
    shared_and_sriov(DraApi::V1_35.with_all_gates(), 2).await;
}

async fn shared_and_sriov(release: DraApi, slices: usize) {
    let mut s = setup(release).await;
    let _driver = Driver::start(s.dir.path(), &s.node, &[]);
    s.registered().await;
    until("7 devices published", || published(&s.api).len() == 7).await;
    assert_eq!(s.api.resource_slices().len(), slices, "{release:?}");
    let devices = published(&s.api);
    let pf = device(&devices, PF).unwrap();
    assert_eq!(pf["attributes"]["type"], json!({"string": "gpu"}));
    assert!(pf["consumesCounters"].is_array(), "{pf}");
    let b580 = device(&devices, B580).unwrap();
    assert_eq!(b580["allowMultipleAllocations"], true);
    assert_eq!(b580["attributes"]["model"], json!({"string": "B580"}));

    // A VF is prepared: its nodes, links and environment in the claim's
    // CDI spec.
    let one = s.claim("vf-1");
    let got = s.api.allocate("default", "vf-1", &[vf()]).unwrap();
    let vf_name = got[0].device.clone();
    let ids = s.prepare(&one).await.unwrap();
    assert_eq!(ids, [format!("intel.com/gpu={}-{vf_name}", one.uid)]);
    let text = std::fs::read_to_string(s.spec(&one)).unwrap();
    for want in [
        "/dev/dri/card",
        "/dev/dri/renderD",
        "RENDER_DEVICE=",
        "by-path/pci-0000:4d:00.",
    ] {
        assert!(text.contains(want), "{want} missing: {text}");
    }

    // The PF cannot be allocated while a VF is.
    let whole = s.claim("pf");
    let err = s
        .api
        .allocate("default", "pf", &[bus("0000:4d:00.0")])
        .unwrap_err();
    assert!(err.contains("only 0 of 1"), "{err}");

    // The B580 is shared by two claims of 500 millicores; a third that
    // asks for the whole GPU does not fit.
    let half = || {
        DeviceRequest::new("gpu", DRIVER)
            .attribute("model", json!({"string": "B580"}))
            .capacity("millicores", "500")
    };
    let a = s.claim("share-a");
    let b = s.claim("share-b");
    let got_a = s.api.allocate("default", "share-a", &[half()]).unwrap();
    let got_b = s.api.allocate("default", "share-b", &[half()]).unwrap();
    assert_eq!(
        (got_a[0].device.as_str(), got_b[0].device.as_str()),
        (B580, B580)
    );
    assert_ne!(got_a[0].share_id, got_b[0].share_id);
    assert_eq!(s.prepare(&a).await.unwrap().len(), 1);
    assert_eq!(s.prepare(&b).await.unwrap().len(), 1);
    s.claim("whole-b580");
    assert!(
        s.api
            .allocate("default", "whole-b580", &[bus("0000:8a:00.0")])
            .is_err()
    );

    // Unprepare removes exactly the claim's spec; then the PF fits.
    let other = std::fs::read_dir(s.dir.path().join("cdi")).unwrap().count();
    let done = s
        .kubelet
        .unprepare(DRIVER, std::slice::from_ref(&one))
        .await
        .unwrap();
    assert_eq!(done[&one.uid], Ok(()));
    assert!(!s.spec(&one).exists());
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("cdi")).unwrap().count(),
        other - 1
    );
    s.api.delete_resource_claim("default", "vf-1");
    s.api
        .allocate("default", "pf", &[bus("0000:4d:00.0")])
        .unwrap();
    assert_eq!(s.prepare(&whole).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_plain_1_34_gpus_are_whole_and_the_pf_hidden() {
    let mut s = setup(DraApi::V1_34).await;
    let driver = Driver::start(s.dir.path(), &s.node, &[]);
    s.registered().await;
    until("6 devices published", || published(&s.api).len() == 6).await;
    let devices = published(&s.api);
    assert!(device(&devices, PF).is_none(), "the PF has VFs");
    assert!(
        devices
            .iter()
            .all(|d| d.get("allowMultipleAllocations").is_none())
    );
    let a = s.claim("a");
    s.api
        .allocate("default", "a", &[bus("0000:8a:00.0")])
        .unwrap();
    s.claim("b");
    assert!(
        s.api
            .allocate("default", "b", &[bus("0000:8a:00.0")])
            .is_err(),
        "one claim per GPU"
    );
    s.prepare(&a).await.unwrap();
    driver.stop();
    s.kubelet
        .wait_until(LIMIT, |v| !v.plugins.contains_key(DRIVER))
        .await
        .unwrap();
    // Restarted, it knows the claim (checkpoint) and answers the same.
    let _driver = Driver::start(s.dir.path(), &s.node, &[]);
    s.registered().await;
    assert_eq!(s.prepare(&a).await.unwrap().len(), 1);

    // Required features the cluster drops: refused at start, saying why.
    let out = Command::new(BIN)
        .args([
            "--node-name",
            NODE,
            "--http-address",
            "none",
            "--owner-lock",
            "none",
            "--sharing",
            "on",
            "--kubeconfig",
        ])
        .arg(s.dir.path().join("kubeconfig"))
        .arg("--sysfs-root")
        .arg(s.node.sysfs_root())
        .arg("--devfs-root")
        .arg(s.node.devfs_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DRAConsumableCapacity"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_per_node_by_lock_and_by_label() {
    let mut s = setup(DraApi::V1_34).await;
    // The device plugin holds the node's lock: the driver waits.
    let held = OwnerLock::try_acquire(&s.dir.path().join("owner.lock"), "intel-gpu-plugin pid 1")
        .unwrap()
        .unwrap();
    // And the node is labelled for the device plugin.
    s.api.set_label(
        NODE,
        "admin",
        "intel.com/gpu-allocation",
        Some("device-plugin"),
    );
    let _driver = Driver::start(s.dir.path(), &s.node, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!s.kubelet.view().plugins.contains_key(DRIVER));
    assert!(s.api.resource_slices().is_empty());
    drop(held);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !s.kubelet.view().plugins.contains_key(DRIVER),
        "the label still says device-plugin"
    );
    // Standing by, it leaves the lock to the device plugin.
    let plugin_again =
        OwnerLock::try_acquire(&s.dir.path().join("owner.lock"), "intel-gpu-plugin pid 2").unwrap();
    assert!(
        plugin_again.is_ok(),
        "the DRA driver took the lock on a device-plugin node"
    );
    drop(plugin_again);
    s.api
        .set_label(NODE, "admin", "intel.com/gpu-allocation", Some("dra"));
    s.registered().await;
    until("devices published", || !published(&s.api).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_added_gpu_is_published_and_a_removed_one_withdrawn() {
    let mut s = setup(DraApi::V1_34.with_all_gates()).await;
    let _driver = Driver::start(s.dir.path(), &s.node, &["--sriov", "hide-pf"]);
    s.registered().await;
    until("6 devices", || published(&s.api).len() == 6).await;
    s.node
        .plug_gpu(
            &GpuSpec::new(12)
                .at("0000:b3:00.0")
                .device("0xe20b")
                .driver(Some("xe")),
            |_| {},
        )
        .unwrap();
    until("the new B580 published", || {
        device(&published(&s.api), "0000-b3-00-0-0xe20b").is_some()
    })
    .await;
    // A prepared GPU that leaves stays, tainted NoExecute, until its
    // claim is unprepared.
    let c = s.claim("on-b580");
    s.api
        .allocate("default", "on-b580", &[bus("0000:8a:00.0")])
        .unwrap();
    s.prepare(&c).await.unwrap();
    s.node.unplug_gpu(8, |_| {}).unwrap();
    until("the B580 tainted", || {
        device(&published(&s.api), B580)
            .is_some_and(|d| d["taints"][0]["key"] == "gpu.intel.com/gone")
    })
    .await;
    s.kubelet
        .unprepare(DRIVER, std::slice::from_ref(&c))
        .await
        .unwrap();
    until("the B580 withdrawn", || {
        device(&published(&s.api), B580).is_none()
    })
    .await;
}

/// A free loopback port for the driver's ops endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Every CDI name resolves to a device of a spec file on disk, as the
/// container runtime resolves it before it starts the container.
fn resolves_on_disk(dir: &Path, ids: &[String]) {
    let mut on_disk = Vec::new();
    for entry in std::fs::read_dir(dir.join("cdi")).unwrap() {
        let text = std::fs::read(entry.unwrap().path()).unwrap();
        let spec = kubelet_plumbing::cdi::Spec::from_json(&text).unwrap();
        on_disk.extend(
            spec.devices
                .iter()
                .map(|d| format!("{}={}", spec.kind, d.name)),
        );
    }
    assert!(!ids.is_empty());
    for id in ids {
        assert!(on_disk.contains(id), "{id} unresolvable: {on_disk:?}");
    }
}

fn events_with_reason(api: &ApiServer, reason: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

/// A real node's life: kill -9, a reboot that empties the CDI tmpfs and
/// keeps the checkpoint, a checkpoint that turns out corrupt, a kubelet
/// with a known DRA defect. Nothing a running pod uses is lost, and each
/// recovery is a metric and an Event on the Node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboots_lost_checkpoints_and_old_kubelets_lose_nothing_and_are_reported() {
    let mut s = setup(DraApi::V1_34).await;
    s.api.set_kubelet_version(NODE, "v1.34.1");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let boot = s.dir.path().join("boot_id");
    std::fs::write(&boot, "11111111-aaaa-4aaa-8aaa-111111111111\n").unwrap();
    let boot_arg = boot.to_str().unwrap();
    let args = ["--http-address", addr.as_str(), "--boot-id-file", boot_arg];
    let driver = Driver::start(s.dir.path(), &s.node, &args);
    s.registered().await;
    until("6 devices published", || published(&s.api).len() == 6).await;
    let a = s.claim("a");
    s.api
        .allocate("default", "a", &[bus("0000:8a:00.0")])
        .unwrap();
    let first = s.prepare(&a).await.unwrap();
    resolves_on_disk(s.dir.path(), &first);
    until("the kubelet's known issue reported", || {
        !events_with_reason(&s.api, "KubeletDraIdleConnection").is_empty()
    })
    .await;
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("intel_gpu_dra_kubelet_known_issue{issue=\"kubernetes#133920\"} 1"),
        "{metrics}"
    );

    // Killed, and someone empties /var/run/cdi: the same boot, so the
    // record's specs are written back at start.
    drop(driver);
    std::fs::remove_dir_all(s.dir.path().join("cdi")).unwrap();
    let driver = Driver::start(s.dir.path(), &s.node, &args);
    s.kubelet
        .wait_until(LIMIT, |v| v.registrations_of(DRIVER) == 2)
        .await
        .unwrap();
    let again = s.prepare(&a).await.unwrap();
    assert_eq!(again, first, "the record's answer");
    resolves_on_disk(s.dir.path(), &again);
    until("written again, counted", || {
        http_get(port, "/metrics").contains("intel_gpu_dra_cdi_specs_rewritten 1")
    })
    .await;
    until("the rewrite reported", || {
        !events_with_reason(&s.api, "CdiSpecsRewritten").is_empty()
    })
    .await;

    // A reboot: /var/run/cdi (a tmpfs) comes back empty, the checkpoint
    // (on disk) stays, the boot ID is new and the cards may be numbered
    // anew: nothing is written from the record, the kubelet's prepare is
    // done in full with the devices' current nodes.
    drop(driver);
    std::fs::remove_dir_all(s.dir.path().join("cdi")).unwrap();
    std::fs::write(&boot, "22222222-bbbb-4bbb-8bbb-222222222222\n").unwrap();
    let driver = Driver::start(s.dir.path(), &s.node, &args);
    s.kubelet
        .wait_until(LIMIT, |v| v.registrations_of(DRIVER) == 3)
        .await
        .unwrap();
    assert!(
        !s.dir.path().join("cdi").exists()
            || std::fs::read_dir(s.dir.path().join("cdi")).unwrap().count() == 0,
        "nothing written from the record of another boot"
    );
    let rebooted = s.prepare(&a).await.unwrap();
    assert_eq!(rebooted, first, "the same CDI names");
    resolves_on_disk(s.dir.path(), &rebooted);

    // Killed again, and the checkpoint is found corrupt: rebuilt from the
    // spec, which stays byte for byte; the kubelet settles the rest.
    drop(driver);
    let checkpoint = s
        .dir
        .path()
        .join(format!("plugins/{DRIVER}/prepared-claims.json"));
    std::fs::write(&checkpoint, "{\"version\": 1, \"claims\": {\"").unwrap();
    let spec = std::fs::read(s.spec(&a)).unwrap();
    let _driver = Driver::start(s.dir.path(), &s.node, &args);
    s.kubelet
        .wait_until(LIMIT, |v| v.registrations_of(DRIVER) == 4)
        .await
        .unwrap();
    until("the recovery reported", || {
        !events_with_reason(&s.api, "PreparedClaimsRebuilt").is_empty()
    })
    .await;
    let event = &events_with_reason(&s.api, "PreparedClaimsRebuilt")[0];
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains("1 claim(s) rebuilt") && message.contains(".corrupt"),
        "{message}"
    );
    assert_eq!(event["involvedObject"]["kind"], "Node");
    assert!(http_get(port, "/metrics").contains("intel_gpu_dra_claims_rebuilt 1"));
    assert_eq!(std::fs::read(s.spec(&a)).unwrap(), spec, "never swept");
    let after = s.prepare(&a).await.unwrap();
    assert_eq!(after, first);
    let done = s
        .kubelet
        .unprepare(DRIVER, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(done[&a.uid], Ok(()));
    assert!(!s.spec(&a).exists());
}

/// A hostile node: a link planted at the spec's own name in the shared CDI
/// directory, a claim reference that would steer a path. Each is refused,
/// counted and reported on the Node; the good claim is still served and
/// the planted link's target is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused_counted_and_reported() {
    let mut s = setup(DraApi::V1_34).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _driver = Driver::start(s.dir.path(), &s.node, &["--http-address", addr.as_str()]);
    s.registered().await;
    until("6 devices published", || published(&s.api).len() == 6).await;
    let a = s.claim("a");
    s.api
        .allocate("default", "a", &[bus("0000:8a:00.0")])
        .unwrap();
    let victim = s.dir.path().join("kubelet-state");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::create_dir_all(s.dir.path().join("cdi")).unwrap();
    std::os::unix::fs::symlink(&victim, s.spec(&a)).unwrap();
    let hostile = ClaimId {
        namespace: "default".into(),
        name: "a".into(),
        uid: "x/../../kubelet-state".into(),
    };
    let answers = s
        .kubelet
        .prepare(DRIVER, &[hostile.clone(), a.clone()])
        .await
        .unwrap();
    assert!(answers[&hostile.uid].is_err());
    let ids: Vec<String> = answers[&a.uid]
        .clone()
        .unwrap()
        .into_iter()
        .flat_map(|d| d.cdi_device_ids)
        .collect();
    resolves_on_disk(s.dir.path(), &ids);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(s.spec(&a)).unwrap().is_file());
    for reason in ["PlantedFileRefused", "ClaimReferenceRefused"] {
        until(reason, || !events_with_reason(&s.api, reason).is_empty()).await;
    }
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("intel_gpu_dra_planted_files_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("intel_gpu_dra_claims_refused_total 1"),
        "{metrics}"
    );
}
