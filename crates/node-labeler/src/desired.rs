//! The labels a node should carry: a pure function of its inventory and the
//! enabled-plugins decision.

use std::collections::{BTreeMap, BTreeSet};

use enabled_plugins::Label;
use enabled_plugins::label::{check_key, check_prefix, is_reserved_prefix, prefix};
use gpu_discovery::{Gpu, Inventory};

/// The prefix of the discovery labels.
pub const PREFIX: &str = "gpu.intel.com/";
/// The NFD-style feature label.
pub const FEATURE_LABEL: &str = "intel.feature.node.kubernetes.io/gpu";
/// The longest label value.
pub const MAX_VALUE: usize = 63;

/// What the cluster decided about the GPU plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Enabled, marking nodes with this label.
    Enabled(Label),
    /// Not in the enabled-plugins list.
    Disabled,
    /// No source could be read: change nothing about the plugin label.
    Unknown(String),
}

/// The prefixes the GPU plugin's label may have. Its key comes from the
/// enabled-plugins content (a file or a ConfigMap), which is data, not
/// configuration: whoever may edit it must not be able to set system
/// labels on every GPU node. So the key must be unprefixed (`intelgpu`) or
/// in a prefix the operator allowed; a key in `kubernetes.io`, `k8s.io` or
/// a subdomain of either is always refused, and such a prefix cannot be
/// allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelPrefixes {
    allowed: BTreeSet<String>,
}

/// A prefix that cannot be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrefixError {
    /// Not a DNS subdomain.
    #[error("label prefix {prefix:?} is invalid: {reason}")]
    Invalid {
        /// The prefix given.
        prefix: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// Kubernetes keeps it for its own labels.
    #[error(
        "label prefix {prefix:?} cannot be allowed: kubernetes.io, k8s.io and their subdomains are Kubernetes' own"
    )]
    Reserved {
        /// The prefix given.
        prefix: String,
    },
}

/// Why the plugin label the enabled-plugins content names is not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The key is in a prefix Kubernetes keeps for itself.
    #[error(
        "label key {key:?} is refused: its prefix {prefix:?} is Kubernetes' own (kubernetes.io, k8s.io and their subdomains are never set from enabled-plugins content)"
    )]
    Reserved {
        /// The key.
        key: String,
        /// Its prefix.
        prefix: String,
    },
    /// The key has a prefix the operator did not allow.
    #[error(
        "label key {key:?} is refused: its prefix {prefix:?} is not among the allowed prefixes"
    )]
    NotAllowed {
        /// The key.
        key: String,
        /// Its prefix.
        prefix: String,
    },
    /// The key is not valid label syntax (the `-dra` variant of a long
    /// key can be too long).
    #[error("label key {key:?} is refused: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

impl Refusal {
    /// The refused key.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Self::Reserved { key, .. }
            | Self::NotAllowed { key, .. }
            | Self::Invalid { key, .. } => key,
        }
    }
}

impl LabelPrefixes {
    /// Unprefixed keys only (the default).
    #[must_use]
    pub const fn unprefixed_only() -> Self {
        Self {
            allowed: BTreeSet::new(),
        }
    }

    /// Also allows keys in `prefix` (exactly that prefix, not its
    /// subdomains).
    ///
    /// # Errors
    /// When `prefix` is not a DNS subdomain, or is `kubernetes.io`,
    /// `k8s.io` or a subdomain of either.
    pub fn allow(mut self, prefix: &str) -> Result<Self, PrefixError> {
        check_prefix(prefix).map_err(|reason| PrefixError::Invalid {
            prefix: prefix.to_owned(),
            reason,
        })?;
        if is_reserved_prefix(prefix) {
            return Err(PrefixError::Reserved {
                prefix: prefix.to_owned(),
            });
        }
        self.allowed.insert(prefix.to_owned());
        Ok(self)
    }

    /// The allowed prefixes.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(String::as_str)
    }

    /// Whether the plugin label may have the key `key`.
    ///
    /// # Errors
    /// Why not: a reserved prefix (whatever is allowed), a prefix not
    /// allowed, or invalid syntax.
    pub fn check(&self, key: &str) -> Result<(), Refusal> {
        check_key(key).map_err(|reason| Refusal::Invalid {
            key: key.to_owned(),
            reason,
        })?;
        let Some(p) = prefix(key) else {
            return Ok(());
        };
        if is_reserved_prefix(p) {
            return Err(Refusal::Reserved {
                key: key.to_owned(),
                prefix: p.to_owned(),
            });
        }
        if !self.allowed.contains(p) {
            return Err(Refusal::NotAllowed {
                key: key.to_owned(),
                prefix: p.to_owned(),
            });
        }
        Ok(())
    }
}

/// Whether `key` is in a prefix Kubernetes keeps for itself
/// (`kubernetes.io`, `k8s.io` and their subdomains).
#[must_use]
pub fn is_reserved_key(key: &str) -> bool {
    prefix(key).is_some_and(is_reserved_prefix)
}

/// Splits a long value into `key`, `key2`, `key3`… of at most 63
/// characters; continuation values start with `Z` (a value must start with
/// an alphanumeric) and every chunk ends with one.
#[must_use]
pub fn split_long(key: &str, value: &str) -> Vec<(String, String)> {
    if value.len() <= MAX_VALUE {
        return vec![(key.to_owned(), value.to_owned())];
    }
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let prefix = if out.is_empty() { "" } else { "Z" };
        let room = MAX_VALUE - prefix.len();
        let mut cut = rest.len().min(room);
        // End on an alphanumeric (values are ASCII here).
        while cut > 1 && !rest.as_bytes()[cut - 1].is_ascii_alphanumeric() {
            cut -= 1;
        }
        let (chunk, tail) = rest.split_at(cut);
        let name = if out.is_empty() {
            key.to_owned()
        } else {
            format!("{key}{}", out.len() + 1)
        };
        out.push((name, format!("{prefix}{chunk}")));
        rest = tail;
    }
    out
}

/// The discovery labels, compatible with the Go labeller's.
#[must_use]
pub fn discovery_labels(inventory: &Inventory) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // The plugin's own predicate: what it advertises is what is counted.
    let bound: Vec<&Gpu> = inventory.advertised().collect();
    if bound.is_empty() {
        return out;
    }
    out.insert(FEATURE_LABEL.to_owned(), "true".to_owned());
    let mut ids: BTreeMap<(u32, u16), usize> = BTreeMap::new();
    for g in &bound {
        *ids.entry((g.class >> 8, g.device_id)).or_default() += 1;
    }
    for ((class, id), n) in &ids {
        let stem = format!("{PREFIX}device-id.{class:04x}-{id:04x}");
        out.insert(format!("{stem}.present"), "true".to_owned());
        out.insert(format!("{stem}.count"), n.to_string());
    }
    let products: Vec<&gpu_discovery::Product> = ids
        .keys()
        .filter_map(|(_, id)| gpu_discovery::product(*id))
        .collect();
    if let [only] = products.as_slice() {
        out.insert(format!("{PREFIX}product"), only.model_label());
        out.insert(format!("{PREFIX}family"), only.family_label());
    }
    let advertised: Vec<&Gpu> = inventory.advertised().collect();
    if !advertised.is_empty() {
        let numbers: Vec<String> = advertised.iter().map(|g| g.index.to_string()).collect();
        out.extend(split_long(
            &format!("{PREFIX}gpu-numbers"),
            &numbers.join("."),
        ));
        let mut by_numa: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for g in &advertised {
            if let Some(n) = g.numa_node {
                by_numa.entry(n).or_default().push(g.index.to_string());
            }
        }
        if !by_numa.is_empty() {
            let map: Vec<String> = by_numa
                .iter()
                .map(|(n, cards)| format!("{n}-{}", cards.join(".")))
                .collect();
            out.extend(split_long(&format!("{PREFIX}numa-gpu-map"), &map.join("_")));
        }
        let tiles: u32 = advertised.iter().map(|g| g.tiles).sum();
        out.insert(format!("{PREFIX}tiles"), tiles.to_string());
        let memory: Vec<u64> = advertised.iter().filter_map(|g| g.vram_bytes).collect();
        if !memory.is_empty() {
            out.insert(
                format!("{PREFIX}memory.max"),
                memory.iter().sum::<u64>().to_string(),
            );
        }
        out.insert(
            format!("{PREFIX}millicores"),
            (advertised.len() * 1000).to_string(),
        );
    }
    out
}

/// Whether a kubelet may set the label `key` on its own Node under the
/// NodeRestriction admission plugin: unprefixed and foreign keys yes;
/// `node-restriction.kubernetes.io/` never; other `kubernetes.io` and
/// `k8s.io` keys only in the `kubelet.kubernetes.io` and
/// `node.kubernetes.io` namespaces (and their subdomains) or a few
/// well-known keys.
#[must_use]
pub fn kubelet_may_set(key: &str) -> bool {
    const WELL_KNOWN: &[&str] = &[
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "node.kubernetes.io/instance-type",
    ];
    let Some((ns, _)) = key.split_once('/') else {
        return true;
    };
    let within = |base: &str| ns == base || ns.ends_with(&format!(".{base}"));
    if within("node-restriction.kubernetes.io") {
        return false;
    }
    if within("kubernetes.io") || within("k8s.io") {
        return WELL_KNOWN.contains(&key)
            || within("kubelet.kubernetes.io")
            || within("node.kubernetes.io");
    }
    true
}

/// Whether `key` is one of the discovery labels (ours by name).
#[must_use]
pub fn is_discovery_key(key: &str) -> bool {
    key == FEATURE_LABEL || key.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_restriction() {
        for ok in [
            "intelgpu",
            "gpu.intel.com/tiles",
            FEATURE_LABEL,
            "kubernetes.io/hostname",
            "x.kubelet.kubernetes.io/y",
        ] {
            assert!(kubelet_may_set(ok), "{ok}");
        }
        for no in [
            "node-restriction.kubernetes.io/a",
            "kubernetes.io/gpu",
            "example.k8s.io/a",
            "a.node-restriction.kubernetes.io/b",
        ] {
            assert!(!kubelet_may_set(no), "{no}");
        }
    }

    #[test]
    fn short_values_stay_whole() {
        assert_eq!(
            split_long("k", "0.1.2"),
            vec![("k".to_owned(), "0.1.2".to_owned())]
        );
    }

    #[test]
    fn long_values_split_into_valid_continuations() {
        let numbers: Vec<String> = (0..60).map(|n| n.to_string()).collect();
        let value = numbers.join(".");
        let parts = split_long("gpu.intel.com/gpu-numbers", &value);
        assert!(parts.len() >= 3, "{parts:?}");
        assert_eq!(parts[1].0, "gpu.intel.com/gpu-numbers2");
        let mut joined = String::new();
        for (i, (_, v)) in parts.iter().enumerate() {
            assert!(v.len() <= MAX_VALUE, "{v}");
            assert!(enabled_plugins::label::check_value(v).is_ok(), "{v}");
            joined.push_str(if i == 0 { v } else { &v[1..] });
            if i > 0 {
                assert!(v.starts_with('Z'));
            }
        }
        assert_eq!(joined, value);
    }
}
