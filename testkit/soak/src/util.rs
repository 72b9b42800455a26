//! What the parts share: child processes, /proc samples, statistics.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A child process, killed (SIGKILL) and reaped when dropped.
pub(crate) struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr appended to `log`.
    pub(crate) fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = file.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        Ok(Self { child })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, then reaped.
    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open file descriptors of a process.
pub(crate) fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(Iterator::count)
}

/// Resident memory of a process, KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The median of a window of samples.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    bench_report::percentile(&mut v, 50.0)
}

/// Polls `check` every millisecond until it holds or `limit` passes;
/// returns how long it took.
pub(crate) async fn poll_until(
    limit: Duration,
    mut check: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A random duration in `[lo, hi]`.
pub(crate) fn between(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    let lo_us = u64::try_from(lo.as_micros()).unwrap_or(u64::MAX);
    let hi_us = u64::try_from(hi.as_micros()).unwrap_or(u64::MAX).max(lo_us);
    Duration::from_micros(rng.u64(lo_us..=hi_us))
}

/// The CDI spec files in `dir` by card name (`card3`), and every entry
/// that is not one (temporary files, anything else), for checks.
pub(crate) struct CdiDir {
    pub(crate) cards: std::collections::BTreeSet<String>,
    pub(crate) unparsable: Vec<String>,
    pub(crate) temporary: Vec<String>,
}

/// The vendor-class prefix of the plugin's spec files.
const CDI_PREFIX: &str = "intel.cdi.k8s.io-gpu-";

pub(crate) fn read_cdi_dir(dir: &Path) -> CdiDir {
    let mut out = CdiDir {
        cards: Default::default(),
        unparsable: Vec::new(),
        temporary: Vec::new(),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            out.temporary.push(name);
            continue;
        }
        let Some(rest) = name.strip_prefix(CDI_PREFIX) else {
            continue;
        };
        let card = rest
            .strip_suffix(".json")
            .or_else(|| rest.strip_suffix(".yaml"))
            .unwrap_or(rest);
        let whole = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.get("cdiVersion").is_some() && v.get("devices").is_some());
        if !whole {
            out.unparsable.push(name.clone());
        }
        out.cards.insert(card.to_owned());
    }
    out
}

/// The plugin against a fake node, the kubelet directory and a CDI
/// directory; `--cdi-grace-ms 0` so the specs on disk follow the cards at
/// once (the grace is for the kubelet's cached answers, which no one
/// replays here).
pub(crate) fn plugin_command(
    bin: &Path,
    node: &fake_gpu_node::FakeNode,
    kubelet: &Path,
    cdi: &Path,
    shares: u32,
) -> Command {
    let mut c = Command::new(bin);
    // The hermetic namespace's test kernel (uevents are believed only from
    // the kernel's port otherwise).
    c.arg("--trust-uevent-port")
        .arg(fake_gpu_node::FAKE_KERNEL_PORT.to_string())
        .arg("--sysfs-root")
        .arg(node.sysfs_root())
        .arg("--devfs-root")
        .arg(node.devfs_root())
        .arg("--kubelet-dir")
        .arg(kubelet)
        .arg("--cdi-dir")
        .arg(cdi)
        .args(["--shared-dev-num", &shares.to_string()])
        .args([
            "--cdi-grace-ms",
            "0",
            "--http-address",
            "",
            "--log-level",
            "warn",
        ]);
    c
}

/// A device list as the kubelet holds it: IDs and health, sorted.
pub(crate) fn listed(v: &kubelet_emulator::View, resource: &str) -> Option<Vec<(String, bool)>> {
    v.devices(resource).map(|d| {
        let mut out: Vec<(String, bool)> = d
            .devices()
            .iter()
            .map(|x| {
                (
                    x.id.as_str().to_owned(),
                    x.health == devplugin_api::Health::Healthy,
                )
            })
            .collect();
        out.sort();
        out
    })
}
