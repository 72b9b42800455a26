//! Test kit: an in-process Kubernetes API server on loopback HTTP that
//! kube-rs talks to unchanged. Never a dependency of a shipped binary.
//!
//! What it emulates (see `docs/apiserver-emulator.md`): GET, LIST and
//! WATCH (`?watch=true`, chunked JSON events) of Nodes; server-side apply
//! (`application/apply-patch+yaml`, `fieldManager`, `force`) of
//! `metadata.labels` and `metadata.annotations` with managed fields,
//! conflicts without force (409 with causes), removal of fields a manager
//! stops applying, `metadata.resourceVersion` and `metadata.uid`
//! preconditions, and — as the real API server — **creation of a missing
//! object** by an apply, whatever resourceVersion it carries (kubernetes
//! issue 106745), unless it carries a uid (the precondition fails: 409) or
//! the client may not `create` (403); JSON merge patch of labels and
//! annotations; GET of
//! ConfigMaps; creation of Events; 404 and 409 as Kubernetes `Status`
//! objects; and injectable faults (500, 503, 429 with Retry-After, slow
//! responses, dropped connections). It does not emulate authentication,
//! admission, other fields, other resources or protobuf.

mod allocate;
mod http;
mod quantity;
pub mod rbac;
mod slices;
mod store;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

pub use allocate::{Allocation, DeviceRequest};
pub use store::{ApplyConflict, Manager, Object};

/// A fault to inject into a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 500 Internal Server Error.
    Internal,
    /// 503 Service Unavailable.
    Unavailable,
    /// 429 Too Many Requests with `Retry-After: 1`.
    TooManyRequests,
    /// The response is delayed.
    Slow(Duration),
    /// The connection is closed without a response.
    Drop,
}

/// The DRA side of the emulated API server: its release (where the API
/// changed between releases) and its alpha feature gates, whose fields are
/// dropped on write when off (`resourceslice/strategy.go`). The defaults
/// are each release's (`pkg/features/versioned_kube_features.go`): the
/// three gates are alpha, off, in 1.34 and 1.35 and beta, on, from 1.36.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraApi {
    /// The minor release (34, 35, 36).
    pub minor: u32,
    /// `DRAConsumableCapacity`.
    pub consumable_capacity: bool,
    /// `DRAPartitionableDevices`.
    pub partitionable_devices: bool,
    /// `DRADeviceTaints`.
    pub device_taints: bool,
}

impl Default for DraApi {
    fn default() -> Self {
        Self::V1_34
    }
}

impl DraApi {
    /// Kubernetes 1.34 with its default gates.
    pub const V1_34: Self = Self {
        minor: 34,
        consumable_capacity: false,
        partitionable_devices: false,
        device_taints: false,
    };
    /// Kubernetes 1.35 with its default gates.
    pub const V1_35: Self = Self {
        minor: 35,
        ..Self::V1_34
    };
    /// Kubernetes 1.36 with its default gates.
    pub const V1_36: Self = Self {
        minor: 36,
        consumable_capacity: true,
        partitionable_devices: true,
        device_taints: true,
    };

    /// This release with all three gates enabled.
    #[must_use]
    pub const fn with_all_gates(self) -> Self {
        Self {
            consumable_capacity: true,
            partitionable_devices: true,
            device_taints: true,
            ..self
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The method.
    pub method: String,
    /// The path and query.
    pub target: String,
    /// The `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The status code answered (0 while unanswered or when the connection
    /// was dropped; 200 for a watch).
    pub status: u16,
}

/// One write through the API that changed a Node (a server-side apply or a
/// merge patch), as an audit log at level `RequestResponse` would let one
/// reconstruct it: who, when, and the labels before and after. Changes the
/// test makes directly ([`ApiServer::add_node`], [`ApiServer::set_label`])
/// are not requests and are not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWrite {
    /// When the write was answered.
    pub at: std::time::Instant,
    /// The Node.
    pub node: String,
    /// The request's `fieldManager` (`unknown` when it named none).
    pub manager: String,
    /// Whether the write created the Node (an apply to a missing Node).
    pub created: bool,
    /// The labels before the write (empty when it created the Node).
    pub labels_before: BTreeMap<String, String>,
    /// The labels after it.
    pub labels_after: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) nodes: BTreeMap<String, Object>,
    /// ConfigMaps by (namespace, name): data and resourceVersion.
    pub(crate) configmaps: BTreeMap<(String, String), (BTreeMap<String, String>, u64)>,
    pub(crate) events: Vec<Value>,
    pub(crate) requests: Vec<Seen>,
    pub(crate) writes: Vec<NodeWrite>,
    /// ResourceClaims (`resource.k8s.io/v1`) by (namespace, name), as
    /// whole objects.
    pub(crate) resource_claims: BTreeMap<(String, String), Value>,
    /// ResourceSlices by name, as whole objects.
    pub(crate) resource_slices: BTreeMap<String, Value>,
    /// DeviceClasses by name, as whole objects.
    pub(crate) device_classes: BTreeMap<String, Value>,
    /// The DRA release and gates.
    pub(crate) dra: DraApi,
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) fault_rate: f64,
    pub(crate) rng: u64,
    pub(crate) next_rv: u64,
    pub(crate) next_uid: u64,
    /// Delete this Node right after answering its next GET (a Node deleted
    /// between a client's read and its write).
    pub(crate) delete_after_get: Option<String>,
    /// Verbs on `nodes` the client's identity is not granted (RBAC).
    pub(crate) forbidden: std::collections::BTreeSet<&'static str>,
    /// Who every client is, as `SelfSubjectReview` answers.
    pub(crate) identity: Option<String>,
    /// Every change, in resourceVersion order, for watches to resume from
    /// (the watch cache); entries at or below `floor` were compacted.
    pub(crate) log: VecDeque<Change>,
    pub(crate) floor: u64,
    /// The objects as last recorded in `log`.
    pub(crate) logged: BTreeMap<(Kind, String, String), (u64, Value)>,
    /// How often a watch that allows bookmarks gets one.
    pub(crate) bookmark_every: Duration,
}

/// A kind of object watches follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Node,
    ConfigMap,
    ResourceSlice,
    ResourceClaim,
    DeviceClass,
}

impl Kind {
    /// `kind` and `apiVersion`, for bookmarks.
    pub(crate) fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Node => ("Node", "v1"),
            Self::ConfigMap => ("ConfigMap", "v1"),
            Self::ResourceSlice => ("ResourceSlice", "resource.k8s.io/v1"),
            Self::ResourceClaim => ("ResourceClaim", "resource.k8s.io/v1"),
            Self::DeviceClass => ("DeviceClass", "resource.k8s.io/v1"),
        }
    }
}

/// An object's resourceVersion as stored in its metadata.
fn rv_of(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One change of one object, as a watch event.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) typ: &'static str,
    pub(crate) object: Value,
}

/// The most changes kept for resuming watches.
const LOG_LIMIT: usize = 10_000;

pub(crate) fn configmap_json(
    ns: &str,
    name: &str,
    data: &BTreeMap<String, String>,
    rv: u64,
) -> Value {
    serde_json::json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string()}, "data": data})
}

impl State {
    /// The user the credentials authenticate as (the labeller's service
    /// account unless [`ApiServer::set_identity`] says otherwise).
    pub(crate) fn user(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| "system:serviceaccount:intel-gpu:intel-gpu-labeler".into())
    }

    pub(crate) fn bump(&mut self) -> u64 {
        self.next_rv += 1;
        self.next_rv
    }

    /// Records what changed since the last record as watch events: an
    /// added or modified object at its own resourceVersion, a deleted one
    /// at a new one (as etcd does).
    pub(crate) fn record(&mut self) {
        let mut now: BTreeMap<(Kind, String, String), (u64, Value)> = BTreeMap::new();
        for (name, o) in &self.nodes {
            now.insert(
                (Kind::Node, String::new(), name.clone()),
                (o.resource_version, o.to_json("Node")),
            );
        }
        for ((ns, name), (data, rv)) in &self.configmaps {
            now.insert(
                (Kind::ConfigMap, ns.clone(), name.clone()),
                (*rv, configmap_json(ns, name, data, *rv)),
            );
        }
        for (name, o) in &self.resource_slices {
            now.insert(
                (Kind::ResourceSlice, String::new(), name.clone()),
                (rv_of(o), o.clone()),
            );
        }
        for ((ns, name), o) in &self.resource_claims {
            now.insert(
                (Kind::ResourceClaim, ns.clone(), name.clone()),
                (rv_of(o), o.clone()),
            );
        }
        for (name, o) in &self.device_classes {
            now.insert(
                (Kind::DeviceClass, String::new(), name.clone()),
                (rv_of(o), o.clone()),
            );
        }
        let mut changes = Vec::new();
        for (key, (rv, obj)) in &now {
            let typ = match self.logged.get(key) {
                None => "ADDED",
                Some((old, _)) if old != rv => "MODIFIED",
                Some(_) => continue,
            };
            changes.push((*rv, key.clone(), typ, obj.clone()));
        }
        let gone: Vec<_> = self
            .logged
            .iter()
            .filter(|(k, _)| !now.contains_key(*k))
            .map(|(k, (_, obj))| (k.clone(), obj.clone()))
            .collect();
        for (key, mut obj) in gone {
            let rv = self.bump();
            obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            changes.push((rv, key, "DELETED", obj));
        }
        changes.sort_by_key(|c| c.0);
        for (rv, (kind, namespace, name), typ, object) in changes {
            self.log.push_back(Change {
                rv,
                kind,
                namespace,
                name,
                typ,
                object,
            });
        }
        while self.log.len() > LOG_LIMIT {
            if let Some(c) = self.log.pop_front() {
                self.floor = self.floor.max(c.rv);
            }
        }
        self.logged = now;
    }

    /// The next fault to inject, if any.
    pub(crate) fn fault(&mut self) -> Option<Fault> {
        if let Some(f) = self.faults.pop_front() {
            return Some(f);
        }
        if self.fault_rate <= 0.0 {
            return None;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let roll = (self.rng % 10_000) as f64 / 10_000.0;
        if roll >= self.fault_rate {
            return None;
        }
        Some(match self.rng % 5 {
            0 => Fault::Internal,
            1 => Fault::Unavailable,
            2 => Fault::TooManyRequests,
            3 => Fault::Slow(Duration::from_millis(50)),
            _ => Fault::Drop,
        })
    }
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Bumped on every change (for watches and waiters).
    pub(crate) changed: watch::Sender<u64>,
    /// Bumped to drop every open watch connection.
    pub(crate) drop_watches: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a change: records it for watches and wakes them.
    pub(crate) fn notify(&self) {
        self.lock().record();
        self.changed.send_modify(|v| *v += 1);
    }
}

/// A running emulator.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not listen on loopback")]
pub struct StartError(#[source] std::io::Error);

impl ApiServer {
    /// Listens on `127.0.0.1:0`. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> Result<Self, StartError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(StartError)?;
        let addr = listener.local_addr().map_err(StartError)?;
        let (changed, _) = watch::channel(0);
        let (drop_watches, _) = watch::channel(0);
        let state = State {
            rng: 0x9e37_79b9_7f4a_7c15,
            next_rv: 100,
            bookmark_every: Duration::from_secs(60),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed,
            drop_watches,
        });
        let task = tokio::spawn(http::serve(listener, Arc::clone(&shared)));
        Ok(Self { shared, addr, task })
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (bearer token `emulator`).
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: kube-system\ncurrent-context: emulator\nusers:\n- name: emulator\n  user:\n    token: emulator\n",
            self.url()
        )
    }

    fn notify(&self) {
        self.shared.notify();
    }

    /// Creates a Node (as a kubelet registering).
    pub fn add_node(&self, name: &str) {
        {
            let mut st = self.shared.lock();
            let rv = st.bump();
            st.next_uid += 1;
            let uid = st.next_uid;
            st.nodes.insert(name.to_owned(), Object::new(name, uid, rv));
        }
        self.notify();
    }

    /// Sets the version the Node's kubelet reports
    /// (`status.nodeInfo.kubeletVersion`, see [`Object::kubelet_version`]).
    pub fn set_kubelet_version(&self, node: &str, version: &str) {
        {
            let mut st = self.shared.lock();
            let rv = st.bump();
            if let Some(o) = st.nodes.get_mut(node) {
                o.kubelet_version = Some(version.to_owned());
                o.resource_version = rv;
            }
        }
        self.notify();
    }

    /// Deletes a Node. What it owns goes with it: the garbage collector
    /// deletes dependents whose owner is gone (`pkg/controller/
    /// garbagecollector`, asynchronous there, at once here), e.g. a DRA
    /// driver's ResourceSlices.
    pub fn delete_node(&self, name: &str) {
        {
            let mut st = self.shared.lock();
            if let Some(node) = st.nodes.remove(name) {
                st.resource_slices.retain(|_, s| {
                    !s["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|o| o["uid"].as_str() == Some(node.uid.as_str()))
                });
            }
        }
        self.notify();
    }

    /// Every ResourceSlice, by name.
    #[must_use]
    pub fn resource_slices(&self) -> BTreeMap<String, Value> {
        self.shared.lock().resource_slices.clone()
    }

    /// Deletes the ResourceSlices of a node, as a kubelet does when it
    /// starts (`dra_plugin_manager.go`: field selector `spec.nodeName`),
    /// or of one driver there (`spec.driver` too, 30 s after the driver
    /// became unusable). Returns how many went.
    pub fn wipe_resource_slices(&self, node: &str, driver: Option<&str>) -> usize {
        let n = {
            let mut st = self.shared.lock();
            let before = st.resource_slices.len();
            st.resource_slices.retain(|_, s| {
                let on_node = s["spec"]["nodeName"].as_str() == Some(node);
                let of_driver = driver.is_none_or(|d| s["spec"]["driver"].as_str() == Some(d));
                !(on_node && of_driver)
            });
            before - st.resource_slices.len()
        };
        self.notify();
        n
    }

    /// The Node, if it exists.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<Object> {
        self.shared.lock().nodes.get(name).cloned()
    }

    /// Sets (or with `None` removes) a label as another manager would with
    /// a merge patch (e.g. `kubectl label`).
    pub fn set_label(&self, node: &str, manager: &str, key: &str, value: Option<&str>) {
        self.merge(node, manager, key, value, true);
    }

    /// Sets (or removes) an annotation as another manager would.
    pub fn set_annotation(&self, node: &str, manager: &str, key: &str, value: Option<&str>) {
        self.merge(node, manager, key, value, false);
    }

    fn merge(&self, node: &str, manager: &str, key: &str, value: Option<&str>, label: bool) {
        {
            let mut st = self.shared.lock();
            let rv = st.bump();
            if let Some(o) = st.nodes.get_mut(node) {
                let mut patch = serde_json::Map::new();
                patch.insert(
                    key.to_owned(),
                    value.map_or(Value::Null, |v| Value::String(v.to_owned())),
                );
                let empty = serde_json::Map::new();
                let (l, a) = if label {
                    (&patch, &empty)
                } else {
                    (&empty, &patch)
                };
                if o.merge(manager, l, a) {
                    o.resource_version = rv;
                }
            }
        }
        self.notify();
    }

    /// Who the clients are (`SelfSubjectReview`'s username), e.g. a
    /// kubelet's `system:node:<name>`; by default a labeller's service
    /// account.
    pub fn set_identity(&self, username: &str) {
        self.shared.lock().identity = Some(username.to_owned());
    }

    /// Deletes Node `name` right after the next GET of it is answered: the
    /// Node a client just read is gone when it writes.
    pub fn delete_node_after_next_read(&self, name: &str) {
        self.shared.lock().delete_after_get = Some(name.to_owned());
    }

    /// Denies the client the `create` verb on Nodes, as RBAC without it
    /// does: an apply that would create a Node answers 403 (the apply
    /// handler authorizes `create` when the object does not exist,
    /// `staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go`).
    pub fn forbid_node_creation(&self) {
        self.shared.lock().forbidden.insert("create");
    }

    /// Creates or replaces a ConfigMap's data.
    pub fn set_configmap(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let data = data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        {
            let mut st = self.shared.lock();
            let rv = st.bump();
            st.configmaps
                .insert((namespace.to_owned(), name.to_owned()), (data, rv));
        }
        self.notify();
    }

    /// A ConfigMap's data and resourceVersion, if it exists.
    #[must_use]
    pub fn configmap(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(BTreeMap<String, String>, u64)> {
        self.shared
            .lock()
            .configmaps
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Waits until ConfigMap `namespace/name` exists; whether it did.
    pub async fn wait_configmap(&self, namespace: &str, name: &str, timeout: Duration) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.configmap(namespace, name).is_some() {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Creates a ResourceClaim (`resource.k8s.io/v1`) with `spec`, not
    /// allocated, and returns its UID. A claim of that name is replaced
    /// (a new UID: deleted and re-created).
    pub fn create_resource_claim(&self, namespace: &str, name: &str, spec: Value) -> String {
        let uid = {
            let mut st = self.shared.lock();
            let rv = st.bump();
            st.next_uid += 1;
            let uid = format!("00000000-0000-4000-8000-{:012x}", st.next_uid);
            let claim = serde_json::json!({
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": uid,
                    "resourceVersion": rv.to_string(),
                },
                "spec": spec,
            });
            st.resource_claims
                .insert((namespace.to_owned(), name.to_owned()), claim);
            uid
        };
        self.notify();
        uid
    }

    /// The allocator's part, standing in for the scheduler: allocates the
    /// claim exactly the devices named, as `(request, driver, pool,
    /// device)` (`status.allocation.devices.results`). Selection by
    /// attributes or CEL is not emulated. Returns whether the claim exists.
    pub fn allocate_resource_claim(
        &self,
        namespace: &str,
        name: &str,
        results: &[(&str, &str, &str, &str)],
    ) -> bool {
        let found = {
            let mut st = self.shared.lock();
            let rv = st.bump();
            match st
                .resource_claims
                .get_mut(&(namespace.to_owned(), name.to_owned()))
            {
                Some(claim) => {
                    let results: Vec<Value> = results
                        .iter()
                        .map(|(request, driver, pool, device)| {
                            serde_json::json!({"request": request, "driver": driver, "pool": pool, "device": device})
                        })
                        .collect();
                    claim["status"] =
                        serde_json::json!({"allocation": {"devices": {"results": results}}});
                    claim["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                    true
                }
                None => false,
            }
        };
        self.notify();
        found
    }

    /// The allocator's part with attribute equality, standing in for the
    /// scheduler: allocates claim `namespace/name`'s `request` `count`
    /// devices of `driver`, each with every attribute in `attributes`
    /// equal (`{"string": …}`, `{"int": …}`, `{"bool": …}` or
    /// `{"version": …}`). Returns the devices chosen. See
    /// [`ApiServer::allocate`] for the rules.
    ///
    /// # Errors
    /// When the claim does not exist or not enough devices fit.
    pub fn allocate_resource_claim_matching(
        &self,
        namespace: &str,
        name: &str,
        request: &str,
        driver: &str,
        attributes: &[(&str, Value)],
        count: usize,
    ) -> Result<Vec<String>, String> {
        let mut req = DeviceRequest::new(request, driver).count(count);
        for (k, v) in attributes {
            req = req.attribute(k, v.clone());
        }
        Ok(self
            .allocate(namespace, name, &[req])?
            .into_iter()
            .map(|a| a.device)
            .collect())
    }

    /// The allocator's part, standing in for the scheduler's structured
    /// allocator: allocates claim `namespace/name`'s `requests` from the
    /// published ResourceSlices, never handing out a device, a share of a
    /// device's capacity or a counter twice (rules and sources in
    /// `src/allocate.rs`), and records the result in the claim's status.
    ///
    /// # Errors
    /// When the claim does not exist or a request cannot be satisfied.
    pub fn allocate(
        &self,
        namespace: &str,
        name: &str,
        requests: &[DeviceRequest],
    ) -> Result<Vec<Allocation>, String> {
        let out = allocate::allocate(&mut self.shared.lock(), namespace, name, requests);
        self.notify();
        out
    }

    /// Sets the DRA release and gates (default [`DraApi::V1_34`]).
    pub fn set_dra(&self, api: DraApi) {
        self.shared.lock().dra = api;
    }

    /// Creates or replaces a DeviceClass (`resource.k8s.io/v1`) with
    /// `spec`; GET serves it. Its selectors are not evaluated here.
    pub fn set_device_class(&self, name: &str, spec: Value) {
        {
            let mut st = self.shared.lock();
            let rv = st.bump();
            let class = serde_json::json!({
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": name, "resourceVersion": rv.to_string()},
                "spec": spec,
            });
            st.device_classes.insert(name.to_owned(), class);
        }
        self.notify();
    }

    /// Deletes a ResourceClaim.
    pub fn delete_resource_claim(&self, namespace: &str, name: &str) {
        self.shared
            .lock()
            .resource_claims
            .remove(&(namespace.to_owned(), name.to_owned()));
        self.notify();
    }

    /// Deletes a ConfigMap.
    pub fn delete_configmap(&self, namespace: &str, name: &str) {
        self.shared
            .lock()
            .configmaps
            .remove(&(namespace.to_owned(), name.to_owned()));
        self.notify();
    }

    /// Drops every open watch connection (a network blip, an API server
    /// restart): clients resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|v| *v += 1);
    }

    /// Compacts the watch history: a watch resuming from an older
    /// resourceVersion gets `410 Expired` and must list again.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.floor = st.next_rv;
        st.log.clear();
    }

    /// How often watches that allow bookmarks get one (default 60 s, the
    /// watch cache's `defaultBookmarkFrequency` in `cacher/cacher.go`).
    pub fn bookmark_every(&self, every: Duration) {
        self.shared.lock().bookmark_every = every;
    }

    /// Queues faults for the next requests, in order.
    pub fn inject(&self, faults: &[Fault]) {
        self.shared.lock().faults.extend(faults.iter().copied());
    }

    /// Fails this fraction of requests (0 to 1) with random faults.
    pub fn fault_rate(&self, rate: f64) {
        self.shared.lock().fault_rate = rate.clamp(0.0, 1.0);
    }

    /// Every write through the API that changed a Node, in order (the
    /// audit trail a soak checks for foreign changes and re-creations).
    #[must_use]
    pub fn node_writes(&self) -> Vec<NodeWrite> {
        self.shared.lock().writes.clone()
    }

    /// Every request received, in order.
    #[must_use]
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().requests.clone()
    }

    /// Events created so far.
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// Waits until `f` holds for the Node (or its absence).
    ///
    /// # Errors
    /// The last state seen, when the time runs out.
    pub async fn wait_node(
        &self,
        name: &str,
        timeout: Duration,
        f: impl Fn(Option<&Object>) -> bool,
    ) -> Result<Option<Object>, Option<Object>> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.node(name);
            if f(now.as_ref()) {
                return Ok(now);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(self.node(name));
            }
        }
    }

    /// Waits until the ResourceSlices (by name) satisfy `f`, woken by
    /// every change; returns them, or them as they are at the timeout.
    ///
    /// # Errors
    /// The slices at the timeout.
    pub async fn wait_resource_slices(
        &self,
        timeout: Duration,
        f: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) -> Result<BTreeMap<String, Value>, BTreeMap<String, Value>> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let now = self.resource_slices();
            if f(&now) {
                return Ok(now);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(self.resource_slices());
            }
        }
    }
}
