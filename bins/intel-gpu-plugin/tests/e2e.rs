//! The real binary as a child process, against fake nodes and the kubelet
//! emulator over real Unix sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
use kubelet_emulator::{KubeletEmulator, KubeletVersion, View};

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-plugin");
const LIMIT: Duration = Duration::from_secs(15);
const I915: &str = "gpu.intel.com/i915";
const XE: &str = "gpu.intel.com/xe";

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    dir: tempfile::TempDir,
    node: FakeNode,
    kubelet: KubeletEmulator,
}

impl Env {
    async fn new(spec: &NodeSpec) -> Self {
        Self::new_as(spec, KubeletVersion::default()).await
    }

    async fn new_as(spec: &NodeSpec, version: KubeletVersion) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(&dir.path().join("node"), spec).unwrap();
        std::fs::create_dir(dir.path().join("kubelet")).unwrap();
        let kubelet = KubeletEmulator::start_as(&dir.path().join("kubelet"), version)
            .await
            .unwrap();
        Self { dir, node, kubelet }
    }

    fn cdi(&self) -> std::path::PathBuf {
        self.dir.path().join("cdi")
    }

    fn start(&self, extra: &[&str]) -> Plugin {
        let child = Command::new(BIN)
            .arg("--sysfs-root")
            .arg(self.node.sysfs_root())
            .arg("--devfs-root")
            .arg(self.node.devfs_root())
            .arg("--kubelet-dir")
            .arg(self.kubelet.dir())
            .arg("--cdi-dir")
            .arg(self.cdi())
            .args(["--log-level", "debug"])
            .args(if extra.contains(&"--http-address") {
                &[][..]
            } else {
                &["--http-address", "127.0.0.1:0"][..]
            })
            .args(extra)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("E2E_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Plugin(child)
    }

    async fn until(&self, what: &str, f: impl Fn(&View) -> bool) -> View {
        self.kubelet
            .wait_until(LIMIT, f)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

fn ids(v: &View, resource: &str) -> Vec<String> {
    v.devices(resource)
        .map(|d| {
            d.devices()
                .iter()
                .map(|x| x.id.as_str().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn health(v: &View, resource: &str, id: &str) -> Option<devplugin_api::Health> {
    v.devices(resource)?.get(id).map(|d| d.health)
}

fn mixed() -> NodeSpec {
    NodeSpec {
        name: "mixed".into(),
        gpus: vec![
            GpuSpec::new(0),
            GpuSpec::new(1).device("0xe20b").driver(Some("xe")),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_resources_register_and_allocate_with_cdi() {
    let env = Env::new(&mixed()).await;
    let _p = env.start(&["--shared-dev-num", "2"]);
    let v = env
        .until("both resources", |v| {
            ids(v, I915).len() == 2 && ids(v, XE).len() == 2
        })
        .await;
    assert_eq!(ids(&v, I915), ["card0-0", "card0-1"]);
    assert_eq!(ids(&v, XE), ["card1-0", "card1-1"]);
    assert!(
        v.resources[I915]
            .endpoint
            .starts_with("gpu.intel.com-i915-")
    );
    // CDI specs exist once advertised.
    assert!(env.cdi().join("intel.cdi.k8s.io-gpu-card0.yaml").exists());
    assert!(env.cdi().join("intel.cdi.k8s.io-gpu-card1.yaml").exists());

    let a = env
        .kubelet
        .allocate(I915, &["card0-0", "card0-1"])
        .await
        .unwrap();
    let nodes: Vec<&str> = a.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert_eq!(
        nodes,
        ["/dev/dri/card0", "/dev/dri/renderD128"],
        "two shares of one card are merged"
    );
    assert!(a.devices.iter().all(|d| d.permissions == "rw"));
    assert_eq!(a.mounts.len(), 2);
    assert!(a.mounts.iter().all(|m| {
        m.read_only
            && m.host_path
                .starts_with("/dev/dri/by-path/pci-0000:03:00.0-")
    }));
    assert_eq!(a.cdi_devices[0].name, "intel.cdi.k8s.io/gpu=card0");
    let err = env.kubelet.allocate(XE, &["card0-0"]).await.unwrap_err();
    assert!(err.to_string().contains("card0-0"), "{err}");
}

/// Kubelet 1.25 dials back with the socket path as `:authority`, 1.34 with
/// `localhost`; either may drop a stream and stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_kubelet_1_25_and_1_34_and_survives_a_dropped_stream() {
    for version in KubeletVersion::ALL {
        let env = Env::new_as(&mixed(), version).await;
        let _p = env.start(&[]);
        let v = env
            .until("both resources", |v| {
                ids(v, I915).len() == 1 && ids(v, XE).len() == 1
            })
            .await;
        let xe = ids(&v, XE);
        let a = env.kubelet.allocate(XE, &[xe[0].as_str()]).await.unwrap();
        assert_eq!(
            a.cdi_devices[0].name, "intel.cdi.k8s.io/gpu=card1",
            "{version:?}"
        );
        assert!(env.kubelet.end_stream(I915));
        let v = env
            .until("i915 registered again", |v| {
                v.registrations(I915) == 2 && v.is_connected(I915) && ids(v, I915).len() == 1
            })
            .await;
        assert_eq!(
            v.registrations(XE),
            1,
            "{version:?}: the other resource is left alone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reach_the_kubelet() {
    let spec = NodeSpec {
        name: "t".into(),
        gpus: vec![GpuSpec::new(0), GpuSpec::new(1), GpuSpec::new(2)],
    };
    for (policy, want) in [
        ("packed", ["card0-0", "card0-1", "card0-2"]),
        ("balanced", ["card0-0", "card1-0", "card2-0"]),
        ("none", ["card2-11", "card0-11", "card1-11"]),
    ] {
        let env = Env::new(&spec).await;
        let _p = env.start(&["--shared-dev-num", "12", "--allocation-policy", policy]);
        let v = env.until("registered", |v| ids(v, I915).len() == 36).await;
        assert!(v.resources[I915].options.get_preferred_allocation_available);
        let mut avail: Vec<String> = Vec::new();
        for share in [11, 2, 10, 0, 1] {
            for card in [2, 0, 1] {
                avail.push(format!("card{card}-{share}"));
            }
        }
        let avail: Vec<&str> = avail.iter().map(String::as_str).collect();
        let got = env.kubelet.preferred(I915, &avail, &[], 3).await.unwrap();
        assert_eq!(got, want, "{policy}");
        let got = env
            .kubelet
            .preferred(I915, &avail, &["card1-10"], 2)
            .await
            .unwrap();
        assert_eq!(got[0], "card1-10", "{policy} honours must_include");
        let err = env
            .kubelet
            .preferred(I915, &avail, &[], 16)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("asked for 16 devices but only 15 are available"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_resource() {
    let env = Env::new(&NodeSpec::battlemage_workstation()).await;
    let _p = env.start(&["-enable-monitoring"]);
    env.until("monitoring", |v| {
        ids(v, "gpu.intel.com/monitoring") == ["all"]
    })
    .await;
    let a = env
        .kubelet
        .allocate("gpu.intel.com/monitoring", &["all"])
        .await
        .unwrap();
    let nodes: Vec<&str> = a.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert!(
        nodes.contains(&"/dev/mei0") && nodes.contains(&"/dev/dri/renderD129"),
        "{nodes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_health_and_a_new_driver_reach_the_kubelet() {
    let env = Env::new(&NodeSpec {
        name: "t".into(),
        gpus: vec![GpuSpec::new(0)],
    })
    .await;
    let _p = env.start(&["--cdi-grace-ms", "200"]);
    env.until("card0", |v| ids(v, I915) == ["card0-0"]).await;
    assert!(env.kubelet.view().devices(XE).is_none());

    env.node.add_gpu(&GpuSpec::new(1)).unwrap();
    env.until("card1 added", |v| ids(v, I915) == ["card0-0", "card1-0"])
        .await;
    // An xe GPU on an i915-only node creates the xe resource.
    env.node
        .add_gpu(&GpuSpec::new(2).device("0xe20b").driver(Some("xe")))
        .unwrap();
    env.until("xe appears", |v| ids(v, XE) == ["card2-0"]).await;
    assert!(env.cdi().join("intel.cdi.k8s.io-gpu-card2.yaml").exists());

    // Health flaps both ways: nodes vanish, then return.
    env.node.remove_device_nodes(1).unwrap();
    env.until("card1 unhealthy", |v| {
        health(v, I915, "card1-0") == Some(devplugin_api::Health::Unhealthy)
    })
    .await;
    env.node.create_device_nodes(1).unwrap();
    env.until("card1 healthy", |v| {
        health(v, I915, "card1-0") == Some(devplugin_api::Health::Healthy)
    })
    .await;

    // Removal: the xe resource stays registered with capacity 0.
    env.node.remove_gpu(2).unwrap();
    let v = env
        .until("xe empty", |v| {
            v.devices(XE).is_some_and(|d| d.devices().is_empty())
        })
        .await;
    assert!(v.is_connected(XE));
    // The spec outlives the card by the grace (200 ms here), then goes.
    let spec = env.cdi().join("intel.cdi.k8s.io-gpu-card2.yaml");
    let deadline = std::time::Instant::now() + LIMIT;
    while spec.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gone card's spec is never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.node.remove_gpu(1).unwrap();
    env.until("card1 removed", |v| ids(v, I915) == ["card0-0"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kubelet_restarts_then_sigterm() {
    let mut env = Env::new(&mixed()).await;
    let mut p = env.start(&[]);
    env.until("registered", |v| {
        ids(v, I915).len() == 1 && ids(v, XE).len() == 1
    })
    .await;
    for i in 1..=20u32 {
        env.kubelet.restart().await.unwrap();
        env.until(&format!("restart {i}"), |v| {
            v.registrations(I915) == i + 1
                && v.registrations(XE) == i + 1
                && ids(v, I915).len() == 1
                && ids(v, XE).len() == 1
        })
        .await;
    }
    let sockets = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.starts_with("gpu.intel.com-"))
            .count()
    };
    assert_eq!(sockets(env.kubelet.dir()), 2);
    let start = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        start.elapsed()
    );
    assert_eq!(sockets(env.kubelet.dir()), 0, "sockets removed");
    // CDI specs stay for running containers.
    assert!(env.cdi().join("intel.cdi.k8s.io-gpu-card0.yaml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_style_flags_work() {
    let env = Env::new(&mixed()).await;
    let prefix = env.dir.path().join("node");
    let child = Command::new(BIN)
        .arg(format!("-prefix={}", prefix.display()))
        .arg(format!("-kubelet-dir={}", env.kubelet.dir().display()))
        .arg(format!("-cdi-dir={}", env.cdi().display()))
        .args([
            "-shared-dev-num",
            "3",
            "-v=2",
            "-health-management",
            "-allow-ids=0x56A0",
            "-http-address=127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _p = Plugin(child);
    let v = env.until("registered", |v| ids(v, I915).len() == 3).await;
    assert!(v.devices(XE).is_none(), "0xe20b is not in the allow list");
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    for args in [
        &["--allocation-policy", "random"][..],
        &["--bypath", "some"],
        &["--shared-dev-num", "0"],
        &["--allow-ids", "0x56a0", "--deny-ids", "0x56c0"],
        &["--allow-ids", "gpu"],
        &["--http-address", "nowhere"],
        &["--monitoring-mode", "double"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("intel-gpu-plugin: "), "{err}");
    }
}

#[test]
fn inspect_explains_every_card() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge()).unwrap();
    let cdi = dir.path().join("cdi");
    let inspect = || {
        let out = Command::new(BIN)
            .args(["inspect", "--json", "--sysfs-root"])
            .arg(node.sysfs_root())
            .arg("--devfs-root")
            .arg(node.devfs_root())
            .arg("--cdi-dir")
            .arg(&cdi)
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // No spec on disk: none is named.
    let v = inspect();
    assert_eq!(v["cards"][0]["cdi_spec"], "missing");
    assert!(
        v["resources"][0]["allocate_example"]["cdi_devices"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The daemon's spec on disk: named.
    let plugin = Command::new(BIN)
        .arg("--sysfs-root")
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .arg("--kubelet-dir")
        .arg(dir.path())
        .arg("--cdi-dir")
        .arg(&cdi)
        .args(["--http-address", ""])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _p = Plugin(plugin);
    let spec = cdi.join("intel.cdi.k8s.io-gpu-card0.yaml");
    let deadline = std::time::Instant::now() + LIMIT;
    while !spec.exists() {
        assert!(std::time::Instant::now() < deadline, "no spec written");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = inspect();
    assert_eq!(v["cards"][0]["cdi_spec"], "written");
    assert_eq!(v["cards"].as_array().unwrap().len(), 6);
    assert!(
        v["cards"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("VFs enabled")
    );
    assert_eq!(v["resources"][0]["resource"], "gpu.intel.com/i915");
    assert_eq!(
        v["resources"][0]["allocate_example"]["cdi_devices"][0],
        "intel.cdi.k8s.io/gpu=card0"
    );
    let text = Command::new(BIN)
        .arg("inspect")
        .arg("--sysfs-root")
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("card1 0000:4d:00.0 0x56c0 driver=i915 state=usable — NOT advertised: SR-IOV physical function"), "{text}");
}

/// FIFOs planted at a CDI spec's name and at a card's sysfs `vendor`:
/// `inspect` finishes, reports the spec unreadable and the card not
/// advertised (on the old code it waited for a writer for ever).
#[test]
fn inspect_never_blocks_on_a_planted_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge()).unwrap();
    let cdi = dir.path().join("cdi");
    std::fs::create_dir_all(&cdi).unwrap();
    let vendor = node.sysfs_root().join("class/drm/card2/device/vendor");
    std::fs::remove_file(&vendor).unwrap();
    for fifo in [&cdi.join("intel.cdi.k8s.io-gpu-card0.yaml"), &vendor] {
        assert!(Command::new("mkfifo").arg(fifo).status().unwrap().success());
    }
    let mut child = Command::new(BIN)
        .args(["inspect", "--json", "--sysfs-root"])
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .arg("--cdi-dir")
        .arg(&cdi)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("inspect blocked on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let card = |name: &str| {
        v["cards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["card"] == name)
            .cloned()
    };
    assert_eq!(card("card0").unwrap()["cdi_spec"], "unreadable", "{v:#}");
    // Skipped (not a card at all) or not advertised, never advertised.
    assert!(
        card("card2").is_none_or(|c| c["advertised"] == false),
        "{v:#}"
    );
    assert!(v.to_string().contains("is not a regular file"), "{v:#}");
}

fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics() {
    let mut env = Env::new(&mixed()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _p = env.start(&["--http-address", &format!("127.0.0.1:{port}")]);
    env.until("registered", |v| {
        ids(v, I915).len() == 1 && ids(v, XE).len() == 1
    })
    .await;
    let deadline = Instant::now() + LIMIT;
    while http_get(port, "/readyz").0 != "HTTP/1.1 200 OK" {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(port, "/healthz").0, "HTTP/1.1 200 OK");
    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        metrics.contains("intel_gpu_plugin_registrations_total{resource=\"gpu.intel.com/i915\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("intel_gpu_plugin_cards{health=\"healthy\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("card0-0"), "no per-device labels");
    assert_eq!(http_get(port, "/nope").0, "HTTP/1.1 404 Not Found");
    // A kubelet that goes away makes the plugin unready.
    env.kubelet.stop().await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = http_get(port, "/readyz");
        if status.contains("503") {
            assert!(body.contains("gpu.intel.com/"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready without a kubelet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// With the CDI directory unusable, Allocate answers carry nodes and mounts
/// but no CDI name; the write is retried, and once it lands the name comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdi_names_only_with_their_spec_and_failed_writes_are_retried() {
    let env = Env::new(&NodeSpec {
        name: "t".into(),
        gpus: vec![GpuSpec::new(0)],
    })
    .await;
    // A file where the directory should be: every write fails (even as root).
    std::fs::write(env.cdi(), "not a directory").unwrap();
    let port = free_port();
    let _p = env.start(&["--http-address", &format!("127.0.0.1:{port}")]);
    env.until("card0", |v| ids(v, I915) == ["card0-0"]).await;
    let a = env.kubelet.allocate(I915, &["card0-0"]).await.unwrap();
    assert!(!a.devices.is_empty(), "nodes are always answered");
    assert!(
        a.cdi_devices.is_empty(),
        "no CDI name without its spec: {a:?}"
    );
    let deadline = Instant::now() + LIMIT;
    while metric(port, "intel_gpu_plugin_cdi_write_failures_total").unwrap_or(0.0) < 2.0 {
        assert!(Instant::now() < deadline, "writes are not retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(port, "intel_gpu_plugin_cdi_specs_missing"),
        Some(1.0)
    );
    // The directory is fixed: the next retry writes the spec.
    std::fs::remove_file(env.cdi()).unwrap();
    let spec = env.cdi().join("intel.cdi.k8s.io-gpu-card0.yaml");
    let deadline = Instant::now() + LIMIT;
    while !spec.exists() {
        assert!(Instant::now() < deadline, "the spec is never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        let a = env.kubelet.allocate(I915, &["card0-0"]).await.unwrap();
        if a.cdi_devices
            .first()
            .is_some_and(|c| c.name == "intel.cdi.k8s.io/gpu=card0")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the CDI name never comes: {a:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(port, "intel_gpu_plugin_cdi_specs_missing"),
        Some(0.0)
    );
    // Someone deletes it: it is written again.
    std::fs::remove_file(&spec).unwrap();
    env.node
        .set_attribute(0, "hwmon/hwmon0/temp1_input", "41000\n")
        .ok();
    env.node.remove_device_nodes(0).unwrap();
    env.node.create_device_nodes(0).unwrap();
    let deadline = Instant::now() + LIMIT;
    while !spec.exists() {
        assert!(
            Instant::now() < deadline,
            "a deleted spec is not written again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// udev removes `/dev/dri` with the last DRM device and the kernel creates a
/// new one later: the plugin follows the new directory, no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_and_recreated_dri_directory_is_followed() {
    let env = Env::new(&NodeSpec {
        name: "t".into(),
        gpus: vec![GpuSpec::new(0)],
    })
    .await;
    let _p = env.start(&[]);
    env.until("card0", |v| {
        health(v, I915, "card0-0") == Some(devplugin_api::Health::Healthy)
    })
    .await;
    let dri = env.node.devfs_root().join("dri");
    let sick = |v: &View| health(v, I915, "card0-0") == Some(devplugin_api::Health::Unhealthy);
    let well = |v: &View| health(v, I915, "card0-0") == Some(devplugin_api::Health::Healthy);
    for round in 0..3 {
        // Slow: gone, noticed, back.
        std::fs::remove_dir_all(&dri).unwrap();
        env.until("card0 unhealthy without its nodes", sick).await;
        std::fs::create_dir_all(dri.join("by-path")).unwrap();
        env.node.create_device_nodes(0).unwrap();
        env.until(&format!("card0 healthy again, round {round}"), well)
            .await;
        // Fast: gone and back before the plugin looks. Only a watch on the
        // new directory sees what happens in it next.
        std::fs::remove_dir_all(&dri).unwrap();
        std::fs::create_dir_all(dri.join("by-path")).unwrap();
        env.node.create_device_nodes(0).unwrap();
        env.until("card0 healthy in the new directory", well).await;
        env.node.remove_device_nodes(0).unwrap();
        env.until(
            &format!("a node removed in the new directory, round {round}"),
            sick,
        )
        .await;
        env.node.create_device_nodes(0).unwrap();
        env.until("card0 healthy again", well).await;
    }
}

/// The exact argument lists of the Go plugin's upstream DaemonSet overlays
/// and of its operator (intel-device-plugins-for-kubernetes v0.36,
/// `deployments/gpu_plugin/overlays/*`, `pkg/controllers/gpu/controller.go`
/// `getPodArgs`), plus klog's flags: each starts the plugin, which then
/// serves and stays up. An in-place switch must never crash-loop on a flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_argument_list_starts_the_plugin() {
    let lists: &[(&str, &[&str])] = &[
        ("base", &[]),
        (
            "allowlist-arc",
            &[
                "-v=4",
                "-allow-ids=0x56a6,0x56a5,0x56a1,0x56a0,0x5694,0x5693,0x5692,0x5691,0x5690,0x56b3,0x56b2,0x56a4,0x56a3,0x5697,0x5696,0x5695,0x56b1,0x56b0,0x56a2,0x56ba,0x56bc,0x56bd,0x56bb",
            ],
        ),
        ("health", &["-health-management"]),
        (
            "monitoring_shared-dev_nfd",
            &["-shared-dev-num=30", "-enable-monitoring", "-v=2"],
        ),
        ("nfd_labeled_nodes", &["-enable-monitoring", "-v=2"]),
        ("wsl", &["-wsl"]),
        (
            "xpumd",
            &[
                "-xpumd-endpoint=/run/xpumd/intelxpuinfo.sock",
                "-enable-monitoring",
            ],
        ),
        (
            "fractional_resources (before v0.34)",
            &[
                "-shared-dev-num=300",
                "-resource-manager",
                "-enable-monitoring",
            ],
        ),
        (
            "operator sample",
            &[
                "-v",
                "4",
                "-enable-monitoring",
                "-shared-dev-num",
                "10",
                "-allocation-policy",
                "none",
            ],
        ),
        (
            "operator, every field",
            &[
                "-v",
                "2",
                "-enable-monitoring",
                "-monitoring-mode=split",
                "-shared-dev-num",
                "4",
                "-allocation-policy",
                "balanced",
                "-allow-ids",
                "0x56c0",
                "-bypath",
                "all",
            ],
        ),
        (
            "temperature limits",
            &[
                "-health-management",
                "-temp-limit=90",
                "-gpu-temp-limit",
                "95",
                "-memory-temp-limit=85",
            ],
        ),
        (
            "klog",
            &[
                "-logtostderr",
                "-alsologtostderr=false",
                "-stderrthreshold",
                "INFO",
                "-log_dir",
                "/tmp",
                "-log_file=/tmp/x",
                "-log_file_max_size",
                "10",
                "-vmodule",
                "gpu*=4",
                "-skip_headers",
                "-one_output=true",
                "-add_dir_header",
                "-skip_log_headers",
                "-log_backtrace_at",
                "x.go:1",
                "-alsologtostderrthreshold=INFO",
                "-legacy_stderr_threshold_behavior=false",
            ],
        ),
    ];
    let env = Env::new(&NodeSpec::starlingx_edge()).await;
    for (name, args) in lists {
        let port = free_port();
        let mut all: Vec<&str> = args.to_vec();
        let address = format!("127.0.0.1:{port}");
        all.extend(["--http-address", &address]);
        let mut p = env.start(&all);
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = p.0.try_wait().unwrap() {
                panic!("{name}: the plugin exited with {status}");
            }
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && http_get(port, "/healthz").0 == "HTTP/1.1 200 OK";
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: never served /healthz");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "{name}: exited after starting"
        );
        drop(p);
    }
}

/// `-health-management` with hwmon: a hot card is Unhealthy, a cool one
/// Healthy; a FIFO planted at a hwmon input (which used to stand for a
/// read stuck in the kernel) is refused at once — it never blocks the
/// reader, so `/healthz` stays good and everything goes on. (A read
/// stuck in the kernel itself cannot be planted from user space any more;
/// the watchdog that catches one is tested in `progress.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_management_and_a_stuck_read() {
    let mut hot = GpuSpec::new(0);
    hot.temperature_mdeg = Some(101_000);
    let mut cool = GpuSpec::new(1);
    cool.temperature_mdeg = Some(40_000);
    let mut env = Env::new(&NodeSpec {
        name: "t".into(),
        gpus: vec![hot, cool],
    })
    .await;
    {
        let port = free_port();
        let _p = env.start(&[
            "-health-management",
            "--http-address",
            &format!("127.0.0.1:{port}"),
        ]);
        env.until("card0 hot, card1 cool", |v| {
            health(v, I915, "card0-0") == Some(devplugin_api::Health::Unhealthy)
                && health(v, I915, "card1-0") == Some(devplugin_api::Health::Healthy)
        })
        .await;
        assert_eq!(
            metric(port, "intel_gpu_plugin_temperature_celsius{card=\"card0\"}"),
            Some(101.0)
        );
    }
    // Without health management the limit does not apply (as in Go).
    env.kubelet.restart().await.unwrap();
    {
        let _p = env.start(&["-temp-limit=50"]);
        env.until("both healthy", |v| {
            health(v, I915, "card0-0") == Some(devplugin_api::Health::Healthy)
                && health(v, I915, "card1-0") == Some(devplugin_api::Health::Healthy)
        })
        .await;
    }
    // A read that never returns.
    env.kubelet.restart().await.unwrap();
    let input = env
        .node
        .sysfs_root()
        .join("class/drm/card1/device/hwmon/hwmon0/temp1_input");
    std::fs::remove_file(&input).unwrap();
    let made = Command::new("mkfifo").arg(&input).status().unwrap();
    assert!(made.success());
    let port = free_port();
    let _p = env.start(&[
        "-health-management",
        "--http-address",
        &format!("127.0.0.1:{port}"),
    ]);
    // Ready by its own account (the kubelet's registration count is no
    // guide: the previous instances may have registered with the restarted
    // kubelet before they died).
    let deadline = Instant::now() + LIMIT;
    loop {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if up && http_get(port, "/readyz").0 == "HTTP/1.1 200 OK" {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.until("served", |v| {
        v.is_connected(I915) && ids(v, I915).len() == 2
    })
    .await;
    // Several health rounds, each reading the FIFO's name: none blocks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = http_get(port, "/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let stuck = metric(port, "intel_gpu_plugin_longest_blocking_operation_seconds").unwrap();
    assert!(stuck < 0.3, "{stuck}");
    // The hot card is read and Unhealthy; the one whose input is a FIFO
    // is unread and stays allocatable.
    env.until("card0 hot, card1 unread", |v| {
        health(v, I915, "card0-0") == Some(devplugin_api::Health::Unhealthy)
            && health(v, I915, "card1-0") == Some(devplugin_api::Health::Healthy)
    })
    .await;
    env.kubelet.allocate(I915, &["card1-0"]).await.unwrap();
}

/// Logs to a pipe or a file (`kubectl logs`, journald) are plain text:
/// colour codes only at a terminal.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::starlingx_edge()).unwrap();
    let log = dir.path().join("log");
    let child = Command::new(BIN)
        .arg("--sysfs-root")
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .arg("--kubelet-dir")
        .arg(dir.path().join("kubelet"))
        .arg("--cdi-dir")
        .arg(dir.path().join("cdi"))
        .args(["--http-address", "", "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _p = Plugin(child);
    let deadline = Instant::now() + LIMIT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("INFO") {
            break text;
        }
        assert!(Instant::now() < deadline, "nothing logged: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!text.contains('\x1b'), "{text}");
}

/// One GPU, one owner: while the DRA driver holds the node's owner lock
/// the plugin registers nothing; when the lock is let go (the driver
/// stopped or crashed), the plugin takes it and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_while_the_dra_driver_owns_the_gpus() {
    let env = Env::new(&mixed()).await;
    let lock = env.dir.path().join("owner.lock");
    let dra = gpu_discovery::owner::OwnerLock::try_acquire(&lock, "intel-gpu-dra pid 7")
        .unwrap()
        .unwrap();
    let port = free_port();
    let _p = env.start(&[
        "--owner-lock",
        lock.to_str().unwrap(),
        "--http-address",
        &format!("127.0.0.1:{port}"),
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = env.kubelet.view();
    assert_eq!(v.registrations(I915) + v.registrations(XE), 0);
    // Waiting is alive (no restart by the liveness probe) and not ready,
    // naming the holder.
    let (status, _) = http_get(port, "/healthz");
    assert!(status.contains("200"), "{status}");
    let (status, body) = http_get(port, "/readyz");
    assert!(status.contains("503"), "{status}");
    assert!(body.contains("intel-gpu-dra pid 7"), "{body}");
    drop(dra);
    env.until("both resources once the lock is free", |v| {
        ids(v, I915).len() == 1 && ids(v, XE).len() == 1
    })
    .await;
    let holder = std::fs::read_to_string(&lock).unwrap();
    assert!(holder.starts_with("intel-gpu-plugin pid "), "{holder}");
}
