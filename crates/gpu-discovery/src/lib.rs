//! Discovery of Intel GPUs (kernel drivers `i915` and `xe`) from sysfs and
//! devfs trees whose roots are parameters.
//!
//! This crate will hold the GPU inventory (every DRM card with its state and
//! the reason it is or is not advertised), the advertisable-GPU predicate
//! shared by the device plugin and the node labeller, a hotplug watcher and
//! a test kit that builds fake node trees. It never talks to the API server.
//!
//! Status: skeleton. The inventory lands with its own issue.
