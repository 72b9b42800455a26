//! The DRA service the kubelet calls on the driver's endpoint:
//! `NodePrepareResources` and `NodeUnprepareResources`, served as both
//! `v1` (kubelets 1.34+) and `v1beta1` (1.32–1.33) on one socket.
//!
//! For each claim asked about, the answer has an entry keyed by its UID
//! (the kubelet calls again for a claim missing from it). Preparing looks
//! the claim up by namespace and name, insists on the UID the kubelet gave
//! (a claim deleted and re-created under the same name is not the one
//! allocated), takes the allocation results of this driver only, asks the
//! driver, writes the claim's CDI spec and records both in the checkpoint
//! before answering. A claim answered from the record has its spec
//! written again first, wherever it is missing or different (a reboot
//! empties `/var/run/cdi`, a tmpfs, and keeps the checkpoint on disk).
//! Namespace, name and UID are checked ([`crate::check_claim_ref`]) before
//! they reach a path or a URL.
//! Both calls are idempotent: a claim prepared before answers from the
//! record, a claim not prepared unprepares as a success. A failure of one
//! claim is that claim's `error`; the others are answered as usual.
//! Calls into the driver are serialized (as the Go helper's default),
//! lookups are not.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Mutex, watch};
use tonic::{Request, Response, Status};

use kubelet_plumbing::cdi::{ContainerEdits, SpecDevice};

use crate::cdi::ClaimSpecs;
use crate::checkpoint::{Checkpoint, CheckpointError, Loaded, PreparedClaim, PreparedDevice};
use crate::names::{DriverName, check_claim_ref};
use crate::pb::{dra_v1 as v1, dra_v1beta1 as v1beta1};

/// A ResourceClaim as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID: the one object meant.
    pub uid: String,
}

impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// One allocation result of a claim (`status.allocation.devices.results[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationResult {
    /// The request it satisfies (`main/sub` for a subrequest).
    pub request: String,
    /// The driver that owns the device.
    pub driver: String,
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
}

/// Why a claim could not be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// No claim of that name.
    #[error("ResourceClaim {namespace}/{name} does not exist")]
    NotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The claim of that name is another object.
    #[error(
        "ResourceClaim {namespace}/{name} has UID {found}, not {wanted}: it was deleted and re-created"
    )]
    Replaced {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The UID asked for.
        wanted: String,
        /// The UID found.
        found: String,
    },
    /// The claim has no allocation.
    #[error("ResourceClaim {namespace}/{name} is not allocated")]
    NotAllocated {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The API server could not be asked (worth retrying).
    #[error("could not read ResourceClaim {namespace}/{name}: {reason}")]
    Unavailable {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// Where claims are looked up: the API server, or a fake in tests.
pub trait ClaimSource: Send + Sync + 'static {
    /// The allocation results of `claim`, every driver's, after checking
    /// that the object found has `claim.uid`.
    fn allocation(
        &self,
        claim: &ClaimRef,
    ) -> impl Future<Output = Result<Vec<AllocationResult>, ClaimError>> + Send;
}

/// A device of this driver allocated to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// The claim's request it satisfies (a subrequest's main request).
    pub request: String,
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
}

/// One allocated device as the driver prepared it: what the kubelet is
/// told and what the container gets. Devices of one claim with the same
/// `device` share one CDI device (the first one's edits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePrepared {
    /// The claim's requests the device serves.
    pub requests: Vec<String>,
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
    /// What the container runtime adds for it (device nodes, mounts,
    /// environment), written by the framework into the claim's CDI spec.
    pub edits: ContainerEdits,
}

/// A driver's own failure, shown to the kubelet (and in the pod's events).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// What a DRA driver does; the framework does the rest.
pub trait Driver: Send + Sync + 'static {
    /// Prepares the devices allocated to `claim` (this driver's only) and
    /// says, per device, what the container runtime is to add; the
    /// framework writes the claim's CDI spec. Called once per claim: a
    /// claim prepared before is answered from the checkpoint (a claim
    /// whose record was rebuilt from its spec is prepared again in full,
    /// under the same UID).
    ///
    /// # Errors
    /// The claim's failure, for the kubelet.
    fn prepare(
        &self,
        claim: &ClaimRef,
        devices: &[Allocated],
    ) -> Result<Vec<DevicePrepared>, DriverError>;

    /// Told, once at start and before the service answers anything, which
    /// claims the record holds (read, or rebuilt from their CDI specs:
    /// those have `rebuilt` set and are unverified until the kubelet names
    /// them again), so a driver that tracks which devices are in use
    /// starts from them. Does nothing by default.
    fn restore(&self, claims: &BTreeMap<String, PreparedClaim>) {
        let _ = claims;
    }

    /// Undoes `prepare` (the framework removes the CDI spec after it).
    /// `prepared` is what was recorded, or `None` when there is no record:
    /// clean up by the claim's UID then, or do nothing. Also called to
    /// undo a prepare whose spec or record could not be written.
    ///
    /// # Errors
    /// The claim's failure, for the kubelet (it will call again).
    fn unprepare(
        &self,
        claim: &ClaimRef,
        prepared: Option<&PreparedClaim>,
    ) -> Result<(), DriverError>;
}

/// What a [`DraServer`] serves.
#[derive(Debug, Clone)]
pub struct DraConfig {
    driver: DriverName,
    endpoint: PathBuf,
    checkpoint: PathBuf,
    specs: ClaimSpecs,
    boot_id: Option<String>,
}

impl DraConfig {
    /// `driver`'s DRA service on the socket `endpoint` (the path its
    /// registration gives the kubelet), remembering prepared claims in the
    /// file `checkpoint` (normally in the plugin's data directory,
    /// `/var/lib/kubelet/plugins/<driver>/`, on disk) and writing each
    /// claim's CDI spec with `specs` (normally in `/var/run/cdi`, a tmpfs).
    #[must_use]
    pub fn new(
        driver: DriverName,
        endpoint: impl Into<PathBuf>,
        checkpoint: impl Into<PathBuf>,
        specs: ClaimSpecs,
    ) -> Self {
        Self {
            driver,
            endpoint: endpoint.into(),
            checkpoint: checkpoint.into(),
            specs,
            boot_id: None,
        }
    }

    /// The node's current boot (the content of
    /// `/proc/sys/kernel/random/boot_id`): a record made in another boot
    /// is not written back to the CDI directory, its claims are prepared
    /// again in full (device nodes are numbered anew at every boot).
    /// Without it, a restart cannot tell a reboot from a crash.
    #[must_use]
    pub fn boot_id(mut self, boot_id: impl Into<String>) -> Self {
        self.boot_id = Some(boot_id.into());
        self
    }
}

/// Why a [`DraServer`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DraError {
    /// The checkpoint cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The socket cannot be served.
    #[error("could not listen on {}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

struct Core<D, S> {
    driver_name: DriverName,
    driver: Arc<D>,
    claims: Arc<S>,
    specs: ClaimSpecs,
    checkpoint: Mutex<Checkpoint>,
    /// Claim references refused before they reached a path or a URL.
    refused: Arc<std::sync::atomic::AtomicU64>,
}

/// What the framework did with the checkpoint and the CDI specs at start:
/// a driver reports it (log, metric, an Event on its Node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartReport {
    /// What loading the checkpoint found.
    pub loaded: Loaded,
    /// The record was made in another boot: every claim is prepared again
    /// in full on the kubelet's next call (nothing written from the
    /// record: the devices' nodes may be numbered differently now).
    pub new_boot: bool,
    /// Claims whose record was rebuilt from their CDI spec (the
    /// checkpoint was missing or corrupt while specs were on disk).
    pub rebuilt: Vec<String>,
    /// Claims whose CDI spec was missing or different and was written
    /// again from the record (after a reboot, typically).
    pub rewritten: Vec<String>,
    /// Spec files of claims not in a checkpoint read whole (a crash
    /// between writing a spec and recording it), removed.
    pub removed: Vec<String>,
    /// What could not be done, one sentence each (the rest went on).
    pub problems: Vec<String>,
}

impl StartReport {
    /// Whether the record had to be rebuilt or specs written again or
    /// anything failed: worth an operator's attention.
    #[must_use]
    pub fn recovered(&self) -> bool {
        !self.rebuilt.is_empty()
            || !self.rewritten.is_empty()
            || !self.removed.is_empty()
            || !self.problems.is_empty()
            || matches!(self.loaded, Loaded::Corrupt { .. })
    }
}

/// One claim's answer.
type Answer = Result<Vec<PreparedDevice>, String>;

/// Where a claim's answer comes from.
enum Found {
    /// Looked up: its allocation results.
    Allocation(Vec<AllocationResult>),
    /// Prepared before: the record.
    Recorded(PreparedClaim),
}

impl<D: Driver, S: ClaimSource> Core<D, S> {
    fn refuse(&self, e: &crate::ClaimRefError) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(error = %e, "claim reference refused");
    }

    /// Whether a record can answer a prepare: not rebuilt, and its spec
    /// can be written again (or, for an older record, is still there).
    fn answerable(&self, uid: &str, p: &PreparedClaim) -> bool {
        !p.rebuilt && (!p.cdi_devices.is_empty() || self.specs.exists(uid))
    }

    /// The record's answer, after its spec is on disk with the recorded
    /// content.
    fn answer_recorded(&self, uid: &str, p: PreparedClaim) -> Answer {
        if !p.cdi_devices.is_empty() {
            match self.specs.write_devices(uid, &p.cdi_devices) {
                Ok(true) => {
                    tracing::warn!(
                        claim = uid,
                        "the claim's CDI spec was missing or changed; written again from the record"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    return Err(format!(
                        "could not write the claim's CDI spec again: {}",
                        ops_kit::Chain(&e)
                    ));
                }
            }
        }
        Ok(p.devices)
    }

    async fn prepare(&self, claims: Vec<ClaimRef>) -> Vec<(String, Answer)> {
        // Lookups first, outside the lock (they wait on the API server).
        let mut looked = Vec::with_capacity(claims.len());
        for claim in claims {
            if let Err(e) = check_claim_ref(&claim.namespace, &claim.name, &claim.uid) {
                self.refuse(&e);
                looked.push((claim, Err(e.to_string())));
                continue;
            }
            let known = self
                .checkpoint
                .lock()
                .await
                .get(&claim.uid)
                .filter(|p| self.answerable(&claim.uid, p))
                .cloned();
            let found = match known {
                Some(p) => Ok(Found::Recorded(p)),
                None => self
                    .claims
                    .allocation(&claim)
                    .await
                    .map(Found::Allocation)
                    .map_err(|e| e.to_string()),
            };
            looked.push((claim, found));
        }
        let mut out = Vec::with_capacity(looked.len());
        let mut checkpoint = self.checkpoint.lock().await;
        for (claim, found) in looked {
            let answer = match found {
                Err(e) => Err(e),
                // Prepared before: the same answer again — if it still is
                // (an unprepare may have run while this call looked).
                Ok(Found::Recorded(prepared)) => {
                    if checkpoint.get(&claim.uid) == Some(&prepared) {
                        self.answer_recorded(&claim.uid, prepared)
                    } else {
                        Err(format!(
                            "claim {} was unprepared or changed while this prepare looked it up; ask again",
                            claim.uid
                        ))
                    }
                }
                Ok(Found::Allocation(results)) => {
                    self.prepare_one(&mut checkpoint, &claim, &results).await
                }
            };
            if let Err(e) = &answer {
                tracing::warn!(claim = %claim, error = %e, "could not prepare");
            }
            out.push((claim.uid, answer));
        }
        out
    }

    async fn prepare_one(
        &self,
        checkpoint: &mut Checkpoint,
        claim: &ClaimRef,
        results: &[AllocationResult],
    ) -> Answer {
        // Another call may have prepared it meanwhile.
        let before = checkpoint.get(&claim.uid).cloned();
        if let Some(p) = &before
            && self.answerable(&claim.uid, p)
        {
            return self.answer_recorded(&claim.uid, p.clone());
        }
        let ours: Vec<Allocated> = results
            .iter()
            .filter(|r| r.driver == self.driver_name.as_str())
            .map(|r| Allocated {
                // The kubelet and the runtime know the main request.
                request: r.request.split('/').next().unwrap_or_default().to_owned(),
                pool: r.pool.clone(),
                device: r.device.clone(),
            })
            .collect();
        if ours.is_empty() {
            return Err(format!(
                "ResourceClaim {}/{} has no device of driver {}",
                claim.namespace, claim.name, self.driver_name
            ));
        }
        let driver = Arc::clone(&self.driver);
        let (c, o) = (claim.clone(), ours);
        let prepared = tokio::task::spawn_blocking(move || driver.prepare(&c, &o))
            .await
            .map_err(|e| format!("the driver's prepare did not finish: {e}"))?
            .map_err(|e| e.0)?;
        let record = self.record(claim, &prepared);
        // Spec and record written before it is answered: an answer the
        // kubelet acts on names a spec on disk, and is never one the next
        // instance has forgotten.
        let saved = self
            .specs
            .write_devices(&claim.uid, &record.cdi_devices)
            .map_err(|e| {
                format!(
                    "could not write the claim's CDI spec: {}",
                    ops_kit::Chain(&e)
                )
            })
            .and_then(|_| {
                checkpoint
                    .insert(&claim.uid, record.clone())
                    .map_err(|e| format!("{}", ops_kit::Chain(&e)))
            });
        if let Err(e) = saved {
            // Undone, unless a running container may still use it (a
            // record rebuilt from its spec).
            if before.is_none() {
                let driver = Arc::clone(&self.driver);
                let (c, r) = (claim.clone(), record);
                let _ = tokio::task::spawn_blocking(move || driver.unprepare(&c, Some(&r))).await;
                let _ = self.specs.remove(&claim.uid);
            }
            return Err(e);
        }
        Ok(record.devices)
    }

    /// The record of a prepared claim: one CDI device per distinct device.
    fn record(&self, claim: &ClaimRef, prepared: &[DevicePrepared]) -> PreparedClaim {
        let mut cdi_devices: Vec<SpecDevice> = Vec::new();
        let mut devices = Vec::with_capacity(prepared.len());
        for d in prepared {
            let name = ClaimSpecs::device_name(&claim.uid, &d.device);
            if !cdi_devices.iter().any(|s| s.name == name) {
                cdi_devices.push(SpecDevice {
                    name: name.clone(),
                    annotations: BTreeMap::new(),
                    container_edits: d.edits.clone(),
                });
            }
            devices.push(PreparedDevice {
                requests: d.requests.clone(),
                pool: d.pool.clone(),
                device: d.device.clone(),
                cdi_device_ids: vec![self.specs.qualified(&name)],
            });
        }
        PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices,
            cdi_devices,
            rebuilt: false,
        }
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> Vec<(String, Result<(), String>)> {
        let mut checkpoint = self.checkpoint.lock().await;
        let mut out = Vec::with_capacity(claims.len());
        for claim in claims {
            if let Err(e) = check_claim_ref(&claim.namespace, &claim.name, &claim.uid) {
                self.refuse(&e);
                out.push((claim.uid, Err(e.to_string())));
                continue;
            }
            let prepared = checkpoint.get(&claim.uid).cloned();
            let driver = Arc::clone(&self.driver);
            let c = claim.clone();
            let p = prepared.clone();
            let done = tokio::task::spawn_blocking(move || driver.unprepare(&c, p.as_ref()))
                .await
                .map_err(|e| format!("the driver's unprepare did not finish: {e}"))
                .and_then(|r| r.map_err(|e| e.0))
                .and_then(|()| {
                    self.specs.remove(&claim.uid).map_err(|e| {
                        format!(
                            "could not remove the claim's CDI spec: {}",
                            ops_kit::Chain(&e)
                        )
                    })
                })
                .and_then(|()| {
                    checkpoint
                        .remove(&claim.uid)
                        .map_err(|e| format!("{}", ops_kit::Chain(&e)))
                });
            if let Err(e) = &done {
                tracing::warn!(claim = %claim, error = %e, "could not unprepare");
            }
            out.push((claim.uid, done));
        }
        out
    }
}

/// The most unverified (rebuilt) records held in all (a node holds a few
/// hundred claims at most; more is someone filling the directory).
const MAX_REBUILT: usize = 4096;

/// Brings the record and the CDI specs in step at start (see
/// [`StartReport`]):
///
/// - a record read whole, same boot: every claim's spec is written again
///   where missing or different, and specs of claims it does not hold are
///   removed — unless an earlier rebuild could not read them all;
/// - a record read whole from another boot: every claim is marked for a
///   full prepare (its devices' nodes may be numbered differently now) and
///   nothing is written from it;
/// - a missing or corrupt record: rebuilt from the specs on disk, nothing
///   removed.
fn reconcile(
    checkpoint: &mut Checkpoint,
    loaded: Loaded,
    specs: &ClaimSpecs,
    boot_id: Option<&str>,
) -> Result<StartReport, CheckpointError> {
    let mut report = StartReport {
        loaded: loaded.clone(),
        new_boot: false,
        rebuilt: Vec::new(),
        rewritten: Vec::new(),
        removed: Vec::new(),
        problems: Vec::new(),
    };
    if loaded != Loaded::Read {
        // Missing or corrupt: the specs on disk are the truth; never swept.
        let complete = adopt(checkpoint, specs, &mut report)?;
        checkpoint.enter_boot(boot_id, !complete)?;
        return Ok(report);
    }
    report.new_boot = checkpoint.enter_boot(boot_id, checkpoint.rebuild_incomplete())?;
    if !report.new_boot {
        for (uid, claim) in checkpoint.claims() {
            // Unverified, or of an earlier boot: never written again; the
            // kubelet's next prepare is done in full.
            if claim.rebuilt {
                continue;
            }
            if claim.cdi_devices.is_empty() {
                if !specs.exists(uid) {
                    report.problems.push(format!(
                        "claim {uid}: its CDI spec is missing and its record (an older version's) does not hold it; its next prepare is done in full"
                    ));
                }
                continue;
            }
            match specs.write_devices(uid, &claim.cdi_devices) {
                Ok(true) => report.rewritten.push(uid.clone()),
                Ok(false) => {}
                Err(e) => report.problems.push(format!(
                    "claim {uid}: could not write its CDI spec again: {}",
                    ops_kit::Chain(&e)
                )),
            }
        }
    }
    if checkpoint.rebuild_incomplete() {
        // An earlier rebuild could not read every spec: they may be
        // running pods'. Adopted now if they can be read; never swept.
        let complete = adopt(checkpoint, specs, &mut report)?;
        checkpoint.enter_boot(boot_id, !complete)?;
        return Ok(report);
    }
    match specs.retain(checkpoint.claims().keys()) {
        Ok(removed) => report.removed = removed,
        Err(e) => report.problems.push(format!(
            "could not tidy the CDI directory: {}",
            ops_kit::Chain(&e)
        )),
    }
    Ok(report)
}

/// Adopts the claim specs on disk that the record does not hold, as
/// rebuilt (unverified) records naming their devices — never their edits,
/// which are not written again. Files that cannot be ours (not a regular
/// file, too large, not our kind or device names: our writer never makes
/// them) are skipped; only a spec that cannot be read at all, or a
/// directory that cannot be listed, leaves the adoption incomplete.
/// At most [`MAX_REBUILT`] rebuilt records are held in all. Returns
/// whether every candidate was looked at.
fn adopt(
    checkpoint: &mut Checkpoint,
    specs: &ClaimSpecs,
    report: &mut StartReport,
) -> Result<bool, CheckpointError> {
    let room = MAX_REBUILT.saturating_sub(checkpoint.rebuilt_count());
    let found = match specs.list(room.saturating_add(1), |uid| checkpoint.get(uid).is_some()) {
        Ok(found) => found,
        Err(e) => {
            report.problems.push(format!(
                "could not list the CDI directory to rebuild the record: {}",
                ops_kit::Chain(&e)
            ));
            return Ok(false);
        }
    };
    let mut complete = true;
    let mut rebuilt = BTreeMap::new();
    for (uid, devices) in found {
        if rebuilt.len() >= room {
            report.problems.push(format!(
                "more than {MAX_REBUILT} unverified claims; the rest of the claim specs are left as they are"
            ));
            complete = false;
            break;
        }
        let devices = match devices {
            crate::cdi::Listed::Ours(d) => d,
            crate::cdi::Listed::NotOurs(why) => {
                tracing::warn!(claim = %uid, reason = %why, "a file with a claim spec's name that this driver never wrote; ignored");
                continue;
            }
            crate::cdi::Listed::Unreadable(why) => {
                report.problems.push(format!(
                    "claim {uid}: its CDI spec cannot be read ({why}); left as it is"
                ));
                complete = false;
                continue;
            }
        };
        let own = format!("{uid}-");
        let claim = PreparedClaim {
            namespace: String::new(),
            name: String::new(),
            devices: devices
                .iter()
                .map(|d| PreparedDevice {
                    requests: Vec::new(),
                    pool: String::new(),
                    device: d.name.strip_prefix(&own).unwrap_or(&d.name).to_owned(),
                    cdi_device_ids: vec![specs.qualified(&d.name)],
                })
                .collect(),
            cdi_devices: Vec::new(),
            rebuilt: true,
        };
        rebuilt.insert(uid, claim);
    }
    if !rebuilt.is_empty() {
        report.rebuilt = rebuilt.keys().cloned().collect();
        checkpoint.rebuild(rebuilt)?;
    }
    Ok(complete)
}

macro_rules! dra_service {
    ($module:ident, $($extra:tt)*) => {
        #[tonic::async_trait]
        impl<D: Driver, S: ClaimSource> $module::dra_plugin_server::DraPlugin for Arc<Core<D, S>> {
            async fn node_prepare_resources(
                &self,
                request: Request<$module::NodePrepareResourcesRequest>,
            ) -> Result<Response<$module::NodePrepareResourcesResponse>, Status> {
                let claims = request
                    .into_inner()
                    .claims
                    .into_iter()
                    .map(|c| ClaimRef {
                        namespace: c.namespace,
                        name: c.name,
                        uid: c.uid,
                    })
                    .collect();
                let claims: HashMap<String, $module::NodePrepareResourceResponse> = self
                    .prepare(claims)
                    .await
                    .into_iter()
                    .map(|(uid, answer)| {
                        let r = match answer {
                            Ok(devices) => $module::NodePrepareResourceResponse {
                                devices: devices
                                    .into_iter()
                                    .map(|d| $module::Device {
                                        request_names: d.requests,
                                        pool_name: d.pool,
                                        device_name: d.device,
                                        cdi_device_ids: d.cdi_device_ids,
                                        $($extra)*
                                    })
                                    .collect(),
                                error: String::new(),
                            },
                            Err(error) => $module::NodePrepareResourceResponse {
                                devices: Vec::new(),
                                error,
                            },
                        };
                        (uid, r)
                    })
                    .collect();
                Ok(Response::new($module::NodePrepareResourcesResponse { claims }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$module::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$module::NodeUnprepareResourcesResponse>, Status> {
                let claims = request
                    .into_inner()
                    .claims
                    .into_iter()
                    .map(|c| ClaimRef {
                        namespace: c.namespace,
                        name: c.name,
                        uid: c.uid,
                    })
                    .collect();
                let claims = self
                    .unprepare(claims)
                    .await
                    .into_iter()
                    .map(|(uid, done)| {
                        (
                            uid,
                            $module::NodeUnprepareResourceResponse {
                                error: done.err().unwrap_or_default(),
                            },
                        )
                    })
                    .collect();
                Ok(Response::new($module::NodeUnprepareResourcesResponse { claims }))
            }
        }
    };
}

// v1 (1.35+) carries the share of a device with consumable capacity; no
// share is handed out here.
dra_service!(v1, share_id: None,);
dra_service!(v1beta1,);

/// Serves a driver's DRA service until stopped.
#[derive(Debug)]
pub struct DraServer {
    health: watch::Sender<crate::health::HealthList>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    socket: PathBuf,
    report: StartReport,
    initial: BTreeMap<String, PreparedClaim>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl DraServer {
    /// Loads the checkpoint and serves both DRA services on the endpoint.
    /// Start it before the [`crate::Registrar`]: the kubelet may call as
    /// soon as it registers the driver. Must be called inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// When the checkpoint cannot be read or the socket served.
    pub fn start<D: Driver, S: ClaimSource>(
        config: DraConfig,
        driver: Arc<D>,
        claims: Arc<S>,
    ) -> Result<Self, DraError> {
        // Temporaries of writers killed mid-write (this driver's only).
        let stale = config.specs.remove_stale_temporaries()
            + Checkpoint::remove_stale_temporaries(&config.checkpoint);
        if stale > 0 {
            tracing::info!(files = stale, "temporaries of a killed write removed");
        }
        let (mut checkpoint, loaded) = Checkpoint::load(&config.checkpoint)?;
        let report = reconcile(
            &mut checkpoint,
            loaded,
            &config.specs,
            config.boot_id.as_deref(),
        )?;
        log_start(&config.checkpoint, &report, checkpoint.claims().len());
        let listen = |source| DraError::Listen {
            path: config.endpoint.clone(),
            source,
        };
        if let Some(dir) = config.endpoint.parent() {
            std::fs::create_dir_all(dir).map_err(listen)?;
        }
        remove_file(&config.endpoint);
        let listener = kubelet_plumbing::uds::bind_private(&config.endpoint).map_err(listen)?;
        let initial = checkpoint.claims().clone();
        // Before anything is served: the first call already sees the
        // devices in use.
        driver.restore(&initial);
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let core = Arc::new(Core {
            driver_name: config.driver.clone(),
            driver,
            claims,
            specs: config.specs.clone(),
            checkpoint: Mutex::new(checkpoint),
            refused: Arc::clone(&refused),
        });
        let (stop, mut stop_rx) = watch::channel(false);
        let (health, health_rx) = watch::channel(crate::health::stamp(Vec::new()));
        let health_service = crate::health::HealthService {
            list: health_rx,
            stop: stop_rx.clone(),
        };
        let socket = config.endpoint.clone();
        let task = tokio::spawn(async move {
            use crate::pb::health_v1alpha1::dra_resource_health_server::DraResourceHealthServer;
            let result = tonic::transport::Server::builder()
                .add_service(v1::dra_plugin_server::DraPluginServer::new(Arc::clone(
                    &core,
                )))
                .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(core))
                .add_service(DraResourceHealthServer::new(health_service))
                .serve_with_incoming_shutdown(
                    kubelet_plumbing::uds::incoming(listener),
                    async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "the DRA service ended with an error");
            }
        });
        Ok(Self {
            health,
            stop,
            task: Some(task),
            socket,
            report,
            initial,
            refused,
        })
    }

    /// The prepared claims the checkpoint held at start, by claim UID: a
    /// driver that tracks which devices are in use starts from these.
    #[must_use]
    pub fn initial_claims(&self) -> &BTreeMap<String, PreparedClaim> {
        &self.initial
    }

    /// Publishes the health of every device of the driver to the
    /// kubelet's health streams (see [`crate::health`]); the latest list
    /// wins.
    pub fn publish_health(&self, devices: Vec<crate::health::HealthEntry>) {
        self.health.send_replace(crate::health::stamp(devices));
    }

    /// Claim references (UID, namespace, name) refused since the start
    /// because they could have steered a path or a URL
    /// ([`crate::check_claim_ref`]).
    #[must_use]
    pub fn refused_claims(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What loading the checkpoint found.
    #[must_use]
    pub fn checkpoint_loaded(&self) -> &Loaded {
        &self.report.loaded
    }

    /// What was done at start to bring the record and the CDI specs in
    /// step.
    #[must_use]
    pub fn start_report(&self) -> &StartReport {
        &self.report
    }

    /// The endpoint socket.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving and removes the socket; the checkpoint stays.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            // Calls in flight finish; a client that holds on is cut off.
            let abort = task.abort_handle();
            if tokio::time::timeout(std::time::Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        remove_file(&self.socket);
    }
}

impl Drop for DraServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn log_start(path: &Path, report: &StartReport, claims: usize) {
    let checkpoint = path.display();
    match &report.loaded {
        Loaded::Corrupt { reason, aside } => tracing::error!(
            %checkpoint,
            aside = %aside.display(),
            %reason,
            rebuilt = report.rebuilt.len(),
            "the checkpoint is not readable; moved aside, the record rebuilt from the claims' CDI specs, nothing removed"
        ),
        Loaded::Fresh if !report.rebuilt.is_empty() => tracing::error!(
            %checkpoint,
            rebuilt = report.rebuilt.len(),
            "the checkpoint is missing while claims' CDI specs are on disk; the record rebuilt from them, nothing removed"
        ),
        Loaded::Read if report.new_boot => tracing::info!(
            claims,
            "prepared claims read from a checkpoint of an earlier boot: each is prepared again in full when the kubelet asks"
        ),
        Loaded::Read => tracing::info!(claims, "prepared claims read from the checkpoint"),
        Loaded::Fresh => {}
    }
    if !report.rewritten.is_empty() {
        tracing::warn!(claims = ?report.rewritten, "CDI specs missing or changed (a reboot?); written again from the record");
    }
    if !report.removed.is_empty() {
        tracing::info!(files = ?report.removed, "CDI specs of claims never recorded removed");
    }
    for problem in &report.problems {
        tracing::error!(%problem, "at start");
    }
}

fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(path = %path.display(), %error, "could not remove"),
    }
}

/// Claims from the API server (`resource.k8s.io/v1`, Kubernetes 1.34+),
/// read with kube-rs: GET by namespace and name, the UID checked, the
/// allocation results returned. Needs `get` on `resourceclaims`.
#[derive(Clone)]
pub struct KubeClaims {
    client: kube::Client,
}

impl std::fmt::Debug for KubeClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClaims").finish_non_exhaustive()
    }
}

impl KubeClaims {
    /// Reads claims with `client`.
    #[must_use]
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl ClaimSource for KubeClaims {
    async fn allocation(&self, claim: &ClaimRef) -> Result<Vec<AllocationResult>, ClaimError> {
        use k8s_openapi::api::resource::v1::ResourceClaim;
        let (namespace, name) = (claim.namespace.clone(), claim.name.clone());
        let api: kube::Api<ResourceClaim> = kube::Api::namespaced(self.client.clone(), &namespace);
        let found = match api.get_opt(&name).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err(ClaimError::NotFound { namespace, name }),
            Err(e) => {
                return Err(ClaimError::Unavailable {
                    namespace,
                    name,
                    reason: ops_kit::Chain(&e).to_string(),
                });
            }
        };
        let uid = found.metadata.uid.clone().unwrap_or_default();
        if uid != claim.uid {
            return Err(ClaimError::Replaced {
                namespace,
                name,
                wanted: claim.uid.clone(),
                found: uid,
            });
        }
        let Some(allocation) = found.status.and_then(|s| s.allocation) else {
            return Err(ClaimError::NotAllocated { namespace, name });
        };
        Ok(allocation
            .devices
            .and_then(|d| d.results)
            .unwrap_or_default()
            .into_iter()
            .map(|r| AllocationResult {
                request: r.request,
                driver: r.driver,
                pool: r.pool,
                device: r.device,
            })
            .collect())
    }
}
