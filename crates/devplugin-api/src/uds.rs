//! gRPC clients over Unix domain sockets.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a socket could not be dialled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The connection failed.
    #[error("could not connect to {path}")]
    Connect {
        /// The socket.
        path: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection did not complete in time.
    #[error("connecting to {path} timed out after {timeout:?}")]
    Timeout {
        /// The socket.
        path: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Opens a gRPC channel to the Unix socket at `path`.
///
/// # Errors
/// When the socket does not accept a connection within `timeout`.
pub async fn connect(path: &Path, timeout: Duration) -> Result<Channel, DialError> {
    let owned = path.to_owned();
    let shown = path.display().to_string();
    // The URI is required by the HTTP layer but never resolved.
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = owned.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    }));
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(DialError::Connect {
            path: shown,
            source,
        }),
        Err(_) => Err(DialError::Timeout {
            path: shown,
            timeout,
        }),
    }
}
