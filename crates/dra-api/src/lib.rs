//! A framework for Kubernetes DRA (Dynamic Resource Allocation) kubelet
//! plugins, `resource.k8s.io/v1` (GA in Kubernetes 1.34), the companion of
//! `devplugin-api` for drivers that moved from device plugins to DRA.
//!
//! What it does today:
//!
//! - [`Registrar`]: registration through the kubelet's plugin watcher — a
//!   registration socket in `plugins_registry` answering `GetInfo` with the
//!   DRA plugin type, the driver name, the service endpoint and the DRA
//!   services served, following `NotifyRegistrationStatus`, serving anew
//!   when its socket is deleted, removing stale sockets of a killed
//!   instance, accepting any `:authority` (the kubelet's registration dial
//!   sends the percent-encoded socket path).
//! - [`DriverName`] and [`DraService`]: the names the kubelet checks.
//! - [`pb`]: the registration, DRA (`v1`, `v1beta1`) and health protocols.
//!
//! The DRA service itself (prepare and unprepare with a checkpoint),
//! ResourceSlice publication and CDI come next; see `docs/dra-api.md`.
//! The facts this follows, with their upstream sources, are collected in
//! `docs/research/dra-facts.md`.

pub mod pb;

mod names;
mod registrar;

pub use names::{DraService, DriverName, MAX_DRIVER_NAME, NameError};
pub use registrar::{
    DRA_PLUGIN_TYPE, REGISTRY_DIR, Registrar, RegistrarConfig, RegistrarError, RegistrationState,
};
