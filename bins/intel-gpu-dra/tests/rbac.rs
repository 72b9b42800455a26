//! The DRA overlay's RBAC grants the driver exactly what it calls: every
//! API request of a run that publishes its slices (replacing a stale one),
//! probes the cluster, prepares a claim and reports a known kubelet defect
//! on its Node (twice: the Event counted up) is allowed, and every verb
//! granted was needed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;

use std::time::Duration;
use test_support::ChildGuard;

use apiserver_emulator::rbac::{Access, Grants};
use apiserver_emulator::{ApiServer, DeviceRequest, DraApi};
use fake_gpu_node::{FakeNode, NodeSpec};
use kubelet_emulator::{ClaimId, KubeletVersion, PluginWatcher};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-dra");
const NODE: &str = "edge-0";
const DRIVER: &str = "gpu.intel.com";
const LIMIT: Duration = Duration::from_secs(15);
const STALE: &str = "edge-0-gpu.intel.com-7";

/// `deploy/<dir>` rendered by `kubectl kustomize` (the machine image has
/// kubectl; CI's manifest step needs it too).
fn render(dir: &str) -> String {
    test_support::render_deploy(dir)
}

async fn until(what: &str, f: impl FnMut() -> bool) {
    test_support::until(what, LIMIT, f).await;
}

/// A slice of an earlier run of this node's driver, which the driver must
/// delete (written by the test before the driver starts).
async fn stale_slice(api: &ApiServer) {
    use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&api.kubeconfig()).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let slices: kube::Api<DynamicObject> = kube::Api::all_with(
        client,
        &ApiResource {
            group: "resource.k8s.io".into(),
            version: "v1".into(),
            api_version: "resource.k8s.io/v1".into(),
            kind: "ResourceSlice".into(),
            plural: "resourceslices".into(),
        },
    );
    let body = json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": STALE},
        "spec": {
            "driver": DRIVER,
            "nodeName": NODE,
            "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 8},
            "devices": [],
        },
    });
    slices
        .patch(STALE, &PatchParams::apply(DRIVER), &Patch::Apply(&body))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_exactly_what_the_dra_driver_uses() {
    let grants = Grants::of_service_account(&render("overlays/dra"), "intel-gpu", "intel-gpu-dra")
        .unwrap()
        .in_any_namespace("resourceclaims");
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(
        &dir.path().join("node"),
        &NodeSpec::starlingx_edge_with_arc(),
    )
    .unwrap();
    let api = ApiServer::start().await.unwrap();
    api.set_dra(DraApi::V1_34);
    api.add_node(NODE);
    // A kubelet with a known DRA defect: the driver records an Event.
    api.set_kubelet_version(NODE, "v1.34.1");
    stale_slice(&api).await;
    let before = api.requests().len();
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    let kubelet =
        PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_34).unwrap();
    let start = || {
        ChildGuard::spawn(
            Command::new(BIN)
                .args([
                    "--node-name",
                    NODE,
                    "--http-address",
                    "none",
                    "--kubeconfig",
                ])
                .arg(dir.path().join("kubeconfig"))
                .arg("--sysfs-root")
                .arg(node.sysfs_root())
                .arg("--devfs-root")
                .arg(node.devfs_root())
                .arg("--registry-dir")
                .arg(dir.path().join("plugins_registry"))
                .arg("--plugin-dir")
                .arg(dir.path().join("plugins").join(DRIVER))
                .arg("--cdi-dir")
                .arg(dir.path().join("cdi"))
                .arg("--owner-lock")
                .arg(dir.path().join("owner.lock")),
        )
    };
    let driver = start();
    kubelet
        .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
        .await
        .unwrap();
    until("the stale slice replaced by the driver's", || {
        let slices = api.resource_slices();
        !slices.contains_key(STALE) && !slices.is_empty()
    })
    .await;
    // A claim prepared: the driver reads it.
    let uid = api.create_resource_claim("default", "a", json!({}));
    api.allocate(
        "default",
        "a",
        &[DeviceRequest::new("gpu", DRIVER).attribute(
            "resource.kubernetes.io/pciBusID",
            json!({"string": "0000:8a:00.0"}),
        )],
    )
    .unwrap();
    let claim = ClaimId {
        namespace: "default".into(),
        name: "a".into(),
        uid: uid.clone(),
    };
    let answers = kubelet
        .prepare(DRIVER, std::slice::from_ref(&claim))
        .await
        .unwrap();
    assert!(answers[&uid].is_ok(), "{answers:?}");
    // The kubelet's known defect is reported on the Node; restarted, the
    // driver reports it again: the same Event, counted up.
    let counted = |n: u64| {
        api.events()
            .iter()
            .any(|e| e["reason"] == "KubeletDraIdleConnection" && e["count"] == n)
    };
    until("the kubelet's defect reported", || counted(1)).await;
    drop(driver);
    let _driver = start();
    kubelet
        .wait_until(LIMIT, |v| v.registrations_of(DRIVER) == 2)
        .await
        .unwrap();
    until("the Event counted up", || counted(2)).await;

    let used: Vec<Access> = api.requests()[before..]
        .iter()
        .flat_map(apiserver_emulator::Seen::accesses)
        .collect();
    let denied = grants.denied(&used);
    assert!(denied.is_empty(), "called but not granted: {denied:#?}");
    let unused = grants.unused(&used);
    assert!(unused.is_empty(), "granted but never called: {unused:#?}");
}
