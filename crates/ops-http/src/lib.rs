//! A minimal HTTP/1.1 endpoint for `/metrics`, `/healthz` and `/readyz`
//! (GET only; one request per connection), shared by the plugin and the
//! labeller. Implement [`Endpoints`], [`bind`] an address, [`serve`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers a path: status code, content type, body.
pub trait Endpoints: Send + Sync + 'static {
    /// Prometheus text.
    fn metrics(&self) -> String;
    /// Whether the plugin is ready, and why not.
    fn ready(&self) -> Result<(), String>;
}

/// Binds the address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Accepts connections forever.
pub async fn serve(listener: TcpListener, endpoints: Arc<dyn Endpoints>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let e = Arc::clone(&endpoints);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, e.as_ref())).await;
        });
    }
}

async fn answer(mut stream: TcpStream, endpoints: &dyn Endpoints) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", endpoints.metrics()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") => match endpoints.ready() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl Endpoints for Fixed {
        fn metrics(&self) -> String {
            "m 1\n".into()
        }
        fn ready(&self) -> Result<(), String> {
            if self.0 {
                Ok(())
            } else {
                Err("waiting".into())
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
        for (ready, path, want) in [
            (true, "/metrics", "200 OK"),
            (true, "/healthz", "200 OK"),
            (true, "/readyz", "200 OK"),
            (false, "/readyz", "503 Service Unavailable"),
            (true, "/x", "404 Not Found"),
        ] {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(serve(listener, Arc::new(Fixed(ready))));
            let out = get(addr, &format!("GET {path} HTTP/1.1\r\n\r\n")).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {want}")),
                "{path}: {out}"
            );
            let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            task.abort();
        }
    }
}
