//! Test kit: what many tests of the workspace need, written once. Never a
//! dependency of a shipped crate.
//!
//! - [`until`] / [`wait_blocking`]: poll a condition the test cannot be
//!   told about (another process's state) until it holds or a limit
//!   passes, naming what was awaited. Where an event exists, wait on it
//!   instead.
//! - [`ChildGuard`]: a child process that is killed and reaped when the
//!   test ends, however it ends; [`ChildGuard::stop`] sends SIGTERM and
//!   waits, as a kubelet or systemd stops a daemon.
//! - [`interop_python`]: the Python with `grpcio` the interop tests run as
//!   the independent peer.
//! - [`render_deploy`]: a `deploy/` directory rendered by `kubectl
//!   kustomize`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How often a condition is looked at.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `f` holds, looking every 20 ms, for at most `limit`.
///
/// # Panics
/// When `limit` passes first, naming `what`.
pub async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`until`] for a thread that is not in a runtime.
///
/// # Panics
/// When `limit` passes first, naming `what`.
pub fn wait_blocking(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// A child process that never outlives its test.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Spawns `command`; its stderr goes to the test's when `E2E_LOG` is
    /// set, nowhere otherwise (stdout nowhere).
    ///
    /// # Panics
    /// When it cannot be spawned.
    #[must_use]
    pub fn spawn(command: &mut Command) -> Self {
        let stderr = if std::env::var_os("E2E_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
        Self(child)
    }

    /// The process ID.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then waits for it to exit.
    pub fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    /// SIGKILL and reap: what a crash looks like to everyone else.
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workspace's root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python with `grpcio` and `grpcio-tools` the interop tests run:
/// `DEVPLUGIN_INTEROP_PYTHON`, else `target/ci-venv` (where `cargo xtask
/// ci` installs them). `None`, said on stderr, when there is none.
///
/// # Panics
/// When there is none and `INTEROP_REQUIRED` is set (as `cargo xtask ci`
/// sets it): interop must not be skipped in CI.
#[must_use]
pub fn interop_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("DEVPLUGIN_INTEROP_PYTHON").map_or_else(
        || workspace_root().join("target/ci-venv/bin/python"),
        PathBuf::from,
    );
    let works = Command::new(&candidate)
        .args(["-c", "import grpc, grpc_tools"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Some(candidate);
    }
    let why = format!(
        "no Python with grpcio and grpcio-tools at {} (set DEVPLUGIN_INTEROP_PYTHON, or run `cargo xtask ci test`, which installs them)",
        candidate.display()
    );
    assert!(std::env::var_os("INTEROP_REQUIRED").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

/// `deploy/<dir>` rendered by `kubectl kustomize`.
///
/// # Panics
/// When kubectl is missing or the render fails.
#[must_use]
pub fn render_deploy(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace_root().join("deploy").join(dir))
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render deploy/: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn until_returns_once_it_holds_and_names_what_timed_out() {
        let mut n = 0;
        until("three looks", Duration::from_secs(5), || {
            n += 1;
            n >= 3
        })
        .await;
        let r = tokio::spawn(until("never", Duration::from_millis(50), || false)).await;
        let panic = r.unwrap_err().into_panic();
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("waiting for never"), "{text}");
    }

    #[test]
    fn a_child_does_not_outlive_its_guard() {
        let guard = ChildGuard::spawn(Command::new("sleep").arg("30"));
        let pid = nix::unistd::Pid::from_raw(i32::try_from(guard.id()).unwrap_or(0));
        drop(guard);
        assert!(nix::sys::signal::kill(pid, None).is_err(), "reaped");
    }
}
