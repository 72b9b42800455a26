//! Interop with an independent gRPC implementation: Python `grpcio` as the
//! kubelet's plugin watcher, calling `GetInfo` and
//! `NotifyRegistrationStatus` on the registration socket with every
//! `:authority` a client sends, grpc-core's own default included.
//!
//! Python with `grpcio` and `grpcio-tools` is taken from
//! `DEVPLUGIN_INTEROP_PYTHON`, else from `target/ci-venv` (where `cargo
//! xtask ci` installs them). Without it the test says so and passes, unless
//! `INTEROP_REQUIRED` is set, as `cargo xtask ci` sets it: then it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dra_api::*;

fn python() -> Option<PathBuf> {
    test_support::interop_python()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_plugin_watcher_registers_us_with_every_authority() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let endpoint = dir.path().join("plugins/gpu.example.com/dra.sock");
    let registrar = Registrar::start(RegistrarConfig::new(
        DriverName::new("gpu.example.com").unwrap(),
        dir.path().join("plugins_registry"),
        &endpoint,
    ))
    .unwrap();
    let mut status = registrar.watch_status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| *s == RegistrationStatus::WaitingForKubelet),
    )
    .await
    .unwrap()
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/registration_peer.py");
    for mode in ["default", "raw", "percent", "localhost"] {
        let mut cmd = Command::new(&py);
        cmd.arg(&script)
            .args(["watcher", "--authority", mode, "--socket"])
            .arg(registrar.socket());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{mode}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v["ok"], true, "{mode}: {v}");
        assert_eq!(v["type"], "DRAPlugin");
        assert_eq!(v["name"], "gpu.example.com");
        assert_eq!(v["endpoint"], endpoint.to_string_lossy().as_ref());
        assert_eq!(
            v["versions"],
            serde_json::json!(["v1.DRAPlugin", "v1beta1.DRAPlugin"])
        );
        assert_eq!(registrar.status(), RegistrationStatus::Registered, "{mode}");
    }
    registrar.stop().await;
}
