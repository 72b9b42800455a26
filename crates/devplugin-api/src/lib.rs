//! A reusable framework for Kubernetes device plugins (kubelet device plugin
//! API `v1beta1`).
//!
//! This crate will hold the protocol types, the registration and
//! ListAndWatch lifecycle, CDI spec handling and a kubelet emulator for
//! tests. It knows nothing about GPUs: the Intel GPU plugin is one user of
//! it among others.
//!
//! Status: skeleton. The framework lands with its own issue.
