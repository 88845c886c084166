//! Stead: a CSI driver and dynamic provisioner for node-local volumes.
//!
//! Layers (see DESIGN.md): `storage` and `mount` know nothing of gRPC or
//! Kubernetes; `csi` maps CSI requests onto storage; `registration` serves
//! kubelet's plugin-registration API; `provisioner` turns claims into volumes
//! and PersistentVolumes through kube-rs.

// Denied, not forbidden: `storage::copy` allows it for the two ioctls
// (FIFREEZE, FITHAW) no safe wrapper offers.
#![deny(unsafe_code)]

pub mod cli;
pub mod csi;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod mount;
pub mod provisioner;
pub mod registration;
pub mod storage;
pub mod transfer;

pub mod proto {
    //! Generated protocol code.
    pub mod csi {
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("csi.v1");
            include!(concat!(env!("OUT_DIR"), "/csi_methods.rs"));
        }
    }
    pub mod pluginregistration {
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("pluginregistration");
    }
    pub mod transfer {
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("stead.transfer.v1");
        }
    }
}

/// The CSI driver name, as registered with kubelet and named by StorageClasses.
pub const DRIVER_NAME: &str = "stead.csi.dev";
/// The topology key that pins a volume to its node.
pub const TOPOLOGY_KEY: &str = "topology.stead.csi.dev/node";
/// The label that names the node of the objects an agent writes for its
/// node: its PVs (which each agent watches by it), its CSIStorageCapacity
/// objects and the VolumeSnapshotContents whose snapshot it holds.
pub const NODE_LABEL: &str = "stead.csi.dev/node";

/// Errors that stop the agent (start-up and serving); RPC errors live in
/// [`csi::Error`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening pools: {0}")]
    Storage(#[from] storage::Error),
    #[error(transparent)]
    Serve(#[from] csi::server::ServeError),
    #[error("{0}")]
    Config(String),
    #[error("provisioner: {0}")]
    Provisioner(#[from] provisioner::Error),
    #[error("health endpoint: {0}")]
    Health(std::io::Error),
    #[error("transfer: {0}")]
    Transfer(#[from] transfer::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
