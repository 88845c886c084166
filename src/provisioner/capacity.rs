//! CSIStorageCapacity objects: how much each Stead StorageClass can still
//! get on this node, so that the scheduler places pods only where their
//! claims fit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::class::{self, ClassSpec};
use super::{Ctx, claim, quantity};
use crate::proto::csi::v1::GetCapacityRequest;
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::{DRIVER_NAME, TOPOLOGY_KEY};

const LABEL_DRIVER: &str = "csi.storage.k8s.io/drivername";
const LABEL_NODE: &str = "stead.csi.dev/node";
const FIELD_MANAGER: &str = "stead";

/// FNV-1a: a stable short hash for names that would be too long.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The object's name for (node, class): readable when it fits.
pub fn object_name(node: &str, class: &str) -> String {
    let name = format!("stead-{node}-{class}");
    if name.len() <= 253 {
        name
    } else {
        format!("stead-{:016x}", fnv(&format!("{node}/{class}")))
    }
}

/// Label values are at most 63 characters; long node names are hashed.
pub fn node_label(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        format!("h-{:016x}", fnv(node))
    }
}

/// The object for one class on one node.
pub fn build(
    node: &str,
    class: &ClassSpec,
    namespace: &str,
    available: i64,
    maximum: Option<i64>,
    owner: Option<&OwnerReference>,
) -> CSIStorageCapacity {
    CSIStorageCapacity {
        metadata: ObjectMeta {
            name: Some(object_name(node, &class.name)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL_DRIVER.to_string(), DRIVER_NAME.to_string()),
                (LABEL_NODE.to_string(), node_label(node)),
            ])),
            owner_references: owner.map(|o| vec![o.clone()]),
            ..Default::default()
        },
        capacity: Some(Quantity(quantity::format(available.max(0)))),
        maximum_volume_size: maximum.map(|m| Quantity(quantity::format(m))),
        node_topology: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                TOPOLOGY_KEY.to_string(),
                node.to_string(),
            )])),
            ..Default::default()
        }),
        storage_class_name: class.name.clone(),
    }
}

/// The owner of the capacity objects: the DaemonSet that runs the agent's
/// pod (so that uninstalling Stead removes them), else the pod itself; none
/// when the agent runs outside a pod.
async fn resolve_owner<C>(ctx: &Ctx<C>) -> Option<OwnerReference> {
    let (Some(name), Some(ns)) = (&ctx.config.pod_name, &ctx.config.pod_namespace) else {
        return None;
    };
    let pod = match Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .get(name)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pod = %name, error = %e, "cannot read own pod; capacity objects get no owner");
            return None;
        }
    };
    if let Some(owner) = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
    {
        return Some(OwnerReference {
            controller: None,
            block_owner_deletion: None,
            ..owner.clone()
        });
    }
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: name.clone(),
        uid: pod.uid().unwrap_or_default(),
        ..Default::default()
    })
}

/// Publishes on every change signal, and every `capacity_interval` anyway.
/// Never ends: what fails is logged and tried again next round.
pub(crate) async fn run<C: CsiController>(ctx: Arc<Ctx<C>>) {
    let owner = resolve_owner(&ctx).await;
    let namespace = ctx.config.capacity_namespace.clone();
    let api: Api<CSIStorageCapacity> = Api::namespaced(ctx.client.clone(), &namespace);
    // What was last published, to skip writes that change nothing.
    let mut published: HashMap<String, (i64, Option<i64>)> = HashMap::new();
    let _ = ctx.classes.wait_until_ready().await;
    loop {
        publish(&ctx, &api, &namespace, owner.as_ref(), &mut published).await;
        tokio::select! {
            _ = ctx.capacity_changed.notified() => {
                // Let a burst of provisioning settle into one update.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ = tokio::time::sleep(ctx.config.capacity_interval) => {}
        }
    }
}

async fn publish<C: CsiController>(
    ctx: &Ctx<C>,
    api: &Api<CSIStorageCapacity>,
    namespace: &str,
    owner: Option<&OwnerReference>,
    published: &mut HashMap<String, (i64, Option<i64>)>,
) {
    let node = &ctx.config.node;
    let mut wanted = Vec::new();
    for sc in ctx.classes.state() {
        if !class::is_stead(&sc) {
            continue;
        }
        // A broken class has no capacity to offer; its claims get the error.
        let Ok(spec) = class::parse(&sc) else {
            continue;
        };
        let req = GetCapacityRequest {
            parameters: spec.csi_parameters().into_iter().collect(),
            accessible_topology: Some(claim::node_topology(node)),
            ..Default::default()
        };
        let resp = match ctx.csi.get_capacity(tonic::Request::new(req)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                tracing::warn!(class = %spec.name, error = %s.message(), "GetCapacity failed");
                continue;
            }
        };
        let name = object_name(node, &spec.name);
        wanted.push(name.clone());
        let value = (resp.available_capacity, resp.maximum_volume_size);
        if published.get(&name) == Some(&value) {
            continue;
        }
        let obj = build(node, &spec, namespace, value.0, value.1, owner);
        // One class failing must not keep the others from being published.
        match api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(class = %spec.name, available = value.0, "capacity published");
                published.insert(name, value);
            }
            Err(e) => {
                tracing::warn!(class = %spec.name, object = %name, namespace, error = %e, "publishing capacity failed");
                published.remove(&name);
            }
        }
    }
    // Objects of classes that are gone (or no longer Stead's) go too.
    let mine = ListParams::default().labels(&format!(
        "{LABEL_DRIVER}={DRIVER_NAME},{LABEL_NODE}={}",
        node_label(node)
    ));
    let listed = match api.list(&mine).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(namespace, error = %e, "cannot list this node's capacity objects");
            return;
        }
    };
    for obj in listed {
        let name = obj.name_any();
        if !wanted.contains(&name) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(object = %name, namespace, error = %e, "cannot delete capacity object of a class that is gone");
                    continue;
                }
            }
            published.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::class::tests::class as sc;

    #[test]
    fn capacity_object_selects_this_node_and_names_the_class() {
        let spec = class::parse(&sc(
            "stead",
            &[("pool", "image")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        let obj = build(
            "node-a",
            &spec,
            "stead-system",
            5 << 30,
            Some(4 << 30),
            None,
        );
        assert_eq!(obj.metadata.name.as_deref(), Some("stead-node-a-stead"));
        assert_eq!(obj.storage_class_name, "stead");
        assert_eq!(obj.capacity.unwrap().0, "5Gi");
        assert_eq!(obj.maximum_volume_size.unwrap().0, "4Gi");
        let sel = obj.node_topology.unwrap().match_labels.unwrap();
        assert_eq!(sel[TOPOLOGY_KEY], "node-a");
        assert_eq!(obj.metadata.labels.unwrap()[LABEL_DRIVER], DRIVER_NAME);
    }

    #[test]
    fn long_names_are_hashed_to_fit() {
        let node = "n".repeat(200);
        let class = "c".repeat(100);
        let name = object_name(&node, &class);
        assert!(name.len() <= 253 && name.starts_with("stead-"));
        assert_eq!(name, object_name(&node, &class));
        assert!(node_label(&node).len() <= 63);
    }
}
