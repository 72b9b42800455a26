//! The kubelet's plugin watcher with its DRA handler, per version: how a
//! DRA driver gets registered. Each behaviour names the kubelet source it
//! follows (`pkg/kubelet/pluginmanager/…`, `pkg/kubelet/cm/dra/plugin/…`):
//!
//! - the registration directory is created if missing, walked once, then
//!   followed with inotify; dot-files and anything not a socket are
//!   ignored (`pluginwatcher/plugin_watcher.go`);
//! - a reconciler runs every second (`plugin_manager.go`
//!   `loopSleepDuration`): a socket gone, or replaced by a new file at the
//!   same path, unregisters its plugin (no call to the plugin); a socket
//!   not registered is registered (`reconciler/reconciler.go`);
//! - registering dials the socket with its plain path as target (10 s),
//!   which grpc-go ≥ 1.57 sends as a percent-encoded `:authority`, calls
//!   `GetInfo` (1 s), checks the type and the handler's rules, and reports
//!   with `NotifyRegistrationStatus` (5 s), with the kubelet's error texts
//!   (`operationexecutor/operation_generator.go`); a failed attempt is
//!   retried with a backoff doubling from 500 ms (`goroutinemap`'s
//!   exponential backoff, capped at 2 min 2 s);
//! - the DRA handler is emulated from 1.32 (1.26–1.31 had one behind the
//!   DynamicResourceAllocation gate, off by default; the emulated 1.24 and
//!   1.25 have none); 1.32–1.33 take `v1beta1.DRAPlugin` when listed, whatever the
//!   order, and fall back to the removed v1alpha4 otherwise; 1.34+ take the
//!   first listed service they know (`v1.DRAPlugin`, `v1beta1.DRAPlugin`)
//!   and refuse when none is (`dra_plugin_manager.go`, `dra_plugin.go`);
//! - a kubelet going down forgets every registration and deletes no
//!   socket; starting again walks the directory and registers them all.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dir_watch::{DirWatch, Mask};
use dra_api::pb::pluginregistration as reg;
use kubelet_plumbing::authority::AuthorityRule;
use kubelet_plumbing::uds;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::{EmulatorError, KubeletVersion};

/// `plugin_manager.go` `loopSleepDuration`.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// `operation_generator.go`: the registration dial, `GetInfo`, the notify.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const GET_INFO_TIMEOUT: Duration = Duration::from_secs(1);
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// `goroutinemap/exponentialbackoff`: the first delay after a failure.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// `goroutinemap/exponentialbackoff`'s `maxDurationBeforeRetry`.
const MAX_RETRY: Duration = Duration::from_secs(122);

/// The DRA services a kubelet of each version knows, in its own terms.
const V1: &str = "v1.DRAPlugin";
const V1BETA1: &str = "v1beta1.DRAPlugin";
/// What 1.32–1.33 fall back to (the v1alpha4 API's service).
pub const LEGACY_SERVICE: &str = "v1alpha3.Node";

/// A registered DRA driver, as the kubelet's plugin store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraPluginView {
    /// The registration socket's file name.
    pub socket: String,
    /// The service endpoint from `GetInfo` (the socket itself when empty).
    pub endpoint: String,
    /// The DRA service chosen (`v1.DRAPlugin`, `v1beta1.DRAPlugin`, or
    /// [`LEGACY_SERVICE`]).
    pub service: String,
}

/// What the emulated plugin watcher knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatcherView {
    /// Registered DRA drivers by name.
    pub plugins: BTreeMap<String, DraPluginView>,
    /// Every registration that succeeded, in order (driver names).
    pub registrations: Vec<String>,
    /// Every refusal sent with `NotifyRegistrationStatus`: (socket, error).
    pub refusals: Vec<(String, String)>,
    /// Attempts that failed before a verdict (dial or `GetInfo`).
    pub failed_attempts: u64,
}

impl WatcherView {
    /// How many times `driver` was registered.
    #[must_use]
    pub fn registrations_of(&self, driver: &str) -> usize {
        self.registrations.iter().filter(|d| *d == driver).count()
    }
}

struct Shared {
    view: Mutex<WatcherView>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut WatcherView) -> T) -> T {
        let out = f(&mut self.view.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.send_modify(|v| *v += 1);
        out
    }
}

/// The kubelet's plugin watcher over a registration directory.
#[derive(Debug)]
pub struct PluginWatcher {
    dir: PathBuf,
    version: KubeletVersion,
    shared: Arc<SharedHandle>,
    running: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

/// `Shared` behind a `Debug` face.
struct SharedHandle(Shared);

impl std::fmt::Debug for SharedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginWatcherState").finish_non_exhaustive()
    }
}

impl PluginWatcher {
    /// A kubelet of `version` watching `dir` (its `plugins_registry`).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn start(dir: &Path, version: KubeletVersion) -> Result<Self, EmulatorError> {
        let (changed, _) = watch::channel(0);
        let mut me = Self {
            dir: dir.to_owned(),
            version,
            shared: Arc::new(SharedHandle(Shared {
                view: Mutex::new(WatcherView::default()),
                changed,
            })),
            running: None,
        };
        me.resume()?;
        Ok(me)
    }

    /// What it knows now.
    #[must_use]
    pub fn view(&self) -> WatcherView {
        self.shared
            .0
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `f` holds for the view.
    ///
    /// # Errors
    /// [`EmulatorError::WatcherTimeout`] with the last view.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        f: impl Fn(&WatcherView) -> bool,
    ) -> Result<WatcherView, EmulatorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.0.changed.subscribe();
        loop {
            let v = self.view();
            if f(&v) {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(EmulatorError::WatcherTimeout(
                    timeout,
                    Box::new(self.view()),
                ));
            }
        }
    }

    /// The kubelet goes down: every registration is forgotten; no socket
    /// is touched.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        self.shared.0.with(|v| v.plugins.clear());
    }

    /// The kubelet starts (again): the directory is walked and followed.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn resume(&mut self) -> Result<(), EmulatorError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| EmulatorError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            self.dir.clone(),
            self.version,
            Arc::clone(&self.shared),
            stop_rx,
        ));
        self.running = Some((stop, task));
        Ok(())
    }

    /// A kubelet restart.
    ///
    /// # Errors
    /// As [`PluginWatcher::resume`].
    pub async fn restart(&mut self) -> Result<(), EmulatorError> {
        self.stop().await;
        self.resume()
    }
}

/// A claim as the kubelet names it in a DRA call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimId {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
}

/// A device of a prepare answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedView {
    /// `request_names`.
    pub requests: Vec<String>,
    /// `pool_name`.
    pub pool: String,
    /// `device_name`.
    pub device: String,
    /// `cdi_device_ids`.
    pub cdi_device_ids: Vec<String>,
}

/// One claim's answer: its devices, or its error.
pub type ClaimAnswer = Result<Vec<PreparedView>, String>;

/// `dra_plugin.go` `defaultClientCallTimeout`: 45 s per call.
const CALL_TIMEOUT: Duration = Duration::from_secs(45);

macro_rules! dra_call {
    ($module:ident, $channel:expr, $claims:expr, $prepare:expr) => {{
        use dra_api::pb::$module as m;
        let mut client = m::dra_plugin_client::DraPluginClient::new($channel);
        let claims: Vec<m::Claim> = $claims
            .iter()
            .map(|c| m::Claim {
                namespace: c.namespace.clone(),
                uid: c.uid.clone(),
                name: c.name.clone(),
            })
            .collect();
        if $prepare {
            let r = tokio::time::timeout(
                CALL_TIMEOUT,
                client.node_prepare_resources(m::NodePrepareResourcesRequest { claims }),
            )
            .await
            .map_err(|_| Status::deadline_exceeded("NodePrepareResources"))??;
            Prepared::Prepare(
                r.into_inner()
                    .claims
                    .into_iter()
                    .map(|(uid, a)| {
                        let answer = if a.error.is_empty() {
                            Ok(a.devices
                                .into_iter()
                                .map(|d| PreparedView {
                                    requests: d.request_names,
                                    pool: d.pool_name,
                                    device: d.device_name,
                                    cdi_device_ids: d.cdi_device_ids,
                                })
                                .collect())
                        } else {
                            Err(a.error)
                        };
                        (uid, answer)
                    })
                    .collect(),
            )
        } else {
            let r = tokio::time::timeout(
                CALL_TIMEOUT,
                client.node_unprepare_resources(m::NodeUnprepareResourcesRequest { claims }),
            )
            .await
            .map_err(|_| Status::deadline_exceeded("NodeUnprepareResources"))??;
            Prepared::Unprepare(
                r.into_inner()
                    .claims
                    .into_iter()
                    .map(|(uid, a)| {
                        (
                            uid,
                            if a.error.is_empty() {
                                Ok(())
                            } else {
                                Err(a.error)
                            },
                        )
                    })
                    .collect(),
            )
        }
    }};
}

enum Prepared {
    Prepare(BTreeMap<String, ClaimAnswer>),
    Unprepare(BTreeMap<String, Result<(), String>>),
}

impl PluginWatcher {
    /// `NodePrepareResources` of `claims` on `driver`'s registered plugin,
    /// with the service chosen at registration and the connection of this
    /// version (1.34+: `unix:` target, `:authority` localhost; 1.32–1.33: the
    /// plain path, percent-encoded). A claim missing from the answer is an
    /// error for that claim, as the kubelet treats it.
    ///
    /// # Errors
    /// When the driver is not registered, cannot be dialled, or the call
    /// fails as a whole.
    pub async fn prepare(
        &self,
        driver: &str,
        claims: &[ClaimId],
    ) -> Result<BTreeMap<String, ClaimAnswer>, EmulatorError> {
        match self.call(driver, claims, true).await? {
            Prepared::Prepare(mut answers) => {
                for c in claims {
                    answers
                        .entry(c.uid.clone())
                        .or_insert_with(|| Err(format!("claim {} missing in the answer", c.uid)));
                }
                Ok(answers)
            }
            Prepared::Unprepare(_) => Ok(BTreeMap::new()),
        }
    }

    /// `NodeUnprepareResources`, as [`PluginWatcher::prepare`].
    ///
    /// # Errors
    /// As [`PluginWatcher::prepare`].
    pub async fn unprepare(
        &self,
        driver: &str,
        claims: &[ClaimId],
    ) -> Result<BTreeMap<String, Result<(), String>>, EmulatorError> {
        match self.call(driver, claims, false).await? {
            Prepared::Unprepare(mut answers) => {
                for c in claims {
                    answers
                        .entry(c.uid.clone())
                        .or_insert_with(|| Err(format!("claim {} missing in the answer", c.uid)));
                }
                Ok(answers)
            }
            Prepared::Prepare(_) => Ok(BTreeMap::new()),
        }
    }

    async fn call(
        &self,
        driver: &str,
        claims: &[ClaimId],
        prepare: bool,
    ) -> Result<Prepared, EmulatorError> {
        let plugin = self
            .view()
            .plugins
            .get(driver)
            .cloned()
            .ok_or_else(|| EmulatorError::DriverNotRegistered(driver.to_owned()))?;
        let path = PathBuf::from(&plugin.endpoint);
        let rule = if self.version >= KubeletVersion::V1_34 {
            AuthorityRule::Set(b"localhost".to_vec())
        } else {
            AuthorityRule::Set(grpc_go_authority(&path))
        };
        let channel = uds::connect_with_authority(&path, DIAL_TIMEOUT, rule).await?;
        Ok(match plugin.service.as_str() {
            V1 => dra_call!(dra_v1, channel, claims, prepare),
            V1BETA1 => dra_call!(dra_v1beta1, channel, claims, prepare),
            other => {
                return Err(EmulatorError::Rpc(Status::unimplemented(format!(
                    "unknown service {other}"
                ))));
            }
        })
    }
}

/// One device's health as the kubelet reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthView {
    /// `pool_name`.
    pub pool: String,
    /// `device_name`.
    pub device: String,
    /// `UNKNOWN`, `HEALTHY` or `UNHEALTHY`.
    pub health: String,
    /// `message`.
    pub message: String,
}

/// An open `NodeWatchResources` stream.
#[derive(Debug)]
pub struct HealthWatch(
    tonic::codec::Streaming<dra_api::pb::health_v1alpha1::NodeWatchResourcesResponse>,
);

impl HealthWatch {
    /// The next complete list, or `None` when the stream ended or failed.
    pub async fn next(&mut self) -> Option<Vec<HealthView>> {
        use dra_api::pb::health_v1alpha1::HealthStatus;
        let msg = self.0.message().await.ok()??;
        Some(
            msg.devices
                .into_iter()
                .map(|d| {
                    let id = d.device.unwrap_or_default();
                    HealthView {
                        pool: id.pool_name,
                        device: id.device_name,
                        health: HealthStatus::try_from(d.health)
                            .unwrap_or(HealthStatus::Unknown)
                            .as_str_name()
                            .to_owned(),
                        message: d.message,
                    }
                })
                .collect(),
        )
    }
}

impl PluginWatcher {
    /// Opens `NodeWatchResources` on `driver`'s plugin, as kubelets 1.34+
    /// do after registering it when the `ResourceHealthStatus` gate is on
    /// (`dra_plugin_manager.go`; they do not check that the plugin listed
    /// the service, and retry every 5 s).
    ///
    /// # Errors
    /// When the kubelet is older (no health stream), the driver is not
    /// registered or the call fails.
    pub async fn watch_health(&self, driver: &str) -> Result<HealthWatch, EmulatorError> {
        if self.version < KubeletVersion::V1_34 {
            return Err(EmulatorError::Rpc(Status::unimplemented(
                "kubelets before 1.34 have no DRA health stream",
            )));
        }
        let plugin = self
            .view()
            .plugins
            .get(driver)
            .cloned()
            .ok_or_else(|| EmulatorError::DriverNotRegistered(driver.to_owned()))?;
        let channel = uds::connect_with_authority(
            Path::new(&plugin.endpoint),
            DIAL_TIMEOUT,
            AuthorityRule::Set(b"localhost".to_vec()),
        )
        .await?;
        let mut client =
            dra_api::pb::health_v1alpha1::dra_resource_health_client::DraResourceHealthClient::new(
                channel,
            );
        let stream = client
            .node_watch_resources(dra_api::pb::health_v1alpha1::NodeWatchResourcesRequest {})
            .await?
            .into_inner();
        Ok(HealthWatch(stream))
    }
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            task.abort();
        }
    }
}

/// grpc-go ≥ 1.57 `encodeAuthority`: every byte but the unreserved ones,
/// the sub-delimiters, `:`, `[`, `]` and `@` percent-encoded.
#[must_use]
pub fn grpc_go_authority(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]@".contains(&b);
        if keep {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// A socket's identity: the file, and how many times a create event named
/// its path (the kubelet stamps each create event; an inode number alone
/// can be reused by a socket re-created at once).
type Identity = (u64, u64, u64);

/// Sockets in `dir`, by path, with their identity (`plugin_watcher.go`
/// `traverseDir`: dot-files and non-sockets skipped).
fn walk(dir: &Path, created: &BTreeMap<PathBuf, u64>) -> BTreeMap<PathBuf, Identity> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if let Ok(m) = std::fs::symlink_metadata(e.path())
            && m.file_type().is_socket()
        {
            let stamp = created.get(&e.path()).copied().unwrap_or(0);
            out.insert(e.path(), (m.dev(), m.ino(), stamp));
        }
    }
    out
}

struct Registered {
    identity: Identity,
    driver: String,
}

async fn run(
    dir: PathBuf,
    version: KubeletVersion,
    shared: Arc<SharedHandle>,
    mut stop: watch::Receiver<bool>,
) {
    let mut actual: BTreeMap<PathBuf, Registered> = BTreeMap::new();
    // Per socket: when the next attempt may run, and the delay after it.
    let mut backoff: BTreeMap<PathBuf, (tokio::time::Instant, Duration)> = BTreeMap::new();
    let mut created: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut events = DirWatch::new()
        .and_then(|mut w| w.add(&dir, Mask::IN_CREATE | Mask::IN_MOVED_TO).map(|_| w))
        .ok();
    loop {
        // The desired state: what is there (the walk) with a new identity
        // for every path a create event named since.
        let desired = walk(&dir, &created);
        actual.retain(|path, r| {
            let keep = desired.get(path) == Some(&r.identity);
            if !keep {
                let driver = r.driver.clone();
                shared.0.with(|v| {
                    if v.plugins
                        .get(&driver)
                        .is_some_and(|p| dir.join(&p.socket) == *path)
                    {
                        v.plugins.remove(&driver);
                    }
                });
            }
            keep
        });
        let now = tokio::time::Instant::now();
        for (path, identity) in &desired {
            if actual.contains_key(path) || backoff.get(path).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            match register(path, version, &shared.0).await {
                Some(driver) => {
                    backoff.remove(path);
                    actual.insert(
                        path.clone(),
                        Registered {
                            identity: *identity,
                            driver,
                        },
                    );
                }
                None => {
                    let delay = backoff
                        .get(path)
                        .map_or(FIRST_RETRY, |(_, d)| (*d * 2).min(MAX_RETRY));
                    backoff.insert(path.clone(), (tokio::time::Instant::now() + delay, delay));
                }
            }
        }
        backoff.retain(|p, _| desired.contains_key(p));
        let tick = tokio::time::sleep(RECONCILE_EVERY);
        tokio::pin!(tick);
        loop {
            let batch = match &mut events {
                Some(w) => tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = &mut tick => break,
                    batch = w.next() => batch,
                },
                None => tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = &mut tick => break,
                },
            };
            match batch {
                Ok(batch) => {
                    for e in batch {
                        if let Some(name) = &e.name {
                            *created.entry(dir.join(name)).or_default() += 1;
                        }
                    }
                }
                Err(_) => events = None,
            }
        }
    }
}

/// One registration attempt; the driver name when registered.
async fn register(path: &Path, version: KubeletVersion, shared: &Shared) -> Option<String> {
    let socket = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let failed = || {
        shared.with(|v| v.failed_attempts += 1);
        None
    };
    let Ok(channel) = uds::connect_with_authority(
        path,
        DIAL_TIMEOUT,
        AuthorityRule::Set(grpc_go_authority(path)),
    )
    .await
    else {
        return failed();
    };
    let mut client = reg::registration_client::RegistrationClient::new(channel);
    let info =
        match tokio::time::timeout(GET_INFO_TIMEOUT, client.get_info(reg::InfoRequest {})).await {
            Ok(Ok(r)) => r.into_inner(),
            _ => return failed(),
        };
    let endpoint = if info.endpoint.is_empty() {
        path.to_string_lossy().into_owned()
    } else {
        info.endpoint.clone()
    };
    let verdict = if info.r#type != "DRAPlugin" || version < KubeletVersion::V1_32 {
        Err(format!(
            "no handler registered for plugin type: {} at socket {}",
            info.r#type,
            path.display()
        ))
    } else {
        validate(&info, version)
            .map_err(|e| format!("RegisterPlugin error -- plugin validation failed with err: {e}"))
    };
    let (registered, error) = match &verdict {
        Ok(service) => {
            let name = info.name.clone();
            let view = DraPluginView {
                socket: socket.clone(),
                endpoint,
                service: service.clone(),
            };
            shared.with(|v| {
                v.plugins.insert(name.clone(), view);
                v.registrations.push(name);
            });
            (true, String::new())
        }
        Err(e) => {
            shared.with(|v| v.refusals.push((socket.clone(), e.clone())));
            (false, e.clone())
        }
    };
    let _ = tokio::time::timeout(
        NOTIFY_TIMEOUT,
        client.notify_registration_status(reg::RegistrationStatus {
            plugin_registered: registered,
            error,
        }),
    )
    .await;
    // A refused socket is not in the actual state (only registered ones
    // are): the reconciler tries it again, with backoff, as any failed
    // operation.
    verdict.ok().map(|_| info.name)
}

/// The DRA handler's `ValidatePlugin`: the name, then the service.
fn validate(info: &reg::PluginInfo, version: KubeletVersion) -> Result<String, String> {
    if info.name.is_empty() {
        return Err("driver name is empty".to_owned());
    }
    if info.supported_versions.is_empty() {
        return Err("empty list of supported gRPC services (aka supported versions)".to_owned());
    }
    if version < KubeletVersion::V1_34 {
        // 1.32–1.33: the kubelet's own preference, then the legacy API.
        return Ok(if info.supported_versions.iter().any(|s| s == V1BETA1) {
            V1BETA1.to_owned()
        } else {
            LEGACY_SERVICE.to_owned()
        });
    }
    info.supported_versions
        .iter()
        .find(|s| *s == V1 || *s == V1BETA1)
        .cloned()
        .ok_or_else(|| {
            format!(
                "none of the supported gRPC services {:?} is supported by the kubelet, which supports {:?}",
                info.supported_versions,
                [V1, V1BETA1]
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_is_percent_encoded_as_grpc_go_does() {
        assert_eq!(
            grpc_go_authority(Path::new(
                "/var/lib/kubelet/plugins_registry/gpu.intel.com-reg.sock"
            )),
            b"%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fgpu.intel.com-reg.sock"
        );
    }

    #[test]
    fn services_are_chosen_per_version() {
        let info = |s: &[&str]| reg::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: "gpu.intel.com".into(),
            endpoint: String::new(),
            supported_versions: s.iter().map(|x| (*x).to_owned()).collect(),
        };
        let both = info(&[V1, V1BETA1]);
        assert_eq!(validate(&both, KubeletVersion::V1_34).unwrap(), V1);
        assert_eq!(validate(&both, KubeletVersion::V1_32).unwrap(), V1BETA1);
        let reversed = info(&[V1BETA1, V1]);
        assert_eq!(validate(&reversed, KubeletVersion::V1_34).unwrap(), V1BETA1);
        let v1_only = info(&[V1]);
        assert_eq!(
            validate(&v1_only, KubeletVersion::V1_32).unwrap(),
            LEGACY_SERVICE
        );
        let unknown = info(&["v9.Other"]);
        assert!(
            validate(&unknown, KubeletVersion::V1_34)
                .unwrap_err()
                .contains("none of")
        );
        assert!(
            validate(&info(&[]), KubeletVersion::V1_34)
                .unwrap_err()
                .contains("empty list")
        );
    }
}
