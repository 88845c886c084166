//! Serving gRPC on the CSI unix socket, every RPC timed, with graceful
//! shutdown.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

use super::Plugin;
use crate::metrics::Metrics;
use crate::metrics::rpc::{self, RpcLayer};

/// Errors of setting up or running the socket server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?}: expected unix:///absolute/path.sock")]
    BadEndpoint(String),
    #[error("socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("gRPC server on {}: {source}", path.display())]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The socket path of a `unix://` endpoint (`unix:///p`, `unix:/p` or `/p`).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let raw = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let path = PathBuf::from(raw);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(ServeError::BadEndpoint(endpoint.to_owned()));
    }
    Ok(path)
}

/// Binds the unix socket: creates the parent directory, removes a stale
/// socket left by a previous run (only a socket, never another file), and
/// restricts the new socket to its owner (0600).
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(parent)
            .map_err(err)?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to remove it",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Between bind and chmod the socket carries the umask's mode; the 0750
    // parent directory keeps other users out of that window.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// The gRPC server of the plugin's services.
pub type Router = tonic::transport::server::Router<Stack<RpcLayer, Identity>>;

/// The Identity, Controller and Node services of `plugin`, each request
/// timed into `metrics` by a layer around them all, so that no service or
/// method is left out.
pub fn router(plugin: &Plugin, metrics: Arc<Metrics>) -> Router {
    Server::builder()
        .layer(rpc::layer(metrics))
        .add_service(plugin.identity())
        .add_service(plugin.controller())
        .add_service(plugin.node())
}

/// How long in-flight RPCs may run after a shutdown signal. Clients such as
/// kubelet keep idle connections open indefinitely, so the server does not
/// wait for connections to close, only for this long at most.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on the unix socket at `path` until `shutdown` resolves,
/// then stops accepting, lets in-flight RPCs finish (for at most
/// [`SHUTDOWN_GRACE`]) and removes the socket.
pub async fn serve(
    router: Router,
    path: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = bind(path)?;
    tracing::info!(socket = %path.display(), "serving CSI");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server =
        router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        });
    let deadline = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let res = tokio::select! {
        res = server => res.map_err(|source| ServeError::Transport {
            path: path.to_owned(),
            source,
        }),
        () = deadline => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; exiting");
            Ok(())
        }
    };
    let _ = fs::remove_file(path);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///var/lib/kubelet/plugins/stead.csi.dev/csi.sock").unwrap(),
            PathBuf::from("/var/lib/kubelet/plugins/stead.csi.dev/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/tmp/x.sock").unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }
}
