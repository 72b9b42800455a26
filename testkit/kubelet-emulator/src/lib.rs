//! Test kit: the kubelet's side of the device plugin API, over real Unix
//! sockets in a directory, for tests, the demo, benchmarks and other plugin
//! authors. Never a dependency of a shipped binary.
//!
//! It behaves as the kubelet of a chosen [`KubeletVersion`] does; every
//! behaviour names the kubelet source it follows
//! (`pkg/kubelet/cm/devicemanager/…`, releases 1.25 to 1.34, where the
//! device manager's plugin code lives in `plugin/v1beta1/`). In short:
//!
//! - `Registration` on `<dir>/kubelet.sock`, accepting any `:authority`
//!   (grpc-go does); `Register` checks the version and the resource name,
//!   joins the endpoint to the directory without checking it, dials the
//!   plugin back (10 s) and calls `GetDevicePluginOptions` *inside*
//!   `Register`, then reads ListAndWatch in the background;
//! - the dial-back sends the `:authority` of its version: the socket path
//!   before 1.26, `localhost` since (kubernetes PR 112597);
//! - a resource registering again replaces the old client without closing
//!   it, and when any client's stream of that resource ends, the *current*
//!   client is disconnected (kubernetes issue 121994, 1.25–1.34);
//! - a stream that ends, the kubelet staying up, closes the connection and
//!   marks every device unhealthy; the resource leaves the node's capacity
//!   after a 5 minute grace unless the plugin registers again;
//! - a restart deletes every entry of the directory but the checkpoint and
//!   subdirectories, and serves a new `kubelet.sock`.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use kubelet_emulator::{KubeletEmulator, KubeletVersion};
//! let dir = tempfile::tempdir()?;
//! let mut kubelet = KubeletEmulator::start_as(dir.path(), KubeletVersion::V1_25).await?;
//! let view = kubelet
//!     .wait_until(Duration::from_secs(5), |v| v.devices("example.com/null").is_some_and(|d| d.devices().len() == 2))
//!     .await?;
//! let answer = kubelet.allocate("example.com/null", &["null-0"]).await?;
//! kubelet.end_stream("example.com/null");
//! kubelet.restart().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

mod plugin_watcher;

pub use plugin_watcher::{
    ClaimAnswer, ClaimId, DraPluginView, HealthView, HealthWatch, LEGACY_SERVICE, PluginWatcher,
    PreparedView, WatcherView, grpc_go_authority,
};

use devplugin_api::pb::device_plugin_client::DevicePluginClient;
use devplugin_api::pb::registration_server::{Registration, RegistrationServer};
use devplugin_api::{API_VERSION, DeviceList, Health, KUBELET_SOCKET, ResourceName, pb, uds};
use kubelet_plumbing::authority::AuthorityRule;
use tokio::net::UnixListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The kubelet's checkpoint file, which survives its restarts.
pub const CHECKPOINT: &str = "kubelet_internal_checkpoint";

/// How long the kubelet keeps a disconnected resource before dropping it
/// from the node's capacity: `endpointStopGracePeriod` in
/// `pkg/kubelet/cm/devicemanager/types.go` (5 minutes, 1.10–1.34).
pub const STOP_GRACE: Duration = Duration::from_secs(5 * 60);

/// The dial-back timeout: `plugin/v1beta1/client.go` `dial`, a 10 s
/// context with `WithBlock` (1.25–1.34).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The kubelet release whose behaviour is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum KubeletVersion {
    /// 1.24 (StarlingX 8.0's default): `manager.go` `Register` checks the
    /// version and name, then `go m.addEndpoint(r)` and answers at once; the
    /// dial-back (the socket path as `:authority`) happens after, and a
    /// failure is only logged; the request's options are used
    /// (`GetDevicePluginOptions` is not called); a stream that ends marks
    /// its resource unhealthy only while its endpoint is still the current
    /// one (`runEndpoint`).
    V1_24,
    /// 1.25: the device manager's plugin package as in 1.26–1.34, but
    /// grpc-go dials the plugin with the bare socket path as target and no
    /// `WithAuthority`, so `:authority` is the socket path (kubernetes
    /// issues 108254, 109081).
    V1_25,
    /// 1.32 (and 1.33): device plugins as 1.34; DRA drivers register through
    /// the plugin watcher and are served `v1beta1.DRAPlugin` when they list
    /// it, whatever their order (`cm/dra/plugin/registration.go` 1.32,
    /// `plugins_store.go` 1.33; without it the kubelet falls back to the
    /// removed v1alpha4).
    V1_32,
    /// 1.34: `plugin/v1beta1/client.go` `dial` passes
    /// `grpc.WithAuthority("localhost")` (kubernetes PR 112597, 1.26+).
    #[default]
    V1_34,
}

impl KubeletVersion {
    /// Every emulated version, oldest first.
    pub const ALL: [Self; 4] = [Self::V1_24, Self::V1_25, Self::V1_32, Self::V1_34];

    /// The `:authority` its dial-back to the plugin at `socket` sends.
    #[must_use]
    pub fn authority(self, socket: &Path) -> AuthorityRule {
        match self {
            Self::V1_24 | Self::V1_25 => {
                AuthorityRule::Set(socket.as_os_str().as_encoded_bytes().to_vec())
            }
            Self::V1_32 | Self::V1_34 => AuthorityRule::Set(b"localhost".to_vec()),
        }
    }
}

/// What the emulator knows about one resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceView {
    /// The socket file name of the last registration.
    pub endpoint: String,
    /// The options read back from the plugin during `Register`.
    pub options: pb::DevicePluginOptions,
    /// The latest list received since the last registration, if any; all
    /// unhealthy once the resource is disconnected.
    pub devices: Option<DeviceList>,
    /// How many times it registered.
    pub registrations: u32,
    /// How many lists it received.
    pub updates: u64,
    /// Whether a client of the resource is connected.
    pub connected: bool,
    /// When the latest list arrived.
    pub last_update: Option<Instant>,
    /// When it last registered.
    pub registered_at: Option<Instant>,
    /// When it was last disconnected (its grace period started).
    pub stopped_at: Option<tokio::time::Instant>,
}

/// Everything the emulator knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Per resource name.
    pub resources: BTreeMap<String, ResourceView>,
    /// Registrations refused, with the reason.
    pub rejected: Vec<(String, String)>,
    /// `Register` calls received, refused ones included (the kubelet counts
    /// them before any check: `server.go` `Register`).
    pub register_calls: u64,
    /// Dial-backs that failed after `Register` had already answered
    /// success (1.24 only; the kubelet just logs them).
    pub dial_failures: u64,
}

impl View {
    /// The latest list of `resource`.
    #[must_use]
    pub fn devices(&self, resource: &str) -> Option<&DeviceList> {
        self.resources.get(resource)?.devices.as_ref()
    }

    /// Registrations of `resource` so far.
    #[must_use]
    pub fn registrations(&self, resource: &str) -> u32 {
        self.resources.get(resource).map_or(0, |r| r.registrations)
    }

    /// Whether `resource` is registered with a connected client.
    #[must_use]
    pub fn is_connected(&self, resource: &str) -> bool {
        self.resources.get(resource).is_some_and(|r| r.connected)
    }
}

/// A resource's share of the node, as the kubelet reports it
/// (`manager.go` `GetCapacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Healthy and unhealthy devices.
    pub capacity: usize,
    /// Healthy devices.
    pub allocatable: usize,
}

/// Why an emulator call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// Waiting for a condition took too long.
    #[error("the condition did not hold within {0:?}; last view: {1:#?}")]
    Timeout(Duration, Box<View>),
    /// Waiting for the plugin watcher took too long.
    #[error("the plugin watcher's condition did not hold within {0:?}; last view: {1:#?}")]
    WatcherTimeout(Duration, Box<WatcherView>),
    /// The resource has no connected client ("endpoint has been stopped").
    #[error("resource {0} is not registered")]
    NotRegistered(String),
    /// No plugin of the DRA driver is registered (`dra_plugin_manager.go`).
    #[error("DRA driver {0} is not registered")]
    DriverNotRegistered(String),
    /// The plugin could not be dialled.
    #[error(transparent)]
    Dial(#[from] uds::DialError),
    /// The plugin answered with an error.
    #[error("the plugin answered {}: {}", .0.code(), .0.message())]
    Rpc(#[from] Status),
    /// A socket could not be served or a file removed.
    #[error("kubelet emulator I/O on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// One client of a plugin: `plugin/v1beta1/client.go`'s `client`.
struct Client {
    id: u64,
    channel: Channel,
    /// Ends its ListAndWatch stream as a receive error would.
    end: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    view: View,
    /// The current client per resource (`server.go`'s `clients` map).
    clients: BTreeMap<String, Client>,
    /// Clients replaced by a newer registration, still connected.
    replaced: Vec<Client>,
    /// Every stream task, current or replaced, for shutdown.
    tasks: Vec<JoinHandle<()>>,
    /// Which kubelet process this is: raised by every stop. A restarted
    /// kubelet is a new process, so nothing begun by an older one (a
    /// stream task, a dial-back in flight) may touch the new one's state.
    life: u64,
}

struct Shared {
    dir: PathBuf,
    version: KubeletVersion,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    refusal: Mutex<Option<String>>,
    next_client: AtomicU64,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.send_modify(|v| *v += 1);
        out
    }

    /// `handler.go` `disconnectClient` then `client.go` `Disconnect` and
    /// `manager.go` `PluginDisconnected`: forget the client, close its
    /// connection, mark every device unhealthy and start the grace period.
    fn disconnect(state: &mut State, resource: &str) {
        if let Some(mut client) = state.clients.remove(resource)
            && let Some(end) = client.end.take()
        {
            let _ = end.send(());
        }
        if let Some(r) = state.view.resources.get_mut(resource) {
            r.connected = false;
            r.stopped_at = Some(tokio::time::Instant::now());
            if let Some(list) = &r.devices {
                let sick = list
                    .devices()
                    .iter()
                    .map(|d| devplugin_api::Device {
                        health: Health::Unhealthy,
                        ..d.clone()
                    })
                    .collect();
                r.devices = DeviceList::new(sick).ok();
            }
        }
    }
}

/// A running kubelet emulator.
pub struct KubeletEmulator {
    shared: Arc<Shared>,
    server: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl std::fmt::Debug for KubeletEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletEmulator")
            .field("dir", &self.shared.dir)
            .field("version", &self.shared.version)
            .finish_non_exhaustive()
    }
}

impl KubeletEmulator {
    /// A kubelet of the newest emulated version serving `Registration` on
    /// `<dir>/kubelet.sock`.
    ///
    /// # Errors
    /// When the socket cannot be served.
    pub async fn start(dir: &Path) -> Result<Self, EmulatorError> {
        Self::start_as(dir, KubeletVersion::default()).await
    }

    /// A kubelet of `version` serving `Registration` on `<dir>/kubelet.sock`.
    ///
    /// # Errors
    /// When the socket cannot be served.
    pub async fn start_as(dir: &Path, version: KubeletVersion) -> Result<Self, EmulatorError> {
        let mut me = Self::absent_as(dir, version);
        me.serve()?;
        Ok(me)
    }

    /// A kubelet of the newest version that is not serving (not started
    /// yet); [`KubeletEmulator::resume`] starts it.
    #[must_use]
    pub fn absent(dir: &Path) -> Self {
        Self::absent_as(dir, KubeletVersion::default())
    }

    /// A kubelet of `version` that is not serving yet.
    #[must_use]
    pub fn absent_as(dir: &Path, version: KubeletVersion) -> Self {
        let (changed, _) = watch::channel(0);
        let shared = Shared {
            dir: dir.to_owned(),
            version,
            state: Mutex::new(State::default()),
            changed,
            refusal: Mutex::new(None),
            next_client: AtomicU64::new(1),
        };
        Self {
            shared: Arc::new(shared),
            server: None,
        }
    }

    /// The version emulated.
    #[must_use]
    pub fn version(&self) -> KubeletVersion {
        self.shared.version
    }

    fn serve(&mut self) -> Result<(), EmulatorError> {
        let path = self.socket_path();
        let io = |source| EmulatorError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(io)?;
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let service = RegistrationService {
            shared: Arc::clone(&self.shared),
        };
        // grpc-go's server takes any `:authority`; so does this one.
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(uds::incoming(listener), async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
        Ok(())
    }

    /// Makes every later `Register` fail with this message, as a kubelet
    /// that refuses the plugin (`None` accepts again).
    pub fn refuse_registrations(&self, message: Option<&str>) {
        *self
            .shared
            .refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = message.map(str::to_owned);
    }

    /// `<dir>/kubelet.sock`.
    #[must_use]
    pub fn socket_path(&self) -> PathBuf {
        self.shared.dir.join(KUBELET_SOCKET)
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What the emulator knows now.
    #[must_use]
    pub fn view(&self) -> View {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .view
            .clone()
    }

    /// The resource's capacity as the kubelet would report it now;
    /// `None` once it is gone (never registered, or disconnected for longer
    /// than [`STOP_GRACE`], when it is dropped as `GetCapacity` drops it).
    #[must_use]
    pub fn capacity(&self, resource: &str) -> Option<Capacity> {
        self.shared.with(|state| {
            let r = state.view.resources.get(resource)?;
            if !r.connected && r.stopped_at.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                state.view.resources.remove(resource);
                return None;
            }
            let devices = r.devices.as_ref().map_or(&[][..], DeviceList::devices);
            Some(Capacity {
                capacity: devices.len(),
                allocatable: devices
                    .iter()
                    .filter(|d| d.health == Health::Healthy)
                    .count(),
            })
        })
    }

    /// Waits until `condition` holds for the view, and returns that view.
    ///
    /// # Errors
    /// [`EmulatorError::Timeout`] with the last view.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&View) -> bool,
    ) -> Result<View, EmulatorError> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let view = self.view();
            if condition(&view) {
                return Ok(view);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(EmulatorError::Timeout(timeout, Box::new(self.view())));
            }
        }
    }

    /// Ends the current ListAndWatch stream of `resource` as a receive
    /// error would, the kubelet staying up: the resource is disconnected
    /// (`handler.go` `runClient`). Returns whether there was one.
    pub fn end_stream(&self, resource: &str) -> bool {
        self.shared.with(|state| {
            let found = state.clients.contains_key(resource);
            Shared::disconnect(state, resource);
            found
        })
    }

    /// The current client's connection, as `m.endpoints[resource]` holds.
    fn client(&self, resource: &str) -> Result<DevicePluginClient<Channel>, EmulatorError> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clients
            .get(resource)
            .map(|c| DevicePluginClient::new(c.channel.clone()))
            .ok_or_else(|| EmulatorError::NotRegistered(resource.to_owned()))
    }

    /// Calls `Allocate` for one container, as the kubelet does (one
    /// `ContainerAllocateRequest`, no deadline, the first answer used:
    /// `manager.go` `allocateContainerResources`).
    ///
    /// # Errors
    /// When the resource is not registered or the plugin refuses.
    pub async fn allocate(
        &self,
        resource: &str,
        ids: &[&str],
    ) -> Result<pb::ContainerAllocateResponse, EmulatorError> {
        let mut client = self.client(resource)?;
        let request = pb::AllocateRequest {
            container_requests: vec![pb::ContainerAllocateRequest {
                devices_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            }],
        };
        let mut response = client.allocate(request).await?.into_inner();
        if response.container_responses.is_empty() {
            return Err(Status::internal("no containers return in allocation response").into());
        }
        Ok(response.container_responses.swap_remove(0))
    }

    /// Calls `GetPreferredAllocation` for one container.
    ///
    /// # Errors
    /// When the resource is not registered or the plugin refuses.
    pub async fn preferred(
        &self,
        resource: &str,
        available: &[&str],
        must_include: &[&str],
        size: i32,
    ) -> Result<Vec<String>, EmulatorError> {
        let mut client = self.client(resource)?;
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        let request = pb::PreferredAllocationRequest {
            container_requests: vec![pb::ContainerPreferredAllocationRequest {
                available_device_i_ds: owned(available),
                must_include_device_i_ds: owned(must_include),
                allocation_size: size,
            }],
        };
        let response = client.get_preferred_allocation(request).await?.into_inner();
        // `callGetPreferredAllocationIfAvailable` (`devicemanager/manager.go`):
        // an answer without a container is an empty preference, not an error.
        Ok(response
            .container_responses
            .into_iter()
            .next()
            .map(|c| c.device_i_ds)
            .unwrap_or_default())
    }

    /// A kubelet going down (`server.go` `Stop`): the server stops, every
    /// client is disconnected, `kubelet.sock` is removed.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(true);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let tasks = self.shared.with(|state| {
            let names: Vec<String> = state.clients.keys().cloned().collect();
            for name in names {
                Shared::disconnect(state, &name);
            }
            state.replaced.clear();
            state.life += 1;
            std::mem::take(&mut state.tasks)
        });
        for t in tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(self.socket_path());
    }

    /// A kubelet starting (`server.go` `Start`): every entry of the
    /// directory but the checkpoint and subdirectories is removed
    /// (`manager.go` `CleanupPluginDirectory`, which looks with `Lstat`),
    /// then `kubelet.sock` is served.
    ///
    /// # Errors
    /// When the directory cannot be cleaned or the socket served.
    pub async fn resume(&mut self) -> Result<(), EmulatorError> {
        let dir = self.shared.dir.clone();
        let entries = std::fs::read_dir(&dir).map_err(|source| EmulatorError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if entry.file_name() != CHECKPOINT && !is_dir {
                std::fs::remove_file(&path).map_err(|source| EmulatorError::Io { path, source })?;
            }
        }
        self.serve()
    }

    /// A kubelet restart: stop, clean the directory, serve a new
    /// `kubelet.sock`.
    ///
    /// # Errors
    /// As [`KubeletEmulator::resume`].
    pub async fn restart(&mut self) -> Result<(), EmulatorError> {
        self.stop().await;
        self.resume().await
    }
}

impl Drop for KubeletEmulator {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(true);
            task.abort();
        }
        let tasks = std::mem::take(
            &mut self
                .shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .tasks,
        );
        for t in tasks {
            t.abort();
        }
    }
}

/// Go's `filepath.Join(dir, endpoint)`: joined and cleaned lexically, so
/// an absolute endpoint stays under `dir` and `..` can leave it. The
/// kubelet checks the endpoint no further (`server.go` `Register`).
fn go_join(dir: &Path, endpoint: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for part in dir.components().chain(Path::new(endpoint).components()) {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

struct RegistrationService {
    shared: Arc<Shared>,
}

impl RegistrationService {
    fn reject(&self, resource: &str, message: String) -> Status {
        self.shared
            .with(|s| s.view.rejected.push((resource.to_owned(), message.clone())));
        // The kubelet returns plain Go errors: grpc-go sends them as Unknown.
        Status::unknown(message)
    }
}

/// `handler.go` `runClient` (1.25+): read the stream until it ends, then
/// disconnect whichever client is current for the name; 1.24's
/// `runEndpoint` only its own.
fn run_client(
    shared: Arc<Shared>,
    resource: String,
    id: u64,
    life: u64,
    mut client: DevicePluginClient<Channel>,
    end: oneshot::Receiver<()>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let read = async {
            let Ok(stream) = client.list_and_watch(pb::Empty {}).await else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(msg)) = stream.message().await {
                let list = DeviceList::from_pb(&msg).ok();
                shared.with(|s| {
                    if s.life != life {
                        return;
                    }
                    // `PluginListAndWatchReceiver` updates by name: an
                    // old client still streaming writes too.
                    if let Some(r) = s.view.resources.get_mut(&resource) {
                        r.devices = list;
                        r.updates += 1;
                        r.last_update = Some(Instant::now());
                    }
                });
            }
        };
        tokio::select! {
            () = read => {}
            _ = end => {}
        }
        drop(client);
        shared.with(|s| {
                if s.life != life {
                    // A client of a kubelet that has since stopped.
                    return;
                }
                s.replaced.retain(|c| c.id != id);
                // `getClient(name)`: the current client, which may be a
                // newer registration's (kubernetes issue 121994).
                let current = s.clients.get(&resource).map(|c| c.id);
                let own_only = shared.version == KubeletVersion::V1_24;
                if current.is_some() && !(own_only && current != Some(id)) {
                    if current != Some(id) {
                        tracing::debug!(%resource, "an old stream ended: the current client is disconnected (kubelet issue 121994)");
                    }
                    Shared::disconnect(s, &resource);
                }
            });
    })
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let req = request.into_inner();
        let resource = req.resource_name.clone();
        self.shared.with(|s| s.view.register_calls += 1);
        // `server.go` `Register`: version, then resource name, with the
        // messages of `api.go`.
        if req.version != API_VERSION {
            let m = format!(
                "requested API version {:?} is not supported by kubelet. Supported version is [\"{API_VERSION}\"]",
                req.version
            );
            return Err(self.reject(&resource, m));
        }
        if ResourceName::new(&resource).is_err() {
            return Err(self.reject(
                &resource,
                format!("the ResourceName {resource:?} is invalid"),
            ));
        }
        let refusal = self
            .shared
            .refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(message) = refusal {
            return Err(self.reject(&resource, message));
        }
        if self.shared.version == KubeletVersion::V1_24 {
            // `go m.addEndpoint(r)`: success at once, the dial after.
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                if let Err(status) = connect(Arc::clone(&shared), req).await {
                    tracing::debug!(error = %status.message(), "1.24: the dial-back failed after Register succeeded");
                    shared.with(|s| s.view.dial_failures += 1);
                }
            });
            return Ok(Response::new(pb::Empty {}));
        }
        connect(Arc::clone(&self.shared), req).await?;
        Ok(Response::new(pb::Empty {}))
    }
}

/// A registration whose dial-back failed. 1.25+: `connectClient`
/// (`plugin/v1beta1/server.go`) had already put the new client in the map
/// (`registerClient`) and now removes it (`deregisterClient`), so the map
/// holds no client of the resource; the old client is never closed and its
/// stream goes on. 1.24: `addEndpoint` (`manager.go`) only logs the failure
/// and changes nothing.
fn forget_current(shared: &Shared, resource: &str, life: u64) {
    if shared.version == KubeletVersion::V1_24 {
        return;
    }
    shared.with(|s| {
        if s.life != life {
            return;
        }
        // Kept, not dropped: dropping a client would end its stream.
        if let Some(old) = s.clients.remove(resource) {
            s.replaced.push(old);
        }
    });
}

/// `connectClient` (1.25+) or `addEndpoint` (1.24): dial the plugin back,
/// read its options, make it the resource's client, read its stream.
async fn connect(shared: Arc<Shared>, req: pb::RegisterRequest) -> Result<(), Status> {
    let resource = req.resource_name.clone();
    let life = shared.with(|s| s.life);
    // `connectClient`: the endpoint is joined, not checked; the new
    // client replaces the old in the map without closing it.
    let path = go_join(&shared.dir, &req.endpoint);
    let rule = shared.version.authority(&path);
    let channel = uds::connect_with_authority(&path, DIAL_TIMEOUT, rule)
        .await
        .map_err(|e| {
            forget_current(&shared, &resource, life);
            // `errFailedToDialDevicePlugin` (`plugin/v1beta1/api.go`).
            Status::unknown(format!("failed to dial device plugin: {e}"))
        })?;
    let mut client = DevicePluginClient::new(channel.clone());
    // `PluginConnected`: the options come from the plugin, not from the
    // request, with no deadline (1.24: from the request).
    let asked = if shared.version == KubeletVersion::V1_24 {
        Ok(req.options.unwrap_or_default())
    } else {
        client
            .get_device_plugin_options(pb::Empty {})
            .await
            .map(tonic::Response::into_inner)
    };
    let options = match asked {
        Ok(o) => o,
        Err(e) => {
            forget_current(&shared, &resource, life);
            return Err(Status::unknown(format!(
                "failed to get device plugin options: {e}"
            )));
        }
    };
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let (end_tx, end_rx) = oneshot::channel();
    // One step: the client joins the map and its stream task the task
    // list together, so a stop never sees one without the other.
    shared.with(|s| {
        if s.life != life {
            // This kubelet stopped while dialling back: its successor
            // never heard of this registration.
            return Err(Status::unavailable("the kubelet stopped"));
        }
        let replaced = s.clients.insert(
            resource.clone(),
            Client {
                id,
                channel,
                end: Some(end_tx),
            },
        );
        // The old client is not closed: its connection and stream live
        // on (`registerClient` only overwrites the map entry).
        if let Some(old) = replaced {
            s.replaced.push(old);
        }
        let r = s.view.resources.entry(resource.clone()).or_default();
        r.endpoint.clone_from(&req.endpoint);
        r.options = options;
        r.registrations += 1;
        r.registered_at = Some(Instant::now());
        // The list of this registration has not arrived yet.
        r.devices = None;
        r.connected = true;
        r.stopped_at = None;
        // Then `go s.runClient(...)`, racing with the answer.
        let task = run_client(Arc::clone(&shared), resource, id, life, client, end_rx);
        s.tasks.retain(|t| !t.is_finished());
        s.tasks.push(task);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_join_as_go_does() {
        let dir = Path::new("/var/lib/kubelet/device-plugins");
        for (endpoint, want) in [
            ("x.sock", "/var/lib/kubelet/device-plugins/x.sock"),
            ("/x.sock", "/var/lib/kubelet/device-plugins/x.sock"),
            ("a/../x.sock", "/var/lib/kubelet/device-plugins/x.sock"),
            ("../x.sock", "/var/lib/kubelet/x.sock"),
            ("", "/var/lib/kubelet/device-plugins"),
        ] {
            assert_eq!(go_join(dir, endpoint), Path::new(want), "{endpoint:?}");
        }
    }
}
