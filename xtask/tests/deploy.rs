//! What the rendered manifests under `deploy/` promise about privilege
//! (`docs/security.md`): every overlay rendered with `kubectl kustomize`
//! (the machine image has kubectl; `cargo xtask ci manifests` needs it
//! too), then checked for the pods' posture, the admission policies, and
//! the labeller's policy against the label keys the labeller really sets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `deploy/<dir>` rendered, as one JSON value per object.
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy").join(dir))
        .output()
        .expect("kubectl is needed to render deploy/");
    assert!(
        out.status.success(),
        "deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Every overlay's name.
fn overlays() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join("deploy/overlays"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Overlays for clusters older than 1.30 (no admission policy, no
/// `recursiveReadOnly`): StarlingX's, which serve releases from 1.24.
const BEFORE_1_30: &[&str] = &["before-1.30", "starlingx", "starlingx-app"];

/// Containers whose job needs uid 0 (still without capabilities): the
/// device plugin and the DRA driver create sockets and CDI specs in root's
/// kubelet and CDI directories; in the `nfd` overlay the labeller writes
/// its features file into root's NFD directory.
fn may_run_as_root(overlay: &str, container: &str) -> bool {
    matches!(container, "intel-gpu-plugin" | "intel-gpu-dra")
        || (overlay == "nfd" && container == "intel-gpu-labeler")
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

/// The pod-level value at `key`, overridden by the container's.
fn effective<'a>(pod: &'a Value, container: &'a Value, key: &str) -> &'a Value {
    match &container["securityContext"][key] {
        Value::Null => &pod["securityContext"][key],
        v => v,
    }
}

/// The host's `/sys` and `/dev` (and anything below them).
fn is_sys_or_dev(path: &str) -> bool {
    ["/sys", "/dev"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// What is wrong with the pods of one rendered overlay.
fn posture_problems(overlay: &str, objects: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for ds in kind(objects, "DaemonSet") {
        let pod = &ds["spec"]["template"]["spec"];
        let host_paths: Vec<(&str, &str)> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
            .collect();
        for c in pod["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or("");
            let at = format!("{overlay}: DaemonSet {} container {cname}", name(ds));
            let sc = &c["securityContext"];
            if sc["privileged"] == true {
                out.push(format!("{at}: privileged"));
            }
            if sc["allowPrivilegeEscalation"] != false {
                out.push(format!("{at}: privilege escalation not refused"));
            }
            if sc["readOnlyRootFilesystem"] != true {
                out.push(format!("{at}: writable root filesystem"));
            }
            let drops: Vec<&str> = sc["capabilities"]["drop"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !drops.contains(&"ALL") || !sc["capabilities"]["add"].is_null() {
                out.push(format!("{at}: capabilities not all dropped"));
            }
            let non_root = effective(pod, c, "runAsNonRoot") == true
                && effective(pod, c, "runAsUser")
                    .as_u64()
                    .is_some_and(|u| u != 0);
            if !non_root && !may_run_as_root(overlay, cname) {
                out.push(format!("{at}: runs as root, which its job does not need"));
            }
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let vol = m["name"].as_str().unwrap_or("");
                let Some((_, host)) = host_paths.iter().find(|(n, _)| *n == vol) else {
                    continue;
                };
                if !is_sys_or_dev(host) {
                    continue;
                }
                if m["readOnly"] != true {
                    out.push(format!("{at}: host {host} mounted writable"));
                }
                let recursive = matches!(
                    m["recursiveReadOnly"].as_str(),
                    Some("IfPossible" | "Enabled")
                );
                if !recursive && !BEFORE_1_30.contains(&overlay) {
                    out.push(format!("{at}: host {host} not recursively read-only"));
                }
            }
        }
    }
    out
}

/// Every container of every overlay: no privilege, no escalation, no
/// capabilities, read-only root; not root unless its job needs it; `/sys`
/// and `/dev` read-only, recursively from 1.30. The DRA pod has the device
/// plugin pod's SELinux options; the plugin has no API credentials.
#[test]
fn every_pod_runs_with_least_privilege() {
    let mut problems = Vec::new();
    for overlay in overlays() {
        let objects = render(&format!("overlays/{overlay}"));
        problems.extend(posture_problems(&overlay, &objects));
        let pods: Vec<(&str, &Value)> = kind(&objects, "DaemonSet")
            .into_iter()
            .map(|d| (name(d), &d["spec"]["template"]["spec"]))
            .collect();
        let se = |n: &str| {
            pods.iter()
                .find(|(d, _)| *d == n)
                .map(|(_, p)| p["securityContext"]["seLinuxOptions"].clone())
        };
        if let (Some(dra), Some(plugin)) = (se("intel-gpu-dra"), se("intel-gpu-plugin"))
            && (dra != plugin || dra.is_null())
        {
            problems.push(format!(
                "{overlay}: the DRA pod's SELinux options {dra} differ from the plugin's {plugin}"
            ));
        }
        if let Some((_, plugin)) = pods.iter().find(|(d, _)| *d == "intel-gpu-plugin")
            && plugin["automountServiceAccountToken"] != false
        {
            problems.push(format!("{overlay}: the plugin is given an API token"));
        }
        for b in kind(&objects, "RoleBinding")
            .into_iter()
            .chain(kind(&objects, "ClusterRoleBinding"))
        {
            let to_plugin = b["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == "intel-device-plugin");
            if to_plugin {
                problems.push(format!("{overlay}: {} binds a role to the plugin", name(b)));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The check sees what it must: a labeller as root, a writable `/sys`, a
/// `/dev` not recursively read-only are each reported.
#[test]
fn the_posture_check_can_fail() {
    let objects = render("base");
    let labeller = |f: &dyn Fn(&mut Value)| {
        let mut o = objects.clone();
        for ds in &mut o {
            if ds["kind"] == "DaemonSet" && name(ds) == "intel-gpu-labeler" {
                f(&mut ds["spec"]["template"]["spec"]);
            }
        }
        posture_problems("base", &o)
    };
    assert!(posture_problems("base", &objects).is_empty());
    let root = labeller(&|p| p["securityContext"]["runAsUser"] = 0.into());
    assert!(root[0].contains("runs as root"), "{root:?}");
    let writable = labeller(&|p| p["containers"][0]["volumeMounts"][0]["readOnly"] = false.into());
    assert!(
        writable[0].contains("/sys mounted writable"),
        "{writable:?}"
    );
    let shallow = labeller(&|p| {
        p["containers"][0]["volumeMounts"][1]
            .as_object_mut()
            .unwrap()
            .remove("recursiveReadOnly");
    });
    assert!(shallow[0].contains("not recursively"), "{shallow:?}");
}

/// The labeller's policy is in every install for 1.30 and later and in
/// none for older clusters; the DRA driver's slices policy comes with the
/// DRA install; each is bound with `Deny`.
#[test]
fn admission_policies_ship_where_the_cluster_has_them() {
    let mut problems = Vec::new();
    for overlay in overlays() {
        let objects = render(&format!("overlays/{overlay}"));
        let policies: BTreeSet<&str> = kind(&objects, "ValidatingAdmissionPolicy")
            .into_iter()
            .map(name)
            .collect();
        for b in kind(&objects, "ValidatingAdmissionPolicyBinding") {
            let actions = &b["spec"]["validationActions"];
            if actions
                .as_array()
                .is_none_or(|a| !a.contains(&"Deny".into()))
            {
                problems.push(format!("{overlay}: binding {} does not deny", name(b)));
            }
            if !policies.contains(b["spec"]["policyName"].as_str().unwrap_or("")) {
                problems.push(format!("{overlay}: binding {} names no policy", name(b)));
            }
        }
        for p in kind(&objects, "ValidatingAdmissionPolicy")
            .into_iter()
            .chain(kind(&objects, "ValidatingAdmissionPolicyBinding"))
        {
            if !p["metadata"]["namespace"].is_null() {
                problems.push(format!("{overlay}: {} has a namespace", name(p)));
            }
        }
        let labeller = policies.contains("intel-gpu-labeler");
        if labeller == BEFORE_1_30.contains(&overlay.as_str()) {
            problems.push(format!(
                "{overlay}: the labeller's policy is {}",
                if labeller {
                    "there, for clusters without it"
                } else {
                    "missing"
                }
            ));
        }
        let dra_ds = kind(&objects, "DaemonSet")
            .iter()
            .any(|d| name(d) == "intel-gpu-dra");
        if dra_ds != policies.contains("intel-gpu-dra-resourceslices") {
            problems.push(format!(
                "{overlay}: the DRA driver and its slices policy come apart"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The string literals of a CEL list literal (`['a', 'b']`).
fn cel_strings(expression: &str) -> Vec<String> {
    let inner = expression
        .trim()
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not a CEL list literal: {expression}"));
    inner
        .split(',')
        .map(|s| {
            let s = s.trim();
            s.strip_prefix('\'')
                .and_then(|s| s.strip_suffix('\''))
                .unwrap_or_else(|| panic!("not a quoted string: {s}"))
                .to_owned()
        })
        .collect()
}

/// Every label and annotation key the labeller sets, from its own pure
/// decision on nodes that exercise each: the plugin label from the
/// enabled-plugins content StarlingX ships, on a node for the device plugin
/// and one given to the DRA driver; the discovery labels of several nodes
/// (continuation keys included); the grace-clock annotation on a node
/// whose GPUs are gone.
fn labeller_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    use gpu_discovery::owner::{MODE_DRA, MODE_LABEL};
    use node_labeler::desired::Decision;
    use node_labeler::reconcile::{Intent, NodeView, Policy, reconcile};

    let plugins = enabled_plugins::parse(
        "enabled_kube_plugins",
        br#"{"intel-gpu-plugin": "intelgpu=enabled"}"#,
    )
    .unwrap();
    let label = plugins.gpu_plugin().unwrap().clone();
    let decision = Decision::Enabled(label);
    let policy = Policy {
        discovery_labels: true,
        removal_grace: std::time::Duration::from_secs(300),
        plugin_label_prefixes: node_labeler::desired::LabelPrefixes::unprefixed_only(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut inventories = Vec::new();
    for (i, spec) in [
        fake_gpu_node::NodeSpec::starlingx_edge_with_arc(),
        fake_gpu_node::NodeSpec::battlemage_workstation(),
        fake_gpu_node::NodeSpec::flex_vfs(4, 15),
    ]
    .iter()
    .enumerate()
    {
        let node = fake_gpu_node::FakeNode::build(&dir.path().join(i.to_string()), spec).unwrap();
        inventories.push(
            gpu_discovery::scan(&gpu_discovery::DiscoveryConfig::new(
                node.sysfs_root(),
                node.devfs_root(),
            ))
            .unwrap(),
        );
    }
    let (mut labels, mut annotations) = (BTreeSet::new(), BTreeSet::new());
    let mut take = |intent: Intent| {
        let Intent::Apply {
            labels: l,
            annotations: a,
            ..
        } = intent
        else {
            panic!("opted out");
        };
        labels.extend(l.into_keys());
        annotations.extend(a.into_keys());
    };
    let dra = NodeView {
        labels: [(MODE_LABEL.to_owned(), MODE_DRA.to_owned())].into(),
        ..NodeView::default()
    };
    for inv in &inventories {
        for view in [&NodeView::default(), &dra] {
            take(reconcile(view, inv, &decision, &policy, 1000));
        }
    }
    // The GPUs gone, within the grace: the labels kept, the clock set.
    let Intent::Apply { labels: had, .. } = reconcile(
        &NodeView::default(),
        &inventories[0],
        &decision,
        &policy,
        1000,
    ) else {
        panic!("opted out");
    };
    let gone = NodeView {
        owned_labels: had.keys().cloned().collect(),
        labels: had,
        ..NodeView::default()
    };
    let empty = gpu_discovery::Inventory {
        schema: gpu_discovery::SCHEMA,
        gpus: Vec::new(),
        skipped: Vec::new(),
    };
    take(reconcile(&gone, &empty, &decision, &policy, 1100));
    (labels, annotations)
}

/// The labeller's admission policy allows every label and annotation the
/// labeller sets, and names nothing it never sets: its key lists (CEL
/// variables `labelKeys`, `labelPrefixes`, `annotationKeys`) against the
/// labeller's own decision.
#[test]
fn the_labellers_policy_allows_exactly_its_keys() {
    let objects = render("base");
    let policy = kind(&objects, "ValidatingAdmissionPolicy")
        .into_iter()
        .find(|p| name(p) == "intel-gpu-labeler")
        .expect("the base carries the labeller's policy");
    let variable = |n: &str| {
        let v = policy["spec"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no variable {n}"));
        cel_strings(v["expression"].as_str().unwrap())
    };
    let (keys, prefixes, annotation_keys) = (
        variable("labelKeys"),
        variable("labelPrefixes"),
        variable("annotationKeys"),
    );
    let allowed =
        |k: &str| keys.iter().any(|x| x == k) || prefixes.iter().any(|p| k.starts_with(p));
    let (labels, annotations) = labeller_keys();
    assert!(labels.contains("intelgpu-dra"), "{labels:?}");
    let refused: Vec<&String> = labels.iter().filter(|k| !allowed(k)).collect();
    assert!(refused.is_empty(), "the policy refuses {refused:?}");
    let unset: Vec<&String> = keys.iter().filter(|k| !labels.contains(*k)).collect();
    assert!(
        unset.is_empty(),
        "the policy allows keys the labeller never sets: {unset:?}"
    );
    for p in &prefixes {
        assert!(
            labels.iter().any(|k| k.starts_with(p.as_str())),
            "no label under {p}"
        );
    }
    assert_eq!(
        annotations,
        annotation_keys.into_iter().collect::<BTreeSet<_>>(),
        "annotations set (left) and allowed (right)"
    );
    // The validations use the lists.
    let validations = policy["spec"]["validations"].to_string();
    for v in ["labelKeys", "labelPrefixes", "annotationKeys"] {
        assert!(
            validations.contains(&format!("variables.{v}")),
            "{v} unused"
        );
    }
}

/// Host mode's unit: root for the kubelet's credentials, but with no
/// capability, no new privileges, only the address families it uses, the
/// system-service syscalls, and a read-only system.
#[test]
fn the_systemd_unit_is_confined() {
    let unit =
        std::fs::read_to_string(root().join("deploy/systemd/intel-gpu-labeler.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}="))
            .trim()
            .to_owned()
    };
    assert_eq!(value("CapabilityBoundingSet"), "");
    assert_eq!(value("AmbientCapabilities"), "");
    assert_eq!(value("NoNewPrivileges"), "yes");
    assert_eq!(value("SystemCallFilter"), "@system-service");
    assert_eq!(value("ProtectSystem"), "strict");
    assert_eq!(value("ProtectHome"), "yes");
    let families = value("RestrictAddressFamilies");
    let allowed = ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"];
    assert!(
        families.split_whitespace().all(|f| allowed.contains(&f)),
        "{families}"
    );
    assert!(
        !unit
            .lines()
            .any(|l| l.starts_with("User=") || l.starts_with("DynamicUser=yes")),
        "the kubelet's credentials are root's"
    );
}

/// Every namespaced object of every overlay has its namespace, no
/// cluster-scoped one has any (kustomize does not know the newer kinds),
/// and every service account a binding names has one (a subject without it
/// binds nothing: the DRA overlay once left its driver's out).
#[test]
fn every_namespaced_object_has_its_namespace() {
    const NAMESPACED: &[&str] = &[
        "ServiceAccount",
        "DaemonSet",
        "Role",
        "RoleBinding",
        "ConfigMap",
    ];
    const CLUSTER_SCOPED: &[&str] = &[
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "DeviceClass",
    ];
    let mut problems = Vec::new();
    for overlay in overlays() {
        for o in render(&format!("overlays/{overlay}")) {
            let k = o["kind"].as_str().unwrap_or("");
            if NAMESPACED.contains(&k) && o["metadata"]["namespace"].is_null() {
                problems.push(format!("{overlay}: {k} {} has no namespace", name(&o)));
            }
            if CLUSTER_SCOPED.contains(&k) && !o["metadata"]["namespace"].is_null() {
                problems.push(format!(
                    "{overlay}: cluster-scoped {k} {} has a namespace",
                    name(&o)
                ));
            }
            if !NAMESPACED.contains(&k) && !CLUSTER_SCOPED.contains(&k) {
                problems.push(format!(
                    "{overlay}: {k} {}: which scope? (add it above)",
                    name(&o)
                ));
            }
            for s in o["subjects"].as_array().into_iter().flatten() {
                if s["kind"] == "ServiceAccount" && s["namespace"].is_null() {
                    problems.push(format!(
                        "{overlay}: {k} {} names service account {} without a namespace",
                        name(&o),
                        s["name"]
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The device plugin never calls the API server: it has no Kubernetes
/// client to call it with (its pod mounts no token and no role binds it,
/// `every_pod_runs_with_least_privilege`), so it has no RBAC to prove.
#[test]
fn the_plugin_has_no_api_client() {
    let manifest: toml::Table =
        std::fs::read_to_string(root().join("bins/intel-gpu-plugin/Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let deps = manifest["dependencies"].as_table().unwrap();
    for client in [
        "kube",
        "kube-client",
        "k8s-openapi",
        "node-events",
        "node-labeler",
        "dra-api",
    ] {
        assert!(!deps.contains_key(client), "the plugin depends on {client}");
    }
}
