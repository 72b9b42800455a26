//! Test kit: the kubelet's side of the device plugin API, over real Unix
//! sockets in a directory, for tests, the demo, benchmarks and other plugin
//! authors. Never a dependency of a shipped binary.
//!
//! Like the kubelet it serves `Registration` on `<dir>/kubelet.sock`,
//! validates the version, resource name and endpoint, dials the plugin back
//! and calls `GetDevicePluginOptions` *inside* `Register`, then keeps a
//! ListAndWatch stream open and records the latest list per resource. It
//! calls `GetPreferredAllocation` and `Allocate` as the kubelet does (one
//! container per request), and can restart (every socket but
//! `kubelet_internal_checkpoint` deleted, `kubelet.sock` recreated) or go
//! absent.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! let dir = tempfile::tempdir()?;
//! let mut kubelet = kubelet_emulator::KubeletEmulator::start(dir.path()).await?;
//! let view = kubelet
//!     .wait_until(Duration::from_secs(5), |v| v.devices("example.com/null").is_some_and(|d| d.devices().len() == 2))
//!     .await?;
//! let answer = kubelet.allocate("example.com/null", &["null-0"]).await?;
//! kubelet.restart().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devplugin_api::pb::device_plugin_client::DevicePluginClient;
use devplugin_api::pb::registration_server::{Registration, RegistrationServer};
use devplugin_api::{API_VERSION, DeviceList, KUBELET_SOCKET, ResourceName, pb, uds};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// The kubelet's checkpoint file, which survives its restarts.
pub const CHECKPOINT: &str = "kubelet_internal_checkpoint";

/// What the emulator knows about one resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceView {
    /// The socket file name of the last registration.
    pub endpoint: String,
    /// The options read back from the plugin during `Register`.
    pub options: pb::DevicePluginOptions,
    /// The latest list received since the last registration, if any.
    pub devices: Option<DeviceList>,
    /// How many times it registered.
    pub registrations: u32,
    /// How many lists it received.
    pub updates: u64,
    /// Whether its ListAndWatch stream is open.
    pub connected: bool,
    /// When the latest list arrived.
    pub last_update: Option<Instant>,
    /// When it last registered.
    pub registered_at: Option<Instant>,
}

/// Everything the emulator knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Per resource name.
    pub resources: BTreeMap<String, ResourceView>,
    /// Registrations refused, with the reason.
    pub rejected: Vec<(String, String)>,
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

    /// Whether `resource` is registered with an open stream.
    #[must_use]
    pub fn is_connected(&self, resource: &str) -> bool {
        self.resources.get(resource).is_some_and(|r| r.connected)
    }
}

/// Why an emulator call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// Waiting for a condition took too long.
    #[error("the condition did not hold within {0:?}; last view: {1:#?}")]
    Timeout(Duration, Box<View>),
    /// The resource is not registered.
    #[error("resource {0} is not registered")]
    NotRegistered(String),
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

#[derive(Debug, Default)]
struct State {
    view: Mutex<View>,
    streams: Mutex<BTreeMap<String, JoinHandle<()>>>,
}

struct Shared {
    /// Connections to plugins, reused like the kubelet's.
    channels: Mutex<BTreeMap<String, tonic::transport::Channel>>,
    dir: PathBuf,
    state: State,
    changed: watch::Sender<u64>,
    refusal: Mutex<Option<String>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut self
            .state
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
        self.changed.send_modify(|v| *v += 1);
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
            .finish_non_exhaustive()
    }
}

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

impl KubeletEmulator {
    /// Serves `Registration` on `<dir>/kubelet.sock`.
    ///
    /// # Errors
    /// When the socket cannot be served.
    pub async fn start(dir: &Path) -> Result<Self, EmulatorError> {
        let mut me = Self::absent(dir);
        me.serve()?;
        Ok(me)
    }

    /// Creates an emulator that is not serving (a kubelet not started yet);
    /// [`KubeletEmulator::resume`] starts it.
    #[must_use]
    pub fn absent(dir: &Path) -> Self {
        let (changed, _) = watch::channel(0);
        let shared = Shared {
            channels: Mutex::new(BTreeMap::new()),
            dir: dir.to_owned(),
            state: State::default(),
            changed,
            refusal: Mutex::new(None),
        };
        Self {
            shared: Arc::new(shared),
            server: None,
        }
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
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
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
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

    async fn client(
        &self,
        resource: &str,
    ) -> Result<DevicePluginClient<tonic::transport::Channel>, EmulatorError> {
        // Only the endpoint: cloning the whole view would cost more than
        // the call measured.
        let endpoint = self
            .shared
            .state
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resources
            .get(resource)
            .filter(|r| r.connected)
            .map(|r| r.endpoint.clone())
            .ok_or_else(|| EmulatorError::NotRegistered(resource.to_owned()))?;
        let cached = self
            .shared
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&endpoint)
            .cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = uds::connect(&self.shared.dir.join(&endpoint), DIAL_TIMEOUT).await?;
                self.shared
                    .channels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(endpoint, c.clone());
                c
            }
        };
        Ok(DevicePluginClient::new(channel))
    }

    /// Calls `Allocate` for one container, as the kubelet does.
    ///
    /// # Errors
    /// When the resource is not registered or the plugin refuses.
    pub async fn allocate(
        &self,
        resource: &str,
        ids: &[&str],
    ) -> Result<pb::ContainerAllocateResponse, EmulatorError> {
        let mut client = self.client(resource).await?;
        let request = pb::AllocateRequest {
            container_requests: vec![pb::ContainerAllocateRequest {
                devices_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            }],
        };
        let mut response = client.allocate(request).await?.into_inner();
        if response.container_responses.is_empty() {
            return Err(Status::internal("the plugin answered no container").into());
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
        let mut client = self.client(resource).await?;
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        let request = pb::PreferredAllocationRequest {
            container_requests: vec![pb::ContainerPreferredAllocationRequest {
                available_device_i_ds: owned(available),
                must_include_device_i_ds: owned(must_include),
                allocation_size: size,
            }],
        };
        let mut response = client.get_preferred_allocation(request).await?.into_inner();
        if response.container_responses.is_empty() {
            return Err(Status::internal("the plugin answered no container").into());
        }
        Ok(response.container_responses.swap_remove(0).device_i_ds)
    }

    /// Stops serving, drops every stream and removes `kubelet.sock` (a
    /// kubelet that is down).
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
        let streams = std::mem::take(
            &mut *self
                .shared
                .state
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (_, s) in streams {
            s.abort();
        }
        self.shared.update(|v| {
            for r in v.resources.values_mut() {
                r.connected = false;
            }
        });
        let _ = std::fs::remove_file(self.socket_path());
    }

    /// Starts serving again after [`KubeletEmulator::stop`] or
    /// [`KubeletEmulator::absent`], as a starting kubelet does: every file
    /// in the directory but the checkpoint is deleted first.
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
            if entry.file_name() != CHECKPOINT && !entry.path().is_dir() {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| EmulatorError::Io { path, source })?;
            }
        }
        self.serve()
    }

    /// A kubelet restart: stop, delete every socket, serve a new
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
        for (_, s) in std::mem::take(
            &mut *self
                .shared
                .state
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            s.abort();
        }
    }
}

struct RegistrationService {
    shared: Arc<Shared>,
}

impl RegistrationService {
    fn reject(&self, resource: &str, message: String) -> Status {
        self.shared
            .update(|v| v.rejected.push((resource.to_owned(), message.clone())));
        // The kubelet returns plain errors: they arrive as Unknown.
        Status::unknown(message)
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let req = request.into_inner();
        let resource = req.resource_name.clone();
        if req.version != API_VERSION {
            let m = format!(
                "requested API version {:?} is not supported by kubelet. Supported versions are [\"{API_VERSION}\"]",
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
        if req.endpoint.is_empty() || req.endpoint.contains('/') {
            return Err(self.reject(
                &resource,
                format!(
                    "invalid endpoint {:?}: a file name in the kubelet directory is required",
                    req.endpoint
                ),
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
        // Dial back and read the options before answering, as the kubelet.
        let path = self.shared.dir.join(&req.endpoint);
        let channel = uds::connect(&path, DIAL_TIMEOUT).await.map_err(|e| {
            Status::unavailable(format!(
                "could not dial the plugin at {}: {e}",
                path.display()
            ))
        })?;
        let mut client = DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(pb::Empty {})
            .await?
            .into_inner();
        let mut generation = 0;
        self.shared.update(|v| {
            let r = v.resources.entry(resource.clone()).or_default();
            generation = r.registrations + 1;
            r.endpoint.clone_from(&req.endpoint);
            r.options = options;
            r.registrations += 1;
            r.registered_at = Some(Instant::now());
            // The list of this registration has not arrived yet.
            r.devices = None;
            r.connected = true;
        });
        // A newer registration replaces the older one's stream.
        let shared = Arc::clone(&self.shared);
        let name = resource.clone();
        let task = tokio::spawn(async move {
            let stream = client.list_and_watch(pb::Empty {}).await;
            if let Ok(stream) = stream {
                let mut stream = stream.into_inner();
                while let Ok(Some(msg)) = stream.message().await {
                    let list = DeviceList::from_pb(&msg).ok();
                    shared.update(|v| {
                        // A stream of an older registration no longer counts.
                        if let Some(r) = v
                            .resources
                            .get_mut(&name)
                            .filter(|r| r.registrations == generation)
                        {
                            r.devices = list;
                            r.updates += 1;
                            r.last_update = Some(Instant::now());
                        }
                    });
                }
            }
            shared.update(|v| {
                if let Some(r) = v
                    .resources
                    .get_mut(&name)
                    .filter(|r| r.registrations == generation)
                {
                    r.connected = false;
                }
            });
        });
        let old = self
            .shared
            .state
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(resource, task);
        if let Some(old) = old {
            old.abort();
        }
        Ok(Response::new(pb::Empty {}))
    }
}
