//! Discovery of Intel GPUs (kernel drivers `i915` and `xe`) from sysfs and
//! devfs trees whose roots are parameters.
//!
//! Start with [`scan`]: given a [`DiscoveryConfig`] it returns the node's
//! [`Inventory`] — every DRM card with its state, the reason it is or is not
//! advertised, and the facts the plugin and the labeller need (device
//! nodes, by-path links, SR-IOV role, NUMA node, tiles, VRAM, MEI nodes).
//! The advertisable predicate ([`not_advertised_reason`]) lives here so the
//! device plugin and the node labeller cannot disagree; both build the same
//! [`DiscoveryConfig`] from the same flags ([`IdFilter::parse`] for
//! `--allow-ids`/`--deny-ids`).
//!
//! ```no_run
//! use gpu_discovery::{DiscoveryConfig, scan};
//!
//! let inventory = scan(&DiscoveryConfig::new("/host/sys", "/host/dev"))?;
//! for gpu in inventory.advertised() {
//!     println!("{} {} {:?}", gpu.card, gpu.pci_address, gpu.driver);
//! }
//! # Ok::<(), gpu_discovery::DiscoveryError>(())
//! ```
//!
//! This crate never talks to the API server. Fake nodes for tests are built
//! by the separate `fake-gpu-node` crate.

mod config;
mod filter;
mod inventory;
pub mod owner;
mod products;
mod scan;
mod sysfs;
pub mod uevent;
mod watch;

pub use config::{DEFAULT_HOST_DEV, DiscoveryConfig, Driver};
pub use filter::{FilterError, IdFilter, ParsedFilter};
pub use inventory::{
    CardState, DeviceNode, Gpu, Inventory, NodeKind, SCHEMA, SkipReason, Skipped, Sriov, SriovRole,
};
pub use products::{Product, product};
pub use scan::{
    DiscoveryError, INTEL_VENDOR, not_advertised_reason, not_published_reason_keeping_pfs, scan,
};
pub use sysfs::{AttrError, read_attribute};
pub use watch::{InventoryWatcher, Source, WatcherConfig};
