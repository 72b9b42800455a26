//! The liveness watchdog behind `/healthz`: the main loop beats, and every
//! operation that may block (a sysfs read of a GPU in reset can sit in D
//! state) is timed while it runs. Shared with the labeller: see
//! [`ops_http::progress`].

pub use ops_http::progress::{Progress, Running};
