//! The RBAC of the rendered manifests grants the labeller and the
//! publisher exactly what they call: every API request of a run is allowed
//! (in the namespace it went to, for the names it named), and every verb
//! granted was needed by some request.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use apiserver_emulator::rbac::{Access, Grants};
use apiserver_emulator::{ApiServer, Seen};
use fake_gpu_node::{FakeNode, NodeSpec};

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-labeler");
const NODE: &str = "edge-0";

/// `deploy/<dir>` rendered by `kubectl kustomize`.
fn render(dir: &str) -> String {
    test_support::render_deploy(dir)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Both ways: nothing called that is not granted, nothing granted that was
/// not called.
fn assert_exact(grants: &Grants, requests: &[Seen]) {
    let used: Vec<Access> = requests.iter().flat_map(Seen::accesses).collect();
    let denied = grants.denied(&used);
    assert!(denied.is_empty(), "called but not granted: {denied:#?}");
    let unused = grants.unused(&used);
    assert!(unused.is_empty(), "granted but never called: {unused:#?}");
}

fn kubeconfig(dir: &Path, api: &ApiServer) -> PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(&p, api.kubeconfig()).unwrap();
    p
}

/// The labeller of `deploy/base` (namespace `intel-gpu`): it reads and
/// follows its ConfigMap and Node, applies labels, and records a conflict
/// Event (in `default`) and counts it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_exactly_what_the_labeller_uses() {
    let grants =
        Grants::of_service_account(&render("base"), "intel-gpu", "intel-gpu-labeler").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::starlingx_edge()).unwrap();
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    api.set_label(NODE, "kubectl", "intelgpu", Some("manual"));
    api.set_configmap(
        "intel-gpu",
        "enabled-kube-plugins",
        &[("enabled_kube_plugins", r#"["intelgpu"]"#)],
    );
    let kc = kubeconfig(dir.path(), &api);
    let cmd = || {
        let mut c = Command::new(BIN);
        c.arg("--sysfs-root")
            .arg(node.sysfs_root())
            .arg("--devfs-root")
            .arg(node.devfs_root())
            .args(["--node-name", NODE, "--http-address", ""])
            .arg("--kubeconfig")
            .arg(&kc)
            .args([
                "--enabled-plugins-configmap",
                "intel-gpu/enabled-kube-plugins",
            ])
            .env_remove("NODE_NAME");
        c
    };
    // Two runs: the second meets the conflict again (the Event counted up).
    for _ in 0..2 {
        let out = cmd().arg("--oneshot").output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    // A GPU gone: a write (and the conflict) again.
    node.remove_gpu(0).unwrap();
    let out = cmd().arg("--oneshot").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The daemon follows the Node and the ConfigMap (list, watch).
    let mut daemon = cmd()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let watching = |res: &str| {
        api.requests()
            .iter()
            .flat_map(Seen::accesses)
            .any(|a| a.verb == "watch" && a.resource == res)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(watching("nodes") && watching("configmaps")) {
        assert!(
            Instant::now() < deadline,
            "no watches: {:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        !api.events().is_empty(),
        "the run recorded no Event: the test would not see Events' verbs"
    );
    assert_exact(&grants, &api.requests());
}

/// The publisher of `deploy/overlays/starlingx` (namespace `kube-system`):
/// it applies the one ConfigMap, creating it the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_exactly_what_the_publisher_uses() {
    let grants = Grants::of_service_account(
        &render("overlays/starlingx"),
        "kube-system",
        "intel-gpu-plugins-publisher",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = ApiServer::start().await.unwrap();
    let kc = kubeconfig(dir.path(), &api);
    let host = dir.path().join("controller");
    std::fs::create_dir_all(host.join("etc")).unwrap();
    std::fs::write(host.join("etc/build.info"), "SW_VERSION=\"24.09\"\n").unwrap();
    let file = host.join("opt/platform/config/24.09/enabled_kube_plugins");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#).unwrap();
    // Twice: created, then applied again unchanged (both controllers).
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args([
                "publish",
                "--configmap",
                "kube-system/enabled-kube-plugins",
                "--oneshot",
                "--settle",
                "50ms",
                "--http-address",
                "",
            ])
            .arg("--host-root")
            .arg(&host)
            .arg("--kubeconfig")
            .arg(&kc)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(
        api.configmap("kube-system", "enabled-kube-plugins")
            .is_some()
    );
    assert_exact(&grants, &api.requests());
}

/// The labeller of `deploy/overlays/nfd`: it writes a features file, so it
/// only reads its Node (the opt-out annotation) and its ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_exactly_what_the_nfd_labeller_uses() {
    let grants =
        Grants::of_service_account(&render("overlays/nfd"), "intel-gpu", "intel-gpu-labeler")
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::starlingx_edge()).unwrap();
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    api.set_configmap(
        "intel-gpu",
        "enabled-kube-plugins",
        &[("enabled_kube_plugins", r#"["intelgpu"]"#)],
    );
    let kc = kubeconfig(dir.path(), &api);
    let features = dir.path().join("features.d");
    let cmd = || {
        let mut c = Command::new(BIN);
        c.arg("--sysfs-root")
            .arg(node.sysfs_root())
            .arg("--devfs-root")
            .arg(node.devfs_root())
            .args(["--node-name", NODE, "--http-address", ""])
            .arg("--kubeconfig")
            .arg(&kc)
            .args([
                "--enabled-plugins-configmap",
                "intel-gpu/enabled-kube-plugins",
                "--output",
                "nfd-features-file",
            ])
            .arg("--nfd-features-dir")
            .arg(&features)
            .env_remove("NODE_NAME");
        c
    };
    let out = cmd().arg("--oneshot").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(features.join("intel-gpu-labeler").exists());
    // The daemon reads them again each round (no watch in this mode).
    let before = api.requests().len();
    let mut daemon = cmd()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.requests().len() < before + 2 {
        assert!(Instant::now() < deadline, "the daemon asked nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_exact(&grants, &api.requests());
}
