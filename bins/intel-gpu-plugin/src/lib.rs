//! The Intel GPU device plugin: the pure plan (`plan`), the running plugin
//! (`server`, with the CDI specs it keeps in `cdi_keeper`, hwmon readings in
//! `temps` and the liveness watchdog in `progress`), `inspect`, and the
//! command line with the Go plugin's spellings (`cli`). The binary in
//! `main.rs` only wires them up.

pub mod cdi_keeper;
pub mod cli;
pub mod inspect;
pub mod plan;
pub mod progress;
pub mod server;
pub mod temps;
