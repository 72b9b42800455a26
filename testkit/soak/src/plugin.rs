//! Part 1: the plugin through a thousand kubelet restarts (random pauses
//! of 10 ms – 2 s), mixed with ListAndWatch streams ended while the kubelet
//! stays up, kubelet absences of up to 30 s and kubelets of older versions
//! (1.24: answer first, dial after; 1.25: the socket path as
//! `:authority`). After every restart each resource must be registered
//! again, connected, with the complete list, healthy.
//!
//! Figures: `soak.plugin.restarts`, `soak.plugin.restarts_survived`,
//! `soak.plugin.stream_ends`, `soak.plugin.reregister_ms_p50/_p99/_max`
//! (kubelet.sock served again → the kubelet holds every complete list),
//! `soak.plugin.fd_growth` and `soak.plugin.rss_growth_pct` (median of the
//! last tenth of the samples against the tenth right after a warm-up of
//! the first 30 %).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, NodeSpec};
use kubelet_emulator::{KubeletEmulator, KubeletVersion, View};

use crate::Opts;
use crate::util::{Proc, between, fd_count, listed, median, plugin_command, rss_kib};

const I915: &str = "gpu.intel.com/i915";
const XE: &str = "gpu.intel.com/xe";
/// How long one recovery may take before it counts as not survived.
const LIMIT: Duration = Duration::from_secs(20);

/// The StarlingX edge node of the demo: iGPU, a Flex 170 PF with 4 VFs
/// (hidden PF), and an Arc B580 on `xe`.
pub(crate) fn edge_node() -> NodeSpec {
    NodeSpec::starlingx_edge_with_arc()
}

type Truth = BTreeMap<&'static str, Vec<(String, bool)>>;

fn matches(v: &View, truth: &Truth, before: &BTreeMap<&'static str, u32>) -> bool {
    truth.iter().all(|(r, want)| {
        v.registrations(r) > before.get(r).copied().unwrap_or(0)
            && v.is_connected(r)
            && listed(v, r).as_ref() == Some(want)
    })
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Restart,
    Absent(Duration),
    Version(KubeletVersion),
}

pub(crate) async fn run(
    o: &Opts,
    report: &mut Report,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ 0x0001);
    let dir = tempfile::Builder::new().prefix("soak-plugin-").tempdir()?;
    let node = FakeNode::build(&dir.path().join("node"), &edge_node())?;
    let kdir = dir.path().join("kubelet");
    std::fs::create_dir_all(&kdir)?;
    let cdi = dir.path().join("cdi");
    let mut kubelet = KubeletEmulator::start(&kdir).await?;
    let log = o.out.join("plugin-part.log");
    let plugin = Proc::spawn(&mut plugin_command(&o.plugin, &node, &kdir, &cdi, 2), &log)?;
    let first = kubelet
        .wait_until(LIMIT, |v| {
            listed(v, I915).is_some_and(|l| l.len() == 10 && l.iter().all(|d| d.1))
                && listed(v, XE).is_some_and(|l| l.len() == 2)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the plugin never registered both resources: {e}"))?;
    let truth: Truth = [I915, XE]
        .into_iter()
        .map(|r| (r, listed(&first, r).unwrap_or_default()))
        .collect();

    let restarts: usize = if o.quick { 40 } else { 1000 };
    let (pause_lo, pause_hi) = (Duration::from_millis(10), Duration::from_secs(2));
    let pause_hi = if o.quick {
        Duration::from_millis(150)
    } else {
        pause_hi
    };
    let absence_max = if o.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(30)
    };
    let mut reregister = Samples::new();
    let mut survived = 0usize;
    let mut stream_ends = 0usize;
    let mut fds: Vec<f64> = Vec::new();
    let mut rss: Vec<f64> = Vec::new();
    for i in 0..restarts {
        tokio::time::sleep(between(&mut rng, pause_lo, pause_hi)).await;
        // A stream ended while the kubelet stays up (a receive error).
        if rng.f64() < 0.15 {
            let r = if rng.bool() { I915 } else { XE };
            let v = kubelet.view();
            let before: BTreeMap<&'static str, u32> = [(r, v.registrations(r))].into();
            let only: Truth = [(r, truth[r].clone())].into();
            kubelet.end_stream(r);
            stream_ends += 1;
            if kubelet
                .wait_until(LIMIT, |v| matches(v, &only, &before))
                .await
                .is_err()
            {
                failures.push(format!(
                    "plugin: stream end {stream_ends} of {r} (before restart {i}): not registered again within {LIMIT:?}"
                ));
            }
        }
        let roll = rng.f64();
        let kind = if roll < if o.quick { 0.05 } else { 0.01 } {
            Kind::Absent(between(&mut rng, Duration::ZERO, absence_max))
        } else if roll < 0.12 {
            Kind::Version(
                [
                    KubeletVersion::V1_24,
                    KubeletVersion::V1_25,
                    KubeletVersion::default(),
                ][rng.usize(..3)],
            )
        } else {
            Kind::Restart
        };
        let before: BTreeMap<&'static str, u32> = match kind {
            Kind::Version(_) => BTreeMap::new(),
            _ => {
                let v = kubelet.view();
                truth.keys().map(|r| (*r, v.registrations(r))).collect()
            }
        };
        match kind {
            Kind::Restart => kubelet.restart().await?,
            Kind::Absent(d) => {
                kubelet.stop().await;
                tokio::time::sleep(d).await;
                kubelet.resume().await?;
            }
            Kind::Version(version) => {
                kubelet.stop().await;
                kubelet = KubeletEmulator::absent_as(&kdir, version);
                kubelet.resume().await?;
            }
        }
        let served = Instant::now();
        match kubelet
            .wait_until(LIMIT, |v| matches(v, &truth, &before))
            .await
        {
            Ok(_) => {
                survived += 1;
                let took = served.elapsed();
                if took > Duration::from_millis(100) {
                    println!(
                        "plugin: restart {i} ({kind:?}) re-registered after {:.1} ms",
                        took.as_secs_f64() * 1000.0
                    );
                }
                reregister.push(took);
            }
            Err(e) => failures.push(format!(
                "plugin: restart {i} ({kind:?}) not survived: {}",
                e.to_string().lines().next().unwrap_or_default()
            )),
        }
        if let (Some(f), Some(r)) = (fd_count(plugin.pid()), rss_kib(plugin.pid())) {
            fds.push(f as f64);
            rss.push(r as f64);
        }
    }
    report.metric("soak.plugin.restarts", restarts as f64);
    report.metric("soak.plugin.restarts_survived", survived as f64);
    report.metric("soak.plugin.stream_ends", stream_ends as f64);
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        report.metric(
            &format!("soak.plugin.reregister_ms_{name}"),
            reregister.percentile_ms(p).unwrap_or(f64::NAN),
        );
    }
    // The samples, for a closer look (restart, fds, RSS KiB).
    let csv: String = fds
        .iter()
        .zip(&rss)
        .enumerate()
        .map(|(i, (f, r))| format!("{i},{f},{r}\n"))
        .collect();
    let _ = std::fs::write(
        o.out.join("plugin-samples.csv"),
        format!("restart,fds,rss_kib\n{csv}"),
    );
    // Warm-up: the first 30 % (the allocator's arenas and the runtime's
    // buffers grow towards their high-water marks over the first few
    // hundred restarts: +530 KiB in the first 100, then +64, +44, +32 KiB
    // per 100, then flat within a page or two). Growth: the median of the
    // last tenth against the median of the tenth right after warm-up, at
    // quiescent points. Every sample is in plugin-samples.csv.
    let tenth = (fds.len() / 10).max(1);
    let warm = fds.len() * 3 / 10;
    if fds.len() >= warm + 2 * tenth {
        let early = |v: &[f64]| median(&v[warm..warm + tenth]);
        let late = |v: &[f64]| median(&v[v.len() - tenth..]);
        if let (Some(a), Some(b)) = (early(&fds), late(&fds)) {
            report.metric("soak.plugin.fd_growth", (b - a).max(0.0));
        }
        if let (Some(a), Some(b)) = (early(&rss), late(&rss)) {
            report.metric("soak.plugin.rss_growth_pct", ((b - a) / a * 100.0).max(0.0));
            report.metric("soak.plugin.rss_kib_after_warmup", a);
            report.metric("soak.plugin.rss_kib_end", b);
        }
    } else {
        report.skip("soak.plugin.fd_growth", "too few samples");
        report.skip("soak.plugin.rss_growth_pct", "too few samples");
    }
    if survived < restarts {
        println!("plugin: the plugin's log is {}", log.display());
    }
    drop(plugin);
    Ok(())
}
