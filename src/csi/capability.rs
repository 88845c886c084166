//! Validation of CSI volume capabilities, parameters and topology.

use std::collections::HashMap;

use super::error::{Error, Result};
use crate::TOPOLOGY_KEY;
use crate::proto::csi::v1::volume_capability::{AccessMode, AccessType, access_mode::Mode};
use crate::proto::csi::v1::{Topology, VolumeCapability};
use crate::storage::{AccessKind, Allocation, Capability, FsType, Sharing};

/// StorageClass parameter naming the pool.
pub const POOL_PARAMETER: &str = "pool";
/// StorageClass parameter choosing `thick` (the default) or `thin` images.
pub const ALLOCATION_PARAMETER: &str = "allocation";
/// Prefix of the parameters external-provisioner adds (PVC/PV names,
/// secrets, fstype); accepted and ignored.
pub const K8S_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

/// Validates one capability; `field` names it in error messages.
pub fn parse(cap: &VolumeCapability, field: &'static str) -> Result<Capability> {
    let sharing = parse_mode(cap.access_mode.as_ref(), field)?;
    let (access, explicit_fs, mount_flags) = match &cap.access_type {
        None => {
            return Err(Error::invalid(
                field,
                "access_type is required (block or mount)",
            ));
        }
        Some(AccessType::Block(_)) => (AccessKind::Block, false, Vec::new()),
        Some(AccessType::Mount(m)) => {
            let fs_type = FsType::parse(&m.fs_type).ok_or_else(|| {
                Error::invalid(
                    field,
                    format!(
                        "mount.fs_type {:?} is not supported; use \"ext4\" (the default) or \"xfs\"",
                        m.fs_type
                    ),
                )
            })?;
            if !m.volume_mount_group.is_empty() {
                return Err(Error::invalid(
                    field,
                    "mount.volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)",
                ));
            }
            if let Some(bad) = m.mount_flags.iter().find(|f| f.contains('\0')) {
                return Err(Error::invalid(
                    field,
                    format!("mount.mount_flags entry {bad:?} contains a NUL byte"),
                ));
            }
            (
                AccessKind::Mount { fs_type },
                !m.fs_type.is_empty(),
                m.mount_flags.clone(),
            )
        }
    };
    Ok(Capability {
        access,
        explicit_fs,
        sharing,
        mount_flags,
    })
}

fn parse_mode(mode: Option<&AccessMode>, field: &'static str) -> Result<Sharing> {
    let Some(mode) = mode else {
        return Err(Error::invalid(field, "access_mode is required"));
    };
    match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeMultiWriter) => Ok(Sharing::Shared),
        Ok(Mode::SingleNodeReaderOnly) => Ok(Sharing::ReadOnly),
        Ok(Mode::SingleNodeSingleWriter) => Ok(Sharing::Exclusive),
        Ok(
            m @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => Err(Error::invalid(
            field,
            format!(
                "access mode {} is not supported: Stead volumes are node-local, use a SINGLE_NODE_* mode (in Kubernetes: ReadWriteOnce or ReadWriteOncePod)",
                m.as_str_name()
            ),
        )),
        Ok(Mode::Unknown) | Err(_) => Err(Error::invalid(
            field,
            format!("access mode {} is unknown", mode.mode),
        )),
    }
}

/// Validates a list of capabilities: at least one, all of the same access
/// type (a volume is either a block device or a filesystem).
pub fn parse_all(caps: &[VolumeCapability], field: &'static str) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::invalid(field, "at least one capability is required"));
    }
    let parsed = caps
        .iter()
        .map(|c| parse(c, field))
        .collect::<Result<Vec<_>>>()?;
    if parsed.windows(2).any(|w| w[0].access != w[1].access) {
        return Err(Error::invalid(
            field,
            "capabilities ask for different access types or fsTypes; a volume has exactly one",
        ));
    }
    Ok(parsed)
}

/// StorageClass parameters, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parameters {
    /// `None`: the node's default pool.
    pub pool: Option<String>,
    /// `None`: the backend's default (thick for image pools).
    pub allocation: Option<Allocation>,
}

/// Validates StorageClass parameters.
pub fn parse_parameters(params: &HashMap<String, String>) -> Result<Parameters> {
    let mut parsed = Parameters::default();
    for (k, v) in params {
        if k == POOL_PARAMETER {
            if v.is_empty() {
                return Err(Error::invalid("parameters", "\"pool\" is empty"));
            }
            parsed.pool = Some(v.clone());
        } else if k == ALLOCATION_PARAMETER {
            parsed.allocation = Some(Allocation::parse(v).ok_or_else(|| {
                Error::invalid(
                    "parameters",
                    format!("\"allocation\" is {v:?}; use \"thick\" (the default) or \"thin\""),
                )
            })?);
        } else if !k.starts_with(K8S_PARAMETER_PREFIX) {
            return Err(Error::invalid(
                "parameters",
                format!("unknown parameter {k:?}; Stead accepts only \"pool\" and \"allocation\""),
            ));
        }
    }
    Ok(parsed)
}

/// Whether a topology segment set designates this node.
pub fn is_this_node(t: &Topology, node_id: &str) -> bool {
    t.segments.get(TOPOLOGY_KEY).is_some_and(|v| v == node_id)
}

/// This node's topology.
pub fn node_topology(node_id: &str) -> Topology {
    Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node_id.to_owned())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::v1::volume_capability::{BlockVolume, MountVolume};

    fn cap(mode: Mode, access_type: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type,
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn multi_node_modes_are_refused_as_node_local() {
        let e = parse(
            &cap(Mode::MultiNodeMultiWriter, mount("")),
            "volume_capability",
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("node-local"), "{e}");
    }

    #[test]
    fn fs_types() {
        let c = parse(&cap(Mode::SingleNodeWriter, mount("")), "c").unwrap();
        assert_eq!(
            c.access,
            AccessKind::Mount {
                fs_type: FsType::Ext4
            }
        );
        assert!(!c.explicit_fs);
        assert!(parse(&cap(Mode::SingleNodeWriter, mount("xfs")), "c").is_ok());
        assert!(parse(&cap(Mode::SingleNodeWriter, mount("ntfs")), "c").is_err());
        assert!(parse(&cap(Mode::SingleNodeWriter, None), "c").is_err());
    }

    #[test]
    fn mixed_access_types_are_refused() {
        let caps = [
            cap(Mode::SingleNodeWriter, mount("")),
            cap(
                Mode::SingleNodeWriter,
                Some(AccessType::Block(BlockVolume {})),
            ),
        ];
        assert!(parse_all(&caps, "c").is_err());
        assert!(parse_all(&[], "c").is_err());
    }

    #[test]
    fn parameters() {
        let p = HashMap::from([
            ("pool".to_owned(), "fast".to_owned()),
            ("csi.storage.k8s.io/pvc/name".to_owned(), "data".to_owned()),
        ]);
        assert_eq!(parse_parameters(&p).unwrap().pool, Some("fast".into()));
        assert_eq!(parse_parameters(&p).unwrap().allocation, None);
        let bad = HashMap::from([("replicas".to_owned(), "3".to_owned())]);
        let e = parse_parameters(&bad).unwrap_err();
        assert!(e.to_string().contains("replicas"));
        let thin = HashMap::from([("allocation".to_owned(), "thin".to_owned())]);
        assert_eq!(
            parse_parameters(&thin).unwrap().allocation,
            Some(Allocation::Thin)
        );
        let bad = HashMap::from([("allocation".to_owned(), "lazy".to_owned())]);
        let e = parse_parameters(&bad).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.to_string().contains("allocation") && e.to_string().contains("lazy"),
            "{e}"
        );
    }
}
