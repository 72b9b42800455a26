//! The StarlingX enabled-plugins file (`enabled_kube_plugins`).
//!
//! Status: skeleton. Parsing, rendering and watching land with their issue.
