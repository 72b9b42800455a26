//! The null-plugin example, as a process, against the kubelet emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use kubelet_emulator::{EmulatorError, KubeletEmulator, KubeletVersion};

/// `cargo test` builds the examples next to the test binaries' directory.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir.join("examples/null-plugin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_plugin_serves_allocates_and_exits_cleanly_on_sigterm() {
    for version in KubeletVersion::ALL {
        null_plugin_against(version).await;
    }
}

async fn null_plugin_against(version: KubeletVersion) {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start_as(dir.path(), version)
        .await
        .unwrap();
    let mut child = Command::new(example())
        .args([
            "--kubelet-dir",
            dir.path().to_str().unwrap(),
            "--resource",
            "example.com/null",
            "--count",
            "3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the null-plugin example is built by cargo test");
    let view = kubelet
        .wait_until(Duration::from_secs(20), |v| {
            v.devices("example.com/null")
                .is_some_and(|d| d.devices().len() == 3)
        })
        .await
        .unwrap();
    let socket = dir
        .path()
        .join(&view.resources["example.com/null"].endpoint);

    let ok = kubelet
        .allocate("example.com/null", &["null-1"])
        .await
        .unwrap();
    assert_eq!(ok.envs["NULL_DEVICES"], "null-1");
    let preferred = kubelet
        .preferred(
            "example.com/null",
            &["null-0", "null-1", "null-2"],
            &["null-2"],
            2,
        )
        .await
        .unwrap();
    assert_eq!(preferred, ["null-2", "null-0"]);
    let err = kubelet
        .allocate("example.com/null", &["null-7"])
        .await
        .unwrap_err();
    let EmulatorError::Rpc(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("null-7"));
    // The kubelet drops the stream and stays up: the plugin registers again.
    assert!(kubelet.end_stream("example.com/null"));
    kubelet
        .wait_until(Duration::from_secs(10), |v| {
            v.registrations("example.com/null") == 2 && v.is_connected("example.com/null")
        })
        .await
        .unwrap_or_else(|e| panic!("{version:?}: {e}"));

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the example did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket is removed on SIGTERM");
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(example())
        .args(["--count", "x", "--kubelet-dir", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(example())
        .args(["--kubelet-dir", "/tmp", "--resource", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid resource name"));
}
