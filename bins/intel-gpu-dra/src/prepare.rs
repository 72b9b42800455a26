//! Prepare and unprepare: a CDI spec per claim with each allocated GPU's
//! device nodes, its `/dev/dri/by-path` links (bind-mounted where they
//! are, as Intel's driver does) and environment naming the render nodes,
//! and a record of which devices are prepared for which claims (a device
//! that leaves the node while prepared stays published, tainted, until
//! its claims are unprepared).
//!
//! Environment, per claim: `RENDER_DEVICE` is the first allocated GPU's
//! render node (`/dev/dri/renderD129`) — the variable VA-API, oneVPL and
//! Intel's media samples read to pick a GPU — and `RENDER_DEVICE_<i>`
//! the render node of the claim's `i`-th GPU (allocation order), for
//! apps that take several.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use dra_api::cdi::ClaimSpecs;
use dra_api::{Allocated, ClaimRef, DevicePrepared, Driver, DriverError, PreparedClaim};
use kubelet_plumbing::cdi::{ContainerEdits, DeviceNode, SpecMount};
use tokio::sync::watch;

use crate::devices::{CDI_KIND, DRIVER, DeviceFacts};

/// The devices present now, by name (set by the main loop).
pub type Current = Arc<RwLock<BTreeMap<String, DeviceFacts>>>;

/// The Intel GPU DRA driver's `Driver`.
#[derive(Debug)]
pub struct GpuDriver {
    pool: String,
    current: Current,
    /// Device → claim UIDs prepared with it.
    prepared: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Bumped when the set of prepared devices changes.
    changed: watch::Sender<u64>,
    /// Times each prepare and unprepare for the liveness watchdog.
    progress: Option<Arc<ops_http::Progress>>,
}

impl GpuDriver {
    /// A driver for the pool `pool` (the node's name).
    #[must_use]
    pub fn new(pool: &str, current: Current) -> Self {
        Self {
            pool: pool.to_owned(),
            current,
            prepared: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            progress: None,
        }
    }

    /// Times every prepare and unprepare with `progress`: one stuck (the
    /// framework serializes them, so every pod behind it waits) fails
    /// `/healthz`.
    #[must_use]
    pub fn timed(mut self, progress: Arc<ops_http::Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The CDI specs of this driver's claims in `cdi_dir` (the framework
    /// writes them).
    #[must_use]
    pub fn specs(cdi_dir: &Path) -> ClaimSpecs {
        ClaimSpecs::new(cdi_dir, CDI_KIND, &format!("{DRIVER}-claim_"))
    }

    /// The devices prepared for some claim.
    #[must_use]
    pub fn prepared_devices(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }

    /// Follows changes of [`GpuDriver::prepared_devices`].
    #[must_use]
    pub fn watch_prepared(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.prepared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The container edits of one GPU, the `i`-th of its claim.
#[must_use]
pub fn edits(facts: &DeviceFacts, i: usize) -> ContainerEdits {
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let mut env = Vec::new();
    if let Some(render) = &facts.render {
        if i == 0 {
            env.push(format!("RENDER_DEVICE={}", text(render)));
        }
        env.push(format!("RENDER_DEVICE_{i}={}", text(render)));
    }
    ContainerEdits {
        env,
        device_nodes: facts
            .nodes
            .iter()
            .map(|p| DeviceNode {
                path: text(p),
                host_path: None,
                permissions: Some("rw".into()),
            })
            .collect(),
        mounts: facts
            .by_path
            .iter()
            .map(|p| SpecMount {
                host_path: text(p),
                container_path: text(p),
                options: vec!["bind".into(), "rw".into()],
                kind: Some("none".into()),
            })
            .collect(),
    }
}

impl Driver for GpuDriver {
    /// Starts from the claims the record holds. Records rebuilt from a
    /// CDI spec are unverified (anyone who can write the CDI directory can
    /// plant one) and reserve nothing until the kubelet names the claim
    /// again; the scheduler still keeps their devices allocated.
    fn restore(&self, claims: &BTreeMap<String, PreparedClaim>) {
        {
            let mut map = self.lock();
            for (uid, claim) in claims.iter().filter(|(_, c)| !c.rebuilt) {
                for d in &claim.devices {
                    map.entry(d.device.clone()).or_default().insert(uid.clone());
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn prepare(
        &self,
        claim: &ClaimRef,
        devices: &[Allocated],
    ) -> Result<Vec<DevicePrepared>, DriverError> {
        let _timed = self.progress.as_ref().map(|p| p.begin("a claim's prepare"));
        let current = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Checked and recorded under one lock: two claims prepared at once
        // cannot both pass the checks.
        let mut map = self.lock();
        let mut distinct: Vec<(&str, ContainerEdits)> = Vec::new();
        for d in devices {
            if d.pool != self.pool {
                return Err(DriverError(format!(
                    "device {} is in pool {}, not this node's pool {}",
                    d.device, d.pool, self.pool
                )));
            }
            let Some(facts) = current.get(&d.device) else {
                return Err(DriverError(format!(
                    "device {} is not on this node (any more)",
                    d.device
                )));
            };
            // One GPU, one owner: a device published whole is never
            // prepared for two claims, and a PF never beside one of its
            // VFs prepared for another claim (the scheduler's counters
            // keep them apart; this holds when the node's mode changed
            // under running claims too).
            let others = |device: &str| {
                map.get(device)
                    .and_then(|uids| uids.iter().find(|u| **u != claim.uid).cloned())
            };
            if !facts.shared
                && let Some(other) = others(&d.device)
            {
                return Err(DriverError(format!(
                    "device {} is prepared for claim {other} and is not shared",
                    d.device
                )));
            }
            if let Some(family) = &facts.family {
                for (name, f) in &current {
                    let related = name != &d.device
                        && f.family.as_ref() == Some(family)
                        && (f.is_pf || facts.is_pf);
                    if related && let Some(other) = others(name) {
                        return Err(DriverError(format!(
                            "device {} shares SR-IOV PF {family} with device {name}, prepared for claim {other}",
                            d.device
                        )));
                    }
                }
            }
            // A device twice in one claim (two requests on one shared
            // GPU) is one CDI device.
            if !distinct.iter().any(|(n, _)| *n == d.device) {
                distinct.push((d.device.as_str(), edits(facts, distinct.len())));
            }
        }
        // A claim prepared again (after a reboot, or over an older
        // record) holds exactly its devices now: none of its earlier ones.
        map.retain(|_, uids| {
            uids.remove(&claim.uid);
            !uids.is_empty()
        });
        for d in devices {
            map.entry(d.device.clone())
                .or_default()
                .insert(claim.uid.clone());
        }
        drop(map);
        self.changed.send_modify(|n| *n += 1);
        // The framework writes the claim's CDI spec: one CDI device per
        // distinct device.
        Ok(devices
            .iter()
            .map(|d| DevicePrepared {
                requests: vec![d.request.clone()],
                pool: d.pool.clone(),
                device: d.device.clone(),
                edits: distinct
                    .iter()
                    .find(|(n, _)| *n == d.device)
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default(),
            })
            .collect())
    }

    fn unprepare(&self, claim: &ClaimRef, _: Option<&PreparedClaim>) -> Result<(), DriverError> {
        // By the claim's UID, with or without a record; the framework
        // removes the CDI spec.
        let _timed = self
            .progress
            .as_ref()
            .map(|p| p.begin("a claim's unprepare"));
        let mut map = self.lock();
        map.retain(|_, uids| {
            uids.remove(&claim.uid);
            !uids.is_empty()
        });
        drop(map);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }
}
