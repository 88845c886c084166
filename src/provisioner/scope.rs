//! The node scope of an agent's PersistentVolumes: each PV Stead makes
//! carries [`NODE_LABEL`] with its node ([`node_label`]), and each agent
//! watches only the PVs of its own node ([`pv_watch`]), not every PV of the
//! cluster.
//!
//! PVs made before that label existed have none. An agent finds its own
//! once, at start, by the node their node affinity pins them to, and labels
//! them ([`label_legacy_pvs`]) before anything that reads its PV store runs:
//! the reclaimer, the leak reaper, the claims controller (whose "a PV of
//! that name exists" is read there), the snapshotter, the stranded-pod
//! check and expansion. [`pv_watch`] takes the proof that the labelling
//! finished ([`Labelled`]), so that no PV watch can start without it.
//!
//! None of those deletes a volume for want of its PV in the store (the
//! reclaimer acts on a PV it holds, Released or deleted; the reaper asks the
//! apiserver, see `reclaim::reap_leaks`), so a PV missing from the watch
//! costs features, never data; the labelling keeps the features.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::{Error, pv};
use crate::NODE_LABEL;

/// PVs read per page while looking for unlabelled ones.
const PAGE: u32 = 250;

/// FNV-1a: a stable short hash for names and label values that would be too
/// long.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The value of [`NODE_LABEL`] for `node`: its name, or a hash of a name
/// longer than the 63 characters a label value may have.
pub fn node_label(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        format!("h-{:016x}", fnv(node))
    }
}

/// The label selector of the objects of `node`.
pub fn selector(node: &str) -> String {
    format!("{NODE_LABEL}={}", node_label(node))
}

/// Whether `found` is a Stead PV of `node` that lacks its node's label: one
/// an earlier version made, which this node's PV watch would not see.
pub fn needs_label(found: &PersistentVolume, node: &str) -> bool {
    pv::stead_volume_handle(found).is_some()
        && pv::pv_node(found) == Some(node)
        && found.labels().get(NODE_LABEL) != Some(&node_label(node))
}

/// That [`label_legacy_pvs`] finished: every PV of this node carries its
/// label, so the label-selected watch holds all of them.
#[derive(Debug)]
pub(crate) struct Labelled(());

/// Labels the PVs of `node` that have no [`NODE_LABEL`] (made by an earlier
/// version), reading every unlabelled PV of the cluster page by page; the
/// number labelled. Any failure fails it: the provisioner does not start on
/// a store that might lack a PV of its node (the supervisor tries again).
pub(crate) async fn label_legacy_pvs(client: &Client, node: &str) -> Result<Labelled, Error> {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let mut params = ListParams::default()
        .labels(&format!("!{NODE_LABEL}"))
        .limit(PAGE);
    let mut labelled = 0usize;
    loop {
        let page = api.list(&params).await.map_err(|source| Error::LegacyPvs {
            step: format!("listing the PVs without label {NODE_LABEL}"),
            source,
        })?;
        for found in page.items.iter().filter(|p| needs_label(p, node)) {
            let name = found.name_any();
            let patch = json!({"metadata": {"labels": {NODE_LABEL: node_label(node)}}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    labelled += 1;
                    tracing::info!(pv = %name, node, "labelled a PV of this node made before PVs carried their node's label");
                }
                // Deleted since the list: nothing left to watch.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(Error::LegacyPvs {
                        step: format!("labelling PV {name} with {NODE_LABEL}={node}"),
                        source,
                    });
                }
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    if labelled > 0 {
        tracing::info!(
            node,
            labelled,
            "labelled this node's PVs made by an earlier version"
        );
    }
    Ok(Labelled(()))
}

/// The watch of this node's PVs, by label; only once they are all
/// labelled.
pub(crate) fn pv_watch(_: &Labelled, node: &str) -> watcher::Config {
    watcher::Config::default().labels(&selector(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;
    use crate::provisioner::tests::{Answer, NODE, fake_client};
    use std::sync::Arc;

    /// The PV of claim `name` (uid `uid-<name>`) on `node`, as this
    /// version makes it.
    fn made(name: &str, node: &str) -> PersistentVolume {
        let mut claim = pvc(name, "16Mi", Some(node));
        claim.metadata.uid = Some(format!("uid-{name}"));
        pv::tests::made_for(&claim, node)
    }

    /// The same PV as an earlier version made it: no node label.
    fn legacy(name: &str, node: &str) -> PersistentVolume {
        let mut p = made(name, node);
        p.metadata.labels = None;
        p
    }

    #[test]
    fn only_this_nodes_stead_pvs_without_their_label_need_it() {
        assert!(needs_label(&legacy("a", NODE), NODE));
        assert!(!needs_label(&made("a", NODE), NODE), "labelled already");
        assert!(!needs_label(&legacy("a", "node-b"), NODE), "another node's");
        let mut other_driver = legacy("a", NODE);
        other_driver
            .spec
            .as_mut()
            .unwrap()
            .csi
            .as_mut()
            .unwrap()
            .driver = "other.csi".into();
        assert!(!needs_label(&other_driver, NODE), "another driver's");
        let mut loose = legacy("a", NODE);
        loose.spec.as_mut().unwrap().node_affinity = None;
        assert!(
            !needs_label(&loose, NODE),
            "pinned to no node: not ours to claim"
        );
    }

    #[test]
    fn long_node_names_are_hashed_to_a_label_value() {
        assert_eq!(node_label("node-a"), "node-a");
        assert_eq!(selector("node-a"), "stead.csi.dev/node=node-a");
        let long = "n".repeat(200);
        assert!(node_label(&long).len() <= 63);
        assert_eq!(node_label(&long), node_label(&long));
        let mut p = made("a", &long);
        assert!(!needs_label(&p, &long), "made with the hashed value");
        p.metadata.labels = None;
        assert!(needs_label(&p, &long));
    }

    /// An apiserver whose unlabelled PVs are `pages` (one list page each,
    /// chained by continue tokens).
    fn unlabelled(pages: Vec<Vec<PersistentVolume>>) -> Answer {
        Arc::new(move |method: &http::Method, path: &str, query: &str| {
            if method != http::Method::GET || path != "/api/v1/persistentvolumes" {
                return None;
            }
            assert!(
                query.contains("labelSelector=%21stead.csi.dev%2Fnode"),
                "lists only the unlabelled PVs: {query}"
            );
            let n = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("continue=page-"))
                .map_or(0, |n| n.parse::<usize>().unwrap());
            let next = (n + 1 < pages.len()).then(|| format!("page-{}", n + 1));
            let list = json!({
                "apiVersion": "v1", "kind": "PersistentVolumeList",
                "metadata": {"continue": next},
                "items": pages[n],
            });
            Some((200, list.to_string()))
        })
    }

    #[tokio::test]
    async fn legacy_pvs_of_this_node_are_labelled_on_every_page_and_no_other() {
        let (client, seen) = fake_client(Some(unlabelled(vec![
            vec![legacy("a", NODE), legacy("b", "node-b")],
            vec![legacy("c", NODE)],
        ])));
        let labelled = label_legacy_pvs(&client, NODE).await.unwrap();
        let config = pv_watch(&labelled, NODE);
        assert_eq!(
            config.label_selector.as_deref(),
            Some("stead.csi.dev/node=node-a")
        );
        let seen = seen.lock().unwrap();
        let patched: Vec<_> = seen.iter().filter(|r| r.method == "PATCH").collect();
        assert_eq!(
            patched.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            [
                "/api/v1/persistentvolumes/pvc-uid-a",
                "/api/v1/persistentvolumes/pvc-uid-c"
            ],
            "{seen:?}"
        );
        for p in patched {
            assert_eq!(
                p.body,
                r#"{"metadata":{"labels":{"stead.csi.dev/node":"node-a"}}}"#
            );
        }
        assert_eq!(
            seen.iter().filter(|r| r.method == "GET").count(),
            2,
            "both pages read: {seen:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_labelling_fails_the_start_naming_the_pv() {
        let refuse: Answer = Arc::new(|method: &http::Method, path: &str, query: &str| {
            if *method == http::Method::PATCH {
                return Some((
                    403,
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"denied","reason":"Forbidden","code":403}"#.into(),
                ));
            }
            unlabelled(vec![vec![legacy("a", NODE)]])(method, path, query)
        });
        let (client, _) = fake_client(Some(refuse));
        let err = label_legacy_pvs(&client, NODE).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("labelling PV pvc-uid-a with stead.csi.dev/node=node-a: "),
            "{err}"
        );
    }
}
