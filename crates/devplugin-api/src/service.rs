//! The `DevicePlugin` gRPC service of one resource.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::metrics::ResourceMetrics;
use crate::pb;
use crate::plugin::{AllocateRequest, Plugin, PluginOptions, PreferredRequest};
use crate::types::{DeviceId, DeviceList, Health, ResourceName};

/// A published device list with its wire message, shared by every stream.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub(crate) list: DeviceList,
    pub(crate) message: pb::ListAndWatchResponse,
}

pub(crate) struct Service<P> {
    pub(crate) resource: ResourceName,
    pub(crate) plugin: Arc<P>,
    pub(crate) options: PluginOptions,
    pub(crate) devices: watch::Receiver<Arc<Published>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) metrics: Arc<ResourceMetrics>,
    /// ListAndWatch streams on this socket, for the lifecycle.
    pub(crate) streams: Arc<watch::Sender<StreamCount>>,
}

/// The ListAndWatch streams of one socket. `opened` only grows: a stream
/// that opens and ends between two looks is still seen to have existed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamCount {
    /// Streams opened since the socket was served.
    pub(crate) opened: u64,
    /// Streams open now.
    pub(crate) open: usize,
}

/// Counts a stream while it lives: dropped when tonic drops the stream
/// (the kubelet went away) or the stream ends.
struct StreamGuard {
    metrics: Arc<ResourceMetrics>,
    streams: Arc<watch::Sender<StreamCount>>,
}

impl StreamGuard {
    fn new(metrics: Arc<ResourceMetrics>, streams: Arc<watch::Sender<StreamCount>>) -> Self {
        metrics.active_streams.fetch_add(1, Ordering::Relaxed);
        streams.send_modify(|n| {
            n.opened += 1;
            n.open += 1;
        });
        Self { metrics, streams }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.active_streams.fetch_sub(1, Ordering::Relaxed);
        self.streams
            .send_modify(|n| n.open = n.open.saturating_sub(1));
    }
}

/// One ListAndWatch stream: the current list at once, then every change
/// (latest wins), until the server shuts down. No task of its own: tonic
/// polls it and drops it when the kubelet goes away.
pub(crate) struct DeviceStream {
    devices: WatchStream<Arc<Published>>,
    shutdown: WatchStream<bool>,
    _guard: StreamGuard,
}

impl Stream for DeviceStream {
    type Item = Result<pb::ListAndWatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        while let Poll::Ready(stop) = Pin::new(&mut self.shutdown).poll_next(cx) {
            if stop != Some(false) {
                return Poll::Ready(None);
            }
        }
        Pin::new(&mut self.devices)
            .poll_next(cx)
            .map(|p| p.map(|p| Ok(p.message.clone())))
    }
}

impl<P: Plugin> Service<P> {
    fn check_ids(&self, ids: &[String]) -> Result<Vec<DeviceId>, Status> {
        let current = Arc::clone(&self.devices.borrow());
        let mut unknown = Vec::new();
        let mut unhealthy = Vec::new();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match current.list.get(id) {
                None => unknown.push(id.as_str()),
                Some(d) if d.health == Health::Unhealthy => unhealthy.push(id.as_str()),
                Some(d) => out.push(d.id.clone()),
            }
        }
        if unknown.is_empty() && unhealthy.is_empty() {
            return Ok(out);
        }
        let mut parts = Vec::new();
        if !unknown.is_empty() {
            parts.push(format!("unknown device IDs {}", unknown.join(", ")));
        }
        if !unhealthy.is_empty() {
            parts.push(format!("unhealthy device IDs {}", unhealthy.join(", ")));
        }
        Err(Status::invalid_argument(format!(
            "{}: {}",
            self.resource,
            parts.join("; ")
        )))
    }
}

fn check_preferred(
    resource: &ResourceName,
    c: &pb::ContainerPreferredAllocationRequest,
) -> Result<PreferredRequest, Status> {
    let bad = |m: String| Err(Status::invalid_argument(format!("{resource}: {m}")));
    let Ok(size) = usize::try_from(c.allocation_size) else {
        return bad(format!("allocation size {} is negative", c.allocation_size));
    };
    let available: HashSet<&str> = c.available_device_i_ds.iter().map(String::as_str).collect();
    if size > available.len() {
        return bad(format!(
            "asked for {size} devices but only {} are available",
            available.len()
        ));
    }
    let missing: Vec<&str> = c
        .must_include_device_i_ds
        .iter()
        .map(String::as_str)
        .filter(|id| !available.contains(id))
        .collect();
    if !missing.is_empty() {
        return bad(format!(
            "must-include device IDs {} are not available",
            missing.join(", ")
        ));
    }
    let must: HashSet<&str> = c
        .must_include_device_i_ds
        .iter()
        .map(String::as_str)
        .collect();
    if must.len() > size {
        return bad(format!(
            "{} devices must be included but only {size} are asked for",
            must.len()
        ));
    }
    Ok(PreferredRequest {
        available: device_ids(resource, &c.available_device_i_ds)?,
        must_include: device_ids(resource, &c.must_include_device_i_ds)?,
        size,
    })
}

/// The kubelet's IDs as [`DeviceId`]s; one that is not valid is refused.
fn device_ids(resource: &ResourceName, ids: &[String]) -> Result<Vec<DeviceId>, Status> {
    ids.iter()
        .map(|id| {
            DeviceId::new(id).map_err(|e| Status::invalid_argument(format!("{resource}: {e}")))
        })
        .collect()
}

/// Checks a plugin's preferred answer; a wrong one is a plugin bug.
fn check_answer(
    resource: &ResourceName,
    req: &PreferredRequest,
    answer: &[DeviceId],
) -> Result<(), Status> {
    let chosen: HashSet<&DeviceId> = answer.iter().collect();
    let ok = answer.len() == req.size
        && chosen.len() == answer.len()
        && answer.iter().all(|id| req.available.contains(id))
        && req.must_include.iter().all(|id| chosen.contains(id));
    if ok {
        Ok(())
    } else {
        Err(Status::internal(format!(
            "{resource}: the plugin preferred {answer:?}, which is not {} distinct available devices including {:?}",
            req.size, req.must_include
        )))
    }
}

#[tonic::async_trait]
impl<P: Plugin> pb::device_plugin_server::DevicePlugin for Service<P> {
    async fn get_device_plugin_options(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::DevicePluginOptions>, Status> {
        Ok(Response::new(pb::DevicePluginOptions {
            pre_start_required: self.options.pre_start_required,
            get_preferred_allocation_available: self.options.preferred_allocation,
        }))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        tracing::debug!(resource = %self.resource, "ListAndWatch stream opened");
        Ok(Response::new(DeviceStream {
            devices: WatchStream::new(self.devices.clone()),
            shutdown: WatchStream::new(self.shutdown.clone()),
            _guard: StreamGuard::new(Arc::clone(&self.metrics), Arc::clone(&self.streams)),
        }))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<pb::PreferredAllocationRequest>,
    ) -> Result<Response<pb::PreferredAllocationResponse>, Status> {
        if !self.options.preferred_allocation {
            return Err(Status::unimplemented(format!(
                "{}: no preferred allocation is offered",
                self.resource
            )));
        }
        let mut responses = Vec::new();
        for c in &request.get_ref().container_requests {
            let req = check_preferred(&self.resource, c)?;
            let answer = self.plugin.preferred_allocation(&req)?;
            check_answer(&self.resource, &req, &answer)?;
            responses.push(pb::ContainerPreferredAllocationResponse {
                device_i_ds: answer.iter().map(|id| id.as_str().to_owned()).collect(),
            });
        }
        ResourceMetrics::inc(&self.metrics.preferred_allocations);
        Ok(Response::new(pb::PreferredAllocationResponse {
            container_responses: responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let mut responses = Vec::new();
        for c in &request.get_ref().container_requests {
            let outcome = self.check_ids(&c.devices_ids).and_then(|device_ids| {
                Ok(self.plugin.allocate(&AllocateRequest { device_ids })?)
            });
            match outcome {
                Ok(allocation) => responses.push(allocation.to_pb()),
                Err(status) => {
                    ResourceMetrics::inc(&self.metrics.allocation_failures);
                    tracing::warn!(resource = %self.resource, ids = ?c.devices_ids, error = %status.message(), "allocation refused");
                    return Err(status);
                }
            }
        }
        ResourceMetrics::inc(&self.metrics.allocations);
        Ok(Response::new(pb::AllocateResponse {
            container_responses: responses,
        }))
    }

    async fn pre_start_container(
        &self,
        request: Request<pb::PreStartContainerRequest>,
    ) -> Result<Response<pb::PreStartContainerResponse>, Status> {
        let ids = device_ids(&self.resource, &request.get_ref().devices_ids)?;
        self.plugin.pre_start(&ids)?;
        Ok(Response::new(pb::PreStartContainerResponse {}))
    }
}
