//! The trust material of the transfer path: a CA and one leaf certificate
//! signed by it, which every agent presents as server and as client
//! (`stead transfer-certs`). Deploy puts the three files in a Secret that
//! the DaemonSet mounts; the CA's key is not written, so no further
//! certificate can be signed by it (a rotation makes a new CA and leaf).
//!
//! Made with rcgen (a maintained X.509 writer) on the ring provider the
//! rest of the agent uses: ECDSA P-256 keys, the leaf valid for the name
//! clients check ([`super::DEFAULT_SERVER_NAME`] unless told otherwise),
//! for both server and client authentication.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::tls::{CA_FILE, CERT_FILE, KEY_FILE};

/// A CA certificate, and a leaf certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct Material {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA and a leaf for `server_name`, both valid for `days` from now
/// (and from an hour ago, for clocks a little behind).
pub fn generate(server_name: &str, days: u32) -> Result<Material, rcgen::Error> {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(i64::from(days));

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "stead transfer CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![server_name.to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "stead agent");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    Ok(Material {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

impl Material {
    /// Writes `ca.crt`, `tls.crt` and `tls.key` (0600) into `dir`, each
    /// through a temporary file, fsync and rename, then fsyncs `dir`: a
    /// crash leaves each file whole, old or new.
    pub fn write_to(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        for (name, pem, mode) in [
            (CA_FILE, &self.ca_pem, 0o644),
            (CERT_FILE, &self.cert_pem, 0o644),
            (KEY_FILE, &self.key_pem, 0o600),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, dir.join(name))?;
        }
        fs::File::open(dir)?.sync_all()
    }
}

/// Whether `dir` already holds any of the three files.
pub fn present_in(dir: &Path) -> Option<&'static str> {
    [CA_FILE, CERT_FILE, KEY_FILE]
        .into_iter()
        .find(|n| dir.join(n).exists())
}
