//! A reusable framework for Kubernetes device plugins (kubelet device plugin
//! API `v1beta1`).
//!
//! A plugin author implements [`Plugin`] (what a container gets for its
//! devices) and publishes complete [`DeviceList`]s through a
//! [`ResourceHandle`]; the framework does the rest of the lifecycle, the
//! part other frameworks get wrong:
//!
//! - it serves a fresh, uniquely named socket before calling `Register`, and
//!   answers `GetDevicePluginOptions` while `Register` is pending;
//! - it waits for an absent kubelet, notices kubelet restarts (its socket
//!   deleted, `kubelet.sock` recreated) by watching the directory with a
//!   periodic check as fallback, and re-registers with capped exponential
//!   backoff and jitter, never exiting on a transient failure; a refusal by
//!   the kubelet is told apart ([`RegistrationStatus::Rejected`]);
//! - every ListAndWatch stream gets every update (latest wins, the
//!   publisher never blocks), its task ends when the kubelet drops it, and
//!   no stream ends while the resource lives;
//! - it removes stale sockets of its own prefix that refuse connections,
//!   and leaves other plugins' sockets alone;
//! - Allocate requests naming unknown or unhealthy IDs are refused with
//!   `InvalidArgument` naming them; preferred answers are checked.
//!
//! ```no_run
//! use std::sync::Arc;
//! use devplugin_api::*;
//!
//! struct Null;
//! impl Plugin for Null {
//!     fn allocate(&self, _: &AllocateRequest) -> Result<ContainerAllocation, PluginError> {
//!         Ok(ContainerAllocation::default())
//!     }
//! }
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let framework = Framework::new(FrameworkConfig::new("/var/lib/kubelet/device-plugins"));
//! let resource = ResourceName::new("example.com/null")?;
//! let handle = framework.serve(resource, Arc::new(Null), DeviceList::empty())?;
//! handle.publish(DeviceList::new(vec![Device::healthy(DeviceId::new("null-0")?)])?);
//! handle.stop().await;
//! # Ok(()) }
//! ```
//!
//! The [`cdi`] module writes Container Device Interface specs. The kubelet
//! emulator for tests is the separate `kubelet-emulator` crate. This crate
//! knows nothing about GPUs.

pub use kubelet_plumbing::authority;
pub mod cdi;
mod lifecycle;
mod metrics;
pub mod pb;
mod plugin;
mod service;
mod types;
pub use kubelet_plumbing::uds;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tokio::sync::watch;

pub use cdi::CdiName;
pub use lifecycle::{KUBELET_SOCKET, MAX_SOCKET_PATH};
pub use metrics::{Metrics, ResourceMetrics};
pub use plugin::{AllocateRequest, Plugin, PluginError, PluginOptions, PreferredRequest};
pub use types::{
    API_VERSION, ContainerAllocation, Device, DeviceId, DeviceList, DeviceSpec, DuplicateId,
    Health, InvalidName, MAX_DEVICE_ID_LEN, MAX_MESSAGE_BYTES, Mount, Permissions, ResourceName,
    WireListError,
};

use service::Published;

/// Retry delays (the workspace's one implementation, shared with the
/// labeller).
pub use ops_kit::Backoff;

/// Where and how the framework runs.
#[derive(Debug, Clone)]
pub struct FrameworkConfig {
    kubelet_dir: PathBuf,
    backoff: Backoff,
    check_interval: Duration,
    register_timeout: Duration,
    stream_timeout: Duration,
}

impl FrameworkConfig {
    /// The kubelet's device plugin directory (where `kubelet.sock` is).
    #[must_use]
    pub fn new(kubelet_dir: impl Into<PathBuf>) -> Self {
        Self {
            kubelet_dir: kubelet_dir.into(),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            check_interval: Duration::from_secs(5),
            register_timeout: Duration::from_secs(15),
            stream_timeout: Duration::from_secs(10),
        }
    }

    /// How long `Register` may take before it is tried again (default 15 s;
    /// the kubelet itself dials back within 10 s).
    #[must_use]
    pub fn register_timeout(mut self, timeout: Duration) -> Self {
        self.register_timeout = timeout;
        self
    }

    /// How long a registered resource waits for the kubelet to open its
    /// ListAndWatch stream before registering again (default 10 s, the
    /// kubelet's dial timeout).
    #[must_use]
    pub fn stream_timeout(mut self, timeout: Duration) -> Self {
        self.stream_timeout = timeout;
        self
    }

    /// Retry delays after a failed registration.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often the directory is checked besides its events (the fallback
    /// when events are lost or unavailable).
    #[must_use]
    pub fn check_interval(mut self, every: Duration) -> Self {
        self.check_interval = every;
        self
    }

    /// The kubelet directory.
    #[must_use]
    pub fn kubelet_dir(&self) -> &std::path::Path {
        &self.kubelet_dir
    }
}

/// Where a resource stands with the kubelet (its readiness).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationStatus {
    /// Not registered yet.
    Starting,
    /// `kubelet.sock` does not exist.
    WaitingForKubelet,
    /// Registered; the kubelet dialled back and reads ListAndWatch.
    Registered {
        /// The socket file name registered.
        endpoint: String,
    },
    /// `Register` succeeded but the kubelet holds no ListAndWatch stream
    /// yet: not ready.
    AwaitingStream {
        /// The socket file name registered.
        endpoint: String,
    },
    /// The last attempt failed; another follows.
    Retrying {
        /// Failed attempts in a row.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// The kubelet refused (bad name, unsupported version) or the
    /// configuration cannot work: retried only when the kubelet restarts.
    Rejected {
        /// Why.
        reason: String,
    },
    /// The resource was stopped.
    Stopped,
}

impl RegistrationStatus {
    /// Whether the resource is registered and the kubelet reads its list
    /// (its readiness).
    #[must_use]
    pub fn is_registered(&self) -> bool {
        matches!(self, Self::Registered { .. })
    }
}

/// Why a resource could not be served or a list not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// This framework already serves the resource.
    #[error("resource {0} is already served by this process")]
    AlreadyServed(ResourceName),
}

/// Serves resources to the kubelet; one socket and server per resource.
#[derive(Debug, Clone)]
pub struct Framework {
    config: Arc<FrameworkConfig>,
    metrics: Arc<Metrics>,
    served: Arc<Mutex<BTreeSet<ResourceName>>>,
    instance: String,
    generation: Arc<AtomicU64>,
}

impl Framework {
    /// A framework for the kubelet directory of `config`.
    #[must_use]
    pub fn new(config: FrameworkConfig) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Unique per process instance: pid and start time.
        let instance = format!("{}-{:x}", std::process::id(), (nanos & 0xff_ffff) as u32);
        Self {
            config: Arc::new(config),
            metrics: Arc::new(Metrics::default()),
            served: Arc::new(Mutex::new(BTreeSet::new())),
            instance,
            generation: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The metrics of every resource served.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Removes the sockets of `resources` that refuse connections: left by
    /// an instance that was killed (`kill -9`, OOM) while serving them.
    /// [`Framework::serve`] does this for the resource it serves; a plugin
    /// whose resources come and go calls this at start for every resource
    /// it may serve, so a resource the killed instance served and this one
    /// does not (yet) leaves no orphan behind. Live sockets (another
    /// instance during a rolling update) and other plugins' are kept.
    pub async fn remove_stale_sockets<'a>(
        &self,
        resources: impl IntoIterator<Item = &'a ResourceName>,
    ) {
        for r in resources {
            lifecycle::clean_stale_sockets(&self.config.kubelet_dir, &r.socket_prefix()).await;
        }
    }

    /// Starts serving `resource` with `initial` devices: the socket, the
    /// registration and its upkeep run in a task until the handle is
    /// stopped or dropped. Must be called inside a tokio runtime.
    ///
    /// A device list larger than the kubelet's message limit is clamped:
    /// see [`ResourceHandle::publish`].
    ///
    /// # Errors
    /// When the resource is already served: by a live handle, or by one
    /// dropped whose task has not removed its socket yet
    /// ([`ResourceHandle::stop`] waits for that).
    pub fn serve<P: Plugin>(
        &self,
        resource: ResourceName,
        plugin: Arc<P>,
        initial: DeviceList,
    ) -> Result<ResourceHandle, ServeError> {
        {
            let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
            if !served.insert(resource.clone()) {
                return Err(ServeError::AlreadyServed(resource));
            }
        }
        let metrics = self.metrics.resource(&resource);
        let published = publishable(&resource, initial, &metrics);
        note_update(&metrics);
        let (devices_tx, devices_rx) = watch::channel(Arc::new(published));
        let (status_tx, status_rx) = watch::channel(RegistrationStatus::Starting);
        let (stop_tx, stop_rx) = watch::channel(false);
        let runtime = lifecycle::Runtime {
            resource: resource.clone(),
            plugin,
            config: Arc::clone(&self.config),
            devices: devices_rx,
            status: status_tx,
            metrics: Arc::clone(&metrics),
            stop: stop_rx,
            instance: self.instance.clone(),
            generation: Arc::clone(&self.generation),
            release: Some(lifecycle::Release {
                served: Arc::clone(&self.served),
                resource: resource.clone(),
            }),
            kubelet_new_since: None,
        };
        let task = tokio::spawn(runtime.run());
        Ok(ResourceHandle {
            resource,
            devices: devices_tx,
            status: status_rx,
            stop: stop_tx,
            task: Some(task),
            metrics,
        })
    }
}

/// The list as sent: clamped to the kubelet's message limit, keeping the
/// devices in the order given, with a warning when the clamp changes.
fn publishable(resource: &ResourceName, list: DeviceList, metrics: &ResourceMetrics) -> Published {
    let mut message = list.to_pb();
    let bytes = message.encoded_len();
    let mut dropped = 0;
    let mut list = list;
    if bytes > MAX_MESSAGE_BYTES {
        // Each device is one length-delimited field 1 of the response.
        let mut total = 0;
        let fits = message
            .devices
            .iter()
            .take_while(|d| {
                let len = d.encoded_len();
                total += prost::length_delimiter_len(len) + 1 + len;
                total <= MAX_MESSAGE_BYTES
            })
            .count();
        dropped = message.devices.len() - fits;
        message.devices.truncate(fits);
        let kept = list.devices()[..fits].to_vec();
        // A prefix of a list with unique IDs has unique IDs.
        list = DeviceList::new(kept).unwrap_or_default();
    }
    let before = metrics
        .clamped_devices
        .swap(dropped as u64, Ordering::Relaxed);
    if before != dropped as u64 {
        if dropped > 0 {
            tracing::warn!(%resource, bytes, limit = MAX_MESSAGE_BYTES, left_out = dropped, "the device list exceeds the kubelet's message limit; the last devices are left out");
        } else {
            tracing::info!(%resource, "the device list fits the kubelet's message limit again");
        }
    }
    Published { list, message }
}

fn note_update(metrics: &ResourceMetrics) {
    ResourceMetrics::inc(&metrics.updates);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    metrics
        .last_update_unix_ms
        .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// One served resource: publish its devices, watch its status, stop it.
/// Dropping the handle stops the resource too (its socket is removed by
/// the task).
#[derive(Debug)]
pub struct ResourceHandle {
    resource: ResourceName,
    devices: watch::Sender<Arc<Published>>,
    status: watch::Receiver<RegistrationStatus>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<ResourceMetrics>,
}

impl ResourceHandle {
    /// The resource.
    #[must_use]
    pub fn resource(&self) -> &ResourceName {
        &self.resource
    }

    /// Publishes the complete device list. Never blocks: every open
    /// ListAndWatch stream sends the latest list as soon as it can. An
    /// empty list keeps the resource registered with capacity 0.
    ///
    /// A list whose message would exceed the kubelet's 4 MiB limit (the
    /// kubelet would drop the stream) is clamped: the devices that fit, in
    /// the order given, are sent; the rest are counted in
    /// [`ResourceMetrics::clamped_devices`] and logged once.
    pub fn publish(&self, list: DeviceList) {
        let published = publishable(&self.resource, list, &self.metrics);
        let changed = self.devices.send_if_modified(|current| {
            if current.list == published.list {
                false
            } else {
                *current = Arc::new(published);
                true
            }
        });
        if changed {
            note_update(&self.metrics);
            tracing::info!(resource = %self.resource, devices = self.devices.borrow().list.devices().len(), "device list published");
        }
    }

    /// The current status.
    #[must_use]
    pub fn status(&self) -> RegistrationStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    #[must_use]
    pub fn watch_status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// This resource's figures.
    #[must_use]
    pub fn metrics(&self) -> &Arc<ResourceMetrics> {
        &self.metrics
    }

    /// Stops serving: closes the streams, removes the socket, and returns
    /// when done.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ResourceHandle {
    /// Tells the task to stop; it removes the socket and then frees the
    /// resource name.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let base = (100u64 << attempt.min(20)).min(2000);
            assert!(
                d >= Duration::from_millis(base * 8 / 10),
                "{attempt}: {d:?}"
            );
            assert!(
                d <= Duration::from_millis(base * 12 / 10 + 1),
                "{attempt}: {d:?}"
            );
        }
    }
}
