//! ResourceSlices (`resource.k8s.io/v1`, cluster-scoped): server-side
//! apply, LIST with the field selectors the API server registers for them
//! (`spec.nodeName`, `spec.driver`), DELETE with preconditions, and the
//! validation a DRA driver's slices must pass (`pkg/apis/resource/
//! validation/validation.go` limits, 1.34: at most 128 devices, device
//! names DNS labels unique in the slice, at most 32 attributes and
//! capacities per device, string attributes at most 64 characters, at most
//! 4 taints with effect `NoSchedule` or `NoExecute`, exactly one of
//! `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection`, a
//! positive `resourceSliceCount`).
//!
//! Apply here replaces the spec and the owner references with what the
//! applier sends (one field manager writes a slice: its driver); merging
//! several managers' fields of a slice is not emulated.

use serde_json::{Value, json};

use crate::Shared;
use crate::http::{Request, status};

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The validation errors of a slice's spec, empty when it is valid.
pub(crate) fn validate(spec: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let driver = spec["driver"].as_str().unwrap_or_default();
    if driver.is_empty() || driver.len() > 63 {
        errors.push("spec.driver: required, at most 63 characters".to_owned());
    }
    let pool = &spec["pool"];
    let pool_name = pool["name"].as_str().unwrap_or_default();
    if pool_name.is_empty() || pool_name.len() > 253 {
        errors.push("spec.pool.name: required, at most 253 characters".to_owned());
    }
    if pool["resourceSliceCount"].as_i64().unwrap_or(0) <= 0 {
        errors.push("spec.pool.resourceSliceCount: must be greater than zero".to_owned());
    }
    let selections = [
        spec["nodeName"].as_str().is_some_and(|n| !n.is_empty()),
        spec["nodeSelector"].is_object(),
        spec["allNodes"].as_bool() == Some(true),
        spec["perDeviceNodeSelection"].as_bool() == Some(true),
    ];
    if selections.iter().filter(|s| **s).count() != 1 {
        errors.push(
            "spec: exactly one of nodeName, nodeSelector, allNodes, perDeviceNodeSelection is required"
                .to_owned(),
        );
    }
    let devices = spec["devices"].as_array().cloned().unwrap_or_default();
    if devices.len() > 128 {
        errors.push(format!(
            "spec.devices: must have at most 128 items, has {}",
            devices.len()
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, d) in devices.iter().enumerate() {
        let name = d["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            errors.push(format!(
                "spec.devices[{i}].name: {name:?} is not a DNS label"
            ));
        }
        if !names.insert(name.to_owned()) {
            errors.push(format!("spec.devices[{i}].name: {name:?} is a duplicate"));
        }
        let attributes = d["attributes"].as_object().map_or(0, serde_json::Map::len);
        let capacity = d["capacity"].as_object().map_or(0, serde_json::Map::len);
        if attributes + capacity > 32 {
            errors.push(format!(
                "spec.devices[{i}]: at most 32 attributes and capacities, has {}",
                attributes + capacity
            ));
        }
        for (key, value) in d["attributes"].as_object().into_iter().flatten() {
            let set = ["int", "bool", "string", "version"]
                .iter()
                .filter(|k| value.get(**k).is_some())
                .count();
            if set != 1 {
                errors.push(format!(
                    "spec.devices[{i}].attributes[{key}]: exactly one of int, bool, string, version"
                ));
            }
            if value["string"]
                .as_str()
                .is_some_and(|s| s.chars().count() > 64)
            {
                errors.push(format!(
                    "spec.devices[{i}].attributes[{key}].string: at most 64 characters"
                ));
            }
        }
        let taints = d["taints"].as_array().cloned().unwrap_or_default();
        if taints.len() > 4 {
            errors.push(format!("spec.devices[{i}].taints: at most 4"));
        }
        for t in &taints {
            if !matches!(t["effect"].as_str(), Some("NoSchedule" | "NoExecute")) {
                errors.push(format!(
                    "spec.devices[{i}].taints: effect {} is not NoSchedule or NoExecute",
                    t["effect"]
                ));
            }
        }
    }
    errors
}

/// `PATCH /apis/resource.k8s.io/v1/resourceslices/{name}` with
/// `application/apply-patch+yaml`: created when missing (a new UID),
/// otherwise its spec and owners replaced.
pub(crate) fn apply(shared: &Shared, req: &Request, name: &str) -> (u16, Value) {
    let is_apply = req
        .headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/apply-patch"));
    if !is_apply {
        return (
            415,
            status(
                415,
                "UnsupportedMediaType",
                "the emulator takes only server-side apply for ResourceSlices",
            ),
        );
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return (
                400,
                status(400, "BadRequest", &format!("the body is not JSON: {e}")),
            );
        }
    };
    if body["metadata"]["name"].as_str() != Some(name) {
        return (
            400,
            status(400, "BadRequest", "metadata.name must match the path"),
        );
    }
    let errors = validate(&body["spec"]);
    if !errors.is_empty() {
        return (
            422,
            status(
                422,
                "Invalid",
                &format!(
                    "ResourceSlice.resource.k8s.io \"{name}\" is invalid: {}",
                    errors.join("; ")
                ),
            ),
        );
    }
    let out = {
        let mut st = shared.lock();
        let rv = st.bump();
        let created = !st.resource_slices.contains_key(name);
        let uid = if created {
            st.next_uid += 1;
            format!("00000000-0000-4000-8000-{:012x}", st.next_uid)
        } else {
            st.resource_slices[name]["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        if !created && st.resource_slices[name]["spec"]["driver"] != body["spec"]["driver"] {
            return (
                422,
                status(
                    422,
                    "Invalid",
                    &format!(
                        "ResourceSlice.resource.k8s.io \"{name}\" is invalid: spec.driver: field is immutable"
                    ),
                ),
            );
        }
        let obj = json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": name,
                "uid": uid,
                "resourceVersion": rv.to_string(),
                "ownerReferences": body["metadata"]["ownerReferences"].clone(),
            },
            "spec": body["spec"].clone(),
        });
        st.resource_slices.insert(name.to_owned(), obj.clone());
        (if created { 201 } else { 200 }, obj)
    };
    shared.notify();
    out
}

/// `GET /apis/resource.k8s.io/v1/resourceslices` with an optional
/// `fieldSelector` of `spec.nodeName=…` and `spec.driver=…` (joined by
/// commas): the fields ResourceSlices make selectable
/// (`ResourceSliceSelectorNodeName`/`…Driver`, `resource/v1/types.go`);
/// any other field label is refused as the API server refuses it.
pub(crate) fn list(shared: &Shared, req: &Request) -> (u16, Value) {
    let mut wants: Vec<(String, String)> = Vec::new();
    for term in req
        .query("fieldSelector")
        .unwrap_or_default()
        .split(',')
        .filter(|t| !t.is_empty())
    {
        let Some((k, v)) = term.split_once('=') else {
            return (
                400,
                status(
                    400,
                    "BadRequest",
                    &format!("invalid field selector {term:?}"),
                ),
            );
        };
        if !matches!(k, "spec.nodeName" | "spec.driver" | "metadata.name") {
            return (
                400,
                status(
                    400,
                    "BadRequest",
                    &format!("field label not supported: {k}"),
                ),
            );
        }
        wants.push((k.to_owned(), v.to_owned()));
    }
    let st = shared.lock();
    let items: Vec<Value> = st
        .resource_slices
        .values()
        .filter(|s| {
            wants.iter().all(|(k, v)| {
                let have = match k.as_str() {
                    "spec.nodeName" => &s["spec"]["nodeName"],
                    "spec.driver" => &s["spec"]["driver"],
                    _ => &s["metadata"]["name"],
                };
                have.as_str().unwrap_or_default() == v
            })
        })
        .cloned()
        .collect();
    (
        200,
        json!({"kind": "ResourceSliceList", "apiVersion": "resource.k8s.io/v1", "metadata": {"resourceVersion": st.next_rv.to_string()}, "items": items}),
    )
}

/// `DELETE /apis/resource.k8s.io/v1/resourceslices/{name}`, honouring a
/// `preconditions.uid` in the body (409 when it is another object).
pub(crate) fn delete(shared: &Shared, req: &Request, name: &str) -> (u16, Value) {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let out = {
        let mut st = shared.lock();
        let Some(existing) = st.resource_slices.get(name) else {
            return (
                404,
                status(
                    404,
                    "NotFound",
                    &format!("resourceslices.resource.k8s.io \"{name}\" not found"),
                ),
            );
        };
        if let Some(want) = body["preconditions"]["uid"].as_str()
            && existing["metadata"]["uid"].as_str() != Some(want)
        {
            return (
                409,
                status(
                    409,
                    "Conflict",
                    &format!("Precondition failed: UID in precondition: {want}"),
                ),
            );
        }
        let removed = st.resource_slices.remove(name).unwrap_or(Value::Null);
        (200, removed)
    };
    shared.notify();
    out
}
