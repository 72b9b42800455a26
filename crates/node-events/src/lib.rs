//! Warning Events on a Node, the way an operator finds them: `kubectl
//! describe node` lists Events whose `involvedObject` is the Node (by
//! name and uid), and the same reason and message on the same Node is one
//! Event whose `count` grows (its name is derived from them), across
//! restarts too, instead of a pile of copies. Node Events live in the
//! `default` namespace (core/v1, as the kubelet records its own); the
//! caller needs `create` and `patch` (and `get`, for the count) on
//! `events` there, nothing cluster-wide.
//!
//! Best effort: a failure is logged, never returned — reporting must not
//! stop the work it reports on.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use kube::api::{Api, Patch, PatchParams, PostParams};

/// The namespace Node Events are recorded in.
pub const NODE_EVENT_NAMESPACE: &str = "default";

/// Who records Events on which Node.
#[derive(Clone)]
pub struct NodeEvents {
    client: kube::Client,
    node: String,
    component: String,
}

impl std::fmt::Debug for NodeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEvents")
            .field("node", &self.node)
            .field("component", &self.component)
            .finish_non_exhaustive()
    }
}

impl NodeEvents {
    /// Events on Node `node`, from `component` (e.g. `intel-gpu-dra`).
    #[must_use]
    pub fn new(client: kube::Client, node: &str, component: &str) -> Self {
        Self {
            client,
            node: node.to_owned(),
            component: component.to_owned(),
        }
    }

    /// Records a Warning Event on the Node whose uid is `node_uid`.
    pub async fn warn(&self, node_uid: &str, reason: &str, message: &str) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), NODE_EVENT_NAMESPACE);
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let name = format!("{}.{:016x}", self.node, fnv1a(&[node_uid, reason, message]));
        let event = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(NODE_EVENT_NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.node.clone()),
                uid: Some(node_uid.to_owned()),
                ..Default::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now.clone()),
            count: Some(1),
            ..Default::default()
        };
        let result = match api.create(&PostParams::default(), &event).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Seen before: one more of the same.
                match api.get(&name).await {
                    Ok(existing) => {
                        let count = existing.count.unwrap_or(1).saturating_add(1);
                        let patch = serde_json::json!({"count": count, "lastTimestamp": now});
                        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                            .await
                            .map(drop)
                    }
                    Err(e) => Err(e),
                }
            }
            other => other.map(drop),
        };
        if let Err(error) = result {
            tracing::warn!(%error, reason, "could not record an Event");
        }
    }
}

/// FNV-1a over the parts (with separators): a stable name for an Event.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_names_are_stable_and_tell_parts_apart() {
        assert_eq!(super::fnv1a(&["a", "b"]), super::fnv1a(&["a", "b"]));
        assert_ne!(super::fnv1a(&["ab", ""]), super::fnv1a(&["a", "b"]));
    }
}
