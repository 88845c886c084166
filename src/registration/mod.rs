//! Kubelet plugin registration, served by the agent itself (no
//! node-driver-registrar sidecar).
//!
//! Kubelet watches `<kubelet dir>/plugins_registry/` for sockets; on ours it
//! calls `GetInfo` (we answer: a CSI plugin named stead.csi.dev, whose CSI
//! socket is at …) and then `NotifyRegistrationStatus` with its verdict. If
//! the socket disappears (kubelet's directory wiped, a restart of kubelet
//! that cleans up), it is created again so that kubelet finds it again.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, Stream};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};

use crate::DRIVER_NAME;
use crate::csi::server::{ServeError, bind};
use crate::proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use crate::proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};

mod authority;

/// CSI versions this plugin speaks, as kubelet wants them listed.
const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// The registration socket of Stead under a kubelet root directory.
pub fn socket_path(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir
        .join("plugins_registry")
        .join(format!("{DRIVER_NAME}-reg.sock"))
}

/// What kubelet last said about us.
#[derive(Debug, Default)]
pub struct RegistrationState {
    registered: AtomicBool,
}

impl RegistrationState {
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
struct Service {
    csi_socket: PathBuf,
    state: Arc<RegistrationState>,
}

#[tonic::async_trait]
impl Registration for Service {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        tracing::debug!("kubelet asked for plugin info");
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".to_string(),
            name: DRIVER_NAME.to_string(),
            endpoint: self.csi_socket.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = req.into_inner();
        self.state
            .registered
            .store(status.plugin_registered, Ordering::Relaxed);
        if status.plugin_registered {
            tracing::info!(driver = DRIVER_NAME, "kubelet registered the plugin");
        } else {
            tracing::error!(driver = DRIVER_NAME, error = %status.error, "kubelet refused the plugin");
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// Accepts kubelet's connections and hands the gRPC server an in-memory
/// pipe for each, with the `:authority` rewrite (see `authority`) between.
fn accept_rewritten(listener: UnixListener) -> impl Stream<Item = std::io::Result<DuplexStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(conn, _)| {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let (conn_read, mut conn_write) = conn.into_split();
            let (mut ours_read, ours_write) = tokio::io::split(ours);
            tokio::spawn(async move {
                let up = authority::rewrite(conn_read, ours_write);
                let down = async {
                    tokio::io::copy(&mut ours_read, &mut conn_write).await?;
                    conn_write.shutdown().await
                };
                let (up, down) = tokio::join!(up, down);
                if let Err(e) = up.and(down) {
                    tracing::debug!(error = %e, "registration connection ended with an error");
                }
            });
            theirs
        });
        Some((conn, listener))
    })
}

/// Resolves when the socket at `path` is no longer the one we bound
/// (removed, or replaced by another file).
async fn socket_gone(path: &Path, inode: u64) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() && m.ino() == inode => {}
            _ => return,
        }
    }
}

/// Serves the registration socket until `shutdown` resolves, re-creating it
/// whenever it disappears.
pub async fn serve(
    socket: PathBuf,
    csi_socket: PathBuf,
    state: Arc<RegistrationState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let shutdown = shutdown.shared();
    let service = Service { csi_socket, state };
    loop {
        let listener = bind(&socket)?;
        let inode = std::fs::metadata(&socket)
            .map(|m| m.ino())
            .map_err(|source| ServeError::Socket {
                path: socket.clone(),
                source,
            })?;
        tracing::info!(socket = %socket.display(), "serving kubelet plugin registration");
        let mut gone = false;
        let stop = {
            let shutdown = shutdown.clone();
            let socket = socket.clone();
            let gone = &mut gone;
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = socket_gone(&socket, inode) => *gone = true,
                }
            }
        };
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(service.clone()))
            .serve_with_incoming_shutdown(accept_rewritten(listener), stop)
            .await
            .map_err(|source| ServeError::Transport {
                path: socket.clone(),
                source,
            })?;
        if !gone {
            let _ = std::fs::remove_file(&socket);
            return Ok(());
        }
        service.state.registered.store(false, Ordering::Relaxed);
        tracing::warn!(socket = %socket.display(), "registration socket disappeared; creating it again");
    }
}
