//! What a StorageClass served by Stead may say, checked before anything is
//! created: a class with a parameter Stead does not know provisions nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::storage::v1::StorageClass;

use crate::DRIVER_NAME;

/// The parameter that selects the pool on the node.
pub const PARAM_POOL: &str = "pool";
/// The parameter that selects the filesystem (Filesystem volume mode only).
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// Filesystems the image backend can make.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error(
        "StorageClass {class}: unknown parameter {key:?} (Stead accepts only \"pool\" and \"csi.storage.k8s.io/fstype\")"
    )]
    UnknownParameter { class: String, key: String },
    #[error("StorageClass {class}: parameter {key:?} is empty")]
    EmptyParameter { class: String, key: &'static str },
    #[error(
        "StorageClass {class}: parameter csi.storage.k8s.io/fstype {fs_type:?} is not supported (ext4 or xfs)"
    )]
    FsType { class: String, fs_type: String },
    #[error("StorageClass {class}: reclaimPolicy {policy:?} is not supported (Delete or Retain)")]
    ReclaimPolicy { class: String, policy: String },
}

/// A Stead StorageClass, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: String,
    /// `None`: the node's default (first) pool.
    pub pool: Option<String>,
    /// `None`: the driver's default (ext4).
    pub fs_type: Option<String>,
    pub wait_for_first_consumer: bool,
    pub reclaim_delete: bool,
    pub mount_options: Vec<String>,
}

impl ClassSpec {
    /// The CreateVolume/GetCapacity parameters for this class.
    pub fn csi_parameters(&self) -> BTreeMap<String, String> {
        self.pool
            .iter()
            .map(|p| (PARAM_POOL.to_string(), p.clone()))
            .collect()
    }

    pub fn reclaim_policy(&self) -> &'static str {
        if self.reclaim_delete {
            "Delete"
        } else {
            "Retain"
        }
    }
}

/// True when the class names Stead as its provisioner.
pub fn is_stead(sc: &StorageClass) -> bool {
    sc.provisioner == DRIVER_NAME
}

/// Validates a Stead StorageClass.
pub fn parse(sc: &StorageClass) -> Result<ClassSpec, ClassError> {
    let class = sc.metadata.name.clone().unwrap_or_default();
    let mut pool = None;
    let mut fs_type = None;
    for (key, value) in sc.parameters.iter().flatten() {
        match key.as_str() {
            PARAM_POOL => {
                if value.is_empty() {
                    return Err(ClassError::EmptyParameter {
                        class,
                        key: PARAM_POOL,
                    });
                }
                pool = Some(value.clone());
            }
            PARAM_FSTYPE => {
                if !FS_TYPES.contains(&value.as_str()) {
                    return Err(ClassError::FsType {
                        class,
                        fs_type: value.clone(),
                    });
                }
                fs_type = Some(value.clone());
            }
            _ => {
                return Err(ClassError::UnknownParameter {
                    class,
                    key: key.clone(),
                });
            }
        }
    }
    let reclaim_delete = match sc.reclaim_policy.as_deref() {
        None | Some("Delete") => true,
        Some("Retain") => false,
        Some(other) => {
            return Err(ClassError::ReclaimPolicy {
                class,
                policy: other.to_string(),
            });
        }
    };
    Ok(ClassSpec {
        name: class,
        pool,
        fs_type,
        wait_for_first_consumer: sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"),
        reclaim_delete,
        mount_options: sc.mount_options.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn class(name: &str, params: &[(&str, &str)], mode: &str, reclaim: &str) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            provisioner: DRIVER_NAME.into(),
            parameters: Some(
                params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            volume_binding_mode: Some(mode.into()),
            reclaim_policy: Some(reclaim.into()),
            ..Default::default()
        }
    }

    #[test]
    fn pool_and_fstype_are_understood() {
        let sc = class(
            "stead",
            &[("pool", "image"), ("csi.storage.k8s.io/fstype", "xfs")],
            "WaitForFirstConsumer",
            "Retain",
        );
        let spec = parse(&sc).unwrap();
        assert_eq!(spec.pool.as_deref(), Some("image"));
        assert_eq!(spec.fs_type.as_deref(), Some("xfs"));
        assert!(spec.wait_for_first_consumer);
        assert!(!spec.reclaim_delete);
        assert_eq!(
            spec.csi_parameters().get("pool").map(String::as_str),
            Some("image")
        );
    }

    #[test]
    fn unknown_parameter_is_refused_by_name() {
        let sc = class("fast", &[("speed", "ludicrous")], "Immediate", "Delete");
        let err = parse(&sc).unwrap_err();
        assert_eq!(
            err,
            ClassError::UnknownParameter {
                class: "fast".into(),
                key: "speed".into()
            }
        );
        assert!(err.to_string().contains("\"speed\""));
        assert!(err.to_string().contains("fast"));
    }

    #[test]
    fn unsupported_fstype_is_refused() {
        let sc = class(
            "s",
            &[("csi.storage.k8s.io/fstype", "zfs")],
            "Immediate",
            "Delete",
        );
        assert!(matches!(parse(&sc), Err(ClassError::FsType { .. })));
    }

    #[test]
    fn defaults_are_first_pool_immediate_delete() {
        let mut sc = class("plain", &[], "Immediate", "Delete");
        sc.reclaim_policy = None;
        sc.volume_binding_mode = None;
        let spec = parse(&sc).unwrap();
        assert_eq!(spec.pool, None);
        assert!(spec.reclaim_delete);
        assert!(!spec.wait_for_first_consumer);
        assert!(spec.csi_parameters().is_empty());
    }
}
