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
    /// `string`, at most 64 characters.
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
    taints: Vec<DeviceTaint>,
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
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !ok {
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
            taints: Vec::new(),
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
            if let Attribute::String(s) | Attribute::Version(s) = v
                && s.chars().count() > 64
            {
                return bad(format!("attribute {k} is longer than 64 characters"));
            }
        }
        if self.taints.len() > 4 {
            return bad(format!("{} taints, at most 4", self.taints.len()));
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
                .map(|(k, v)| (k.clone(), json!({"value": v})))
                .collect::<serde_json::Map<_, _>>()
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

/// A node's devices of one driver: checked, unique names, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSet(Vec<SliceDevice>);

impl DeviceSet {
    /// Checks the devices as the API server would.
    ///
    /// # Errors
    /// The first device refused, and why.
    pub fn new(mut devices: Vec<SliceDevice>) -> Result<Self, DeviceError> {
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
        Ok(Self(devices))
    }

    /// The devices.
    #[must_use]
    pub fn devices(&self) -> &[SliceDevice] {
        &self.0
    }

    /// The devices as slices: consecutive chunks in name order.
    fn chunks(&self) -> Vec<Vec<&SliceDevice>> {
        let size = if self.0.iter().any(|d| !d.taints.is_empty()) {
            MAX_TAINTED_DEVICES_PER_SLICE
        } else {
            MAX_DEVICES_PER_SLICE
        };
        // No devices: no slices (the Go slice controller deletes a pool
        // left without slices the same way).
        self.0.chunks(size).map(|c| c.iter().collect()).collect()
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
    loop {
        let set = Arc::clone(&devices.borrow_and_update());
        let wait = match sync(&client, &config, &set, &mut node_uid, &mut last).await {
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
            changed = devices.changed() => if changed.is_err() { break },
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
    let existing = api
        .list(&ListParams::default().fields(&selector))
        .await
        .map_err(chain)?;
    let chunks = set.chunks();
    let wanted: BTreeSet<String> = (0..chunks.len()).map(|n| config.slice_name(n)).collect();
    let present: BTreeMap<String, (String, i64)> = existing
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
        .collect();
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
    for (n, chunk) in chunks.iter().enumerate() {
        let name = config.slice_name(n);
        let slice = json!({
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
                "devices": chunk.iter().map(|d| d.to_json()).collect::<Vec<_>>(),
            },
        });
        api.patch(&name, &params, &Patch::Apply(&slice))
            .await
            .map_err(chain)?;
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
    };
    Ok(())
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

    #[test]
    fn slices_hold_at_most_128_devices_or_64_with_taints() {
        let plain: Vec<SliceDevice> = (0..300)
            .map(|i| SliceDevice::new(&format!("d{i:03}")).unwrap())
            .collect();
        let set = DeviceSet::new(plain.clone()).unwrap();
        let sizes: Vec<usize> = set.chunks().iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 44]);
        let mut tainted = plain;
        tainted[0] = tainted[0].clone().taint(DeviceTaint {
            key: "example.com/unhealthy".into(),
            value: None,
            effect: TaintEffect::NoSchedule,
        });
        let sizes: Vec<usize> = DeviceSet::new(tainted)
            .unwrap()
            .chunks()
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [64, 64, 64, 64, 44]);
        assert!(
            DeviceSet::default().chunks().is_empty(),
            "no devices, no slices"
        );
    }
}
