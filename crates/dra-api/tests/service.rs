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
    ) -> Result<Vec<DevicePrepared>, DriverError> {
        if devices.iter().any(|d| d.device == "broken") {
            return Err(DriverError("device broken is on fire".into()));
        }
        self.prepared.lock().unwrap().push((
            claim.uid.clone(),
            devices.iter().map(|d| d.device.clone()).collect(),
        ));
        Ok(devices
            .iter()
            .map(|d| DevicePrepared {
                requests: vec![d.request.clone()],
                pool: d.pool.clone(),
                device: d.device.clone(),
                edits: kubelet_plumbing::cdi::ContainerEdits {
                    env: vec![format!("NULL={}", d.device)],
                    ..Default::default()
                },
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

    fn cdi_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("cdi")
    }

    fn specs(&self) -> dra_api::cdi::ClaimSpecs {
        dra_api::cdi::ClaimSpecs::new(
            self.cdi_dir(),
            "example.com/null",
            "null.example.com-claim_",
        )
    }

    fn checkpoint(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join("plugins")
            .join(DRIVER)
            .join("prepared-claims.json")
    }

    /// The driver goes away without a clean stop, as after a kill -9; the
    /// kubelet sees it gone.
    async fn crash(&self, server: DraServer, registrar: Registrar) {
        drop(registrar);
        drop(server);
        self.watcher
            .wait_until(LIMIT, |v| v.plugins.is_empty())
            .await
            .unwrap();
    }

    /// The kubelet restarts and registers the driver again.
    async fn kubelet_restarts(&mut self) {
        self.watcher.restart().await.unwrap();
        self.watcher
            .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
            .await
            .unwrap();
    }

    /// The driver as its binary starts it: the service, then the
    /// registration.
    async fn start_driver(&self) -> (DraServer, Registrar) {
        self.start(None).await
    }

    /// The same, in a given boot.
    async fn start_driver_in_boot(&self, boot: &str) -> (DraServer, Registrar) {
        self.start(Some(boot)).await
    }

    async fn start(&self, boot: Option<&str>) -> (DraServer, Registrar) {
        let name = DriverName::new(DRIVER).unwrap();
        let mut config = DraConfig::new(
            name.clone(),
            self.endpoint(),
            self.checkpoint(),
            self.specs(),
        );
        if let Some(boot) = boot {
            config = config.boot_id(boot);
        }
        let server =
            DraServer::start(config, Arc::clone(&self.driver), Arc::clone(&self.claims)).unwrap();
        let registrar = Registrar::start(RegistrarConfig::new(
            name,
            self.dir.path().join("plugins_registry"),
            self.endpoint(),
        ))
        .unwrap();
        let mut status = registrar.watch_status();
        tokio::time::timeout(
            LIMIT,
            status.wait_for(|s| *s == RegistrationStatus::Registered),
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
            "00000000-0000-4000-8000-000000000001",
            Some(vec![
                result(DRIVER, "gpus/fast", "dev-0"),
                result("other.example.com", "nic", "nic-0"),
                result(DRIVER, "gpus/slow", "dev-1"),
            ]),
        );
        let (server, registrar) = node.start_driver().await;
        let answers = node
            .watcher
            .prepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
            .await
            .unwrap();
        let devices = answers["00000000-0000-4000-8000-000000000001"]
            .as_ref()
            .unwrap();
        let names: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(
            names,
            ["dev-0", "dev-1"],
            "{version:?}: only our driver's results"
        );
        assert_eq!(devices[0].requests, ["gpus"], "a subrequest's main request");
        assert_eq!(
            cdi(&answers["00000000-0000-4000-8000-000000000001"]),
            [
                "example.com/null=00000000-0000-4000-8000-000000000001-dev-0",
                "example.com/null=00000000-0000-4000-8000-000000000001-dev-1"
            ]
        );
        // Again: the same answer, the driver not asked twice.
        let again = node
            .watcher
            .prepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
            .await
            .unwrap();
        assert_eq!(again, answers);
        assert_eq!(node.driver.prepared.lock().unwrap().len(), 1);
        // Unprepared with what was recorded; again: still a success.
        let done = node
            .watcher
            .unprepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
            .await
            .unwrap();
        assert_eq!(done["00000000-0000-4000-8000-000000000001"], Ok(()));
        let done = node
            .watcher
            .unprepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
            .await
            .unwrap();
        assert_eq!(done["00000000-0000-4000-8000-000000000001"], Ok(()));
        assert_eq!(
            *node.driver.unprepared.lock().unwrap(),
            [
                ("00000000-0000-4000-8000-000000000001".to_owned(), true),
                ("00000000-0000-4000-8000-000000000001".to_owned(), false)
            ]
        );
        registrar.stop().await;
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_claim_gets_its_own_error_and_the_rest_are_prepared() {
    let node = Node::new(KubeletVersion::V1_34);
    node.claims.put(
        "good",
        "00000000-0000-4000-8000-000000000002",
        Some(vec![result(DRIVER, "r", "dev-0")]),
    );
    node.claims.put(
        "replaced",
        "00000000-0000-4000-8000-000000000003",
        Some(vec![result(DRIVER, "r", "dev-1")]),
    );
    node.claims
        .put("pending", "00000000-0000-4000-8000-000000000004", None);
    node.claims.put(
        "theirs",
        "00000000-0000-4000-8000-000000000005",
        Some(vec![result("other.example.com", "r", "x")]),
    );
    node.claims.put(
        "burning",
        "00000000-0000-4000-8000-000000000006",
        Some(vec![result(DRIVER, "r", "broken")]),
    );
    let (server, registrar) = node.start_driver().await;
    let answers = node
        .watcher
        .prepare(
            DRIVER,
            &[
                id("good", "00000000-0000-4000-8000-000000000002"),
                id("missing", "00000000-0000-4000-8000-000000000007"),
                id("replaced", "00000000-0000-4000-8000-000000000008"),
                id("pending", "00000000-0000-4000-8000-000000000004"),
                id("theirs", "00000000-0000-4000-8000-000000000005"),
                id("burning", "00000000-0000-4000-8000-000000000006"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        cdi(&answers["00000000-0000-4000-8000-000000000002"]),
        ["example.com/null=00000000-0000-4000-8000-000000000002-dev-0"]
    );
    for (uid, want) in [
        (
            "00000000-0000-4000-8000-000000000007",
            "default/missing does not exist",
        ),
        (
            "00000000-0000-4000-8000-000000000008",
            "has UID 00000000-0000-4000-8000-000000000003, not 00000000-0000-4000-8000-000000000008",
        ),
        ("00000000-0000-4000-8000-000000000004", "is not allocated"),
        (
            "00000000-0000-4000-8000-000000000005",
            "has no device of driver null.example.com",
        ),
        (
            "00000000-0000-4000-8000-000000000006",
            "device broken is on fire",
        ),
    ] {
        let e = answers[uid].as_ref().unwrap_err();
        assert!(e.contains(want), "{uid}: {e}");
    }
    // Nothing failed was recorded: a later prepare asks again.
    let (c, _) = dra_api::checkpoint::Checkpoint::load(&node.checkpoint()).unwrap();
    assert_eq!(
        c.claims().keys().collect::<Vec<_>>(),
        ["00000000-0000-4000-8000-000000000002"]
    );
    registrar.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_claims_survive_a_driver_restart_and_a_kubelet_restart() {
    let mut node = Node::new(KubeletVersion::V1_34);
    node.claims.put(
        "gpu",
        "00000000-0000-4000-8000-000000000001",
        Some(vec![result(DRIVER, "r", "dev-0")]),
    );
    let (server, registrar) = node.start_driver().await;
    let first = node
        .watcher
        .prepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
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
        .prepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
        .await
        .unwrap();
    assert_eq!(again, first, "answered from the checkpoint");
    let done = node
        .watcher
        .unprepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
        .await
        .unwrap();
    assert_eq!(done["00000000-0000-4000-8000-000000000001"], Ok(()));
    assert_eq!(
        *node.driver.unprepared.lock().unwrap(),
        [("00000000-0000-4000-8000-000000000001".to_owned(), true)],
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
    node.claims.put(
        "gpu",
        "00000000-0000-4000-8000-000000000001",
        Some(vec![result(DRIVER, "r", "dev-0")]),
    );
    let (server, registrar) = node.start_driver().await;
    assert!(matches!(
        server.checkpoint_loaded(),
        dra_api::checkpoint::Loaded::Corrupt { .. }
    ));
    let aside = Path::new(&format!("{}.corrupt", node.checkpoint().display())).to_owned();
    assert!(aside.exists(), "kept for the operator");
    let answers = node
        .watcher
        .prepare(DRIVER, &[id("gpu", "00000000-0000-4000-8000-000000000001")])
        .await
        .unwrap();
    assert!(answers["00000000-0000-4000-8000-000000000001"].is_ok());
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

/// Every CDI name in the answer resolves to a device of a spec file on
/// disk (what the container runtime does before it starts the container).
fn resolves_on_disk(node: &Node, answer: &kubelet_emulator::ClaimAnswer) {
    let mut on_disk = Vec::new();
    for entry in std::fs::read_dir(node.cdi_dir()).unwrap() {
        let text = std::fs::read(entry.unwrap().path()).unwrap();
        let spec = kubelet_plumbing::cdi::Spec::from_json(&text).unwrap();
        on_disk.extend(
            spec.devices
                .iter()
                .map(|d| format!("{}={}", spec.kind, d.name)),
        );
    }
    let names = cdi(answer);
    assert!(!names.is_empty());
    for name in names {
        assert!(
            on_disk.contains(&name),
            "{name} not in a spec on disk: {on_disk:?}"
        );
    }
}

const UID_A: &str = "0000000a-0000-4000-8000-00000000000a";
const UID_B: &str = "0000000b-0000-4000-8000-00000000000b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_that_empties_the_cdi_directory_loses_no_spec() {
    let mut node = Node::new(KubeletVersion::V1_34);
    node.claims
        .put("a", UID_A, Some(vec![result(DRIVER, "r", "dev-0")]));
    let (server, registrar) = node.start_driver().await;
    let first = node
        .watcher
        .prepare(DRIVER, &[id("a", UID_A)])
        .await
        .unwrap();
    resolves_on_disk(&node, &first[UID_A]);
    // While it runs: someone removes the spec; the next answer from the
    // record writes it first.
    std::fs::remove_dir_all(node.cdi_dir()).unwrap();
    let again = node
        .watcher
        .prepare(DRIVER, &[id("a", UID_A)])
        .await
        .unwrap();
    assert_eq!(again, first);
    resolves_on_disk(&node, &again[UID_A]);
    // A reboot: the driver dies without stopping (kill -9), /var/run/cdi
    // (a tmpfs) comes back empty, the checkpoint (on disk) stays, the
    // kubelet restarts and prepares its pods' claims again.
    node.crash(server, registrar).await;
    std::fs::remove_dir_all(node.cdi_dir()).unwrap();
    node.claims.0.lock().unwrap().clear();
    let (server, registrar) = node.start_driver().await;
    assert_eq!(server.start_report().rewritten, [UID_A], "written at start");
    std::fs::remove_dir_all(node.cdi_dir()).unwrap();
    node.kubelet_restarts().await;
    let after = node
        .watcher
        .prepare(DRIVER, &[id("a", UID_A)])
        .await
        .unwrap();
    assert_eq!(after, first, "the record's answer");
    resolves_on_disk(&node, &after[UID_A]);
    assert_eq!(
        node.driver.prepared.lock().unwrap().len(),
        1,
        "not prepared again"
    );
    registrar.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_corrupt_checkpoint_is_rebuilt_from_the_specs_and_nothing_is_swept() {
    for lose in ["corrupt", "missing"] {
        let mut node = Node::new(KubeletVersion::V1_34);
        node.claims
            .put("a", UID_A, Some(vec![result(DRIVER, "r", "dev-0")]));
        node.claims
            .put("b", UID_B, Some(vec![result(DRIVER, "r", "dev-1")]));
        let (server, registrar) = node.start_driver().await;
        let first = node
            .watcher
            .prepare(DRIVER, &[id("a", UID_A), id("b", UID_B)])
            .await
            .unwrap();
        node.crash(server, registrar).await;
        match lose {
            "corrupt" => std::fs::write(node.checkpoint(), "{\"version\": 1, \"cla").unwrap(),
            _ => std::fs::remove_file(node.checkpoint()).unwrap(),
        }
        let specs_before: Vec<_> = std::fs::read_dir(node.cdi_dir())
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        let (server, registrar) = node.start_driver().await;
        let report = server.start_report().clone();
        assert_eq!(report.rebuilt, [UID_A, UID_B], "{lose}");
        assert!(
            report.removed.is_empty() && report.recovered(),
            "{lose}: {report:?}"
        );
        // Nothing swept: every running pod keeps its spec, byte for byte.
        let specs_after: Vec<_> = std::fs::read_dir(node.cdi_dir())
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert_eq!(specs_after.len(), 2);
        for s in &specs_before {
            assert!(specs_after.contains(s), "{lose}: a spec changed or went");
        }
        // The driver learns which devices are in use.
        let devices: Vec<_> = server
            .initial_claims()
            .values()
            .flat_map(|c| c.devices.iter().map(|d| d.device.clone()))
            .collect();
        assert_eq!(devices, ["dev-0", "dev-1"], "{lose}");
        // The kubelet settles the rest: a prepare is done in full (the
        // requests come back), an unprepare removes the spec.
        node.kubelet_restarts().await;
        let again = node
            .watcher
            .prepare(DRIVER, &[id("a", UID_A)])
            .await
            .unwrap();
        assert_eq!(again[UID_A], first[UID_A], "{lose}");
        resolves_on_disk(&node, &again[UID_A]);
        let done = node
            .watcher
            .unprepare(DRIVER, &[id("b", UID_B)])
            .await
            .unwrap();
        assert_eq!(done[UID_B], Ok(()));
        assert_eq!(std::fs::read_dir(node.cdi_dir()).unwrap().count(), 1);
        let (c, _) = dra_api::checkpoint::Checkpoint::load(&node.checkpoint()).unwrap();
        let a = c.get(UID_A).unwrap();
        assert!(
            !a.rebuilt && a.name == "a",
            "{lose}: completed by the prepare"
        );
        assert!(c.get(UID_B).is_none());
        registrar.stop().await;
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_references_that_could_steer_a_path_are_refused_per_claim() {
    let node = Node::new(KubeletVersion::V1_34);
    node.claims
        .put("a", UID_A, Some(vec![result(DRIVER, "r", "dev-0")]));
    let (server, registrar) = node.start_driver().await;
    // A file a hostile UID would reach from the CDI directory.
    let victim = node.dir.path().join("victim.json");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::create_dir_all(node.cdi_dir()).unwrap();
    let hostile = [
        id("a", "x/../../victim"),
        id("../a", UID_B),
        ClaimId {
            namespace: "default".into(),
            name: "a/../../x".into(),
            uid: UID_B.into(),
        },
    ];
    let mut all = hostile.to_vec();
    all.push(id("a", UID_A));
    let answers = node.watcher.prepare(DRIVER, &all).await.unwrap();
    assert!(answers[UID_A].is_ok(), "the good claim is prepared");
    assert!(
        answers["x/../../victim"]
            .as_ref()
            .unwrap_err()
            .contains("claim uid")
    );
    let done = node.watcher.unprepare(DRIVER, &hostile[..1]).await.unwrap();
    assert!(
        done["x/../../victim"]
            .as_ref()
            .unwrap_err()
            .contains("not a lowercase UUID")
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(
        node.driver.unprepared.lock().unwrap().len(),
        0,
        "never reached the driver"
    );
    assert_eq!(
        server.refused_claims(),
        4,
        "three prepares and an unprepare"
    );
    registrar.stop().await;
    server.stop().await;
}

const BOOT_1: &str = "11111111-aaaa-4aaa-8aaa-111111111111";
const BOOT_2: &str = "22222222-bbbb-4bbb-8bbb-222222222222";

/// Device nodes are numbered anew at every boot: a record of another boot
/// is never written back; its claims are prepared again in full (the
/// driver asked, with the devices' current facts), under the same CDI
/// names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_another_boot_is_prepared_again_not_written_back() {
    let mut node = Node::new(KubeletVersion::V1_34);
    node.claims
        .put("a", UID_A, Some(vec![result(DRIVER, "r", "dev-0")]));
    let (server, registrar) = node.start_driver_in_boot(BOOT_1).await;
    let first = node
        .watcher
        .prepare(DRIVER, &[id("a", UID_A)])
        .await
        .unwrap();
    node.crash(server, registrar).await;
    // The same boot: written back.
    std::fs::remove_dir_all(node.cdi_dir()).unwrap();
    let (server, registrar) = node.start_driver_in_boot(BOOT_1).await;
    assert!(!server.start_report().new_boot);
    assert_eq!(server.start_report().rewritten, [UID_A]);
    node.crash(server, registrar).await;
    // A reboot: nothing written from the record.
    std::fs::remove_dir_all(node.cdi_dir()).unwrap();
    let (server, registrar) = node.start_driver_in_boot(BOOT_2).await;
    let report = server.start_report().clone();
    assert!(report.new_boot && report.rewritten.is_empty(), "{report:?}");
    assert!(!node.cdi_dir().exists() || std::fs::read_dir(node.cdi_dir()).unwrap().count() == 0);
    assert!(
        server.initial_claims()[UID_A].rebuilt,
        "marked for a full prepare"
    );
    // Restarted again in the new boot before the kubelet asked: still
    // nothing written from the old boot's record.
    node.crash(server, registrar).await;
    let (server, registrar) = node.start_driver_in_boot(BOOT_2).await;
    assert!(server.start_report().rewritten.is_empty());
    assert!(!node.cdi_dir().exists() || std::fs::read_dir(node.cdi_dir()).unwrap().count() == 0);
    node.kubelet_restarts().await;
    let again = node
        .watcher
        .prepare(DRIVER, &[id("a", UID_A)])
        .await
        .unwrap();
    assert_eq!(again, first, "the same CDI names");
    resolves_on_disk(&node, &again[UID_A]);
    assert_eq!(node.driver.prepared.lock().unwrap().len(), 2, "asked again");
    let (c, _) = dra_api::checkpoint::Checkpoint::load(&node.checkpoint()).unwrap();
    assert!(!c.get(UID_A).unwrap().rebuilt);
    assert_eq!(c.boot_id(), Some(BOOT_2));
    registrar.stop().await;
    server.stop().await;
}

/// Files with a claim spec's name that this driver never wrote (too
/// large, a link, another kind) are not adopted as claims, do not stop
/// later sweeps, and hold no device; many of them cannot grow the
/// checkpoint: rebuilt records keep no edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_files_are_not_adopted_and_cannot_grow_the_record() {
    let node = Node::new(KubeletVersion::V1_34);
    std::fs::create_dir_all(node.cdi_dir()).unwrap();
    let name = |uid: &str| {
        node.cdi_dir()
            .join(format!("null.example.com-claim_{uid}.json"))
    };
    std::fs::write(name(UID_A), vec![b' '; 2 << 20]).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", name(UID_B)).unwrap();
    // Planted specs of our kind: adopted as unverified claims, without
    // their edits.
    for i in 0..50u32 {
        let uid = format!("{i:08x}-0000-4000-8000-000000000000");
        let big = "x".repeat(4000);
        std::fs::write(
            name(&uid),
            format!(
                r#"{{"cdiVersion":"0.5.0","kind":"example.com/null","devices":[{{"name":"{uid}-dev-0","containerEdits":{{"env":["A={big}"]}}}}]}}"#
            ),
        )
        .unwrap();
    }
    let (server, registrar) = node.start_driver().await;
    let report = server.start_report().clone();
    assert_eq!(report.rebuilt.len(), 50, "{:?}", report.problems);
    assert!(
        !report.rebuilt.contains(&UID_A.to_owned()) && !report.rebuilt.contains(&UID_B.to_owned())
    );
    let (c, _) = dra_api::checkpoint::Checkpoint::load(&node.checkpoint()).unwrap();
    assert!(
        !c.rebuild_incomplete(),
        "files not ours do not block sweeps"
    );
    assert!(c.claims().values().all(|r| r.cdi_devices.is_empty()));
    let size = std::fs::metadata(node.checkpoint()).unwrap().len();
    assert!(size < 64 << 10, "the record stays small: {size} bytes");
    registrar.stop().await;
    server.stop().await;
}

/// A record written before boots were recorded (an older version) is not
/// trusted once the driver knows its boot: prepared again in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_a_boot_is_not_trusted_once_boots_are_known() {
    let node = Node::new(KubeletVersion::V1_34);
    node.claims
        .put("a", UID_A, Some(vec![result(DRIVER, "r", "dev-0")]));
    let (server, registrar) = node.start_driver().await;
    node.watcher
        .prepare(DRIVER, &[id("a", UID_A)])
        .await
        .unwrap();
    node.crash(server, registrar).await;
    std::fs::remove_dir_all(node.cdi_dir()).unwrap();
    let (server, registrar) = node.start_driver_in_boot(BOOT_1).await;
    assert!(server.start_report().new_boot);
    assert!(server.start_report().rewritten.is_empty());
    assert!(server.initial_claims()[UID_A].rebuilt);
    registrar.stop().await;
    server.stop().await;
}
