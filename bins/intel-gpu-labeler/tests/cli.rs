//! The command line answers `--version` and `--help`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_intel-gpu-labeler");

#[test]
fn version_names_binary_and_crate_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!("intel-gpu-labeler {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_exits_zero_and_describes_the_binary() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Usage: intel-gpu-labeler"), "{text}");
}

#[test]
fn unknown_flag_exits_2() {
    let out = Command::new(BIN).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
