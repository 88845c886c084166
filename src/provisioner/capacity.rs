//! CSIStorageCapacity objects: how much each Stead StorageClass can still
//! get on this node, so that the scheduler places pods only where their
//! claims fit.
//!
//! Each object is a lease: the agent that publishes it renews it (every
//! [`RENEW_INTERVALS`] capacity intervals, even when nothing changed) and
//! writes in it, as `stead.csi.dev/stale-after`, when it may be taken for
//! abandoned. Every agent collects the abandoned objects of nodes that have
//! no Node object any more, so that a deleted node's capacity does not
//! mislead the scheduler. The lease, not the Node alone, decides: an agent
//! may run (and publish) before its Node object exists, or for a node that
//! has none at all (the provision suite's ghost agents), and an object it
//! keeps renewing is never collected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::class::{self, ClassSpec};
use super::scope::{fnv, node_label, selector};
use super::{Ctx, claim, quantity};
use crate::proto::csi::v1::GetCapacityRequest;
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::{DRIVER_NAME, NODE_LABEL, TOPOLOGY_KEY};

pub(crate) const LABEL_DRIVER: &str = "csi.storage.k8s.io/drivername";
const FIELD_MANAGER: &str = "stead";
/// When the object may be taken for abandoned if not renewed (RFC 3339).
pub const ANN_STALE_AFTER: &str = "stead.csi.dev/stale-after";
/// An unchanged object is re-published after this many capacity intervals.
pub const RENEW_INTERVALS: u32 = 5;
/// The lease lasts this many renewals: an agent may miss two and a bit
/// (a slow apiserver, a restart) without losing its objects.
pub const LEASE_RENEWALS: u32 = 3;
/// Objects written before leases existed (no stale-after) count as
/// abandoned this long after their last write.
pub const LEGACY_GRACE: Duration = Duration::from_secs(3600);
/// After a change, the next update waits this long after the last one: a
/// burst of claims makes one update per pool and class every so often, not
/// one per claim. The scheduler reads a capacity at most this much older
/// than the pool's; a claim it places on a node that just filled up is
/// refused by that node's agent (it checks the pool itself) and placed again.
pub const COALESCE: Duration = Duration::from_secs(2);

/// The object's name for (node, class): readable when it fits.
pub fn object_name(node: &str, class: &str) -> String {
    let name = format!("stead-{node}-{class}");
    if name.len() <= 253 {
        name
    } else {
        format!("stead-{:016x}", fnv(&format!("{node}/{class}")))
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
    stale_after: Timestamp,
) -> CSIStorageCapacity {
    CSIStorageCapacity {
        metadata: ObjectMeta {
            name: Some(object_name(node, &class.name)),
            namespace: Some(namespace.to_string()),
            annotations: Some(BTreeMap::from([(
                ANN_STALE_AFTER.to_string(),
                stale_after.to_string(),
            )])),
            labels: Some(BTreeMap::from([
                (LABEL_DRIVER.to_string(), DRIVER_NAME.to_string()),
                (NODE_LABEL.to_string(), node_label(node)),
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
    // What was last published (and when), to skip writes that change
    // nothing until the lease needs renewing.
    let mut published: HashMap<String, Published> = HashMap::new();
    // Collecting lists every Stead object of the namespace: once a renewal
    // period is enough (leases are not finer than that), not at every change.
    let collect_every = ctx.config.capacity_interval * RENEW_INTERVALS;
    let mut collected: Option<tokio::time::Instant> = None;
    // The objects of this node's that the last round listed (to delete those
    // of classes gone): listed again only when the set of classes changes
    // or at each collection, not at every round.
    let mut listed_for: Option<Vec<String>> = None;
    let _ = ctx.classes.wait_until_ready().await;
    loop {
        let round = tokio::time::Instant::now();
        let collect = collected.is_none_or(|t| t.elapsed() >= collect_every);
        if collect {
            listed_for = None;
        }
        publish(
            &ctx,
            &api,
            &namespace,
            owner.as_ref(),
            &mut published,
            &mut listed_for,
        )
        .await;
        if collect {
            collect_abandoned(&ctx, &api).await;
            collected = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            _ = ctx.capacity_changed.notified() => {
                // A burst of provisioning settles into one update per
                // COALESCE (and a lone change waits a quarter second).
                let next = (round + COALESCE).max(tokio::time::Instant::now() + Duration::from_millis(250));
                tokio::time::sleep_until(next).await;
            }
            _ = tokio::time::sleep(ctx.config.capacity_interval) => {}
        }
    }
}

/// What one object was last published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Published {
    available: i64,
    maximum: Option<i64>,
    at: tokio::time::Instant,
}

/// The node an object of Stead's is for: its nodeTopology's value of the
/// topology key (the label may be a hash of a long name).
fn object_node(obj: &CSIStorageCapacity) -> Option<&str> {
    let labels = obj.metadata.labels.as_ref()?;
    if labels.get(LABEL_DRIVER).map(String::as_str) != Some(DRIVER_NAME) {
        return None;
    }
    obj.node_topology
        .as_ref()?
        .match_labels
        .as_ref()?
        .get(TOPOLOGY_KEY)
        .map(String::as_str)
}

/// When `obj` may be taken for abandoned: its lease, or for an object
/// written before leases, its last write plus [`LEGACY_GRACE`]. `None`
/// when it cannot be told (then it is never taken for abandoned).
fn stale_after(obj: &CSIStorageCapacity) -> Option<Timestamp> {
    if let Some(raw) = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_STALE_AFTER))
    {
        return raw.parse().ok();
    }
    let last_write = obj
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .chain(obj.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .max()?;
    last_write
        .checked_add(SignedDuration::try_from(LEGACY_GRACE).ok()?)
        .ok()
}

/// The nodes whose Node object must be looked up before any object is
/// collected: those of abandoned objects of other nodes.
pub fn nodes_to_check<'a>(
    objects: &'a [CSIStorageCapacity],
    own_node: &str,
    now: Timestamp,
) -> HashSet<&'a str> {
    objects
        .iter()
        .filter_map(|o| abandoned_node(o, own_node, now))
        .collect()
}

fn abandoned_node<'a>(
    obj: &'a CSIStorageCapacity,
    own_node: &str,
    now: Timestamp,
) -> Option<&'a str> {
    let node = object_node(obj)?;
    if node == own_node {
        return None;
    }
    (stale_after(obj)? < now).then_some(node)
}

/// The objects to delete: Stead's, of another node than this agent's, not
/// renewed within their lease, and of a node with no Node object (`gone`:
/// the nodes found missing, never the ones that could not be looked up).
pub fn abandoned<'a>(
    objects: &'a [CSIStorageCapacity],
    own_node: &str,
    now: Timestamp,
    gone: &HashSet<String>,
) -> Vec<&'a CSIStorageCapacity> {
    objects
        .iter()
        .filter(|o| abandoned_node(o, own_node, now).is_some_and(|n| gone.contains(n)))
        .collect()
}

/// Deletes the abandoned capacity objects of deleted nodes (see the module
/// comment). Failures are logged; the next round tries again.
async fn collect_abandoned<C>(ctx: &Ctx<C>, api: &Api<CSIStorageCapacity>) {
    let all = ListParams::default().labels(&format!("{LABEL_DRIVER}={DRIVER_NAME}"));
    let objects = match api.list(&all).await {
        Ok(l) => l.items,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list capacity objects to collect abandoned ones");
            return;
        }
    };
    // The nodes that publish Stead's capacity: how many take turns there
    // are for an Immediate claim (`take_slots`).
    let publishing: HashSet<&str> = objects.iter().filter_map(object_node).collect();
    ctx.stead_nodes.store(
        publishing.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let now = Timestamp::now();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut gone = HashSet::new();
    for node in nodes_to_check(&objects, &ctx.config.node, now) {
        match nodes.get_metadata_opt(node).await {
            Ok(None) => {
                gone.insert(node.to_string());
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::warn!(node, error = %e, "cannot tell whether node exists; its capacity objects stay")
            }
        }
    }
    for obj in abandoned(&objects, &ctx.config.node, now, &gone) {
        let name = obj.name_any();
        // The resourceVersion makes the delete fail should the object's
        // agent have renewed it since the list.
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: obj.resource_version(),
                uid: obj.uid(),
            }),
            ..Default::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => tracing::info!(
                object = %name,
                node = object_node(obj).unwrap_or_default(),
                "deleted capacity object of a node that no longer exists"
            ),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "cannot delete abandoned capacity object")
            }
        }
    }
}

async fn publish<C: CsiController>(
    ctx: &Ctx<C>,
    api: &Api<CSIStorageCapacity>,
    namespace: &str,
    owner: Option<&OwnerReference>,
    published: &mut HashMap<String, Published>,
    listed_for: &mut Option<Vec<String>>,
) {
    let node = &ctx.config.node;
    let renew_every = ctx.config.capacity_interval * RENEW_INTERVALS;
    let now = tokio::time::Instant::now();
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
        if published.get(&name).is_some_and(|p| {
            (p.available, p.maximum) == value && now.duration_since(p.at) < renew_every
        }) {
            continue;
        }
        let lease =
            SignedDuration::try_from(renew_every * LEASE_RENEWALS).unwrap_or(SignedDuration::MAX);
        let stale_after = Timestamp::from_second(Timestamp::now().as_second())
            .ok()
            .and_then(|t| t.checked_add(lease).ok())
            .unwrap_or(Timestamp::MAX);
        let obj = build(node, &spec, namespace, value.0, value.1, owner, stale_after);
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
                published.insert(
                    name,
                    Published {
                        available: value.0,
                        maximum: value.1,
                        at: now,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(class = %spec.name, object = %name, namespace, error = %e, "publishing capacity failed");
                published.remove(&name);
            }
        }
    }
    // Objects of classes that are gone (or no longer Stead's) go too: looked
    // for when the classes changed since the last look.
    wanted.sort();
    if listed_for.as_ref() == Some(&wanted) {
        return;
    }
    let mine =
        ListParams::default().labels(&format!("{LABEL_DRIVER}={DRIVER_NAME},{}", selector(node)));
    let listed = match api.list(&mine).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(namespace, error = %e, "cannot list this node's capacity objects");
            return;
        }
    };
    let mut all_done = true;
    for obj in listed {
        let name = obj.name_any();
        if !wanted.contains(&name) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(object = %name, namespace, error = %e, "cannot delete capacity object of a class that is gone");
                    all_done = false;
                    continue;
                }
            }
            published.remove(&name);
        }
    }
    // A delete that failed is tried again next round.
    *listed_for = all_done.then_some(wanted);
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
            Timestamp::UNIX_EPOCH,
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

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    const NOW: i64 = 1_700_000_000;

    /// The object an agent of `node` published, with its lease ending at
    /// `stale_after` (seconds).
    fn published(node: &str, stale_after: i64) -> CSIStorageCapacity {
        let spec = class::parse(&sc("stead", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        build(
            node,
            &spec,
            "stead-system",
            1 << 30,
            None,
            None,
            at(stale_after),
        )
    }

    fn gone(nodes: &[&str]) -> HashSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    fn names(objs: Vec<&CSIStorageCapacity>) -> Vec<String> {
        objs.into_iter().map(|o| o.name_any()).collect()
    }

    #[test]
    fn objects_of_a_deleted_node_past_their_lease_are_collected() {
        let objs = [published("deleted-node", NOW - 1)];
        let check = nodes_to_check(&objs, "node-a", at(NOW));
        assert_eq!(check, HashSet::from(["deleted-node"]));
        let doomed = abandoned(&objs, "node-a", at(NOW), &gone(&["deleted-node"]));
        assert_eq!(names(doomed), ["stead-deleted-node-stead"]);
    }

    #[test]
    fn objects_of_a_node_without_node_object_that_its_agent_renews_are_kept() {
        // The provision suite's ghost agents, or an agent whose Node object
        // is not created yet: no Node, but a live lease.
        let objs = [published("stead-ghost-a", NOW + 60)];
        assert!(nodes_to_check(&objs, "node-a", at(NOW)).is_empty());
        assert!(abandoned(&objs, "node-a", at(NOW), &gone(&["stead-ghost-a"])).is_empty());
    }

    #[test]
    fn objects_of_an_existing_node_are_kept_however_stale() {
        let objs = [published("node-b", NOW - 86_400)];
        // Looked up, and found: not in `gone`.
        assert!(abandoned(&objs, "node-a", at(NOW), &gone(&[])).is_empty());
    }

    #[test]
    fn own_node_objects_are_never_collected_nor_looked_up() {
        let objs = [published("node-a", NOW - 86_400)];
        assert!(nodes_to_check(&objs, "node-a", at(NOW)).is_empty());
        assert!(abandoned(&objs, "node-a", at(NOW), &gone(&["node-a"])).is_empty());
    }

    #[test]
    fn objects_without_a_lease_count_as_abandoned_an_hour_after_their_last_write() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let mut old = published("deleted-old", 0);
        old.metadata.annotations = None;
        old.metadata.creation_timestamp = Some(Time(at(NOW - 7200)));
        let mut recent = published("deleted-recent", 0);
        recent.metadata.annotations = None;
        recent.metadata.creation_timestamp = Some(Time(at(NOW - 600)));
        let mut unknown = published("deleted-unknown", 0);
        unknown.metadata.annotations = None;
        let mut garbled = published("deleted-garbled", 0);
        garbled
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANN_STALE_AFTER.into(), "yesterday".into());
        let objs = [old, recent, unknown, garbled];
        let all_gone = gone(&[
            "deleted-old",
            "deleted-recent",
            "deleted-unknown",
            "deleted-garbled",
        ]);
        assert_eq!(
            names(abandoned(&objs, "node-a", at(NOW), &all_gone)),
            ["stead-deleted-old-stead"],
            "an object whose age cannot be told is kept"
        );
    }

    #[test]
    fn objects_of_other_drivers_are_never_collected() {
        let mut other = published("deleted-node", NOW - 1);
        other
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_DRIVER.into(), "hostpath.csi.k8s.io".into());
        let objs = [other];
        assert!(abandoned(&objs, "node-a", at(NOW), &gone(&["deleted-node"])).is_empty());
    }

    #[test]
    fn the_lease_is_written_in_the_object() {
        let obj = published("node-a", NOW);
        assert_eq!(stale_after(&obj), Some(at(NOW)));
    }
}
