//! The few fields of the VolumeSnapshot API (snapshot.storage.k8s.io/v1,
//! the CRDs of kubernetes-csi/external-snapshotter) that Stead reads, as
//! kube resources. Stead only ever patches these objects, so fields it
//! does not model are never lost.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::{ClusterResourceScope, NamespaceResourceScope};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "snapshot.storage.k8s.io";
pub const VERSION: &str = "v1";

/// Set by the snapshot-controller on a content whose VolumeSnapshot is
/// being deleted.
pub const ANN_BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// Set while CreateSnapshot runs, so that the snapshot-controller does not
/// delete a content whose snapshot may be in the making.
pub const ANN_BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";
/// The snapshot-controller's finalizer on a content; removed by the
/// driver's side once the snapshot is deleted (or retained).
pub const CONTENT_FINALIZER: &str =
    "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
/// Parameters with this prefix are meant for the snapshotter, not the driver.
pub const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

macro_rules! resource {
    ($ty:ident, $kind:literal, $plural:literal, $scope:ty) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A VolumeSnapshotContent: one snapshot on the storage side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContent {
    pub metadata: ObjectMeta,
    pub spec: ContentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ContentStatus>,
}
resource!(
    VolumeSnapshotContent,
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
    ClusterResourceScope
);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentSpec {
    #[serde(default)]
    pub driver: String,
    /// `Delete` or `Retain`.
    #[serde(default)]
    pub deletion_policy: String,
    #[serde(default)]
    pub source: ContentSource,
    #[serde(default)]
    pub volume_snapshot_ref: SnapshotRef,
    #[serde(default)]
    pub volume_snapshot_class_name: Option<String>,
}

/// Exactly one is set: a volume to snapshot (dynamic), or an existing
/// snapshot (pre-provisioned).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentSource {
    #[serde(default)]
    pub volume_handle: Option<String>,
    #[serde(default)]
    pub snapshot_handle: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRef {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentStatus {
    #[serde(default)]
    pub snapshot_handle: Option<String>,
    /// Nanoseconds since the epoch.
    #[serde(default)]
    pub creation_time: Option<i64>,
    #[serde(default)]
    pub restore_size: Option<i64>,
    #[serde(default)]
    pub ready_to_use: Option<bool>,
}

/// A VolumeSnapshot: a user's request for a snapshot of a claim.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshot {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SnapshotStatus>,
}
resource!(
    VolumeSnapshot,
    "VolumeSnapshot",
    "volumesnapshots",
    NamespaceResourceScope
);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    #[serde(default)]
    pub bound_volume_snapshot_content_name: Option<String>,
    #[serde(default)]
    pub ready_to_use: Option<bool>,
}

/// A VolumeSnapshotClass: parameters for the snapshots of a class.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub parameters: Option<std::collections::BTreeMap<String, String>>,
}
resource!(
    VolumeSnapshotClass,
    "VolumeSnapshotClass",
    "volumesnapshotclasses",
    ClusterResourceScope
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_content_as_the_snapshot_controller_writes_it_parses() {
        let raw = serde_json::json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1", "finalizers": [CONTENT_FINALIZER],
                         "annotations": {ANN_BEING_DELETED: "yes"}},
            "spec": {"driver": "stead.csi.dev", "deletionPolicy": "Delete",
                     "source": {"volumeHandle": "pvc-1"},
                     "sourceVolumeMode": "Filesystem",
                     "volumeSnapshotClassName": "stead",
                     "volumeSnapshotRef": {"kind": "VolumeSnapshot", "name": "s",
                                           "namespace": "default", "uid": "u-1"}},
            "status": {"snapshotHandle": "snapshot-u-1", "creationTime": 1_700_000_000_000_000_000i64,
                       "readyToUse": true, "restoreSize": 1048576}
        });
        let c: VolumeSnapshotContent = serde_json::from_value(raw).unwrap();
        assert_eq!(c.spec.source.volume_handle.as_deref(), Some("pvc-1"));
        assert_eq!(c.spec.volume_snapshot_ref.uid.as_deref(), Some("u-1"));
        let st = c.status.unwrap();
        assert_eq!(st.restore_size, Some(1_048_576));
        assert_eq!(st.ready_to_use, Some(true));
        assert_eq!(
            VolumeSnapshotContent::url_path(&(), None),
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents"
        );
        assert_eq!(
            VolumeSnapshot::url_path(&(), Some("ns")),
            "/apis/snapshot.storage.k8s.io/v1/namespaces/ns/volumesnapshots"
        );
    }
}
