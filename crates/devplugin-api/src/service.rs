//! The `DevicePlugin` gRPC service of one resource.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
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
}

/// Decrements the stream gauge when a stream task ends, however it ends.
struct StreamGuard(Arc<ResourceMetrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::Relaxed);
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
        available: c.available_device_i_ds.clone(),
        must_include: c.must_include_device_i_ds.clone(),
        size,
    })
}

/// Checks a plugin's preferred answer; a wrong one is a plugin bug.
fn check_answer(
    resource: &ResourceName,
    req: &PreferredRequest,
    answer: &[String],
) -> Result<(), Status> {
    let chosen: HashSet<&str> = answer.iter().map(String::as_str).collect();
    let ok = answer.len() == req.size
        && chosen.len() == answer.len()
        && answer.iter().all(|id| req.available.contains(id))
        && req
            .must_include
            .iter()
            .all(|id| chosen.contains(id.as_str()));
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

    type ListAndWatchStream = ReceiverStream<Result<pb::ListAndWatchResponse, Status>>;

    async fn list_and_watch(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(1);
        let mut devices = self.devices.clone();
        let mut shutdown = self.shutdown.clone();
        let metrics = Arc::clone(&self.metrics);
        metrics.active_streams.fetch_add(1, Ordering::Relaxed);
        let resource = self.resource.clone();
        tokio::spawn(async move {
            let _guard = StreamGuard(metrics);
            tracing::debug!(%resource, "ListAndWatch stream opened");
            devices.mark_changed();
            loop {
                if *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.changed() => break,
                    () = tx.closed() => break,
                    changed = devices.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let msg = devices.borrow_and_update().message.clone();
                        tokio::select! {
                            sent = tx.send(Ok(msg)) => if sent.is_err() { break },
                            _ = shutdown.changed() => break,
                        }
                    }
                }
            }
            tracing::debug!(%resource, "ListAndWatch stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
                device_i_ds: answer,
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
        self.plugin.pre_start(&request.get_ref().devices_ids)?;
        Ok(Response::new(pb::PreStartContainerResponse {}))
    }
}
