//! Container Device Interface specs: rendered for a set of devices and kept
//! in step on disk.
//!
//! A [`Spec`] holds the devices of one kind (`vendor/class`);
//! [`Spec::to_json`] renders it with the lowest `cdiVersion` whose features
//! it uses (runtimes refuse a spec that claims less). [`SpecDir`] writes
//! specs with `ops_kit::fs::write_atomic` (a random temporary name that
//! ends in `.tmp`, so runtimes skip it, created without following a link
//! planted in the shared directory, then a rename; mode 0644) and removes the specs it owns that are
//! no longer wanted. Specs are never deleted on shutdown: running containers
//! and checkpointed allocations still name them. JSON is valid YAML, so a
//! spec may be written under a `.yaml` name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Edits applied to a container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerEdits {
    /// `KEY=value` environment entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    /// Mounts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<SpecMount>,
}

impl ContainerEdits {
    fn is_empty(&self) -> bool {
        self.env.is_empty() && self.device_nodes.is_empty() && self.mounts.is_empty()
    }
}

/// A device node in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host, when it differs (needs CDI 0.5.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// Cgroup permissions (`rw`, `rwm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

/// A mount in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecMount {
    /// Path on the host.
    pub host_path: String,
    /// Path in the container.
    pub container_path: String,
    /// Mount options (`ro`, `bind`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Filesystem type (needs CDI 0.4.0).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One device of a spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDevice {
    /// The name after `kind=`.
    pub name: String,
    /// Annotations (need CDI 0.6.0).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// What the device adds to a container.
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

/// A CDI spec: devices of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// `vendor/class`, e.g. `intel.cdi.k8s.io/gpu`.
    pub kind: String,
    /// The devices.
    pub devices: Vec<SpecDevice>,
    /// Edits for every container that gets any device of the spec.
    pub container_edits: ContainerEdits,
    /// Spec annotations (need CDI 0.6.0).
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    cdi_version: &'static str,
    kind: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
    devices: &'a [SpecDevice],
    #[serde(skip_serializing_if = "ContainerEdits::is_empty")]
    container_edits: &'a ContainerEdits,
}

impl Spec {
    /// The lowest `cdiVersion` whose features the spec uses.
    #[must_use]
    pub fn min_version(&self) -> &'static str {
        let all_edits = || {
            self.devices
                .iter()
                .map(|d| &d.container_edits)
                .chain(std::iter::once(&self.container_edits))
        };
        let class = self.kind.split_once('/').map_or("", |(_, c)| c);
        if !self.annotations.is_empty()
            || self.devices.iter().any(|d| !d.annotations.is_empty())
            || class.contains('.')
        {
            return "0.6.0";
        }
        let name_starts_non_letter = self.devices.iter().any(|d| {
            d.name
                .chars()
                .next()
                .is_some_and(|c| !c.is_ascii_alphabetic())
        });
        if name_starts_non_letter
            || all_edits().any(|e| e.device_nodes.iter().any(|n| n.host_path.is_some()))
        {
            return "0.5.0";
        }
        if all_edits().any(|e| e.mounts.iter().any(|m| m.kind.is_some())) {
            return "0.4.0";
        }
        "0.3.0"
    }

    /// Reads a spec written as JSON (by [`Spec::to_json`] or any CDI
    /// producer that writes JSON).
    ///
    /// # Errors
    /// When the text is not a JSON CDI spec.
    pub fn from_json(text: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Read {
            kind: String,
            #[serde(default)]
            annotations: BTreeMap<String, String>,
            #[serde(default)]
            devices: Vec<SpecDevice>,
            #[serde(default)]
            container_edits: ContainerEdits,
        }
        let r: Read = serde_json::from_slice(text)?;
        Ok(Self {
            kind: r.kind,
            devices: r.devices,
            container_edits: r.container_edits,
            annotations: r.annotations,
        })
    }

    /// The spec as JSON (which is also YAML), with its minimum version.
    #[must_use]
    pub fn to_json(&self) -> String {
        let wire = Wire {
            cdi_version: self.min_version(),
            kind: &self.kind,
            annotations: &self.annotations,
            devices: &self.devices,
            container_edits: &self.container_edits,
        };
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(&wire).unwrap_or_default() + "\n"
    }
}

/// Why a spec could not be written or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CdiError {
    /// A file operation failed.
    #[error("could not {action} CDI spec {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a spec failed (the old one, if any, is left as it was).
    #[error("could not write CDI spec {}", path.display())]
    Write {
        /// The spec file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ops_kit::fs::FsError,
    },
    /// A file name that cannot be used.
    #[error("CDI spec file name {0:?} must end in .yaml or .json and contain no '/'")]
    BadName(String),
}

/// The largest spec file compared or read back (specs are a few KiB).
pub const MAX_SPEC_SIZE: u64 = 1 << 20;

/// A directory of specs, of which this plugin owns those whose file names
/// start with a prefix.
#[derive(Debug, Clone)]
pub struct SpecDir {
    dir: PathBuf,
    prefix: String,
}

impl SpecDir {
    /// Specs in `dir` (e.g. `/var/run/cdi`) named `<prefix>…`.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, prefix: &str) -> Self {
        Self {
            dir: dir.into(),
            prefix: prefix.to_owned(),
        }
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the temporaries a writer killed between create and rename
    /// left for owned names; returns how many. Call it at start.
    pub fn remove_stale_temporaries(&self) -> usize {
        ops_kit::fs::remove_stale_temporaries(&self.dir, &self.prefix)
    }

    /// Writes `spec` as `file_name` atomically, mode 0644; does nothing when
    /// the file already holds exactly this content. Returns whether it
    /// wrote.
    ///
    /// # Errors
    /// When the name is not a `.yaml`/`.json` file name, or writing fails
    /// (the old file, if any, is left as it was).
    pub fn write(&self, file_name: &str, spec: &Spec) -> Result<bool, CdiError> {
        let is_spec_name = file_name.ends_with(".yaml") || file_name.ends_with(".json");
        if !is_spec_name || file_name.contains('/') || !file_name.starts_with(&self.prefix) {
            return Err(CdiError::BadName(file_name.to_owned()));
        }
        let content = spec.to_json();
        let path = self.dir.join(file_name);
        // Compared without following a link at the name, and capped: a
        // plant there is replaced, never read through.
        if ops_kit::fs::read_capped(&self.dir, file_name, MAX_SPEC_SIZE)
            .is_ok_and(|c| c == content.as_bytes())
        {
            return Ok(false);
        }
        ops_kit::fs::write_atomic(&self.dir, file_name, content.as_bytes(), 0o644).map_err(
            |source| CdiError::Write {
                path: path.clone(),
                source,
            },
        )?;
        Ok(true)
    }

    /// Removes the owned specs not named in `keep`; returns what it
    /// removed and what it could not (a failed removal does not stop the
    /// others). Files of other owners are never touched.
    ///
    /// # Errors
    /// When the directory cannot be listed.
    pub fn retain(&self, keep: &BTreeSet<String>) -> Result<Retained, CdiError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Retained::default()),
            Err(source) => {
                return Err(CdiError::Io {
                    action: "list the directory of",
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut out = Retained::default();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let owned = name.starts_with(&self.prefix)
                && (name.ends_with(".yaml") || name.ends_with(".json"));
            if owned && !keep.contains(&name) {
                let path = entry.path();
                // One that cannot be removed does not stop the others.
                match std::fs::remove_file(&path) {
                    Ok(()) => out.removed.push(name),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => out.failed.push(CdiError::Io {
                        action: "remove",
                        path,
                        source,
                    }),
                }
            }
        }
        out.removed.sort();
        Ok(out)
    }
}

/// What [`SpecDir::retain`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Retained {
    /// Files removed, sorted.
    pub removed: Vec<String>,
    /// Files that could not be removed (left for the next try).
    pub failed: Vec<CdiError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn spec(name: &str) -> Spec {
        Spec {
            kind: "intel.cdi.k8s.io/gpu".into(),
            devices: vec![SpecDevice {
                name: name.into(),
                annotations: BTreeMap::new(),
                container_edits: ContainerEdits {
                    device_nodes: vec![DeviceNode {
                        path: "/dev/dri/card1".into(),
                        host_path: None,
                        permissions: Some("rw".into()),
                    }],
                    ..ContainerEdits::default()
                },
            }],
            container_edits: ContainerEdits::default(),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn minimum_versions_follow_the_features_used() {
        let mut s = spec("card1");
        assert_eq!(s.min_version(), "0.3.0");
        s.devices[0].container_edits.mounts.push(SpecMount {
            host_path: "/a".into(),
            container_path: "/a".into(),
            options: vec!["ro".into()],
            kind: Some("none".into()),
        });
        assert_eq!(s.min_version(), "0.4.0");
        s.devices[0].container_edits.device_nodes[0].host_path = Some("/dev/dri/card1".into());
        assert_eq!(s.min_version(), "0.5.0");
        assert_eq!(spec("1card").min_version(), "0.5.0");
        s.annotations.insert("a".into(), "b".into());
        assert_eq!(s.min_version(), "0.6.0");
        let mut dotted = spec("x");
        dotted.kind = "vendor.com/cl.ass".into();
        assert_eq!(dotted.min_version(), "0.6.0");
    }

    #[test]
    fn json_has_no_empty_fields() {
        let json = spec("card1").to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["cdiVersion"], "0.3.0");
        assert_eq!(v["kind"], "intel.cdi.k8s.io/gpu");
        assert_eq!(
            v["devices"][0]["containerEdits"]["deviceNodes"][0]["path"],
            "/dev/dri/card1"
        );
        assert!(v.get("containerEdits").is_none() && v.get("annotations").is_none());
        assert!(v["devices"][0]["containerEdits"].get("mounts").is_none());
    }

    /// Another CDI producer on the node (anyone who can write the shared
    /// directory) plants links at the spec's name and at the temporary
    /// name writers used to take: the files they point at stay byte for
    /// byte and mode for mode, and the spec is written.
    #[test]
    fn links_planted_in_the_shared_directory_turn_nothing() {
        use std::os::unix::fs::MetadataExt as _;
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("kubelet-state");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cdi = root.path().join("cdi");
        std::fs::create_dir(&cdi).unwrap();
        for name in ["intel-gpu.json", ".intel-gpu.json.tmp"] {
            std::os::unix::fs::symlink(&victim, cdi.join(name)).unwrap();
        }
        let dir = SpecDir::new(&cdi, "intel-gpu");
        let spec = Spec {
            kind: "intel.com/gpu".into(),
            devices: vec![],
            container_edits: ContainerEdits::default(),
            annotations: BTreeMap::new(),
        };
        assert!(dir.write("intel-gpu.json", &spec).unwrap());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o7777, 0o600);
        let written = std::fs::symlink_metadata(cdi.join("intel-gpu.json")).unwrap();
        assert!(written.is_file(), "the link was replaced by the spec");
        assert_eq!(written.mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read_to_string(cdi.join("intel-gpu.json")).unwrap(),
            spec.to_json()
        );
    }

    #[test]
    fn write_is_atomic_idempotent_0644_and_retain_spares_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let specs = SpecDir::new(dir.path().join("cdi"), "intel.cdi.k8s.io-gpu-");
        assert!(
            specs
                .write("intel.cdi.k8s.io-gpu-card1.yaml", &spec("card1"))
                .unwrap()
        );
        assert!(
            !specs
                .write("intel.cdi.k8s.io-gpu-card1.yaml", &spec("card1"))
                .unwrap(),
            "same content is not rewritten"
        );
        assert!(
            specs
                .write("intel.cdi.k8s.io-gpu-card2.yaml", &spec("card2"))
                .unwrap()
        );
        let path = dir.path().join("cdi/intel.cdi.k8s.io-gpu-card1.yaml");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        std::fs::write(dir.path().join("cdi/nvidia.com-gpu.yaml"), "{}").unwrap();
        let keep: BTreeSet<String> = ["intel.cdi.k8s.io-gpu-card2.yaml".to_owned()].into();
        assert_eq!(
            specs.retain(&keep).unwrap().removed,
            ["intel.cdi.k8s.io-gpu-card1.yaml"]
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("cdi"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["intel.cdi.k8s.io-gpu-card2.yaml", "nvidia.com-gpu.yaml"]
        );
        assert!(matches!(
            specs.write("intel.cdi.k8s.io-gpu-card1.txt", &spec("x")),
            Err(CdiError::BadName(_))
        ));
        assert!(matches!(
            specs.write("other.yaml", &spec("x")),
            Err(CdiError::BadName(_))
        ));
    }
}
