//! Framework figures, each against the kubelet emulator over real Unix
//! sockets:
//! - `framework.allocate_us_p50`: one Allocate through the framework,
//!   against `framework.allocate_baseline_us_p50`: the same call to a bare
//!   generated tonic service that answers at once (same client, same run);
//! - `framework.update_ms_p99`: publish → the emulator has the new list;
//! - `framework.reregister_ms_p99`: a new `kubelet.sock` → registered again;
//! - `framework.stream_drop_reregister_ms_p99`: the kubelet drops the
//!   ListAndWatch stream and stays up → registered again with the list
//!   (each stream lives 300 ms first, as a stable one would);
//! - `framework.allocate_adapter_us_p50`: the bare service behind the
//!   `:authority` adapter, against the same baseline: the adapter's cost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_report::{Report, Samples};
use devplugin_api::pb::device_plugin_client::DevicePluginClient;
use devplugin_api::pb::device_plugin_server::{DevicePlugin, DevicePluginServer};
use devplugin_api::*;
use kubelet_emulator::KubeletEmulator;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const CALLS: usize = 2000;
const UPDATES: usize = 300;
const RESTARTS: usize = 50;
const STREAM_DROPS: usize = 50;
const RES: &str = "bench.example.com/dev";

struct Fixed;

impl Plugin for Fixed {
    fn allocate(&self, r: &AllocateRequest) -> Result<ContainerAllocation, PluginError> {
        let mut a = ContainerAllocation::default();
        for id in &r.device_ids {
            a.devices.push(DeviceSpec {
                container_path: format!("/dev/{id}").into(),
                host_path: format!("/dev/{id}").into(),
                permissions: Permissions::READ_WRITE,
            });
        }
        Ok(a)
    }
}

/// The baseline: the generated service with nothing behind it.
struct Bare;

#[tonic::async_trait]
impl DevicePlugin for Bare {
    async fn get_device_plugin_options(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::DevicePluginOptions>, Status> {
        Ok(Response::new(pb::DevicePluginOptions::default()))
    }
    type ListAndWatchStream = tokio_stream::Empty<Result<pb::ListAndWatchResponse, Status>>;
    async fn list_and_watch(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }
    async fn get_preferred_allocation(
        &self,
        _: Request<pb::PreferredAllocationRequest>,
    ) -> Result<Response<pb::PreferredAllocationResponse>, Status> {
        Ok(Response::new(pb::PreferredAllocationResponse::default()))
    }
    async fn allocate(
        &self,
        r: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let containers = r
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| pb::ContainerAllocateResponse {
                devices: c
                    .devices_ids
                    .iter()
                    .map(|id| pb::DeviceSpec {
                        container_path: format!("/dev/{id}"),
                        host_path: format!("/dev/{id}"),
                        permissions: "rw".into(),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::AllocateResponse {
            container_responses: containers,
        }))
    }
    async fn pre_start_container(
        &self,
        _: Request<pb::PreStartContainerRequest>,
    ) -> Result<Response<pb::PreStartContainerResponse>, Status> {
        Ok(Response::new(pb::PreStartContainerResponse {}))
    }
}

fn list(n: usize, tag: usize) -> DeviceList {
    DeviceList::new(
        (0..n)
            .map(|i| Device::healthy(DeviceId::new(&format!("dev-{tag}-{i}")).unwrap()))
            .collect(),
    )
    .unwrap()
}

async fn time_allocates(
    client: &mut DevicePluginClient<tonic::transport::Channel>,
    id: &str,
) -> Samples {
    let request = || pb::AllocateRequest {
        container_requests: vec![pb::ContainerAllocateRequest {
            devices_ids: vec![id.to_owned()],
        }],
    };
    for _ in 0..100 {
        client.allocate(request()).await.unwrap();
    }
    let mut s = Samples::new();
    for _ in 0..CALLS {
        let start = Instant::now();
        client.allocate(request()).await.unwrap();
        s.push(start.elapsed());
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut report = Report::new("devplugin_api_framework");
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let config = FrameworkConfig::new(dir.path()).backoff(Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(100),
    });
    let framework = Framework::new(config);
    let handle = framework
        .serve(ResourceName::new(RES).unwrap(), Arc::new(Fixed), list(8, 0))
        .unwrap();
    let view = kubelet
        .wait_until(Duration::from_secs(10), |v| {
            v.devices(RES).is_some_and(|d| d.devices().len() == 8)
        })
        .await
        .unwrap();

    // Allocate: framework vs bare service, same client code.
    let ours_path = dir.path().join(&view.resources[RES].endpoint);
    let mut ours = DevicePluginClient::new(
        uds::connect(&ours_path, Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let bare_path = dir.path().join("bare.sock");
    let listener = tokio::net::UnixListener::bind(&bare_path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(Bare))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let mut bare = DevicePluginClient::new(
        uds::connect(&bare_path, Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let adapted_path = dir.path().join("adapted.sock");
    let listener = tokio::net::UnixListener::bind(&adapted_path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(Bare))
            .serve_with_incoming(uds::incoming(listener)),
    );
    let mut adapted = DevicePluginClient::new(
        uds::connect(&adapted_path, Duration::from_secs(5))
            .await
            .unwrap(),
    );
    // Interleave rounds so that noise hits both.
    let mut ours_s = Samples::new();
    let mut bare_s = Samples::new();
    let mut adapted_s = Samples::new();
    for _ in 0..3 {
        bare_s.extend(&time_allocates(&mut bare, "dev-0-1").await);
        adapted_s.extend(&time_allocates(&mut adapted, "dev-0-1").await);
        ours_s.extend(&time_allocates(&mut ours, "dev-0-1").await);
    }
    report.metric(
        "framework.allocate_adapter_us_p50",
        adapted_s.percentile_us(50.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "framework.allocate_us_p50",
        ours_s.percentile_us(50.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "framework.allocate_baseline_us_p50",
        bare_s.percentile_us(50.0).unwrap_or(f64::NAN),
    );

    // Publish → seen by the kubelet.
    let mut updates = Samples::new();
    for i in 1..=UPDATES {
        let start = Instant::now();
        handle.publish(list(8, i));
        let want = format!("dev-{i}-0");
        kubelet
            .wait_until(Duration::from_secs(10), |v| {
                v.devices(RES)
                    .and_then(|d| d.devices().first())
                    .is_some_and(|d| d.id.as_str() == want)
            })
            .await
            .unwrap();
        updates.push(start.elapsed());
    }
    report.metric(
        "framework.update_ms_p99",
        updates.percentile_ms(99.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "framework.update_ms_p50",
        updates.percentile_ms(50.0).unwrap_or(f64::NAN),
    );

    // Kubelet restart → registered again.
    let mut rereg = Samples::new();
    for i in 0..RESTARTS {
        let before = kubelet.view().registrations(RES);
        kubelet.stop().await;
        let start = Instant::now();
        kubelet.resume().await.unwrap();
        kubelet
            .wait_until(Duration::from_secs(10), |v| {
                v.registrations(RES) > before && v.devices(RES).is_some()
            })
            .await
            .unwrap_or_else(|e| panic!("restart {i}: {e}"));
        rereg.push(start.elapsed());
    }
    report.metric(
        "framework.reregister_ms_p99",
        rereg.percentile_ms(99.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "framework.reregister_ms_p50",
        rereg.percentile_ms(50.0).unwrap_or(f64::NAN),
    );

    // The stream dropped, the kubelet up → registered again with the list.
    let mut dropped = Samples::new();
    for i in 0..STREAM_DROPS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = kubelet.view().registrations(RES);
        let start = Instant::now();
        assert!(kubelet.end_stream(RES), "drop {i}: no stream");
        kubelet
            .wait_until(Duration::from_secs(10), |v| {
                v.registrations(RES) > before && v.is_connected(RES) && v.devices(RES).is_some()
            })
            .await
            .unwrap_or_else(|e| panic!("drop {i}: {e}"));
        dropped.push(start.elapsed());
    }
    report.metric(
        "framework.stream_drop_reregister_ms_p99",
        dropped.percentile_ms(99.0).unwrap_or(f64::NAN),
    );
    report.metric(
        "framework.stream_drop_reregister_ms_p50",
        dropped.percentile_ms(50.0).unwrap_or(f64::NAN),
    );
    handle.stop().await;
    report.finish().unwrap();
}
