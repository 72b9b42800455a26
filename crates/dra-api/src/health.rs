//! The DRA health stream (`v1alpha1.DRAResourceHealth`, kubelet 1.34+ with
//! the `ResourceHealthStatus` feature gate): the kubelet opens
//! `NodeWatchResources` after registering the driver (and again every 5 s
//! while it fails or ends) and expects, on every message, the health of
//! every device of the driver; devices left out become Unknown after a
//! timeout. The health shows in the status of the pods using the devices.
//!
//! A driver that serves it lists [`HEALTH_SERVICE`] in its registration
//! (`RegistrarConfig::extra_service`) and publishes with
//! [`crate::DraServer::publish_health`]; each stream sends the current list
//! at once, then every change (the latest wins).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::pb::health_v1alpha1 as pb;

/// The `supported_versions` entry of the health service.
pub const HEALTH_SERVICE: &str = "v1alpha1.DRAResourceHealth";

/// A device's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceHealth {
    /// Not known (yet).
    Unknown,
    /// Healthy.
    Healthy,
    /// Unhealthy.
    Unhealthy,
}

/// One device's health, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEntry {
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
    /// Its health.
    pub health: DeviceHealth,
    /// A detail for people (kubelets before 1.36 drop it; at most 1024
    /// characters are kept).
    pub message: String,
}

/// What every stream reads: the latest list and when it was determined.
pub(crate) type HealthList = Arc<(Vec<HealthEntry>, i64)>;

pub(crate) fn stamp(entries: Vec<HealthEntry>) -> HealthList {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Arc::new((entries, now))
}

fn message(list: &HealthList) -> pb::NodeWatchResourcesResponse {
    let (entries, at) = (&list.0, list.1);
    pb::NodeWatchResourcesResponse {
        devices: entries
            .iter()
            .map(|e| pb::DeviceHealth {
                device: Some(pb::DeviceIdentifier {
                    pool_name: e.pool.clone(),
                    device_name: e.device.clone(),
                }),
                health: match e.health {
                    DeviceHealth::Unknown => pb::HealthStatus::Unknown,
                    DeviceHealth::Healthy => pb::HealthStatus::Healthy,
                    DeviceHealth::Unhealthy => pb::HealthStatus::Unhealthy,
                } as i32,
                last_updated_time: at,
                health_check_timeout_seconds: 0,
                message: e.message.chars().take(1024).collect(),
            })
            .collect(),
    }
}

pub(crate) struct HealthService {
    pub(crate) list: watch::Receiver<HealthList>,
    /// The server's stop: every stream ends with it, or a graceful
    /// shutdown would wait for them forever.
    pub(crate) stop: watch::Receiver<bool>,
}

/// A health stream: the current list at once, then every change, until
/// the server stops.
#[derive(Debug)]
pub struct Responses {
    list: WatchStream<HealthList>,
    stop: WatchStream<bool>,
}

impl Stream for Responses {
    type Item = Result<pb::NodeWatchResourcesResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        while let Poll::Ready(stop) = Pin::new(&mut self.stop).poll_next(cx) {
            if stop != Some(false) {
                return Poll::Ready(None);
            }
        }
        Pin::new(&mut self.list)
            .poll_next(cx)
            .map(|l| l.map(|l| Ok(message(&l))))
    }
}

#[tonic::async_trait]
impl pb::dra_resource_health_server::DraResourceHealth for HealthService {
    type NodeWatchResourcesStream = Responses;

    async fn node_watch_resources(
        &self,
        _: Request<pb::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        Ok(Response::new(Responses {
            list: WatchStream::new(self.list.clone()),
            stop: WatchStream::new(self.stop.clone()),
        }))
    }
}
