//! The example driver end to end: the real binary against the emulated
//! kubelet (plugin watcher and DRA calls, 1.32 and 1.34) and the emulated
//! API server (Node, ResourceSlices, ResourceClaims).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;
use std::process::Command;

use std::time::Duration;
use test_support::ChildGuard;

use apiserver_emulator::ApiServer;
use kubelet_emulator::{ClaimId, KubeletVersion, PluginWatcher};

const BIN: &str = env!("CARGO_BIN_EXE_null-dra");
const NODE: &str = "worker-0";
const DRIVER: &str = "null.example.com";
const LIMIT: Duration = Duration::from_secs(15);

struct Driver(ChildGuard);

impl Driver {
    fn start(dir: &Path) -> Self {
        let mut command = Command::new(BIN);
        let command = command
            .args(["--node-name", NODE, "--devices", "3", "--kubeconfig"])
            .arg(dir.join("kubeconfig"))
            .arg("--registry-dir")
            .arg(dir.join("plugins_registry"))
            .arg("--plugin-dir")
            .arg(dir.join("plugins").join(DRIVER))
            .arg("--cdi-dir")
            .arg(dir.join("cdi"));
        Self(ChildGuard::spawn(command))
    }

    /// SIGTERM, then waits for it to exit.
    fn stop(self) {
        self.0.stop();
    }
}

async fn until(what: &str, f: impl FnMut() -> bool) {
    test_support::until(what, LIMIT, f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_publishes_prepares_and_survives_restarts() {
    for version in [KubeletVersion::V1_32, KubeletVersion::V1_34] {
        let dir = tempfile::tempdir().unwrap();
        let api = ApiServer::start().await.unwrap();
        api.add_node(NODE);
        std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
        let mut kubelet =
            PluginWatcher::start(&dir.path().join("plugins_registry"), version).unwrap();
        let driver = Driver::start(dir.path());
        let v = kubelet
            .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
            .await
            .unwrap();
        let want = if version == KubeletVersion::V1_32 {
            "v1beta1.DRAPlugin"
        } else {
            "v1.DRAPlugin"
        };
        assert_eq!(v.plugins[DRIVER].service, want);
        until("slices published", || {
            api.resource_slices().values().any(|s| {
                s["spec"]["devices"]
                    .as_array()
                    .is_some_and(|d| d.len() == 3)
            })
        })
        .await;

        // A pod's claim, allocated null-1 by the (stand-in) scheduler.
        let uid = api.create_resource_claim("default", "pod-gpu", serde_json::json!({}));
        assert!(api.allocate_resource_claim(
            "default",
            "pod-gpu",
            &[("gpu", DRIVER, NODE, "null-1")]
        ));
        let claim = ClaimId {
            namespace: "default".into(),
            name: "pod-gpu".into(),
            uid: uid.clone(),
        };
        let answers = kubelet
            .prepare(DRIVER, std::slice::from_ref(&claim))
            .await
            .unwrap();
        let devices = answers[&uid].as_ref().unwrap();
        assert_eq!(devices[0].device, "null-1");
        assert_eq!(
            devices[0].cdi_device_ids,
            [format!("example.com/null={uid}-null-1")]
        );
        let spec = dir.path().join(format!("cdi/{DRIVER}-claim_{uid}.json"));
        let text = std::fs::read_to_string(&spec).unwrap();
        assert!(text.contains("NULL_DEVICE_NULL_1=1"), "{text}");

        // The kubelet restarts (and wipes the node's slices): registered
        // again, slices back, the claim still prepared.
        kubelet.restart().await.unwrap();
        api.wipe_resource_slices(NODE, None);
        kubelet
            .wait_until(LIMIT, |v| v.registrations_of(DRIVER) == 2)
            .await
            .unwrap();
        let again = kubelet
            .prepare(DRIVER, std::slice::from_ref(&claim))
            .await
            .unwrap();
        assert_eq!(again, answers);

        // The driver restarts with the claim prepared; the claim is gone
        // from the API meanwhile. Unprepare still finds what to undo.
        driver.stop();
        kubelet
            .wait_until(LIMIT, |v| !v.plugins.contains_key(DRIVER))
            .await
            .unwrap();
        api.delete_resource_claim("default", "pod-gpu");
        // A spec no checkpointed claim owns (a prepare killed before its
        // record): removed at start; the prepared claim's stays.
        let stale = dir.path().join(format!(
            "cdi/{DRIVER}-claim_99999999-9999-4999-8999-999999999999.json"
        ));
        std::fs::write(&stale, "{}").unwrap();
        let _driver = Driver::start(dir.path());
        kubelet
            .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
            .await
            .unwrap();
        until("slices put back", || !api.resource_slices().is_empty()).await;
        assert!(!stale.exists(), "the stale spec is removed");
        assert!(spec.exists(), "the prepared claim's spec stays");
        let done = kubelet
            .unprepare(DRIVER, std::slice::from_ref(&claim))
            .await
            .unwrap();
        assert_eq!(done[&uid], Ok(()));
        assert!(!spec.exists(), "the claim's CDI spec is removed");
    }
}
