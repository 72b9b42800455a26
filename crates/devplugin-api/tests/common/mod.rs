//! Helpers shared by the framework's integration tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // each test crate uses a part

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use devplugin_api::*;

/// Allocates nothing special: one env var naming the devices.
#[derive(Default)]
pub struct Null {
    pub calls: AtomicUsize,
}

impl Plugin for Null {
    fn allocate(&self, request: &AllocateRequest) -> Result<ContainerAllocation, PluginError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let ids: Vec<&str> = request.device_ids.iter().map(DeviceId::as_str).collect();
        let mut a = ContainerAllocation::default();
        a.envs.insert("NULL_DEVICES".into(), ids.join(","));
        Ok(a)
    }

    fn options(&self) -> PluginOptions {
        PluginOptions {
            preferred_allocation: true,
            pre_start_required: false,
        }
    }
}

/// `null-0 … null-(n-1)`, healthy.
pub fn list(n: usize) -> DeviceList {
    DeviceList::new(
        (0..n)
            .map(|i| Device::healthy(DeviceId::new(&format!("null-{i}")).unwrap()))
            .collect(),
    )
    .unwrap()
}

/// Quick retries, a short periodic check.
pub fn config(dir: &Path) -> FrameworkConfig {
    FrameworkConfig::new(dir)
        .backoff(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
        })
        .check_interval(Duration::from_millis(500))
}

pub fn res(name: &str) -> ResourceName {
    ResourceName::new(name).unwrap()
}

/// The socket the framework serves for `handle` in `dir`: there once the
/// resource has left `Starting` (it serves before it registers).
pub async fn plugin_socket(dir: &Path, handle: &ResourceHandle) -> PathBuf {
    let mut status = handle.watch_status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| *s != RegistrationStatus::Starting),
    )
    .await
    .unwrap()
    .unwrap();
    let prefix = format!("{}-", handle.resource().socket_prefix());
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".sock"))
        })
        .unwrap_or_else(|| panic!("no socket for {} in {}", handle.resource(), dir.display()))
        .path()
}

/// A framework in a fresh temporary kubelet directory serving
/// `example.com/null` with three devices, and that resource's socket once
/// it is served. Keep the directory and the handle alive for the test.
pub async fn serve_null() -> (tempfile::TempDir, ResourceHandle, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(
            res("example.com/null"),
            std::sync::Arc::new(Null::default()),
            list(3),
        )
        .unwrap();
    let socket = plugin_socket(dir.path(), &handle).await;
    (dir, handle, socket)
}
