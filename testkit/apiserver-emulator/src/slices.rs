//! ResourceSlices (`resource.k8s.io/v1`, cluster-scoped): server-side
//! apply, LIST with the field selectors the API server registers for them
//! (`spec.nodeName`, `spec.driver`), DELETE with preconditions, and the
//! validation a DRA driver's slices must pass (`pkg/apis/resource/
//! validation/validation.go` limits, 1.34: at most 128 devices, device
//! names DNS labels unique in the slice, at most 32 attributes and
//! capacities per device, string attributes at most 64 bytes, at most
//! 4 taints with effect `NoSchedule` or `NoExecute` (16, and `None`, from
//! 1.35), exactly one of `nodeName`, `nodeSelector`, `allNodes`,
//! `perDeviceNodeSelection`, a positive `resourceSliceCount`; on update
//! `driver`, `pool.name` and `nodeName` immutable), with `field.Error`'s
//! messages. DELETE answers a success Status, not the object
//! (`Store.finalizeDelete`: ResourceSlices do not return deleted objects).
//! Not checked: qualified attribute names, per-device and per-slice
//! counter-consumption totals.
//!
//! By release and feature gate ([`crate::DraApi`]), as
//! `pkg/registry/resource/resourceslice/strategy.go` and
//! `pkg/apis/resource/validation/validation.go` do:
//! - a field of a disabled gate is **dropped on write**, not refused,
//!   unless the stored object already uses it (`dropDisabled…Fields`):
//!   `allowMultipleAllocations` and `capacity[*].requestPolicy`
//!   (DRAConsumableCapacity), `sharedCounters`, `perDeviceNodeSelection`
//!   and per device `consumesCounters`, `nodeName`, `nodeSelector`,
//!   `allNodes` (DRAPartitionableDevices), `taints` (DRADeviceTaints);
//! - 1.34: a device's `consumesCounters` must name a counter set (and its
//!   counters) in the same slice, at most 32 counters in all sets;
//! - 1.35 and later: `sharedCounters` and `devices` exclude each other
//!   (kubernetes PR 134189), at most 8 counter sets, and at most 64
//!   devices when one has taints or consumes counters; references are not
//!   checked on write (the scheduler checks them per pool);
//! - a `requestPolicy` needs `allowMultipleAllocations`, and its default
//!   must be valid (`validateRequestPolicy…`).
//! - `dryRun=All` answers what would be stored, storing nothing.
//!
//! Apply here replaces the spec and the owner references with what the
//! applier sends (one field manager writes a slice: its driver); merging
//! several managers' fields of a slice is not emulated.

use serde_json::{Value, json};

use crate::http::{Request, status};
use crate::quantity;
use crate::{DraApi, Shared};

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The validation errors of a slice's spec (`old`: the stored one, for an
/// update), empty when it is valid. Messages are `field.Error`'s:
/// `<path>: Invalid value: …`, `Duplicate value: …`.
pub(crate) fn validate(spec: &Value, old: Option<&Value>, api: DraApi) -> Vec<String> {
    let mut errors = Vec::new();
    // `validateResourceSliceUpdate`: driver, pool name and node name are
    // immutable.
    if let Some(old) = old {
        for (path, field) in [
            ("spec.driver", &spec["driver"]),
            ("spec.pool.name", &spec["pool"]["name"]),
            ("spec.nodeName", &spec["nodeName"]),
        ] {
            let was = match path {
                "spec.driver" => &old["driver"],
                "spec.pool.name" => &old["pool"]["name"],
                _ => &old["nodeName"],
            };
            if field != was {
                errors.push(format!(
                    "{path}: Invalid value: {field}: field is immutable"
                ));
            }
        }
    }
    let counter_sets = spec["sharedCounters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
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
    let limited = devices
        .iter()
        .any(|d| d["taints"].is_array() || d["consumesCounters"].is_array());
    let max = if api.minor >= 35 && limited { 64 } else { 128 };
    if devices.len() > max {
        errors.push(format!(
            "spec.devices: Too many: {}: must have at most {max} items",
            devices.len()
        ));
    }
    errors.extend(validate_counters(spec, &counter_sets, api));
    let mut names = std::collections::BTreeSet::new();
    for (i, d) in devices.iter().enumerate() {
        let name = d["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            errors.push(format!(
                "spec.devices[{i}].name: {name:?} is not a DNS label"
            ));
        }
        if !names.insert(name.to_owned()) {
            errors.push(format!("spec.devices[{i}].name: Duplicate value: {name:?}"));
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
            // `len(...)` in Go: bytes, not characters.
            if value["string"].as_str().is_some_and(|s| s.len() > 64) {
                errors.push(format!(
                    "spec.devices[{i}].attributes[{key}].string: Too long: may not be more than 64 bytes"
                ));
            }
        }
        errors.extend(validate_capacity(i, d));
        let taints = d["taints"].as_array().cloned().unwrap_or_default();
        // `DeviceTaintsMaxLength`: 4 in 1.34, 16 from 1.35, which also
        // adds the effect `None`.
        let max_taints = if api.minor >= 35 { 16 } else { 4 };
        if taints.len() > max_taints {
            errors.push(format!(
                "spec.devices[{i}].taints: Too many: {}: must have at most {max_taints} items",
                taints.len()
            ));
        }
        for (j, t) in taints.iter().enumerate() {
            let ok = match t["effect"].as_str() {
                Some("NoSchedule" | "NoExecute") => true,
                Some("None") => api.minor >= 35,
                _ => false,
            };
            if !ok {
                errors.push(format!(
                    "spec.devices[{i}].taints[{j}].effect: Unsupported value: {}",
                    t["effect"]
                ));
            }
        }
    }
    errors
}

fn validate_counters(spec: &Value, sets: &[Value], api: DraApi) -> Vec<String> {
    let mut errors = Vec::new();
    if api.minor >= 35 {
        if spec.get("sharedCounters").is_some_and(|v| !v.is_null())
            && spec.get("devices").is_some_and(|v| !v.is_null())
        {
            errors.push(
                "spec: Invalid value: \"\": only one of `sharedCounters` or `devices` is allowed"
                    .to_owned(),
            );
        }
        if sets.len() > 8 {
            errors.push(format!(
                "spec.sharedCounters: Too many: {}: must have at most 8 items",
                sets.len()
            ));
        }
    } else {
        let total: usize = sets
            .iter()
            .map(|s| s["counters"].as_object().map_or(0, serde_json::Map::len))
            .sum();
        if total > 32 {
            errors.push(format!(
                "spec.sharedCounters: at most 32 counters in all sets, has {total}"
            ));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, set) in sets.iter().enumerate() {
        let name = set["name"].as_str().unwrap_or_default();
        if !dns_label(name) || !names.insert(name) {
            errors.push(format!(
                "spec.sharedCounters[{i}].name: {name:?} is not a unique DNS label"
            ));
        }
        for (k, v) in set["counters"].as_object().into_iter().flatten() {
            if !dns_label(k) || v["value"].as_str().and_then(quantity::parse).is_none() {
                errors.push(format!(
                    "spec.sharedCounters[{i}].counters[{k}]: a DNS label with a quantity value"
                ));
            }
        }
    }
    for (i, d) in spec["devices"].as_array().into_iter().flatten().enumerate() {
        for (j, c) in d["consumesCounters"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let set_name = c["counterSet"].as_str().unwrap_or_default();
            if api.minor >= 35 {
                continue;
            }
            let Some(set) = sets.iter().find(|s| s["name"].as_str() == Some(set_name)) else {
                errors.push(format!(
                    "spec.devices[{i}].consumesCounters[{j}].counterSet: Invalid value: {set_name:?}: must reference a counterSet defined in the ResourceSlice sharedCounters"
                ));
                continue;
            };
            for k in c["counters"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
            {
                if set["counters"].get(k).is_none() {
                    errors.push(format!(
                        "spec.devices[{i}].consumesCounters[{j}].counters: Invalid value: {k:?}: must reference a counter defined in the ResourceSlice sharedCounters"
                    ));
                }
            }
        }
    }
    errors
}

/// `validateMultiAllocatableDeviceCapacity` and `validateRequestPolicy…`.
fn validate_capacity(i: usize, d: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let multiple = d["allowMultipleAllocations"].as_bool() == Some(true);
    for (k, c) in d["capacity"].as_object().into_iter().flatten() {
        let at = format!("spec.devices[{i}].capacity[{k}]");
        let Some(value) = c["value"].as_str().and_then(quantity::parse) else {
            errors.push(format!("{at}.value: not a quantity"));
            continue;
        };
        let policy = &c["requestPolicy"];
        if policy.is_null() {
            continue;
        }
        if !multiple {
            errors.push(format!(
                "{at}.requestPolicy: Forbidden: allowMultipleAllocations must be true"
            ));
            continue;
        }
        let q = |v: &Value| v.as_str().and_then(quantity::parse);
        let default = q(&policy["default"]);
        let values: Vec<Option<i128>> = policy["validValues"]
            .as_array()
            .into_iter()
            .flatten()
            .map(q)
            .collect();
        let range = &policy["validRange"];
        if !values.is_empty() && !range.is_null() {
            errors.push(format!(
                "{at}.requestPolicy: Forbidden: only one of validValues, validRange"
            ));
            continue;
        }
        if (!values.is_empty() || !range.is_null()) && default.is_none() {
            errors.push(format!("{at}.requestPolicy.default: Required value"));
            continue;
        }
        if !values.is_empty() {
            let vals: Vec<i128> = values.iter().flatten().copied().collect();
            let sorted = vals.windows(2).all(|w| w[0] < w[1]);
            if vals.len() != values.len()
                || vals.len() > 10
                || !sorted
                || vals.iter().any(|v| *v > value)
            {
                errors.push(format!("{at}.requestPolicy.validValues: at most 10 ascending unique quantities within the capacity"));
            }
            if default.is_some_and(|d| !vals.contains(&d)) {
                errors.push(format!("{at}.requestPolicy.default: default value is not valid according to the requestPolicy"));
            }
        } else if !range.is_null() {
            let (Some(min), Some(default)) = (q(&range["min"]), default) else {
                errors.push(format!("{at}.requestPolicy.validRange.min: Required value"));
                continue;
            };
            let max = q(&range["max"]);
            let step = q(&range["step"]);
            let bad = min > value
                || default < min
                || max.is_some_and(|m| m < min || m > value || default > m)
                || step.is_some_and(|s| {
                    let (ws, wmin) = (quantity::whole(s), quantity::whole(min));
                    ws <= 0
                        || min + s > value
                        || (quantity::whole(default) - wmin) % ws != 0
                        || max.is_some_and(|m| (quantity::whole(m) - wmin) % ws != 0)
                });
            if bad {
                errors.push(format!(
                    "{at}.requestPolicy: default value is not valid according to the requestPolicy"
                ));
            }
        }
    }
    errors
}

/// Drops the fields of disabled gates, unless `old` uses them
/// (`dropDisabledDRA…Fields`, `resourceslice/strategy.go`).
fn drop_disabled(spec: &mut Value, old: Option<&Value>, api: DraApi) {
    let old_devices = || {
        old.and_then(|o| o["devices"].as_array())
            .cloned()
            .unwrap_or_default()
    };
    let old_uses = |f: &dyn Fn(&Value) -> bool| old_devices().iter().any(f);
    if !api.consumable_capacity
        && !old_uses(&|d| {
            d["allowMultipleAllocations"].is_boolean()
                || d["capacity"]
                    .as_object()
                    .is_some_and(|c| c.values().any(|c| c.get("requestPolicy").is_some()))
        })
    {
        for d in spec["devices"].as_array_mut().into_iter().flatten() {
            if let Some(o) = d.as_object_mut() {
                o.remove("allowMultipleAllocations");
            }
            for c in d["capacity"].as_object_mut().into_iter().flatten() {
                if let Some(c) = c.1.as_object_mut() {
                    c.remove("requestPolicy");
                }
            }
        }
    }
    let old_partitions = old.is_some_and(|o| {
        o.get("sharedCounters").is_some() || o.get("perDeviceNodeSelection").is_some()
    }) || old_uses(&|d| {
        ["consumesCounters", "nodeName", "nodeSelector", "allNodes"]
            .iter()
            .any(|f| d.get(*f).is_some())
    });
    if !api.partitionable_devices && !old_partitions {
        if let Some(o) = spec.as_object_mut() {
            o.remove("sharedCounters");
            o.remove("perDeviceNodeSelection");
        }
        for d in spec["devices"].as_array_mut().into_iter().flatten() {
            if let Some(o) = d.as_object_mut() {
                for f in ["consumesCounters", "nodeName", "nodeSelector", "allNodes"] {
                    o.remove(f);
                }
            }
        }
    }
    if !api.device_taints && !old_uses(&|d| d.get("taints").is_some()) {
        for d in spec["devices"].as_array_mut().into_iter().flatten() {
            if let Some(o) = d.as_object_mut() {
                o.remove("taints");
            }
        }
    }
}

/// `PATCH /apis/resource.k8s.io/v1/resourceslices/{name}` with
/// `application/apply-patch+yaml`: created when missing (a new UID),
/// otherwise its spec and owners replaced. Merge patches get 415: an
/// emulator limit (the real server takes them). Every apply is a new
/// resourceVersion, even one that changes nothing (the real server keeps
/// it then): a driver that reapplies the same slice sees extra events here,
/// never fewer.
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
    let mut body: Value = match serde_json::from_slice(&req.body) {
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
    let dry_run = req.query("dryRun").is_some_and(|d| d == "All");
    let (api, old) = {
        let st = shared.lock();
        let old = st.resource_slices.get(name).map(|o| o["spec"].clone());
        drop_disabled(&mut body["spec"], old.as_ref(), st.dra);
        (st.dra, old)
    };
    let errors = validate(&body["spec"], old.as_ref(), api);
    if !errors.is_empty() {
        // `field.ErrorList.ToAggregate`: one error as it is, several in
        // brackets.
        let list = if let [one] = errors.as_slice() {
            one.clone()
        } else {
            format!("[{}]", errors.join(", "))
        };
        return (
            422,
            status(
                422,
                "Invalid",
                &format!("ResourceSlice.resource.k8s.io \"{name}\" is invalid: {list}"),
            ),
        );
    }
    let out = {
        let mut st = shared.lock();
        let existing = st.resource_slices.get(name).map(|o| o["metadata"].clone());
        // A dry run answers what would be stored (`registry/dryrun.go`):
        // a create gets a uid and no resourceVersion, an update keeps the
        // stored one.
        let rv = match (&existing, dry_run) {
            (_, false) => st.bump().to_string(),
            (Some(m), true) => m["resourceVersion"].as_str().unwrap_or_default().to_owned(),
            (None, true) => String::new(),
        };
        let created = existing.is_none();
        let uid = match &existing {
            Some(m) => m["uid"].as_str().unwrap_or_default().to_owned(),
            None => {
                st.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", st.next_uid)
            }
        };
        let obj = json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": name,
                "uid": uid,
                "resourceVersion": rv,
                "ownerReferences": body["metadata"]["ownerReferences"].clone(),
            },
            "spec": body["spec"].clone(),
        });
        if dry_run {
            return (if created { 201 } else { 200 }, obj);
        }
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
        let have = existing["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(want) = body["preconditions"]["uid"].as_str()
            && have != want
        {
            return (
                409,
                status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on resourceslices.resource.k8s.io \"{name}\": Precondition failed: UID in precondition: {want}, UID in object meta: {have}"
                    ),
                ),
            );
        }
        st.resource_slices.remove(name);
        // ResourceSlice storage does not return the deleted object: the
        // answer is a success Status (`Store.finalizeDelete`).
        (
            200,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "group": "resource.k8s.io", "kind": "resourceslices", "uid": have},
            }),
        )
    };
    shared.notify();
    out
}
