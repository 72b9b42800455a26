//! The DRA service through the emulated kubelet (its plugin watcher and
//! its DRA calls), over real Unix sockets in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dra_api::*;
use kubelet_emulator::{ClaimId, KubeletVersion, PluginWatcher};

const DRIVER: &str = "null.example.com";
const LIMIT: Duration = Duration::from_secs(10);

/// Claims as the API server would hold them: (namespace, name) → (uid,
/// allocation results, or None when not allocated).
#[derive(Default)]
struct FakeClaims(Mutex<HashMap<(String, String), Stored>>);

/// A claim's UID and its allocation (None: not allocated).
type Stored = (String, Option<Vec<AllocationResult>>);

impl FakeClaims {
    fn put(&self, name: &str, uid: &str, results: Option<Vec<AllocationResult>>) {
        self.0
            .lock()
            .unwrap()
            .insert(("default".into(), name.into()), (uid.into(), results));
    }
}

impl ClaimSource for FakeClaims {
    async fn allocation(&self, claim: &ClaimRef) -> Result<Vec<AllocationResult>, ClaimError> {
        let found = self
            .0
            .lock()
            .unwrap()
            .get(&(claim.namespace.clone(), claim.name.clone()))
            .cloned();
        let (namespace, name) = (claim.namespace.clone(), claim.name.clone());
        match found {
            None => Err(ClaimError::NotFound { namespace, name }),
            Some((uid, _)) if uid != claim.uid => Err(ClaimError::Replaced {
                namespace,
                name,
                wanted: claim.uid.clone(),
                found: uid,
            }),
            Some((_, None)) => Err(ClaimError::NotAllocated { namespace, name }),
            Some((_, Some(results))) => Ok(results),
        }
    }
}

/// Devices `dev-N`; `broken` fails to prepare.
#[derive(Default)]
struct NullDriver {
    prepared: Mutex<Vec<(String, Vec<String>)>>,
    unprepared: Mutex<Vec<(String, bool)>>,
}

impl Driver for NullDriver {
    fn prepare(
        &self,
        claim: &ClaimRef,
        devices: &[Allocated],
    ) -> Result<Vec<PreparedDevice>, DriverError> {
        if devices.iter().any(|d| d.device == "broken") {
            return Err(DriverError("device broken is on fire".into()));
        }
        self.prepared.lock().unwrap().push((
            claim.uid.clone(),
            devices.iter().map(|d| d.device.clone()).collect(),
        ));
        Ok(devices
            .iter()
            .map(|d| PreparedDevice {
                requests: vec![d.request.clone()],
                pool: d.pool.clone(),
                device: d.device.clone(),
                cdi_device_ids: vec![format!("example.com/null={}-{}", claim.uid, d.device)],
            })
            .collect())
    }

    fn unprepare(
        &self,
        claim: &ClaimRef,
        prepared: Option<&PreparedClaim>,
    ) -> Result<(), DriverError> {
        self.unprepared
            .lock()
            .unwrap()
            .push((claim.uid.clone(), prepared.is_some()));
        Ok(())
    }
}

fn result(driver: &str, request: &str, device: &str) -> AllocationResult {
    AllocationResult {
        request: request.into(),
        driver: driver.into(),
        pool: "node-0".into(),
        device: device.into(),
    }
}

fn id(name: &str, uid: &str) -> ClaimId {
    ClaimId {
        namespace: "default".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

struct Node {
    dir: tempfile::TempDir,
    watcher: PluginWatcher,
    driver: Arc<NullDriver>,
    claims: Arc<FakeClaims>,
}

impl Node {
    fn new(version: KubeletVersion) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let watcher = PluginWatcher::start(&dir.path().join("plugins_registry"), version).unwrap();
        Self {
            dir,
            watcher,
            driver: Arc::default(),
            claims: Arc::default(),
        }
    }

    fn endpoint(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join("plugins")
            .join(DRIVER)
            .join("dra.sock")
    }

    fn checkpoint(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join("plugins")
            .join(DRIVER)
            .join("prepared-claims.json")
    }

    /// The driver as its binary starts it: the service, then the
    /// registration.
    async fn start_driver(&self) -> (DraServer, Registrar) {
        let name = DriverName::new(DRIVER).unwrap();
        let server = DraServer::start(
            DraConfig::new(name.clone(), self.endpoint(), self.checkpoint()),
            Arc::clone(&self.driver),
            Arc::clone(&self.claims),
        )
        .unwrap();
        let registrar = Registrar::start(RegistrarConfig::new(
            name,
            self.dir.path().join("plugins_registry"),
            self.endpoint(),
        ))
        .unwrap();
        let mut status = registrar.watch_status();
        tokio::time::timeout(
            LIMIT,
            status.wait_for(|s| *s == RegistrationState::Registered),
        )
        .await
        .unwrap()
        .unwrap();
        (server, registrar)
    }
}

fn cdi(answer: &kubelet_emulator::ClaimAnswer) -> Vec<String> {
    answer
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|d| d.cdi_device_ids.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_and_unprepare_through_each_service_version_idempotently() {
    for version in [KubeletVersion::V1_32, KubeletVersion::V1_34] {
        let node = Node::new(version);
        node.claims.put(
            "gpu",
            "uid-1",
            Some(vec![
                result(DRIVER, "gpus/fast", "dev-0"),
                result("other.example.com", "nic", "nic-0"),
                result(DRIVER, "gpus/slow", "dev-1"),
            ]),
        );
        let (server, registrar) = node.start_driver().await;
        let answers = node
            .watcher
            .prepare(DRIVER, &[id("gpu", "uid-1")])
            .await
            .unwrap();
        let devices = answers["uid-1"].as_ref().unwrap();
        let names: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(
            names,
            ["dev-0", "dev-1"],
            "{version:?}: only our driver's results"
        );
        assert_eq!(devices[0].requests, ["gpus"], "a subrequest's main request");
        assert_eq!(
            cdi(&answers["uid-1"]),
            [
                "example.com/null=uid-1-dev-0",
                "example.com/null=uid-1-dev-1"
            ]
        );
        // Again: the same answer, the driver not asked twice.
        let again = node
            .watcher
            .prepare(DRIVER, &[id("gpu", "uid-1")])
            .await
            .unwrap();
        assert_eq!(again, answers);
        assert_eq!(node.driver.prepared.lock().unwrap().len(), 1);
        // Unprepared with what was recorded; again: still a success.
        let done = node
            .watcher
            .unprepare(DRIVER, &[id("gpu", "uid-1")])
            .await
            .unwrap();
        assert_eq!(done["uid-1"], Ok(()));
        let done = node
            .watcher
            .unprepare(DRIVER, &[id("gpu", "uid-1")])
            .await
            .unwrap();
        assert_eq!(done["uid-1"], Ok(()));
        assert_eq!(
            *node.driver.unprepared.lock().unwrap(),
            [("uid-1".to_owned(), true), ("uid-1".to_owned(), false)]
        );
        registrar.stop().await;
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_claim_gets_its_own_error_and_the_rest_are_prepared() {
    let node = Node::new(KubeletVersion::V1_34);
    node.claims
        .put("good", "uid-good", Some(vec![result(DRIVER, "r", "dev-0")]));
    node.claims.put(
        "replaced",
        "uid-new",
        Some(vec![result(DRIVER, "r", "dev-1")]),
    );
    node.claims.put("pending", "uid-pending", None);
    node.claims.put(
        "theirs",
        "uid-theirs",
        Some(vec![result("other.example.com", "r", "x")]),
    );
    node.claims.put(
        "burning",
        "uid-burning",
        Some(vec![result(DRIVER, "r", "broken")]),
    );
    let (server, registrar) = node.start_driver().await;
    let answers = node
        .watcher
        .prepare(
            DRIVER,
            &[
                id("good", "uid-good"),
                id("missing", "uid-missing"),
                id("replaced", "uid-old"),
                id("pending", "uid-pending"),
                id("theirs", "uid-theirs"),
                id("burning", "uid-burning"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        cdi(&answers["uid-good"]),
        ["example.com/null=uid-good-dev-0"]
    );
    for (uid, want) in [
        ("uid-missing", "default/missing does not exist"),
        ("uid-old", "has UID uid-new, not uid-old"),
        ("uid-pending", "is not allocated"),
        ("uid-theirs", "has no device of driver null.example.com"),
        ("uid-burning", "device broken is on fire"),
    ] {
        let e = answers[uid].as_ref().unwrap_err();
        assert!(e.contains(want), "{uid}: {e}");
    }
    // Nothing failed was recorded: a later prepare asks again.
    let (c, _) = dra_api::checkpoint::Checkpoint::load(&node.checkpoint()).unwrap();
    assert_eq!(c.claims().keys().collect::<Vec<_>>(), ["uid-good"]);
    registrar.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_claims_survive_a_driver_restart_and_a_kubelet_restart() {
    let mut node = Node::new(KubeletVersion::V1_34);
    node.claims
        .put("gpu", "uid-1", Some(vec![result(DRIVER, "r", "dev-0")]));
    let (server, registrar) = node.start_driver().await;
    let first = node
        .watcher
        .prepare(DRIVER, &[id("gpu", "uid-1")])
        .await
        .unwrap();
    registrar.stop().await;
    server.stop().await;
    node.watcher
        .wait_until(LIMIT, |v| v.plugins.is_empty())
        .await
        .unwrap();
    // The claim is deleted from the API server meanwhile: the record is
    // what counts.
    node.claims.0.lock().unwrap().clear();
    let (server, registrar) = node.start_driver().await;
    node.watcher.restart().await.unwrap();
    node.watcher
        .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
        .await
        .unwrap();
    let again = node
        .watcher
        .prepare(DRIVER, &[id("gpu", "uid-1")])
        .await
        .unwrap();
    assert_eq!(again, first, "answered from the checkpoint");
    let done = node
        .watcher
        .unprepare(DRIVER, &[id("gpu", "uid-1")])
        .await
        .unwrap();
    assert_eq!(done["uid-1"], Ok(()));
    assert_eq!(
        *node.driver.unprepared.lock().unwrap(),
        [("uid-1".to_owned(), true)],
        "unprepared with what the previous instance prepared"
    );
    registrar.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_set_aside_and_the_driver_still_serves() {
    let node = Node::new(KubeletVersion::V1_34);
    std::fs::create_dir_all(node.checkpoint().parent().unwrap()).unwrap();
    std::fs::write(node.checkpoint(), "{\"version\": 1, \"claims\": {").unwrap();
    node.claims
        .put("gpu", "uid-1", Some(vec![result(DRIVER, "r", "dev-0")]));
    let (server, registrar) = node.start_driver().await;
    assert!(matches!(
        server.checkpoint_loaded(),
        dra_api::checkpoint::Loaded::Corrupt { .. }
    ));
    let aside = Path::new(&format!("{}.corrupt", node.checkpoint().display())).to_owned();
    assert!(aside.exists(), "kept for the operator");
    let answers = node
        .watcher
        .prepare(DRIVER, &[id("gpu", "uid-1")])
        .await
        .unwrap();
    assert!(answers["uid-1"].is_ok());
    registrar.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_streams_the_whole_list_at_once_and_on_every_change() {
    use dra_api::health::{DeviceHealth, HealthEntry};
    let node = Node::new(KubeletVersion::V1_34);
    let (server, registrar) = node.start_driver().await;
    let entry = |device: &str, health| HealthEntry {
        pool: "node-0".into(),
        device: device.into(),
        health,
        message: String::new(),
    };
    server.publish_health(vec![
        entry("dev-0", DeviceHealth::Healthy),
        entry("dev-1", DeviceHealth::Healthy),
    ]);
    let mut watch = tokio::time::timeout(LIMIT, node.watcher.watch_health(DRIVER))
        .await
        .expect("the stream opens")
        .unwrap();
    let first = tokio::time::timeout(LIMIT, watch.next())
        .await
        .expect("a first list at once")
        .unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|d| d.health == "HEALTHY"));
    let mut sick = entry("dev-1", DeviceHealth::Unhealthy);
    sick.message = "x".repeat(2000);
    server.publish_health(vec![entry("dev-0", DeviceHealth::Healthy), sick]);
    let next = tokio::time::timeout(LIMIT, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next[1].health, "UNHEALTHY");
    assert_eq!(next[1].message.len(), 1024, "at most 1024 characters");
    // Kubelets before 1.34 have no health stream.
    let old = PluginWatcher::start(&node.dir.path().join("other"), KubeletVersion::V1_32).unwrap();
    assert!(old.watch_health(DRIVER).await.is_err());
    registrar.stop().await;
    server.stop().await;
}
