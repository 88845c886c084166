//! Claims whose volume starts with content: `spec.dataSource` (or
//! `dataSourceRef`) naming a VolumeSnapshot or another claim in the same
//! namespace. Parsing is pure ([`data_source`]); resolving follows the
//! snapshot to its content, or the claim to its PV, to find the handle and
//! the node that holds the data ([`resolve`]). The holder provisions such
//! a claim from its own copy; another node the scheduler chose pulls the
//! data from the holder (`crossnode`) or, when it cannot, moves the claim
//! to the holder.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::{Api, ResourceExt};

use super::claim::{self, ClaimError};
use super::snapshot_api::{VolumeSnapshot, VolumeSnapshotContent};
use super::snapshotter::{CONTENT_NODE_LABEL, holds_snapshot};
use super::{Ctx, Error, pv};
use crate::proto::csi::v1::VolumeContentSource;
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};

/// What a claim's data source names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    Snapshot { namespace: String, name: String },
    Claim { namespace: String, name: String },
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceRef::Snapshot { namespace, name } => {
                write!(f, "VolumeSnapshot {namespace}/{name}")
            }
            SourceRef::Claim { namespace, name } => {
                write!(f, "PersistentVolumeClaim {namespace}/{name}")
            }
        }
    }
}

/// The data source of a claim, if it names one Stead can fill a volume
/// from; an error naming the field for anything else.
pub fn data_source(pvc: &PersistentVolumeClaim) -> Result<Option<SourceRef>, ClaimError> {
    let Some(spec) = pvc.spec.as_ref() else {
        return Ok(None);
    };
    let ns = pvc.namespace().unwrap_or_default();
    let invalid = |field: &'static str, reason: String| ClaimError::Invalid {
        claim: claim::claim_key(pvc),
        field,
        reason,
    };
    // Kubernetes copies dataSource into dataSourceRef and back; the Ref
    // alone may name another namespace, which Stead does not read from.
    let (field, group, kind, name) = if let Some(r) = &spec.data_source_ref {
        if r.namespace
            .as_deref()
            .is_some_and(|n| !n.is_empty() && n != ns)
        {
            return Err(invalid(
                "spec.dataSourceRef.namespace",
                format!(
                    "{} is another namespace; Stead restores and clones only within the claim's namespace",
                    r.namespace.as_deref().unwrap_or_default()
                ),
            ));
        }
        (
            "spec.dataSourceRef",
            r.api_group.as_deref(),
            r.kind.as_str(),
            r.name.as_str(),
        )
    } else if let Some(r) = &spec.data_source {
        (
            "spec.dataSource",
            r.api_group.as_deref(),
            r.kind.as_str(),
            r.name.as_str(),
        )
    } else {
        return Ok(None);
    };
    let namespace = ns.clone();
    let name = name.to_string();
    match (group.unwrap_or(""), kind) {
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => {
            Ok(Some(SourceRef::Snapshot { namespace, name }))
        }
        ("", "PersistentVolumeClaim") => Ok(Some(SourceRef::Claim { namespace, name })),
        (g, k) => Err(invalid(
            field,
            format!(
                "{k} of apiGroup {:?} is not a source Stead fills volumes from (a VolumeSnapshot of snapshot.storage.k8s.io, or a PersistentVolumeClaim)",
                g
            ),
        )),
    }
}

/// A data source followed to the data.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub content: VolumeContentSource,
    /// The node whose agent holds the data, when known.
    pub node: Option<String>,
    /// The source's size (a snapshot's restoreSize, the capacity of the
    /// cloned claim's PV), when known: the least a copy of it takes.
    pub size_bytes: Option<i64>,
}

/// What [`resolve`] found.
#[derive(Debug, Clone)]
pub enum Resolution {
    Ready(Resolved),
    /// Not yet usable (missing, not ready, not bound): wait.
    Wait(String),
    /// Never usable as it is: refuse, with this message.
    Refuse(String),
}

/// Follows a data source to its handle and node.
pub(crate) async fn resolve<C: CsiController>(
    ctx: &Ctx<C>,
    src: &SourceRef,
) -> Result<Resolution, Error> {
    match src {
        SourceRef::Snapshot { namespace, name } => {
            let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), namespace);
            let Some(vs) = api.get_opt(name).await? else {
                return Ok(Resolution::Wait(format!("{src} does not exist (yet)")));
            };
            let status = vs.status.unwrap_or_default();
            let (Some(content_name), Some(true)) = (
                status.bound_volume_snapshot_content_name,
                status.ready_to_use,
            ) else {
                return Ok(Resolution::Wait(format!("{src} is not ready to use yet")));
            };
            let contents: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
            let Some(content) = contents.get_opt(&content_name).await? else {
                return Ok(Resolution::Wait(format!(
                    "VolumeSnapshotContent {content_name} of {src} does not exist"
                )));
            };
            if content.spec.driver != crate::DRIVER_NAME {
                return Ok(Resolution::Refuse(format!(
                    "{src} is a snapshot of driver {:?}, not of {}",
                    content.spec.driver,
                    crate::DRIVER_NAME
                )));
            }
            let Some(handle) = content
                .status
                .as_ref()
                .and_then(|s| s.snapshot_handle.clone())
            else {
                return Ok(Resolution::Wait(format!(
                    "VolumeSnapshotContent {content_name} of {src} has no snapshot handle yet"
                )));
            };
            let size_bytes = content.status.as_ref().and_then(|s| s.restore_size);
            let labelled = content.labels().get(CONTENT_NODE_LABEL).cloned();
            let node = match labelled {
                Some(n) => Some(n),
                None if holds_snapshot(ctx, &handle).await => Some(ctx.config.node.clone()),
                None => None,
            };
            Ok(Resolution::Ready(Resolved {
                content: VolumeContentSource {
                    r#type: Some(Type::Snapshot(SnapshotSource {
                        snapshot_id: handle,
                    })),
                },
                node,
                size_bytes,
            }))
        }
        // Read, not taken from a store: the agent watches claims as metadata
        // and only its own node's PVs, and the source may be on any node.
        SourceRef::Claim { namespace, name } => {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
            let Some(source) = claims.get_opt(name).await? else {
                return Ok(Resolution::Wait(format!("{src} does not exist (yet)")));
            };
            let bound = source
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .filter(|_| {
                    source.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
                });
            let Some(pv_name) = bound else {
                return Ok(Resolution::Wait(format!("{src} is not bound yet")));
            };
            let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
            let Some(pv) = pvs.get_opt(pv_name).await? else {
                return Ok(Resolution::Wait(format!(
                    "PV {pv_name} of {src} does not exist (yet)"
                )));
            };
            let Some(handle) = pv::stead_volume_handle(&pv) else {
                return Ok(Resolution::Refuse(format!(
                    "{src} is bound to PV {pv_name}, which is not a volume of {}",
                    crate::DRIVER_NAME
                )));
            };
            Ok(Resolution::Ready(Resolved {
                content: VolumeContentSource {
                    r#type: Some(Type::Volume(VolumeSource {
                        volume_id: handle.to_string(),
                    })),
                },
                node: pv::pv_node(&pv).map(str::to_string),
                size_bytes: pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.capacity.as_ref())
                    .and_then(|c| c.get("storage"))
                    .and_then(|q| super::quantity::to_bytes(&q.0).ok()),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;
    use k8s_openapi::api::core::v1::{TypedLocalObjectReference, TypedObjectReference};

    #[test]
    fn snapshots_and_claims_of_the_namespace_are_sources_and_nothing_else() {
        let mut c = pvc("restore", "1Gi", None);
        assert_eq!(data_source(&c).unwrap(), None);
        let spec = c.spec.as_mut().unwrap();
        spec.data_source = Some(TypedLocalObjectReference {
            api_group: Some("snapshot.storage.k8s.io".into()),
            kind: "VolumeSnapshot".into(),
            name: "snap".into(),
        });
        let ns = c.namespace().unwrap_or_default();
        assert_eq!(
            data_source(&c).unwrap(),
            Some(SourceRef::Snapshot {
                namespace: ns.clone(),
                name: "snap".into()
            })
        );
        c.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
            api_group: None,
            kind: "PersistentVolumeClaim".into(),
            name: "db".into(),
        });
        assert_eq!(
            data_source(&c).unwrap(),
            Some(SourceRef::Claim {
                namespace: ns.clone(),
                name: "db".into()
            })
        );
        c.spec.as_mut().unwrap().data_source_ref = Some(TypedObjectReference {
            api_group: Some("example.com".into()),
            kind: "Populator".into(),
            name: "p".into(),
            namespace: None,
        });
        let err = data_source(&c).unwrap_err().to_string();
        assert!(
            err.contains("spec.dataSourceRef") && err.contains("Populator"),
            "{err}"
        );
        c.spec.as_mut().unwrap().data_source_ref = Some(TypedObjectReference {
            api_group: Some("snapshot.storage.k8s.io".into()),
            kind: "VolumeSnapshot".into(),
            name: "s".into(),
            namespace: Some("elsewhere".into()),
        });
        let err = data_source(&c).unwrap_err().to_string();
        assert!(
            err.contains("spec.dataSourceRef.namespace") && err.contains("elsewhere"),
            "{err}"
        );
    }
}
