//! The pure decisions, table-driven.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeMap;
use std::time::Duration;

use enabled_plugins::{Label, parse};
use fake_gpu_node::{FakeNode, NodeSpec};
use gpu_discovery::{DiscoveryConfig, Inventory, scan};
use node_labeler::desired::{Decision, LabelPrefixes, Refusal, discovery_labels};
use node_labeler::reconcile::*;

fn inventory(spec: &NodeSpec) -> Inventory {
    let dir = tempfile::tempdir().unwrap();
    let node = FakeNode::build(dir.path(), spec).unwrap();
    scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap()
}

fn empty() -> Inventory {
    inventory(&NodeSpec::default())
}

fn enabled() -> Decision {
    Decision::Enabled(Label::parse("intelgpu=enabled").unwrap())
}

const POLICY: Policy = Policy {
    discovery_labels: true,
    removal_grace: Duration::from_secs(300),
    plugin_label_prefixes: LabelPrefixes::unprefixed_only(),
};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

type Applied = (
    BTreeMap<String, String>,
    BTreeMap<String, String>,
    Vec<Conflict>,
    bool,
);

fn apply(intent: Intent) -> Applied {
    match intent {
        Intent::Apply {
            labels,
            annotations,
            conflicts,
            changed,
            ..
        } => (labels, annotations, conflicts, changed),
        Intent::OptedOut => panic!("opted out"),
    }
}

fn owned(view: &mut NodeView, labels: &[(&str, &str)]) {
    for (k, v) in labels {
        view.labels.insert((*k).into(), (*v).into());
        view.owned_labels.insert((*k).into());
    }
}

#[test]
fn discovery_labels_of_the_starlingx_edge_server() {
    let labels = discovery_labels(&inventory(&NodeSpec::starlingx_edge()));
    let xe = discovery_labels(&inventory(&NodeSpec::battlemage_workstation()));
    let show = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect::<String>()
    };
    expect_test::expect![[r#"
        gpu.intel.com/device-id.0300-4680.count=1
        gpu.intel.com/device-id.0300-4680.present=true
        gpu.intel.com/device-id.0380-56c0.count=4
        gpu.intel.com/device-id.0380-56c0.present=true
        gpu.intel.com/family=Flex_Series
        gpu.intel.com/gpu-numbers=0.2.3.4.5
        gpu.intel.com/millicores=5000
        gpu.intel.com/numa-gpu-map=0-0.2.3.4.5
        gpu.intel.com/product=Flex_170
        gpu.intel.com/tiles=5
        intel.feature.node.kubernetes.io/gpu=true
    "#]]
    .assert_eq(&show(&labels));
    expect_test::expect![[r#"
        gpu.intel.com/device-id.0300-64a0.count=1
        gpu.intel.com/device-id.0300-64a0.present=true
        gpu.intel.com/device-id.0300-e20b.count=1
        gpu.intel.com/device-id.0300-e20b.present=true
        gpu.intel.com/family=B_Series
        gpu.intel.com/gpu-numbers=0.1
        gpu.intel.com/memory.max=12884901888
        gpu.intel.com/millicores=2000
        gpu.intel.com/product=B580
        gpu.intel.com/tiles=2
        intel.feature.node.kubernetes.io/gpu=true
    "#]]
    .assert_eq(&show(&xe));
    assert!(discovery_labels(&empty()).is_empty());
    for (k, v) in labels.iter().chain(&xe) {
        assert!(Label::new(k, v).is_ok(), "{k}={v}");
        assert!(
            node_labeler::desired::kubelet_may_set(k),
            "NodeRestriction would refuse {k}"
        );
    }
}

#[test]
fn every_decision_form_and_alias() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    for (content, want) in [
        (
            r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#,
            Some("enabled"),
        ),
        (r#"["intelgpu"]"#, Some("enabled")),
        ("intel-gpu-plugin\n", Some("enabled")),
        (r#"{"intelgpu": "intelgpu=yes"}"#, Some("yes")),
        (r#"["intelqat"]"#, None),
        ("", None),
    ] {
        let set = parse("t", content.as_bytes()).unwrap();
        let decision = set
            .gpu_plugin()
            .map_or(Decision::Disabled, |l| Decision::Enabled(l.clone()));
        let (labels, ..) = apply(reconcile(
            &NodeView::default(),
            &inv,
            &decision,
            &POLICY,
            1000,
        ));
        assert_eq!(
            labels.get("intelgpu").map(String::as_str),
            want,
            "{content}"
        );
    }
}

#[test]
fn first_apply_then_a_noop() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let intent = reconcile(&NodeView::default(), &inv, &enabled(), &POLICY, 1000);
    let (labels, annotations, conflicts, changed) = apply(intent);
    assert!(changed && conflicts.is_empty() && annotations.is_empty());
    assert_eq!(labels["intelgpu"], "enabled");
    let mut view = NodeView::default();
    for (k, v) in &labels {
        owned(&mut view, &[(k, v)]);
    }
    let (_, _, _, changed) = apply(reconcile(&view, &inv, &enabled(), &POLICY, 1001));
    assert!(!changed, "nothing changed, nothing to write");
}

#[test]
fn gpu_gone_keeps_every_owned_label_for_the_grace_period() {
    let mut view = NodeView::default();
    owned(
        &mut view,
        &[
            ("intelgpu", "enabled"),
            ("gpu.intel.com/tiles", "1"),
            ("intel.feature.node.kubernetes.io/gpu", "true"),
        ],
    );
    let intent = reconcile(&view, &empty(), &enabled(), &POLICY, 1000);
    let (labels, annotations, _, changed) = apply(intent);
    assert!(changed, "the clock is written");
    assert_eq!(
        labels,
        map(&[
            ("intelgpu", "enabled"),
            ("gpu.intel.com/tiles", "1"),
            ("intel.feature.node.kubernetes.io/gpu", "true"),
        ]),
        "the upstream plugin's selector and every discovery label stay through the grace"
    );
    assert_eq!(annotations, map(&[(ABSENT_SINCE_ANNOTATION, "1000")]));
    // Persisted on the Node: a restarted labeller continues the grace.
    view.annotations
        .insert(ABSENT_SINCE_ANNOTATION.into(), "1000".into());
    view.owned_annotations
        .insert(ABSENT_SINCE_ANNOTATION.into());
    let (labels, _, _, changed) = apply(reconcile(&view, &empty(), &enabled(), &POLICY, 1299));
    assert!(
        !changed && labels.contains_key("intelgpu"),
        "299 s < 300 s grace"
    );
    let (labels, annotations, _, changed) =
        apply(reconcile(&view, &empty(), &enabled(), &POLICY, 1300));
    assert!(
        changed && labels.is_empty() && annotations.is_empty(),
        "grace over: removed"
    );
    // A GPU coming back clears the clock.
    let inv = inventory(&NodeSpec::starlingx_edge());
    let (labels, annotations, _, _) = apply(reconcile(&view, &inv, &enabled(), &POLICY, 1200));
    assert!(labels.contains_key("intelgpu") && annotations.is_empty());
    // Zero grace removes at once.
    let now = Policy {
        removal_grace: Duration::ZERO,
        ..POLICY
    };
    let (labels, ..) = apply(reconcile(&view, &empty(), &enabled(), &now, 1000));
    assert!(labels.is_empty());
}

#[test]
fn disabling_removes_the_plugin_label_at_once_and_keeps_discovery() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let mut view = NodeView::default();
    owned(&mut view, &[("intelgpu", "enabled")]);
    let (labels, _, _, changed) = apply(reconcile(&view, &inv, &Decision::Disabled, &POLICY, 1000));
    assert!(changed && !labels.contains_key("intelgpu"));
    assert_eq!(labels["gpu.intel.com/tiles"], "5");
}

#[test]
fn unknown_decision_adds_nothing_and_removes_nothing() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let unknown = Decision::Unknown("no enabled-plugins source exists".into());
    let (labels, ..) = apply(reconcile(
        &NodeView::default(),
        &inv,
        &unknown,
        &POLICY,
        1000,
    ));
    assert!(!labels.contains_key("intelgpu"), "not added");
    let mut view = NodeView::default();
    owned(&mut view, &[("intelgpu", "enabled")]);
    let (labels, ..) = apply(reconcile(&view, &empty(), &unknown, &POLICY, 99_999));
    assert_eq!(
        labels.get("intelgpu").map(String::as_str),
        Some("enabled"),
        "not removed, even without GPUs"
    );
}

#[test]
fn hand_set_values_win_and_are_reported() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let mut view = NodeView::default();
    view.labels.insert("intelgpu".into(), "manual".into());
    view.labels.insert("gpu.intel.com/tiles".into(), "5".into());
    view.labels.insert("other".into(), "x".into());
    let (labels, _, conflicts, _) = apply(reconcile(&view, &inv, &enabled(), &POLICY, 1000));
    assert!(!labels.contains_key("intelgpu"));
    assert_eq!(
        conflicts,
        [Conflict {
            key: "intelgpu".into(),
            wanted: "enabled".into(),
            found: "manual".into()
        }]
    );
    assert_eq!(
        labels["gpu.intel.com/tiles"], "5",
        "the same value is shared, not a conflict"
    );
    assert!(!labels.contains_key("other"));
}

#[test]
fn opted_out_nodes_are_untouched() {
    let mut view = NodeView::default();
    view.annotations
        .insert(OPT_OUT_ANNOTATION.into(), "disabled".into());
    assert_eq!(
        reconcile(&view, &empty(), &enabled(), &POLICY, 0),
        Intent::OptedOut
    );
    view.annotations
        .insert(OPT_OUT_ANNOTATION.into(), "enabled".into());
    assert_ne!(
        reconcile(&view, &empty(), &enabled(), &POLICY, 0),
        Intent::OptedOut
    );
}

#[test]
fn discovery_labels_can_be_turned_off() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let off = Policy {
        discovery_labels: false,
        ..POLICY
    };
    let (labels, ..) = apply(reconcile(&NodeView::default(), &inv, &enabled(), &off, 0));
    assert_eq!(labels, map(&[("intelgpu", "enabled")]));
}

#[test]
fn a_long_gpu_list_uses_continuation_keys() {
    let inv = inventory(&NodeSpec::flex_vfs(2, 31));
    let labels = discovery_labels(&inv);
    assert!(
        labels.contains_key("gpu.intel.com/gpu-numbers2"),
        "{labels:?}"
    );
    assert!(labels.iter().all(|(k, v)| Label::new(k, v).is_ok()));
}

#[test]
fn not_enabled_is_confirmed_by_a_second_read_of_the_same_content() {
    use node_labeler::engine::Settle;
    let t0 = tokio::time::Instant::now();
    let wait = Duration::from_secs(2);
    let mut s = Settle::new(wait);
    let label = Decision::Enabled(Label::parse("intelgpu=enabled").unwrap());
    // Enabled and unknown pass at once.
    assert_eq!(s.filter(label.clone(), "f: a", t0), (label.clone(), None));
    // Disabled: unknown until the same content is read again, 2 s later.
    let (d, again) = s.filter(Decision::Disabled, "f: b", t0);
    assert!(matches!(d, Decision::Unknown(_)));
    assert_eq!(again, Some(t0 + wait));
    let (d, _) = s.filter(Decision::Disabled, "f: b", t0 + Duration::from_secs(1));
    assert!(matches!(d, Decision::Unknown(_)), "too early");
    assert_eq!(
        s.filter(Decision::Disabled, "f: b", t0 + wait),
        (Decision::Disabled, None)
    );
    // Other content starts over.
    let (d, again) = s.filter(Decision::Disabled, "f: c", t0 + wait);
    assert!(matches!(d, Decision::Unknown(_)));
    assert_eq!(again, Some(t0 + wait + wait));
    // Enabled in between forgets the pending reading.
    s.filter(label, "f: a", t0 + wait);
    let (d, _) = s.filter(Decision::Disabled, "f: c", t0 + wait * 3);
    assert!(matches!(d, Decision::Unknown(_)));
    // No settle: at once.
    let mut now = Settle::new(Duration::ZERO);
    assert_eq!(
        now.filter(Decision::Disabled, "x", t0),
        (Decision::Disabled, None)
    );
}

#[test]
fn disabled_without_a_gpu_takes_the_plugin_label_and_keeps_the_rest_through_the_grace() {
    let mut view = NodeView::default();
    owned(
        &mut view,
        &[
            ("intelgpu", "enabled"),
            ("intel.feature.node.kubernetes.io/gpu", "true"),
        ],
    );
    let (labels, annotations, _, _) = apply(reconcile(
        &view,
        &empty(),
        &Decision::Disabled,
        &POLICY,
        1000,
    ));
    assert_eq!(
        labels,
        map(&[("intel.feature.node.kubernetes.io/gpu", "true")])
    );
    assert_eq!(annotations, map(&[(ABSENT_SINCE_ANNOTATION, "1000")]));
}

#[test]
fn an_annotation_taken_over_by_hand_does_not_wedge_the_node() {
    // We own the plugin label and the clock; an operator overwrote the clock.
    let mut view = NodeView::default();
    owned(&mut view, &[("intelgpu", "enabled")]);
    view.annotations
        .insert(ABSENT_SINCE_ANNOTATION.into(), "900".into());
    let (labels, annotations, conflicts, _) =
        apply(reconcile(&view, &empty(), &enabled(), &POLICY, 1000));
    // Their value is the clock (kept 100 s of 300 s); applying the same
    // value shares the field, no conflict.
    assert!(labels.contains_key("intelgpu"));
    assert_eq!(annotations, map(&[(ABSENT_SINCE_ANNOTATION, "900")]));
    assert!(conflicts.is_empty(), "same value: no conflict");
    view.annotations
        .insert(ABSENT_SINCE_ANNOTATION.into(), "garbage".into());
    let (_, annotations, conflicts, _) =
        apply(reconcile(&view, &empty(), &enabled(), &POLICY, 1000));
    assert!(annotations.is_empty());
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].key, ABSENT_SINCE_ANNOTATION);
    // Grace over by their clock: the label goes.
    view.annotations
        .insert(ABSENT_SINCE_ANNOTATION.into(), "500".into());
    let (labels, ..) = apply(reconcile(&view, &empty(), &enabled(), &POLICY, 1000));
    assert!(!labels.contains_key("intelgpu"));
}

#[test]
fn the_nfd_file_expires_and_is_refreshed_at_half_its_life() {
    use node_labeler::engine::{Outcome, reconcile_features_file};
    let dir = tempfile::tempdir().unwrap();
    let inv = inventory(&NodeSpec::starlingx_edge());
    let ttl = Duration::from_secs(3600);
    let run =
        |now| reconcile_features_file(dir.path(), &inv, &enabled(), &POLICY, now, ttl).unwrap();
    assert!(matches!(run(1_000), Outcome::Applied { .. }));
    let text = std::fs::read_to_string(dir.path().join("intel-gpu-labeler")).unwrap();
    assert!(
        text.contains("# +expiry-time=1970-01-01T01:16:40Z"),
        "{text}"
    );
    assert!(
        matches!(run(2_000), Outcome::Unchanged { .. }),
        "nothing to write yet"
    );
    assert!(
        matches!(run(2_801), Outcome::Applied { .. }),
        "refreshed at half its life"
    );
    let text = std::fs::read_to_string(dir.path().join("intel-gpu-labeler")).unwrap();
    assert!(
        text.contains("# +expiry-time=1970-01-01T01:46:41Z"),
        "{text}"
    );
}

/// One GPU, one owner: `intel.com/gpu-allocation=dra` moves the node from
/// the device plugin's DaemonSet label to the DRA driver's, and back.
#[test]
fn the_allocation_mode_label_picks_the_daemonset() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let mut view = NodeView::default();
    view.labels
        .insert("intel.com/gpu-allocation".into(), "dra".into());
    let (labels, ..) = apply(reconcile(&view, &inv, &enabled(), &POLICY, 1000));
    assert_eq!(
        labels.get("intelgpu-dra").map(String::as_str),
        Some("enabled")
    );
    assert!(!labels.contains_key("intelgpu"), "{labels:?}");
    // Back to the device plugin: the DRA label is no longer applied (so
    // server-side apply takes it back), the plugin's is.
    owned(&mut view, &[("intelgpu-dra", "enabled")]);
    view.labels
        .insert("intel.com/gpu-allocation".into(), "device-plugin".into());
    let (labels, ..) = apply(reconcile(&view, &inv, &enabled(), &POLICY, 1001));
    assert_eq!(labels.get("intelgpu").map(String::as_str), Some("enabled"));
    assert!(!labels.contains_key("intelgpu-dra"), "{labels:?}");
}

/// The plugin label's key against the allowed prefixes: one table, every
/// case of issue 25's hostile label.
#[test]
fn plugin_label_prefixes() {
    let allowed = LabelPrefixes::unprefixed_only()
        .allow("example.com")
        .unwrap();
    let check = |prefixes: &LabelPrefixes, key: &str| -> &'static str {
        match prefixes.check(key) {
            Ok(()) => "ok",
            Err(Refusal::Reserved { .. }) => "reserved",
            Err(Refusal::NotAllowed { .. }) => "not allowed",
            Err(Refusal::Invalid { .. }) => "invalid",
            Err(_) => "other",
        }
    };
    for (key, by_default, with_example) in [
        ("intelgpu", "ok", "ok"),
        ("intelgpu-dra", "ok", "ok"),
        ("example.com/gpu", "not allowed", "ok"),
        ("example.com/gpu-dra", "not allowed", "ok"),
        ("sub.example.com/gpu", "not allowed", "not allowed"),
        ("gpu.intel.com/plugin", "not allowed", "not allowed"),
        ("kubernetes.io/hostname", "reserved", "reserved"),
        (
            "node-role.kubernetes.io/control-plane",
            "reserved",
            "reserved",
        ),
        ("node-restriction.kubernetes.io/x", "reserved", "reserved"),
        ("topology.kubernetes.io/zone", "reserved", "reserved"),
        ("k8s.io/x", "reserved", "reserved"),
        ("a.b.k8s.io/x", "reserved", "reserved"),
        ("node.kubernetes.io/instance-type", "reserved", "reserved"),
        (&*format!("{}-dra", "x".repeat(61)), "invalid", "invalid"),
    ] {
        assert_eq!(
            (
                check(&LabelPrefixes::unprefixed_only(), key),
                check(&allowed, key)
            ),
            (by_default, with_example),
            "{key}"
        );
    }
    // Kubernetes' own prefixes cannot be allowed at all.
    for reserved in [
        "kubernetes.io",
        "k8s.io",
        "node-role.kubernetes.io",
        "topology.kubernetes.io",
    ] {
        let err = LabelPrefixes::unprefixed_only()
            .allow(reserved)
            .unwrap_err();
        assert!(err.to_string().contains("cannot be allowed"), "{err}");
    }
    assert!(
        LabelPrefixes::unprefixed_only()
            .allow("Not_A.Domain")
            .is_err()
    );
}

/// A hostile enabled-plugins label never reaches the intent: no key in
/// Kubernetes' prefixes (on a DRA node neither, through `-dra`), the
/// discovery labels still applied, the refusal reported, and the plugin
/// label the labeller owned kept as it is.
#[test]
fn a_refused_plugin_label_changes_nothing_else() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let hostile = |label: &str| Decision::Enabled(Label::parse(label).unwrap());
    let mut ours = NodeView::default();
    owned(&mut ours, &[("intelgpu", "enabled")]);
    let mut dra = ours.clone();
    dra.labels
        .insert("intel.com/gpu-allocation".into(), "dra".into());
    for (label, view) in [
        ("kubernetes.io/hostname=evil", &NodeView::default()),
        ("kubernetes.io/hostname=evil", &ours),
        ("node-role.kubernetes.io/control-plane=", &ours),
        ("node-restriction.kubernetes.io/gpu=yes", &ours),
        ("topology.kubernetes.io/zone=evil", &ours),
        ("x.k8s.io/gpu=yes", &ours),
        ("node-role.kubernetes.io/gpu=enabled", &dra),
        ("example.com/gpu=enabled", &ours),
    ] {
        let Intent::Apply {
            labels, refused, ..
        } = reconcile(view, &inv, &hostile(label), &POLICY, 1000)
        else {
            panic!("opted out")
        };
        let key = label.split_once('=').unwrap().0;
        assert!(
            labels.keys().all(|k| !k.starts_with(key)),
            "{label}: {labels:?}"
        );
        assert!(labels.contains_key("gpu.intel.com/tiles"), "{label}");
        assert!(refused.is_some_and(|r| r.key().starts_with(key)), "{label}");
        let expect_owned = view.owned_labels.contains("intelgpu");
        assert_eq!(labels.contains_key("intelgpu"), expect_owned, "{label}");
    }
    // An allowed prefix is applied, and on a DRA node as `-dra`.
    let allowed = Policy {
        plugin_label_prefixes: LabelPrefixes::unprefixed_only()
            .allow("example.com")
            .unwrap(),
        ..POLICY
    };
    let (labels, ..) = apply(reconcile(
        &dra,
        &inv,
        &hostile("example.com/gpu=enabled"),
        &allowed,
        0,
    ));
    assert_eq!(
        labels.get("example.com/gpu-dra").map(String::as_str),
        Some("enabled")
    );
}

/// A key in Kubernetes' own prefixes the labeller owns (only hostile
/// content, applied by an older labeller, can have put it there) is let
/// go, whatever the decision; a plugin label in a prefix merely not
/// allowed stays while the decision is refused (nothing is evicted by an
/// upgrade), and goes through the grace as before.
#[test]
fn owned_system_labels_are_let_go() {
    let inv = inventory(&NodeSpec::starlingx_edge());
    let mut view = NodeView::default();
    owned(
        &mut view,
        &[
            ("kubernetes.io/hostname", "evil"),
            ("example.com/gpu", "enabled"),
        ],
    );
    for decision in [
        Decision::Unknown("no file".into()),
        Decision::Enabled(Label::parse("node-role.kubernetes.io/gpu=x").unwrap()),
        Decision::Enabled(Label::parse("example.com/gpu=enabled").unwrap()),
    ] {
        let (labels, ..) = apply(reconcile(&view, &inv, &decision, &POLICY, 1000));
        assert!(
            !labels.contains_key("kubernetes.io/hostname"),
            "{decision:?}"
        );
        assert_eq!(labels["example.com/gpu"], "enabled", "{decision:?}");
    }
    // No GPU: through the grace, only what is not Kubernetes' own.
    let (labels, ..) = apply(reconcile(&view, &empty(), &enabled(), &POLICY, 1000));
    assert!(!labels.contains_key("kubernetes.io/hostname"));
    assert!(labels.contains_key("example.com/gpu"));
}
