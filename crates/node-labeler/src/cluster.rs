//! The Kubernetes side: read the Node and what the labeller owns on it,
//! apply the owned labels with server-side apply, read the enabled-plugins
//! ConfigMap, report conflicts as Events.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::reconcile::{FIELD_MANAGER, NodeView};

/// Why a call to the API server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The call failed.
    #[error("could not {action} {what}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// On which object.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// Every apply met a Node that changed under it.
    #[error("node {node} changed during every one of 3 attempts to apply labels")]
    KeepsChanging {
        /// The Node.
        node: String,
    },
}

impl ClusterError {
    /// The HTTP status code, when the API server answered.
    #[must_use]
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            Self::Api { .. } | Self::KeepsChanging { .. } => None,
        }
    }
}

/// A Node read from the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Labels, annotations and what we own.
    pub view: NodeView,
    /// `metadata.resourceVersion` as read.
    pub resource_version: String,
    /// `metadata.uid`: the precondition of our apply, so that it can only
    /// ever change this very Node, never create one.
    pub uid: String,
}

/// The labeller's handle on one Node.
#[derive(Clone)]
pub struct Cluster {
    nodes: Api<Node>,
    client: kube::Client,
    node: String,
    manager: String,
    cache: std::sync::Arc<Cache>,
}

/// What the watches have seen.
#[derive(Debug, Clone, Default)]
enum Seen<T> {
    /// Not listed yet (or not followed): ask the API server.
    #[default]
    Unknown,
    Missing,
    Present(T),
}

/// What one watcher event says about the single object a watch follows:
/// `None` while a (re)list is under way (the object is known once the list
/// is done: present if it was listed, missing if not).
fn fold<K>(listing: &mut Option<K>, event: kube::runtime::watcher::Event<K>) -> Option<Seen<K>> {
    use kube::runtime::watcher;
    match event {
        watcher::Event::Init => {
            *listing = None;
            None
        }
        watcher::Event::InitApply(k) => {
            *listing = Some(k);
            None
        }
        watcher::Event::InitDone => Some(listing.take().map_or(Seen::Missing, Seen::Present)),
        watcher::Event::Apply(k) => Some(Seen::Present(k)),
        watcher::Event::Delete(_) => Some(Seen::Missing),
    }
}

/// ConfigMap data by (namespace, name), as watched.
type WatchedConfigMaps = BTreeMap<(String, String), Seen<BTreeMap<String, String>>>;

#[derive(Debug, Default)]
struct Cache {
    node: std::sync::RwLock<Seen<Node>>,
    configmaps: std::sync::RwLock<WatchedConfigMaps>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The keys under `f:metadata.<part>` of a managedFields entry.
fn owned_keys(fields: Option<&Value>, part: &str) -> BTreeSet<String> {
    fields
        .and_then(|f| f.get("f:metadata"))
        .and_then(|m| m.get(format!("f:{part}")))
        .and_then(Value::as_object)
        .map(|o| {
            o.keys()
                .filter_map(|k| k.strip_prefix("f:").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Cluster {
    /// Works on Node `node` through `client`.
    #[must_use]
    pub fn new(client: kube::Client, node: &str) -> Self {
        Self {
            nodes: Api::all(client.clone()),
            client,
            node: node.to_owned(),
            manager: FIELD_MANAGER.to_owned(),
            cache: std::sync::Arc::new(Cache::default()),
        }
    }

    /// Owns fields under `manager` instead of [`FIELD_MANAGER`]: a host-mode
    /// labeller next to a DaemonSet one uses its own, so the two never
    /// share (and fight over) one manager's fields; where they disagree,
    /// each sees the other's value as someone else's and leaves it.
    #[must_use]
    pub fn with_field_manager(mut self, manager: &str) -> Self {
        manager.clone_into(&mut self.manager);
        self
    }

    /// The field manager.
    #[must_use]
    pub fn field_manager(&self) -> &str {
        &self.manager
    }

    /// The Node's name.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The Node as it is now: from the watch cache when [`Cluster::follow`]
    /// runs and has listed it (no request), else read from the API server.
    /// `None` when it does not exist.
    ///
    /// # Errors
    /// When the API server cannot be asked.
    pub async fn read(&self) -> Result<Option<NodeState>, ClusterError> {
        let cached = self
            .cache
            .node
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match cached {
            Seen::Present(node) => Ok(Some(self.state_of(node))),
            Seen::Missing => Ok(None),
            Seen::Unknown => self.read_fresh().await,
        }
    }

    /// Reads the Node from the API server, whatever the cache says (after
    /// a write the server refused, the cache may be behind).
    ///
    /// # Errors
    /// When the API server cannot be asked.
    pub async fn read_fresh(&self) -> Result<Option<NodeState>, ClusterError> {
        let node = self
            .nodes
            .get_opt(&self.node)
            .await
            .map_err(|source| ClusterError::Api {
                action: "read",
                what: format!("node {}", self.node),
                source,
            })?;
        Ok(node.map(|n| self.state_of(n)))
    }

    fn state_of(&self, n: Node) -> NodeState {
        let meta = n.metadata;
        let mut view = NodeView {
            labels: meta.labels.unwrap_or_default(),
            annotations: meta.annotations.unwrap_or_default(),
            ..NodeView::default()
        };
        for entry in meta.managed_fields.unwrap_or_default() {
            if entry.manager.as_deref() == Some(self.manager.as_str())
                && entry.operation.as_deref() == Some("Apply")
            {
                let fields = entry.fields_v1.map(|f| f.0);
                view.owned_labels
                    .extend(owned_keys(fields.as_ref(), "labels"));
                view.owned_annotations
                    .extend(owned_keys(fields.as_ref(), "annotations"));
            }
        }
        NodeState {
            view,
            resource_version: meta.resource_version.unwrap_or_default(),
            uid: meta.uid.unwrap_or_default(),
        }
    }

    /// Follows the Node (a watch with a field selector on its name) and,
    /// when given, one ConfigMap, with kube-runtime's watcher: it lists,
    /// then watches from that resourceVersion with bookmarks, resumes
    /// after a dropped connection and lists again on `410 Gone`, backing
    /// off on errors. What it sees fills the cache [`Cluster::read`] and
    /// [`Cluster::configmap`] answer from, so an idle labeller sends no
    /// reads; `wake` is called on every change. The tasks end when the
    /// returned handles are dropped... or aborted: abort them to stop.
    pub fn follow(
        &self,
        configmap: Option<(String, String)>,
        wake: std::sync::Arc<dyn Fn() + Send + Sync>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        use futures_util::StreamExt as _;
        use kube::runtime::{WatchStreamExt as _, watcher};
        let mut tasks = Vec::new();
        let cache = std::sync::Arc::clone(&self.cache);
        let nodes = self.nodes.clone();
        let name = self.node.clone();
        let w = std::sync::Arc::clone(&wake);
        tasks.push(tokio::spawn(async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = watcher(nodes, config).default_backoff().boxed();
            let mut listing: Option<Node> = None;
            let mut complained = false;
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(error) => {
                        if !complained {
                            tracing::warn!(%error, node = %name, "watching the Node failed; retrying");
                            complained = true;
                        }
                        continue;
                    }
                };
                let Some(seen) = fold(&mut listing, event) else {
                    continue;
                };
                complained = false;
                *cache.node.write().unwrap_or_else(std::sync::PoisonError::into_inner) = seen;
                w();
            }
        }));
        if let Some((namespace, cm)) = configmap {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &namespace);
            let cache = std::sync::Arc::clone(&self.cache);
            tasks.push(tokio::spawn(async move {
                let config = watcher::Config::default().fields(&format!("metadata.name={cm}"));
                let mut stream = watcher(api, config).default_backoff().boxed();
                let key = (namespace.clone(), cm.clone());
                let mut listing = None;
                while let Some(event) = stream.next().await {
                    let event = match event {
                        Ok(e) => e,
                        Err(error) => {
                            tracing::debug!(%error, configmap = %cm, "watching the ConfigMap failed; retrying");
                            continue;
                        }
                    };
                    let Some(seen) = fold(&mut listing, event) else {
                        continue;
                    };
                    let data = match seen {
                        Seen::Present(c) => Seen::Present(c.data.unwrap_or_default()),
                        Seen::Missing => Seen::Missing,
                        Seen::Unknown => Seen::Unknown,
                    };
                    cache
                        .configmaps
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(key.clone(), data);
                    wake();
                }
            }));
        }
        tasks
    }

    /// Applies exactly these owned labels and annotations (server-side
    /// apply, field manager `intel-gpu-labeler`, no force) to the Node with
    /// this uid. An apply creates a missing object, whatever
    /// resourceVersion it carries (kubernetes issue 106745), and only RBAC
    /// without `create` would stop it — which does not hold for a kubelet's
    /// own credentials in host mode. A uid does: the API server checks it
    /// as a precondition and answers 409 when the Node is gone or was
    /// replaced (`Precondition failed: UID in precondition`), so a deleted
    /// Node is never re-created, in every mode. With `resource_version`
    /// (the version a watch-cache read was decided from), a Node that has
    /// changed since answers 409 too: the caller reads it afresh rather
    /// than writing from a stale view (its own last write not seen yet
    /// would otherwise be undone — `cargo xtask soak` caught the plugin
    /// label removed that way while the decision was unknown). After a
    /// fresh read none is sent: on a busy Node it would only raise
    /// needless conflicts.
    ///
    /// # Errors
    /// When the API server refuses or cannot be reached.
    pub async fn apply(
        &self,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
        uid: &str,
        resource_version: Option<&str>,
    ) -> Result<(), ClusterError> {
        let mut body = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "uid": uid,
                "labels": labels,
                "annotations": annotations,
            },
        });
        // The version the labels were decided from: a Node changed since
        // (the watch cache behind, our own last write not seen yet) fails
        // with 409 instead of being overwritten from a stale view.
        if let Some(rv) = resource_version.filter(|rv| !rv.is_empty()) {
            body["metadata"]["resourceVersion"] = json!(rv);
        }
        self.nodes
            .patch(
                &self.node,
                &PatchParams::apply(&self.manager),
                &Patch::Apply(body),
            )
            .await
            .map(drop)
            .map_err(|source| ClusterError::Api {
                action: "apply labels to",
                what: format!("node {}", self.node),
                source,
            })
    }

    /// The value of `key` in ConfigMap `namespace/name`; `None` when the
    /// ConfigMap or the key does not exist. From the watch cache when
    /// [`Cluster::follow`] follows it, else read.
    ///
    /// # Errors
    /// When the API server cannot be asked.
    pub async fn configmap(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, ClusterError> {
        let cached = self
            .cache
            .configmaps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned();
        match cached {
            Some(Seen::Present(mut data)) => return Ok(data.remove(key)),
            Some(Seen::Missing) => return Ok(None),
            Some(Seen::Unknown) | None => {}
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let cm = api
            .get_opt(name)
            .await
            .map_err(|source| ClusterError::Api {
                action: "read",
                what: format!("configmap {namespace}/{name}"),
                source,
            })?;
        Ok(cm.and_then(|c| c.data).and_then(|mut d| d.remove(key)))
    }

    /// Records a Warning Event on the Node (best effort: failures are
    /// logged, never fatal). The Event names the Node by uid, so `kubectl
    /// describe node` shows it; the same reason and message on the same
    /// Node is one Event whose `count` grows (its name is derived from
    /// them), across restarts too, instead of a pile of copies.
    pub async fn warn_event(&self, node_uid: &str, reason: &str, message: &str) {
        node_events::NodeEvents::new(self.client.clone(), &self.node, &self.manager)
            .warn(node_uid, reason, message)
            .await;
    }
}

/// The field manager of the enabled-plugins publisher.
pub const PUBLISHER_FIELD_MANAGER: &str = "intel-gpu-enabled-plugins-publisher";

/// Publishes `content` as key `key` of ConfigMap `namespace/name` (server-
/// side apply, field manager [`PUBLISHER_FIELD_MANAGER`], creating it when
/// missing). Two controllers publishing the same bytes apply the same
/// field with the same value: nothing changes, nothing flaps.
///
/// # Errors
/// When the API server refuses or cannot be reached.
pub async fn publish_configmap(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
    content: &str,
) -> Result<(), ClusterError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {key: content},
    });
    api.patch(
        name,
        &PatchParams::apply(PUBLISHER_FIELD_MANAGER),
        &Patch::Apply(body),
    )
    .await
    .map(drop)
    .map_err(|source| ClusterError::Api {
        action: "publish",
        what: format!("configmap {namespace}/{name}"),
        source,
    })
}

/// The username these credentials authenticate as, from the API server
/// (`SelfSubjectReview`, `authentication.k8s.io/v1`, Kubernetes ≥ 1.28). A
/// kubelet's own identity is `system:node:<node name>`.
///
/// # Errors
/// When the API server cannot be asked.
pub async fn who_am_i(client: &kube::Client) -> Result<String, ClusterError> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|source| ClusterError::Api {
            action: "ask who",
            what: "these credentials are".into(),
            source,
        })?;
    Ok(review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default())
}
