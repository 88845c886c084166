//! The PersistentVolume that binds a claim to the volume Stead created for it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
    VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::class::{ClassSpec, NodeLoss};
use super::{claim, quantity, scope};
use crate::proto::csi::v1::Volume;
use crate::{DRIVER_NAME, NODE_LABEL, TOPOLOGY_KEY};

/// Tells kube-controller-manager which provisioner owns the PV's deletion.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Held on every PV with reclaim policy Delete until its volume is deleted,
/// so that the PV object never disappears while its data still exists.
pub const FINALIZER: &str = "stead.csi.dev/volume-protection";

/// On a PV (and its claim) of a class with `onNodeLoss: release`: value
/// [`RELEASE`]. What the node-loss leader and the admission policies read,
/// recorded at provisioning: a class changed later does not change it.
pub const NODE_LOSS_LABEL: &str = "stead.csi.dev/on-node-loss";
/// The value of [`NODE_LOSS_LABEL`].
pub const RELEASE: &str = "release";
/// On a PV of a `release` class: the class's `nodeLossTimeout`, in seconds.
pub const ANN_NODE_LOSS_TIMEOUT: &str = "stead.csi.dev/node-loss-timeout-seconds";

/// The labels of a PV (and of its claim) of `class` on `node`: the node's,
/// which each agent's PV watch selects (see `scope`), and the opt-in of node
/// loss.
pub fn labels(class: &ClassSpec, node: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(NODE_LABEL.to_string(), scope::node_label(node))]);
    if class.node_loss.is_release() {
        labels.insert(NODE_LOSS_LABEL.to_string(), RELEASE.to_string());
    }
    labels
}

/// The node-loss policy a PV was provisioned with (its label and
/// annotation); a label whose timeout annotation is missing or unreadable
/// takes the default timeout.
pub fn node_loss(pv: &PersistentVolume) -> NodeLoss {
    let meta = &pv.metadata;
    if meta
        .labels
        .as_ref()
        .and_then(|l| l.get(NODE_LOSS_LABEL))
        .map(String::as_str)
        != Some(RELEASE)
    {
        return NodeLoss::Keep;
    }
    let timeout = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_NODE_LOSS_TIMEOUT))
        .and_then(|t| t.parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(super::class::DEFAULT_NODE_LOSS_TIMEOUT);
    NodeLoss::Release { timeout }
}

/// Builds the PV for `pvc` (of `class`) backed by `volume` on `node`.
pub fn build_pv(
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
    volume: &Volume,
    node: &str,
) -> PersistentVolume {
    let spec = pvc.spec.clone().unwrap_or_default();
    let block = claim::is_block(pvc);
    // A `dir` volume has no filesystem of its own: its PV names none
    // (kubelet still applies fsGroup: the CSIDriver's policy is File).
    let dir = volume
        .volume_context
        .get(crate::csi::controller::CONTEXT_BACKEND)
        .is_some_and(|b| b == "dir");
    let volume_attributes: BTreeMap<String, String> = volume
        .volume_context
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(volume.volume_id.clone()),
            annotations: Some(
                [(ANN_PROVISIONED_BY.to_string(), DRIVER_NAME.to_string())]
                    .into_iter()
                    .chain(match class.node_loss {
                        NodeLoss::Release { timeout } => Some((
                            ANN_NODE_LOSS_TIMEOUT.to_string(),
                            timeout.as_secs().to_string(),
                        )),
                        NodeLoss::Keep => None,
                    })
                    .collect(),
            ),
            labels: Some(labels(class, node)),
            finalizers: class.reclaim_delete.then(|| vec![FINALIZER.to_string()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(quantity::format(volume.capacity_bytes)),
            )])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: pvc.metadata.namespace.clone(),
                name: pvc.metadata.name.clone(),
                uid: pvc.metadata.uid.clone(),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER_NAME.to_string(),
                volume_handle: volume.volume_id.clone(),
                fs_type: (!block && !dir)
                    .then(|| class.fs_type.clone().unwrap_or_else(|| "ext4".into())),
                volume_attributes: (!volume_attributes.is_empty()).then_some(volume_attributes),
                ..Default::default()
            }),
            mount_options: (!class.mount_options.is_empty()).then(|| class.mount_options.clone()),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: TOPOLOGY_KEY.to_string(),
                            operator: "In".to_string(),
                            values: Some(vec![node.to_string()]),
                        }]),
                        ..Default::default()
                    }],
                }),
            }),
            persistent_volume_reclaim_policy: Some(class.reclaim_policy().to_string()),
            storage_class_name: Some(class.name.clone()),
            volume_mode: Some(if block { "Block" } else { "Filesystem" }.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node a Stead PV is pinned to (from its required node affinity).
pub fn pv_node(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.key == TOPOLOGY_KEY && e.operator == "In")
        .and_then(|e| e.values.as_ref()?.first())
        .map(String::as_str)
}

/// The volume handle of a PV served by Stead.
pub fn stead_volume_handle(pv: &PersistentVolume) -> Option<&str> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == DRIVER_NAME).then_some(csi.volume_handle.as_str())
}

/// How an existing PV of a volume's name differs from the PV Stead would
/// have made for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PvMismatch {
    #[error("it is not served by {DRIVER_NAME} (spec.csi.driver is {driver:?})")]
    NotStead { driver: Option<String> },
    #[error("its spec.csi.volumeHandle is {found:?}, not {expected:?}")]
    Handle { found: String, expected: String },
    #[error("its node affinity pins it to {found:?}, not to node {expected:?}")]
    Node {
        found: Option<String>,
        expected: String,
    },
    #[error("its spec.claimRef.uid is {found:?}, not claim uid {expected:?}")]
    Claim {
        found: Option<String>,
        expected: String,
    },
}

/// Whether `existing` is the PV of `volume_id` on `node` for the claim of
/// uid `claim_uid`: a Stead PV with that handle, pinned to that node, bound
/// to that claim. A create that conflicted with such a PV was done by an
/// earlier attempt; any other PV of that name is somebody else's.
pub fn check_owned(
    existing: &PersistentVolume,
    volume_id: &str,
    node: &str,
    claim_uid: &str,
) -> Result<(), PvMismatch> {
    let Some(handle) = stead_volume_handle(existing) else {
        return Err(PvMismatch::NotStead {
            driver: existing
                .spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .map(|c| c.driver.clone()),
        });
    };
    if handle != volume_id {
        return Err(PvMismatch::Handle {
            found: handle.to_string(),
            expected: volume_id.to_string(),
        });
    }
    let pinned = pv_node(existing);
    if pinned != Some(node) {
        return Err(PvMismatch::Node {
            found: pinned.map(str::to_string),
            expected: node.to_string(),
        });
    }
    let bound_to = existing
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref());
    if bound_to != Some(claim_uid) {
        return Err(PvMismatch::Claim {
            found: bound_to.map(str::to_string),
            expected: claim_uid.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;
    use crate::provisioner::class::{self, tests::class as sc};
    use std::collections::HashMap;

    /// The PV this version makes for `claim` (of class `stead`:
    /// WaitForFirstConsumer, reclaim Delete) on `node`: its volume
    /// `pvc-<uid>`, of 16 MiB.
    pub(crate) fn made_for(claim: &PersistentVolumeClaim, node: &str) -> PersistentVolume {
        let class = class::parse(&sc("stead", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        let volume = Volume {
            volume_id: claim::volume_name(claim).unwrap(),
            capacity_bytes: 16 << 20,
            ..Default::default()
        };
        build_pv(claim, &class, &volume, node)
    }

    fn volume() -> Volume {
        Volume {
            volume_id: "pvc-0a1b2c3d-0000-4000-8000-000000000001".into(),
            capacity_bytes: 500 << 20,
            volume_context: HashMap::from([("pool".to_string(), "image".to_string())]),
            ..Default::default()
        }
    }

    #[test]
    fn pv_binds_the_claim_on_this_node_through_stead() {
        let class = class::parse(&sc(
            "stead",
            &[("pool", "image")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        let claim = pvc("db-vol-db-ss-0", "500Mi", Some("node-a"));
        let pv = build_pv(&claim, &class, &volume(), "node-a");

        assert_eq!(
            pv.metadata.name.as_deref(),
            Some("pvc-0a1b2c3d-0000-4000-8000-000000000001")
        );
        assert_eq!(
            pv.metadata.annotations.as_ref().unwrap()[ANN_PROVISIONED_BY],
            "stead.csi.dev"
        );
        assert_eq!(pv.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
        assert_eq!(
            pv.metadata.labels,
            Some(BTreeMap::from([(
                "stead.csi.dev/node".to_string(),
                "node-a".to_string()
            )])),
            "the node's PV watch selects it"
        );
        let spec = pv.spec.as_ref().unwrap();
        let cref = spec.claim_ref.as_ref().unwrap();
        assert_eq!(cref.namespace.as_deref(), Some("db"));
        assert_eq!(cref.name.as_deref(), Some("db-vol-db-ss-0"));
        assert_eq!(cref.uid, claim.metadata.uid);
        let csi = spec.csi.as_ref().unwrap();
        assert_eq!(csi.driver, "stead.csi.dev");
        assert_eq!(
            csi.volume_handle,
            "pvc-0a1b2c3d-0000-4000-8000-000000000001"
        );
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert_eq!(csi.volume_attributes.as_ref().unwrap()["pool"], "image");
        assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "500Mi");
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some("stead"));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(pv_node(&pv), Some("node-a"));
        assert_eq!(stead_volume_handle(&pv), Some(csi.volume_handle.as_str()));
    }

    #[test]
    fn a_release_class_is_recorded_on_the_pv_and_read_back() {
        let class = class::parse(&sc(
            "db",
            &[("onNodeLoss", "release"), ("nodeLossTimeout", "2m")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        let claim = pvc("db-vol-db-ss-0", "500Mi", Some("node-a"));
        let pv = build_pv(&claim, &class, &volume(), "node-a");
        let labels = pv.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[NODE_LOSS_LABEL], "release");
        assert_eq!(labels["stead.csi.dev/node"], "node-a");
        assert_eq!(
            pv.metadata.annotations.as_ref().unwrap()[ANN_NODE_LOSS_TIMEOUT],
            "120"
        );
        assert_eq!(
            node_loss(&pv),
            NodeLoss::Release {
                timeout: std::time::Duration::from_secs(120)
            }
        );
        // A kept class's PV has neither; a PV whose annotation was lost
        // takes the default timeout.
        let kept = made_for(&claim, "node-a");
        assert!(
            !kept
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key(NODE_LOSS_LABEL)
        );
        assert_eq!(node_loss(&kept), NodeLoss::Keep);
        let mut bare = pv.clone();
        bare.metadata.annotations = None;
        assert_eq!(
            node_loss(&bare),
            NodeLoss::Release {
                timeout: class::DEFAULT_NODE_LOSS_TIMEOUT
            }
        );
    }

    #[test]
    fn retain_class_gets_no_finalizer_and_block_no_fstype() {
        let class = class::parse(&sc(
            "stead-retain",
            &[("csi.storage.k8s.io/fstype", "xfs")],
            "WaitForFirstConsumer",
            "Retain",
        ))
        .unwrap();
        let mut claim = pvc("raw", "64Mi", Some("n"));
        let pv = build_pv(&claim, &class, &volume(), "n");
        assert_eq!(pv.metadata.finalizers, None);
        assert_eq!(
            pv.spec
                .as_ref()
                .unwrap()
                .csi
                .as_ref()
                .unwrap()
                .fs_type
                .as_deref(),
            Some("xfs")
        );
        assert_eq!(
            pv.spec
                .as_ref()
                .unwrap()
                .persistent_volume_reclaim_policy
                .as_deref(),
            Some("Retain")
        );

        claim.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        let pv = build_pv(&claim, &class, &volume(), "n");
        let spec = pv.spec.unwrap();
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(spec.csi.unwrap().fs_type, None);
    }

    #[test]
    fn a_dir_volume_names_no_filesystem() {
        let class = class::parse(&sc(
            "stead-dir",
            &[("pool", "dir")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        let claim = pvc("files", "64Mi", Some("n"));
        let mut vol = volume();
        vol.volume_context = HashMap::from([
            ("pool".to_string(), "dir".to_string()),
            ("backend".to_string(), "dir".to_string()),
        ]);
        let pv = build_pv(&claim, &class, &vol, "n");
        let csi = pv.spec.unwrap().csi.unwrap();
        assert_eq!(csi.fs_type, None, "a directory is not an ext4 filesystem");
        assert_eq!(csi.volume_attributes.unwrap()["backend"], "dir");
    }

    fn ours() -> (PersistentVolumeClaim, PersistentVolume) {
        let class = class::parse(&sc("stead", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        let claim = pvc("db-vol-db-ss-0", "500Mi", Some("node-a"));
        let pv = build_pv(&claim, &class, &volume(), "node-a");
        (claim, pv)
    }

    const VOL: &str = "pvc-0a1b2c3d-0000-4000-8000-000000000001";

    #[test]
    fn conflicting_pv_made_by_an_earlier_attempt_is_accepted() {
        let (claim, pv) = ours();
        let uid = claim.metadata.uid.clone().unwrap();
        assert_eq!(check_owned(&pv, VOL, "node-a", &uid), Ok(()));
    }

    #[test]
    fn conflicting_pv_of_another_driver_is_refused() {
        let (claim, mut pv) = ours();
        pv.spec.as_mut().unwrap().csi.as_mut().unwrap().driver = "hostpath.csi.k8s.io".into();
        let err = check_owned(&pv, VOL, "node-a", &claim.metadata.uid.unwrap()).unwrap_err();
        assert_eq!(
            err,
            PvMismatch::NotStead {
                driver: Some("hostpath.csi.k8s.io".into())
            }
        );
        pv.spec.as_mut().unwrap().csi = None;
        let err = check_owned(&pv, VOL, "node-a", "x").unwrap_err();
        assert_eq!(err, PvMismatch::NotStead { driver: None });
    }

    #[test]
    fn conflicting_pv_of_another_volume_is_refused_naming_both_handles() {
        let (claim, mut pv) = ours();
        pv.spec
            .as_mut()
            .unwrap()
            .csi
            .as_mut()
            .unwrap()
            .volume_handle = "pvc-other".into();
        let err = check_owned(&pv, VOL, "node-a", &claim.metadata.uid.unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("its spec.csi.volumeHandle is \"pvc-other\", not \"{VOL}\"")
        );
    }

    #[test]
    fn conflicting_pv_pinned_to_another_node_is_refused() {
        let (claim, pv) = ours();
        let err = check_owned(&pv, VOL, "node-b", &claim.metadata.uid.unwrap()).unwrap_err();
        assert_eq!(
            err,
            PvMismatch::Node {
                found: Some("node-a".into()),
                expected: "node-b".into()
            }
        );
    }

    #[test]
    fn conflicting_pv_bound_to_another_claim_is_refused() {
        let (_, mut pv) = ours();
        let err = check_owned(&pv, VOL, "node-a", "uid-of-a-new-claim").unwrap_err();
        assert!(
            matches!(err, PvMismatch::Claim { expected, .. } if expected == "uid-of-a-new-claim")
        );
        pv.spec.as_mut().unwrap().claim_ref = None;
        let err = check_owned(&pv, VOL, "node-a", "u").unwrap_err();
        assert_eq!(
            err,
            PvMismatch::Claim {
                found: None,
                expected: "u".into()
            }
        );
    }
}
