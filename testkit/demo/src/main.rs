//! The demo driver behind `cargo xtask demo`: runs the real
//! `intel-gpu-plugin`, `intel-gpu-labeler` and `intel-gpu-dra` against a
//! simulated StarlingX edge server (fake sysfs/devfs, the kubelet
//! emulator — device plugins and DRA —, the API-server emulator, an
//! enabled-plugins file) and tells what happens, step by step.
//!
//! `demo --plugin PATH --labeler PATH --dra PATH [--keep]`. Exits 0 when
//! every step held, 1 naming the step that did not.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use apiserver_emulator::{ApiServer, DeviceRequest, DraApi};
use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
use kubelet_emulator::{ClaimId, KubeletEmulator, KubeletVersion, PluginWatcher, View};

const NODE: &str = "controller-0";
const I915: &str = "gpu.intel.com/i915";
const XE: &str = "gpu.intel.com/xe";
const LIMIT: Duration = Duration::from_secs(20);
const CONFIGMAP_NAMESPACE: &str = "kube-system";
const CONFIGMAP_NAME: &str = "enabled-kube-plugins";
const CONFIGMAP: &str = "kube-system/enabled-kube-plugins";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Demo {
    root: PathBuf,
    node: FakeNode,
    kubelet: KubeletEmulator,
    api: ApiServer,
    plugins_file: PathBuf,
    plugin_bin: PathBuf,
    labeler_bin: PathBuf,
    dra_bin: PathBuf,
}

fn ids(v: &View, r: &str) -> Vec<String> {
    v.devices(r)
        .map(|d| {
            d.devices()
                .iter()
                .map(|x| x.id.as_str().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl Demo {
    async fn new(
        root: &Path,
        plugin_bin: PathBuf,
        labeler_bin: PathBuf,
        dra_bin: PathBuf,
    ) -> anyhow::Result<Self> {
        let node = FakeNode::build(&root.join("node"), &NodeSpec::starlingx_edge_with_arc())?;
        std::fs::create_dir_all(root.join("kubelet"))?;
        let kubelet = KubeletEmulator::start(&root.join("kubelet")).await?;
        let api = ApiServer::start().await?;
        api.add_node(NODE);
        api.set_label(NODE, "kubelet", "kubernetes.io/hostname", Some(NODE));
        std::fs::write(root.join("kubeconfig"), api.kubeconfig())?;
        // The controller's replicated copy, in the release directory named
        // by the host's build.info, as StarlingX keeps it.
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(
            root.join("etc/build.info"),
            "OS=\"debian\"\nSW_VERSION=\"24.09\"\n",
        )?;
        let plugins_file = root.join("opt/platform/config/24.09/enabled_kube_plugins");
        std::fs::create_dir_all(plugins_file.parent().unwrap_or(root))?;
        // Byte for byte what StarlingX's bootstrap writes.
        std::fs::write(&plugins_file, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#)?;
        Ok(Self {
            root: root.to_owned(),
            node,
            kubelet,
            api,
            plugins_file,
            plugin_bin,
            labeler_bin,
            dra_bin,
        })
    }

    fn roots(&self, c: &mut Command) {
        c.arg("--sysfs-root")
            .arg(self.node.sysfs_root())
            .arg("--devfs-root")
            .arg(self.node.devfs_root());
    }

    /// The controller's publisher: the replicated file becomes the
    /// cluster's ConfigMap.
    fn publisher(&self) -> anyhow::Result<Proc> {
        let mut c = Command::new(&self.labeler_bin);
        c.args(["publish", "--configmap", CONFIGMAP, "--settle", "200ms"])
            .arg("--host-root")
            .arg(&self.root)
            .arg("--kubeconfig")
            .arg(self.root.join("kubeconfig"))
            .args(["--http-address", "", "--log-level", "warn"]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Ok(Proc(c.spawn().with_context(|| {
            format!("cannot start {}", self.labeler_bin.display())
        })?))
    }

    /// The node's labeller, deciding from the published ConfigMap.
    fn labeler(&self) -> anyhow::Result<Proc> {
        let mut c = Command::new(&self.labeler_bin);
        self.roots(&mut c);
        c.arg("--kubeconfig")
            .arg(self.root.join("kubeconfig"))
            .args(["--enabled-plugins-configmap", CONFIGMAP]);
        c.args([
            "--node-name",
            NODE,
            "--removal-grace",
            "0s",
            "--settle",
            "200ms",
            "--resync",
            "2s",
            "--http-address",
            "",
            "--log-level",
            "warn",
        ]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Ok(Proc(c.spawn().with_context(|| {
            format!("cannot start {}", self.labeler_bin.display())
        })?))
    }

    fn plugin(&self) -> anyhow::Result<Proc> {
        let mut c = Command::new(&self.plugin_bin);
        self.roots(&mut c);
        c.arg("--kubelet-dir")
            .arg(self.kubelet.dir())
            .arg("--cdi-dir")
            .arg(self.root.join("cdi"))
            .arg("--owner-lock")
            .arg(self.root.join("owner.lock"));
        c.args([
            "--shared-dev-num",
            "2",
            "--http-address",
            "",
            "--log-level",
            "warn",
        ]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Ok(Proc(c.spawn().with_context(|| {
            format!("cannot start {}", self.plugin_bin.display())
        })?))
    }

    /// The DRA driver, with the plugin's owner lock.
    fn dra(&self) -> anyhow::Result<Proc> {
        let mut c = Command::new(&self.dra_bin);
        self.roots(&mut c);
        c.arg("--kubeconfig")
            .arg(self.root.join("kubeconfig"))
            .arg("--registry-dir")
            .arg(self.root.join("kubelet/plugins_registry"))
            .arg("--plugin-dir")
            .arg(self.root.join("kubelet/plugins/gpu.intel.com"))
            .arg("--cdi-dir")
            .arg(self.root.join("cdi"))
            .arg("--owner-lock")
            .arg(self.root.join("owner.lock"))
            .args([
                "--node-name",
                NODE,
                "--http-address",
                "none",
                "--log-level",
                "warn",
            ]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Ok(Proc(c.spawn().with_context(|| {
            format!("cannot start {}", self.dra_bin.display())
        })?))
    }

    async fn wait_kubelet(&self, what: &str, f: impl Fn(&View) -> bool) -> anyhow::Result<View> {
        self.kubelet
            .wait_until(LIMIT, f)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))
    }

    async fn wait_label(&self, present: bool) -> anyhow::Result<()> {
        let ok = self
            .api
            .wait_node(NODE, LIMIT, |n| {
                n.is_some_and(|n| {
                    n.labels.get("intelgpu").is_some_and(|v| v == "enabled") == present
                })
            })
            .await
            .is_ok();
        ensure!(
            ok,
            "the node label intelgpu=enabled was {} within {LIMIT:?}",
            if present { "not set" } else { "not removed" }
        );
        Ok(())
    }
}

async fn steps(demo: &mut Demo) -> Result<Vec<Proc>, (usize, &'static str, anyhow::Error)> {
    let mut procs = Vec::new();
    macro_rules! step {
        ($n:expr, $name:expr, $body:expr) => {{
            println!("\n== step {}: {}", $n, $name);
            match $body.await {
                Ok(v) => {
                    println!("demo: step {} {}: ok", $n, $name);
                    v
                }
                Err(e) => return Err(($n, $name, e)),
            }
        }};
    }

    step!(1, "labeller labels the node", async {
        println!(
            "enabled-plugins file {}: {}",
            demo.plugins_file.display(),
            std::fs::read_to_string(&demo.plugins_file)?
        );
        procs.push(demo.publisher()?);
        let published = demo
            .api
            .wait_configmap(CONFIGMAP_NAMESPACE, CONFIGMAP_NAME, LIMIT)
            .await;
        ensure!(
            published,
            "the controller did not publish the enabled-plugins ConfigMap"
        );
        println!("published as configmap {CONFIGMAP} (what every node decides from)");
        procs.push(demo.labeler()?);
        demo.wait_label(true).await?;
        let node = demo.api.node(NODE).context("node vanished")?;
        for (k, v) in &node.labels {
            println!("  {k}={v}");
        }
        anyhow::Ok(())
    });

    let mut plugin = None;
    step!(2, "plugin registers its resources", async {
        let start = Instant::now();
        plugin = Some(demo.plugin()?);
        let v = demo
            .wait_kubelet("both resources", |v| {
                ids(v, I915).len() == 10 && ids(v, XE).len() == 2
            })
            .await?;
        println!(
            "registered in {} (exec → the kubelet has both lists)",
            ms(start.elapsed())
        );
        println!("  {I915}: {}", ids(&v, I915).join(" "));
        println!("  {XE}: {}", ids(&v, XE).join(" "));
        ensure!(
            !ids(&v, I915).iter().any(|i| i.starts_with("card1-")),
            "the Flex 170 PF (card1, 4 VFs enabled) must not be advertised"
        );
        println!(
            "  card1 (Flex 170 PF with 4 VFs) is hidden; its VFs card2–card5 are advertised, 2 shares each"
        );
        anyhow::Ok(())
    });

    step!(3, "a sample pod is allocated", async {
        let a = demo.kubelet.allocate(I915, &["card3-0", "card3-1"]).await?;
        for d in &a.devices {
            println!("  device {} ({})", d.host_path, d.permissions);
        }
        for m in &a.mounts {
            println!("  mount {} (read-only: {})", m.host_path, m.read_only);
        }
        for c in &a.cdi_devices {
            println!("  CDI {}", c.name);
        }
        ensure!(
            a.devices.len() == 2,
            "two shares of card3 give its two nodes once"
        );
        ensure!(
            demo.root
                .join("cdi/intel.cdi.k8s.io-gpu-card3.yaml")
                .exists(),
            "the CDI spec exists"
        );
        anyhow::Ok(())
    });

    step!(4, "a GPU is hot-removed and re-added", async {
        let xe = GpuSpec::new(8)
            .at("0000:8a:00.0")
            .device("0xe20b")
            .driver(Some("xe"));
        let start = Instant::now();
        demo.node.remove_gpu(8)?;
        demo.wait_kubelet("xe emptied", |v| {
            v.devices(XE).is_some_and(|d| d.devices().is_empty())
        })
        .await?;
        println!(
            "  removed card8 (Arc B580, xe): the kubelet saw capacity 0 after {}",
            ms(start.elapsed())
        );
        let start = Instant::now();
        demo.node.add_gpu(&xe)?;
        demo.wait_kubelet("xe back", |v| ids(v, XE).len() == 2)
            .await?;
        println!(
            "  re-added card8: the kubelet saw it after {} (the Go plugin polls every 5000 ms)",
            ms(start.elapsed())
        );
        anyhow::Ok(())
    });

    step!(5, "the kubelet restarts", async {
        let before = demo.kubelet.view().registrations(I915);
        // Every socket but the checkpoint deleted, then a new kubelet.sock.
        let start = Instant::now();
        demo.kubelet.restart().await?;
        demo.wait_kubelet("re-registered", |v| {
            v.registrations(I915) > before && ids(v, I915).len() == 10
        })
        .await?;
        println!(
            "  re-registered with the full list after {}",
            ms(start.elapsed())
        );
        anyhow::Ok(())
    });

    step!(
        6,
        "the plugin is disabled and the label taken back",
        async {
            let tmp = demo.plugins_file.with_extension("new");
            std::fs::write(&tmp, r#"{"intel-qat-plugin": "intelqat=enabled"}"#)?;
            std::fs::rename(&tmp, &demo.plugins_file)?;
            let start = Instant::now();
            demo.wait_label(false).await?;
            println!(
                "  intelgpu=enabled removed {} after the file changed (published, then confirmed by a second read); discovery labels stay",
                ms(start.elapsed())
            );
            ensure!(
                demo.api
                    .node(NODE)
                    .is_some_and(|n| n.labels.contains_key("gpu.intel.com/tiles")),
                "discovery labels stay"
            );
            anyhow::Ok(())
        }
    );

    step!(7, "the node moves to DRA and a claim is prepared", async {
        dra_step(demo, &mut plugin, &mut procs).await
    });
    Ok(procs)
}

/// Step 7: the node is given to the DRA driver (a 1.34 cluster with the
/// DRA alpha gates on): the labeller moves its DaemonSet label, the
/// driver waits for the plugin's owner lock, registers, publishes, and a
/// claim on a share of the B580 is allocated, prepared and unprepared.
async fn dra_step(
    demo: &mut Demo,
    plugin: &mut Option<Proc>,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    const DRIVER: &str = "gpu.intel.com";
    demo.api.set_dra(DraApi::V1_34.with_all_gates());
    println!(
        "  the cluster: Kubernetes 1.34 with DRAConsumableCapacity, DRAPartitionableDevices, DRADeviceTaints"
    );
    let tmp = demo.plugins_file.with_extension("new");
    std::fs::write(&tmp, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#)?;
    std::fs::rename(&tmp, &demo.plugins_file)?;
    demo.api
        .set_label(NODE, "admin", "intel.com/gpu-allocation", Some("dra"));
    let moved = demo
        .api
        .wait_node(NODE, LIMIT, |n| {
            n.is_some_and(|n| {
                n.labels.get("intelgpu-dra").is_some_and(|v| v == "enabled")
                    && !n.labels.contains_key("intelgpu")
            })
        })
        .await
        .is_ok();
    ensure!(
        moved,
        "the labeller did not move the node to intelgpu-dra=enabled"
    );
    println!(
        "  intel.com/gpu-allocation=dra: the labeller set intelgpu-dra=enabled and took back intelgpu"
    );
    let kubelet = PluginWatcher::start(
        &demo.root.join("kubelet/plugins_registry"),
        KubeletVersion::V1_34,
    )?;
    procs.push(demo.dra()?);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure!(
        !kubelet.view().plugins.contains_key(DRIVER),
        "the DRA driver registered while the device plugin held the node's GPUs"
    );
    println!("  the DRA driver waits: the device plugin holds the node's owner lock");
    let start = Instant::now();
    drop(plugin.take());
    kubelet
        .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
        .await?;
    println!(
        "  the device plugin stopped (its DaemonSet no longer selects the node): the DRA driver registered {} later",
        ms(start.elapsed())
    );
    let deadline = Instant::now() + LIMIT;
    let devices = loop {
        let devices: Vec<serde_json::Value> = demo
            .api
            .resource_slices()
            .values()
            .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
            .collect();
        if devices.len() == 7 {
            break devices;
        }
        ensure!(Instant::now() < deadline, "7 devices were not published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("  ResourceSlice devices:");
    for d in &devices {
        let a = &d["attributes"];
        println!(
            "    {} type={} driver={} model={}{}{}",
            d["name"].as_str().unwrap_or_default(),
            a["type"]["string"].as_str().unwrap_or("?"),
            a["driver"]["string"].as_str().unwrap_or("?"),
            a["model"]["string"].as_str().unwrap_or("-"),
            if d["allowMultipleAllocations"] == true {
                " shared"
            } else {
                ""
            },
            if d["consumesCounters"].is_array() {
                " (SR-IOV counters)"
            } else {
                ""
            },
        );
    }
    let uid = demo
        .api
        .create_resource_claim("default", "media-0", serde_json::json!({}));
    let got = demo
        .api
        .allocate(
            "default",
            "media-0",
            &[DeviceRequest::new("gpu", DRIVER)
                .attribute("model", serde_json::json!({"string": "B580"}))
                .capacity("millicores", "250")],
        )
        .map_err(anyhow::Error::msg)?;
    println!(
        "  claim default/media-0 asks for 250 millicores of a B580: allocated {} (share {}, consumes {:?})",
        got[0].device,
        got[0].share_id.as_deref().unwrap_or("-"),
        got[0].consumed
    );
    let claim = ClaimId {
        namespace: "default".into(),
        name: "media-0".into(),
        uid: uid.clone(),
    };
    let answers = kubelet
        .prepare(DRIVER, std::slice::from_ref(&claim))
        .await?;
    let prepared = answers[&uid].clone().map_err(anyhow::Error::msg)?;
    for d in &prepared {
        println!(
            "  prepared {}: CDI {}",
            d.device,
            d.cdi_device_ids.join(", ")
        );
    }
    let spec = demo.root.join(format!("cdi/{DRIVER}-claim_{uid}.json"));
    let text = std::fs::read_to_string(&spec)
        .with_context(|| format!("no CDI spec {}", spec.display()))?;
    println!("  {}:", spec.display());
    for line in text.lines() {
        println!("    {line}");
    }
    ensure!(
        text.contains("RENDER_DEVICE="),
        "the spec names the render node"
    );
    let done = kubelet
        .unprepare(DRIVER, std::slice::from_ref(&claim))
        .await?;
    ensure!(
        done.get(&uid).is_some_and(Result::is_ok),
        "unprepare failed: {done:?}"
    );
    ensure!(!spec.exists(), "unprepare left the CDI spec");
    println!("  unprepared: the claim's CDI spec is removed, nothing else");
    Ok(())
}

type Args = (PathBuf, PathBuf, PathBuf, bool);

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut plugin, mut labeler, mut dra, mut keep) = (None, None, None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--plugin" => plugin = args.next().map(PathBuf::from),
            "--labeler" => labeler = args.next().map(PathBuf::from),
            "--dra" => dra = args.next().map(PathBuf::from),
            "--keep" => keep = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok((
        plugin.context("--plugin PATH is required")?,
        labeler.context("--labeler PATH is required")?,
        dra.context("--dra PATH is required")?,
        keep,
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let (plugin, labeler, dra, keep) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = match tempfile::Builder::new().prefix("intel-gpu-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo: cannot create a directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut demo = match Demo::new(dir.path(), plugin, labeler, dra).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo: cannot build the simulated node: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Simulated StarlingX edge server in {}",
        dir.path().display()
    );
    println!(
        "  GPUs: Alder Lake iGPU (card0), Flex 170 PF (card1) with 4 VFs (card2–card5), Arc B580 on xe (card8)"
    );
    match steps(&mut demo).await {
        Ok(procs) => {
            println!("\ndemo: all 7 steps held");
            if keep {
                let path = dir.keep();
                println!("\nThe simulated node keeps running (Ctrl-C ends it). Poke at it:");
                println!(
                    "  {} inspect --sysfs-root {0}/node/sys --devfs-root {0}/node/dev",
                    path.display()
                );
                println!(
                    "  kubelet directory: {}/kubelet; API server: {}",
                    path.display(),
                    demo.api.url()
                );
                let _ = tokio::signal::ctrl_c().await;
            }
            drop(procs);
            ExitCode::SUCCESS
        }
        Err((n, name, e)) => {
            println!("\ndemo: step {n} ({name}) FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
