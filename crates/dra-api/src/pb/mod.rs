//! The generated protocol code, from `proto/` by `cargo xtask codegen`:
//! the kubelet's plugin registration API (`pluginregistration`), its DRA
//! plugin API in both served versions (`v1`, `v1beta1`: the same messages
//! under two packages) and the DRA health API (`v1alpha1`).
//!
//! Drivers built on the framework should not need it; it is public for
//! emulators and tests that speak the wire protocol directly.

#![allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    rust_2018_idioms
)]

/// `package pluginregistration` (k8s.io/kubelet pluginregistration/v1).
pub mod pluginregistration;

/// `package k8s.io.kubelet.pkg.apis.dra.v1` (kubelet 1.34+).
pub mod dra_v1;

/// `package k8s.io.kubelet.pkg.apis.dra.v1beta1` (kubelet 1.32+).
pub mod dra_v1beta1;

/// `package v1alpha1` (the DRA health API, kubelet 1.34+).
pub mod health_v1alpha1;
