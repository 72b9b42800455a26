//! The HTTP/1.1 side: keep-alive connections, routing, Kubernetes `Status`
//! errors, chunked watch streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Fault, Seen, Shared};

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Go sets TCP_NODELAY on every TCP connection (`net/tcpsock.go`
        // `newTCPConn`), so the API server's replies are never held back by
        // Nagle's algorithm waiting for the client's delayed ACK (40 ms).
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, Arc::clone(&shared)));
    }
}

pub(crate) struct Request {
    method: String,
    target: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub(crate) fn query(&self, key: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| unescape(v))
        })
    }
}

pub(crate) fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return None;
    }
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        let (fault, seen) = {
            let mut st = shared.lock();
            st.requests.push(Seen {
                method: req.method.clone(),
                target: req.target.clone(),
                content_type: req.headers.get("content-type").cloned(),
                status: 0,
            });
            (st.fault(), st.requests.len() - 1)
        };
        // What was answered, for RBAC's view of the request (an apply that
        // created its object is authorized as `create` too).
        let answered = |code: u16| {
            if let Some(s) = shared.lock().requests.get_mut(seen) {
                s.status = code;
            }
        };
        let close = req
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let injected = match fault {
            Some(Fault::Drop) => return,
            Some(Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                None
            }
            Some(Fault::Internal) => {
                Some((500, status(500, "InternalError", "injected fault"), None))
            }
            Some(Fault::Unavailable) => Some((
                503,
                status(503, "ServiceUnavailable", "injected fault"),
                None,
            )),
            Some(Fault::TooManyRequests) => Some((
                429,
                status(429, "TooManyRequests", "injected fault"),
                Some(("Retry-After", "1")),
            )),
            None => None,
        };
        if let Some((code, body, header)) = injected {
            answered(code);
            let extra: Vec<(&str, &str)> = header.into_iter().collect();
            if write(&mut stream, code, &body, &extra).await.is_err() || close {
                return;
            }
            continue;
        }
        if req.method == "GET" && req.query("watch").is_some_and(|w| w == "true" || w == "1") {
            let parts: Vec<String> = req
                .path()
                .trim_matches('/')
                .split('/')
                .map(str::to_owned)
                .collect();
            let target = match parts
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice()
            {
                ["api", "v1", "nodes"] => Some((crate::Kind::Node, None)),
                ["api", "v1", "namespaces", ns, "configmaps"] => {
                    Some((crate::Kind::ConfigMap, Some((*ns).to_owned())))
                }
                ["apis", "resource.k8s.io", "v1", "resourceslices"] => {
                    Some((crate::Kind::ResourceSlice, None))
                }
                [
                    "apis",
                    "resource.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "resourceclaims",
                ] => Some((crate::Kind::ResourceClaim, Some((*ns).to_owned()))),
                ["apis", "resource.k8s.io", "v1", "deviceclasses"] => {
                    Some((crate::Kind::DeviceClass, None))
                }
                _ => None,
            };
            if let Some((kind, ns)) = target {
                answered(200);
                watch(stream, &shared, &req, kind, ns).await;
                return;
            }
        }
        let (code, body) = route(&shared, &req);
        answered(code);
        let close = req
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if write(&mut stream, code, &body, &[]).await.is_err() || close {
            return;
        }
    }
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn write(
    stream: &mut TcpStream,
    code: u16,
    body: &Value,
    extra: &[(&str, &str)],
) -> std::io::Result<()> {
    let text = body.to_string();
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason_phrase(code),
        text.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // One write, as net/http's buffered writer makes it.
    head.push_str(&text);
    stream.write_all(head.as_bytes()).await
}

pub(crate) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

fn string_map(v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|s| (k.clone(), s.to_owned()))
                    .ok_or_else(|| format!("{k} is not a string"))
            })
            .collect(),
        Some(_) => Err("not an object".into()),
    }
}

fn route(shared: &Shared, req: &Request) -> (u16, Value) {
    let path = req.path();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "nodes"]) => {
            let only = name_selector(req);
            let st = shared.lock();
            let items: Vec<Value> = st
                .nodes
                .iter()
                .filter(|(n, _)| only.as_ref().is_none_or(|o| o == *n))
                .map(|(_, o)| o.to_json("Node"))
                .collect();
            (
                200,
                json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": st.next_rv.to_string()}, "items": items}),
            )
        }
        ("GET", ["api", "v1", "namespaces", ns, "configmaps"]) => {
            let only = name_selector(req);
            let st = shared.lock();
            let items: Vec<Value> = st
                .configmaps
                .iter()
                .filter(|((n, name), _)| n == ns && only.as_ref().is_none_or(|o| o == name))
                .map(|((n, name), (data, rv))| crate::configmap_json(n, name, data, *rv))
                .collect();
            (
                200,
                json!({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": st.next_rv.to_string()}, "items": items}),
            )
        }
        ("GET", ["api", "v1", "nodes", name]) => {
            let mut st = shared.lock();
            let answer = match st.nodes.get(*name) {
                Some(o) => (200, o.to_json("Node")),
                None => (
                    404,
                    status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                ),
            };
            // A test's hook: the Node goes right after this read.
            if st.delete_after_get.as_deref() == Some(*name) {
                st.delete_after_get = None;
                st.nodes.remove(*name);
                drop(st);
                shared.notify();
            }
            answer
        }
        ("PATCH", ["api", "v1", "nodes", name]) => patch_node(shared, req, name),
        ("GET", ["apis", "resource.k8s.io", "v1", "deviceclasses", name]) => {
            let st = shared.lock();
            match st.device_classes.get(*name) {
                Some(c) => (200, c.clone()),
                None => (
                    404,
                    status(
                        404,
                        "NotFound",
                        &format!("deviceclasses.resource.k8s.io \"{name}\" not found"),
                    ),
                ),
            }
        }
        ("GET", ["apis", "resource.k8s.io", "v1", "resourceslices"]) => {
            crate::slices::list(shared, req)
        }
        ("PATCH", ["apis", "resource.k8s.io", "v1", "resourceslices", name]) => {
            crate::slices::apply(shared, req, name)
        }
        ("DELETE", ["apis", "resource.k8s.io", "v1", "resourceslices", name]) => {
            crate::slices::delete(shared, req, name)
        }
        (
            "GET",
            [
                "apis",
                "resource.k8s.io",
                "v1",
                "namespaces",
                ns,
                "resourceclaims",
                name,
            ],
        ) => {
            let st = shared.lock();
            match st
                .resource_claims
                .get(&((*ns).to_owned(), (*name).to_owned()))
            {
                Some(claim) => (200, claim.clone()),
                None => (
                    404,
                    status(
                        404,
                        "NotFound",
                        &format!("resourceclaims.resource.k8s.io \"{name}\" not found"),
                    ),
                ),
            }
        }
        // Server-side apply of a ConfigMap's data: created when missing, as
        // every apply (`handlers/patch.go`); the keys given are set.
        ("PATCH", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let is_apply = req
                .headers
                .get("content-type")
                .is_some_and(|c| c.starts_with("application/apply-patch"));
            // Other patch types are not emulated (nothing here sends them).
            if !is_apply {
                return (
                    415,
                    status(
                        415,
                        "UnsupportedMediaType",
                        "the emulator takes only server-side apply for ConfigMaps",
                    ),
                );
            }
            // As for Nodes: the apply handler's required field manager.
            if req.query("fieldManager").is_none() {
                return (
                    422,
                    status(
                        422,
                        "Invalid",
                        "fieldManager is required for apply requests",
                    ),
                );
            }
            let body: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return (400, status(400, "BadRequest", &e.to_string())),
            };
            let data = match string_map(body.get("data")) {
                Ok(d) => d,
                Err(e) => return (422, status(422, "Invalid", &e)),
            };
            let key = ((*ns).to_owned(), (*name).to_owned());
            let (changed, created) = {
                let mut st = shared.lock();
                let rv = st.next_rv + 1;
                let created = !st.configmaps.contains_key(&key);
                let entry = st
                    .configmaps
                    .entry(key.clone())
                    .or_insert_with(|| (BTreeMap::new(), 0));
                let before = entry.clone();
                entry.0.extend(data);
                let changed = *entry != before;
                if changed {
                    entry.1 = rv;
                    st.next_rv = rv;
                }
                (changed, created)
            };
            if changed {
                shared.notify();
            }
            let st = shared.lock();
            let (data, rv) = &st.configmaps[&key];
            let code = if created { 201 } else { 200 };
            (code, crate::configmap_json(ns, name, data, *rv))
        }
        ("GET", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match shared
                .lock()
                .configmaps
                .get(&((*ns).to_owned(), (*name).to_owned()))
            {
                Some((data, rv)) => (200, crate::configmap_json(ns, name, data, *rv)),
                None => (
                    404,
                    status(404, "NotFound", &format!("configmaps \"{name}\" not found")),
                ),
            }
        }
        (
            "POST",
            ["api", "v1", "namespaces", _, "events"]
            | ["apis", "events.k8s.io", "v1", "namespaces", _, "events"],
        ) => match serde_json::from_slice::<Value>(&req.body) {
            Ok(v) => {
                let mut st = shared.lock();
                // A named object that exists already: 409 AlreadyExists,
                // as every create.
                let name = v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if !name.is_empty()
                    && st
                        .events
                        .iter()
                        .any(|e| e["metadata"]["name"] == name.as_str())
                {
                    return (
                        409,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("events \"{name}\" already exists"),
                        ),
                    );
                }
                st.events.push(v.clone());
                (201, v)
            }
            Err(e) => (400, status(400, "BadRequest", &e.to_string())),
        },
        // "Who am I": the username the credentials authenticate as
        // (authentication.k8s.io/v1 SelfSubjectReview, GA in 1.28, KEP-3325;
        // `pkg/registry/authentication/selfsubjectreview/rest.go` answers
        // 201 with `status.userInfo`).
        ("POST", ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"]) => {
            let user = shared.lock().user();
            (
                201,
                json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "SelfSubjectReview",
                    "metadata": {"creationTimestamp": null},
                    "status": {"userInfo": {"username": user, "groups": ["system:authenticated"]}},
                }),
            )
        }
        ("GET", ["api", "v1", "namespaces", ns, "events", name]) => {
            let st = shared.lock();
            match st.events.iter().find(|e| {
                e["metadata"]["name"] == *name
                    && e["metadata"]["namespace"].as_str().is_none_or(|n| n == *ns)
            }) {
                Some(e) => (200, e.clone()),
                None => (
                    404,
                    status(404, "NotFound", &format!("events \"{name}\" not found")),
                ),
            }
        }
        // A repeated event: the recorder patches its count and times (JSON
        // merge patch of top-level fields).
        ("PATCH", ["api", "v1", "namespaces", _, "events", name]) => {
            let patch: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return (400, status(400, "BadRequest", &e.to_string())),
            };
            let mut st = shared.lock();
            match st
                .events
                .iter_mut()
                .find(|e| e["metadata"]["name"] == *name)
            {
                Some(e) => {
                    if let (Some(target), Some(fields)) = (e.as_object_mut(), patch.as_object()) {
                        for (k, v) in fields {
                            if k != "metadata" {
                                target.insert(k.clone(), v.clone());
                            }
                        }
                    }
                    (200, e.clone())
                }
                None => (
                    404,
                    status(404, "NotFound", &format!("events \"{name}\" not found")),
                ),
            }
        }
        _ => (
            404,
            status(
                404,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({} {path})",
                    req.method
                ),
            ),
        ),
    }
}

fn patch_node(shared: &Shared, req: &Request, name: &str) -> (u16, Value) {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return (
                400,
                status(400, "BadRequest", &format!("the body is not JSON: {e}")),
            );
        }
    };
    let meta = body.get("metadata");
    let content_type = req
        .headers
        .get("content-type")
        .map(String::as_str)
        .unwrap_or("");
    let manager = req.query("fieldManager");
    // An apply that creates answers 201, as every create does
    // (`staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go`:
    // `wasCreated` → `http.StatusCreated`).
    let mut was_created = false;
    let (changed, before) = {
        let mut st = shared.lock();
        let rv = st.next_rv + 1;
        let before = st.nodes.get(name).map(|n| n.labels.clone());
        if content_type.starts_with("application/apply-patch") {
            let Some(manager) = manager.clone() else {
                return (
                    422,
                    status(
                        422,
                        "Invalid",
                        "fieldManager is required for apply requests",
                    ),
                );
            };
            if meta.and_then(|m| m.get("name")).and_then(Value::as_str) != Some(name) {
                return (
                    400,
                    status(400, "BadRequest", "metadata.name must match the path"),
                );
            }
            let (labels, annotations) = match (
                string_map(meta.and_then(|m| m.get("labels"))),
                string_map(meta.and_then(|m| m.get("annotations"))),
            ) {
                (Ok(l), Ok(a)) => (l, a),
                (Err(e), _) | (_, Err(e)) => return (422, status(422, "Invalid", &e)),
            };
            let precondition = meta
                .and_then(|m| m.get("resourceVersion"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let uid = meta
                .and_then(|m| m.get("uid"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let force = req.query("force").is_some_and(|f| f == "true");
            // The storage's precondition check (`Preconditions.Check`,
            // `staging/src/k8s.io/apiserver/pkg/storage/interfaces.go`): a
            // uid names the one object meant; a missing or replaced object
            // fails it with 409 (the integration test
            // TestCreateOnApplyFailsWithUID, kubernetes PR 138908).
            if let Some(want) = &uid {
                let have = st
                    .nodes
                    .get(name)
                    .map(|n| n.uid.clone())
                    .unwrap_or_default();
                if *want != have {
                    return (
                        409,
                        status(
                            409,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on nodes \"{name}\": Precondition failed: UID in precondition: {want}, UID in object meta: {have}"
                            ),
                        ),
                    );
                }
            }
            let created = !st.nodes.contains_key(name);
            if created {
                // Creating through apply is authorized as `create`
                // (`handlers/patch.go`: withAuthorization on the create
                // validation), so RBAC without it answers 403.
                if st.forbidden.contains("create") {
                    return (
                        403,
                        status(
                            403,
                            "Forbidden",
                            &format!(
                                "nodes \"{name}\" is forbidden: User \"{}\" cannot create resource \"nodes\" in API group \"\" at the cluster scope",
                                st.user()
                            ),
                        ),
                    );
                }
                // As the API server: an apply creates a missing object,
                // whatever resourceVersion it carries (kubernetes issue
                // 106745; `handlers/patch.go` forces create on apply, PR
                // 65723), and a resourceVersion is not checked on create.
                st.next_uid += 1;
                let uid = st.next_uid;
                st.nodes
                    .insert(name.to_owned(), crate::Object::new(name, uid, rv));
            }
            let Some(node) = st.nodes.get_mut(name) else {
                return (500, status(500, "InternalError", "vanished"));
            };
            if let Some(pre) = precondition
                && !created
                && pre != node.resource_version.to_string()
            {
                return (
                    409,
                    status(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    ),
                );
            }
            match node.apply(&manager, &labels, &annotations, force) {
                Ok(changed) => {
                    if changed {
                        node.resource_version = rv;
                    }
                    was_created = created;
                    (changed || created, before)
                }
                Err(conflicts) => {
                    let causes: Vec<Value> = conflicts
                        .iter()
                        .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field}))
                        .collect();
                    let list: Vec<String> = conflicts
                        .iter()
                        .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
                        .collect();
                    let mut s = status(
                        409,
                        "Conflict",
                        &format!(
                            "Apply failed with {} conflict(s): {}",
                            conflicts.len(),
                            list.join("; ")
                        ),
                    );
                    s["details"] = json!({"name": name, "kind": "nodes", "causes": causes});
                    return (409, s);
                }
            }
        } else if content_type.starts_with("application/merge-patch+json") {
            let Some(node) = st.nodes.get_mut(name) else {
                return (
                    404,
                    status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                );
            };
            let empty = serde_json::Map::new();
            let labels = meta
                .and_then(|m| m.get("labels"))
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            let annotations = meta
                .and_then(|m| m.get("annotations"))
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            let changed = node.merge(manager.as_deref().unwrap_or("unknown"), labels, annotations);
            if changed {
                node.resource_version = rv;
            }
            (changed, before)
        } else {
            return (
                415,
                status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the content type {content_type:?} is not supported"),
                ),
            );
        }
    };
    let mut st = shared.lock();
    if changed {
        st.next_rv += 1;
        let after = st
            .nodes
            .get(name)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        st.writes.push(crate::NodeWrite {
            at: std::time::Instant::now(),
            node: name.to_owned(),
            manager: manager.unwrap_or_else(|| "unknown".to_owned()),
            created: was_created,
            labels_before: before.unwrap_or_default(),
            labels_after: after,
        });
    }
    let out = st
        .nodes
        .get(name)
        .map(|o| o.to_json("Node"))
        .unwrap_or(Value::Null);
    drop(st);
    if changed {
        shared.notify();
    }
    (if was_created { 201 } else { 200 }, out)
}

/// `fieldSelector=metadata.name=X` → `X`.
fn name_selector(req: &Request) -> Option<String> {
    req.query("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_owned))
}

async fn send_event(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    let chunk = format!("{:x}\r\n{line}\r\n", line.len());
    stream.write_all(chunk.as_bytes()).await
}

/// A watch of Nodes or of one namespace's ConfigMaps (optionally one
/// object, by `fieldSelector=metadata.name=X`), as the API server's watch
/// cache serves it (`staging/src/k8s.io/apiserver/pkg/storage/cacher`):
/// - `resourceVersion=N` resumes after N, replaying every change since; an
///   N older than the kept history gets a `410 Expired` ERROR event (then
///   the client lists again);
/// - without one (or `0`), the current objects come first as `ADDED`;
/// - `allowWatchBookmarks=true` adds `BOOKMARK` events carrying the latest
///   resourceVersion (every `bookmark_every`, 60 s by default);
/// - it ends after `timeoutSeconds` (kube-rs asks 290 s).
async fn watch(
    mut stream: TcpStream,
    shared: &Shared,
    req: &Request,
    kind: crate::Kind,
    namespace: Option<String>,
) {
    let only = name_selector(req);
    let timeout = req
        .query("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let from = req
        .query("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v != 0);
    let bookmarks = req
        .query("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    // Field selectors on the object, besides `metadata.name` above: the
    // selectable fields ResourceSlices register (`spec.nodeName`,
    // `spec.driver`: `ResourceSliceSelectorNodeName`/`…Driver` in
    // `resource/v1/types.go`, served by `pkg/registry/resource/
    // resourceslice/strategy.go`). The other kinds register none.
    let fields: Vec<(String, String)> = req
        .query("fieldSelector")
        .unwrap_or_default()
        .split(',')
        .filter_map(|t| t.split_once('='))
        .filter(|(k, _)| k.starts_with("spec."))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let selected = move |o: &Value| {
        fields.iter().all(|(k, v)| {
            let field = k.strip_prefix("spec.").unwrap_or(k);
            o["spec"][field].as_str() == Some(v.as_str())
        })
    };
    let matches = |c: &crate::Change| {
        c.kind == kind
            && namespace.as_ref().is_none_or(|ns| *ns == c.namespace)
            && only.as_ref().is_none_or(|o| *o == c.name)
            && selected(&c.object)
    };
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    // Every read of the history records first, under the same lock: a
    // change whose request has not yet recorded it must be neither skipped
    // (the cursor past it) nor sent twice. The watch cache never skips an
    // event (`cacher/watch_cache.go`).
    let start = {
        let mut st = shared.lock();
        st.record();
        match from {
            Some(rv) if rv < st.floor => None,
            Some(rv) => Some((rv, st.bookmark_every, Vec::new())),
            None => {
                let initial: Vec<Value> = st
                    .logged
                    .iter()
                    .filter(|((k, ns, name), (_, obj))| {
                        *k == kind
                            && namespace.as_ref().is_none_or(|n| n == ns)
                            && only.as_ref().is_none_or(|o| o == name)
                            && selected(obj)
                    })
                    .map(|(_, (_, obj))| json!({"type": "ADDED", "object": obj}))
                    .collect();
                Some((st.next_rv, st.bookmark_every, initial))
            }
        }
    };
    let Some((mut cursor, every, initial)) = start else {
        let rv = from.unwrap_or_default();
        let gone = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {rv} (the history starts after it)"))});
        let _ = send_event(&mut stream, &gone).await;
        let _ = stream.write_all(b"0\r\n\r\n").await;
        return;
    };
    for e in &initial {
        if send_event(&mut stream, e).await.is_err() {
            return;
        }
    }
    let mut rx = shared.changed.subscribe();
    let mut dropped = shared.drop_watches.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bookmark = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut bookmark_due = false;
    loop {
        let (pending, latest) = {
            let mut st = shared.lock();
            st.record();
            let pending: Vec<crate::Change> = st
                .log
                .iter()
                .filter(|c| c.rv > cursor && matches(c))
                .cloned()
                .collect();
            (pending, st.next_rv)
        };
        for c in pending {
            cursor = cursor.max(c.rv);
            if send_event(&mut stream, &json!({"type": c.typ, "object": c.object}))
                .await
                .is_err()
            {
                return;
            }
        }
        // A bookmark only after every change up to its resourceVersion was
        // sent (`cacher.go`: a bookmark promises nothing older is pending).
        if bookmark_due {
            bookmark_due = false;
            cursor = cursor.max(latest);
            let (kind_name, api_version) = kind.names();
            let b = json!({"type": "BOOKMARK", "object": {"kind": kind_name, "apiVersion": api_version, "metadata": {"resourceVersion": latest.to_string()}}});
            if send_event(&mut stream, &b).await.is_err() {
                return;
            }
        }
        let mut probe = [0u8; 1];
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = dropped.changed() => return,
            () = tokio::time::sleep_until(deadline) => break,
            _ = bookmark.tick(), if bookmarks => bookmark_due = true,
            n = stream.peek(&mut probe) => if matches!(n, Ok(0) | Err(_)) { return },
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
}
