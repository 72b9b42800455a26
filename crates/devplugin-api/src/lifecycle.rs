//! The life of one resource: serve a fresh socket, register, follow the
//! kubelet's restarts, re-register; never give up on a transient failure.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dir_watch::{DirWatch, Mask};
use tokio::sync::watch;

use crate::metrics::ResourceMetrics;
use crate::pb;
use crate::plugin::Plugin;
use crate::service::{Published, Service, StreamCount};
use crate::types::{API_VERSION, ResourceName};
use crate::{FrameworkConfig, RegistrationStatus, uds};

pub use kubelet_plumbing::uds::MAX_SOCKET_PATH;
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
    /// The framework's socket generation counter: names never repeat
    /// within one process, so an old task never removes a new socket.
    pub(crate) generation: Arc<AtomicU64>,
    /// Releases the resource name when the task ends, however it ends
    /// (taken just before `Stopped` is announced).
    pub(crate) release: Option<Release>,
    /// When a new kubelet was last noticed (a restart, or its socket
    /// appearing after an absence): it starts the retry count afresh, and
    /// while it is starting (its socket bound before it listens) a
    /// refusal is retried soon.
    pub(crate) kubelet_new_since: Option<tokio::time::Instant>,
}

/// Takes the resource name out of the framework's served set on drop: the
/// name is free again only once the task (and its socket) is gone.
pub(crate) struct Release {
    pub(crate) served: Arc<Mutex<BTreeSet<ResourceName>>>,
    pub(crate) resource: ResourceName,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.resource);
    }
}

/// How long after a lost ListAndWatch stream the resource registers again.
/// The kubelet closes its connection to the plugin before it marks the
/// resource disconnected (`plugin/v1beta1/client.go` `Disconnect`, then
/// `manager.go` `PluginDisconnected`, 1.25–1.34): a registration that
/// overtook that late mark would be stopped by it.
const REREGISTER_SETTLE: Duration = Duration::from_millis(20);
/// A stream lost sooner than this after registering counts as a failed
/// attempt: the retries back off instead of looping.
const STABLE_AFTER: Duration = Duration::from_millis(250);
/// How long a new kubelet socket counts as starting: a gRPC server binds
/// its socket before it listens, so a dial in between is refused.
const KUBELET_STARTING: Duration = Duration::from_secs(1);
/// The retry interval while the kubelet is starting.
const STARTING_RETRY: Duration = Duration::from_millis(20);

/// What ended a wait.
enum Wake {
    Stop,
    /// `kubelet.sock` created, our socket deleted, or events lost: look at
    /// the directory again (an event may be older than what it announces).
    Changed,
    Timeout,
}

enum Registered {
    /// Registered with the kubelet whose socket had this identity.
    Yes(Option<SocketIdentity>),
    /// Our socket vanished while registering: serve a new one.
    SocketGone,
    Stop,
}

/// How a registration ended.
enum Held {
    /// The resource was stopped.
    Stop,
    /// The kubelet restarted (our socket deleted, `kubelet.sock` new).
    Restart,
    /// The kubelet stayed up but holds no stream: register again.
    StreamLost {
        /// Whether the stream lived long enough to call it stable.
        stable: bool,
    },
}

/// Our socket could not be created.
#[derive(Debug, thiserror::Error)]
#[error("could not listen on {}", path.display())]
struct ListenError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Why one registration did not happen. Only `Rejected` waits for a new
/// kubelet; everything else is retried with backoff.
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    /// The kubelet answered and refused (see [`is_rejection`]).
    #[error("the kubelet refused: {}", .0.message())]
    Rejected(tonic::Status),
    /// The kubelet's socket could not be dialled.
    #[error(transparent)]
    Dial(#[from] crate::uds::DialError),
    /// `Register` did not answer in time.
    #[error("Register did not answer within {0:?}")]
    Timeout(Duration),
    /// The call failed otherwise: a transport failure, or a kubelet error
    /// that a later attempt may not repeat (its dial-back failing).
    #[error("{:?}: {}", .0.code(), .0.message())]
    Failed(tonic::Status),
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

    /// The end: the name is free before anyone hears `Stopped`.
    fn finish(&mut self) {
        self.release.take();
        self.set(RegistrationStatus::Stopped);
    }

    /// A new kubelet: its own start, with the retry count from zero (the
    /// last one's failures and lost streams say nothing about it).
    fn new_kubelet(&mut self, attempt: &mut u32) {
        self.kubelet_new_since = Some(tokio::time::Instant::now());
        *attempt = 0;
    }

    fn kubelet_socket(&self) -> PathBuf {
        self.config.kubelet_dir.join(KUBELET_SOCKET)
    }

    pub(crate) async fn run(mut self) {
        let prefix = self.resource.socket_prefix();
        let dir = self.config.kubelet_dir.clone();
        clean_stale_sockets(&dir, &prefix).await;
        let mut watch = open_watch(&dir);
        let mut attempt: u32 = 0;
        loop {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
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
                self.finish();
                return;
            }
            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            let (server, mut streams) = match self.serve(&path, shutdown_rx) {
                Ok(served) => served,
                Err(failure) => {
                    let error = ops_kit::Chain(&failure).to_string();
                    ResourceMetrics::inc(&self.metrics.registration_failures);
                    self.set(RegistrationStatus::Retrying {
                        attempt,
                        error: error.clone(),
                    });
                    tracing::warn!(resource = %self.resource, %error, "could not serve; retrying");
                    let delay = self.config.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    if matches!(self.wait(&mut watch, delay, &name).await, Wake::Stop) {
                        self.finish();
                        return;
                    }
                    continue;
                }
            };
            let restart = self
                .session(&path, &name, &mut watch, &mut streams, &mut attempt)
                .await;
            let _ = shutdown_tx.send(true);
            stop_server(server).await;
            remove_socket(&path);
            if !restart {
                tracing::info!(resource = %self.resource, "stopped; socket removed");
                self.finish();
                return;
            }
            ResourceMetrics::inc(&self.metrics.kubelet_restarts);
            self.new_kubelet(&mut attempt);
            tracing::info!(resource = %self.resource, "kubelet restart noticed; serving a new socket");
        }
    }

    /// Registers the socket and keeps it registered, again after every
    /// stream the kubelet drops while it stays up. Returns whether to serve
    /// a new socket (false: stop).
    async fn session(
        &mut self,
        path: &Path,
        name: &str,
        watch: &mut Option<DirWatch>,
        streams: &mut watch::Receiver<StreamCount>,
        attempt: &mut u32,
    ) -> bool {
        loop {
            // The kubelet may open the stream before `Register` answers:
            // what counts is every stream opened from here on.
            let before = streams.borrow().opened;
            let kubelet = match self.register_loop(path, name, watch, attempt).await {
                Registered::Stop => return false,
                Registered::SocketGone => return true,
                Registered::Yes(kubelet) => kubelet,
            };
            match self.hold(path, name, kubelet, before, watch, streams).await {
                Held::Stop => return false,
                Held::Restart => return true,
                Held::StreamLost { stable } => {
                    ResourceMetrics::inc(&self.metrics.stream_losses);
                    let delay = if stable {
                        *attempt = 0;
                        REREGISTER_SETTLE
                    } else {
                        let d = self.config.backoff.delay(*attempt);
                        *attempt = attempt.saturating_add(1);
                        d.max(REREGISTER_SETTLE)
                    };
                    tracing::warn!(resource = %self.resource, delay_ms = delay.as_millis(), "the kubelet dropped the ListAndWatch stream; registering again");
                    self.set(RegistrationStatus::Retrying {
                        attempt: *attempt,
                        error: "the kubelet dropped the ListAndWatch stream".to_owned(),
                    });
                    // What the wait saw, register_loop looks at.
                    if matches!(self.wait(watch, delay, name).await, Wake::Stop) {
                        return false;
                    }
                }
            }
        }
    }

    fn serve(
        &self,
        path: &Path,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(tokio::task::JoinHandle<()>, watch::Receiver<StreamCount>), ListenError> {
        remove_socket(path);
        let listener = crate::uds::bind_private(path).map_err(|source| ListenError {
            path: path.to_owned(),
            source,
        })?;
        let (streams_tx, streams_rx) = watch::channel(StreamCount::default());
        let service = Service {
            resource: self.resource.clone(),
            plugin: Arc::clone(&self.plugin),
            options: self.plugin.options(),
            devices: self.devices.clone(),
            shutdown: shutdown.clone(),
            metrics: Arc::clone(&self.metrics),
            streams: Arc::new(streams_tx),
        };
        let mut signal = shutdown;
        let resource = self.resource.clone();
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(pb::device_plugin_server::DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(uds::incoming(listener), async move {
                    let _ = signal.wait_for(|s| *s).await;
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(%resource, %error, "device plugin server ended with an error");
            }
        });
        Ok((task, streams_rx))
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
                match self.wait(watch, self.config.check_interval, name).await {
                    Wake::Stop => return Registered::Stop,
                    // Looked at again at the top: our socket, the kubelet's.
                    Wake::Changed | Wake::Timeout => {
                        if kubelet.exists() {
                            self.new_kubelet(attempt);
                        }
                        continue;
                    }
                }
            }
            // Taken before the call: a restart during it is not missed.
            let identity = inode(&kubelet);
            let starting = self
                .kubelet_new_since
                .is_some_and(|since| since.elapsed() < KUBELET_STARTING);
            let delay = match self.register(&kubelet, name).await {
                Ok(()) => {
                    ResourceMetrics::inc(&self.metrics.registrations);
                    tracing::info!(resource = %self.resource, endpoint = %name, "registered with the kubelet");
                    self.set(RegistrationStatus::AwaitingStream {
                        endpoint: name.to_owned(),
                    });
                    return Registered::Yes(identity);
                }
                Err(RegisterError::Rejected(status)) => {
                    let reason = status.message().to_owned();
                    ResourceMetrics::inc(&self.metrics.registration_failures);
                    tracing::error!(resource = %self.resource, %reason, "the kubelet refused the registration; retrying when it restarts");
                    self.set(RegistrationStatus::Rejected { reason });
                    None
                }
                Err(failure) => {
                    let error = ops_kit::Chain(&failure).to_string();
                    ResourceMetrics::inc(&self.metrics.registration_failures);
                    tracing::warn!(resource = %self.resource, %error, attempt = *attempt, "registration failed; retrying");
                    self.set(RegistrationStatus::Retrying {
                        attempt: *attempt,
                        error,
                    });
                    if starting {
                        // Not counted: the kubelet is not listening yet.
                        Some(STARTING_RETRY)
                    } else {
                        let d = self.config.backoff.delay(*attempt);
                        *attempt = attempt.saturating_add(1);
                        Some(d)
                    }
                }
            };
            match delay {
                // Only a new kubelet (or our socket's loss) cuts the delay
                // short; other plugins' sockets coming and going do not.
                Some(d) => match self.wait(watch, d, name).await {
                    Wake::Stop => return Registered::Stop,
                    Wake::Changed | Wake::Timeout => {}
                },
                None => {
                    // Rejected: only a new kubelet changes the answer.
                    let before = inode(&kubelet);
                    loop {
                        match self.wait(watch, self.config.check_interval, name).await {
                            Wake::Stop => return Registered::Stop,
                            _ if !path.exists() => return Registered::SocketGone,
                            _ if inode(&kubelet) != before => break,
                            Wake::Changed | Wake::Timeout => {}
                        }
                    }
                }
            }
        }
    }

    async fn register(&self, kubelet: &Path, name: &str) -> Result<(), RegisterError> {
        let timeout = self.config.register_timeout;
        let channel = uds::connect(kubelet, timeout).await?;
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
            Err(_) => Err(RegisterError::Timeout(timeout)),
            Ok(Ok(_)) => Ok(()),
            // The kubelet answered: its validation refused us. Transport
            // failures surface as Unavailable or Unknown without a reply.
            Ok(Err(status)) if is_rejection(&status) => Err(RegisterError::Rejected(status)),
            Ok(Err(status)) => Err(RegisterError::Failed(status)),
        }
    }

    /// Holds a registration: ready while the kubelet reads a ListAndWatch
    /// stream; ends when the kubelet restarts, when it drops the stream
    /// while staying up (or never opens one), or when the resource stops.
    async fn hold(
        &mut self,
        path: &Path,
        name: &str,
        kubelet_inode: Option<SocketIdentity>,
        opened_before: u64,
        watch: &mut Option<DirWatch>,
        streams: &mut watch::Receiver<StreamCount>,
    ) -> Held {
        let kubelet = self.kubelet_socket();
        let registered = tokio::time::Instant::now();
        let mut streamed_since: Option<tokio::time::Instant> = None;
        loop {
            let count = *streams.borrow_and_update();
            // A stream that opened and already ended between two looks
            // counts as opened: it is lost, not still awaited.
            if count.opened > opened_before && streamed_since.is_none() {
                streamed_since = Some(tokio::time::Instant::now());
                if count.open > 0 {
                    self.set(RegistrationStatus::Registered {
                        endpoint: name.to_owned(),
                    });
                }
            }
            match (count.open, streamed_since) {
                (0, Some(since)) => {
                    // The stream ended. A kubelet that went down is a
                    // restart in the making, not a lost stream.
                    if inode(&kubelet) == kubelet_inode && path.exists() {
                        return Held::StreamLost {
                            stable: since.elapsed() >= STABLE_AFTER,
                        };
                    }
                    self.set(RegistrationStatus::WaitingForKubelet);
                }
                (0, None) if registered.elapsed() >= self.config.stream_timeout => {
                    tracing::warn!(resource = %self.resource, timeout = ?self.config.stream_timeout, "registered, but the kubelet opened no ListAndWatch stream");
                    return Held::StreamLost { stable: false };
                }
                // Streaming; or only streams older than this registration
                // are open (a replaced kubelet client not yet closed).
                _ => {}
            }
            let check = if streamed_since.is_none() {
                self.config
                    .stream_timeout
                    .saturating_sub(registered.elapsed())
                    .min(self.config.check_interval)
            } else {
                self.config.check_interval
            };
            let woke = tokio::select! {
                changed = streams.changed() => {
                    if changed.is_err() {
                        // The server is gone: serve anew.
                        return Held::Restart;
                    }
                    continue;
                }
                woke = self.wait(watch, check, name) => woke,
            };
            if matches!(woke, Wake::Stop) {
                return Held::Stop;
            }
            // After events and periodically. Events queued before the
            // registration are not news: the socket's identity decides. A
            // missing kubelet.sock is a kubelet going down: the restart is
            // when its new socket appears (or ours is deleted).
            let current = inode(&kubelet);
            if !path.exists() || current.is_some_and(|i| Some(i) != kubelet_inode) {
                return Held::Restart;
            }
            if current.is_none() {
                self.set(RegistrationStatus::WaitingForKubelet);
            }
        }
    }

    /// Waits up to `timeout` for what matters to a resource: a stop, a new
    /// `kubelet.sock`, or the loss of our socket `name`. Other events in the
    /// directory (other plugins' sockets) do not end the wait.
    async fn wait(&mut self, watch: &mut Option<DirWatch>, timeout: Duration, name: &str) -> Wake {
        if *self.stop.borrow() {
            return Wake::Stop;
        }
        let sleep = tokio::time::sleep(timeout);
        tokio::pin!(sleep);
        loop {
            let stop = &mut self.stop;
            let events = match watch {
                Some(w) => tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Wake::Stop,
                    () = &mut sleep => return Wake::Timeout,
                    events = w.next() => events,
                },
                None => tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Wake::Stop,
                    () = &mut sleep => return Wake::Timeout,
                },
            };
            match events {
                Ok(events) => {
                    let restart = events.iter().any(|e| {
                        e.is_overflow()
                            || kubelet_recreated(e)
                            || (e.name.as_deref().is_some_and(|n| n == name)
                                && e.mask.intersects(Mask::IN_DELETE | Mask::IN_MOVED_FROM))
                    });
                    if restart {
                        return Wake::Changed;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "watching the kubelet directory failed; checking periodically");
                    *watch = None;
                }
            }
        }
    }
}

fn kubelet_recreated(e: &dir_watch::Event) -> bool {
    e.name.as_deref().is_some_and(|n| n == KUBELET_SOCKET)
        && e.mask.intersects(Mask::IN_CREATE | Mask::IN_MOVED_TO)
}

/// Whether the kubelet itself refused. A status tonic made from a transport
/// failure carries that failure as its source: the kubelet said nothing.
/// The kubelet's own refusals (unsupported version, invalid resource name)
/// are plain Go errors, code `Unknown` (kubelet `plugin/v1beta1/server.go`
/// `Register`), and so is its failure to dial back, which is transient: for
/// `Unknown` the message is the only thing that tells them apart.
fn is_rejection(status: &tonic::Status) -> bool {
    use tonic::Code;
    if std::error::Error::source(status).is_some() {
        return false;
    }
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

/// Which file a socket path names now: a kubelet that restarts creates a
/// new `kubelet.sock`, with a new identity at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketIdentity {
    dev: u64,
    ino: u64,
}

fn inode(path: &Path) -> Option<SocketIdentity> {
    std::fs::metadata(path).ok().map(|m| SocketIdentity {
        dev: m.dev(),
        ino: m.ino(),
    })
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
    uds::remove_refusing(dir, |name| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('.'))
            && name.ends_with(".sock")
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::is_rejection;
    use tonic::{Code, Status};

    #[test]
    fn only_what_the_kubelet_said_is_a_refusal() {
        // The kubelet's own refusals: a plain Go error (Unknown) naming the
        // problem, or a status code that refuses.
        let version = Status::new(
            Code::Unknown,
            "requested API version \"v1alpha\" is not supported by kubelet. Supported version is [\"v1beta1\"]",
        );
        assert!(is_rejection(&version));
        assert!(is_rejection(&Status::invalid_argument("bad")));
        // Its transient dial-back failure, and anything tonic made from a
        // transport failure (it carries the failure as its source), are not.
        assert!(!is_rejection(&Status::new(
            Code::Unknown,
            "failed to dial device plugin: context deadline exceeded"
        )));
        let mut transport = Status::invalid_argument("h2 protocol error");
        transport.set_source(std::sync::Arc::new(std::io::Error::other("reset")));
        assert!(!is_rejection(&transport));
        assert!(!is_rejection(&Status::unavailable("connection refused")));
    }
}
