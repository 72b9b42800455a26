//! Where discovery reads, how it reports paths, and what it advertises.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::filter::IdFilter;

/// The device directory on a host, the default prefix of reported device
/// paths (a default for what we report, never a place we read).
pub const DEFAULT_HOST_DEV: &str = "/dev"; // tidy: allow-host-path

/// A kernel driver whose GPUs we advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Driver {
    /// `i915`.
    I915,
    /// `xe`.
    Xe,
}

impl Driver {
    /// Every supported driver.
    pub const ALL: [Self; 2] = [Self::I915, Self::Xe];

    /// The kernel's name for it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::I915 => "i915",
            Self::Xe => "xe",
        }
    }

    /// The driver with this kernel name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Discovery settings. Roots are where we read; `host_dev` is what reported
/// device paths start with (the kubelet resolves them on the host).
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    sysfs_root: PathBuf,
    devfs_root: PathBuf,
    host_dev: PathBuf,
    drivers: BTreeSet<Driver>,
    filter: IdFilter,
}

impl DiscoveryConfig {
    /// Reads sysfs at `sysfs_root` and devfs at `devfs_root`; reports host
    /// paths under `/dev`; advertises GPUs of every supported driver and
    /// device id.
    #[must_use]
    pub fn new(sysfs_root: impl Into<PathBuf>, devfs_root: impl Into<PathBuf>) -> Self {
        Self {
            sysfs_root: sysfs_root.into(),
            devfs_root: devfs_root.into(),
            host_dev: PathBuf::from(DEFAULT_HOST_DEV),
            drivers: Driver::ALL.into_iter().collect(),
            filter: IdFilter::All,
        }
    }

    /// The prefix of reported device paths (default `/dev`).
    #[must_use]
    pub fn host_dev(mut self, prefix: impl Into<PathBuf>) -> Self {
        self.host_dev = prefix.into();
        self
    }

    /// Advertises GPUs of these drivers only.
    #[must_use]
    pub fn drivers(mut self, drivers: impl IntoIterator<Item = Driver>) -> Self {
        self.drivers = drivers.into_iter().collect();
        self
    }

    /// Advertises GPUs whose device id passes `filter` only.
    #[must_use]
    pub fn filter(mut self, filter: IdFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Where sysfs is read.
    #[must_use]
    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs_root
    }

    /// Where devfs is read.
    #[must_use]
    pub fn devfs_root(&self) -> &Path {
        &self.devfs_root
    }

    /// The prefix of reported device paths.
    #[must_use]
    pub fn host_dev_prefix(&self) -> &Path {
        &self.host_dev
    }

    /// The drivers whose GPUs are advertised.
    #[must_use]
    pub fn enabled_drivers(&self) -> &BTreeSet<Driver> {
        &self.drivers
    }

    /// The device id filter.
    #[must_use]
    pub fn id_filter(&self) -> &IdFilter {
        &self.filter
    }

    pub(crate) fn drivers_text(&self) -> String {
        self.drivers
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}
