//! ResourceSlice publication (`resource.k8s.io/v1`): a driver's devices on
//! one node as one pool named after the node, split over slices of at most
//! 128 devices (64 when a device has taints: the 1.35 limit, which 1.34
//! accepts too), each owned by the Node (so the garbage collector takes
//! them with it), written by server-side apply under deterministic names
//! `<node>-<driver>-<n>`. The pool's generation moves on every change
//! (consumers trust only the highest). Slices of ours that are not wanted
//! any more are deleted (with a UID precondition). A resync every 30 s
//! (the Go slice controller's sync delay) puts back what someone deleted
//! — a kubelet wipes its node's slices when it starts.
//!
//! Driven like `devplugin-api`'s device lists: [`SlicePublisher::publish`]
//! takes the whole set; the latest set wins; failures are retried with
//! backoff and shown by [`SlicePublisher::status`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::names::DriverName;

/// Devices per slice (`ResourceSliceMaxDevices`).
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// Devices per slice when one has taints (1.35's
/// `ResourceSliceMaxDevicesWithTaintsOrConsumesCounters`).
pub const MAX_TAINTED_DEVICES_PER_SLICE: usize = 64;

/// A device attribute's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// `int`.
    Int(i64),
    /// `bool`.
    Bool(bool),
    /// `string`, at most 64 bytes.
    String(String),
    /// `version`, semantic versioning 2.0.0.
    Version(String),
}

impl Attribute {
    fn to_json(&self) -> Value {
        match self {
            Self::Int(v) => json!({"int": v}),
            Self::Bool(v) => json!({"bool": v}),
            Self::String(v) => json!({"string": v}),
            Self::Version(v) => json!({"version": v}),
        }
    }
}

/// What a device taint does (`NoSchedule`: no new allocations;
/// `NoExecute`: pods using it are evicted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    /// `NoSchedule`.
    NoSchedule,
    /// `NoExecute`.
    NoExecute,
}

/// A device taint (feature gate `DRADeviceTaints`), e.g. for an unhealthy
/// device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTaint {
    /// A label name, e.g. `gpu.intel.com/unhealthy`.
    pub key: String,
    /// A label value, if any.
    pub value: Option<String>,
    /// The effect.
    pub effect: TaintEffect,
}

/// A device as a ResourceSlice lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceDevice {
    name: String,
    attributes: BTreeMap<String, Attribute>,
    capacity: BTreeMap<String, String>,
    policies: BTreeMap<String, RequestPolicy>,
    taints: Vec<DeviceTaint>,
    multiple: bool,
    consumes: BTreeMap<String, BTreeMap<String, String>>,
}

/// How much of a consumable capacity one allocation takes (feature gate
/// `DRAConsumableCapacity`, `resource.k8s.io/v1` `CapacityRequestPolicy`):
/// what a request that does not name the capacity consumes, and which
/// amounts may be asked for. The scheduler rounds a request up to the next
/// valid amount (`min + k × step`, or the next of `values`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Consumed by a request that does not name this capacity.
    pub default: String,
    /// The amounts that may be consumed.
    pub valid: ValidAmounts,
}

/// The amounts a [`RequestPolicy`] allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidAmounts {
    /// `validRange`: from `min`, optionally up to `max`, in steps.
    Range {
        /// The least amount consumed (smaller requests take this).
        min: String,
        /// The most one allocation may take.
        max: Option<String>,
        /// Amounts are `min + k × step`.
        step: Option<String>,
    },
    /// `validValues`: at most 10, ascending.
    Values(Vec<String>),
}

impl RequestPolicy {
    fn to_json(&self) -> Value {
        let mut j = json!({"default": self.default});
        match &self.valid {
            ValidAmounts::Range { min, max, step } => {
                let mut r = json!({"min": min});
                if let Some(m) = max {
                    r["max"] = json!(m);
                }
                if let Some(s) = step {
                    r["step"] = json!(s);
                }
                j["validRange"] = r;
            }
            ValidAmounts::Values(v) => j["validValues"] = json!(v),
        }
        j
    }
}

/// Counters that devices of one pool draw from (feature gate
/// `DRAPartitionableDevices`): e.g. a GPU's SR-IOV slots, consumed whole
/// by the PF and one each by its VFs, so no allocation can take both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSet {
    name: String,
    counters: BTreeMap<String, String>,
}

impl CounterSet {
    /// A counter set named `name` (a DNS label, unique in the pool).
    ///
    /// # Errors
    /// When the name is not a DNS label.
    pub fn new(name: &str) -> Result<Self, DeviceError> {
        if !dns_label(name) {
            return Err(DeviceError {
                device: name.to_owned(),
                reason: "the counter set name is not a DNS label".to_owned(),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            counters: BTreeMap::new(),
        })
    }

    /// Adds a counter (a DNS label) with its total (a quantity).
    #[must_use]
    pub fn counter(mut self, name: &str, value: &str) -> Self {
        self.counters.insert(name.to_owned(), value.to_owned());
        self
    }

    /// The name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    fn to_json(&self) -> Value {
        json!({"name": self.name, "counters": counters_json(&self.counters)})
    }
}

fn counters_json(counters: &BTreeMap<String, String>) -> Value {
    counters
        .iter()
        .map(|(k, v)| (k.clone(), json!({"value": v})))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Where a pool's counter sets are published; the API changed between
/// releases and the two are not compatible (kubernetes PR 134189).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterLayout {
    /// Kubernetes 1.34: a slice holds the counter sets its devices
    /// consume (`must reference a counterSet defined in the ResourceSlice
    /// sharedCounters`), at most 32 counters in all.
    SameSlice,
    /// Kubernetes 1.35 and later: counter sets in slices of their own
    /// (`only one of sharedCounters or devices is allowed`), at most 8
    /// sets each, referenced across the pool.
    OwnSlices,
}

fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A device or a device set the API server would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device:?}: {reason}")]
pub struct DeviceError {
    /// The device.
    pub device: String,
    /// What is wrong.
    pub reason: String,
}

impl SliceDevice {
    /// A device named `name` (a DNS label, unique in the pool).
    ///
    /// # Errors
    /// When the name is not a DNS label.
    pub fn new(name: &str) -> Result<Self, DeviceError> {
        if !dns_label(name) {
            return Err(DeviceError {
                device: name.to_owned(),
                reason: "the name is not a DNS label (lowercase letters, digits, '-', at most 63)"
                    .to_owned(),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            attributes: BTreeMap::new(),
            capacity: BTreeMap::new(),
            policies: BTreeMap::new(),
            taints: Vec::new(),
            multiple: false,
            consumes: BTreeMap::new(),
        })
    }

    /// Sets an attribute (a qualified name: `domain/name`, or a name in
    /// the driver's domain).
    #[must_use]
    pub fn attribute(mut self, name: &str, value: Attribute) -> Self {
        self.attributes.insert(name.to_owned(), value);
        self
    }

    /// Sets a capacity (a Kubernetes quantity, e.g. `16Gi`).
    #[must_use]
    pub fn capacity(mut self, name: &str, quantity: &str) -> Self {
        self.capacity.insert(name.to_owned(), quantity.to_owned());
        self
    }

    /// Sets a consumable capacity: `quantity` in all, shared by the
    /// allocations of a device that [`allows multiple
    /// allocations`](Self::allow_multiple_allocations), each taking what
    /// `policy` makes of its request.
    #[must_use]
    pub fn consumable(mut self, name: &str, quantity: &str, policy: RequestPolicy) -> Self {
        self.capacity.insert(name.to_owned(), quantity.to_owned());
        self.policies.insert(name.to_owned(), policy);
        self
    }

    /// Lets several claims be allocated this device at once, within its
    /// consumable capacities (`allowMultipleAllocations`).
    #[must_use]
    pub fn allow_multiple_allocations(mut self) -> Self {
        self.multiple = true;
        self
    }

    /// Draws `counters` (name, quantity) from the pool's counter set
    /// `set` while allocated.
    #[must_use]
    pub fn consumes(mut self, set: &str, counters: &[(&str, &str)]) -> Self {
        let entry = self.consumes.entry(set.to_owned()).or_default();
        for (k, v) in counters {
            entry.insert((*k).to_owned(), (*v).to_owned());
        }
        self
    }

    /// Adds a taint.
    #[must_use]
    pub fn taint(mut self, taint: DeviceTaint) -> Self {
        self.taints.push(taint);
        self
    }

    /// The name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it draws from counter set `set`.
    #[must_use]
    pub fn draws_from(&self, set: &str) -> bool {
        self.consumes.contains_key(set)
    }

    /// Whether it may be allocated to several claims at once.
    #[must_use]
    pub fn allows_multiple_allocations(&self) -> bool {
        self.multiple
    }

    /// Its taints.
    #[must_use]
    pub fn taints(&self) -> &[DeviceTaint] {
        &self.taints
    }

    fn check(&self) -> Result<(), DeviceError> {
        let bad = |reason: String| {
            Err(DeviceError {
                device: self.name.clone(),
                reason,
            })
        };
        let n = self.attributes.len() + self.capacity.len();
        if n > 32 {
            return bad(format!("{n} attributes and capacities, at most 32"));
        }
        for (k, v) in &self.attributes {
            // The API counts bytes (Go's `len`), not characters.
            if let Attribute::String(s) | Attribute::Version(s) = v
                && s.len() > 64
            {
                return bad(format!("attribute {k} is longer than 64 bytes"));
            }
        }
        if self.taints.len() > 4 {
            return bad(format!("{} taints, at most 4", self.taints.len()));
        }
        if !self.policies.is_empty() && !self.multiple {
            return bad("a request policy needs allowMultipleAllocations".to_owned());
        }
        for (k, p) in &self.policies {
            if let ValidAmounts::Values(v) = &p.valid
                && (v.is_empty() || v.len() > 10 || !v.contains(&p.default))
            {
                return bad(format!(
                    "capacity {k}: 1 to 10 valid values, the default among them"
                ));
            }
        }
        if self.consumes.len() > 2 {
            return bad(format!(
                "consumes {} counter sets, at most 2",
                self.consumes.len()
            ));
        }
        Ok(())
    }

    fn to_json(&self) -> Value {
        let mut d = json!({"name": self.name});
        if !self.attributes.is_empty() {
            d["attributes"] = self
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if !self.capacity.is_empty() {
            d["capacity"] = self
                .capacity
                .iter()
                .map(|(k, v)| {
                    let mut c = json!({"value": v});
                    if let Some(p) = self.policies.get(k) {
                        c["requestPolicy"] = p.to_json();
                    }
                    (k.clone(), c)
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if self.multiple {
            d["allowMultipleAllocations"] = json!(true);
        }
        if !self.consumes.is_empty() {
            d["consumesCounters"] = self
                .consumes
                .iter()
                .map(|(set, c)| json!({"counterSet": set, "counters": counters_json(c)}))
                .collect::<Vec<_>>()
                .into();
        }
        if !self.taints.is_empty() {
            d["taints"] = self
                .taints
                .iter()
                .map(|t| {
                    let mut j = json!({
                        "key": t.key,
                        "effect": match t.effect {
                            TaintEffect::NoSchedule => "NoSchedule",
                            TaintEffect::NoExecute => "NoExecute",
                        },
                    });
                    if let Some(v) = &t.value {
                        j["value"] = json!(v);
                    }
                    j
                })
                .collect::<Vec<_>>()
                .into();
        }
        d
    }
}

/// A node's devices of one driver: checked, unique names, in name order,
/// with the counter sets they draw from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSet {
    devices: Vec<SliceDevice>,
    counters: Vec<CounterSet>,
    layout: Option<CounterLayout>,
}

/// Counters in all counter sets of a 1.34 slice
/// (`ResourceSliceMaxSharedCounters`).
const MAX_COUNTERS_PER_SLICE_1_34: usize = 32;
/// Counter sets per slice from 1.35 (`ResourceSliceMaxCounterSets`).
const MAX_COUNTER_SETS_PER_SLICE: usize = 8;

/// One slice's content.
#[derive(Debug, Default)]
struct Chunk<'a> {
    devices: Vec<&'a SliceDevice>,
    counters: Vec<&'a CounterSet>,
}

impl DeviceSet {
    /// Checks the devices as the API server would.
    ///
    /// # Errors
    /// The first device refused, and why.
    pub fn new(devices: Vec<SliceDevice>) -> Result<Self, DeviceError> {
        Self::build(devices, Vec::new(), None)
    }

    fn build(
        mut devices: Vec<SliceDevice>,
        mut sets: Vec<CounterSet>,
        layout: Option<CounterLayout>,
    ) -> Result<Self, DeviceError> {
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in devices.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(DeviceError {
                    device: pair[0].name.clone(),
                    reason: "listed twice".to_owned(),
                });
            }
        }
        for d in &devices {
            d.check()?;
        }
        sets.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in sets.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(DeviceError {
                    device: pair[0].name.clone(),
                    reason: "counter set listed twice".to_owned(),
                });
            }
        }
        for c in &sets {
            if c.counters.is_empty() || c.counters.len() > 32 {
                return Err(DeviceError {
                    device: c.name.clone(),
                    reason: format!("counter set has {} counters, 1 to 32", c.counters.len()),
                });
            }
        }
        let set = Self {
            devices,
            counters: sets,
            layout,
        };
        set.check_counters()?;
        // 1.34: the slices must be cut so that each holds what it uses.
        set.chunks()?;
        Ok(set)
    }

    /// Devices with the counter sets they draw from, published as
    /// `layout` says (the cluster's release decides; see
    /// [`CounterLayout`]).
    ///
    /// # Errors
    /// As [`DeviceSet::new`], and a device drawing from a set or counter
    /// that is not there, a set named twice or with more than 32
    /// counters, or (1.34) a set whose devices cannot share one slice.
    pub fn with_counters(
        devices: Vec<SliceDevice>,
        sets: Vec<CounterSet>,
        layout: CounterLayout,
    ) -> Result<Self, DeviceError> {
        Self::build(devices, sets, Some(layout))
    }

    fn check_counters(&self) -> Result<(), DeviceError> {
        for d in &self.devices {
            for (set, counters) in &d.consumes {
                let Some(found) = self.counters.iter().find(|c| &c.name == set) else {
                    return Err(DeviceError {
                        device: d.name.clone(),
                        reason: format!("consumes from counter set {set}, which is not published"),
                    });
                };
                if let Some(k) = counters.keys().find(|k| !found.counters.contains_key(*k)) {
                    return Err(DeviceError {
                        device: d.name.clone(),
                        reason: format!("consumes counter {k}, which set {set} does not have"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The devices.
    #[must_use]
    pub fn devices(&self) -> &[SliceDevice] {
        &self.devices
    }

    /// The counter sets.
    #[must_use]
    pub fn counter_sets(&self) -> &[CounterSet] {
        &self.counters
    }

    /// The devices (and counter sets) as slices, in name order.
    fn chunks(&self) -> Result<Vec<Chunk<'_>>, DeviceError> {
        let limited = self
            .devices
            .iter()
            .any(|d| !d.taints.is_empty() || !d.consumes.is_empty());
        let size = if limited {
            MAX_TAINTED_DEVICES_PER_SLICE
        } else {
            MAX_DEVICES_PER_SLICE
        };
        let mut out: Vec<Chunk<'_>> = Vec::new();
        match self.layout {
            // No devices: no slices (the Go slice controller deletes a
            // pool left without slices the same way).
            None => {
                for c in self.devices.chunks(size) {
                    out.push(Chunk {
                        devices: c.iter().collect(),
                        counters: Vec::new(),
                    });
                }
            }
            Some(CounterLayout::OwnSlices) => {
                for c in self.counters.chunks(MAX_COUNTER_SETS_PER_SLICE) {
                    out.push(Chunk {
                        devices: Vec::new(),
                        counters: c.iter().collect(),
                    });
                }
                for c in self.devices.chunks(size) {
                    out.push(Chunk {
                        devices: c.iter().collect(),
                        counters: Vec::new(),
                    });
                }
            }
            Some(CounterLayout::SameSlice) => {
                // Groups that must share a slice: a counter set with every
                // device drawing from it (devices drawing from two sets
                // join them), and lone devices.
                let mut groups: Vec<(Vec<&SliceDevice>, BTreeSet<&str>)> = Vec::new();
                for d in &self.devices {
                    let sets: BTreeSet<&str> = d.consumes.keys().map(String::as_str).collect();
                    let mut merged = (vec![d], sets);
                    let mut i = 0;
                    while i < groups.len() {
                        if !merged.1.is_empty() && !groups[i].1.is_disjoint(&merged.1) {
                            let (ds, ss) = groups.remove(i);
                            merged.0.extend(ds);
                            merged.1.extend(ss);
                        } else {
                            i += 1;
                        }
                    }
                    groups.push(merged);
                }
                let mut current = Chunk::default();
                let mut counters_in = 0;
                for (devices, sets) in groups {
                    let sets: Vec<&CounterSet> = self
                        .counters
                        .iter()
                        .filter(|c| sets.contains(c.name.as_str()))
                        .collect();
                    let n: usize = sets.iter().map(|c| c.counters.len()).sum();
                    if devices.len() > size || n > MAX_COUNTERS_PER_SLICE_1_34 {
                        return Err(DeviceError {
                            device: devices[0].name.clone(),
                            reason: format!(
                                "{} devices and {n} counters must share one slice: at most {size} and {MAX_COUNTERS_PER_SLICE_1_34}",
                                devices.len()
                            ),
                        });
                    }
                    if current.devices.len() + devices.len() > size
                        || counters_in + n > MAX_COUNTERS_PER_SLICE_1_34
                    {
                        out.push(std::mem::take(&mut current));
                        counters_in = 0;
                    }
                    current.devices.extend(devices);
                    current.counters.extend(sets);
                    counters_in += n;
                }
                if !current.devices.is_empty() {
                    out.push(current);
                }
                let used: BTreeSet<&str> = out
                    .iter()
                    .flat_map(|c| c.counters.iter().map(|s| s.name.as_str()))
                    .collect();
                let idle: Vec<&CounterSet> = self
                    .counters
                    .iter()
                    .filter(|c| !used.contains(c.name.as_str()))
                    .collect();
                // Sets no device draws from: slices of their own, within
                // the 32 counters a slice may hold.
                let mut spare = Chunk::default();
                let mut n = 0;
                for c in idle {
                    if n + c.counters.len() > MAX_COUNTERS_PER_SLICE_1_34 {
                        out.push(std::mem::take(&mut spare));
                        n = 0;
                    }
                    n += c.counters.len();
                    spare.counters.push(c);
                }
                if !spare.counters.is_empty() {
                    out.push(spare);
                }
            }
        }
        Ok(out)
    }
}

/// What a [`SlicePublisher`] publishes.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    driver: DriverName,
    node: String,
    resync: Duration,
    backoff: ops_kit::Backoff,
}

impl PublisherConfig {
    /// `driver`'s devices on Node `node`.
    #[must_use]
    pub fn new(driver: DriverName, node: &str) -> Self {
        Self {
            driver,
            node: node.to_owned(),
            resync: Duration::from_secs(30),
            backoff: ops_kit::Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
            },
        }
    }

    /// How often the slices are checked and put back when missing.
    #[must_use]
    pub fn resync(mut self, every: Duration) -> Self {
        self.resync = every;
        self
    }

    /// Retry delays after API failures.
    #[must_use]
    pub fn backoff(mut self, backoff: ops_kit::Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    fn slice_name(&self, n: usize) -> String {
        format!("{}-{}-{n}", self.node, self.driver)
    }
}

/// Where publication stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishState {
    /// Nothing published yet.
    Pending,
    /// The latest device set is in the API, as this pool generation.
    Published {
        /// The pool's generation.
        generation: i64,
        /// How many slices hold it.
        slices: usize,
    },
    /// The API refused or failed; retrying.
    Retrying {
        /// Failures in a row.
        attempt: u32,
        /// The last failure.
        error: String,
    },
    /// Stopped.
    Stopped,
}

/// Publishes one driver's devices on one node until stopped.
#[derive(Debug)]
pub struct SlicePublisher {
    devices: watch::Sender<Arc<DeviceSet>>,
    status: watch::Receiver<PublishState>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SlicePublisher {
    /// Starts publishing `initial` with `client`. Must be called inside a
    /// tokio runtime.
    #[must_use]
    pub fn start(client: kube::Client, config: PublisherConfig, initial: DeviceSet) -> Self {
        let (devices, devices_rx) = watch::channel(Arc::new(initial));
        let (status_tx, status) = watch::channel(PublishState::Pending);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(client, config, devices_rx, status_tx, stop_rx));
        Self {
            devices,
            status,
            stop,
            task: Some(task),
        }
    }

    /// Publishes a new device set (the latest wins).
    pub fn publish(&self, devices: DeviceSet) {
        self.devices.send_replace(Arc::new(devices));
    }

    /// Where publication stands.
    #[must_use]
    pub fn status(&self) -> PublishState {
        self.status.borrow().clone()
    }

    /// Follows publication.
    #[must_use]
    pub fn watch_status(&self) -> watch::Receiver<PublishState> {
        self.status.clone()
    }

    /// Stops publishing. The slices stay: the kubelet deletes a driver's
    /// slices once the driver is gone for good.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SlicePublisher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// What was last published, to tell a change from a resync.
#[derive(Debug, Default)]
struct Last {
    set: Option<Arc<DeviceSet>>,
    generation: i64,
    names: BTreeSet<String>,
    /// The UIDs of the slices as last written.
    uids: BTreeMap<String, String>,
}

async fn run(
    client: kube::Client,
    config: PublisherConfig,
    mut devices: watch::Receiver<Arc<DeviceSet>>,
    status: watch::Sender<PublishState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut node_uid: Option<String> = None;
    let mut last = Last::default();
    let mut attempt = 0u32;
    // Woken by a new device set after a success: what is in the API is
    // known (the slices last written), so the LIST is skipped — a hotplug
    // reaches the API in one request per slice. Timers (the resync) and
    // retries list, and put back what someone else deleted.
    // The LIST is never older than one resync period, however often sets
    // change (each change restarts the timer).
    let mut changed_only = false;
    let mut listed_at: Option<tokio::time::Instant> = None;
    loop {
        let set = Arc::clone(&devices.borrow_and_update());
        let fast = changed_only && listed_at.is_some_and(|t| t.elapsed() < config.resync);
        let result = sync(&client, &config, &set, &mut node_uid, &mut last, fast).await;
        if result.is_ok() && !fast {
            listed_at = Some(tokio::time::Instant::now());
        }
        changed_only = false;
        let wait = match result {
            Ok(()) => {
                attempt = 0;
                status.send_replace(PublishState::Published {
                    generation: last.generation,
                    slices: last.names.len(),
                });
                config.resync
            }
            Err(error) => {
                tracing::warn!(driver = %config.driver, %error, attempt, "could not publish ResourceSlices; retrying");
                status.send_replace(PublishState::Retrying { attempt, error });
                let d = config.backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                d
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            changed = devices.changed() => {
                if changed.is_err() { break }
                changed_only = attempt == 0;
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
    status.send_replace(PublishState::Stopped);
}

async fn sync(
    client: &kube::Client,
    config: &PublisherConfig,
    set: &Arc<DeviceSet>,
    node_uid: &mut Option<String>,
    last: &mut Last,
    changed_only: bool,
) -> Result<(), String> {
    let chain = |e: kube::Error| ops_kit::Chain(&e).to_string();
    let uid = match node_uid.clone() {
        Some(u) => u,
        None => {
            let nodes: kube::Api<Node> = kube::Api::all(client.clone());
            let node = nodes.get(&config.node).await.map_err(chain)?;
            let u = node.metadata.uid.unwrap_or_default();
            *node_uid = Some(u.clone());
            u
        }
    };
    let api: kube::Api<ResourceSlice> = kube::Api::all(client.clone());
    let selector = format!(
        "spec.nodeName={},spec.driver={}",
        config.node, config.driver
    );
    let chunks = set.chunks().map_err(|e| e.to_string())?;
    let wanted: BTreeSet<String> = (0..chunks.len()).map(|n| config.slice_name(n)).collect();
    let present: BTreeMap<String, (String, i64)> = if changed_only && last.set.is_some() {
        last.uids
            .iter()
            .map(|(n, u)| (n.clone(), (u.clone(), last.generation)))
            .collect()
    } else {
        api.list(&ListParams::default().fields(&selector))
            .await
            .map_err(chain)?
            .items
            .iter()
            .filter_map(|s| {
                let name = s.metadata.name.clone()?;
                Some((
                    name,
                    (
                        s.metadata.uid.clone().unwrap_or_default(),
                        s.spec.pool.generation,
                    ),
                ))
            })
            .collect()
    };
    let unchanged = last
        .set
        .as_ref()
        .is_some_and(|l| Arc::ptr_eq(l, set) || **l == **set)
        && last.names == wanted
        && present.len() == wanted.len()
        && wanted
            .iter()
            .all(|n| present.get(n).is_some_and(|(_, g)| *g == last.generation));
    if unchanged {
        return Ok(());
    }
    // A new generation above anything in the pool.
    let generation = present
        .values()
        .map(|(_, g)| *g)
        .chain([last.generation])
        .max()
        .unwrap_or(0)
        + 1;
    let params = PatchParams::apply(config.driver.as_str()).force();
    let mut uids = BTreeMap::new();
    for (n, chunk) in chunks.iter().enumerate() {
        let name = config.slice_name(n);
        let mut slice = json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": name,
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": config.node,
                    "uid": uid,
                    "controller": true,
                }],
            },
            "spec": {
                "driver": config.driver.as_str(),
                "nodeName": config.node,
                "pool": {
                    "name": config.node,
                    "generation": generation,
                    "resourceSliceCount": chunks.len(),
                },
            },
        });
        // 1.35 and later refuse `devices` beside `sharedCounters`, even
        // empty; 1.34 has no omitempty on it, so an empty list is sent.
        if !chunk.devices.is_empty() || chunk.counters.is_empty() {
            slice["spec"]["devices"] = chunk.devices.iter().map(|d| d.to_json()).collect();
        }
        if !chunk.counters.is_empty() {
            slice["spec"]["sharedCounters"] = chunk.counters.iter().map(|c| c.to_json()).collect();
        }
        let written = api
            .patch(&name, &params, &Patch::Apply(&slice))
            .await
            .map_err(chain)?;
        uids.insert(name, written.metadata.uid.unwrap_or_default());
    }
    for (name, (uid, _)) in &present {
        if wanted.contains(name) {
            continue;
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(chain(e)),
        }
    }
    tracing::info!(driver = %config.driver, generation, slices = chunks.len(), devices = set.devices().len(), "ResourceSlices published");
    *last = Last {
        set: Some(Arc::clone(set)),
        generation,
        names: wanted,
        uids,
    };
    Ok(())
}

/// What the cluster's DRA API keeps of a slice: the alpha and beta
/// fields a driver may rely on. A field of a disabled feature gate is
/// dropped on write without an error, so a driver that relied on it
/// unawares would publish something else than it meant — devices it
/// thinks exclusive to a share, a PF and its VFs without the counters
/// that keep them apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `allowMultipleAllocations` and request policies are kept
    /// (DRAConsumableCapacity).
    pub consumable_capacity: bool,
    /// Device taints are kept (DRADeviceTaints).
    pub device_taints: bool,
    /// Counter sets are kept, and where they go (DRAPartitionableDevices).
    pub partitionable: Option<CounterLayout>,
}

impl std::fmt::Display for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "consumable capacity {}, device taints {}, partitionable devices {}",
            on(self.consumable_capacity),
            on(self.device_taints),
            match self.partitionable {
                None => "off",
                Some(CounterLayout::SameSlice) => "on (1.34 layout)",
                Some(CounterLayout::OwnSlices) => "on (1.35 layout)",
            }
        )
    }
}

fn on(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// Asks the API server which [`Features`] it keeps, by server-side
/// applies with `dryRun=All` (nothing is stored; the answer is what would
/// be): one device using consumable capacity and a taint, then a slice
/// with a counter set beside a device drawing from it — accepted with the
/// counters on 1.34, refused (`only one of sharedCounters or devices`) from
/// 1.35, where a slice holding only the counter set tells.
///
/// # Errors
/// When the API server cannot be asked (or refuses something else).
pub async fn probe_features(
    client: &kube::Client,
    driver: &DriverName,
    node: &str,
) -> Result<Features, String> {
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(
        client.clone(),
        &kube::api::ApiResource {
            group: "resource.k8s.io".into(),
            version: "v1".into(),
            api_version: "resource.k8s.io/v1".into(),
            kind: "ResourceSlice".into(),
            plural: "resourceslices".into(),
        },
    );
    let name = format!("{node}-{driver}-probe");
    let params = PatchParams::apply(driver.as_str()).force().dry_run();
    let slice = |spec: Value| {
        let mut s = json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"name": name},
            "spec": {
                "driver": driver.as_str(),
                "nodeName": node,
                "pool": {"name": format!("{node}-probe"), "generation": 1, "resourceSliceCount": 1},
            },
        });
        for (k, v) in spec.as_object().into_iter().flatten() {
            s["spec"][k] = v.clone();
        }
        s
    };
    let apply = |body: Value| {
        let api = api.clone();
        let params = params.clone();
        let name = name.clone();
        async move {
            api.patch(&name, &params, &Patch::Apply(&body))
                .await
                .map(|o| o.data["spec"].clone())
        }
    };
    let chain = |e: kube::Error| ops_kit::Chain(&e).to_string();
    let device = json!({
        "name": "probe",
        "allowMultipleAllocations": true,
        "capacity": {"probe": {"value": "2", "requestPolicy": {"default": "1", "validRange": {"min": "1"}}}},
        "taints": [{"key": format!("{driver}/probe"), "effect": "NoSchedule"}],
    });
    let kept = apply(slice(json!({"devices": [device]})))
        .await
        .map_err(chain)?;
    let d = &kept["devices"][0];
    let mut features = Features {
        consumable_capacity: d["allowMultipleAllocations"].as_bool() == Some(true),
        device_taints: d["taints"].as_array().is_some_and(|t| !t.is_empty()),
        partitionable: None,
    };
    let counters = json!([{"name": "probe", "counters": {"probe": {"value": "1"}}}]);
    let beside = slice(json!({
        "sharedCounters": counters,
        "devices": [{"name": "probe", "consumesCounters": [{"counterSet": "probe", "counters": {"probe": {"value": "1"}}}]}],
    }));
    match apply(beside).await {
        Ok(spec) => {
            if spec["sharedCounters"].is_array()
                && spec["devices"][0]["consumesCounters"].is_array()
            {
                features.partitionable = Some(CounterLayout::SameSlice);
            }
        }
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("only one of") => {
            let alone = apply(slice(json!({"sharedCounters": counters})))
                .await
                .map_err(chain)?;
            if alone["sharedCounters"].is_array() {
                features.partitionable = Some(CounterLayout::OwnSlices);
            }
        }
        Err(e) => return Err(chain(e)),
    }
    Ok(features)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_checked_as_the_api_server_does() {
        assert!(SliceDevice::new("gpu-0").is_ok());
        for bad in ["", "GPU0", "gpu_0", "-gpu", &"g".repeat(64)] {
            assert!(SliceDevice::new(bad).is_err(), "{bad:?}");
        }
        let twice = DeviceSet::new(vec![
            SliceDevice::new("a").unwrap(),
            SliceDevice::new("a").unwrap(),
        ]);
        assert_eq!(twice.unwrap_err().reason, "listed twice");
        let mut many = SliceDevice::new("a").unwrap();
        for i in 0..33 {
            many = many.attribute(&format!("a{i}"), Attribute::Int(i));
        }
        assert!(
            DeviceSet::new(vec![many])
                .unwrap_err()
                .reason
                .contains("at most 32")
        );
        let long = SliceDevice::new("b")
            .unwrap()
            .attribute("model", Attribute::String("x".repeat(65)));
        assert!(DeviceSet::new(vec![long]).is_err());
    }

    fn sizes(set: &DeviceSet) -> Vec<(usize, usize)> {
        set.chunks()
            .unwrap()
            .iter()
            .map(|c| (c.devices.len(), c.counters.len()))
            .collect()
    }

    /// A PF and `vfs` VFs drawing from the PF's counter set.
    fn family(pf: usize, vfs: usize) -> (Vec<SliceDevice>, CounterSet) {
        let set = format!("pf{pf}");
        let n = vfs.to_string();
        let mut devices = vec![
            SliceDevice::new(&format!("pf{pf}-0"))
                .unwrap()
                .consumes(&set, &[("slots", &n)]),
        ];
        for v in 1..=vfs {
            devices.push(
                SliceDevice::new(&format!("pf{pf}-{v:02}"))
                    .unwrap()
                    .consumes(&set, &[("slots", "1")]),
            );
        }
        (devices, CounterSet::new(&set).unwrap().counter("slots", &n))
    }

    #[test]
    fn counter_sets_go_where_the_release_wants_them() {
        let mut devices = Vec::new();
        let mut sets = Vec::new();
        for pf in 0..10 {
            let (d, s) = family(pf, 15);
            devices.extend(d);
            sets.push(s);
        }
        devices.push(SliceDevice::new("igpu").unwrap());
        // 1.35+: 10 sets in slices of 8, then 161 devices in slices of 64.
        let own = DeviceSet::with_counters(devices.clone(), sets.clone(), CounterLayout::OwnSlices)
            .unwrap();
        assert_eq!(sizes(&own), [(0, 8), (0, 2), (64, 0), (64, 0), (33, 0)]);
        // 1.34: each family whole in a slice with its set (the iGPU sorts
        // first; a family that would overflow 64 starts the next slice).
        let same = DeviceSet::with_counters(devices, sets, CounterLayout::SameSlice).unwrap();
        assert_eq!(sizes(&same), [(49, 3), (64, 4), (48, 3)]);
        for chunk in same.chunks().unwrap() {
            for d in &chunk.devices {
                for set in d.consumes.keys() {
                    assert!(chunk.counters.iter().any(|c| &c.name == set), "{set}");
                }
            }
        }
    }

    #[test]
    fn counters_that_are_not_there_are_refused() {
        let (devices, set) = family(0, 2);
        let err = DeviceSet::new(devices.clone()).unwrap_err();
        assert!(err.reason.contains("not published"), "{err}");
        let wrong = CounterSet::new("pf0").unwrap().counter("memory", "1");
        let idle = DeviceSet::with_counters(Vec::new(), vec![wrong], CounterLayout::OwnSlices);
        assert!(idle.is_ok(), "a set nobody draws from is fine");
        let mut d = devices;
        d.push(
            SliceDevice::new("x")
                .unwrap()
                .consumes("pf0", &[("memory", "1")]),
        );
        let err = DeviceSet::with_counters(d, vec![set], CounterLayout::OwnSlices).unwrap_err();
        assert!(err.reason.contains("does not have"), "{err}");
        // A family too big for one 1.34 slice.
        let (big, set) = family(0, 64);
        let err = DeviceSet::with_counters(big, vec![set], CounterLayout::SameSlice).unwrap_err();
        assert!(err.reason.contains("must share one slice"), "{err}");
    }

    #[test]
    fn a_request_policy_needs_multiple_allocations() {
        let policy = RequestPolicy {
            default: "1000".into(),
            valid: ValidAmounts::Range {
                min: "10".into(),
                max: None,
                step: Some("10".into()),
            },
        };
        let lone = SliceDevice::new("g")
            .unwrap()
            .consumable("millicores", "1000", policy.clone());
        assert!(DeviceSet::new(vec![lone.clone()]).is_err());
        let shared = lone.allow_multiple_allocations();
        let j = shared.to_json();
        assert_eq!(j["allowMultipleAllocations"], true);
        assert_eq!(
            j["capacity"]["millicores"],
            json!({"value": "1000", "requestPolicy": {"default": "1000", "validRange": {"min": "10", "step": "10"}}})
        );
        assert!(DeviceSet::new(vec![shared]).is_ok());
    }

    #[test]
    fn slices_hold_at_most_128_devices_or_64_with_taints() {
        let plain: Vec<SliceDevice> = (0..300)
            .map(|i| SliceDevice::new(&format!("d{i:03}")).unwrap())
            .collect();
        let set = DeviceSet::new(plain.clone()).unwrap();
        assert_eq!(sizes(&set), [(128, 0), (128, 0), (44, 0)]);
        let mut tainted = plain;
        tainted[0] = tainted[0].clone().taint(DeviceTaint {
            key: "example.com/unhealthy".into(),
            value: None,
            effect: TaintEffect::NoSchedule,
        });
        assert_eq!(
            sizes(&DeviceSet::new(tainted).unwrap()),
            [(64, 0), (64, 0), (64, 0), (64, 0), (44, 0)]
        );
        assert!(
            sizes(&DeviceSet::default()).is_empty(),
            "no devices, no slices"
        );
    }
}
