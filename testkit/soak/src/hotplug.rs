//! Part 2: the plugin through ten thousand uevents on a fake node, in the
//! kernel's order (fake-gpu-node's `plug_gpu`/`unplug_gpu`: sysfs and
//! devtmpfs nodes before the `add` uevent, udev's by-path links after;
//! nodes gone before the `remove` uevent), injected into a hermetic
//! network namespace as the kernel sends them:
//!
//! - single GPUs plugged and unplugged;
//! - bursts: 50 GPUs' minors (100 uevents) sent within about a millisecond;
//! - driver rebinds `i915` ↔ `xe` (the DRM device goes and comes back
//!   under the other driver);
//! - VFs enabled and disabled on an SR-IOV PF (the PF's DRM device and
//!   its VFs' go and come back with the new count);
//! - `/dev/dri` removed and recreated (every minor gone, then the
//!   directory, as udev does when the last one goes; then all back);
//! - garbage: random bytes, truncated messages, other subsystems, DRM
//!   uevents for devices that do not exist.
//!
//! After each storm, the kubelet's lists must equal the node's truth (the
//! cards, all healthy) and the CDI specs on disk must be exactly those
//! cards', each whole. Figures: `soak.hotplug.events`,
//! `soak.hotplug.storms`, `soak.hotplug.mismatches`,
//! `soak.hotplug.time_to_truth_ms_p50/_p99/_max` (the storm's last
//! uevent → lists and specs true).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bench_report::{Report, Samples};
use fake_gpu_node::{FakeNode, GpuSpec, KernelEvent, inject_uevent};
use kubelet_emulator::{KubeletEmulator, View};

use crate::Opts;
use crate::util::{Proc, between, listed, plugin_command, poll_until, read_cdi_dir};

pub(crate) const FIGURES: [&str; 6] = [
    "soak.hotplug.events",
    "soak.hotplug.storms",
    "soak.hotplug.mismatches",
    "soak.hotplug.time_to_truth_ms_p50",
    "soak.hotplug.time_to_truth_ms_p99",
    "soak.hotplug.time_to_truth_ms_max",
];

const I915: &str = "gpu.intel.com/i915";
const XE: &str = "gpu.intel.com/xe";
const LIMIT: Duration = Duration::from_secs(10);
/// The storm kinds, as figures name them.
const KINDS: [&str; 6] = ["single", "burst", "rebind", "vfs", "dri_gone", "garbage"];
/// The Flex 170's device id (SR-IOV capable, i915).
const FLEX: &str = "0x56c0";
/// Battlemage, which both drivers know.
const B580: &str = "0xe20b";

/// One PCI function slot of the node and what is plugged in it.
#[derive(Debug, Clone)]
struct Slot {
    card: u32,
    address: String,
    device: &'static str,
    driver: &'static str,
    /// SR-IOV: (total, enabled, first VF card).
    sriov: Option<(u32, u32, u32)>,
    present: bool,
}

impl Slot {
    fn spec(&self) -> GpuSpec {
        let mut g = GpuSpec::new(self.card)
            .at(&self.address)
            .device(self.device)
            .driver(Some(self.driver));
        if let Some((total, enabled, first)) = self.sriov {
            g = g.sriov(total, enabled, first);
        }
        g
    }

    /// The cards the plugin advertises for this slot, by resource.
    fn advertised(&self, out: &mut BTreeMap<&'static str, BTreeSet<u32>>) {
        if !self.present {
            return;
        }
        let resource = if self.driver == "xe" { XE } else { I915 };
        match self.sriov {
            // A PF with VFs enabled is hidden; its VFs are advertised.
            Some((_, enabled, first)) if enabled > 0 => {
                out.entry(resource)
                    .or_default()
                    .extend(first..first + enabled);
            }
            _ => {
                out.entry(resource).or_default().insert(self.card);
            }
        }
    }
}

struct Storm<'a> {
    node: &'a FakeNode,
    sent: usize,
    last: Instant,
}

impl Storm<'_> {
    fn send(&mut self, message: &[u8]) -> anyhow::Result<()> {
        inject_uevent(message)?;
        self.sent += 1;
        self.last = Instant::now();
        Ok(())
    }

    fn plug(&mut self, slot: &mut Slot) -> anyhow::Result<()> {
        let mut events = Vec::new();
        self.node.plug_gpu(&slot.spec(), |e: &KernelEvent| {
            events.push(e.to_kernel_message())
        })?;
        for e in events {
            self.send(&e)?;
        }
        slot.present = true;
        Ok(())
    }

    fn unplug(&mut self, slot: &mut Slot) -> anyhow::Result<()> {
        let mut events = Vec::new();
        self.node.unplug_gpu(slot.card, |e: &KernelEvent| {
            events.push(e.to_kernel_message())
        })?;
        for e in events {
            self.send(&e)?;
        }
        slot.present = false;
        Ok(())
    }
}

fn garbage(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(..5) {
        0 => (0..rng.usize(1..300)).map(|_| rng.u8(..)).collect(),
        1 => b"add@/devices/pci0000:00/0000:03:00.0/drm/ca".to_vec(),
        2 => b"change@/devices/virtual/net/lo\0ACTION=change\0SUBSYSTEM=net\0".to_vec(),
        3 => b"add@/devices/pci0000:00/0000:fe:00.0/drm/card99\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:fe:00.0/drm/card99\0SUBSYSTEM=drm\0DEVNAME=dri/card99\0DEVTYPE=drm_minor\0".to_vec(),
        _ => b"libudev\0\xfe\xed\xca\xfe garbage after a udev header".to_vec(),
    }
}

fn truth_of(slots: &[Slot]) -> BTreeMap<&'static str, Vec<(String, bool)>> {
    let mut cards: BTreeMap<&'static str, BTreeSet<u32>> = BTreeMap::new();
    for s in slots {
        s.advertised(&mut cards);
    }
    [I915, XE]
        .into_iter()
        .map(|r| {
            let mut ids: Vec<(String, bool)> = cards
                .get(r)
                .into_iter()
                .flatten()
                .map(|c| (format!("card{c}-0"), true))
                .collect();
            ids.sort();
            (r, ids)
        })
        .collect()
}

fn holds(v: &View, truth: &BTreeMap<&'static str, Vec<(String, bool)>>) -> bool {
    truth
        .iter()
        .all(|(r, want)| listed(v, r).unwrap_or_default() == *want)
}

fn cdi_holds(cdi: &std::path::Path, truth: &BTreeMap<&'static str, Vec<(String, bool)>>) -> bool {
    let want: BTreeSet<String> = truth
        .values()
        .flatten()
        .filter_map(|(id, _)| id.strip_suffix("-0").map(str::to_owned))
        .collect();
    let seen = read_cdi_dir(cdi);
    seen.cards == want && seen.unparsable.is_empty()
}

pub(crate) async fn run(
    o: &Opts,
    report: &mut Report,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(o.seed ^ 0x0002);
    let dir = tempfile::Builder::new().prefix("soak-hotplug-").tempdir()?;
    let node = FakeNode::create(&dir.path().join("node"))?;
    let kdir = dir.path().join("kubelet");
    std::fs::create_dir_all(&kdir)?;
    // /var/run/cdi is on tmpfs on a real node (/run): so is this one,
    // where the machine has one.
    let shm = tempfile::Builder::new()
        .prefix("soak-hotplug-cdi-")
        .tempdir_in("/dev/shm") // tidy: allow-host-path
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("soak-hotplug-cdi-")
                .tempdir()
        })?;
    let cdi = shm.path().join("cdi");
    let kubelet = KubeletEmulator::start(&kdir).await?;
    // The iGPU, five discrete slots, an SR-IOV PF, and fifty burst slots.
    let mut slots: Vec<Slot> = vec![Slot {
        card: 0,
        address: "0000:00:02.0".into(),
        device: "0x4680",
        driver: "i915",
        sriov: None,
        present: false,
    }];
    for i in 0..5u32 {
        slots.push(Slot {
            card: 10 + i,
            address: format!("0000:{:02x}:00.0", 0x10 + i),
            device: B580,
            driver: if i % 2 == 0 { "i915" } else { "xe" },
            sriov: None,
            present: false,
        });
    }
    slots.push(Slot {
        card: 20,
        address: "0000:20:00.0".into(),
        device: FLEX,
        driver: "i915",
        sriov: Some((7, 2, 21)),
        present: false,
    });
    const PF: usize = 6;
    for i in 0..50u32 {
        slots.push(Slot {
            card: 100 + i,
            address: format!("0000:{:02x}:00.0", 0x40 + i),
            device: B580,
            driver: "i915",
            sriov: None,
            present: false,
        });
    }
    // Start with the iGPU, the discrete slots and the PF present.
    for s in slots.iter_mut().take(PF + 1) {
        node.add_gpu(&s.spec())?;
        s.present = true;
    }
    let log = o.out.join("hotplug-part.log");
    let _plugin = Proc::spawn(&mut plugin_command(&o.plugin, &node, &kdir, &cdi, 1), &log)?;
    let start = truth_of(&slots);
    kubelet
        .wait_until(LIMIT, |v| holds(v, &start))
        .await
        .map_err(|e| anyhow::anyhow!("the plugin never advertised the first cards: {e}"))?;
    let target = if o.quick { 600 } else { 10_000 };
    let mut storm = Storm {
        node: &node,
        sent: 0,
        last: Instant::now(),
    };
    let mut times = Samples::new();
    let mut by_kind: BTreeMap<&'static str, Samples> = BTreeMap::new();
    let mut storms = 0usize;
    let mut mismatches = 0usize;
    while storm.sent < target {
        let kind = rng.u8(..6);
        match kind {
            // Single GPUs in and out.
            0 => {
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(1..=5);
                    let mut s = slots[i].clone();
                    if s.present {
                        storm.unplug(&mut s)?;
                    } else {
                        storm.plug(&mut s)?;
                    }
                    slots[i] = s;
                }
            }
            // A burst: the fifty slots' 100 minors at once. The tree is
            // changed first, then the uevents sent back to back.
            1 => {
                let adding = !slots[PF + 1].present;
                let mut events = Vec::new();
                for s in slots.iter_mut().skip(PF + 1) {
                    if adding {
                        node.plug_gpu(&s.spec(), |e: &KernelEvent| {
                            events.push(e.to_kernel_message())
                        })?;
                    } else {
                        node.unplug_gpu(s.card, |e: &KernelEvent| {
                            events.push(e.to_kernel_message())
                        })?;
                    }
                    s.present = adding;
                }
                for e in &events {
                    storm.send(e)?;
                }
            }
            // A rebind: i915 ↔ xe.
            2 => {
                let i = rng.usize(1..=5);
                let mut s = slots[i].clone();
                if s.present {
                    storm.unplug(&mut s)?;
                }
                s.driver = if s.driver == "xe" { "i915" } else { "xe" };
                storm.plug(&mut s)?;
                slots[i] = s;
            }
            // VFs enabled or disabled on the PF.
            3 => {
                let mut s = slots[PF].clone();
                if s.present {
                    storm.unplug(&mut s)?;
                }
                if let Some((total, _, first)) = s.sriov {
                    s.sriov = Some((total, rng.u32(0..=4), first));
                }
                storm.plug(&mut s)?;
                slots[PF] = s;
            }
            // /dev/dri goes away with every minor, then comes back.
            4 => {
                let present: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].present).collect();
                for &i in &present {
                    let mut s = slots[i].clone();
                    storm.unplug(&mut s)?;
                    slots[i] = s;
                }
                let dri = node.devfs_root().join("dri");
                let _ = std::fs::remove_dir_all(&dri);
                tokio::time::sleep(between(&mut rng, Duration::ZERO, Duration::from_millis(20)))
                    .await;
                std::fs::create_dir_all(dri.join("by-path"))?;
                for &i in &present {
                    let mut s = slots[i].clone();
                    storm.plug(&mut s)?;
                    slots[i] = s;
                }
            }
            // Garbage.
            _ => {
                for _ in 0..rng.usize(5..30) {
                    storm.send(&garbage(&mut rng))?;
                }
            }
        }
        storms += 1;
        let truth = truth_of(&slots);
        let took = poll_until(LIMIT, || {
            holds(&kubelet.view(), &truth) && cdi_holds(&cdi, &truth)
        })
        .await;
        match took {
            Some(_) => {
                let took = storm.last.elapsed();
                times.push(took);
                by_kind
                    .entry(KINDS[usize::from(kind)])
                    .or_default()
                    .push(took);
            }
            None => {
                mismatches += 1;
                let v = kubelet.view();
                failures.push(format!(
                    "hotplug: storm {storms} (kind {kind}): not true within {LIMIT:?}: want {truth:?}, kubelet has i915 {:?} xe {:?}, CDI {:?}",
                    listed(&v, I915),
                    listed(&v, XE),
                    read_cdi_dir(&cdi).cards
                ));
                if mismatches > 20 {
                    break;
                }
            }
        }
    }
    for (kind, samples) in &by_kind {
        report.metric(
            &format!("soak.hotplug.{kind}_ms_p99"),
            samples.percentile_ms(99.0).unwrap_or(f64::NAN),
        );
    }
    report.metric("soak.hotplug.events", storm.sent as f64);
    report.metric("soak.hotplug.storms", storms as f64);
    report.metric("soak.hotplug.mismatches", mismatches as f64);
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        report.metric(
            &format!("soak.hotplug.time_to_truth_ms_{name}"),
            times.percentile_ms(p).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
