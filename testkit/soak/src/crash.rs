//! Part 4: crash-only. The plugin and the labeller are killed with
//! SIGKILL at random points (while starting, registering, writing CDI
//! specs or the NFD feature file after a GPU came or went) 100 times each,
//! and started again. A state is inconsistent when:
//!
//! - right after the kill: a CDI spec or the NFD feature file under its
//!   final name is not whole (a half-written file someone may read);
//! - once the next instance has settled: a socket of ours in the kubelet
//!   directory refuses connections (orphaned), a temporary file is left,
//!   the specs on disk are not exactly the advertised cards', or the
//!   feature file does not say what is wanted.
//!
//! Figures: `soak.crash.kills`, `soak.crash.inconsistent_states`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bench_report::Report;
use fake_gpu_node::FakeNode;
use kubelet_emulator::KubeletEmulator;

use crate::Opts;
use crate::plugin::edge_node;
use crate::util::{Proc, between, listed, plugin_command, poll_until, read_cdi_dir};

const I915: &str = "gpu.intel.com/i915";
const XE: &str = "gpu.intel.com/xe";
const LIMIT: Duration = Duration::from_secs(20);
const NFD_FILE: &str = "intel-gpu-labeler";
const ENABLED: &str = r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#;
const DISABLED: &str = r#"{"intel-qat-plugin": "intelqat=enabled"}"#;

/// Sockets in `dir` (other than the kubelet's) that refuse connections.
fn refusing_sockets(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "kubelet.sock" || !name.ends_with(".sock") {
            continue;
        }
        if std::os::unix::net::UnixStream::connect(e.path()).is_err() {
            out.push(name);
        }
    }
    out
}

async fn plugin_kills(o: &Opts, kills: usize, failures: &mut Vec<String>) -> anyhow::Result<usize> {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ 0x0004);
    let dir = tempfile::Builder::new()
        .prefix("soak-crash-plugin-")
        .tempdir()?;
    let spec = edge_node();
    let node = FakeNode::build(&dir.path().join("node"), &spec)?;
    let xe = spec.gpus.iter().find(|g| g.card == 8).cloned();
    let kdir = dir.path().join("kubelet");
    std::fs::create_dir_all(&kdir)?;
    let cdi = dir.path().join("cdi");
    let kubelet = KubeletEmulator::start(&kdir).await?;
    let log = o.out.join("crash-plugin.log");
    let mut xe_present = true;
    let mut bad = 0;
    for i in 0..=kills {
        let before = kubelet.view();
        let p = Proc::spawn(&mut plugin_command(&o.plugin, &node, &kdir, &cdi, 2), &log)?;
        // Settled: this instance registered what the node has, healthy (the
        // kubelet keeps a killed instance's lists, unhealthy, meanwhile),
        // then the checks of a consistent state left by the previous kill.
        let fresh = |v: &kubelet_emulator::View, r: &str, n: usize| {
            v.registrations(r) > before.registrations(r)
                && v.is_connected(r)
                && listed(v, r).is_some_and(|l| l.len() == n && l.iter().all(|d| d.1))
        };
        let settled = kubelet
            .wait_until(LIMIT, |v| {
                fresh(v, I915, 10)
                    && if xe_present {
                        fresh(v, XE, 2)
                    } else {
                        !v.is_connected(XE)
                    }
            })
            .await
            .is_ok();
        let mut problems = Vec::new();
        if !settled {
            problems.push("the plugin did not register its lists".to_owned());
        }
        // card0, the Flex PF's four VFs (the PF hidden), and card8 on xe.
        let want_cards = if xe_present { 6 } else { 5 };
        // Specs follow the cards off the main loop: give them a moment.
        let _ = poll_until(Duration::from_secs(5), || {
            let d = read_cdi_dir(&cdi);
            d.cards.len() == want_cards && d.temporary.is_empty()
        })
        .await;
        let d = read_cdi_dir(&cdi);
        if d.cards.len() != want_cards {
            problems.push(format!(
                "CDI specs for {:?}, want {want_cards} cards",
                d.cards
            ));
        }
        if !d.temporary.is_empty() {
            problems.push(format!("temporary files left: {:?}", d.temporary));
        }
        let refusing = refusing_sockets(&kdir);
        if !refusing.is_empty() {
            problems.push(format!(
                "orphaned sockets: {refusing:?} (the running plugin is pid {}, xe present: {xe_present})",
                p.pid()
            ));
        }
        if i == kills {
            break;
        }
        // Something to be in the middle of: the xe card comes or goes.
        let before_kill = between(&mut rng, Duration::ZERO, Duration::from_millis(300));
        if rng.bool()
            && let Some(g) = &xe
        {
            tokio::time::sleep(before_kill / 2).await;
            if xe_present {
                node.remove_gpu(8)?;
            } else {
                node.add_gpu(g)?;
            }
            xe_present = !xe_present;
            tokio::time::sleep(before_kill / 2).await;
        } else {
            tokio::time::sleep(before_kill).await;
        }
        p.kill9();
        let d = read_cdi_dir(&cdi);
        if !d.unparsable.is_empty() {
            problems.push(format!(
                "half-written specs after the kill: {:?}",
                d.unparsable
            ));
        }
        if !problems.is_empty() {
            bad += 1;
            failures.push(format!("crash: plugin kill {i}: {}", problems.join("; ")));
        }
    }
    Ok(bad)
}

/// The NFD feature file is whole: every line ends, and is a comment or
/// `key=value`.
fn feature_file_whole(text: &str) -> bool {
    text.ends_with('\n')
        && text
            .lines()
            .all(|l| l.starts_with('#') || l.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
}

async fn labeler_kills(
    o: &Opts,
    kills: usize,
    failures: &mut Vec<String>,
) -> anyhow::Result<usize> {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ 0x0005);
    let dir = tempfile::Builder::new()
        .prefix("soak-crash-labeler-")
        .tempdir()?;
    let spec = edge_node();
    let node = FakeNode::build(&dir.path().join("node"), &spec)?;
    let features = dir.path().join("features.d");
    let plugins = dir.path().join("enabled_kube_plugins");
    std::fs::write(&plugins, ENABLED)?;
    let mut enabled = true;
    let log = o.out.join("crash-labeler.log");
    let file = features.join(NFD_FILE);
    let mut bad = 0;
    for i in 0..=kills {
        let mut c = Command::new(&o.labeler);
        c.arg("--sysfs-root")
            .arg(node.sysfs_root())
            .arg("--devfs-root")
            .arg(node.devfs_root())
            .arg("--enabled-plugins-file")
            .arg(&plugins)
            .args(["--output", "nfd-features-file", "--nfd-features-dir"])
            .arg(&features)
            .args([
                "--node-name",
                "worker-0",
                "--settle",
                "50ms",
                "--removal-grace",
                "0s",
                "--http-address",
                "",
                "--log-level",
                "warn",
            ]);
        let p = Proc::spawn(&mut c, &log)?;
        let settled = poll_until(LIMIT, || {
            std::fs::read_to_string(&file).is_ok_and(|t| {
                feature_file_whole(&t)
                    && t.lines().any(|l| l.starts_with("gpu.intel.com/"))
                    && t.lines().any(|l| l == "intelgpu=enabled") == enabled
            })
        })
        .await
        .is_some();
        let mut problems = Vec::new();
        if !settled {
            problems.push(format!(
                "the feature file did not say what is wanted (enabled: {enabled}): {:?}",
                std::fs::read_to_string(&file).ok()
            ));
        }
        let temps: Vec<String> = std::fs::read_dir(&features)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        if !temps.is_empty() {
            problems.push(format!("temporary files left: {temps:?}"));
        }
        if i == kills {
            break;
        }
        // In the middle of a rewrite: the decision flips, then the kill.
        let before_kill = between(&mut rng, Duration::ZERO, Duration::from_millis(200));
        if rng.bool() {
            enabled = !enabled;
            let tmp = plugins.with_extension("new");
            std::fs::write(&tmp, if enabled { ENABLED } else { DISABLED })?;
            std::fs::rename(&tmp, &plugins)?;
        }
        tokio::time::sleep(before_kill).await;
        p.kill9();
        if let Ok(t) = std::fs::read_to_string(&file)
            && !feature_file_whole(&t)
        {
            problems.push(format!("a half-written feature file after the kill: {t:?}"));
        }
        if !problems.is_empty() {
            bad += 1;
            failures.push(format!("crash: labeller kill {i}: {}", problems.join("; ")));
        }
    }
    Ok(bad)
}

pub(crate) async fn run(
    o: &Opts,
    report: &mut Report,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let kills = if o.quick { 10 } else { 100 };
    let plugin_bad = plugin_kills(o, kills, failures).await?;
    let labeler_bad = labeler_kills(o, kills, failures).await?;
    report.metric("soak.crash.kills", (2 * kills) as f64);
    report.metric(
        "soak.crash.inconsistent_states",
        (plugin_bad + labeler_bad) as f64,
    );
    Ok(())
}
