//! The stand-in allocator: the scheduler's structured allocator
//! (`staging/src/k8s.io/dynamic-resource-allocation/structured/internal/
//! experimental/allocator_experimental.go`, `consumable_capacity.go`,
//! `pools_experimental.go`, v0.34/v0.35) reduced to what a node's driver
//! is tested against: which devices may be handed out, and to how many
//! claims. Selection is by attribute equality (CEL is not evaluated,
//! tolerations are not supported); the rules kept are those that decide
//! double booking:
//! - a device without `allowMultipleAllocations` (or with the gate off)
//!   goes to one claim at a time;
//! - a device with it goes to several, each consuming from every
//!   capacity what its request policy makes of the request (not
//!   requested: the default, else the whole capacity; below `min`: `min`;
//!   else rounded up to `min + k × step`, or to the next valid value), the
//!   sums within each capacity's value; a request naming a capacity the
//!   device lacks does not fit it; a capacity request with the gate off is
//!   an error;
//! - with DRAPartitionableDevices, devices allocated at once draw from
//!   their counter sets (in the device's slice in 1.34, anywhere in the
//!   pool from 1.35) and the sums stay within each counter's value; a
//!   device is counted once however many claims share it;
//! - with DRADeviceTaints, a tainted device is not allocated;
//! - only the highest generation of a pool counts, and from 1.35 a pool
//!   missing slices of that generation is not used.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::quantity::{self, Milli};
use crate::{DraApi, State};

/// One request of a claim, for [`crate::ApiServer::allocate`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRequest {
    /// The request's name.
    pub name: String,
    /// The driver whose devices it wants.
    pub driver: String,
    /// Attributes that must be equal (`("type", json!({"string": "vf"}))`).
    pub attributes: Vec<(String, Value)>,
    /// How many devices.
    pub count: usize,
    /// `exactly.capacity.requests`: capacity name → quantity.
    pub capacity: BTreeMap<String, String>,
}

impl DeviceRequest {
    /// One device of `driver` for request `name`.
    #[must_use]
    pub fn new(name: &str, driver: &str) -> Self {
        Self {
            name: name.to_owned(),
            driver: driver.to_owned(),
            attributes: Vec::new(),
            count: 1,
            capacity: BTreeMap::new(),
        }
    }

    /// Wants `n` devices.
    #[must_use]
    pub fn count(mut self, n: usize) -> Self {
        self.count = n;
        self
    }

    /// Wants attribute `key` equal to `value`.
    #[must_use]
    pub fn attribute(mut self, key: &str, value: Value) -> Self {
        self.attributes.push((key.to_owned(), value));
        self
    }

    /// Asks for `quantity` of capacity `key`.
    #[must_use]
    pub fn capacity(mut self, key: &str, quantity: &str) -> Self {
        self.capacity.insert(key.to_owned(), quantity.to_owned());
        self
    }
}

/// One device allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The request.
    pub request: String,
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
    /// Set for a device allocated to several claims.
    pub share_id: Option<String>,
    /// What this allocation consumes of each capacity (shared devices).
    pub consumed: BTreeMap<String, String>,
}

/// A published device.
struct Candidate {
    driver: String,
    pool: String,
    slice: String,
    device: Value,
}

/// What is allocated already: per device, exclusive or the consumptions
/// of its shares.
#[derive(Default)]
struct Usage {
    exclusive: BTreeSet<(String, String, String)>,
    shares: BTreeMap<(String, String, String), Vec<BTreeMap<String, Milli>>>,
}

impl Usage {
    fn busy(&self, key: &(String, String, String)) -> bool {
        self.exclusive.contains(key) || self.shares.contains_key(key)
    }
}

fn key(c: &Candidate) -> (String, String, String) {
    (
        c.driver.clone(),
        c.pool.clone(),
        c.device["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Devices of the highest generation of each usable pool, and the
/// counter sets: 1.34 by slice name, later by pool.
fn candidates(st: &State, api: DraApi) -> (Vec<Candidate>, BTreeMap<(String, String), Value>) {
    let mut newest: BTreeMap<(String, String), (i64, usize, i64)> = BTreeMap::new();
    for sl in st.resource_slices.values() {
        let k = (
            sl["spec"]["driver"].as_str().unwrap_or_default().to_owned(),
            sl["spec"]["pool"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let g = sl["spec"]["pool"]["generation"].as_i64().unwrap_or(0);
        let want = sl["spec"]["pool"]["resourceSliceCount"]
            .as_i64()
            .unwrap_or(0);
        let e = newest.entry(k).or_insert((g, 0, want));
        if g > e.0 {
            *e = (g, 0, want);
        }
        if g == e.0 {
            e.1 += 1;
        }
    }
    let mut out = Vec::new();
    let mut sets = BTreeMap::new();
    for (name, sl) in &st.resource_slices {
        let driver = sl["spec"]["driver"].as_str().unwrap_or_default().to_owned();
        let pool = sl["spec"]["pool"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some((g, have, want)) = newest.get(&(driver.clone(), pool.clone())).copied() else {
            continue;
        };
        if sl["spec"]["pool"]["generation"].as_i64() != Some(g) {
            continue;
        }
        // `pools_experimental.go` (1.35): incomplete pools are not used.
        if api.minor >= 35 && i64::try_from(have).unwrap_or(i64::MAX) < want {
            continue;
        }
        for set in sl["spec"]["sharedCounters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let set_name = set["name"].as_str().unwrap_or_default();
            let scope = if api.minor >= 35 { &pool } else { name };
            sets.insert(
                (scope.clone(), set_name.to_owned()),
                set["counters"].clone(),
            );
        }
        for d in sl["spec"]["devices"].as_array().into_iter().flatten() {
            out.push(Candidate {
                driver: driver.clone(),
                pool: pool.clone(),
                slice: name.clone(),
                device: d.clone(),
            });
        }
    }
    (out, sets)
}

/// `consumable_capacity.go`: what a request consumes of one capacity.
fn consumption(capacity: &Value, requested: Option<Milli>) -> Option<Milli> {
    let value = capacity["value"].as_str().and_then(quantity::parse)?;
    let policy = &capacity["requestPolicy"];
    let q = |v: &Value| v.as_str().and_then(quantity::parse);
    let Some(r) = requested else {
        return Some(q(&policy["default"]).unwrap_or(value));
    };
    if policy.is_null() {
        return Some(r);
    }
    let range = &policy["validRange"];
    if let Some(min) = q(&range["min"]) {
        if r < min {
            return Some(min);
        }
        return Some(match q(&range["step"]) {
            Some(step) if step > 0 => min + (r - min + step - 1) / step * step,
            _ => r,
        });
    }
    let values: Vec<Milli> = policy["validValues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(q)
        .collect();
    Some(values.into_iter().find(|v| *v >= r).unwrap_or(r))
}

/// `violatesPolicy`.
fn violates(capacity: &Value, consumed: Milli) -> bool {
    let policy = &capacity["requestPolicy"];
    let q = |v: &Value| v.as_str().and_then(quantity::parse);
    if policy.is_null() || q(&policy["default"]) == Some(consumed) {
        return false;
    }
    let range = &policy["validRange"];
    if let Some(min) = q(&range["min"]) {
        if q(&range["max"]).is_some_and(|m| consumed > m) {
            return true;
        }
        return q(&range["step"]).is_some_and(|s| s > 0 && (consumed - min) % s != 0);
    }
    match policy["validValues"].as_array() {
        Some(values) => !values.iter().filter_map(q).any(|v| v == consumed),
        None => false,
    }
}

/// Counter draws of `devices` (each once), per counter set.
fn draws<'a>(
    devices: impl Iterator<Item = &'a Candidate>,
    api: DraApi,
) -> BTreeMap<(String, String), BTreeMap<String, Milli>> {
    let mut out: BTreeMap<(String, String), BTreeMap<String, Milli>> = BTreeMap::new();
    for c in devices {
        for use_ in c.device["consumesCounters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let scope = if api.minor >= 35 { &c.pool } else { &c.slice };
            let set = use_["counterSet"].as_str().unwrap_or_default().to_owned();
            let e = out.entry((scope.clone(), set)).or_default();
            for (k, v) in use_["counters"].as_object().into_iter().flatten() {
                *e.entry(k.clone()).or_default() +=
                    v["value"].as_str().and_then(quantity::parse).unwrap_or(0);
            }
        }
    }
    out
}

/// Allocates claim `namespace/name`'s `requests` and records the result in
/// its status, replacing an earlier allocation of it.
pub(crate) fn allocate(
    st: &mut State,
    namespace: &str,
    name: &str,
    requests: &[DeviceRequest],
) -> Result<Vec<Allocation>, String> {
    let me = (namespace.to_owned(), name.to_owned());
    if !st.resource_claims.contains_key(&me) {
        return Err(format!("no ResourceClaim {namespace}/{name}"));
    }
    let api = st.dra;
    // With the gate off the API server drops `capacity` from a claim on
    // write (`dropDisabledDRAResourceClaimConsumableCapacityFields`,
    // `pkg/registry/resource/resourceclaim/strategy.go`): the request is
    // allocated as if it asked for none.
    let dropped: Vec<DeviceRequest>;
    let requests = if api.consumable_capacity {
        requests
    } else {
        dropped = requests
            .iter()
            .map(|r| DeviceRequest {
                capacity: BTreeMap::new(),
                ..r.clone()
            })
            .collect();
        &dropped
    };
    let (candidates, sets) = candidates(st, api);
    let mut usage = Usage::default();
    for (k, claim) in &st.resource_claims {
        if *k == me {
            continue;
        }
        for r in claim["status"]["allocation"]["devices"]["results"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let dk = (
                r["driver"].as_str().unwrap_or_default().to_owned(),
                r["pool"].as_str().unwrap_or_default().to_owned(),
                r["device"].as_str().unwrap_or_default().to_owned(),
            );
            if r["shareID"].is_string() {
                let consumed = r["consumedCapacity"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().and_then(quantity::parse).unwrap_or(0)))
                    .collect();
                usage.shares.entry(dk).or_default().push(consumed);
            } else {
                usage.exclusive.insert(dk);
            }
        }
    }
    let mut chosen: Vec<(usize, Allocation, BTreeMap<String, Milli>)> = Vec::new();
    for req in requests {
        for n in 0..req.count {
            let pick = candidates.iter().enumerate().find_map(|(i, c)| {
                fits(c, req, api, &usage, &chosen, &candidates, &sets).map(|consumed| (i, consumed))
            });
            let Some((i, consumed)) = pick else {
                return Err(format!(
                    "request {} of claim {namespace}/{name}: only {n} of {} devices of {} fit",
                    req.name, req.count, req.driver,
                ));
            };
            let c = &candidates[i];
            let shared = consumed.is_some();
            let consumed = consumed.unwrap_or_default();
            st.next_uid += 1;
            let share_id = shared.then(|| format!("00000000-0000-4000-9000-{:012x}", st.next_uid));
            chosen.push((
                i,
                Allocation {
                    request: req.name.clone(),
                    pool: c.pool.clone(),
                    device: key(c).2,
                    share_id,
                    consumed: consumed
                        .iter()
                        .map(|(k, v)| (k.clone(), quantity::format(*v)))
                        .collect(),
                },
                consumed,
            ));
        }
    }
    let results: Vec<Value> = chosen
        .iter()
        .map(|(i, a, _)| {
            let mut r = json!({
                "request": a.request,
                "driver": candidates[*i].driver,
                "pool": a.pool,
                "device": a.device,
            });
            if let Some(s) = &a.share_id {
                r["shareID"] = json!(s);
                r["consumedCapacity"] = json!(a.consumed);
            }
            r
        })
        .collect();
    let rv = st.bump();
    if let Some(claim) = st.resource_claims.get_mut(&me) {
        claim["status"] = json!({"allocation": {"devices": {"results": results}}});
        claim["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    }
    Ok(chosen.into_iter().map(|(_, a, _)| a).collect())
}

/// Whether `c` can satisfy one device of `req` now: `None` when not,
/// `Some(None)` for an exclusive allocation, `Some(Some(consumed))` for a
/// share.
#[allow(clippy::option_option)]
fn fits(
    c: &Candidate,
    req: &DeviceRequest,
    api: DraApi,
    usage: &Usage,
    chosen: &[(usize, Allocation, BTreeMap<String, Milli>)],
    candidates: &[Candidate],
    sets: &BTreeMap<(String, String), Value>,
) -> Option<Option<BTreeMap<String, Milli>>> {
    let d = &c.device;
    let k = key(c);
    if c.driver != req.driver || !req.attributes.iter().all(|(a, v)| d["attributes"][a] == *v) {
        return None;
    }
    // `taintPreventsAllocation`: any taint but effect `None` (1.35).
    if api.device_taints
        && d["taints"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["effect"] != "None"))
    {
        return None;
    }
    if d["consumesCounters"].is_array() && !api.partitionable_devices {
        return None;
    }
    let in_flight: Vec<&(usize, Allocation, BTreeMap<String, Milli>)> = chosen
        .iter()
        .filter(|(i, _, _)| key(&candidates[*i]) == k)
        .collect();
    let multiple = api.consumable_capacity && d["allowMultipleAllocations"].as_bool() == Some(true);
    for name in req.capacity.keys() {
        // A capacity the device lacks: it does not fit.
        d["capacity"].get(name)?;
    }
    let consumed = if multiple {
        if usage.exclusive.contains(&k) {
            return None;
        }
        let mut consumed = BTreeMap::new();
        for (name, cap) in d["capacity"].as_object().into_iter().flatten() {
            let asked = match req.capacity.get(name) {
                Some(q) => Some(quantity::parse(q)?),
                None => None,
            };
            let take = consumption(cap, asked)?;
            if violates(cap, take) {
                return None;
            }
            let value = cap["value"].as_str().and_then(quantity::parse)?;
            let before: Milli = usage
                .shares
                .get(&k)
                .into_iter()
                .flatten()
                .chain(in_flight.iter().map(|(_, _, c)| c))
                .map(|c| c.get(name).copied().unwrap_or(0))
                .sum();
            if before + take > value {
                return None;
            }
            consumed.insert(name.clone(), take);
        }
        Some(consumed)
    } else {
        if usage.busy(&k) || !in_flight.is_empty() {
            return None;
        }
        for (name, q) in &req.capacity {
            let have = d["capacity"][name]["value"]
                .as_str()
                .and_then(quantity::parse)?;
            if quantity::parse(q)? > have {
                return None;
            }
        }
        None
    };
    if api.partitionable_devices && d["consumesCounters"].is_array() {
        // Every device allocated now or before, each once, plus this one.
        let allocated: BTreeSet<(String, String, String)> = usage
            .exclusive
            .iter()
            .chain(usage.shares.keys())
            .cloned()
            .chain(chosen.iter().map(|(i, _, _)| key(&candidates[*i])))
            .chain([k])
            .collect();
        let drawn = draws(
            candidates.iter().filter(|c| allocated.contains(&key(c))),
            api,
        );
        for ((scope, set), counters) in &drawn {
            let have = sets.get(&(scope.clone(), set.clone()))?;
            for (name, used) in counters {
                let total = have[name]["value"].as_str().and_then(quantity::parse)?;
                if *used > total {
                    return None;
                }
            }
        }
    }
    Some(consumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumption_follows_the_policy() {
        let cap = json!({"value": "1000", "requestPolicy": {"default": "1000", "validRange": {"min": "10", "max": "1000", "step": "10"}}});
        let q = |s: &str| quantity::parse(s);
        assert_eq!(consumption(&cap, None), q("1000"), "not asked: the default");
        assert_eq!(consumption(&cap, q("5")), q("10"), "below min: min");
        assert_eq!(
            consumption(&cap, q("251")),
            q("260"),
            "rounded up to a step"
        );
        assert!(violates(&cap, q("1010").unwrap()), "over max");
        assert!(!violates(&cap, q("260").unwrap()));
        let plain = json!({"value": "16Gi"});
        assert_eq!(consumption(&plain, None), q("16Gi"), "no policy: all of it");
        let values = json!({"value": "8", "requestPolicy": {"default": "8", "validValues": ["2", "4", "8"]}});
        assert_eq!(consumption(&values, q("3")), q("4"));
        assert_eq!(consumption(&values, q("9")), q("9"));
        assert!(violates(&values, q("9").unwrap()));
    }
}
