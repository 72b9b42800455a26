//! What any kubelet plugin needs below its own protocol, shared by the
//! device-plugin framework (`devplugin-api`), the DRA framework
//! (`dra-api`) and the kubelet emulator:
//!
//! - [`uds`]: gRPC servers and clients over Unix sockets — sockets created
//!   `0600` ([`uds::bind_private`]), connections that accept any
//!   `:authority` ([`uds::incoming`]), dials with the `:authority` a given
//!   kubelet sends, the sweep of a killed process's sockets
//!   ([`uds::remove_refusing`]), the longest socket path
//!   ([`uds::MAX_SOCKET_PATH`]);
//! - [`authority`]: the HPACK-level adapter that lets an h2 server accept
//!   the `:authority` values grpc-go and grpc-core send over Unix sockets;
//! - [`cdi`]: Container Device Interface specs, rendered with the lowest
//!   `cdiVersion` they need and written with `ops_kit::fs`'s atomic writer.
//!
//! Start with [`uds::incoming`] for a server and [`cdi::SpecDir`] for specs.

pub mod authority;
pub mod cdi;
pub mod uds;
