//! The decision: which plugins are enabled, each with its node label.

use std::collections::BTreeMap;
use std::fmt;

use crate::label::{Label, check_key};

/// A plugin StarlingX knows under two names, with its default label key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownPlugin {
    /// The name StarlingX's `k8s_plugins` dict used (`intel-gpu-plugin`).
    pub name: &'static str,
    /// The short name of the list forms (`intelgpu`), also the label key.
    pub alias: &'static str,
}

/// The Intel GPU device plugin.
pub const GPU_PLUGIN: KnownPlugin = KnownPlugin {
    name: "intel-gpu-plugin",
    alias: "intelgpu",
};

/// Plugins with two names. Any other name `X` means plugin `X` with label
/// `X=enabled`.
pub const KNOWN_PLUGINS: &[KnownPlugin] = &[
    GPU_PLUGIN,
    KnownPlugin {
        name: "intel-qat-plugin",
        alias: "intelqat",
    },
    KnownPlugin {
        name: "intel-fpga-plugin",
        alias: "intelfpga",
    },
];

/// The label value the list forms imply.
pub const ENABLED: &str = "enabled";

/// The canonical name of a plugin: aliases map to the long name.
#[must_use]
pub fn canonical_name(name: &str) -> &str {
    KNOWN_PLUGINS
        .iter()
        .find(|k| k.name == name || k.alias == name)
        .map_or(name, |k| k.name)
}

/// The label an entry of the list forms implies: the alias (or the entry
/// itself) `=enabled`.
///
/// # Errors
/// When the entry is not valid as a label key.
pub fn default_label(entry: &str) -> Result<Label, crate::label::LabelError> {
    let key = KNOWN_PLUGINS
        .iter()
        .find(|k| k.name == entry || k.alias == entry)
        .map_or(entry, |k| k.alias);
    Label::new(key, ENABLED)
}

/// Plugin names are free text in the object form (they name StarlingX task
/// files), but not empty, not padded and without control characters.
pub(crate) fn check_plugin_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        return Err("it is empty");
    }
    if name.trim() != name {
        return Err("it has leading or trailing white space");
    }
    if name.chars().any(char::is_control) {
        return Err("it has control characters");
    }
    Ok(())
}

/// Checks a plugin name as the list forms use it (it doubles as a label
/// key).
pub(crate) fn check_entry(entry: &str) -> Result<(), &'static str> {
    check_key(entry)
}

/// The set of enabled plugins, each with the node label that marks nodes
/// for it. Plugins are keyed by their canonical name; equality is equality
/// of the set, whatever form it was read from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnabledPlugins {
    plugins: BTreeMap<String, Label>,
}

/// Why a plugin could not be added to a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InsertError {
    /// The plugin name cannot be used.
    #[error("invalid plugin name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The plugin (or its alias) is already in the set.
    #[error("plugin {plugin:?} is enabled twice")]
    Duplicate {
        /// The canonical plugin name.
        plugin: String,
    },
    /// Another plugin sets the same label key to another value.
    #[error(
        "plugins {other:?} and {plugin:?} both set label key {key:?}, to {other_value:?} and {value:?}"
    )]
    LabelKey {
        /// The plugin being added.
        plugin: String,
        /// The plugin already in the set.
        other: String,
        /// The shared key.
        key: String,
        /// The value the plugin being added wants.
        value: String,
        /// The value the plugin already in the set wants.
        other_value: String,
    },
}

impl EnabledPlugins {
    /// An empty set: nothing enabled.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a plugin under its canonical name with `label`, or with the
    /// label its name implies when `label` is `None`.
    ///
    /// # Errors
    /// When the name is empty, padded with white space or holds control
    /// characters, when the plugin is already enabled (aliases included) or another
    /// plugin claims the label key with another value. The set is unchanged
    /// then.
    pub fn insert(&mut self, name: &str, label: Label) -> Result<(), InsertError> {
        check_plugin_name(name).map_err(|reason| InsertError::InvalidName {
            name: name.to_owned(),
            reason,
        })?;
        let plugin = canonical_name(name).to_owned();
        if self.plugins.contains_key(&plugin) {
            return Err(InsertError::Duplicate { plugin });
        }
        if let Some((other, l)) = self
            .plugins
            .iter()
            .find(|(_, l)| l.key() == label.key() && l.value() != label.value())
        {
            return Err(InsertError::LabelKey {
                plugin,
                other: other.clone(),
                key: label.key().to_owned(),
                value: label.value().to_owned(),
                other_value: l.value().to_owned(),
            });
        }
        self.plugins.insert(plugin, label);
        Ok(())
    }

    /// The label of a plugin, by any of its names.
    #[must_use]
    pub fn label_of(&self, name: &str) -> Option<&Label> {
        self.plugins.get(canonical_name(name))
    }

    /// Whether the GPU plugin is enabled, and with which label.
    #[must_use]
    pub fn gpu_plugin(&self) -> Option<&Label> {
        self.label_of(GPU_PLUGIN.name)
    }

    /// The plugins, by canonical name in byte order, with their labels.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Label)> {
        self.plugins.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many plugins are enabled.
    #[must_use]
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether nothing is enabled.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}

impl fmt::Display for EnabledPlugins {
    /// The StarlingX form (see [`crate::render_starlingx`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::render_starlingx(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_share_one_identity() {
        let mut set = EnabledPlugins::new();
        set.insert("intelgpu", Label::parse("intelgpu=enabled").unwrap())
            .unwrap();
        assert_eq!(set.gpu_plugin().unwrap().to_string(), "intelgpu=enabled");
        assert_eq!(set.label_of("intel-gpu-plugin"), set.label_of("intelgpu"));
        let err = set
            .insert(
                "intel-gpu-plugin",
                Label::parse("intelgpu=enabled").unwrap(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            InsertError::Duplicate {
                plugin: "intel-gpu-plugin".into()
            }
        );
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn label_key_conflicts_only_on_different_values() {
        let mut set = EnabledPlugins::new();
        set.insert("a", Label::parse("k=1").unwrap()).unwrap();
        set.insert("b", Label::parse("k=1").unwrap()).unwrap();
        let err = set.insert("c", Label::parse("k=2").unwrap()).unwrap_err();
        assert!(
            matches!(err, InsertError::LabelKey { ref other, .. } if other == "a"),
            "{err}"
        );
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn default_labels_use_the_short_name() {
        assert_eq!(
            default_label("intel-qat-plugin").unwrap().to_string(),
            "intelqat=enabled"
        );
        assert_eq!(
            default_label("intelfpga").unwrap().to_string(),
            "intelfpga=enabled"
        );
        assert_eq!(
            default_label("sriovdp").unwrap().to_string(),
            "sriovdp=enabled"
        );
        assert!(default_label("not valid").is_err());
    }
}
