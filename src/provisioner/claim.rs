//! Which claims this agent acts on, and the CreateVolume request a claim
//! becomes. Pure functions of the objects: tested without a cluster.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use super::class::ClassSpec;
use super::quantity;
use crate::TOPOLOGY_KEY;
use crate::proto::csi::v1::{
    CapacityRange, CreateVolumeRequest, Topology, TopologyRequirement, VolumeCapability,
    volume_capability::{self, AccessMode, AccessType, access_mode::Mode},
};

/// Set by the scheduler (WaitForFirstConsumer) or by a Stead agent that won
/// an Immediate claim: the node whose agent provisions the claim.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Pre-1.26 way to name a claim's class; still honoured by Kubernetes.
const ANN_BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
/// Set by kube-controller-manager's PV controller on a claim it wants a
/// provisioner to provision (an Immediate claim as soon as it is seen; a
/// WaitForFirstConsumer claim once a node is selected): the class's
/// provisioner. What the metadata of a claim says of its class.
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The same, as Kubernetes before 1.23 wrote it (and still writes it too).
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// Set by the PV controller once the claim is bound to its volume.
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// Set by a Stead agent that gives a WaitForFirstConsumer claim's node
/// choice back: with no node chosen, the claim waits for the scheduler. Its
/// metadata would otherwise look like an Immediate claim's, which agents
/// take from the metadata alone (see [`concerns`]).
pub const ANN_WAITS_FOR_SCHEDULER: &str = "stead.csi.dev/waits-for-scheduler";

/// The volume (and PV) name of a claim (or of its metadata): `pvc-<uid>`.
pub fn volume_name<K: Resource>(pvc: &K) -> Option<String> {
    pvc.meta().uid.as_ref().map(|uid| format!("pvc-{uid}"))
}

/// The class a claim names, if any.
pub fn class_name(pvc: &PersistentVolumeClaim) -> Option<&str> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .or_else(|| {
            pvc.metadata
                .annotations
                .as_ref()?
                .get(ANN_BETA_CLASS)
                .map(String::as_str)
        })
        .filter(|s| !s.is_empty())
}

pub fn annotation<'a, K: Resource>(pvc: &'a K, key: &str) -> Option<&'a str> {
    pvc.meta()
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The node chosen for a claim (or its metadata), if any.
pub fn selected_node<K: Resource>(pvc: &K) -> Option<&str> {
    annotation(pvc, ANN_SELECTED_NODE)
}

/// The annotations of a claim's metadata that [`concerns`] and the leak
/// reaper read: the claim watch keeps these and drops the others (a
/// `kubectl apply`'s last-applied-configuration, say, which can be large),
/// with the managed fields, so that an agent's memory does not grow with
/// what other controllers write on every claim of the cluster.
const KEPT_ANNOTATIONS: [&str; 6] = [
    ANN_SELECTED_NODE,
    ANN_STORAGE_PROVISIONER,
    ANN_BETA_STORAGE_PROVISIONER,
    ANN_BIND_COMPLETED,
    ANN_WAITS_FOR_SCHEDULER,
    super::moving::ANN_MOVE_TO,
];

/// Trims a claim's metadata (from the claim watch) to what is read of it.
pub fn keep_what_is_read(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    // Of the managed fields, only when the claim's size and the claim were
    // last written ([`Writes`]), as two entries of our own.
    let writes = Writes::of(meta);
    meta.managed_fields = Some(
        [
            (MANAGER_SIZE_WRITTEN, writes.size),
            (MANAGER_LAST_WRITTEN, writes.last),
        ]
        .into_iter()
        .filter_map(|(manager, time)| {
            Some(ManagedFieldsEntry {
                manager: Some(manager.to_string()),
                time: Some(Time(time?)),
                ..Default::default()
            })
        })
        .collect(),
    )
    .filter(|kept: &Vec<ManagedFieldsEntry>| !kept.is_empty());
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| KEPT_ANNOTATIONS.contains(&k.as_str()));
    }
}

/// The entries [`keep_what_is_read`] leaves in a claim's metadata (names no
/// real manager can have: a manager's name is a client's user agent).
const MANAGER_SIZE_WRITTEN: &str = "stead: size written";
const MANAGER_LAST_WRITTEN: &str = "stead: last written";

/// When a claim's requested size was last written (the newest managed-fields
/// entry that owns `spec.resources`), and when the claim was last written at
/// all, to the second (the apiserver's clock). A bound claim of this node is
/// read again only when its size may have changed (`Writes::may_have_grown`):
/// not at each write of kube-controller-manager or kubelet on its status or
/// annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Writes {
    pub size: Option<Timestamp>,
    pub last: Option<Timestamp>,
}

impl Writes {
    /// From the real managed fields of a claim, or from the two entries the
    /// claim watch keeps of them.
    pub fn of(meta: &ObjectMeta) -> Writes {
        let mut w = Writes::default();
        for e in meta.managed_fields.iter().flatten() {
            let Some(Time(t)) = e.time else { continue };
            let owns_size = match e.manager.as_deref() {
                Some(MANAGER_SIZE_WRITTEN) => true,
                Some(MANAGER_LAST_WRITTEN) => false,
                _ => {
                    e.subresource.as_deref().unwrap_or("").is_empty()
                        && e.fields_v1
                            .as_ref()
                            .and_then(|f| f.0.get("f:spec")?.get("f:resources"))
                            .is_some()
                }
            };
            if owns_size {
                w.size = w.size.max(Some(t));
            }
            w.last = w.last.max(Some(t));
        }
        w
    }

    /// Whether this version of a claim may ask for another size than the
    /// version read whole when its size was `read` (the [`Writes::size`] of
    /// that read). Yes when the size was written later, or when this
    /// version's last write was in the second of the size's last write (a
    /// second write of the size in the same second keeps its time); yes
    /// when anything is unknown.
    pub fn may_have_grown(&self, read: Option<Timestamp>) -> bool {
        match (self.size, self.last, read) {
            (Some(size), Some(last), Some(read)) => size > read || last <= size,
            _ => true,
        }
    }
}

/// Whether a claim concerns the agent of `node`, from its metadata alone
/// (claims are watched as metadata: only those that concern this node are
/// read whole). `pv_here`: this node's PV store holds the claim's PV
/// (`pvc-<uid>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concern {
    /// Nothing for this node (with the reason, for the debug log).
    No(&'static str),
    /// Not known yet to be anybody's: no node chosen, and the PV controller
    /// has not named its provisioner (a WaitForFirstConsumer claim waiting
    /// for the scheduler, or a claim just created); its next change says.
    NotYet,
    /// Provisioned here and waiting for the PV controller to bind it:
    /// nothing to do until it is bound.
    Provisioned,
    /// Read the claim and reconcile it.
    Read,
    /// An Immediate claim of Stead's that no node took yet: take it (the
    /// take answers with the whole claim), if this node may.
    Take,
}

/// See [`Concern`]. A claim bound to a PV of this node is read on every
/// change (it may have grown: expansion); one selected for this node until
/// it has its PV; an Immediate claim of Stead's that no node took yet by
/// every node that may take it. A claim being deleted is not decided here.
pub fn concerns<K: Resource>(pvc: &K, node: &str, pv_here: bool) -> Concern {
    let bound = annotation(pvc, ANN_BIND_COMPLETED).is_some();
    match selected_node(pvc) {
        Some(n) if n == node => {
            if pv_here && !bound {
                Concern::Provisioned
            } else {
                Concern::Read
            }
        }
        _ if pv_here => Concern::Read,
        Some(_) => Concern::No("claim is assigned to another node"),
        None if bound => Concern::No("claim is bound, not to a volume of this node"),
        None => {
            let provisioner = annotation(pvc, ANN_STORAGE_PROVISIONER)
                .or_else(|| annotation(pvc, ANN_BETA_STORAGE_PROVISIONER));
            match provisioner {
                Some(crate::DRIVER_NAME) if annotation(pvc, ANN_WAITS_FOR_SCHEDULER).is_some() => {
                    Concern::NotYet
                }
                Some(crate::DRIVER_NAME) => Concern::Take,
                Some(_) => Concern::No("claim is another provisioner's"),
                None => Concern::NotYet,
            }
        }
    }
}

/// Whether the claim watch keeps a claim's metadata in the agent's store:
/// every claim that concerns this node ([`concerns`] says more than `No`)
/// and every claim Stead marked (an annotation, label or finalizer of
/// `stead.csi.dev/`: a move, a claim given back, a node-loss opt-in). The
/// others — claims of other nodes, of other provisioners, bound to volumes
/// that are not Stead's — are dropped as they arrive, so that an agent's
/// memory grows with its own node's claims, not with the cluster's. A
/// dropped claim that changes is looked at again (the watch still sees it)
/// and kept once it concerns this node.
pub fn kept_in_store<K: Resource>(pvc: &K, node: &str, pv_here: bool) -> bool {
    dropped_from_store(pvc, node, pv_here).is_none()
}

/// Why the claim watch drops a claim from the store ([`kept_in_store`]),
/// or `None` when it keeps it.
pub fn dropped_from_store<K: Resource>(pvc: &K, node: &str, pv_here: bool) -> Option<&'static str> {
    let meta = pvc.meta();
    let stead = |k: &String| k.starts_with(STEAD_PREFIX);
    let marked = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.keys().any(stead))
        || meta.labels.as_ref().is_some_and(|l| l.keys().any(stead))
        || meta.finalizers.iter().flatten().any(stead);
    if marked {
        return None;
    }
    match concerns(pvc, node, pv_here) {
        Concern::No(why) => Some(why),
        _ => None,
    }
}

/// The prefix of what Stead writes on claims.
const STEAD_PREFIX: &str = "stead.csi.dev/";

/// What the agent on `node` does with a claim of a Stead class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do here (with the reason, for the debug log).
    Skip(&'static str),
    /// Immediate binding and no node chosen yet: try to take it.
    Claim,
    /// This node is the claim's node: create the volume and the PV.
    Provision,
}

/// Decides for a claim whose class is a Stead class (`class`).
pub fn decide(pvc: &PersistentVolumeClaim, class: &ClassSpec, node: &str) -> Decision {
    if pvc.metadata.deletion_timestamp.is_some() {
        return Decision::Skip("claim is being deleted");
    }
    let spec = pvc.spec.as_ref();
    if spec
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
    {
        return Decision::Skip("claim already names its volume");
    }
    if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
        return Decision::Skip("claim is bound");
    }
    match selected_node(pvc) {
        Some(n) if n == node => Decision::Provision,
        Some(_) => Decision::Skip("claim is assigned to another node"),
        None if class.wait_for_first_consumer => Decision::Skip("waiting for the scheduler"),
        None => Decision::Claim,
    }
}

/// What a class's `allowedTopologies` say of this node for a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// The class allows this node (or allows every node).
    Yes,
    /// An Immediate claim this node may not take: another node will.
    Skip,
    /// This node's labels are not known yet (its Node watch has not
    /// synced): look again shortly rather than refuse on a guess.
    NotKnownYet,
    /// The claim is this node's (the scheduler chose it), but the class
    /// does not allow it: refuse, with this message, and create nothing.
    Refuse(String),
}

/// Whether `class` lets the volume of a claim (`decision`: Claim or
/// Provision) live on `node`, whose Node object is `own` if known.
pub fn allowed_here(
    decision: &Decision,
    class: &ClassSpec,
    node: &str,
    own: Option<&Node>,
) -> Allowed {
    if class.allows_node(node, own.and_then(|n| n.metadata.labels.as_ref())) {
        return Allowed::Yes;
    }
    if *decision == Decision::Claim {
        return Allowed::Skip;
    }
    if own.is_none() {
        return Allowed::NotKnownYet;
    }
    Allowed::Refuse(format!(
        "StorageClass {}: allowedTopologies {} does not include node {node}; no volume was created",
        class.name,
        class.allowed_topologies_text()
    ))
}

/// Why a claim cannot become a CreateVolume request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("claim {claim}: {field} is missing")]
    Missing { claim: String, field: &'static str },
    #[error("claim {claim}: {field}: {reason}")]
    Invalid {
        claim: String,
        field: &'static str,
        reason: String,
    },
}

/// `namespace/name` of a claim (or of its metadata).
pub fn claim_key<K: Resource>(pvc: &K) -> String {
    let meta = pvc.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The bytes a claim asks for (`requests.storage`) and its optional limit.
pub fn requested_bytes(pvc: &PersistentVolumeClaim) -> Result<(i64, i64), ClaimError> {
    let claim = claim_key(pvc);
    let resources = pvc.spec.as_ref().and_then(|s| s.resources.as_ref());
    let parse =
        |field: &'static str,
         q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
            q.map(|q| {
                quantity::to_bytes(&q.0).map_err(|e| ClaimError::Invalid {
                    claim: claim.clone(),
                    field,
                    reason: e.to_string(),
                })
            })
            .transpose()
        };
    let required = parse(
        "spec.resources.requests.storage",
        resources
            .and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get("storage")),
    )?
    .ok_or_else(|| ClaimError::Missing {
        claim: claim.clone(),
        field: "spec.resources.requests.storage",
    })?;
    let limit = parse(
        "spec.resources.limits.storage",
        resources
            .and_then(|r| r.limits.as_ref())
            .and_then(|m| m.get("storage")),
    )?
    .unwrap_or(0);
    Ok((required, limit))
}

/// Whether the claim wants a raw block device.
pub fn is_block(pvc: &PersistentVolumeClaim) -> bool {
    pvc.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block")
}

/// Kubernetes access modes → CSI access modes. Node-local volumes serve one
/// node, so the multi-node modes are refused here, before any volume exists.
fn access_modes(pvc: &PersistentVolumeClaim) -> Result<Vec<Mode>, ClaimError> {
    let claim = claim_key(pvc);
    let modes = pvc
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.clone())
        .unwrap_or_default();
    if modes.is_empty() {
        return Err(ClaimError::Missing {
            claim,
            field: "spec.accessModes",
        });
    }
    modes
        .iter()
        .map(|m| match m.as_str() {
            "ReadWriteOnce" => Ok(Mode::SingleNodeWriter),
            "ReadWriteOncePod" => Ok(Mode::SingleNodeSingleWriter),
            other => Err(ClaimError::Invalid {
                claim: claim.clone(),
                field: "spec.accessModes",
                reason: format!(
                    "{other} is not supported: Stead volumes are node-local (use ReadWriteOnce or ReadWriteOncePod)"
                ),
            }),
        })
        .collect()
}

/// The volume capabilities of a claim of `class`.
pub fn capabilities(
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
) -> Result<Vec<VolumeCapability>, ClaimError> {
    let access_type = if is_block(pvc) {
        AccessType::Block(volume_capability::BlockVolume {})
    } else {
        AccessType::Mount(volume_capability::MountVolume {
            fs_type: class.fs_type.clone().unwrap_or_default(),
            mount_flags: class.mount_options.clone(),
            volume_mount_group: String::new(),
        })
    };
    Ok(access_modes(pvc)?
        .into_iter()
        .map(|mode| VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access_type.clone()),
        })
        .collect())
}

/// The topology segment that means "this node".
pub fn node_topology(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

/// The CreateVolume request for a claim of `class`, on `node`.
pub fn create_request(
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
    node: &str,
) -> Result<CreateVolumeRequest, ClaimError> {
    let name = volume_name(pvc).ok_or_else(|| ClaimError::Missing {
        claim: claim_key(pvc),
        field: "metadata.uid",
    })?;
    // The content source is added by the reconcile, which resolves the
    // claim's data source (`source`) first.
    let (required_bytes, limit_bytes) = requested_bytes(pvc)?;
    Ok(CreateVolumeRequest {
        name,
        capacity_range: Some(CapacityRange {
            required_bytes,
            limit_bytes,
        }),
        volume_capabilities: capabilities(pvc, class)?,
        parameters: class.csi_parameters().into_iter().collect(),
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![node_topology(node)],
            preferred: vec![node_topology(node)],
        }),
        ..Default::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::provisioner::class::{self, tests::class as sc};
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, VolumeResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::collections::BTreeMap;

    pub fn pvc(name: &str, size: &str, selected: Option<&str>) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("db".into()),
                uid: Some("0a1b2c3d-0000-4000-8000-000000000001".into()),
                annotations: selected
                    .map(|n| BTreeMap::from([(ANN_SELECTED_NODE.to_string(), n.to_string())])),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some("stead".into()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity(size.into()))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn wffc() -> ClassSpec {
        class::parse(&sc(
            "stead",
            &[("pool", "image")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap()
    }

    fn immediate() -> ClassSpec {
        class::parse(&sc("stead-now", &[], "Immediate", "Delete")).unwrap()
    }

    #[test]
    fn wffc_claim_is_provisioned_only_by_the_selected_node() {
        let c = wffc();
        assert_eq!(
            decide(&pvc("a", "1Gi", Some("n1")), &c, "n1"),
            Decision::Provision
        );
        assert!(matches!(
            decide(&pvc("a", "1Gi", Some("n2")), &c, "n1"),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&pvc("a", "1Gi", None), &c, "n1"),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn immediate_claim_without_node_is_claimed() {
        let c = immediate();
        assert_eq!(decide(&pvc("a", "1Gi", None), &c, "n1"), Decision::Claim);
        assert_eq!(
            decide(&pvc("a", "1Gi", Some("n1")), &c, "n1"),
            Decision::Provision
        );
        assert!(matches!(
            decide(&pvc("a", "1Gi", Some("n2")), &c, "n1"),
            Decision::Skip(_)
        ));
    }

    /// The metadata of claim `a` (selected for `selected`) with the
    /// annotations `extra`, as the claim watch has it.
    fn meta(
        selected: Option<&str>,
        extra: &[(&str, &str)],
    ) -> kube::core::PartialObjectMeta<PersistentVolumeClaim> {
        use kube::core::PartialObjectMetaExt;
        let mut m = pvc("a", "1Gi", selected).metadata;
        let annotations = m.annotations.get_or_insert_with(Default::default);
        for (k, v) in extra {
            annotations.insert(k.to_string(), v.to_string());
        }
        m.into_response_partial()
    }

    #[test]
    fn the_store_keeps_this_nodes_claims_and_stead_s_marks_and_drops_the_rest() {
        let stead = [(ANN_STORAGE_PROVISIONER, "stead.csi.dev")];
        let bound = [(ANN_BIND_COMPLETED, "yes")];
        let other = [(ANN_STORAGE_PROVISIONER, "other.example.com")];
        // This node's, chosen or bound to its PV; a claim any node may take;
        // one the PV controller has not annotated yet.
        assert!(kept_in_store(&meta(Some("n1"), &stead), "n1", false));
        assert!(kept_in_store(&meta(Some("n1"), &bound), "n1", true));
        assert!(kept_in_store(&meta(Some("n2"), &bound), "n1", true));
        assert!(kept_in_store(&meta(None, &stead), "n1", false));
        assert!(kept_in_store(&meta(None, &[]), "n1", false));
        // Dropped: another node's Stead claim, another provisioner's claim,
        // a claim bound to a volume that is not this node's.
        assert!(!kept_in_store(&meta(Some("n2"), &stead), "n1", false));
        assert!(!kept_in_store(&meta(None, &other), "n1", false));
        assert!(!kept_in_store(&meta(None, &bound), "n1", false));
        // With the reason the agent logs as its verdict on the claim.
        assert_eq!(
            dropped_from_store(&meta(Some("n2"), &stead), "n1", false),
            Some("claim is assigned to another node")
        );
        assert_eq!(dropped_from_store(&meta(None, &stead), "n1", false), None);
        // Marked by Stead (a move asked, a claim made again by a move), by a
        // label, or held by the move's finalizer: kept wherever it is.
        let asked = [(ANN_SELECTED_NODE, "n2"), ("stead.csi.dev/move-to", "n3")];
        assert!(kept_in_store(&meta(None, &asked), "n1", false));
        let mut labelled = meta(Some("n2"), &bound);
        labelled.metadata.labels =
            Some([("stead.csi.dev/node".to_string(), "n2".to_string())].into());
        assert!(kept_in_store(&labelled, "n1", false));
        let mut held = meta(Some("n2"), &bound);
        held.metadata.finalizers = Some(vec!["stead.csi.dev/move".to_string()]);
        assert!(kept_in_store(&held, "n1", false));
    }

    #[test]
    fn claims_are_read_whole_only_when_they_concern_this_node() {
        let stead = [(ANN_STORAGE_PROVISIONER, "stead.csi.dev")];
        let bound = [(ANN_BIND_COMPLETED, "yes")];
        // Selected for this node: read until it has its PV, and once bound.
        assert_eq!(concerns(&meta(Some("n1"), &[]), "n1", false), Concern::Read);
        assert_eq!(
            concerns(&meta(Some("n1"), &[]), "n1", true),
            Concern::Provisioned
        );
        assert_eq!(
            concerns(&meta(Some("n1"), &bound), "n1", true),
            Concern::Read
        );
        // Another node's, unless bound to a PV of this node.
        assert!(matches!(
            concerns(&meta(Some("n2"), &stead), "n1", false),
            Concern::No(_)
        ));
        assert_eq!(
            concerns(&meta(Some("n2"), &bound), "n1", true),
            Concern::Read
        );
        // No node chosen: an Immediate claim of a Stead class (as the PV
        // controller says, in either spelling), taken by any node.
        assert_eq!(concerns(&meta(None, &stead), "n1", false), Concern::Take);
        assert_eq!(
            concerns(
                &meta(None, &[(ANN_BETA_STORAGE_PROVISIONER, "stead.csi.dev")]),
                "n1",
                false
            ),
            Concern::Take
        );
        // Unless an agent gave its node choice back as a WaitForFirstConsumer
        // claim's: the scheduler chooses again.
        assert_eq!(
            concerns(
                &meta(None, &[stead[0], (ANN_WAITS_FOR_SCHEDULER, "n2")]),
                "n1",
                false
            ),
            Concern::NotYet
        );
        // Another provisioner's, or one bound elsewhere: not read.
        for m in [
            meta(None, &[(ANN_STORAGE_PROVISIONER, "ebs.csi.aws.com")]),
            meta(
                None,
                &[(ANN_STORAGE_PROVISIONER, "stead.csi.dev"), bound[0]],
            ),
        ] {
            assert!(matches!(concerns(&m, "n1", false), Concern::No(_)), "{m:?}");
        }
        // Not looked at by the PV controller yet (a WaitForFirstConsumer
        // claim without a node, a claim just created): its next change says.
        assert_eq!(concerns(&meta(None, &[]), "n1", false), Concern::NotYet);
    }

    #[test]
    fn the_claim_watch_keeps_only_the_annotations_it_reads() {
        let mut m = meta(
            Some("n1"),
            &[
                (ANN_STORAGE_PROVISIONER, "stead.csi.dev"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{...}"),
            ],
        )
        .metadata;
        m.managed_fields = Some(vec![Default::default()]);
        keep_what_is_read(&mut m);
        let kept: Vec<&str> = m
            .annotations
            .iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(kept, [ANN_SELECTED_NODE, ANN_STORAGE_PROVISIONER]);
        // An entry without a time says nothing of when anything was written.
        assert_eq!(m.managed_fields, None);
        assert_eq!(
            m.uid.as_deref(),
            Some("0a1b2c3d-0000-4000-8000-000000000001")
        );
    }

    fn entry(
        manager: &str,
        subresource: &str,
        fields: serde_json::Value,
        at: i64,
    ) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            subresource: (!subresource.is_empty()).then(|| subresource.into()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                fields,
            )),
            time: Some(Time(Timestamp::from_second(at).unwrap())),
            ..Default::default()
        }
    }

    fn at(second: i64) -> Option<Timestamp> {
        Some(Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn a_claims_size_is_written_by_the_entries_that_own_spec_resources() {
        let mut m = meta(Some("n1"), &[]).metadata;
        m.managed_fields = Some(vec![
            // The StatefulSet controller made it, size included.
            entry(
                "kube-controller-manager",
                "",
                serde_json::json!({"f:spec": {"f:accessModes": {}, "f:resources": {"f:requests": {}}}}),
                100,
            ),
            // A user grew it later.
            entry(
                "kubectl-patch",
                "",
                serde_json::json!({"f:spec": {"f:resources": {"f:requests": {"f:storage": {}}}}}),
                200,
            ),
            // The binder: a spec field, not the size.
            entry(
                "kube-controller-manager-binder",
                "",
                serde_json::json!({"f:spec": {"f:volumeName": {}}}),
                300,
            ),
            // Status owns no spec, whatever it lists.
            entry(
                "kube-controller-manager",
                "status",
                serde_json::json!({"f:spec": {"f:resources": {}}, "f:status": {}}),
                400,
            ),
        ]);
        let w = Writes::of(&m);
        assert_eq!((w.size, w.last), (at(200), at(400)));
        // The watch keeps just that, and reads it back the same.
        keep_what_is_read(&mut m);
        assert_eq!(m.managed_fields.as_ref().map(Vec::len), Some(2));
        assert_eq!(Writes::of(&m), w);
    }

    #[test]
    fn a_bound_claim_is_read_again_only_when_its_size_may_have_changed() {
        let w = |size: i64, last: i64| Writes {
            size: at(size),
            last: at(last),
        };
        // Bound and its status written after the read: nothing new.
        assert!(!w(200, 300).may_have_grown(at(200)));
        // Its size written since.
        assert!(w(250, 300).may_have_grown(at(200)));
        // The last write in the second of the size's: a second write of the
        // size in that second keeps its time, so it is read.
        assert!(w(200, 200).may_have_grown(at(200)));
        // Never read, or times unknown: read.
        assert!(w(200, 300).may_have_grown(None));
        assert!(Writes::default().may_have_grown(at(200)));
    }

    #[test]
    fn bound_or_deleted_claims_are_left_alone() {
        let c = wffc();
        let mut bound = pvc("a", "1Gi", Some("n1"));
        bound.status = Some(PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        });
        assert!(matches!(decide(&bound, &c, "n1"), Decision::Skip(_)));
        let mut named = pvc("a", "1Gi", Some("n1"));
        named.spec.as_mut().unwrap().volume_name = Some("pv-x".into());
        assert!(matches!(decide(&named, &c, "n1"), Decision::Skip(_)));
        let mut deleted = pvc("a", "1Gi", Some("n1"));
        deleted.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(matches!(decide(&deleted, &c, "n1"), Decision::Skip(_)));
    }

    fn with_topology(mode: &str, terms: &[&[(&str, &[&str])]]) -> ClassSpec {
        use k8s_openapi::api::core::v1::{TopologySelectorLabelRequirement, TopologySelectorTerm};
        let mut c = sc("zoned", &[], mode, "Delete");
        c.allowed_topologies = Some(
            terms
                .iter()
                .map(|exprs| TopologySelectorTerm {
                    match_label_expressions: Some(
                        exprs
                            .iter()
                            .map(|(k, vs)| TopologySelectorLabelRequirement {
                                key: k.to_string(),
                                values: vs.iter().map(|v| v.to_string()).collect(),
                            })
                            .collect(),
                    ),
                })
                .collect(),
        );
        class::parse(&c).unwrap()
    }

    fn labelled(name: &str, labels: &[(&str, &str)]) -> Node {
        let mut n = crate::provisioner::schedulable::tests::node(name);
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    #[test]
    fn allowed_topologies_let_only_matching_nodes_hold_the_volume() {
        let c = with_topology("WaitForFirstConsumer", &[&[("zone", &["a", "b"])]]);
        let here = labelled("n1", &[("zone", "a")]);
        let elsewhere = labelled("n1", &[("zone", "c")]);
        assert_eq!(
            allowed_here(&Decision::Provision, &c, "n1", Some(&here)),
            Allowed::Yes
        );
        let Allowed::Refuse(note) = allowed_here(&Decision::Provision, &c, "n1", Some(&elsewhere))
        else {
            panic!("a node outside allowedTopologies must be refused");
        };
        assert_eq!(
            note,
            "StorageClass zoned: allowedTopologies [{zone in (a, b)}] does not include node n1; no volume was created"
        );
        // Unknown labels: no refusal on a guess.
        assert_eq!(
            allowed_here(&Decision::Provision, &c, "n1", None),
            Allowed::NotKnownYet
        );
        // An Immediate claim is left to a node that matches.
        let now = with_topology("Immediate", &[&[("zone", &["a"])]]);
        assert_eq!(
            allowed_here(&Decision::Claim, &now, "n1", Some(&elsewhere)),
            Allowed::Skip
        );
        assert_eq!(
            allowed_here(&Decision::Claim, &now, "n1", Some(&here)),
            Allowed::Yes
        );
        // No allowedTopologies: every node.
        assert_eq!(
            allowed_here(&Decision::Claim, &immediate(), "n1", None),
            Allowed::Yes
        );
    }

    #[test]
    fn steads_own_topology_key_matches_the_node_name_when_the_label_is_absent() {
        let c = with_topology("Immediate", &[&[(TOPOLOGY_KEY, &["n1", "n2"])]]);
        let bare = labelled("n1", &[]);
        assert_eq!(
            allowed_here(&Decision::Claim, &c, "n1", Some(&bare)),
            Allowed::Yes
        );
        assert_eq!(
            allowed_here(&Decision::Claim, &c, "n3", Some(&labelled("n3", &[]))),
            Allowed::Skip
        );
        // A label that is present wins over the name.
        let relabelled = labelled("n1", &[(TOPOLOGY_KEY, "n9")]);
        assert_eq!(
            allowed_here(&Decision::Claim, &c, "n1", Some(&relabelled)),
            Allowed::Skip
        );
        // Another key is never taken from the name.
        let z = with_topology("Immediate", &[&[("zone", &["n1"])]]);
        assert_eq!(
            allowed_here(&Decision::Claim, &z, "n1", Some(&bare)),
            Allowed::Skip
        );
    }

    #[test]
    fn a_node_needs_every_expression_of_one_term() {
        let c = with_topology(
            "WaitForFirstConsumer",
            &[&[("zone", &["a"]), ("disk", &["ssd"])], &[("zone", &["b"])]],
        );
        let ok = |labels: &[(&str, &str)]| {
            allowed_here(
                &Decision::Provision,
                &c,
                "n1",
                Some(&labelled("n1", labels)),
            ) == Allowed::Yes
        };
        assert!(ok(&[("zone", "a"), ("disk", "ssd")]));
        assert!(!ok(&[("zone", "a"), ("disk", "hdd")]));
        assert!(!ok(&[("zone", "a")]));
        assert!(ok(&[("zone", "b")]));
    }

    #[test]
    fn create_request_carries_size_pool_mode_and_node() {
        let req =
            create_request(&pvc("db-vol-db-ss-0", "500Mi", Some("n1")), &wffc(), "n1").unwrap();
        assert_eq!(req.name, "pvc-0a1b2c3d-0000-4000-8000-000000000001");
        assert_eq!(req.capacity_range.unwrap().required_bytes, 500 << 20);
        assert_eq!(
            req.parameters.get("pool").map(String::as_str),
            Some("image")
        );
        let cap = &req.volume_capabilities[0];
        assert_eq!(cap.access_mode.unwrap().mode, Mode::SingleNodeWriter as i32);
        assert!(matches!(cap.access_type, Some(AccessType::Mount(_))));
        let topo = &req.accessibility_requirements.unwrap().requisite[0];
        assert_eq!(
            topo.segments.get(TOPOLOGY_KEY).map(String::as_str),
            Some("n1")
        );
    }

    #[test]
    fn block_and_rwop_claims_map_to_block_and_single_writer() {
        let mut p = pvc("raw", "64Mi", Some("n1"));
        let spec = p.spec.as_mut().unwrap();
        spec.volume_mode = Some("Block".into());
        spec.access_modes = Some(vec!["ReadWriteOncePod".into()]);
        let req = create_request(&p, &wffc(), "n1").unwrap();
        let cap = &req.volume_capabilities[0];
        assert_eq!(
            cap.access_mode.unwrap().mode,
            Mode::SingleNodeSingleWriter as i32
        );
        assert!(matches!(cap.access_type, Some(AccessType::Block(_))));
    }

    #[test]
    fn multi_node_modes_and_bad_sizes_are_refused_naming_the_field() {
        let mut p = pvc("shared", "1Gi", Some("n1"));
        p.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteMany".into()]);
        let e = create_request(&p, &wffc(), "n1").unwrap_err();
        assert!(e.to_string().contains("spec.accessModes"), "{e}");
        assert!(e.to_string().contains("node-local"), "{e}");

        let e = create_request(&pvc("bad", "lots", Some("n1")), &wffc(), "n1").unwrap_err();
        assert!(
            e.to_string().contains("spec.resources.requests.storage"),
            "{e}"
        );
        assert!(e.to_string().contains("db/bad"), "{e}");
    }
}
