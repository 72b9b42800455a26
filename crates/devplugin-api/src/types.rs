//! Domain types: what a plugin author deals in instead of prost messages.

use std::collections::BTreeMap;
use std::fmt;

use crate::cdi::CdiName;
use std::path::PathBuf;

use crate::pb;

/// The API version this framework speaks.
pub const API_VERSION: &str = "v1beta1";
/// The largest ListAndWatch message the kubelet's gRPC client accepts.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// The longest device ID.
pub const MAX_DEVICE_ID_LEN: usize = 63;

/// A name or value that the kubelet would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidName {
    /// Not a valid extended resource name.
    #[error("invalid resource name {name:?}: {reason}")]
    Resource {
        /// The offending name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// Not a valid device ID.
    #[error("invalid device ID {id:?}: {reason}")]
    DeviceId {
        /// The offending ID.
        id: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A CDI device name that is not `vendor.com/class=name`.
    #[error("invalid CDI device name {name:?}: {reason}")]
    Cdi {
        /// The offending name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// An extended resource name (`vendor-domain/name`), checked as the kubelet
/// checks it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceName(String);

impl ResourceName {
    /// Validates `name`.
    ///
    /// # Errors
    /// When the kubelet would refuse it: not exactly one `/`, a domain that
    /// is not a DNS-1123 subdomain, a name part longer than 63 characters or
    /// of other characters, under `kubernetes.io/`, or starting with
    /// `requests.`.
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let bad = |reason| InvalidName::Resource {
            name: name.to_owned(),
            reason,
        };
        if name.starts_with("requests.") {
            return Err(bad("must not start with \"requests.\""));
        }
        let (domain, short) = name
            .split_once('/')
            .ok_or_else(|| bad("must be domain/name"))?;
        if short.contains('/') {
            return Err(bad("must contain exactly one '/'"));
        }
        if domain.is_empty() || domain.len() > 253 {
            return Err(bad("the domain must have 1 to 253 characters"));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !domain.split('.').all(label_ok) {
            return Err(bad(
                "the domain must be a DNS-1123 subdomain (lower-case letters, digits, '-', '.')",
            ));
        }
        if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
            return Err(bad("the kubernetes.io domain is reserved"));
        }
        if short.is_empty() || short.len() > 63 {
            return Err(bad("the name after '/' must have 1 to 63 characters"));
        }
        let ends_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
        let chars_ok = short
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !chars_ok || !ends_ok(short.as_bytes().first()) || !ends_ok(short.as_bytes().last()) {
            return Err(bad(
                "the name after '/' must be letters, digits, '-', '_', '.', starting and ending alphanumeric",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The socket file prefix for this resource (`/` becomes `-`), e.g.
    /// `gpu.intel.com-i915`.
    #[must_use]
    pub fn socket_prefix(&self) -> String {
        self.0.replace('/', "-")
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device ID: 1 to 63 printable ASCII characters without white space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `id`.
    ///
    /// # Errors
    /// When it is empty, longer than 63 characters, or holds characters
    /// other than printable ASCII without white space.
    pub fn new(id: &str) -> Result<Self, InvalidName> {
        let bad = |reason| InvalidName::DeviceId {
            id: id.to_owned(),
            reason,
        };
        if id.is_empty() {
            return Err(bad("it is empty"));
        }
        if id.len() > MAX_DEVICE_ID_LEN {
            return Err(bad("longer than 63 characters"));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("only printable ASCII without white space is allowed"));
        }
        Ok(Self(id.to_owned()))
    }

    /// The ID.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Device health, as the kubelet compares it (exact strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// `Healthy`.
    Healthy,
    /// `Unhealthy`.
    Unhealthy,
}

impl Health {
    /// The wire string.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::Unhealthy => "Unhealthy",
        }
    }

    /// Reads a wire string; anything but `Healthy` is unhealthy, as in the
    /// kubelet.
    #[must_use]
    pub fn from_wire(s: &str) -> Self {
        if s == "Healthy" {
            Self::Healthy
        } else {
            Self::Unhealthy
        }
    }
}

/// One advertised device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its ID.
    pub id: DeviceId,
    /// Its health.
    pub health: Health,
    /// The NUMA nodes it is close to (empty: no topology hint).
    pub numa_nodes: Vec<i64>,
}

impl Device {
    /// A healthy device without topology.
    #[must_use]
    pub fn healthy(id: DeviceId) -> Self {
        Self {
            id,
            health: Health::Healthy,
            numa_nodes: Vec::new(),
        }
    }

    fn to_pb(&self) -> pb::Device {
        pb::Device {
            id: self.id.0.clone(),
            health: self.health.as_str().to_owned(),
            topology: (!self.numa_nodes.is_empty()).then(|| pb::TopologyInfo {
                nodes: self
                    .numa_nodes
                    .iter()
                    .map(|&id| pb::NumaNode { id })
                    .collect(),
            }),
        }
    }
}

/// A device list on the wire that is not a valid [`DeviceList`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireListError {
    /// An ID that is not a valid device ID.
    #[error(transparent)]
    Invalid(#[from] InvalidName),
    /// An ID listed twice.
    #[error(transparent)]
    Duplicate(#[from] DuplicateId),
}

/// The same device ID twice in one list: a list error, not a bad name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device ID {:?} appears more than once in the list", .id.as_str())]
pub struct DuplicateId {
    /// The repeated ID.
    pub id: DeviceId,
}

/// A complete device list for one resource: unique IDs, in the order given.
#[derive(Debug, Clone, Default)]
pub struct DeviceList {
    devices: Vec<Device>,
    /// ID → position, for lookups on the Allocate path.
    index: std::collections::HashMap<String, usize>,
}

impl PartialEq for DeviceList {
    fn eq(&self, other: &Self) -> bool {
        self.devices == other.devices
    }
}

impl Eq for DeviceList {}

impl DeviceList {
    /// An empty list (capacity 0).
    #[must_use]
    pub fn empty() -> Self {
        Self::default()
    }

    /// Checks that IDs are unique.
    ///
    /// # Errors
    /// [`DuplicateId`] naming the first repeated ID.
    pub fn new(devices: Vec<Device>) -> Result<Self, DuplicateId> {
        let mut index = std::collections::HashMap::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            if index.insert(d.id.0.clone(), i).is_some() {
                return Err(DuplicateId { id: d.id.clone() });
            }
        }
        Ok(Self { devices, index })
    }

    /// The devices.
    #[must_use]
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The device with this ID.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Device> {
        self.index.get(id).and_then(|&i| self.devices.get(i))
    }

    /// The wire message.
    #[must_use]
    pub fn to_pb(&self) -> pb::ListAndWatchResponse {
        pb::ListAndWatchResponse {
            devices: self.devices.iter().map(Device::to_pb).collect(),
        }
    }

    /// Reads a wire message (for emulators and tests).
    ///
    /// # Errors
    /// When an ID is invalid or repeated.
    pub fn from_pb(msg: &pb::ListAndWatchResponse) -> Result<Self, WireListError> {
        let devices = msg
            .devices
            .iter()
            .map(|d| {
                Ok(Device {
                    id: DeviceId::new(&d.id)?,
                    health: Health::from_wire(&d.health),
                    numa_nodes: d
                        .topology
                        .iter()
                        .flat_map(|t| t.nodes.iter().map(|n| n.id))
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>, InvalidName>>()?;
        Ok(Self::new(devices)?)
    }
}

/// Access to a device node: any of read, write, mknod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// `r`.
    pub read: bool,
    /// `w`.
    pub write: bool,
    /// `m`.
    pub mknod: bool,
}

impl Permissions {
    /// `rw`.
    pub const READ_WRITE: Self = Self {
        read: true,
        write: true,
        mknod: false,
    };

    fn as_wire(self) -> String {
        let mut s = String::new();
        if self.read {
            s.push('r');
        }
        if self.write {
            s.push('w');
        }
        if self.mknod {
            s.push('m');
        }
        s
    }
}

/// A device node to create in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Path in the container.
    pub container_path: PathBuf,
    /// Path on the host.
    pub host_path: PathBuf,
    /// Access.
    pub permissions: Permissions,
}

/// A host path to mount into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Path in the container.
    pub container_path: PathBuf,
    /// Path on the host.
    pub host_path: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

/// What one container gets for its devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerAllocation {
    /// Device nodes.
    pub devices: Vec<DeviceSpec>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Environment variables.
    pub envs: BTreeMap<String, String>,
    /// Annotations for the runtime.
    pub annotations: BTreeMap<String, String>,
    /// CDI device names.
    pub cdi_devices: Vec<CdiName>,
}

impl ContainerAllocation {
    /// The wire message.
    #[must_use]
    pub fn to_pb(&self) -> pb::ContainerAllocateResponse {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        pb::ContainerAllocateResponse {
            envs: self.envs.clone().into_iter().collect(),
            annotations: self.annotations.clone().into_iter().collect(),
            mounts: self
                .mounts
                .iter()
                .map(|m| pb::Mount {
                    container_path: path(&m.container_path),
                    host_path: path(&m.host_path),
                    read_only: m.read_only,
                })
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|d| pb::DeviceSpec {
                    container_path: path(&d.container_path),
                    host_path: path(&d.host_path),
                    permissions: d.permissions.as_wire(),
                })
                .collect(),
            cdi_devices: self
                .cdi_devices
                .iter()
                .map(|c| pb::CdiDevice {
                    name: c.as_str().to_owned(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names() {
        for ok in [
            "gpu.intel.com/i915",
            "example.com/null",
            "a/b",
            "x-y.z/A_b.9",
        ] {
            assert!(ResourceName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "i915",
            "gpu.intel.com/",
            "/i915",
            "gpu.intel.com/a/b",
            "GPU.intel.com/i915",
            "kubernetes.io/gpu",
            "k8s.kubernetes.io/gpu",
            "requests.gpu.intel.com/i915",
            "gpu.intel.com/-x",
            "gpu.intel.com/x y",
            "-a.com/x",
            "a..com/x",
        ] {
            assert!(ResourceName::new(bad).is_err(), "{bad}");
        }
        let long = format!("a.com/{}", "x".repeat(64));
        assert!(ResourceName::new(&long).is_err());
        assert_eq!(
            ResourceName::new("gpu.intel.com/i915")
                .unwrap()
                .socket_prefix(),
            "gpu.intel.com-i915"
        );
    }

    #[test]
    fn device_ids_and_lists() {
        assert!(DeviceId::new("card0-0").is_ok());
        assert!(DeviceId::new(&"x".repeat(63)).is_ok());
        for bad in ["", "a b", "é", "tab\t"] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?}");
        }
        assert!(DeviceId::new(&"x".repeat(64)).is_err());
        let d = |id: &str| Device::healthy(DeviceId::new(id).unwrap());
        let err = DeviceList::new(vec![d("a"), d("b"), d("a")]).unwrap_err();
        assert_eq!(err.id.as_str(), "a");
        let list = DeviceList::new(vec![
            d("a"),
            Device {
                numa_nodes: vec![1],
                health: Health::Unhealthy,
                ..d("b")
            },
        ])
        .unwrap();
        assert_eq!(DeviceList::from_pb(&list.to_pb()).unwrap(), list);
    }

    #[test]
    fn health_strings_are_exact() {
        assert_eq!(Health::from_wire("Healthy"), Health::Healthy);
        assert_eq!(Health::from_wire("healthy"), Health::Unhealthy);
        assert_eq!(Health::Unhealthy.as_str(), "Unhealthy");
    }

    #[test]
    fn cdi_names() {
        assert_eq!(
            CdiName::new("intel.cdi.k8s.io/gpu", "card1")
                .unwrap()
                .as_str(),
            "intel.cdi.k8s.io/gpu=card1"
        );
        assert!(CdiName::new("intel.cdi.k8s.io", "card1").is_err());
        assert!(CdiName::new("intel.cdi.k8s.io/gpu", "").is_err());
        assert!(CdiName::new("intel.cdi.k8s.io/g.pu", "x").is_err());
    }
}
