//! The binary: flags, exit codes, dry run, oneshot, NFD output, cleanup
//! and the daemon, against fake nodes and the API-server emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use apiserver_emulator::ApiServer;
use fake_gpu_node::{FakeNode, NodeSpec};

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-labeler");
const NODE: &str = "edge-0";

struct Env {
    dir: tempfile::TempDir,
    node: FakeNode,
}

impl Env {
    fn new(spec: &NodeSpec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(&dir.path().join("node"), spec).unwrap();
        Self { dir, node }
    }

    fn plugins_file(&self, content: &str) -> PathBuf {
        let p = self.dir.path().join("enabled_kube_plugins");
        std::fs::write(&p, content).unwrap();
        p
    }

    fn kubeconfig(&self, api: &ApiServer) -> PathBuf {
        let p = self.dir.path().join("kubeconfig");
        std::fs::write(&p, api.kubeconfig()).unwrap();
        p
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--sysfs-root")
            .arg(self.node.sysfs_root())
            .arg("--devfs-root")
            .arg(self.node.devfs_root());
        c.args(["--node-name", NODE, "--http-address", ""]);
        c.env_remove("NODE_NAME");
        c
    }
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn version_help_and_unknown_flags() {
    let out = run(Command::new(BIN).arg("--version"));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("intel-gpu-labeler {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run(Command::new(BIN).arg("--help"));
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("Usage: intel-gpu-labeler")
    );
    for args in [
        &["--no-such-flag"][..],
        &["--removal-grace", "soon"],
        &["--output", "stdout"],
        &["--enabled-plugins-configmap", "nonamespace"],
        &["--allow-ids", "0x56a0", "--deny-ids", "0x56c0"],
        &["--http-address", "nowhere", "--node-name", "n"],
        &["--oneshot"],
    ] {
        let out = run(Command::new(BIN).args(args).env_remove("NODE_NAME"));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn dry_run_prints_the_desired_labels() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let out = run(env
        .cmd()
        .arg("--dry-run")
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert!(out.status.success(), "{}", text(&out));
    let labels: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(labels["intelgpu"], "enabled");
    assert_eq!(labels["gpu.intel.com/gpu-numbers"], "0.2.3.4.5");
    let out = run(env
        .cmd()
        .args(["--dry-run", "--no-discovery-labels"])
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!({"intelgpu": "enabled"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oneshot_applies_and_a_malformed_file_fails_naming_it() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let file = env.plugins_file(r#"["intelgpu"]"#);
    let out = run(env
        .cmd()
        .arg("--oneshot")
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(api.node(NODE).unwrap().labels["intelgpu"], "enabled");

    let bad = env.plugins_file("{\"intel-gpu-plugin\": \"intelgpu=enabled\",\n}");
    let out = run(env
        .cmd()
        .arg("--oneshot")
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "{}: invalid JSON at line 2, column 1",
            bad.display()
        )),
        "{err}"
    );

    // cleanup removes exactly what the labeller owns.
    api.set_label(NODE, "kubelet", "kubernetes.io/os", Some("linux"));
    let out = run(env.cmd().arg("cleanup").arg("--kubeconfig").arg(&kc));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        api.node(NODE).unwrap().labels.keys().collect::<Vec<_>>(),
        ["kubernetes.io/os"]
    );
}

#[test]
fn nfd_feature_file() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let dir = env.dir.path().join("features.d");
    let out = run(env
        .cmd()
        .args(["--oneshot", "--output", "nfd-features-file"])
        .arg("--nfd-features-dir")
        .arg(&dir)
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert!(out.status.success(), "{}", text(&out));
    let content = std::fs::read_to_string(dir.join("intel-gpu-labeler")).unwrap();
    assert!(
        content.lines().any(|l| l == "intelgpu=enabled"),
        "{content}"
    );
    assert!(
        content.lines().any(|l| l == "gpu.intel.com/tiles=5"),
        "{content}"
    );
    // NFD's expiry directive, an hour ahead by default.
    let expiry = content
        .lines()
        .find_map(|l| l.strip_prefix("# +expiry-time="))
        .expect("an expiry time");
    assert!(expiry.ends_with('Z') && expiry.len() == 20, "{expiry}");
}

/// NFD mode reads the Node (where it can) for the opt-out annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfd_mode_honours_the_opt_out() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    api.set_annotation(NODE, "admin", "gpu.intel.com/labeler", Some("disabled"));
    let kc = env.kubeconfig(&api);
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let dir = env.dir.path().join("features.d");
    let out = run(env
        .cmd()
        .args(["--oneshot", "--output", "nfd-features-file"])
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--nfd-features-dir")
        .arg(&dir)
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("opted out"), "{}", text(&out));
    assert!(!dir.join("intel-gpu-labeler").exists());
    // The Node was only read, never written.
    assert!(api.requests().iter().all(|r| r.method == "GET"));
}

fn wait(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has(api: &ApiServer, key: &str) -> bool {
    api.node(NODE).is_some_and(|n| n.labels.contains_key(key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_follows_the_file_and_keeps_labels_on_sigterm() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let mut child = env
        .cmd()
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file)
        .args(["--resync", "1s", "--removal-grace", "0s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let api = std::sync::Arc::new(api);
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || wait("the plugin label", || has(&a, "intelgpu")))
        .await
        .unwrap();
    // Disabled in the file: taken back at once, discovery labels stay.
    let tmp = env.dir.path().join("new");
    std::fs::write(&tmp, r#"{"intel-qat-plugin": "intelqat=enabled"}"#).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || wait("the label removed", || !has(&a, "intelgpu")))
        .await
        .unwrap();
    assert!(has(&api, "gpu.intel.com/tiles"));
    // Deleted Node: not re-created; labels come back with it.
    api.delete_node(NODE);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(api.node(NODE).is_none());
    api.add_node(NODE);
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || {
        wait("labels after the node came back", || {
            has(&a, "gpu.intel.com/tiles")
        })
    })
    .await
    .unwrap();
    // SIGTERM: exit 0, labels stay.
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        has(&api, "gpu.intel.com/tiles"),
        "labels are never removed on shutdown"
    );
}

/// What a reader sees while `cat > file` writes: an empty file. It is no
/// decision, so the plugin label stays; a real "not enabled" is read twice,
/// `--settle` apart, before the label goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_file_is_no_decision_and_disabled_is_confirmed() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let oneshot = |file: &PathBuf, settle: &str| {
        run(env
            .cmd()
            .arg("--oneshot")
            .arg("--kubeconfig")
            .arg(&kc)
            .arg("--enabled-plugins-file")
            .arg(file)
            .args(["--settle", settle]))
    };
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let out = oneshot(&file, "2s");
    assert!(out.status.success(), "{}", text(&out));
    assert!(has(&api, "intelgpu"));
    for blank in ["", "\n", "   \t\n"] {
        std::fs::write(&file, blank).unwrap();
        let out = oneshot(&file, "2s");
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            has(&api, "intelgpu"),
            "a blank file {blank:?} evicted the plugin"
        );
    }
    // Really not enabled: confirmed by a second read, then removed.
    std::fs::write(&file, r#"{"intel-qat-plugin": "intelqat=enabled"}"#).unwrap();
    let started = Instant::now();
    let out = oneshot(&file, "300ms");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not confirmed"
    );
    assert!(!has(&api, "intelgpu"));
}
