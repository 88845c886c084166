//! The agent's HTTP health endpoint, for the DaemonSet's probes:
//!
//! - `GET /healthz`: 200 while the agent can serve kubelet (liveness): its
//!   CSI socket must still exist, since kubelet cannot reach a plugin whose
//!   socket was removed, and a restart is what brings it back;
//! - `GET /readyz`: 200 when every pool is usable and, if registration is
//!   on, kubelet has accepted the plugin, and, if the provisioner runs, it
//!   is not down after a failure; 503 with the reason otherwise;
//! - `GET /metrics`: the agent's metrics in the OpenMetrics text format
//!   (see [`crate::metrics`]).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection,
//! bounded request size, no keep-alive.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::{CONTENT_TYPE, Metrics};

/// Answers readiness: `Ok(())` or the reason for not being ready.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

fn response(status: &str, body: &str, content_type: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn answer(
    path: &str,
    live: &ReadyCheck,
    ready: &ReadyCheck,
    metrics: &Arc<Metrics>,
) -> String {
    // A query names nothing here, but clients add one (kubectl's
    // --request-timeout adds `?timeout=`, which the apiserver's pod proxy
    // passes on): the path alone is matched.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match path {
        "/healthz" | "/livez" => match live().await {
            Ok(()) => response("200 OK", "ok\n", "text/plain"),
            Err(why) => response("503 Service Unavailable", &format!("{why}\n"), "text/plain"),
        },
        "/readyz" => match ready().await {
            Ok(()) => response("200 OK", "ready\n", "text/plain"),
            Err(why) => response("503 Service Unavailable", &format!("{why}\n"), "text/plain"),
        },
        "/metrics" => {
            // The pool gauges read the pools' filesystems.
            let metrics = metrics.clone();
            match tokio::task::spawn_blocking(move || metrics.encode()).await {
                Ok(Ok(text)) => response("200 OK", &text, CONTENT_TYPE),
                _ => response(
                    "500 Internal Server Error",
                    "metrics could not be encoded\n",
                    "text/plain",
                ),
            }
        }
        _ => response("404 Not Found", "not found\n", "text/plain"),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    live: ReadyCheck,
    ready: ReadyCheck,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    // The bound address: with port 0 (the tests), the one the kernel chose.
    tracing::info!(addr = %listener.local_addr()?, "serving health endpoint");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => c?,
            _ = &mut shutdown => return Ok(()),
        };
        let live = live.clone();
        let ready = ready.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut len = 0;
            // Read the request head (bounded, with a deadline).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.split_whitespace();
            let reply = match (parts.next(), parts.next()) {
                (Some("GET"), Some(path)) => answer(path, &live, &ready, &metrics).await,
                _ => response("400 Bad Request", "GET only\n", "text/plain"),
            };
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_answer_by_path() {
        let ready: ReadyCheck =
            Arc::new(|| Box::pin(async { Err("pool image: gone".to_string()) }));
        let live: ReadyCheck = Arc::new(|| Box::pin(async { Ok(()) }));
        let dead: ReadyCheck = Arc::new(|| Box::pin(async { Err("CSI socket gone".to_string()) }));
        let metrics = Arc::new(Metrics::new(Vec::new));
        let r = answer("/healthz", &live, &ready, &metrics).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = answer("/healthz", &dead, &ready, &metrics).await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("CSI socket gone\n"),
            "{r}"
        );
        let r = answer("/readyz", &live, &ready, &metrics).await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("pool image: gone\n"),
            "{r}"
        );
        let r = answer("/metrics", &live, &ready, &metrics).await;
        assert!(
            r.starts_with("HTTP/1.1 200")
                && r.contains(&format!("Content-Type: {}\r\n", CONTENT_TYPE))
                && r.ends_with("# EOF\n"),
            "{r}"
        );
        let r = answer("/metrics?timeout=10s", &live, &ready, &metrics).await;
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "a query is not part of the path: {r}"
        );
        let r = answer("/nope", &live, &ready, &metrics).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }
}
