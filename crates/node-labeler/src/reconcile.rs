//! Deciding what to apply to a Node: a pure function of what the Node
//! carries, what the labeller owns on it, the inventory, the decision and
//! the time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gpu_discovery::Inventory;
use gpu_discovery::owner::{MODE_DRA, MODE_LABEL};

use crate::desired::{
    Decision, LabelPrefixes, Refusal, discovery_labels, is_discovery_key, is_reserved_key,
};

/// The field manager: the labeller owns exactly the fields it applied
/// under this name.
pub const FIELD_MANAGER: &str = "intel-gpu-labeler";
/// A Node annotated `gpu.intel.com/labeler: disabled` is left untouched.
pub const OPT_OUT_ANNOTATION: &str = "gpu.intel.com/labeler";
/// When the node was first seen without an advertisable GPU (Unix seconds),
/// kept on the Node so the removal grace period survives restarts.
pub const ABSENT_SINCE_ANNOTATION: &str = "gpu.intel.com/labeler-gpu-absent-since";

/// The Node as the labeller sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// All labels.
    pub labels: BTreeMap<String, String>,
    /// All annotations.
    pub annotations: BTreeMap<String, String>,
    /// Label keys the labeller's field manager owns.
    pub owned_labels: BTreeSet<String>,
    /// Annotation keys the labeller's field manager owns.
    pub owned_annotations: BTreeSet<String>,
}

/// Settings of the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Set the `gpu.intel.com/*` discovery labels.
    pub discovery_labels: bool,
    /// How long a node without GPUs keeps the plugin label.
    pub removal_grace: Duration,
    /// The prefixes the plugin label (and its `-dra` variant) may have; a
    /// label named with another is refused (see [`LabelPrefixes`]).
    pub plugin_label_prefixes: LabelPrefixes,
}

/// A label someone else set to another value: left alone and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The key.
    pub key: String,
    /// The value we want.
    pub wanted: String,
    /// The value on the Node.
    pub found: String,
}

/// What to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// The Node opted out: touch nothing.
    OptedOut,
    /// Apply exactly these owned fields (server-side apply removes the ones
    /// we owned and no longer list). `changed` is false when the Node
    /// already carries exactly this: then nothing is written.
    Apply {
        /// Labels to own.
        labels: BTreeMap<String, String>,
        /// Annotations to own.
        annotations: BTreeMap<String, String>,
        /// Keys left alone because someone set another value.
        conflicts: Vec<Conflict>,
        /// Whether this differs from what we own now.
        changed: bool,
        /// Why the plugin label is as it is (for logs).
        note: String,
        /// The plugin label the decision names, when it is refused: then
        /// the plugin label is left as it is (as for an unknown decision),
        /// less any owned key in a prefix Kubernetes keeps for itself.
        refused: Option<Refusal>,
    },
}

/// The owned labels and annotations with their current values.
fn owned_now(view: &NodeView) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let pick = |keys: &BTreeSet<String>, all: &BTreeMap<String, String>| {
        keys.iter()
            .filter_map(|k| all.get(k).map(|v| (k.clone(), v.clone())))
            .collect()
    };
    (
        pick(&view.owned_labels, &view.labels),
        pick(&view.owned_annotations, &view.annotations),
    )
}

/// Drops from `wanted` every key someone else set to another value (we do
/// not own it), reporting each as a conflict.
fn leave_others(
    wanted: &mut BTreeMap<String, String>,
    on_node: &BTreeMap<String, String>,
    owned: &BTreeSet<String>,
    conflicts: &mut Vec<Conflict>,
) {
    wanted.retain(|k, v| match on_node.get(k) {
        Some(found) if found != v && !owned.contains(k) => {
            conflicts.push(Conflict {
                key: k.clone(),
                wanted: v.clone(),
                found: found.clone(),
            });
            false
        }
        _ => true,
    });
}

/// Decides what to apply. `now` is Unix seconds.
#[must_use]
pub fn reconcile(
    view: &NodeView,
    inventory: &Inventory,
    decision: &Decision,
    policy: &Policy,
    now: u64,
) -> Intent {
    if view
        .annotations
        .get(OPT_OUT_ANNOTATION)
        .is_some_and(|v| v == "disabled")
    {
        return Intent::OptedOut;
    }
    let (owned_labels, owned_annotations) = owned_now(view);
    // One GPU, one owner: a node given to the DRA driver gets its
    // DaemonSet's label instead of the device plugin's.
    let dra = view.labels.get(MODE_LABEL).map(String::as_str) == Some(MODE_DRA);
    let plugin_key = |label: &enabled_plugins::Label| {
        if dra {
            format!("{}-dra", label.key())
        } else {
            label.key().to_owned()
        }
    };
    // The label comes from data anyone who may edit the enabled-plugins
    // ConfigMap or file controls: a key outside the allowed prefixes is
    // refused, and the decision counts as unknown for the plugin label.
    let refused = match decision {
        Decision::Enabled(label) => policy.plugin_label_prefixes.check(&plugin_key(label)).err(),
        _ => None,
    };
    let refused_decision;
    let decision = match &refused {
        Some(r) => {
            refused_decision = Decision::Unknown(r.to_string());
            &refused_decision
        }
        None => decision,
    };
    let mut labels = if policy.discovery_labels {
        discovery_labels(inventory)
    } else {
        BTreeMap::new()
    };
    let mut annotations = BTreeMap::new();
    let gpu_present = inventory.advertised().next().is_some();
    // The grace clock, whoever holds it now: someone who took it over
    // (`kubectl annotate --overwrite`) still sets the time.
    let absent_since: Option<u64> = view
        .annotations
        .get(ABSENT_SINCE_ANNOTATION)
        .and_then(|v| v.parse().ok());
    // The plugin label this decision wants, if any (a GPU is needed).
    let mut note = match decision {
        Decision::Enabled(label) if gpu_present => {
            let key = plugin_key(label);
            labels.insert(key.clone(), label.value().to_owned());
            format!(
                "{key}={}: the node has an advertisable GPU and the plugin is enabled{}",
                label.value(),
                if dra { " (for the DRA driver)" } else { "" }
            )
        }
        Decision::Enabled(label) => format!("{label} not set: the node has no advertisable GPU"),
        Decision::Disabled => "plugin label not set: the GPU plugin is not enabled".to_owned(),
        Decision::Unknown(why) => {
            // Keep whatever plugin label we own, exactly as it is — but
            // never a key in Kubernetes' own prefixes (only hostile
            // content could have set one): that one is let go.
            for (k, v) in owned_labels
                .iter()
                .filter(|(k, _)| !is_discovery_key(k) && !is_reserved_key(k))
            {
                labels.insert(k.clone(), v.clone());
            }
            format!("plugin label unchanged: the enabled-plugins decision is unknown ({why})")
        }
    };
    // No advertisable GPU: every label we own stays, as it is, through the
    // removal grace (a driver reload or an SR-IOV change must not evict a
    // plugin selecting on any of them, `intel.feature.node.kubernetes.io/gpu`
    // included), except a plugin label the decision takes back. The clock
    // is kept on the Node; a GPU that comes back resets it.
    if !gpu_present {
        let disabled = *decision == Decision::Disabled;
        let kept: BTreeMap<String, String> = owned_labels
            .iter()
            .filter(|(k, _)| !disabled || is_discovery_key(k))
            .filter(|(k, _)| is_discovery_key(k) || !is_reserved_key(k))
            .filter(|(k, _)| !labels.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !kept.is_empty() {
            let since = absent_since.unwrap_or(now);
            let waited = Duration::from_secs(now.saturating_sub(since));
            if waited < policy.removal_grace {
                note = format!(
                    "{} owned labels kept: no advertisable GPU for {waited:?}, grace {:?}",
                    kept.len(),
                    policy.removal_grace
                );
                labels.extend(kept);
                annotations.insert(ABSENT_SINCE_ANNOTATION.to_owned(), since.to_string());
            } else {
                note = format!("owned labels removed: no advertisable GPU for {waited:?}");
            }
        } else if let (Decision::Unknown(_), Some(since)) = (decision, absent_since) {
            annotations.insert(ABSENT_SINCE_ANNOTATION.to_owned(), since.to_string());
        }
    }
    let mut conflicts = Vec::new();
    leave_others(
        &mut labels,
        &view.labels,
        &view.owned_labels,
        &mut conflicts,
    );
    // Annotations as labels: one someone else set to another value is not
    // applied (a non-forced apply would be refused on every try and wedge
    // the Node); it is reported, and its value is what counts.
    leave_others(
        &mut annotations,
        &view.annotations,
        &view.owned_annotations,
        &mut conflicts,
    );
    let changed = labels != owned_labels || annotations != owned_annotations;
    Intent::Apply {
        labels,
        annotations,
        conflicts,
        changed,
        note,
        refused,
    }
}
