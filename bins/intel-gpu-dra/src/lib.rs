//! The Intel GPU DRA driver (`gpu.intel.com`) on `dra-api` and
//! `gpu-discovery`: the same cards as the device plugin, published as
//! ResourceSlices with Intel's DRA driver's names and attributes, shared
//! through consumable capacity where the cluster supports it, a PF and
//! its VFs kept apart by counters, health as device taints. See
//! `docs/dra.md`.

pub mod cli;
pub mod devices;
pub mod prepare;
pub mod run;
