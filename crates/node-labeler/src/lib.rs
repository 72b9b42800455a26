//! Node labels for Intel GPU nodes: the desired labels as a pure function of
//! the GPU inventory and the enabled-plugins decision, and their
//! reconciliation with the Kubernetes Node (owning exactly the labels it
//! sets).
//!
//! Status: skeleton. The labeller lands with its own issue.
