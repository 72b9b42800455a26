//! The operations endpoint, shared by the plugin and the labeller:
//! `/metrics` (Prometheus text), `/healthz` (liveness) and `/readyz`
//! (readiness), GET only, on hyper's HTTP/1.1 server. Implement
//! [`Endpoints`], [`bind`] an address, [`serve`]. [`Progress`] is the
//! watchdog a daemon's [`Endpoints::live`] answers from.
//!
//! Accepting never spins: an accept error (EMFILE, ENFILE, ENOBUFS) is
//! logged once per run of errors and retried after a growing pause.

pub mod progress;

pub use progress::{Progress, Running};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the endpoint reports.
pub trait Endpoints: Send + Sync + 'static {
    /// Prometheus text.
    fn metrics(&self) -> String;
    /// Whether the process is ready, and why not.
    fn ready(&self) -> Result<(), String>;
    /// Whether the process is alive (makes progress), and why not: a
    /// failure makes the liveness probe restart it.
    fn live(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Binds the address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The pause after an accept error: from 10 ms, doubling, up to 1 s.
const PAUSE: ops_kit::Backoff = ops_kit::Backoff {
    initial: Duration::from_millis(10),
    max: Duration::from_secs(1),
};
/// How long one connection may take.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Arc<dyn Endpoints>) {
    accept_loop(
        || async { listener.accept().await.map(|(s, _)| s) },
        endpoints,
    )
    .await;
}

async fn accept_loop<A, F>(mut accept: A, endpoints: Arc<dyn Endpoints>)
where
    A: FnMut() -> F,
    F: Future<Output = std::io::Result<TcpStream>>,
{
    let mut failures: u32 = 0;
    loop {
        match accept().await {
            Ok(stream) => {
                if failures > 0 {
                    tracing::info!("the HTTP endpoint accepts connections again");
                }
                failures = 0;
                let e = Arc::clone(&endpoints);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_LIMIT, connection(stream, e)).await;
                });
            }
            Err(error) => {
                if failures == 0 {
                    tracing::warn!(%error, "the HTTP endpoint cannot accept connections; backing off");
                }
                tokio::time::sleep(PAUSE.delay(failures)).await;
                failures = failures.saturating_add(1);
            }
        }
    }
}

async fn connection(stream: TcpStream, endpoints: Arc<dyn Endpoints>) {
    let service = hyper::service::service_fn(move |req| {
        let e = Arc::clone(&endpoints);
        async move { Ok::<_, Infallible>(answer(&req, e.as_ref())) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn answer(req: &Request<Incoming>, endpoints: &dyn Endpoints) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        r
    };
    let plain = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, plain, "GET only\n".into());
    }
    let verdict = |r: Result<(), String>, ok: &str| match r {
        Ok(()) => text(StatusCode::OK, plain, format!("{ok}\n")),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, plain, format!("{why}\n")),
    };
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            endpoints.metrics(),
        ),
        "/healthz" => verdict(endpoints.live(), "ok"),
        "/readyz" => verdict(endpoints.ready(), "ready"),
        _ => text(StatusCode::NOT_FOUND, plain, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed {
        ready: bool,
        live: bool,
    }

    impl Endpoints for Fixed {
        fn metrics(&self) -> String {
            "m 1\n".into()
        }
        fn ready(&self) -> Result<(), String> {
            if self.ready {
                Ok(())
            } else {
                Err("waiting".into())
            }
        }
        fn live(&self) -> Result<(), String> {
            if self.live {
                Ok(())
            } else {
                Err("stuck".into())
            }
        }
    }

    async fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes() {
        for (ready, live, path, want, body) in [
            (true, true, "/metrics", "200 OK", "m 1"),
            (true, true, "/healthz", "200 OK", "ok"),
            (true, false, "/healthz", "503 Service Unavailable", "stuck"),
            (true, true, "/readyz", "200 OK", "ready"),
            (false, true, "/readyz", "503 Service Unavailable", "waiting"),
            (true, true, "/x", "404 Not Found", "not found"),
            (true, true, "/readyz?verbose=1", "200 OK", "ready"),
        ] {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(serve(listener, Arc::new(Fixed { ready, live })));
            let out = get(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {want}")),
                "{path}: {out}"
            );
            assert!(out.ends_with(&format!("{body}\n")), "{path}: {out}");
            let post = get(
                addr,
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            )
            .await;
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            // Garbage is answered by hyper (400) or closed; the server lives on.
            let _ = get(addr, "\x00\x01 nonsense\r\n\r\n").await;
            let again = get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(again.starts_with("HTTP/1.1 "), "{again}");
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let task = tokio::spawn(accept_loop(
            move || {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err::<TcpStream, _>(std::io::Error::from_raw_os_error(24)) } // EMFILE
            },
            Arc::new(Fixed {
                ready: true,
                live: true,
            }),
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = calls.load(Ordering::SeqCst);
        // 10, 20, 40 … 640 ms, then 1 s each: about 17 in 10 s, not millions.
        assert!((10..=20).contains(&n), "{n} accept attempts in 10 s");
        task.abort();
    }
}
