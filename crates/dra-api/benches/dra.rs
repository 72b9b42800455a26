//! DRA framework figures, through the emulators over real sockets:
//! - `dra.prepare_us_p50`/`_p99`: one claim of one device prepared through
//!   the emulated kubelet (1.34, v1), claim looked up each time (a new
//!   claim per call), the checkpoint written;
//! - `dra.slice_update_ms_p50`/`_p99`: a device set published → the
//!   ResourceSlice on the emulated API server holds it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiserver_emulator::ApiServer;
use bench_report::{Report, Samples};
use dra_api::slices::{
    Attribute, DeviceSet, PublishState, PublisherConfig, SliceDevice, SlicePublisher,
};
use dra_api::*;
use kubelet_emulator::{ClaimId, KubeletVersion, PluginWatcher};

const DRIVER: &str = "null.example.com";

#[derive(Default)]
struct Claims(Mutex<HashMap<String, String>>);

impl ClaimSource for Claims {
    async fn allocation(&self, claim: &ClaimRef) -> Result<Vec<AllocationResult>, ClaimError> {
        let device = self.0.lock().unwrap().get(&claim.uid).cloned();
        device
            .map(|device| {
                vec![AllocationResult {
                    request: "r".into(),
                    driver: DRIVER.into(),
                    pool: "node-0".into(),
                    device,
                }]
            })
            .ok_or(ClaimError::NotFound {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
            })
    }
}

struct Null;

impl Driver for Null {
    fn prepare(
        &self,
        _claim: &ClaimRef,
        devices: &[Allocated],
    ) -> Result<Vec<DevicePrepared>, DriverError> {
        Ok(devices
            .iter()
            .map(|d| DevicePrepared {
                requests: vec![d.request.clone()],
                pool: d.pool.clone(),
                device: d.device.clone(),
                edits: kubelet_plumbing::cdi::ContainerEdits {
                    env: vec![format!("NULL={}", d.device)],
                    ..Default::default()
                },
            })
            .collect())
    }

    fn unprepare(&self, _: &ClaimRef, _: Option<&PreparedClaim>) -> Result<(), DriverError> {
        Ok(())
    }
}

async fn prepare(report: &mut Report) {
    let dir = tempfile::tempdir().unwrap();
    let watcher =
        PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_34).unwrap();
    let name = DriverName::new(DRIVER).unwrap();
    let endpoint = dir.path().join("plugins/dra.sock");
    let claims = Arc::new(Claims::default());
    let server = DraServer::start(
        DraConfig::new(
            name.clone(),
            &endpoint,
            dir.path().join("plugins/prepared-claims.json"),
            dra_api::cdi::ClaimSpecs::new(
                dir.path().join("cdi"),
                "example.com/null",
                "null.example.com-claim_",
            ),
        ),
        Arc::new(Null),
        Arc::clone(&claims),
    )
    .unwrap();
    let registrar = Registrar::start(RegistrarConfig::new(
        name,
        dir.path().join("plugins_registry"),
        &endpoint,
    ))
    .unwrap();
    watcher
        .wait_until(Duration::from_secs(10), |v| v.plugins.contains_key(DRIVER))
        .await
        .unwrap();
    let mut samples = Samples::new();
    for i in 0..300 {
        let uid = format!("00000000-0000-4000-8000-{i:012x}");
        claims
            .0
            .lock()
            .unwrap()
            .insert(uid.clone(), format!("dev-{}", i % 8));
        let claim = ClaimId {
            namespace: "default".into(),
            name: format!("c{i}"),
            uid: uid.clone(),
        };
        let start = Instant::now();
        let answers = watcher
            .prepare(DRIVER, std::slice::from_ref(&claim))
            .await
            .unwrap();
        samples.push(start.elapsed());
        assert!(answers[&uid].is_ok());
        watcher.unprepare(DRIVER, &[claim]).await.unwrap();
    }
    report.metric(
        "dra.prepare_us_p50",
        samples.percentile_us(50.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "dra.prepare_us_p99",
        samples.percentile_us(99.0).unwrap_or(f64::NAN),
    );
    registrar.stop().await;
    server.stop().await;
}

async fn slices(report: &mut Report) {
    let api = ApiServer::start().await.unwrap();
    api.add_node("node-0");
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let set = |n: usize| {
        DeviceSet::new(
            (0..n)
                .map(|i| {
                    SliceDevice::new(&format!("dev-{i}"))
                        .unwrap()
                        .attribute("index", Attribute::Int(i64::try_from(i).unwrap()))
                })
                .collect(),
        )
        .unwrap()
    };
    let p = SlicePublisher::start(
        client,
        PublisherConfig::new(DriverName::new(DRIVER).unwrap(), "node-0"),
        set(8),
    );
    let mut status = p.watch_status();
    status
        .wait_for(|s| matches!(s, PublishState::Published { .. }))
        .await
        .unwrap();
    let mut samples = Samples::new();
    for i in 0..200 {
        let n = 8 + (i % 2);
        let start = Instant::now();
        p.publish(set(n));
        // Woken by the emulator's own change signal: no polling (which
        // competed for the cores and rounded to the timer's 1 ms).
        api.wait_resource_slices(Duration::from_secs(10), |slices| {
            slices.values().any(|s| {
                s["spec"]["devices"]
                    .as_array()
                    .is_some_and(|d| d.len() == n)
            })
        })
        .await
        .unwrap();
        samples.push(start.elapsed());
    }
    report.metric(
        "dra.slice_update_ms_p50",
        samples.percentile_ms(50.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "dra.slice_update_ms_p99",
        samples.percentile_ms(99.0).unwrap_or(f64::NAN),
    );
    p.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut report = Report::new("dra_api");
    prepare(&mut report).await;
    slices(&mut report).await;
    report.finish().unwrap();
}
