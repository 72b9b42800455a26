//! The emulator over raw HTTP: what a real API server would answer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use apiserver_emulator::{ApiServer, Fault};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn call(
    api: &ApiServer,
    method: &str,
    path: &str,
    ctype: &str,
    body: &Value,
) -> (u16, Value) {
    let addr = api.url().trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (code, json)
}

const APPLY: &str = "application/apply-patch+yaml";

/// Apply creates a missing object, whatever resourceVersion it carries
/// (kubernetes issue 106745); a uid precondition is the one thing in the
/// body that stops it; without `create` permission it is forbidden.
#[tokio::test]
async fn apply_creates_a_missing_object_unless_a_uid_or_rbac_stops_it() {
    let api = ApiServer::start().await.unwrap();
    let apply = |name: &str, meta: Value| {
        let mut body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"a": "1"}}});
        for (k, v) in meta.as_object().unwrap() {
            body["metadata"][k] = v.clone();
        }
        (format!("/api/v1/nodes/{name}?fieldManager=m"), body)
    };
    let (path, body) = apply("n1", json!({}));
    let (code, node) = call(&api, "PATCH", &path, APPLY, &body).await;
    assert_eq!(code, 201, "created (handlers/patch.go: wasCreated)");
    assert_eq!(node["metadata"]["labels"]["a"], "1");
    assert!(
        api.node("n1").is_some(),
        "created, as the real API server does"
    );
    let (path, body) = apply("n2", json!({"resourceVersion": "5"}));
    let (code, _) = call(&api, "PATCH", &path, APPLY, &body).await;
    assert_eq!(code, 201, "a resourceVersion does not stop the creation");
    assert!(api.node("n2").is_some());
    let (path, body) = apply("n3", json!({"uid": "00000000-0000-4000-8000-000000000001"}));
    let (code, status) = call(&api, "PATCH", &path, APPLY, &body).await;
    assert_eq!(code, 409);
    assert_eq!(status["kind"], "Status");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("Precondition failed: UID in precondition")
    );
    assert!(api.node("n3").is_none(), "a uid precondition never creates");
    // The uid also refuses a replaced Node.
    let old = api.node("n1").unwrap().uid;
    api.delete_node("n1");
    api.add_node("n1");
    let (path, body) = apply("n1", json!({"uid": old}));
    let (code, _) = call(&api, "PATCH", &path, APPLY, &body).await;
    assert_eq!(code, 409);
    // RBAC without create.
    api.forbid_node_creation();
    let (path, body) = apply("n4", json!({}));
    let (code, status) = call(&api, "PATCH", &path, APPLY, &body).await;
    assert_eq!(code, 403);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("cannot create resource \"nodes\"")
    );
    assert!(api.node("n4").is_none());
    // The audit trail: the two creations by apply, who made them, and
    // nothing for the refused writes or the test's own add_node.
    let writes = api.node_writes();
    let created: Vec<&str> = writes
        .iter()
        .filter(|w| w.created)
        .map(|w| w.node.as_str())
        .collect();
    assert_eq!(created, ["n1", "n2"]);
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert!(
        writes
            .iter()
            .all(|w| w.manager == "m" && w.labels_before.is_empty())
    );
    assert_eq!(
        writes[0].labels_after.get("a").map(String::as_str),
        Some("1")
    );
}

#[tokio::test]
async fn conflicts_and_errors_are_statuses() {
    let api = ApiServer::start().await.unwrap();
    api.add_node("n");
    api.set_label("n", "kubectl", "a", Some("mine"));
    let body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "labels": {"a": "theirs"}}});
    let (code, status) = call(
        &api,
        "PATCH",
        "/api/v1/nodes/n?fieldManager=m",
        APPLY,
        &body,
    )
    .await;
    assert_eq!(code, 409);
    assert_eq!(
        status["details"]["causes"][0]["field"],
        ".metadata.labels.a"
    );
    let (code, _) = call(
        &api,
        "PATCH",
        "/api/v1/nodes/n?fieldManager=m&force=true",
        APPLY,
        &body,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(api.node("n").unwrap().labels["a"], "theirs");
    let (code, _) = call(&api, "PATCH", "/api/v1/nodes/n", APPLY, &body).await;
    assert_eq!(code, 422, "apply needs a field manager");
    let (code, status) = call(
        &api,
        "GET",
        "/api/v1/nodes/missing",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    api.inject(&[Fault::TooManyRequests, Fault::Unavailable]);
    assert_eq!(
        call(
            &api,
            "GET",
            "/api/v1/nodes/n",
            "application/json",
            &Value::Null
        )
        .await
        .0,
        429
    );
    assert_eq!(
        call(
            &api,
            "GET",
            "/api/v1/nodes/n",
            "application/json",
            &Value::Null
        )
        .await
        .0,
        503
    );
    assert_eq!(
        call(
            &api,
            "GET",
            "/api/v1/nodes/n",
            "application/json",
            &Value::Null
        )
        .await
        .0,
        200
    );
}

/// Opens a watch and returns the first `n` events (or fewer at the end).
async fn watch_events(api: &ApiServer, path: &str, n: usize) -> Vec<Value> {
    let addr = api.url().trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while events.len() < n {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await;
        let Ok(Ok(k)) = read else { break };
        if k == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..k]);
        let text = String::from_utf8_lossy(&buf).to_string();
        events = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
    }
    events
}

/// Watches as the API server's watch cache serves them: resumed from a
/// resourceVersion with every change since, `410 Expired` past the kept
/// history, bookmarks when asked for, ConfigMaps too.
#[tokio::test]
async fn watches_resume_expire_and_bookmark() {
    let api = ApiServer::start().await.unwrap();
    api.add_node("n");
    let rv: u64 = api.node("n").unwrap().resource_version;
    api.set_label("n", "kubectl", "a", Some("1"));
    api.set_label("n", "kubectl", "a", Some("2"));
    api.delete_node("n");
    let events = watch_events(
        &api,
        &format!("/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dn&resourceVersion={rv}"),
        3,
    )
    .await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["MODIFIED", "MODIFIED", "DELETED"],
        "every change since {rv}"
    );
    assert_eq!(events[1]["object"]["metadata"]["labels"]["a"], "2");
    // Compacted: resuming from before the history is 410 Expired.
    api.compact();
    let events = watch_events(
        &api,
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}"),
        1,
    )
    .await;
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
    // Bookmarks carry the latest resourceVersion.
    api.bookmark_every(std::time::Duration::from_millis(50));
    api.add_node("m");
    let events = watch_events(
        &api,
        "/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion=999999",
        1,
    )
    .await;
    assert_eq!(events[0]["type"], "BOOKMARK");
    assert!(
        events[0]["object"]["metadata"]["resourceVersion"]
            .as_str()
            .is_some()
    );
    // ConfigMaps of a namespace, one by name; without a resourceVersion the
    // current object comes first.
    api.set_configmap("ns", "cm", &[("k", "v1")]);
    let path = "/api/v1/namespaces/ns/configmaps?watch=true&fieldSelector=metadata.name%3Dcm";
    let first = watch_events(&api, path, 1).await;
    assert_eq!(first[0]["type"], "ADDED");
    assert_eq!(first[0]["object"]["data"]["k"], "v1");
    let from = first[0]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    api.set_configmap("ns", "cm", &[("k", "v2")]);
    api.delete_configmap("ns", "cm");
    let later = watch_events(&api, &format!("{path}&resourceVersion={from}"), 2).await;
    let types: Vec<&str> = later.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["MODIFIED", "DELETED"]);
}

/// ResourceSlices: validated as the API server does, listed by field
/// selector, deleted with a UID precondition.
#[tokio::test]
async fn resource_slices_are_validated_selected_and_deleted() {
    let api = ApiServer::start().await.unwrap();
    let slice = |name: &str, node: &str, devices: usize| {
        let devices: Vec<Value> = (0..devices)
            .map(|i| json!({"name": format!("d{i}")}))
            .collect();
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": name},
            "spec": {"driver": "gpu.example.com", "nodeName": node,
                "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                "devices": devices}})
    };
    let path =
        |name: &str| format!("/apis/resource.k8s.io/v1/resourceslices/{name}?fieldManager=m");
    let (code, _) = call(&api, "PATCH", &path("a"), APPLY, &slice("a", "n1", 2)).await;
    assert_eq!(code, 201);
    let (code, _) = call(&api, "PATCH", &path("b"), APPLY, &slice("b", "n2", 1)).await;
    assert_eq!(code, 201);
    let (code, s) = call(&api, "PATCH", &path("c"), APPLY, &slice("c", "n1", 129)).await;
    assert_eq!(code, 422);
    assert!(
        s["message"].as_str().unwrap().contains("at most 128"),
        "{s}"
    );
    let mut dup = slice("c", "n1", 2);
    dup["spec"]["devices"][1]["name"] = json!("d0");
    let (code, s) = call(&api, "PATCH", &path("c"), APPLY, &dup).await;
    assert_eq!(code, 422);
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains(r#"spec.devices[1].name: Duplicate value: "d0""#),
        "{s}"
    );
    let (code, list) = call(
        &api,
        "GET",
        "/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3Dn1%2Cspec.driver%3Dgpu.example.com",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a"]);
    let (code, _) = call(
        &api,
        "DELETE",
        "/apis/resource.k8s.io/v1/resourceslices/a",
        "application/json",
        &json!({"preconditions": {"uid": "not-its-uid"}}),
    )
    .await;
    assert_eq!(code, 409);
    let (code, _) = call(
        &api,
        "DELETE",
        "/apis/resource.k8s.io/v1/resourceslices/a",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(api.resource_slices().len(), 1);
}

#[tokio::test]
async fn device_classes_are_served() {
    let api = ApiServer::start().await.unwrap();
    api.set_device_class(
        "gpu.example.com",
        json!({"selectors": [{"cel": {"expression": "device.driver == \"gpu.example.com\""}}]}),
    );
    let (code, class) = call(
        &api,
        "GET",
        "/apis/resource.k8s.io/v1/deviceclasses/gpu.example.com",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(class["kind"], "DeviceClass");
    assert!(
        class["spec"]["selectors"][0]["cel"]["expression"]
            .as_str()
            .unwrap()
            .contains("gpu.example.com")
    );
    let (code, _) = call(
        &api,
        "GET",
        "/apis/resource.k8s.io/v1/deviceclasses/nope",
        "application/json",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 404);
}

/// The `resource.k8s.io` kinds are watched as the others: changes as
/// events, a ResourceSlice watch filtered by its field selectors.
#[tokio::test]
async fn resource_kinds_are_watched() {
    let api = ApiServer::start().await.unwrap();
    let slice = |name: &str, node: &str| {
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": name},
            "spec": {"driver": "gpu.example.com", "nodeName": node,
                "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                "devices": [{"name": "d0"}]}})
    };
    let path =
        |name: &str| format!("/apis/resource.k8s.io/v1/resourceslices/{name}?fieldManager=m");
    call(&api, "PATCH", &path("a"), APPLY, &slice("a", "n1")).await;
    call(&api, "PATCH", &path("b"), APPLY, &slice("b", "n2")).await;
    let events = watch_events(
        &api,
        "/apis/resource.k8s.io/v1/resourceslices?watch=true&fieldSelector=spec.nodeName%3Dn1",
        2,
    )
    .await;
    assert_eq!(events.len(), 1, "only n1's slice: {events:?}");
    assert_eq!(events[0]["object"]["metadata"]["name"], "a");
    api.create_resource_claim("ns", "c", json!({}));
    let events = watch_events(
        &api,
        "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims?watch=true",
        1,
    )
    .await;
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["kind"], "ResourceClaim");
    api.set_device_class("gpu", json!({}));
    let events = watch_events(&api, "/apis/resource.k8s.io/v1/deviceclasses?watch=true", 1).await;
    assert_eq!(events[0]["object"]["kind"], "DeviceClass");
}
