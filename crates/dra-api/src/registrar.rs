//! Registration through the kubelet's plugin watcher.
//!
//! The kubelet watches `/var/lib/kubelet/plugins_registry` (an initial walk
//! plus inotify create and remove events; `pluginwatcher/plugin_watcher.go`)
//! and, about once a second, registers every socket it found: it dials the
//! socket (10 s), calls `GetInfo` (1 s), checks the plugin type and the
//! services, and answers with `NotifyRegistrationStatus` (5 s;
//! `operationexecutor/operation_generator.go`). It never deletes sockets
//! there, not even when it starts, and calls nothing when a plugin goes: a
//! socket removed unregisters the plugin, a socket re-created registers it
//! again. So a plugin needs no action when the kubelet restarts, and must
//! serve a new socket when its own is deleted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dir_watch::{DirWatch, Mask};
use kubelet_plumbing::uds::MAX_SOCKET_PATH;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::names::{DraService, DriverName};
use crate::pb::pluginregistration as reg;

/// The kubelet's plugin registration directory on a standard node: what a
/// driver binary passes as [`RegistrarConfig::new`]'s `registry_dir`.
pub const REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry"; // tidy: allow-host-path
/// `PluginInfo.type` of a DRA driver.
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";
/// How often the socket's presence is checked besides inotify.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// What a [`Registrar`] serves.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    registry_dir: PathBuf,
    driver: DriverName,
    endpoint: PathBuf,
    services: Vec<DraService>,
    extra_services: Vec<String>,
    instance: Option<String>,
    backoff: ops_kit::Backoff,
}

impl RegistrarConfig {
    /// Registers `driver`, whose DRA service listens on `endpoint` (an
    /// absolute path, the same inside the driver's container and on the
    /// host: kubelets 1.33+ dial `unix:` + endpoint), through the kubelet's
    /// `registry_dir` (normally [`REGISTRY_DIR`]), advertising both DRA
    /// services.
    #[must_use]
    pub fn new(
        driver: DriverName,
        registry_dir: impl Into<PathBuf>,
        endpoint: impl Into<PathBuf>,
    ) -> Self {
        Self {
            registry_dir: registry_dir.into(),
            driver,
            endpoint: endpoint.into(),
            services: DraService::ALL.to_vec(),
            extra_services: Vec::new(),
            instance: None,
            // The device-plugin framework's retry delays.
            backoff: ops_kit::Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
        }
    }

    /// The DRA services served, in order of preference. Listing only
    /// [`DraService::V1`] leaves kubelets 1.32 and 1.33 on the removed
    /// v1alpha4 API: keep both unless the cluster is 1.34+.
    #[must_use]
    pub fn services(mut self, services: &[DraService]) -> Self {
        self.services = services.to_vec();
        self
    }

    /// More entries of `supported_versions` after the DRA services, e.g.
    /// `v1alpha1.DRAResourceHealth` when the health stream is served.
    #[must_use]
    pub fn extra_service(mut self, name: &str) -> Self {
        self.extra_services.push(name.to_owned());
        self
    }

    /// A per-instance part of the socket name (`<driver>-<instance>-reg.sock`),
    /// so two instances of a driver can run side by side during a rolling
    /// update (kubelets 1.33+ keep several plugins of one driver).
    #[must_use]
    pub fn instance(mut self, instance: &str) -> Self {
        self.instance = Some(instance.to_owned());
        self
    }

    /// Retry delays when the socket cannot be served.
    #[must_use]
    pub fn backoff(mut self, backoff: ops_kit::Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The registration socket's file name.
    #[must_use]
    pub fn socket_name(&self) -> String {
        match &self.instance {
            Some(i) => format!("{}-{i}-reg.sock", self.driver),
            None => format!("{}-reg.sock", self.driver),
        }
    }

    fn info(&self) -> reg::PluginInfo {
        reg::PluginInfo {
            r#type: DRA_PLUGIN_TYPE.to_owned(),
            name: self.driver.as_str().to_owned(),
            endpoint: self.endpoint.to_string_lossy().into_owned(),
            supported_versions: self
                .services
                .iter()
                .map(|s| s.identifier().to_owned())
                .chain(self.extra_services.iter().cloned())
                .collect(),
        }
    }
}

/// Why a [`Registrar`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrarError {
    /// The service endpoint is not an absolute path.
    #[error(
        "the DRA endpoint {0} is not an absolute path (the kubelet dials it as unix:<endpoint>)"
    )]
    RelativeEndpoint(PathBuf),
    /// No DRA service is advertised.
    #[error("no DRA service to advertise")]
    NoService,
    /// The registration socket path does not fit in `sun_path`.
    #[error("the registration socket {} is longer than {MAX_SOCKET_PATH} bytes", .0.display())]
    PathTooLong(PathBuf),
}

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationStatus {
    /// Not serving yet (starting, or serving again after the socket was
    /// deleted).
    Starting,
    /// The socket is served; the kubelet has not answered (yet). (The
    /// device-plugin framework's name for waiting on the kubelet.)
    WaitingForKubelet,
    /// The kubelet registered the plugin.
    Registered,
    /// The kubelet refused, with its reason.
    Rejected {
        /// The kubelet's error text.
        reason: String,
    },
    /// The socket cannot be served; retrying.
    Retrying {
        /// What failed.
        error: String,
    },
    /// Stopped; the socket is removed.
    Stopped,
}

/// Serves the registration socket of one driver until stopped.
#[derive(Debug)]
pub struct Registrar {
    status: watch::Receiver<RegistrationStatus>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    socket: PathBuf,
}

impl Registrar {
    /// Starts serving. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When the configuration cannot work (see [`RegistrarError`]).
    pub fn start(config: RegistrarConfig) -> Result<Self, RegistrarError> {
        if !config.endpoint.is_absolute() {
            return Err(RegistrarError::RelativeEndpoint(config.endpoint));
        }
        if config.services.is_empty() {
            return Err(RegistrarError::NoService);
        }
        let socket = config.registry_dir.join(config.socket_name());
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RegistrarError::PathTooLong(socket));
        }
        let (status_tx, status) = watch::channel(RegistrationStatus::Starting);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(config, Arc::new(status_tx), stop_rx));
        Ok(Self {
            status,
            stop,
            task: Some(task),
            socket,
        })
    }

    /// The registration socket.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where the registration stands now.
    #[must_use]
    pub fn status(&self) -> RegistrationStatus {
        self.status.borrow().clone()
    }

    /// Follows the registration state.
    #[must_use]
    pub fn watch_status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Stops serving and removes the socket: the kubelet unregisters the
    /// plugin when it sees the socket go.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Service {
    info: reg::PluginInfo,
    status: Arc<watch::Sender<RegistrationStatus>>,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Service {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let r = request.into_inner();
        let state = if r.plugin_registered {
            tracing::info!(driver = %self.info.name, "registered with the kubelet");
            RegistrationStatus::Registered
        } else {
            tracing::error!(driver = %self.info.name, error = %r.error, "the kubelet refused the registration");
            RegistrationStatus::Rejected { reason: r.error }
        };
        self.status.send_replace(state);
        // The kubelet only logs what this returns: acknowledging a refusal
        // is not an error.
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

/// A file's identity: a socket served anew has a new one.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

async fn run(
    config: RegistrarConfig,
    status: Arc<watch::Sender<RegistrationStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let name = config.socket_name();
    let socket = config.registry_dir.join(&name);
    let _ = std::fs::create_dir_all(&config.registry_dir);
    remove_stale(&config.registry_dir, &config.driver).await;
    let mut watch = match DirWatch::new().and_then(|mut w| {
        w.add(
            &config.registry_dir,
            Mask::IN_DELETE | Mask::IN_MOVED_FROM | Mask::IN_CREATE | Mask::IN_MOVED_TO,
        )
        .map(|_| w)
    }) {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::warn!(dir = %config.registry_dir.display(), %error, "cannot watch the registration directory; checking it every {CHECK_EVERY:?}");
            None
        }
    };
    // The socket this task last served, to remove on the way out.
    let mut served = None;
    let mut attempt = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        let _ = std::fs::create_dir_all(&config.registry_dir);
        let _ = std::fs::remove_file(&socket);
        let listener = match kubelet_plumbing::uds::bind_private(&socket) {
            Ok(l) => l,
            Err(e) => {
                let error = format!("cannot listen on {}: {e}", socket.display());
                tracing::warn!(%error, "retrying");
                status.send_replace(RegistrationStatus::Retrying { error });
                let delay = config.backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        attempt = 0;
        served = identity(&socket);
        status.send_replace(RegistrationStatus::WaitingForKubelet);
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let service = Service {
            info: config.info(),
            status: Arc::clone(&status),
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(reg::registration_server::RegistrationServer::new(service))
                .serve_with_incoming_shutdown(
                    kubelet_plumbing::uds::incoming(listener),
                    async move {
                        let _ = shutdown_rx.wait_for(|s| *s).await;
                    },
                ),
        );
        // Until stopped or the socket is gone (deleted, or replaced by
        // someone else's file).
        let stopped = loop {
            let events = async {
                match &mut watch {
                    Some(w) => w.next().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                () = tokio::time::sleep(CHECK_EVERY) => false,
                ok = events => {
                    if !ok {
                        // A failed watch fails again at once: drop it.
                        tracing::warn!("the registration directory's watch failed; checking it every {CHECK_EVERY:?}");
                        watch = None;
                    }
                    false
                }
            };
            if woke {
                break true;
            }
            if identity(&socket) != served {
                tracing::warn!(socket = %socket.display(), "the registration socket was removed; serving it again");
                break false;
            }
        };
        let _ = shutdown_tx.send(true);
        let abort = server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .is_err()
        {
            abort.abort();
        }
        if stopped {
            break;
        }
        status.send_replace(RegistrationStatus::Starting);
    }
    // Ours only: a socket someone else put at the path since is theirs.
    if served.is_some() && identity(&socket) == served {
        let _ = std::fs::remove_file(&socket);
    }
    status.send_replace(RegistrationStatus::Stopped);
}

/// Removes registration sockets named for this driver (`<driver>-reg.sock`,
/// `<driver>-<instance>-reg.sock`) that refuse connections: left by a
/// killed instance. Live ones (another instance during a rolling update)
/// are kept, and so is everything else.
async fn remove_stale(dir: &Path, driver: &DriverName) {
    let (single, prefix) = (format!("{driver}-reg.sock"), format!("{driver}-"));
    kubelet_plumbing::uds::remove_refusing(dir, |name| {
        name.ends_with("-reg.sock") && (name == single || name.starts_with(&prefix))
    })
    .await;
}
