//! gRPC clients over Unix domain sockets.

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::authority::{AuthorityRule, SendAuthority};

/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

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

/// Opens a gRPC channel to the Unix socket at `path`. Its requests carry
/// `:authority: localhost`, as the kubelet's since 1.26.
///
/// # Errors
/// When the socket does not accept a connection within `timeout`.
pub async fn connect(path: &Path, timeout: Duration) -> Result<Channel, DialError> {
    dial(path, timeout, None).await
}

/// Like [`connect`], with the `:authority` its requests carry set by `rule`
/// whatever the HTTP/2 client chose: how an emulator dials like a client
/// that sends a socket path or nothing (see [`crate::authority`]).
///
/// # Errors
/// When the socket does not accept a connection within `timeout`.
pub async fn connect_with_authority(
    path: &Path,
    timeout: Duration,
    rule: AuthorityRule,
) -> Result<Channel, DialError> {
    dial(path, timeout, Some(rule)).await
}

async fn dial(
    path: &Path,
    timeout: Duration,
    rule: Option<AuthorityRule>,
) -> Result<Channel, DialError> {
    let owned = path.to_owned();
    let shown = path.display().to_string();
    // The URI is required by the HTTP layer but never resolved.
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = owned.clone();
        let rule = rule.clone();
        async move {
            let stream = UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(SendAuthority::maybe(stream, rule)))
        }
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

/// Listens on a new Unix socket at `path` whose mode is `0600` from the
/// moment it exists — not whatever the process's umask leaves: only root
/// (the kubelet) may connect. The mode is set on the socket before it is
/// bound; Linux creates the file with the socket inode's mode less the
/// umask (`net/unix/af_unix.c`, `unix_bind_bsd`), so there is no window in
/// which another user could connect. Must be called inside a tokio
/// runtime.
///
/// # Errors
/// When the socket cannot be created, bound or listened on.
pub fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    use std::os::fd::AsRawFd as _;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// The connections of `listener`, each accepting any `:authority` (see
/// [`crate::authority`]): what every server the framework runs on a Unix
/// socket serves, and what emulators of kubelet-facing servers should too.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<crate::authority::AnyAuthority<UnixStream>>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|conn| conn.map(crate::authority::AnyAuthority::new))
}

/// Removes the sockets in `dir` whose file names `ours` accepts and that
/// refuse connections (left by a killed process); live ones (another
/// instance during a rolling update) and every other entry are kept.
/// Returns the paths removed. How the device-plugin and the DRA
/// frameworks clean up after a crash.
pub async fn remove_refusing(dir: &Path, ours: impl Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !ours(&name) {
            continue;
        }
        let path = entry.path();
        let alive = tokio::time::timeout(Duration::from_millis(500), UnixStream::connect(&path))
            .await
            .is_ok_and(|r| r.is_ok());
        if alive {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a stale socket");
                removed.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "could not remove a stale socket")
            }
        }
    }
    removed
}
