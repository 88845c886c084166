//! The PersistentVolume that binds a claim to the volume Stead created for it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
    VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::class::ClassSpec;
use super::{claim, quantity};
use crate::proto::csi::v1::Volume;
use crate::{DRIVER_NAME, TOPOLOGY_KEY};

/// Tells kube-controller-manager which provisioner owns the PV's deletion.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Held on every PV with reclaim policy Delete until its volume is deleted,
/// so that the PV object never disappears while its data still exists.
pub const FINALIZER: &str = "stead.csi.dev/volume-protection";

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
            annotations: Some(BTreeMap::from([(
                ANN_PROVISIONED_BY.to_string(),
                DRIVER_NAME.to_string(),
            )])),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;
    use crate::provisioner::class::{self, tests::class as sc};
    use std::collections::HashMap;

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
}
