//! Every socket the frameworks serve is 0600 whatever the umask: only
//! root (the kubelet) connects. Its own test binary, because the umask is
//! per process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::os::unix::fs::PermissionsExt as _;

#[tokio::test]
async fn sockets_are_private_under_a_permissive_umask() {
    // The most permissive umask a container runtime could hand us.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugin.sock");
    let listener = devplugin_api::uds::bind_private(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    // It serves.
    let (_client, accepted) =
        tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
    accepted.unwrap();
    // The same call on a plain bind would have left it 0777.
    let plain = dir.path().join("plain.sock");
    let _l = tokio::net::UnixListener::bind(&plain).unwrap();
    let mode = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777, "the umask really was 0");
}
