//! What a plugin author implements.

use crate::types::{ContainerAllocation, DeviceId};

/// The options a plugin advertises to the kubelet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginOptions {
    /// The kubelet calls `GetPreferredAllocation` when it has a choice.
    pub preferred_allocation: bool,
    /// The kubelet calls `PreStartContainer` before starting a container.
    pub pre_start_required: bool,
}

/// A kubelet request for one container's devices. The framework has
/// already checked that every ID is advertised and healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocateRequest {
    /// The devices, in the kubelet's order.
    pub device_ids: Vec<DeviceId>,
}

/// A kubelet question: which `size` of the `available` devices, including
/// `must_include`, should one container get? The framework has already
/// checked that the question can be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferredRequest {
    /// The candidates, in the kubelet's order.
    pub available: Vec<DeviceId>,
    /// Devices that must be in the answer.
    pub must_include: Vec<DeviceId>,
    /// How many devices to choose.
    pub size: usize,
}

impl PreferredRequest {
    /// The simplest valid answer: `must_include`, then the first other
    /// available devices in the kubelet's order.
    #[must_use]
    pub fn first_fit(&self) -> Vec<DeviceId> {
        let mut out = self.must_include.clone();
        for id in &self.available {
            if out.len() >= self.size {
                break;
            }
            if !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }
}

/// An error a plugin returns to the kubelet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The request cannot be satisfied as asked (gRPC `InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The devices cannot be used right now (gRPC `Unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (gRPC `Internal`).
    #[error("{0}")]
    Internal(String),
}

impl From<PluginError> for tonic::Status {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::InvalidArgument(m) => Self::invalid_argument(m),
            PluginError::Unavailable(m) => Self::unavailable(m),
            PluginError::Internal(m) => Self::internal(m),
        }
    }
}

/// The allocation logic of one resource. Methods are called on the gRPC
/// server's tasks: they must answer quickly and never block (the kubelet
/// gives `Allocate` no deadline: a hung call blocks pod admission).
pub trait Plugin: Send + Sync + 'static {
    /// What the kubelet gets for one container.
    ///
    /// # Errors
    /// A [`PluginError`] the kubelet reports on the pod.
    fn allocate(&self, request: &AllocateRequest) -> Result<ContainerAllocation, PluginError>;

    /// The options advertised to the kubelet (default: none).
    fn options(&self) -> PluginOptions {
        PluginOptions::default()
    }

    /// The preferred devices, when [`PluginOptions::preferred_allocation`]
    /// is set (default: [`PreferredRequest::first_fit`]). The framework
    /// refuses answers that do not have exactly `size` distinct available
    /// IDs including every `must_include`.
    ///
    /// # Errors
    /// A [`PluginError`] the kubelet reports on the pod.
    fn preferred_allocation(
        &self,
        request: &PreferredRequest,
    ) -> Result<Vec<DeviceId>, PluginError> {
        Ok(request.first_fit())
    }

    /// Called before a container starts, when
    /// [`PluginOptions::pre_start_required`] is set (default: nothing). The
    /// framework refuses IDs that are not valid device IDs.
    ///
    /// # Errors
    /// A [`PluginError`] that fails the container start.
    fn pre_start(&self, _device_ids: &[DeviceId]) -> Result<(), PluginError> {
        Ok(())
    }
}
