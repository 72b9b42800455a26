//! Counters and gauges of the framework, rendered as Prometheus text by the
//! binaries that serve them.

use ops_kit::prometheus::{Kind, Text};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::types::ResourceName;

/// The figures of one resource: read-only outside the framework.
#[derive(Debug, Default)]
pub struct ResourceMetrics {
    /// Successful registrations with the kubelet.
    pub(crate) registrations: AtomicU64,
    /// Failed registration attempts.
    pub(crate) registration_failures: AtomicU64,
    /// Kubelet restarts noticed.
    pub(crate) kubelet_restarts: AtomicU64,
    /// ListAndWatch streams open now.
    pub(crate) active_streams: AtomicI64,
    /// Device lists published.
    pub(crate) updates: AtomicU64,
    /// Unix time (milliseconds) of the last published list.
    pub(crate) last_update_unix_ms: AtomicU64,
    /// Allocate calls answered.
    pub(crate) allocations: AtomicU64,
    /// Allocate calls refused.
    pub(crate) allocation_failures: AtomicU64,
    /// GetPreferredAllocation calls answered.
    pub(crate) preferred_allocations: AtomicU64,
    /// ListAndWatch streams the kubelet dropped while it stayed up (each
    /// followed by a new registration).
    pub(crate) stream_losses: AtomicU64,
    /// Devices left out of the current list to fit the kubelet's message
    /// limit.
    pub(crate) clamped_devices: AtomicU64,
}

impl ResourceMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// ListAndWatch streams open now.
    #[must_use]
    pub fn streams(&self) -> i64 {
        self.active_streams.load(Ordering::Relaxed)
    }
}

/// Read accessors, one per counter or gauge, named as the field.
macro_rules! getters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        impl ResourceMetrics {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $name(&self) -> $ty {
                    self.$name.load(Ordering::Relaxed)
                }
            )*
        }
    };
}

getters! {
    /// Successful registrations with the kubelet.
    registrations: u64,
    /// Failed registration attempts.
    registration_failures: u64,
    /// Kubelet restarts noticed.
    kubelet_restarts: u64,
    /// Device lists published.
    updates: u64,
    /// Unix time (milliseconds) of the last published list.
    last_update_unix_ms: u64,
    /// Allocate calls answered.
    allocations: u64,
    /// Allocate calls refused.
    allocation_failures: u64,
    /// GetPreferredAllocation calls answered.
    preferred_allocations: u64,
    /// ListAndWatch streams the kubelet dropped while it stayed up (each
    /// followed by a new registration).
    stream_losses: u64,
    /// Devices left out of the current list to fit the kubelet's message
    /// limit.
    clamped_devices: u64,
}

/// Every resource's figures.
#[derive(Debug, Default)]
pub struct Metrics {
    resources: Mutex<Vec<(ResourceName, Arc<ResourceMetrics>)>>,
}

impl Metrics {
    /// The figures of `name`, created on first use.
    pub fn resource(&self, name: &ResourceName) -> Arc<ResourceMetrics> {
        let mut all = self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, m)) = all.iter().find(|(n, _)| n == name) {
            return Arc::clone(m);
        }
        let m = Arc::new(ResourceMetrics::default());
        all.push((name.clone(), Arc::clone(&m)));
        m
    }

    /// Prometheus text exposition with metric names starting with `prefix`
    /// (e.g. `intel_gpu_plugin`), labelled by resource only (never by
    /// device ID).
    #[must_use]
    pub fn render(&self, prefix: &str) -> String {
        let all = self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        type Get = fn(&ResourceMetrics) -> f64;
        fn load(a: &AtomicU64) -> f64 {
            a.load(Ordering::Relaxed) as f64
        }
        let rows: [(&str, Kind, &str, Get); 11] = [
            (
                "registrations_total",
                Kind::Counter,
                "Successful registrations with the kubelet.",
                |m| load(&m.registrations),
            ),
            (
                "registration_failures_total",
                Kind::Counter,
                "Failed registration attempts.",
                |m| load(&m.registration_failures),
            ),
            (
                "kubelet_restarts_total",
                Kind::Counter,
                "Kubelet restarts noticed.",
                |m| load(&m.kubelet_restarts),
            ),
            (
                "list_and_watch_streams",
                Kind::Gauge,
                "ListAndWatch streams open now.",
                |m| m.streams() as f64,
            ),
            (
                "device_list_updates_total",
                Kind::Counter,
                "Device lists published.",
                |m| load(&m.updates),
            ),
            (
                "last_update_timestamp_seconds",
                Kind::Gauge,
                "Unix time of the last published device list.",
                |m| load(&m.last_update_unix_ms) / 1000.0,
            ),
            (
                "allocations_total",
                Kind::Counter,
                "Allocate calls answered.",
                |m| load(&m.allocations),
            ),
            (
                "allocation_failures_total",
                Kind::Counter,
                "Allocate calls refused.",
                |m| load(&m.allocation_failures),
            ),
            (
                "preferred_allocations_total",
                Kind::Counter,
                "GetPreferredAllocation calls answered.",
                |m| load(&m.preferred_allocations),
            ),
            (
                "stream_losses_total",
                Kind::Counter,
                "ListAndWatch streams the kubelet dropped while it stayed up.",
                |m| load(&m.stream_losses),
            ),
            (
                "clamped_devices",
                Kind::Gauge,
                "Devices left out of the current list to fit the kubelet's message limit.",
                |m| load(&m.clamped_devices),
            ),
        ];
        let mut text = Text::new();
        for (name, kind, help, get) in rows {
            let name = format!("{prefix}_{name}");
            text.family(&name, kind, help);
            for (resource, m) in all.iter() {
                text.sample(&name, &[("resource", resource.as_str())], get(m));
            }
        }
        text.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_resource_series() {
        let metrics = Metrics::default();
        let name = ResourceName::new("example.com/null").unwrap();
        ResourceMetrics::inc(&metrics.resource(&name).registrations);
        ResourceMetrics::inc(&metrics.resource(&name).registrations);
        let text = metrics.render("test");
        assert!(text.contains("# TYPE test_registrations_total counter"));
        assert!(
            text.contains("test_registrations_total{resource=\"example.com/null\"} 2"),
            "{text}"
        );
        assert!(text.contains("test_list_and_watch_streams{resource=\"example.com/null\"} 0"));
    }
}
