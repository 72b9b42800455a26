//! The life of one resource: serve a fresh socket, register, follow the
//! kubelet's restarts, re-register; never give up on a transient failure.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dir_watch::{DirWatch, Mask};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::metrics::ResourceMetrics;
use crate::pb;
use crate::plugin::Plugin;
use crate::service::{Published, Service};
use crate::types::{API_VERSION, ResourceName};
use crate::{FrameworkConfig, RegistrationStatus, uds};

/// The longest socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// The kubelet's registration socket name.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

pub(crate) struct Runtime<P> {
    pub(crate) resource: ResourceName,
    pub(crate) plugin: Arc<P>,
    pub(crate) config: Arc<FrameworkConfig>,
    pub(crate) devices: watch::Receiver<Arc<Published>>,
    pub(crate) status: watch::Sender<RegistrationStatus>,
    pub(crate) metrics: Arc<ResourceMetrics>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) instance: String,
}

/// What woke a wait.
enum Wake {
    Stop,
    Timeout,
    Events(Vec<dir_watch::Event>),
}

enum Registered {
    /// Registered with the kubelet whose socket had this identity.
    Yes(Option<(u64, u64)>),
    /// Our socket vanished while registering: serve a new one.
    SocketGone,
    Stop,
}

enum RegisterError {
    /// The kubelet answered and refused.
    Rejected(String),
    /// Anything else: try again.
    Transient(String),
}

impl<P: Plugin> Runtime<P> {
    fn set(&self, status: RegistrationStatus) {
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    fn kubelet_socket(&self) -> PathBuf {
        self.config.kubelet_dir.join(KUBELET_SOCKET)
    }

    pub(crate) async fn run(mut self) {
        let prefix = self.resource.socket_prefix();
        let dir = self.config.kubelet_dir.clone();
        clean_stale_sockets(&dir, &prefix).await;
        let mut watch = open_watch(&dir);
        let mut generation: u64 = 0;
        let mut attempt: u32 = 0;
        loop {
            generation += 1;
            let name = format!("{prefix}-{}-{generation}.sock", self.instance);
            let path = dir.join(&name);
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                let reason = format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter kubelet directory",
                    path.display()
                );
                tracing::error!(resource = %self.resource, %reason, "cannot serve");
                self.set(RegistrationStatus::Rejected { reason });
                let _ = self.stop.wait_for(|s| *s).await;
                self.set(RegistrationStatus::Stopped);
                return;
            }
            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            let server = match self.serve(&path, shutdown_rx) {
                Ok(server) => server,
                Err(error) => {
                    ResourceMetrics::inc(&self.metrics.registration_failures);
                    self.set(RegistrationStatus::Retrying {
                        attempt,
                        error: error.clone(),
                    });
                    tracing::warn!(resource = %self.resource, %error, "could not serve; retrying");
                    let delay = self.config.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    if matches!(self.wait(&mut watch, delay).await, Wake::Stop) {
                        self.set(RegistrationStatus::Stopped);
                        return;
                    }
                    continue;
                }
            };
            let outcome = self
                .register_loop(&path, &name, &mut watch, &mut attempt)
                .await;
            let restart = match outcome {
                Registered::Stop => false,
                Registered::SocketGone => true,
                Registered::Yes(kubelet) => {
                    self.wait_for_restart(&path, &name, kubelet, &mut watch)
                        .await
                }
            };
            let _ = shutdown_tx.send(true);
            stop_server(server).await;
            remove_socket(&path);
            if !restart {
                tracing::info!(resource = %self.resource, "stopped; socket removed");
                self.set(RegistrationStatus::Stopped);
                return;
            }
            ResourceMetrics::inc(&self.metrics.kubelet_restarts);
            tracing::info!(resource = %self.resource, "kubelet restart noticed; serving a new socket");
        }
    }

    fn serve(
        &self,
        path: &Path,
        shutdown: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        remove_socket(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("could not listen on {}: {e}", path.display()))?;
        let service = Service {
            resource: self.resource.clone(),
            plugin: Arc::clone(&self.plugin),
            options: self.plugin.options(),
            devices: self.devices.clone(),
            shutdown: shutdown.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let mut signal = shutdown;
        let resource = self.resource.clone();
        Ok(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(pb::device_plugin_server::DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(uds::incoming(listener), async move {
                    let _ = signal.wait_for(|s| *s).await;
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(%resource, %error, "device plugin server ended with an error");
            }
        }))
    }

    /// Registers, retrying transient failures with capped exponential
    /// backoff and jitter, waiting for the kubelet when it is absent and
    /// after a rejection until it restarts.
    async fn register_loop(
        &mut self,
        path: &Path,
        name: &str,
        watch: &mut Option<DirWatch>,
        attempt: &mut u32,
    ) -> Registered {
        loop {
            if *self.stop.borrow() {
                return Registered::Stop;
            }
            if !path.exists() {
                return Registered::SocketGone;
            }
            let kubelet = self.kubelet_socket();
            if !kubelet.exists() {
                self.set(RegistrationStatus::WaitingForKubelet);
                match self.wait(watch, self.config.check_interval).await {
                    Wake::Stop => return Registered::Stop,
                    Wake::Timeout | Wake::Events(_) => continue,
                }
            }
            // Taken before the call: a restart during it is not missed.
            let identity = inode(&kubelet);
            let delay = match self.register(&kubelet, name).await {
                Ok(()) => {
                    *attempt = 0;
                    ResourceMetrics::inc(&self.metrics.registrations);
                    tracing::info!(resource = %self.resource, endpoint = %name, "registered with the kubelet");
                    self.set(RegistrationStatus::Registered {
                        endpoint: name.to_owned(),
                    });
                    return Registered::Yes(identity);
                }
                Err(RegisterError::Rejected(reason)) => {
                    ResourceMetrics::inc(&self.metrics.registration_failures);
                    tracing::error!(resource = %self.resource, %reason, "the kubelet refused the registration; retrying when it restarts");
                    self.set(RegistrationStatus::Rejected { reason });
                    None
                }
                Err(RegisterError::Transient(error)) => {
                    ResourceMetrics::inc(&self.metrics.registration_failures);
                    tracing::warn!(resource = %self.resource, %error, attempt = *attempt, "registration failed; retrying");
                    self.set(RegistrationStatus::Retrying {
                        attempt: *attempt,
                        error,
                    });
                    let d = self.config.backoff.delay(*attempt);
                    *attempt = attempt.saturating_add(1);
                    Some(d)
                }
            };
            match delay {
                Some(d) => match self.wait(watch, d).await {
                    Wake::Stop => return Registered::Stop,
                    // A new kubelet socket is worth trying at once.
                    Wake::Timeout | Wake::Events(_) => {}
                },
                None => {
                    // Rejected: only a new kubelet changes the answer.
                    let before = inode(&kubelet);
                    loop {
                        match self.wait(watch, self.config.check_interval).await {
                            Wake::Stop => return Registered::Stop,
                            Wake::Events(ev) if ev.iter().any(kubelet_recreated) => break,
                            _ if inode(&kubelet) != before => break,
                            _ if !path.exists() => return Registered::SocketGone,
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    async fn register(&self, kubelet: &Path, name: &str) -> Result<(), RegisterError> {
        let timeout = self.config.register_timeout;
        let channel = uds::connect(kubelet, timeout)
            .await
            .map_err(|e| RegisterError::Transient(error_chain(&e)))?;
        let options = self.plugin.options();
        let request = pb::RegisterRequest {
            version: API_VERSION.to_owned(),
            endpoint: name.to_owned(),
            resource_name: self.resource.as_str().to_owned(),
            options: Some(pb::DevicePluginOptions {
                pre_start_required: options.pre_start_required,
                get_preferred_allocation_available: options.preferred_allocation,
            }),
        };
        let mut client = pb::registration_client::RegistrationClient::new(channel);
        match tokio::time::timeout(timeout, client.register(request)).await {
            Err(_) => Err(RegisterError::Transient(format!(
                "Register did not answer within {timeout:?}"
            ))),
            Ok(Ok(_)) => Ok(()),
            // The kubelet answered: its validation refused us. Transport
            // failures surface as Unavailable or Unknown without a reply.
            Ok(Err(status)) if is_rejection(&status) => {
                Err(RegisterError::Rejected(status.message().to_owned()))
            }
            Ok(Err(status)) => Err(RegisterError::Transient(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        }
    }

    /// Waits until the kubelet restarts (our socket deleted, `kubelet.sock`
    /// recreated) or the resource stops. Returns whether to restart.
    async fn wait_for_restart(
        &mut self,
        path: &Path,
        name: &str,
        kubelet_inode: Option<(u64, u64)>,
        watch: &mut Option<DirWatch>,
    ) -> bool {
        let kubelet = self.kubelet_socket();
        loop {
            match self.wait(watch, self.config.check_interval).await {
                Wake::Stop => return false,
                Wake::Events(events) => {
                    let ours_gone = events.iter().any(|e| {
                        e.name.as_deref().is_some_and(|n| n == name)
                            && e.mask.intersects(Mask::IN_DELETE | Mask::IN_MOVED_FROM)
                    });
                    if ours_gone || events.iter().any(dir_watch::Event::is_overflow) {
                        return true;
                    }
                    // Events queued before the registration are not news:
                    // the socket's identity decides, below.
                }
                Wake::Timeout => {}
            }
            // The periodic check, also after events that did not decide. A
            // missing kubelet.sock is a kubelet going down: the restart is
            // when its new socket appears (or ours is deleted).
            let current = inode(&kubelet);
            let new_kubelet = current.is_some_and(|i| Some(i) != kubelet_inode);
            if !path.exists() || new_kubelet {
                return true;
            }
            // A kubelet that is down is not reading our list: not ready
            // until it is back.
            if current.is_none() {
                self.set(RegistrationStatus::WaitingForKubelet);
            } else {
                self.set(RegistrationStatus::Registered {
                    endpoint: name.to_owned(),
                });
            }
        }
    }

    async fn wait(&mut self, watch: &mut Option<DirWatch>, timeout: Duration) -> Wake {
        if *self.stop.borrow() {
            return Wake::Stop;
        }
        let sleep = tokio::time::sleep(timeout);
        tokio::pin!(sleep);
        let stop = &mut self.stop;
        match watch {
            Some(w) => tokio::select! {
                _ = stop.wait_for(|s| *s) => Wake::Stop,
                () = &mut sleep => Wake::Timeout,
                events = w.next() => match events {
                    Ok(events) => Wake::Events(events),
                    Err(error) => {
                        tracing::warn!(%error, "watching the kubelet directory failed; checking periodically");
                        *watch = None;
                        Wake::Timeout
                    }
                },
            },
            None => tokio::select! {
                _ = stop.wait_for(|s| *s) => Wake::Stop,
                () = &mut sleep => Wake::Timeout,
            },
        }
    }
}

fn kubelet_recreated(e: &dir_watch::Event) -> bool {
    e.name.as_deref().is_some_and(|n| n == KUBELET_SOCKET)
        && e.mask.intersects(Mask::IN_CREATE | Mask::IN_MOVED_TO)
}

/// A reply from the kubelet's handler (rather than a transport failure).
fn is_rejection(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::PermissionDenied => true,
        // The kubelet returns plain Go errors, which arrive as Unknown with
        // its message; a dead connection also says Unknown, without one.
        Code::Unknown => {
            let m = status.message().to_ascii_lowercase();
            m.contains("version")
                || m.contains("resource name")
                || m.contains("invalid")
                || m.contains("not supported")
        }
        _ => false,
    }
}

fn open_watch(dir: &Path) -> Option<DirWatch> {
    let mask = Mask::IN_CREATE | Mask::IN_DELETE | Mask::IN_MOVED_TO | Mask::IN_MOVED_FROM;
    match DirWatch::new().and_then(|mut w| w.add(dir, mask).map(|_| w)) {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the kubelet directory; checking it periodically");
            None
        }
    }
}

fn inode(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(path = %path.display(), %error, "could not remove socket"),
    }
}

async fn stop_server(server: tokio::task::JoinHandle<()>) {
    let abort = server.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Removes sockets that carry our prefix and refuse connections (left by a
/// crashed instance, or by the Go plugin). Live sockets — another instance
/// during a rolling update — and foreign sockets are left alone.
pub(crate) async fn clean_stale_sockets(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let ours = name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('.'))
            && name.ends_with(".sock");
        if !ours {
            continue;
        }
        let path = entry.path();
        let alive = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::UnixStream::connect(&path),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !alive {
            tracing::info!(path = %path.display(), "removing stale socket");
            remove_socket(&path);
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
