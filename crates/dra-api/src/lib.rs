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
//! - [`DraServer`]: the DRA service (`v1` and `v1beta1` on one socket):
//!   `NodePrepareResources` and `NodeUnprepareResources`, idempotent,
//!   claims looked up through a [`ClaimSource`] by namespace, name and
//!   UID, only this driver's results handed to the [`Driver`], a per-claim
//!   error, prepared claims kept in a [`checkpoint`] written atomically.
//! - [`DriverName`] and [`DraService`]: the names the kubelet checks.
//! - [`pb`]: the registration, DRA (`v1`, `v1beta1`) and health protocols.
//!
//! - [`KubeClaims`]: the [`ClaimSource`] of the API server (kube-rs).
//! - [`slices::SlicePublisher`]: the node's devices as ResourceSlices (one
//!   pool per node, split at 128 devices, the generation moved on every
//!   change, owned by the Node, stale slices deleted, put back after a
//!   kubelet wipes them), driven by whole device sets.
//!
//! - [`cdi::ClaimSpecs`]: a CDI spec per prepared claim, on the device
//!   plugin framework's atomic spec writer.
//! - [`health`]: the health stream the kubelet reads
//!   (`v1alpha1.DRAResourceHealth`), fed by [`DraServer::publish_health`].
//!
//! Next: the Intel GPU DRA driver on it; see `docs/dra-api.md`.
//! The facts this follows, with their upstream sources, are collected in
//! `docs/research/dra-facts.md`.

pub mod pb;

pub mod cdi;
pub mod checkpoint;
mod client;
pub mod health;
mod names;
mod registrar;
mod service;
pub mod slices;

pub use checkpoint::{PreparedClaim, PreparedDevice};
pub use client::{ClientError, kube_client};
pub use names::{
    ClaimRefError, DraService, DriverName, MAX_DRIVER_NAME, NameError, check_claim_ref, check_uid,
};
pub use registrar::{
    DRA_PLUGIN_TYPE, REGISTRY_DIR, Registrar, RegistrarConfig, RegistrarError, RegistrationStatus,
};
pub use service::{
    Allocated, AllocationResult, ClaimError, ClaimRef, ClaimSource, DevicePrepared, DraConfig,
    DraError, DraServer, Driver, DriverError, KubeClaims, StartReport,
};
