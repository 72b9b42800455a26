//! The Intel GPU device plugin: the pure plan (`plan`), the running plugin
//! (`server`), `inspect`, and the command line with the Go plugin's
//! spellings (`cli`). The binary in `main.rs` only wires them up.

pub mod cli;
pub mod inspect;
pub mod plan;
pub mod server;
