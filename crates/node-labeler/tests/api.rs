//! The labeller against the API-server emulator over real HTTP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeMap;
use std::time::Duration;

use apiserver_emulator::{ApiServer, Fault};
use enabled_plugins::Label;
use fake_gpu_node::{FakeNode, NodeSpec};
use gpu_discovery::{DiscoveryConfig, Inventory, scan};
use node_labeler::cluster::Cluster;
use node_labeler::desired::{Decision, LabelPrefixes};
use node_labeler::engine::{
    Outcome, Source, cleanup, decide, decide_with_evidence, reconcile_node, report_refused,
};
use node_labeler::reconcile::{ABSENT_SINCE_ANNOTATION, FIELD_MANAGER, OPT_OUT_ANNOTATION, Policy};

const NODE: &str = "edge-0";
const POLICY: Policy = Policy {
    discovery_labels: true,
    removal_grace: Duration::from_secs(300),
    plugin_label_prefixes: LabelPrefixes::unprefixed_only(),
};

async fn setup() -> (ApiServer, Cluster) {
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let mut config = kube::Config::new(api.url().parse().unwrap());
    config.default_namespace = "kube-system".into();
    let client = kube::Client::try_from(config).unwrap();
    let cluster = Cluster::new(client, NODE);
    (api, cluster)
}

fn inventory(spec: &NodeSpec) -> Inventory {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), spec).unwrap();
    scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap()
}

fn enabled() -> Decision {
    Decision::Enabled(Label::parse("intelgpu=enabled").unwrap())
}

fn patches(api: &ApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count()
}

fn labels(api: &ApiServer) -> BTreeMap<String, String> {
    api.node(NODE).map(|n| n.labels).unwrap_or_default()
}

#[tokio::test]
async fn first_apply_then_nothing_is_written() {
    let (api, cluster) = setup().await;
    let inv = inventory(&NodeSpec::starlingx_edge());
    let out = reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1000)
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
    let l = labels(&api);
    assert_eq!(l["intelgpu"], "enabled");
    // Counted by the plugin's predicate: the 4 VFs, not the PF that has them.
    assert_eq!(l["gpu.intel.com/device-id.0380-56c0.count"], "4");
    let req = api
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert!(
        req.target.contains("fieldManager=intel-gpu-labeler"),
        "{}",
        req.target
    );
    assert!(!req.target.contains("force"), "never forced");
    assert_eq!(
        req.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let node = api.node(NODE).unwrap();
    assert!(
        node.managers
            .iter()
            .any(|m| m.name == FIELD_MANAGER && m.labels.contains("intelgpu"))
    );
    let before = patches(&api);
    let out = reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1001)
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Unchanged { .. }));
    assert_eq!(patches(&api), before, "a no-op reconcile writes nothing");
}

#[tokio::test]
async fn gpu_gone_removes_the_plugin_label_after_the_grace_period_only() {
    let (api, cluster) = setup().await;
    reconcile_node(
        &cluster,
        &inventory(&NodeSpec::starlingx_edge()),
        &enabled(),
        &POLICY,
        1000,
    )
    .await
    .unwrap();
    let none = inventory(&NodeSpec::default());
    reconcile_node(&cluster, &none, &enabled(), &POLICY, 2000)
        .await
        .unwrap();
    let node = api.node(NODE).unwrap();
    assert_eq!(
        node.labels.get("intelgpu").map(String::as_str),
        Some("enabled")
    );
    assert_eq!(
        node.labels
            .get("intel.feature.node.kubernetes.io/gpu")
            .map(String::as_str),
        Some("true"),
        "every owned label stays through the grace"
    );
    assert!(node.labels.contains_key("gpu.intel.com/tiles"));
    assert_eq!(node.annotations[ABSENT_SINCE_ANNOTATION], "2000");
    // A restarted labeller (state only on the Node) still waits.
    let fresh = Cluster::new(cluster_client(&api), NODE);
    reconcile_node(&fresh, &none, &enabled(), &POLICY, 2299)
        .await
        .unwrap();
    assert!(labels(&api).contains_key("intelgpu"));
    reconcile_node(&fresh, &none, &enabled(), &POLICY, 2300)
        .await
        .unwrap();
    let node = api.node(NODE).unwrap();
    assert!(
        !node.labels.contains_key("intelgpu"),
        "removed after the grace period"
    );
    assert!(!node.labels.contains_key("gpu.intel.com/tiles"));
    assert!(!node.annotations.contains_key(ABSENT_SINCE_ANNOTATION));
}

fn cluster_client(api: &ApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

#[tokio::test]
async fn disabling_the_plugin_removes_its_label_and_keeps_discovery_labels() {
    let (api, cluster) = setup().await;
    let inv = inventory(&NodeSpec::starlingx_edge());
    reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1000)
        .await
        .unwrap();
    reconcile_node(&cluster, &inv, &Decision::Disabled, &POLICY, 1001)
        .await
        .unwrap();
    let l = labels(&api);
    assert!(!l.contains_key("intelgpu"));
    assert_eq!(l["gpu.intel.com/tiles"], "5");
}

#[tokio::test]
async fn other_owners_and_hand_set_values_are_left_alone() {
    let (api, cluster) = setup().await;
    api.set_label(NODE, "kubectl", "intelgpu", Some("manual"));
    api.set_label(NODE, "kubelet", "kubernetes.io/hostname", Some(NODE));
    api.set_label(NODE, "other-controller", "gpu.intel.com/custom", Some("x"));
    let inv = inventory(&NodeSpec::starlingx_edge());
    let out = reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1000)
        .await
        .unwrap();
    let Outcome::Applied { conflicts, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(conflicts.len(), 1);
    let l = labels(&api);
    assert_eq!(l["intelgpu"], "manual", "the hand-set value stays");
    assert_eq!(l["kubernetes.io/hostname"], NODE);
    assert_eq!(l["gpu.intel.com/custom"], "x");
    let events = api.events();
    assert!(
        events.iter().any(|e| e["reason"] == "LabelConflict"
            && e["message"].as_str().unwrap().contains("intelgpu")),
        "{events:?}"
    );
    // The Event names the Node by uid (kubectl describe node shows it), and
    // the same conflict again counts up instead of piling up.
    let uid = api.node(NODE).unwrap().uid;
    assert!(
        events
            .iter()
            .all(|e| e["involvedObject"]["uid"] == uid.as_str()),
        "{events:?}"
    );
    let before = events.len();
    // Other hardware, so the labeller writes again and meets the conflict.
    let other = inventory(&NodeSpec::battlemage_workstation());
    let out = reconcile_node(&cluster, &other, &enabled(), &POLICY, 1001)
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
    let events = api.events();
    assert_eq!(events.len(), before, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "LabelConflict" && e["count"] == 2),
        "{events:?}"
    );
    // Disabling later (and the GPUs gone past the grace) removes only
    // what we own.
    let none = inventory(&NodeSpec::default());
    reconcile_node(&cluster, &none, &Decision::Disabled, &POLICY, 2000)
        .await
        .unwrap();
    reconcile_node(&cluster, &none, &Decision::Disabled, &POLICY, 2400)
        .await
        .unwrap();
    let l = labels(&api);
    assert_eq!(l["intelgpu"], "manual");
    assert_eq!(l["gpu.intel.com/custom"], "x");
    assert!(!l.contains_key("gpu.intel.com/tiles"));
}

#[tokio::test]
async fn a_deleted_node_is_not_recreated_and_labels_return_with_it() {
    let (api, cluster) = setup().await;
    let inv = inventory(&NodeSpec::starlingx_edge());
    api.delete_node(NODE);
    assert_eq!(
        reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1000)
            .await
            .unwrap(),
        Outcome::NodeMissing
    );
    assert!(api.node(NODE).is_none(), "never re-created");
    api.add_node(NODE);
    reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1001)
        .await
        .unwrap();
    assert_eq!(labels(&api)["intelgpu"], "enabled");
}

/// The apply carries the uid it read: a Node deleted (or deleted and
/// registered again) between the read and the write is never created or
/// overwritten — with node credentials too, which may create their Node.
#[tokio::test]
async fn the_uid_precondition_refuses_to_create_or_to_write_a_replaced_node() {
    let (api, cluster) = setup().await;
    let state = cluster.read().await.unwrap().unwrap();
    // Without a resourceVersion, unrelated changes do not conflict.
    api.set_annotation(NODE, "kubelet", "heartbeat", Some("1"));
    cluster
        .apply(
            &BTreeMap::from([("a".to_owned(), "1".to_owned())]),
            &BTreeMap::new(),
            &state.uid,
            None,
        )
        .await
        .unwrap();
    // With the one it was decided from, a Node changed since conflicts.
    let err = cluster
        .apply(
            &BTreeMap::from([("a".to_owned(), "2".to_owned())]),
            &BTreeMap::new(),
            &state.uid,
            Some(&state.resource_version),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(409), "{err}");
    api.delete_node(NODE);
    let err = cluster
        .apply(&BTreeMap::new(), &BTreeMap::new(), &state.uid, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(409));
    assert!(api.node(NODE).is_none());
    api.add_node(NODE);
    let err = cluster
        .apply(&BTreeMap::new(), &BTreeMap::new(), &state.uid, None)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(409),
        "a new Node of the same name is not the one read"
    );
}

/// The Node goes right after the labeller read it: its write fails, it
/// reads again, finds nothing and creates nothing — whether or not its
/// identity may create Nodes.
#[tokio::test]
async fn a_node_deleted_right_after_the_read_is_not_recreated() {
    for rbac_forbids_create in [false, true] {
        let (api, cluster) = setup().await;
        if rbac_forbids_create {
            api.forbid_node_creation();
        }
        let inv = inventory(&NodeSpec::starlingx_edge());
        api.delete_node_after_next_read(NODE);
        let out = reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1000)
            .await
            .unwrap();
        assert_eq!(
            out,
            Outcome::NodeMissing,
            "rbac forbids create: {rbac_forbids_create}"
        );
        assert!(api.node(NODE).is_none(), "never re-created");
        let applies = api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .count();
        assert_eq!(applies, 1, "one write, refused; no retry storm");
    }
}

#[tokio::test]
async fn opted_out_nodes_are_untouched() {
    let (api, cluster) = setup().await;
    api.set_annotation(NODE, "admin", OPT_OUT_ANNOTATION, Some("disabled"));
    let out = reconcile_node(
        &cluster,
        &inventory(&NodeSpec::starlingx_edge()),
        &enabled(),
        &POLICY,
        1000,
    )
    .await
    .unwrap();
    assert_eq!(out, Outcome::OptedOut);
    assert!(labels(&api).is_empty());
}

#[tokio::test]
async fn converges_under_thirty_percent_faults() {
    let (api, cluster) = setup().await;
    api.fault_rate(0.3);
    let inv = inventory(&NodeSpec::starlingx_edge());
    let mut failures = 0;
    let mut done = false;
    for _ in 0..40 {
        match reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1000).await {
            Ok(Outcome::Applied { .. } | Outcome::Unchanged { .. }) => {
                if labels(&api).get("intelgpu").is_some_and(|v| v == "enabled") {
                    done = true;
                    break;
                }
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => failures += 1,
        }
    }
    assert!(done, "did not converge");
    api.fault_rate(0.0);
    let out = reconcile_node(&cluster, &inv, &enabled(), &POLICY, 1001)
        .await
        .unwrap();
    assert!(
        matches!(out, Outcome::Unchanged { .. }),
        "{out:?} after {failures} failures"
    );
}

#[tokio::test]
async fn cleanup_removes_exactly_what_the_labeller_owns() {
    let (api, cluster) = setup().await;
    api.set_label(NODE, "kubelet", "kubernetes.io/os", Some("linux"));
    reconcile_node(
        &cluster,
        &inventory(&NodeSpec::starlingx_edge()),
        &enabled(),
        &POLICY,
        1000,
    )
    .await
    .unwrap();
    assert!(labels(&api).len() > 5);
    cleanup(&cluster).await.unwrap();
    assert_eq!(
        labels(&api),
        BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())])
    );
    assert!(
        api.node(NODE)
            .unwrap()
            .managers
            .iter()
            .all(|m| m.name != FIELD_MANAGER)
    );
}

#[tokio::test]
async fn a_configured_configmap_alone_decides_files_only_without_one() {
    let (api, cluster) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enabled_kube_plugins");
    let cm = Source::ConfigMap {
        namespace: "kube-system".into(),
        name: "enabled-kube-plugins".into(),
    };
    let sources = [Source::File(file.clone()), cm.clone()];
    // A stale file on this host says "not enabled"; the cluster says
    // nothing yet: unknown, never the file's word.
    std::fs::write(&file, r#"{"intel-qat-plugin": "intelqat=enabled"}"#).unwrap();
    let d = decide(&sources, Some(&cluster)).await.unwrap();
    assert!(
        matches!(&d, Decision::Unknown(why) if why.contains("configmap")),
        "{d:?}"
    );
    api.set_configmap(
        "kube-system",
        "enabled-kube-plugins",
        &[("enabled_kube_plugins", r#"["intelgpu"]"#)],
    );
    assert_eq!(
        decide(&sources, Some(&cluster)).await.unwrap(),
        enabled(),
        "the ConfigMap decides for every node; the stale file is not consulted"
    );
    // Without an API (a dry run), or without a ConfigMap configured (host
    // mode), the files decide, the first that exists first.
    assert_eq!(decide(&sources, None).await.unwrap(), Decision::Disabled);
    assert_eq!(
        decide(&[Source::File(file.clone())], Some(&cluster))
            .await
            .unwrap(),
        Decision::Disabled
    );
    std::fs::write(&file, r#"{"intel-gpu-plugin": "intelgpu"}"#).unwrap();
    let err = decide(&[Source::File(file.clone())], None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("is not a label of the form key=value"),
        "{err}"
    );
    api.set_configmap(
        "kube-system",
        "enabled-kube-plugins",
        &[("enabled_kube_plugins", "[")],
    );
    let err = decide(&sources, Some(&cluster)).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("configmap kube-system/enabled-kube-plugins: invalid JSON"),
        "{err}"
    );
    api.inject(&[
        Fault::Internal,
        Fault::Internal,
        Fault::Internal,
        Fault::Internal,
        Fault::Internal,
    ]);
    assert!(
        matches!(
            decide(&[cm], Some(&cluster)).await.unwrap(),
            Decision::Unknown(_)
        ),
        "an unreadable source is unknown"
    );
    // An unreadable file names itself, and is unknown.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let d = decide(&[Source::File(file.clone())], None).await.unwrap();
    assert!(
        matches!(&d, Decision::Unknown(why) if why.contains("enabled_kube_plugins")),
        "{d:?}"
    );
}

/// `kubectl annotate --overwrite` takes the labeller's clock annotation: the
/// next reconcile neither fails on a field-manager conflict forever nor
/// overwrites it; it reports the conflict and goes on.
#[tokio::test]
async fn an_annotation_taken_by_hand_does_not_wedge_the_node() {
    let (api, cluster) = setup().await;
    reconcile_node(
        &cluster,
        &inventory(&NodeSpec::starlingx_edge()),
        &enabled(),
        &POLICY,
        1000,
    )
    .await
    .unwrap();
    let none = inventory(&NodeSpec::default());
    reconcile_node(&cluster, &none, &enabled(), &POLICY, 2000)
        .await
        .unwrap();
    assert_eq!(
        api.node(NODE).unwrap().annotations[ABSENT_SINCE_ANNOTATION],
        "2000"
    );
    api.set_annotation(
        NODE,
        "kubectl-annotate",
        ABSENT_SINCE_ANNOTATION,
        Some("tomorrow"),
    );
    let out = reconcile_node(&cluster, &none, &enabled(), &POLICY, 2010)
        .await
        .unwrap();
    let (Outcome::Applied { conflicts, .. } | Outcome::Unchanged { conflicts, .. }) = out else {
        panic!("{out:?}")
    };
    assert_eq!(conflicts.len(), 1);
    assert_eq!(
        api.node(NODE).unwrap().annotations[ABSENT_SINCE_ANNOTATION],
        "tomorrow"
    );
}

/// The watch cache can be behind the labeller's own last write (a dropped
/// watch, a slow API server). Deciding from it must not undo that write:
/// here, an unknown decision ("keep the plugin label as it is") read from a
/// cache that predates the label would remove it. The apply carries the
/// cached resourceVersion, fails with 409, and the labeller reads afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_watch_cache_never_undoes_our_own_write() {
    let (api, cluster) = setup().await;
    let inv = inventory(&NodeSpec::starlingx_edge());
    // The cache is filled, then frozen (its watch gone).
    let tasks = cluster.follow(None, std::sync::Arc::new(|| {}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cluster.read().await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never saw the Node"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in &tasks {
        t.abort();
    }
    // The plugin label, written since by this labeller (another instance
    // of it, or the same one before its watch caught up).
    let other = Cluster::new(cluster_client(&api), NODE);
    reconcile_node(&other, &inv, &enabled(), &POLICY, 1000)
        .await
        .unwrap();
    assert_eq!(
        labels(&api).get("intelgpu").map(String::as_str),
        Some("enabled")
    );
    // The decision becomes unknown; the cache still shows the old Node.
    let unknown = Decision::Unknown("the ConfigMap is missing".into());
    reconcile_node(&cluster, &inv, &unknown, &POLICY, 1001)
        .await
        .unwrap();
    assert_eq!(
        labels(&api).get("intelgpu").map(String::as_str),
        Some("enabled"),
        "the plugin label stays while the decision is unknown"
    );
}

/// Issue 25: whoever may edit the enabled-plugins ConfigMap must not own
/// node identity. A ConfigMap naming `kubernetes.io/hostname=evil` as the
/// GPU plugin's label: the key is not set, the discovery labels and the
/// plugin label the labeller owned stay, and a `LabelRefused` Event names
/// the key and the ConfigMap.
#[tokio::test]
async fn a_hostile_configmap_cannot_set_system_labels() {
    let (api, cluster) = setup().await;
    let inv = inventory(&NodeSpec::starlingx_edge());
    let cm = Source::ConfigMap {
        namespace: "kube-system".into(),
        name: "enabled-kube-plugins".into(),
    };
    let publish = |content: &str| {
        api.set_configmap(
            "kube-system",
            "enabled-kube-plugins",
            &[("enabled_kube_plugins", content)],
        );
    };
    publish(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    let d = decide(std::slice::from_ref(&cm), Some(&cluster))
        .await
        .unwrap();
    reconcile_node(&cluster, &inv, &d, &POLICY, 1000)
        .await
        .unwrap();
    assert_eq!(labels(&api)["intelgpu"], "enabled");
    for hostile in [
        "kubernetes.io/hostname=evil",
        "node-role.kubernetes.io/control-plane=",
        "topology.kubernetes.io/zone=evil",
        "node-restriction.kubernetes.io/gpu=yes",
    ] {
        publish(&format!(r#"{{"intel-gpu-plugin": "{hostile}"}}"#));
        let reading = decide_with_evidence(std::slice::from_ref(&cm), Some(&cluster))
            .await
            .unwrap();
        let out = reconcile_node(&cluster, &inv, &reading.decision, &POLICY, 1001)
            .await
            .unwrap();
        let refusal = out.refused().cloned().expect("refused");
        let key = hostile.split_once('=').unwrap().0;
        assert_eq!(refusal.key(), key);
        let source = reading.source.unwrap();
        report_refused(&cluster, &refusal, &source).await;
        let l = labels(&api);
        assert!(!l.contains_key(key), "{hostile}: {l:?}");
        assert_eq!(l["intelgpu"], "enabled", "the owned plugin label stays");
        assert!(l.contains_key("gpu.intel.com/tiles"), "discovery goes on");
        let events = api.events();
        assert!(
            events.iter().any(|e| e["reason"] == "LabelRefused"
                && e["type"] == "Warning"
                && e["involvedObject"]["kind"] == "Node"
                && e["message"].as_str().unwrap().contains(key)
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("configmap kube-system/enabled-kube-plugins")),
            "{events:?}"
        );
    }
}
