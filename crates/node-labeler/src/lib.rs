//! Node labels for Intel GPU nodes.
//!
//! [`desired::discovery_labels`] and [`reconcile::reconcile`] are pure
//! functions: from the GPU inventory, the enabled-plugins
//! [`Decision`](desired::Decision), what the Node carries and what the
//! labeller owns on it, they decide exactly which labels and annotations the
//! labeller should own — the GPU plugin's label (`intelgpu=enabled` by
//! default) when the node has an advertisable GPU and the plugin is enabled,
//! kept through a removal grace period; the `gpu.intel.com/*` discovery
//! labels; nothing on an opted-out Node; never a label someone else set to
//! another value. The Kubernetes side applies that with server-side apply
//! under the field manager [`FIELD_MANAGER`](reconcile::FIELD_MANAGER), so
//! the API server removes what the labeller stops owning and nothing else.

pub mod cluster;
pub mod desired;
pub mod engine;
pub mod reconcile;
