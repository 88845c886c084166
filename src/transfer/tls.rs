//! Mutual TLS between agents, with the trust material read from a folder
//! laid out as a Kubernetes Secret volume (`ca.crt`, `tls.crt`, `tls.key`)
//! and reloaded without a restart.
//!
//! Kubelet updates a Secret volume by writing the new files into a fresh
//! timestamped folder and swapping the `..data` symlink to it in one
//! rename; the visible names are symlinks through `..data`. Reading the
//! three names one by one could straddle that swap and pair an old
//! certificate with a new key, so the folder `..data` points at is
//! resolved once and the three files read from it. A plain folder (no
//! `..data`) is read as it is.
//!
//! Rotation: every accepted connection (server) and every connection made
//! (client) first reads the files again (three small reads) and rebuilds
//! the TLS configuration when their bytes changed. Connections already
//! open keep the trust they were made with. Material that does not make a
//! configuration (a certificate without its key, a half-written file) is
//! logged and the last good configuration kept.
//!
//! Both sides present the same leaf certificate (one for all agents; see
//! [`super::certs`]) and require the peer's to chain to `ca.crt`, which
//! may hold several CAs (the old and the new one during a rotation). The
//! client also checks that the server's certificate carries the expected
//! name. TLS 1.3 only, with the ring provider the rest of the agent uses.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Error;

/// File names of the trust material, as in a `kubernetes.io/tls` Secret
/// with the CA beside it.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The symlink kubelet swaps to update a Secret volume.
const DATA_LINK: &str = "..data";

/// The trust material of this agent, reloaded when its files change.
#[derive(Debug)]
pub struct TrustDir {
    dir: PathBuf,
    server_name: ServerName<'static>,
    loaded: Mutex<Option<Arc<Loaded>>>,
}

#[derive(Debug)]
struct Loaded {
    material: Material,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

#[derive(Debug, PartialEq, Eq)]
struct Material {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TrustDir {
    /// The trust material in `dir`, checked now (an agent must not start
    /// serving with none); `server_name` is the name a server's
    /// certificate must carry for this agent to pull from it.
    pub fn open(dir: &Path, server_name: &str) -> Result<TrustDir, Error> {
        let server_name =
            ServerName::try_from(server_name.to_owned()).map_err(|e| Error::Trust {
                dir: dir.to_owned(),
                reason: format!("server name {server_name:?}: {e}"),
            })?;
        let trust = TrustDir {
            dir: dir.to_owned(),
            server_name,
            loaded: Mutex::new(None),
        };
        trust.current()?;
        Ok(trust)
    }

    /// The folder of the trust material.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name a server's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The server configuration for a connection accepted now.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        Ok(self.current()?.server.clone())
    }

    /// The client configuration for a connection made now.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, Error> {
        Ok(self.current()?.client.clone())
    }

    /// The configuration of the files as they are now: rebuilt when their
    /// bytes changed, the last good one kept when they do not make one.
    fn current(&self) -> Result<Arc<Loaded>, Error> {
        let material = read_material(&self.dir)?;
        let mut slot = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = slot.as_ref()
            && l.material == material
        {
            return Ok(l.clone());
        }
        match build(&self.dir, material) {
            Ok(l) => {
                if slot.is_some() {
                    tracing::info!(trust.dir = %self.dir.display(),
                        "transfer trust material changed; new connections use it");
                }
                let l = Arc::new(l);
                *slot = Some(l.clone());
                Ok(l)
            }
            Err(e) => match slot.as_ref() {
                Some(old) => {
                    tracing::warn!(trust.dir = %self.dir.display(), error = %e,
                        "transfer trust material unusable; keeping the last good one");
                    Ok(old.clone())
                }
                None => Err(e),
            },
        }
    }
}

/// The three files, read from the folder `..data` points at when there is
/// one (see module doc).
fn read_material(dir: &Path) -> Result<Material, Error> {
    let base = match std::fs::read_link(dir.join(DATA_LINK)) {
        Ok(target) => dir.join(target),
        Err(_) => dir.to_owned(),
    };
    let read = |name: &str| {
        let path = base.join(name);
        std::fs::read(&path).map_err(|e| Error::Trust {
            dir: dir.to_owned(),
            reason: format!("reading {}: {e}", path.display()),
        })
    };
    Ok(Material {
        ca: read(CA_FILE)?,
        cert: read(CERT_FILE)?,
        key: read(KEY_FILE)?,
    })
}

fn build(dir: &Path, material: Material) -> Result<Loaded, Error> {
    let bad = |reason: String| Error::Trust {
        dir: dir.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&material.ca) {
        let cert = cert.map_err(|e| bad(format!("{CA_FILE}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("{CA_FILE}: a certificate is not a usable CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(format!("{CA_FILE} holds no certificate")));
    }
    let chain = CertificateDer::pem_slice_iter(&material.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{CERT_FILE}: {e}")))?;
    if chain.is_empty() {
        return Err(bad(format!("{CERT_FILE} holds no certificate")));
    }
    let key = PrivateKeyDer::from_pem_slice(&material.key)
        .map_err(|e| bad(format!("{KEY_FILE}: {e}")))?;
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad(format!("{CA_FILE}: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| bad(format!("{CERT_FILE} and {KEY_FILE}: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(format!("{CERT_FILE} and {KEY_FILE}: {e}")))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        material,
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// A connection that counts the bytes read from it (the raw bytes on the
/// wire, TLS records and HTTP/2 frames included).
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, read: Arc<AtomicU64>) -> Self {
        Counted { inner, read }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_material(dir: &Path, name: &str) {
        let m = super::super::certs::generate(name, 30).unwrap();
        m.write_to(dir).unwrap();
    }

    #[test]
    fn reads_through_the_data_link_and_reloads_on_swap() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        // The layout kubelet makes: ..<ts>/ files, ..data -> ..<ts>,
        // visible names -> ..data/<name>.
        let first = dir.join("..2026_01");
        std::fs::create_dir(&first).unwrap();
        write_material(&first, "a.example");
        std::os::unix::fs::symlink("..2026_01", dir.join(DATA_LINK)).unwrap();
        for n in [CA_FILE, CERT_FILE, KEY_FILE] {
            std::os::unix::fs::symlink(format!("{DATA_LINK}/{n}"), dir.join(n)).unwrap();
        }
        let trust = TrustDir::open(dir, "a.example").unwrap();
        let one = trust.server_config().unwrap();
        assert!(Arc::ptr_eq(&one, &trust.server_config().unwrap()));

        let second = dir.join("..2026_02");
        std::fs::create_dir(&second).unwrap();
        write_material(&second, "a.example");
        std::os::unix::fs::symlink("..2026_02", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join(DATA_LINK)).unwrap();
        let two = trust.server_config().unwrap();
        assert!(!Arc::ptr_eq(&one, &two));

        // A broken swap keeps the last good configuration.
        std::fs::write(second.join(KEY_FILE), b"not a key").unwrap();
        assert!(Arc::ptr_eq(&two, &trust.server_config().unwrap()));
    }

    #[test]
    fn missing_or_bad_material_is_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        let e = TrustDir::open(root.path(), "a.example").unwrap_err();
        assert!(e.to_string().contains("ca.crt"), "{e}");
        write_material(root.path(), "a.example");
        std::fs::write(root.path().join(KEY_FILE), b"junk").unwrap();
        let e = TrustDir::open(root.path(), "a.example").unwrap_err();
        assert!(e.to_string().contains("tls.key"), "{e}");
    }
}
