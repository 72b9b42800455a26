//! Interop with an independent gRPC implementation: Python `grpcio`
//! (grpc-core) as the kubelet's client, and as a kubelet's Registration
//! server that dials the plugin back inside `Register`.
//!
//! Python with `grpcio` and `grpcio-tools` is taken from
//! `DEVPLUGIN_INTEROP_PYTHON`, else from `target/ci-venv` (where `cargo
//! xtask ci` installs them). Without it the tests say so and pass, unless
//! `INTEROP_REQUIRED` is set, as `cargo xtask ci` sets it: then they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Null, config, list, res, serve_null};
use devplugin_api::Framework;
use serde_json::Value;

const MODES: [&str; 4] = ["default", "raw", "percent", "localhost"];

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/grpc_peer.py")
}

/// The Python to run, or None (with the reason printed) when there is none.
fn python() -> Option<PathBuf> {
    test_support::interop_python()
}

fn lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// What grpc-core sends as `:authority` for a `unix:` target by default:
/// captured from the wire, it is one that h2 refuses, so the other tests
/// exercise the adapter rather than pass around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_default_authority_is_one_plain_h2_refuses() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("capture.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut child = Command::new(&py)
        .arg(peer_script())
        .args(["client", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let authority = tokio::task::spawn_blocking(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // SETTINGS
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface).unwrap();
        let mut decoder = loona_hpack::Decoder::new();
        loop {
            let mut h = [0u8; 9];
            conn.read_exact(&mut h).unwrap();
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let mut payload = vec![0; len];
            conn.read_exact(&mut payload).unwrap();
            if h[3] == 0x1 {
                assert_eq!(h[4] & 0x2c, 0x04, "one unpadded HEADERS frame expected");
                let fields = decoder.decode(&payload).unwrap();
                return fields
                    .into_iter()
                    .find(|(n, _)| n == b":authority")
                    .map(|(_, v)| v);
            }
        }
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let authority = authority.expect("grpcio sends an :authority");
    eprintln!(
        "grpcio's default :authority: {}",
        String::from_utf8_lossy(&authority)
    );
    assert!(
        http::uri::Authority::try_from(authority.as_slice()).is_err(),
        "{:?} would pass h2 unchanged",
        String::from_utf8_lossy(&authority)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_calls_every_rpc_with_every_authority() {
    let Some(py) = python() else { return };
    let (_dir, handle, socket) = serve_null().await;
    for mode in MODES {
        let mut cmd = Command::new(&py);
        cmd.arg(peer_script())
            .args(["client", "--authority", mode, "--socket"])
            .arg(&socket);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let results = lines(&out.stdout);
        let rpcs: Vec<&str> = results.iter().map(|r| r["rpc"].as_str().unwrap()).collect();
        assert_eq!(
            rpcs,
            [
                "GetDevicePluginOptions",
                "ListAndWatch",
                "GetPreferredAllocation",
                "Allocate",
                "PreStartContainer"
            ]
        );
        for r in &results {
            assert_eq!(r["ok"], true, "{mode}: {r}");
        }
        assert_eq!(results[0]["value"]["preferred"], true);
        assert_eq!(
            results[1]["value"],
            serde_json::json!(["null-0", "null-1", "null-2"])
        );
        let preferred = results[2]["value"].as_array().unwrap();
        assert_eq!(preferred.len(), 2);
        assert!(
            preferred.contains(&Value::from("null-2")),
            "{mode}: must_include ignored"
        );
        assert_eq!(results[3]["value"]["NULL_DEVICES"], "null-1");
    }
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_a_grpcio_kubelet_that_dials_back_inside_register() {
    let Some(py) = python() else { return };
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(&py)
            .arg(peer_script())
            .args(["registration", "--authority", mode, "--count", "1", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str::<Value>(&line).unwrap());
            }
        });
        let serving = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(serving["event"], "serving", "{mode}: {serving}");
        let fw = Framework::new(config(dir.path()));
        let handle = fw
            .serve(res("example.com/null"), Arc::new(Null::default()), list(3))
            .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event["event"], "registered", "{mode}: {event}");
        assert_eq!(event["resource"], "example.com/null");
        assert_eq!(event["version"], "v1beta1");
        assert_eq!(event["preferred"], true);
        assert_eq!(
            event["devices"],
            serde_json::json!(["null-0", "null-1", "null-2"])
        );
        let mut status = handle.watch_status();
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| s.is_registered()),
        )
        .await
        .unwrap()
        .unwrap();
        handle.stop().await;
        drop(stdin);
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "{mode}: the Python kubelet exited {exit}");
    }
}
