//! The Pull service: the agent that holds a source streams its data
//! extents, each chunk with its checksum, then a trailer with the content
//! digest of the whole source; and the mutual-TLS listener it is served on.
//!
//! A resumed Pull (offset > 0) still reads the source below its offset,
//! locally, to compute the digest over all of it; only the part at and
//! after the offset goes on the wire. The file is read from one open
//! descriptor on a blocking thread, a bounded channel (a few chunks) ahead
//! of the network.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status};

use crate::proto::transfer::v1 as pb;
use crate::proto::transfer::v1::transfer_server::{Transfer, TransferServer};

use super::digest::ContentDigest;
use super::source::{self, Opened, SourceRef, Sources};
use super::{CHUNK_BYTES, Error, TrustDir, extent};

/// Messages read ahead of the network, per stream.
const READ_AHEAD: usize = 4;
/// How long a peer may take over its TLS handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The Pull service over this node's sources.
#[derive(Clone)]
pub struct TransferService {
    sources: Arc<dyn Sources>,
    cut_after: Arc<Mutex<Option<u64>>>,
}

impl std::fmt::Debug for TransferService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferService").finish_non_exhaustive()
    }
}

impl TransferService {
    pub fn new(sources: Arc<dyn Sources>) -> Self {
        TransferService {
            sources,
            cut_after: Arc::new(Mutex::new(None)),
        }
    }

    /// Fault injection for tests: the next Pull ends with an error once it
    /// has sent `bytes` data bytes, as a broken connection would.
    pub fn cut_next_stream_after(&self, bytes: u64) {
        *self
            .cut_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(bytes);
    }

    pub fn into_server(self) -> TransferServer<Self> {
        TransferServer::new(self)
    }
}

#[tonic::async_trait]
impl Transfer for TransferService {
    type PullStream = ReceiverStream<Result<pb::PullResponse, Status>>;

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let req = request.into_inner();
        let refused = |e: Error| {
            tracing::warn!(peer = %peer, error = %e, "Pull refused");
            Status::from(e)
        };
        let source_ref = SourceRef::from_proto(req.source.as_ref()).map_err(refused)?;
        let sources = self.sources.clone();
        let located = source_ref.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let path = sources.locate(&located)?;
            source::open(&path)
        })
        .await
        .map_err(|e| Status::internal(format!("opening {source_ref}: task failed: {e}")))?
        .map_err(refused)?;
        if req.offset > opened.size {
            return Err(refused(Error::BadRequest {
                field: "offset",
                reason: format!(
                    "{} is past the end of {source_ref} ({} bytes)",
                    req.offset, opened.size
                ),
            }));
        }
        let cut = self
            .cut_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            let sent = send(&opened, req.offset, cut, &tx, &source_ref);
            match sent {
                Ok(s) => tracing::info!(peer = %peer, source = %source_ref,
                    offset = req.offset, sent.bytes = s.sent, source.data_bytes = s.data,
                    source.size = opened.size, "Pull served"),
                Err(status) => {
                    tracing::warn!(peer = %peer, source = %source_ref, offset = req.offset,
                        error = %status.message(), "Pull ended early");
                    // The receiver may be gone already; nothing to tell.
                    let _ = tx.blocking_send(Err(status));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What one stream sent.
struct Sent {
    sent: u64,
    data: u64,
}

/// Streams `opened` from `offset`; an `Err` is the status to end with.
fn send(
    opened: &Opened,
    offset: u64,
    cut: Option<u64>,
    tx: &mpsc::Sender<Result<pb::PullResponse, Status>>,
    source_ref: &SourceRef,
) -> Result<Sent, Status> {
    let path = opened.path.display();
    let gone = || Status::cancelled("the receiver went away");
    let message = |m| Ok(pb::PullResponse { message: Some(m) });
    tx.blocking_send(message(pb::pull_response::Message::Header(pb::Header {
        size: opened.size,
        generation: opened.generation.clone(),
    })))
    .map_err(|_| gone())?;
    let mut digest = ContentDigest::new(opened.size);
    let (mut sent, mut data) = (0u64, 0u64);
    for extent in extent::data_extents(&opened.file, 0, opened.size) {
        let extent = extent
            .map_err(|e| Status::internal(format!("{source_ref}: seeking data in {path}: {e}")))?;
        let mut pos = extent.start;
        while pos < extent.end {
            // Chunks end on CHUNK_BYTES boundaries, so that a resumed
            // stream cuts the same chunks as the first one.
            let boundary = (pos / CHUNK_BYTES as u64 + 1) * CHUNK_BYTES as u64;
            let end = extent.end.min(boundary);
            let mut buf = vec![0u8; (end - pos) as usize];
            opened.file.read_exact_at(&mut buf, pos).map_err(|e| {
                Status::aborted(format!("{source_ref}: reading {path} at {pos}: {e}"))
            })?;
            digest
                .update(pos, &buf)
                .map_err(|e| Status::internal(format!("{source_ref}: {e}")))?;
            data += buf.len() as u64;
            // An extent's zeros (a filesystem's zeroed tables and journal,
            // a preallocated image) are content the receiver already has:
            // its staging file reads zero where nothing was written, and the
            // digest leaves all-zero blocks out on both sides.
            if end > offset && !all_zero(&buf) {
                let skip = offset.saturating_sub(pos) as usize;
                if skip > 0 {
                    buf.drain(..skip);
                }
                let at = pos.max(offset);
                let len = buf.len() as u64;
                let checksum = blake3::hash(&buf).as_bytes().to_vec();
                tx.blocking_send(message(pb::pull_response::Message::Chunk(pb::Chunk {
                    offset: at,
                    length: len,
                    data: buf,
                    checksum,
                })))
                .map_err(|_| gone())?;
                sent += len;
                if cut.is_some_and(|n| sent >= n) {
                    return Err(Status::unavailable(format!(
                        "{source_ref}: stream cut after {sent} bytes (fault injection)"
                    )));
                }
            }
            pos = end;
        }
    }
    // A source written to while it was read is not what was sent.
    let now = source::generation(&opened.file, &opened.path)
        .map_err(|e| Status::internal(e.to_string()))?;
    if now != opened.generation {
        return Err(Status::aborted(format!(
            "{source_ref} changed while it was sent (generation {} is now {now})",
            opened.generation
        )));
    }
    tx.blocking_send(message(pb::pull_response::Message::Trailer(pb::Trailer {
        size: opened.size,
        digest: digest.finish().to_vec(),
        data_bytes: data,
    })))
    .map_err(|_| gone())?;
    Ok(Sent { sent, data })
}

/// Whether `buf` holds only zero bytes (4 KiB at a time, which the
/// compiler turns into wide ORs).
fn all_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Serves `service` on `listener` over mutual TLS with `trust` (read again
/// at every accepted connection) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    service: TransferService,
    trust: Arc<TrustDir>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let (tx, rx) = mpsc::channel::<Result<PeerStream, std::io::Error>>(16);
    let accept = async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: the listener itself is fine.
                    tracing::warn!(error = %e, "transfer listener: accept failed");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let config = match trust.server_config() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(peer = %peer, error = %e, "transfer connection refused: no trust material");
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshake = TlsAcceptor::from(config).accept(tcp);
                match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(PeerStream(tls))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %peer, error = %e, "transfer connection refused: TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::warn!(peer = %peer, "transfer connection refused: TLS handshake timed out");
                    }
                }
            });
        }
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(super::receiver::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(super::receiver::KEEPALIVE_TIMEOUT))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown);
    tokio::select! {
        r = server => r.map_err(|e| Error::Serve { addr: local, reason: e.to_string() }),
        () = accept => Ok(()),
    }
}

/// A connection accepted over TLS.
struct PeerStream(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for PeerStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Binds the transfer listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| Error::Serve {
        addr: addr.to_string(),
        reason: format!("bind: {e}"),
    })
}
