//! Labeller figures, the release binary against a fake node and the
//! API-server emulator:
//! - `labeler.oneshot_ms`: process start → labels applied (p50 of 10 runs);
//! - `labeler.rss_kib`: resident memory of the daemon, steady;
//! - `labeler.idle_requests_per_hour`: requests the daemon sends to the API
//!   server while nothing changes (watching its Node and the ConfigMap, the
//!   default 60 s resync), counted over `LABELER_IDLE_SECONDS` (default
//!   330: more than one of kube-runtime's 290 s watch periods) and scaled
//!   to an hour.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apiserver_emulator::ApiServer;
use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, NodeSpec};

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-labeler");

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut report = Report::new("intel_gpu_labeler");
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::starlingx_edge()).unwrap();
    let file = dir.path().join("enabled_kube_plugins");
    std::fs::write(&file, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#).unwrap();
    let api = ApiServer::start().await.unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    let cmd = || {
        let mut c = Command::new(BIN);
        c.arg("--sysfs-root")
            .arg(node.sysfs_root())
            .arg("--devfs-root")
            .arg(node.devfs_root());
        c.arg("--kubeconfig")
            .arg(&kc)
            .arg("--enabled-plugins-file")
            .arg(&file);
        c.args([
            "--node-name",
            "edge-0",
            "--http-address",
            "",
            "--log-level",
            "warn",
        ]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let mut samples = Samples::new();
    for _ in 0..10 {
        api.delete_node("edge-0");
        api.add_node("edge-0");
        let start = Instant::now();
        let status = tokio::task::spawn_blocking({
            let mut c = cmd();
            move || c.arg("--oneshot").status().unwrap()
        })
        .await
        .unwrap();
        samples.push(start.elapsed());
        assert!(status.success());
        assert!(api.node("edge-0").unwrap().labels.contains_key("intelgpu"));
    }
    report.metric(
        "labeler.oneshot_ms",
        samples.percentile_ms(50.0).unwrap_or(f64::NAN),
    );

    let mut daemon = cmd().spawn().unwrap();
    api.wait_node("edge-0", Duration::from_secs(10), |n| {
        n.is_some_and(|n| n.labels.contains_key("intelgpu"))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap();
    let rss: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    report.metric("labeler.rss_kib", rss);
    let _ = daemon.kill();
    let _ = daemon.wait();

    // Idle API load of a DaemonSet labeller: file and ConfigMap sources,
    // watches on both.
    api.set_configmap(
        "intel-gpu",
        "enabled-kube-plugins",
        &[(
            "enabled_kube_plugins",
            r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#,
        )],
    );
    let mut daemon = cmd()
        .args([
            "--enabled-plugins-configmap",
            "intel-gpu/enabled-kube-plugins",
        ])
        .spawn()
        .unwrap();
    api.wait_node("edge-0", Duration::from_secs(10), |n| {
        n.is_some_and(|n| n.labels.contains_key("intelgpu"))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window: u64 = std::env::var("LABELER_IDLE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(330);
    let before = api.requests().len();
    tokio::time::sleep(Duration::from_secs(window)).await;
    let sent = api.requests().len() - before;
    report.metric(
        "labeler.idle_requests_per_hour",
        sent as f64 * 3600.0 / window as f64,
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    report.finish().unwrap();
}
