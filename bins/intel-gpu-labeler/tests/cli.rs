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
        &["--field-manager", ""],
    ] {
        let out = run(Command::new(BIN).args(args).env_remove("NODE_NAME"));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // No node name and no credentials to learn it from: one line, exit 1.
    let out = run(Command::new(BIN)
        .arg("--oneshot")
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("kubeconfig"), "{err}");
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
    test_support::wait_blocking(what, Duration::from_secs(20), f);
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

// RBAC against the calls made: tests/rbac.rs.

/// Host mode: the node name comes from the kubelet's own credentials
/// (`system:node:<name>`), not from a flag or `%l`; credentials that are
/// not a node's are refused with a clear line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_name_comes_from_a_kubelets_credentials() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    let fqdn = "edge-0.example.org";
    api.add_node(fqdn);
    api.set_identity(&format!("system:node:{fqdn}"));
    let kc = env.kubeconfig(&api);
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let mut cmd = Command::new(BIN);
    cmd.arg("--sysfs-root")
        .arg(env.node.sysfs_root())
        .arg("--devfs-root")
        .arg(env.node.devfs_root())
        .args(["--oneshot", "--http-address", ""])
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file)
        .env_remove("NODE_NAME");
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(api.node(fqdn).unwrap().labels["intelgpu"], "enabled");
    api.set_identity("system:serviceaccount:default:someone");
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not a node's"), "{}", text(&out));
}

/// A DaemonSet labeller and a host-mode one on one node use separate field
/// managers: they never co-own (and flip) the same fields; where they
/// disagree the second leaves the first's value and reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_labellers_on_one_node_do_not_fight() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let on = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let run_as = |manager: &str, file: &PathBuf| {
        run(env
            .cmd()
            .arg("--oneshot")
            .arg("--kubeconfig")
            .arg(&kc)
            .arg("--enabled-plugins-file")
            .arg(file)
            .args(["--field-manager", manager]))
    };
    assert!(run_as("intel-gpu-labeler", &on).status.success());
    let other = env.dir.path().join("other");
    std::fs::write(&other, r#"{"intel-gpu-plugin": "intelgpu=yes"}"#).unwrap();
    let out = run_as("intel-gpu-labeler-host", &other);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 conflicts"), "{}", text(&out));
    let node = api.node(NODE).unwrap();
    assert_eq!(
        node.labels["intelgpu"], "enabled",
        "the first owner's value stays"
    );
    let managers: Vec<&str> = node.managers.iter().map(|m| m.name.as_str()).collect();
    assert!(
        managers.contains(&"intel-gpu-labeler") && managers.contains(&"intel-gpu-labeler-host"),
        "{managers:?}"
    );
}

/// The kubelet rotates its client credentials: the daemon notices the new
/// files and builds a new client, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_credentials_are_picked_up() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let token = env.dir.path().join("token");
    std::fs::write(&token, "one").unwrap();
    let kc = env.dir.path().join("kubeconfig");
    let base = api.kubeconfig();
    // The emulator's kubeconfig with a token file instead of a token.
    let with_file = base
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("token:") {
                format!("    tokenFile: {}", token.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(with_file.contains("tokenFile"), "{base}");
    std::fs::write(&kc, with_file).unwrap();
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let child = env
        .cmd()
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file)
        .args(["--resync", "200ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let a = std::sync::Arc::new(api);
    let w = std::sync::Arc::clone(&a);
    tokio::task::spawn_blocking(move || wait("labels", || has(&w, "intelgpu")))
        .await
        .unwrap();
    // Rotation: a new file, a later modification time.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&token, "two").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("credentials changed on disk"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "logs to a pipe carry no colour codes: {log}"
    );
}

/// The systemd unit: `systemd-analyze verify` accepts it, it pulls in no
/// kubelet, tolerates missing paths and names no node by `%l`.
#[test]
fn the_systemd_unit_verifies_and_starts_anywhere() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/systemd/intel-gpu-labeler.service"),
    )
    .unwrap();
    assert!(
        !unit.lines().any(|l| l.starts_with("Wants=")),
        "no Wants=kubelet.service"
    );
    assert!(
        !unit.contains("%l"),
        "the node name comes from the credentials"
    );
    let ro = unit
        .lines()
        .find(|l| l.starts_with("ReadOnlyPaths="))
        .unwrap();
    assert!(
        ro["ReadOnlyPaths=".len()..]
            .split_whitespace()
            .all(|p| p.starts_with('-')),
        "{ro}"
    );
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if probe.is_err() {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("intel-gpu-labeler.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/intel-gpu-labeler", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("Unknown key") && !said.contains("Failed"),
        "{said}"
    );
}

fn http_status(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().next().map(str::to_owned)
}

/// Watches, not polls: with a one-hour resync, only the watch can explain
/// a label put back within a second, an opt-out respected at once, and a
/// missing Node noticed and reported once (not ready meanwhile). Dropped
/// watch connections resume; a compacted history relists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_follows_the_node_by_watch() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = std::sync::Arc::new(ApiServer::start().await.unwrap());
    api.add_node(NODE);
    api.bookmark_every(Duration::from_millis(200));
    let kc = env.kubeconfig(&api);
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = env.cmd();
    cmd.arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file)
        .args([
            "--resync",
            "1h",
            "--http-address",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("E2E_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::piped()
        });
    let child = cmd.spawn().unwrap();
    let within = |what: &'static str, limit: Duration, f: Box<dyn Fn() -> bool + Send>| async move {
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + limit;
            while !f() {
                assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await
        .unwrap();
    };
    let a = std::sync::Arc::clone(&api);
    within(
        "labels",
        Duration::from_secs(10),
        Box::new(move || has(&a, "intelgpu")),
    )
    .await;
    // A label removed by hand comes back within a second.
    for round in 0..3 {
        if round == 1 {
            api.drop_watches();
        }
        if round == 2 {
            api.compact();
            api.drop_watches();
        }
        api.set_label(NODE, "kubectl", "gpu.intel.com/tiles", None);
        let a = std::sync::Arc::clone(&api);
        within(
            "the label put back",
            Duration::from_secs(1),
            Box::new(move || has(&a, "gpu.intel.com/tiles")),
        )
        .await;
    }
    // The opt-out is respected at once: a label removed then stays removed.
    api.set_annotation(NODE, "admin", "gpu.intel.com/labeler", Some("disabled"));
    std::thread::sleep(Duration::from_millis(200));
    api.set_label(NODE, "kubectl", "gpu.intel.com/tiles", None);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !has(&api, "gpu.intel.com/tiles"),
        "an opted-out Node was touched"
    );
    api.set_annotation(NODE, "admin", "gpu.intel.com/labeler", None);
    let a = std::sync::Arc::clone(&api);
    within(
        "back after the opt-out",
        Duration::from_secs(1),
        Box::new(move || has(&a, "gpu.intel.com/tiles")),
    )
    .await;
    // The Node goes: not ready, said once, never re-created; it comes back.
    api.delete_node(NODE);
    within(
        "not ready",
        Duration::from_secs(2),
        Box::new(move || http_status(port, "/readyz").is_some_and(|s| s.contains("503"))),
    )
    .await;
    std::thread::sleep(Duration::from_millis(500));
    assert!(api.node(NODE).is_none());
    api.add_node(NODE);
    let a = std::sync::Arc::clone(&api);
    within(
        "labels on the new Node",
        Duration::from_secs(2),
        Box::new(move || has(&a, "intelgpu")),
    )
    .await;
    within(
        "ready",
        Duration::from_secs(2),
        Box::new(move || http_status(port, "/readyz").is_some_and(|s| s.contains("200"))),
    )
    .await;
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("the Node does not exist").count(), 1, "{log}");
    // Idle: no polling GETs of the Node while nothing changed.
    let gets = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.target.starts_with(&format!("/api/v1/nodes/{NODE}")))
        .count();
    assert!(gets <= 2, "{gets} Node GETs: the daemon polls");
}

/// On a StarlingX controller the replicated file
/// (`/opt/platform/config/<SW_VERSION>/enabled_kube_plugins`, the release
/// read from `/etc/build.info` as StarlingX does) is published byte for byte
/// as the cluster's ConfigMap; a worker with no file decides from that.
/// Nothing is published from a blank file, and a second controller
/// publishing the same bytes changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_publish_the_replicated_file_for_every_node() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let host = env.dir.path().join("controller");
    std::fs::create_dir_all(host.join("etc")).unwrap();
    std::fs::write(
        host.join("etc/build.info"),
        "OS=\"debian\"\nSW_VERSION=\"24.09\"\n",
    )
    .unwrap();
    let replicated = host.join("opt/platform/config/24.09/enabled_kube_plugins");
    std::fs::create_dir_all(replicated.parent().unwrap()).unwrap();
    let bytes = r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#;
    let publish = || {
        run(Command::new(BIN)
            .args([
                "publish",
                "--configmap",
                "intel-gpu/enabled-kube-plugins",
                "--oneshot",
                "--settle",
                "100ms",
            ])
            .arg("--host-root")
            .arg(&host)
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--http-address", ""]))
    };
    std::fs::write(&replicated, "").unwrap();
    let out = publish();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("blank"), "{}", text(&out));
    assert!(
        api.requests().iter().all(|r| r.method != "PATCH"),
        "nothing published from a blank file"
    );
    std::fs::write(&replicated, bytes).unwrap();
    let out = publish();
    assert!(out.status.success(), "{}", text(&out));
    let (data, rv) = api.configmap("intel-gpu", "enabled-kube-plugins").unwrap();
    assert_eq!(data["enabled_kube_plugins"], bytes, "the exact bytes");
    // The other controller publishes the same bytes: accepted, no change.
    let out = publish();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        api.configmap("intel-gpu", "enabled-kube-plugins")
            .unwrap()
            .1,
        rv,
        "no flapping"
    );
    // A worker (no file) decides from the ConfigMap.
    let out = run(env
        .cmd()
        .arg("--oneshot")
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--host-root")
        .arg(env.dir.path().join("worker"))
        .args([
            "--enabled-plugins-configmap",
            "intel-gpu/enabled-kube-plugins",
        ]));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(api.node(NODE).unwrap().labels["intelgpu"], "enabled");
}

/// A passing API error does not end the publisher: it retries with backoff
/// and publishes the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_outlives_api_errors() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    let kc = env.kubeconfig(&api);
    let host = env.dir.path().join("controller");
    std::fs::create_dir_all(host.join("etc")).unwrap();
    std::fs::write(host.join("etc/build.info"), "SW_VERSION=\"24.09\"\n").unwrap();
    let replicated = host.join("opt/platform/config/24.09/enabled_kube_plugins");
    std::fs::create_dir_all(replicated.parent().unwrap()).unwrap();
    let bytes = r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#;
    std::fs::write(&replicated, bytes).unwrap();
    api.inject(&[
        apiserver_emulator::Fault::Unavailable,
        apiserver_emulator::Fault::Internal,
    ]);
    let mut child = Command::new(BIN)
        .args([
            "publish",
            "--configmap",
            "intel-gpu/enabled-kube-plugins",
            "--settle",
            "100ms",
            "--http-address",
            "",
        ])
        .arg("--host-root")
        .arg(&host)
        .arg("--kubeconfig")
        .arg(&kc)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while api.configmap("intel-gpu", "enabled-kube-plugins").is_none() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the publisher exited on an API error"
        );
        assert!(std::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (data, _) = api.configmap("intel-gpu", "enabled-kube-plugins").unwrap();
    assert_eq!(data["enabled_kube_plugins"], bytes);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("retrying"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The publisher has the labeller's liveness: /healthz fails while a
/// publication hangs and comes back once it goes through; waiting quietly
/// for the file to change is not being stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishers_healthz_fails_while_a_publication_hangs() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = std::sync::Arc::new(ApiServer::start().await.unwrap());
    let kc = env.kubeconfig(&api);
    let host = env.dir.path().join("controller");
    std::fs::create_dir_all(host.join("etc")).unwrap();
    std::fs::write(host.join("etc/build.info"), "SW_VERSION=\"24.09\"\n").unwrap();
    let replicated = host.join("opt/platform/config/24.09/enabled_kube_plugins");
    std::fs::create_dir_all(replicated.parent().unwrap()).unwrap();
    std::fs::write(&replicated, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#).unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "publish",
            "--configmap",
            "intel-gpu/enabled-kube-plugins",
            "--settle",
            "100ms",
            "--resync",
            "1h",
            "--stall-limit",
            "1s",
            "--http-address",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--host-root")
        .arg(&host)
        .arg("--kubeconfig")
        .arg(&kc)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || {
        wait("published", || {
            a.configmap("intel-gpu", "enabled-kube-plugins").is_some()
        });
        wait("/healthz and /readyz up", || {
            http_status(port, "/healthz").is_some_and(|s| s.contains("200"))
                && http_status(port, "/readyz").is_some_and(|s| s.contains("200"))
        });
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = http_status(port, "/healthz").unwrap();
    assert!(status.contains("200"), "idle is not stuck: {status}");
    // The next publication is held for 4 s.
    api.inject(&[apiserver_emulator::Fault::Slow(Duration::from_secs(4))]);
    std::fs::write(
        &replicated,
        r#"{"intel-gpu-plugin": "intelgpu=enabled", "x": "y=z"}"#,
    )
    .unwrap();
    let body = tokio::task::spawn_blocking(move || healthz_failing(port))
        .await
        .unwrap();
    assert!(body.contains("no progress"), "{body}");
    tokio::task::spawn_blocking(move || {
        wait("/healthz back", || {
            http_status(port, "/healthz").is_some_and(|s| s.contains("200"))
        });
    })
    .await
    .unwrap();
    let metrics = http_body(port, "/metrics").unwrap();
    assert!(
        metrics.contains("intel_gpu_labeler_writes_total 2"),
        "{metrics}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits (10 s at most) for `/healthz` to answer 503, and returns the
/// answer.
fn healthz_failing(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(out) = http_body(port, "/healthz")
            && out.starts_with("HTTP/1.1 503")
        {
            return out;
        }
        assert!(Instant::now() < deadline, "/healthz never failed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_body(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Issue 25, end to end: a ConfigMap naming `kubernetes.io/hostname=evil`
/// as the GPU plugin's label sets nothing of the kind; the daemon logs
/// one line naming the key and the ConfigMap, raises a `LabelRefused`
/// Event on the Node and counts it in `/metrics`, and the discovery
/// labels and the plugin label it owned stay. An allowed prefix is
/// applied; Kubernetes' own cannot be allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_configmap_cannot_set_the_hostname_label() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = std::sync::Arc::new(ApiServer::start().await.unwrap());
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let set = |content: &str| {
        api.set_configmap(
            "kube-system",
            "enabled-kube-plugins",
            &[("enabled_kube_plugins", content)],
        );
    };
    set(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let port = free_port();
    let child = env
        .cmd()
        .arg("--kubeconfig")
        .arg(&kc)
        .args([
            "--enabled-plugins-configmap",
            "kube-system/enabled-kube-plugins",
            "--allowed-label-prefix",
            "example.com",
            "--http-address",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || wait("the plugin label", || has(&a, "intelgpu")))
        .await
        .unwrap();
    set(r#"{"intel-gpu-plugin": "kubernetes.io/hostname=evil"}"#);
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || {
        wait("the LabelRefused Event", || {
            a.events().iter().any(|e| {
                e["reason"] == "LabelRefused"
                    && e["message"].as_str().is_some_and(|m| {
                        m.contains("kubernetes.io/hostname")
                            && m.contains("configmap kube-system/enabled-kube-plugins")
                    })
            })
        });
        wait("the metric", || {
            http_body(port, "/metrics").is_some_and(|m| {
                m.contains("intel_gpu_labeler_refused_labels_total 1")
                    && m.contains("intel_gpu_labeler_refused_labels 1")
            })
        });
    })
    .await
    .unwrap();
    let node = api.node(NODE).unwrap();
    assert!(
        !node.labels.contains_key("kubernetes.io/hostname"),
        "{:?}",
        node.labels
    );
    assert_eq!(node.labels["intelgpu"], "enabled", "the owned label stays");
    assert!(node.labels.contains_key("gpu.intel.com/tiles"));
    // An allowed prefix: applied, and the refusal is over.
    set(r#"{"intel-gpu-plugin": "example.com/gpu=enabled"}"#);
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || {
        wait("the allowed label", || has(&a, "example.com/gpu"));
        wait("the gauge back to 0", || {
            http_body(port, "/metrics")
                .is_some_and(|m| m.contains("intel_gpu_labeler_refused_labels 0"))
        });
    })
    .await
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("is refused")).collect();
    assert_eq!(
        lines.len(),
        1,
        "one line per refusal, not per resync: {log}"
    );
    assert!(
        lines[0].contains("kubernetes.io/hostname")
            && lines[0].contains("configmap kube-system/enabled-kube-plugins"),
        "{log}"
    );
    // Kubernetes' own prefixes cannot be allowed: a usage error.
    for prefix in [
        "kubernetes.io",
        "node-role.kubernetes.io",
        "k8s.io",
        "Bad_Prefix",
    ] {
        let out = run(env
            .cmd()
            .args(["--allowed-label-prefix", prefix, "--dry-run"]));
        assert_eq!(out.status.code(), Some(2), "{prefix}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(prefix), "{err}");
    }
}

/// A hostile file, in `--oneshot` and `--dry-run`: refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_file_cannot_set_system_labels() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let file =
        env.plugins_file(r#"{"intel-gpu-plugin": "node-role.kubernetes.io/control-plane="}"#);
    let out = run(env
        .cmd()
        .arg("--dry-run")
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert!(out.status.success(), "{}", text(&out));
    let labels: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        labels
            .get("node-role.kubernetes.io/control-plane")
            .is_none(),
        "{labels}"
    );
    assert!(text(&out).contains("is refused"), "{}", text(&out));
    let out = run(env
        .cmd()
        .arg("--oneshot")
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file));
    assert!(out.status.success(), "{}", text(&out));
    let node = api.node(NODE).unwrap();
    assert!(
        !node
            .labels
            .contains_key("node-role.kubernetes.io/control-plane"),
        "{:?}",
        node.labels
    );
    assert!(node.labels.contains_key("gpu.intel.com/tiles"));
    let log = text(&out);
    assert!(
        log.contains("node-role.kubernetes.io/control-plane")
            && log.contains(&*file.to_string_lossy()),
        "{log}"
    );
    assert!(
        api.events().iter().any(|e| e["reason"] == "LabelRefused"),
        "{:?}",
        api.events()
    );
}

/// Every flag `--help` lists is in docs/labeler.md.
#[test]
fn every_flag_is_documented() {
    let help = run(Command::new(BIN).arg("--help"));
    let help = String::from_utf8_lossy(&help.stdout);
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/labeler.md"),
    )
    .unwrap();
    let missing: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|f| !["--help", "--version"].contains(f))
        .filter(|f| !docs.contains(&format!("`{f}")))
        .collect();
    assert!(missing.is_empty(), "not in docs/labeler.md: {missing:?}");
}

/// Issue 25, point 6: `SW_VERSION` becomes a path component, so a
/// build.info whose release is not one (`../..`), or that is a FIFO, is a
/// clear error naming the file — not a path outside
/// /opt/platform/config, not a hang.
#[test]
fn a_bad_build_info_is_refused_naming_it() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let root = env.dir.path().join("host");
    let info = root.join("etc/build.info");
    std::fs::create_dir_all(info.parent().unwrap()).unwrap();
    // What the old code did with it: read
    // /opt/platform/config/../../../tmp/x/enabled_kube_plugins.
    let outside = root.join("tmp/x");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("enabled_kube_plugins"),
        r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#,
    )
    .unwrap();
    std::fs::write(&info, "SW_VERSION=\"../../../tmp/x\"\n").unwrap();
    let dry = |c: &mut Command| {
        let mut child = c
            .arg("--dry-run")
            .arg("--host-root")
            .arg(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the labeller blocked reading build.info");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let out = dry(&mut env.cmd());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&*info.to_string_lossy()) && err.contains("not a release"),
        "{err}"
    );
    std::fs::remove_file(&info).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&info)
            .status()
            .unwrap()
            .success()
    );
    let out = dry(&mut env.cmd());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&*info.to_string_lossy()) && err.contains("not a regular file"),
        "{err}"
    );
    // A good release: the replicated location is read.
    std::fs::remove_file(&info).unwrap();
    std::fs::write(&info, "SW_VERSION=\"24.09\"\n").unwrap();
    let replicated = root.join("opt/platform/config/24.09");
    std::fs::create_dir_all(&replicated).unwrap();
    std::fs::write(
        replicated.join("enabled_kube_plugins"),
        r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#,
    )
    .unwrap();
    let out = dry(&mut env.cmd());
    assert!(out.status.success(), "{}", text(&out));
    let labels: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(labels["intelgpu"], "enabled");
}

/// Issue 25, point 7: the labeller's `/healthz` fails while its loop is
/// stuck in a round (here a write the API server holds for 4 s, past a
/// 1 s `--stall-limit`), and only then: waiting idle for longer than the
/// limit is not being stuck. It comes back once the round ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_the_loop_is_stuck() {
    let env = Env::new(&NodeSpec::starlingx_edge());
    let api = std::sync::Arc::new(ApiServer::start().await.unwrap());
    api.add_node(NODE);
    let kc = env.kubeconfig(&api);
    let file = env.plugins_file(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let port = free_port();
    let mut child = env
        .cmd()
        .arg("--kubeconfig")
        .arg(&kc)
        .arg("--enabled-plugins-file")
        .arg(&file)
        .args([
            "--resync",
            "1h",
            "--stall-limit",
            "1s",
            "--http-address",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || {
        wait("the plugin label", || has(&a, "intelgpu"));
        wait("/healthz up", || {
            http_status(port, "/healthz").is_some_and(|s| s.contains("200"))
        });
    })
    .await
    .unwrap();
    // Idle for twice the limit: still alive.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = http_status(port, "/healthz").unwrap();
    assert!(status.contains("200"), "idle is not stuck: {status}");
    // A round that hangs: the next request (the write putting back a label
    // removed by hand) is held for 4 s.
    api.inject(&[apiserver_emulator::Fault::Slow(Duration::from_secs(4))]);
    api.set_label(NODE, "kubectl", "gpu.intel.com/tiles", None);
    let started = Instant::now();
    let body = tokio::task::spawn_blocking(move || healthz_failing(port))
        .await
        .unwrap();
    assert!(body.contains("no progress"), "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "failed too early"
    );
    // The write goes through; the loop beats again.
    let a = std::sync::Arc::clone(&api);
    tokio::task::spawn_blocking(move || {
        wait("the label back", || has(&a, "gpu.intel.com/tiles"));
        wait("/healthz back", || {
            http_status(port, "/healthz").is_some_and(|s| s.contains("200"))
        });
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
}
