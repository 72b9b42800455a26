//! The generated protocol code (`package v1beta1`), from
//! `proto/deviceplugin_v1beta1.proto` by `cargo xtask codegen`.
//!
//! Users of the framework should not need it: the crate's domain types
//! convert into these messages. It is public for emulators and tests that
//! speak the wire protocol directly.

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

mod v1beta1;

pub use v1beta1::*;
