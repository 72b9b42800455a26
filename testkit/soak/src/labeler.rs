//! Part 3: the labeller (and the controllers' publisher) through a
//! compressed stretch of cluster life — by default an hour, one change
//! every ten cluster seconds, each played at once — with 30 % of API
//! requests failing (500, 503, 429, slow, dropped):
//!
//! - the enabled-plugins file flipped, half the time rewritten in place
//!   (truncated, half written, the rest up to 50 ms later);
//! - the published ConfigMap deleted for up to 3 s (the decision is
//!   unknown: the plugin label must stay) and put back;
//! - the Node deleted and re-added up to 2 s later (by its kubelet, with
//!   its own labels again): the labeller must never create it;
//! - the GPUs all removed, all back, or only the iGPU;
//! - watch connections dropped before a change.
//!
//! Checked: after every change the labels converge to what is wanted (the
//! plugin label, and the discovery labels this GPU set gave the first
//! time); the API's audit trail shows no label owned by someone else
//! changed, no Node created by anyone, and the plugin label never removed
//! while the decision was unknown or wanted.
//!
//! Figures: `soak.labeler.changes`, `soak.labeler.converged`,
//! `soak.labeler.convergence_s_p50/_p99/_max`,
//! `soak.labeler.foreign_changes`, `soak.labeler.nodes_recreated`,
//! `soak.labeler.plugin_label_removed_while_unknown`,
//! `soak.labeler.requests_per_hour` (every request the API server saw from
//! both, per hour of the compressed cluster time; the daemons' own timers
//! are not compressed, so idle traffic is measured by the bench instead).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiserver_emulator::ApiServer;
use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, NodeSpec};

use crate::Opts;
use crate::util::{Proc, between, poll_until};

const NODE: &str = "worker-0";
const NAMESPACE: &str = "kube-system";
const CONFIGMAP: &str = "enabled-kube-plugins";
const KEY: &str = "enabled_kube_plugins";
const MANAGER: &str = "intel-gpu-labeler";
const PLUGIN_LABEL: &str = "intelgpu";
const ENABLED: &str = r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#;
const DISABLED: &str = r#"{"intel-qat-plugin": "intelqat=enabled"}"#;
/// Labels others own; none may ever change through the labeller.
const FOREIGN: [(&str, &str, &str); 3] = [
    ("kubelet", "kubernetes.io/hostname", NODE),
    ("admin", "example.com/team", "edge"),
    // In our namespace, set by someone else: still not ours.
    ("admin", "gpu.intel.com/custom", "mine"),
];
const LIMIT: Duration = Duration::from_secs(30);

/// When the ConfigMap's content became what (None: deleted).
type Timeline = Vec<(Instant, Option<String>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Gpus {
    All,
    IgpuOnly,
    None,
}

struct World {
    dir: PathBuf,
    api: Arc<ApiServer>,
    node: FakeNode,
    file: PathBuf,
    enabled: bool,
    gpus: Gpus,
    /// The discovery labels each GPU set gave the first time.
    reference: BTreeMap<Gpus, BTreeMap<String, String>>,
}

fn ours(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| *k != PLUGIN_LABEL && !FOREIGN.iter().any(|f| f.1 == k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl World {
    fn foreign_labels(&self) {
        for (manager, key, value) in FOREIGN {
            self.api.set_label(NODE, manager, key, Some(value));
        }
    }

    fn wants_plugin_label(&self) -> bool {
        self.enabled && self.gpus != Gpus::None
    }

    /// Whether the Node carries what is wanted.
    fn converged(&self) -> bool {
        let Some(n) = self.api.node(NODE) else {
            return false;
        };
        let foreign_ok = FOREIGN
            .iter()
            .all(|(_, k, v)| n.labels.get(*k).map(String::as_str) == Some(*v));
        let plugin_ok = (n.labels.get(PLUGIN_LABEL).map(String::as_str) == Some("enabled"))
            == self.wants_plugin_label();
        let discovery_ok = match (self.gpus, self.reference.get(&self.gpus)) {
            (Gpus::None, _) => ours(&n.labels).is_empty(),
            (_, Some(want)) => ours(&n.labels) == *want,
            (_, None) => !ours(&n.labels).is_empty(),
        };
        foreign_ok && plugin_ok && discovery_ok
    }

    fn write_file(
        &self,
        rng: &mut fastrand::Rng,
        content: &str,
    ) -> anyhow::Result<Option<Duration>> {
        if rng.bool() {
            let tmp = self.file.with_extension("new");
            std::fs::write(&tmp, content)?;
            std::fs::rename(&tmp, &self.file)?;
            return Ok(None);
        }
        // In place: truncated, half written, the rest a little later (as
        // an editor or a non-atomic copy would).
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.file)?;
        let half = content.len() / 2;
        f.write_all(&content.as_bytes()[..half])?;
        drop(f);
        let pause = between(rng, Duration::ZERO, Duration::from_millis(50));
        let rest = content.as_bytes()[half..].to_vec();
        let path = self.file.clone();
        std::thread::spawn(move || {
            std::thread::sleep(pause);
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(&rest));
        });
        Ok(Some(pause + Duration::from_millis(5)))
    }

    fn set_gpus(&mut self, gpus: Gpus) -> anyhow::Result<()> {
        let spec = crate::plugin::edge_node();
        for g in &spec.gpus {
            let _ = self.node.remove_gpu(g.card);
        }
        let keep: Vec<_> = match gpus {
            Gpus::All => spec.gpus.clone(),
            Gpus::IgpuOnly => spec.gpus.iter().filter(|g| g.card == 0).cloned().collect(),
            Gpus::None => Vec::new(),
        };
        for g in &keep {
            self.node.add_gpu(g)?;
        }
        self.gpus = gpus;
        Ok(())
    }
}

fn daemon(o: &Opts, w: &World, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let mut c = Command::new(&o.labeler);
    c.args(args)
        .arg("--kubeconfig")
        .arg(w.dir.join("kubeconfig"))
        .args(["--http-address", "", "--log-level", "warn"]);
    Proc::spawn(&mut c, log)
}

/// Waits until the plugin label is as wanted and our labels have not
/// changed for a second, and returns them.
async fn settled_labels(w: &World) -> anyhow::Result<BTreeMap<String, String>> {
    let start = Instant::now();
    let mut last = None;
    let mut since = Instant::now();
    while start.elapsed() < LIMIT {
        let labels = w.api.node(NODE).map(|n| n.labels).unwrap_or_default();
        let plugin = labels.contains_key(PLUGIN_LABEL) == w.wants_plugin_label();
        let now = ours(&labels);
        if last.as_ref() != Some(&now) || !plugin {
            last = Some(now);
            since = Instant::now();
        } else if since.elapsed() > Duration::from_secs(1) && !now.is_empty() {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the labels did not settle within {LIMIT:?}: {last:?}")
}

pub(crate) async fn run(
    o: &Opts,
    report: &mut Report,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ 0x0003);
    let dir = tempfile::Builder::new().prefix("soak-labeler-").tempdir()?;
    let node = FakeNode::build(&dir.path().join("node"), &NodeSpec::default())?;
    let api = ApiServer::start().await?;
    api.add_node(NODE);
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig())?;
    std::fs::create_dir_all(dir.path().join("etc"))?;
    std::fs::write(
        dir.path().join("etc/build.info"),
        "OS=\"debian\"\nSW_VERSION=\"24.09\"\n",
    )?;
    let file = dir
        .path()
        .join("opt/platform/config/24.09/enabled_kube_plugins");
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&file, ENABLED)?;
    let mut w = World {
        dir: dir.path().to_owned(),
        api: Arc::new(api),
        node,
        file,
        enabled: true,
        gpus: Gpus::None,
        reference: BTreeMap::new(),
    };
    w.foreign_labels();
    w.set_gpus(Gpus::All)?;
    let log = o.out.join("labeler-part.log");
    let host_root = w.dir.to_string_lossy().into_owned();
    let configmap = format!("{NAMESPACE}/{CONFIGMAP}");
    let _publisher = daemon(
        o,
        &w,
        &[
            "publish",
            "--configmap",
            &configmap,
            "--settle",
            "200ms",
            "--host-root",
            &host_root,
        ],
        &log,
    )?;
    let sysfs = w.node.sysfs_root().to_string_lossy().into_owned();
    let devfs = w.node.devfs_root().to_string_lossy().into_owned();
    let _labeler = daemon(
        o,
        &w,
        &[
            "--node-name",
            NODE,
            "--sysfs-root",
            &sysfs,
            "--devfs-root",
            &devfs,
            "--enabled-plugins-configmap",
            &configmap,
            "--removal-grace",
            "0s",
            "--settle",
            "200ms",
            "--resync",
            "2s",
        ],
        &log,
    )?;
    // The discovery labels of each GPU set, learned without faults.
    let all = settled_labels(&w).await?;
    w.reference.insert(Gpus::All, all);
    w.set_gpus(Gpus::IgpuOnly)?;
    let igpu = settled_labels(&w).await?;
    w.reference.insert(Gpus::IgpuOnly, igpu);
    w.set_gpus(Gpus::All)?;
    if poll_until(LIMIT, || w.converged()).await.is_none() {
        anyhow::bail!("the labeller did not converge before the faults began");
    }
    // The labeller's own: the plugin label and the discovery namespace,
    // but for a key someone else set there.
    let owned = |k: &str| {
        k == PLUGIN_LABEL
            || ((k.starts_with("gpu.intel.com/") || k == "intel.feature.node.kubernetes.io/gpu")
                && !FOREIGN.iter().any(|f| f.1 == k))
    };
    // The published ConfigMap's content over time, sampled every 5 ms, to
    // explain a finding.
    let cm_timeline: Arc<Mutex<Timeline>> = Arc::default();
    let sampler = {
        let (api, timeline) = (Arc::clone(&w.api), Arc::clone(&cm_timeline));
        tokio::spawn(async move {
            loop {
                let now = api
                    .configmap(NAMESPACE, CONFIGMAP)
                    .and_then(|(d, _)| d.get(KEY).cloned());
                {
                    let mut t = timeline
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if t.last().is_none_or(|(_, last)| *last != now) {
                        t.push((Instant::now(), now));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    w.api.fault_rate(0.3);
    let requests_before = w.api.requests().len();
    let changes = (o.duration.as_secs() / 10).max(1);
    let mut unknown: Vec<(Instant, Instant)> = Vec::new();
    let mut times = Samples::new();
    let mut converged = 0u64;
    // What the soak did when, to explain an audit finding.
    let mut timeline: Vec<(Instant, String)> = Vec::new();
    for i in 0..changes {
        tokio::time::sleep(between(
            &mut rng,
            Duration::ZERO,
            Duration::from_millis(300),
        ))
        .await;
        if rng.f64() < 0.15 {
            w.api.drop_watches();
        }
        let what = rng.u8(..4);
        timeline.push((
            Instant::now(),
            format!(
                "change {i}: kind {what}, enabled {}, gpus {:?}",
                w.enabled, w.gpus
            ),
        ));
        let mut pending_write = None;
        match what {
            0 => {
                w.enabled = !w.enabled;
                let content = if w.enabled { ENABLED } else { DISABLED };
                pending_write = w.write_file(&mut rng, content)?;
            }
            1 if w.wants_plugin_label() && w.converged() => {
                // Unknown for a while: the label must stay.
                let start = Instant::now();
                w.api.delete_configmap(NAMESPACE, CONFIGMAP);
                tokio::time::sleep(between(
                    &mut rng,
                    Duration::from_millis(100),
                    Duration::from_secs(3),
                ))
                .await;
                w.api.set_configmap(NAMESPACE, CONFIGMAP, &[(KEY, ENABLED)]);
                unknown.push((start, Instant::now()));
            }
            1 | 2 => {
                w.api.delete_node(NODE);
                tokio::time::sleep(between(&mut rng, Duration::ZERO, Duration::from_secs(2))).await;
                w.api.add_node(NODE);
                w.foreign_labels();
            }
            _ => {
                let next = [Gpus::All, Gpus::IgpuOnly, Gpus::None][rng.usize(..3)];
                w.set_gpus(next)?;
            }
        }
        if let Some(p) = pending_write {
            tokio::time::sleep(p).await;
        }
        match poll_until(LIMIT, || w.converged()).await {
            Some(took) => {
                converged += 1;
                times.push(took);
            }
            None => failures.push(format!(
                "labeler: change {i} (kind {what}) did not converge within {LIMIT:?}: enabled {}, gpus {:?}, node {:?}",
                w.enabled,
                w.gpus,
                w.api.node(NODE).map(|n| n.labels)
            )),
        }
    }
    sampler.abort();
    let requests = w.api.requests().len() - requests_before;
    w.api.fault_rate(0.0);

    // The audit trail.
    let writes = w.api.node_writes();
    let mut foreign = 0usize;
    let mut recreated = 0usize;
    let mut unknown_removals = 0usize;
    for wr in &writes {
        if wr.created {
            recreated += 1;
            failures.push(format!(
                "labeler: Node {} created by {}",
                wr.node, wr.manager
            ));
        }
        let keys: BTreeSet<&String> = wr
            .labels_before
            .keys()
            .chain(wr.labels_after.keys())
            .collect();
        for k in keys {
            if wr.labels_before.get(k) != wr.labels_after.get(k) && !owned(k) {
                foreign += 1;
                failures.push(format!(
                    "labeler: {} changed the foreign label {k}: {:?} → {:?}",
                    wr.manager,
                    wr.labels_before.get(k),
                    wr.labels_after.get(k)
                ));
            }
        }
        // The plugin label taken back by a decision: the discovery labels
        // stay (with no advertisable GPU past the removal grace, every
        // owned label goes, whatever the decision: that is not this).
        let discovery_after = wr
            .labels_after
            .keys()
            .any(|k| owned(k) && k != PLUGIN_LABEL);
        let removed = wr.labels_before.contains_key(PLUGIN_LABEL)
            && !wr.labels_after.contains_key(PLUGIN_LABEL)
            && discovery_after
            && !wr.created;
        if let Some((a, _)) = unknown
            .iter()
            .find(|(a, b)| removed && wr.at >= *a && wr.at <= *b)
        {
            unknown_removals += 1;
            let before: Vec<String> = timeline
                .iter()
                .filter(|(t, _)| *t <= wr.at && wr.at.duration_since(*t) < Duration::from_secs(15))
                .map(|(t, e)| format!("-{:.3}s {e}", wr.at.duration_since(*t).as_secs_f64()))
                .collect();
            let cm: Vec<String> = cm_timeline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .filter(|(t, _)| *t <= wr.at && wr.at.duration_since(*t) < Duration::from_secs(15))
                .map(|(t, c)| format!("-{:.3}s {c:?}", wr.at.duration_since(*t).as_secs_f64()))
                .collect();
            failures.push(format!(
                "labeler: {} removed the plugin label {:.3}s into an unknown window; before it: {} ; the ConfigMap: {}",
                wr.manager,
                wr.at.duration_since(*a).as_secs_f64(),
                before.join(" | "),
                cm.join(" | ")
            ));
        }
        if wr.manager != MANAGER {
            failures.push(format!(
                "labeler: an unexpected field manager wrote the Node: {}",
                wr.manager
            ));
        }
    }
    let hours = o.duration.as_secs_f64() / 3600.0;
    report.metric("soak.labeler.changes", changes as f64);
    report.metric("soak.labeler.converged", converged as f64);
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        report.metric(
            &format!("soak.labeler.convergence_s_{name}"),
            times.percentile_ms(p).map_or(f64::NAN, |ms| ms / 1000.0),
        );
    }
    report.metric("soak.labeler.foreign_changes", foreign as f64);
    report.metric("soak.labeler.nodes_recreated", recreated as f64);
    report.metric("soak.labeler.unknown_windows", unknown.len() as f64);
    report.metric(
        "soak.labeler.plugin_label_removed_while_unknown",
        unknown_removals as f64,
    );
    report.metric("soak.labeler.requests_per_hour", requests as f64 / hours);
    Ok(())
}
