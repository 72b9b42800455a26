//! The Kubernetes client a node's driver uses: a kubeconfig file, or the
//! in-cluster credentials of its pod.

use std::path::{Path, PathBuf};

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The kubeconfig cannot be read or used.
    #[error("cannot use kubeconfig {}: {reason}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No kubeconfig was given and there are no in-cluster credentials.
    #[error("no kubeconfig given and no in-cluster configuration: {0}")]
    NoConfig(String),
    /// The client could not be built.
    #[error("cannot build the Kubernetes client: {0}")]
    Build(String),
}

/// A client from `kubeconfig`, or from the pod's in-cluster credentials
/// when `None`.
///
/// # Errors
/// As [`ClientError`] says.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |reason: String| ClientError::Kubeconfig {
                path: path.to_owned(),
                reason,
            };
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| bad(ops_kit::Chain(&e).to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(ops_kit::Chain(&e).to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ClientError::NoConfig(ops_kit::Chain(&e).to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| ClientError::Build(ops_kit::Chain(&e).to_string()))
}
