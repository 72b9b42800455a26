//! The DRA service the kubelet calls on the driver's endpoint:
//! `NodePrepareResources` and `NodeUnprepareResources`, served as both
//! `v1` (kubelets 1.34+) and `v1beta1` (1.32–1.33) on one socket.
//!
//! For each claim asked about, the answer has an entry keyed by its UID
//! (the kubelet calls again for a claim missing from it). Preparing looks
//! the claim up by namespace and name, insists on the UID the kubelet gave
//! (a claim deleted and re-created under the same name is not the one
//! allocated), takes the allocation results of this driver only, asks the
//! driver, and records the result in the checkpoint before answering.
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

use tokio::net::UnixListener;
use tokio::sync::{Mutex, watch};
use tonic::{Request, Response, Status};

use crate::checkpoint::{Checkpoint, CheckpointError, Loaded, PreparedClaim, PreparedDevice};
use crate::names::DriverName;
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

/// A driver's own failure, shown to the kubelet (and in the pod's events).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// What a DRA driver does; the framework does the rest.
pub trait Driver: Send + Sync + 'static {
    /// Prepares the devices allocated to `claim` (this driver's only) and
    /// says, per device, what the container runtime is to add. Called once
    /// per claim: a claim prepared before is answered from the checkpoint.
    ///
    /// # Errors
    /// The claim's failure, for the kubelet.
    fn prepare(
        &self,
        claim: &ClaimRef,
        devices: &[Allocated],
    ) -> Result<Vec<PreparedDevice>, DriverError>;

    /// Undoes `prepare`. `prepared` is what was recorded, or `None` when
    /// there is no record (a lost checkpoint): clean up by the claim's UID
    /// then, or do nothing.
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
}

impl DraConfig {
    /// `driver`'s DRA service on the socket `endpoint` (the path its
    /// registration gives the kubelet), remembering prepared claims in the
    /// file `checkpoint` (normally in the plugin's data directory,
    /// `/var/lib/kubelet/plugins/<driver>/`).
    #[must_use]
    pub fn new(
        driver: DriverName,
        endpoint: impl Into<PathBuf>,
        checkpoint: impl Into<PathBuf>,
    ) -> Self {
        Self {
            driver,
            endpoint: endpoint.into(),
            checkpoint: checkpoint.into(),
        }
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
    checkpoint: Mutex<Checkpoint>,
}

/// One claim's answer.
type Answer = Result<Vec<PreparedDevice>, String>;

impl<D: Driver, S: ClaimSource> Core<D, S> {
    async fn prepare(&self, claims: Vec<ClaimRef>) -> Vec<(String, Answer)> {
        // Lookups first, outside the lock (they wait on the API server).
        let mut looked = Vec::with_capacity(claims.len());
        for claim in claims {
            let known = self.checkpoint.lock().await.get(&claim.uid).cloned();
            let found = match known {
                Some(p) => Ok(Err(p)),
                None => self.claims.allocation(&claim).await.map(Ok),
            };
            looked.push((claim, found));
        }
        let mut out = Vec::with_capacity(looked.len());
        let mut checkpoint = self.checkpoint.lock().await;
        for (claim, found) in looked {
            let answer = match found {
                Err(e) => Err(e.to_string()),
                // Prepared before: the same answer again.
                Ok(Err(prepared)) => Ok(prepared.devices),
                Ok(Ok(results)) => self.prepare_one(&mut checkpoint, &claim, &results).await,
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
        // Another instance may have prepared it meanwhile.
        if let Some(p) = checkpoint.get(&claim.uid) {
            return Ok(p.devices.clone());
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
        let devices = tokio::task::spawn_blocking(move || driver.prepare(&c, &o))
            .await
            .map_err(|e| format!("the driver's prepare did not finish: {e}"))?
            .map_err(|e| e.0)?;
        let record = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices: devices.clone(),
        };
        // Recorded before it is answered: an answer the kubelet acts on is
        // never one the next instance has forgotten.
        checkpoint
            .insert(&claim.uid, record)
            .map_err(|e| format!("{}", ops_kit::Chain(&e)))?;
        Ok(devices)
    }

    async fn unprepare(&self, claims: Vec<ClaimRef>) -> Vec<(String, Result<(), String>)> {
        let mut checkpoint = self.checkpoint.lock().await;
        let mut out = Vec::with_capacity(claims.len());
        for claim in claims {
            let prepared = checkpoint.get(&claim.uid).cloned();
            let driver = Arc::clone(&self.driver);
            let c = claim.clone();
            let p = prepared.clone();
            let done = tokio::task::spawn_blocking(move || driver.unprepare(&c, p.as_ref()))
                .await
                .map_err(|e| format!("the driver's unprepare did not finish: {e}"))
                .and_then(|r| r.map_err(|e| e.0))
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
    loaded: Loaded,
    initial: BTreeMap<String, PreparedClaim>,
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
        let (checkpoint, loaded) = Checkpoint::load(&config.checkpoint)?;
        match &loaded {
            Loaded::Corrupt { reason, aside } => tracing::error!(
                checkpoint = %config.checkpoint.display(),
                aside = %aside.display(),
                %reason,
                "the checkpoint is not readable; moved aside, starting with no prepared claims"
            ),
            Loaded::Read => tracing::info!(
                claims = checkpoint.claims().len(),
                "prepared claims read from the checkpoint"
            ),
            Loaded::Fresh => {}
        }
        let listen = |source| DraError::Listen {
            path: config.endpoint.clone(),
            source,
        };
        if let Some(dir) = config.endpoint.parent() {
            std::fs::create_dir_all(dir).map_err(listen)?;
        }
        remove_file(&config.endpoint);
        let listener = UnixListener::bind(&config.endpoint).map_err(listen)?;
        let initial = checkpoint.claims().clone();
        let core = Arc::new(Core {
            driver_name: config.driver.clone(),
            driver,
            claims,
            checkpoint: Mutex::new(checkpoint),
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
                .serve_with_incoming_shutdown(devplugin_api::uds::incoming(listener), async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
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
            loaded,
            initial,
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

    /// What loading the checkpoint found.
    #[must_use]
    pub fn checkpoint_loaded(&self) -> &Loaded {
        &self.loaded
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
