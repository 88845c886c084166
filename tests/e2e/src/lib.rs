//! Shared helpers of Stead's cluster suites: a client from KUBECONFIG, a
//! namespace per scenario, waits with a deadline that say what they awaited,
//! exec into pods, a look at the node's disk, the agent's pods, a timeline
//! of pod events, and the manifests of `deploy/examples`.
//!
//! The suites take whatever cluster KUBECONFIG points to, with Stead
//! installed from `deploy/` (`make e2e` does both on the local cluster,
//! `tests/e2e/kind.sh` on kind).
#![forbid(unsafe_code)]

pub mod bench;

use std::{
    collections::HashMap,
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::DaemonSet,
        core::v1::{Event, Namespace, PersistentVolume, PersistentVolumeClaim, Pod},
        storage::v1::StorageClass,
    },
    serde::{Deserialize, Serialize, de::DeserializeOwned},
};
use kube::{
    Client, Resource, ResourceExt,
    api::{Api, AttachParams, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{wait::await_condition, watcher},
};
use serde_json::json;
use tokio::{io::AsyncReadExt, task::JoinHandle};

/// The CSI driver and provisioner name.
pub const DRIVER: &str = "stead.csi.dev";
/// The topology key of Stead's PVs: its value is the node's name.
pub const TOPOLOGY_KEY: &str = "topology.stead.csi.dev/node";
/// Where `deploy/` installs Stead.
pub const STEAD_NAMESPACE: &str = "stead-system";
/// The agent's DaemonSet.
pub const AGENT_DAEMONSET: &str = "stead-node";
/// The labels of the agent's pods.
pub const AGENT_LABELS: &str = "app.kubernetes.io/name=stead,app.kubernetes.io/component=node";

/// From a claim to a Ready pod: scheduling, provisioning, mkfs, mount.
pub const POD_READY: Duration = Duration::from_secs(120);
/// For a pod, claim or volume to go away.
pub const GONE: Duration = Duration::from_secs(120);

/// Prints a step of a scenario (shown with `--nocapture`, as `make e2e`
/// runs the suites, and above a failure's message otherwise).
pub fn step(what: &str) {
    eprintln!("[e2e] {what}");
}

/// A random token of 32 hex digits, for a test to write and read back.
pub fn token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let half = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

/// The pool a StorageClass of Stead's puts its volumes in.
pub async fn pool_of(client: &Client, class: &str) -> String {
    let sc = Api::<StorageClass>::all(client.clone())
        .get(class)
        .await
        .unwrap_or_else(|e| panic!("reading StorageClass {class}: {e}"));
    sc.parameters
        .and_then(|p| p.get("pool").cloned())
        .unwrap_or_else(|| panic!("StorageClass {class} has no pool parameter"))
}

/// The busybox image the test pods run: one the cluster already has
/// (`STEAD_BUSYBOX_IMAGE`, which the local cluster's env file sets; by default
/// `localhost/busybox:stead`, which it imports and kind.sh loads).
pub fn busybox_image() -> String {
    std::env::var("STEAD_BUSYBOX_IMAGE").unwrap_or_else(|_| "localhost/busybox:stead".into())
}

/// A client for the cluster KUBECONFIG names.
pub async fn client() -> Client {
    Client::try_default().await.unwrap_or_else(|e| {
        panic!("no Kubernetes client ({e}): run through `make e2e`, or export KUBECONFIG")
    })
}

/// A namespace of its own for one scenario. `finish` deletes it and waits
/// until it is gone (with its claims, so their Delete-policy volumes too); if
/// the scenario panics first, dropping it still deletes the namespace.
pub struct Scenario {
    pub client: Client,
    pub ns: String,
    finished: bool,
}

impl Scenario {
    pub async fn new(name: &str) -> Self {
        let client = client().await;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let ns = format!("e2e-{name}-{:05x}", nanos >> 12);
        let obj: Namespace = from_json(json!({
            "metadata": { "name": ns, "labels": { "stead.csi.dev/e2e": name } }
        }));
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {ns}: {e}"));
        Scenario {
            client,
            ns,
            finished: false,
        }
    }

    /// An API of a namespaced kind in this scenario's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Deletes the namespace and waits until it is gone.
    pub async fn finish(mut self) {
        self.finished = true;
        let_retained_volumes_go(&self.client, &self.ns).await;
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let uid = delete(&namespaces, &self.ns).await;
        if let Some(uid) = uid {
            wait_deleted(&namespaces, &self.ns, &uid, "the scenario's namespace").await;
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // A failed scenario: delete its namespace so the next run starts
        // clean. The test's runtime is unwinding, so this runs on a runtime
        // (and a client) of its own.
        let ns = self.ns.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime for cleanup");
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let_retained_volumes_go(&client, &ns).await;
                    let _ = Api::<Namespace>::all(client)
                        .delete(&ns, &DeleteParams::background())
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Turns the Retain PVs of the namespace's claims to Delete, so that a
/// scenario leaves no volume behind even when it failed half-way.
async fn let_retained_volumes_go(client: &Client, ns: &str) {
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let Ok(list) = pvs.list(&ListParams::default()).await else {
        return;
    };
    for pv in list.items {
        let spec = pv.spec.as_ref();
        let ours = spec
            .and_then(|s| s.claim_ref.as_ref())
            .is_some_and(|c| c.namespace.as_deref() == Some(ns));
        let retained =
            spec.and_then(|s| s.persistent_volume_reclaim_policy.as_deref()) == Some("Retain");
        if ours && retained {
            let patch = json!({ "spec": { "persistentVolumeReclaimPolicy": "Delete" } });
            let _ = pvs
                .patch(
                    &pv.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await;
        }
    }
}

/// Builds a Kubernetes object from JSON.
pub fn from_json<K: DeserializeOwned>(value: serde_json::Value) -> K {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("malformed test object: {e}"))
}

/// The object of kind `kind` in `deploy/examples/<file>`.
pub fn example<K: DeserializeOwned>(file: &str, kind: &str) -> K {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/examples")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        if value["kind"] == kind {
            return serde_json::from_value(value)
                .unwrap_or_else(|e| panic!("the {kind} in {}: {e}", path.display()));
        }
    }
    panic!("{} has no {kind}", path.display());
}

/// Waits until `cond` holds for the object `name` (`None`: it does not
/// exist), at most `within`. On timeout, panics saying what was awaited,
/// with the object's last status and its events.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    within: Duration,
    cond: impl Fn(Option<&K>) -> bool + Send + 'static,
) -> Option<K>
where
    K: Clone + Debug + Send + Serialize + DeserializeOwned + Resource + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    match tokio::time::timeout(within, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(obj)) => obj,
        Ok(Err(e)) => panic!("watching {kind} {name} while waiting for {what}: {e}"),
        Err(_) => {
            let status = match api.get_opt(name).await {
                Ok(Some(obj)) => serde_json::to_value(&obj)
                    .map(|v| v["status"].to_string())
                    .unwrap_or_default(),
                Ok(None) => "it does not exist".into(),
                Err(e) => format!("cannot read it: {e}"),
            };
            let events = events_of(&api.clone().into_client(), name).await;
            panic!(
                "timed out after {within:?} waiting for {what} ({kind} {name}).\n\
                 Last status: {status}\nEvents:\n{events}"
            )
        }
    }
}

/// Polls `check` until it passes, at most `within`; on timeout panics with
/// what was awaited and the last reason `check` gave. For conditions with
/// no watch to follow (files on a node's disk, an agent's log): the
/// condition is what ends the wait, the 200 ms between looks only bounds
/// its cost.
pub async fn poll_until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let why = match check() {
            Ok(()) => return,
            Err(why) => why,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}: {why}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`poll_until`] for a check that asks the apiserver (an object list with
/// no watch worth keeping, such as events or capacity objects): returns what
/// the passing check gave.
pub async fn poll_until_async<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        let why = match check().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}: {why}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (at most `within`) for an event on objects named `name` whose
/// reason is `reason` and whose text contains every one of `words`; returns
/// the events seen.
pub async fn wait_event(
    client: &Client,
    name: &str,
    reason: &str,
    words: &[&str],
    within: Duration,
) -> String {
    poll_until_async(
        &format!("a {reason} event on {name} mentioning {words:?}"),
        within,
        || async {
            let seen = events_of(client, name).await;
            if seen
                .lines()
                .any(|l| l.contains(reason) && words.iter().all(|w| l.contains(w)))
            {
                Ok(seen)
            } else {
                Err(format!("events:\n{seen}"))
            }
        },
    )
    .await
}

/// The events about objects named `name`, one per line, oldest first.
pub async fn events_of(client: &Client, name: &str) -> String {
    let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
    match Api::<Event>::all(client.clone()).list(&lp).await {
        Ok(list) => {
            let mut events = list.items;
            events.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
            events
                .iter()
                .map(|e| {
                    format!(
                        "  {} {}: {}",
                        e.type_.as_deref().unwrap_or(""),
                        e.reason.as_deref().unwrap_or(""),
                        e.message.as_deref().unwrap_or("").trim()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (cannot list events: {e})"),
    }
}

/// Deletes `name` if it exists; returns the uid it had.
pub async fn delete<K>(api: &Api<K>, name: &str) -> Option<String>
where
    K: Clone + Debug + DeserializeOwned + Resource,
{
    let obj = api
        .get_opt(name)
        .await
        .unwrap_or_else(|e| panic!("reading {name}: {e}"))?;
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return None,
        Err(e) => panic!("deleting {name}: {e}"),
    }
    obj.uid()
}

/// Waits until the object `name` with this `uid` is gone (a new object of
/// the same name does not count as it).
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: &str, what: &str)
where
    K: Clone + Debug + Send + Serialize + DeserializeOwned + Resource + 'static,
    K::DynamicType: Default,
{
    let uid = uid.to_owned();
    wait_for(api, name, &format!("{what} to be gone"), GONE, move |o| {
        o.is_none_or(|o| o.uid().as_deref() != Some(uid.as_str()))
    })
    .await;
}

/// Whether the pod is Ready and not terminating.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the pod `name` is Ready.
pub async fn wait_ready(pods: &Api<Pod>, name: &str) -> Pod {
    wait_for(
        pods,
        name,
        &format!("pod {name} to be Ready"),
        POD_READY,
        |p| p.is_some_and(is_ready),
    )
    .await
    .expect("a Ready pod exists")
}

/// Waits until a pod `name` other than the one with `old_uid` is Ready.
pub async fn wait_replaced(pods: &Api<Pod>, name: &str, old_uid: &str) -> Pod {
    let old = old_uid.to_owned();
    let what = format!("pod {name} to come back Ready as a new pod");
    wait_for(pods, name, &what, POD_READY, move |p| {
        p.is_some_and(|p| is_ready(p) && p.uid().as_deref() != Some(old.as_str()))
    })
    .await
    .expect("a Ready pod exists")
}

/// The claim `name`, once Bound.
pub async fn wait_bound(pvcs: &Api<PersistentVolumeClaim>, name: &str) -> PersistentVolumeClaim {
    wait_for(
        pvcs,
        name,
        &format!("claim {name} to be Bound"),
        POD_READY,
        |c| {
            c.and_then(|c| c.status.as_ref())
                .is_some_and(|s| s.phase.as_deref() == Some("Bound"))
        },
    )
    .await
    .expect("a Bound claim exists")
}

/// The PV a Bound claim is bound to.
pub async fn volume_of(client: &Client, pvc: &PersistentVolumeClaim) -> PersistentVolume {
    let name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_else(|| panic!("claim {} has no volumeName", pvc.name_any()));
    Api::<PersistentVolume>::all(client.clone())
        .get(&name)
        .await
        .unwrap_or_else(|e| panic!("reading PV {name} of claim {}: {e}", pvc.name_any()))
}

/// Bytes of a quantity such as `500Mi` or `524288000`.
pub fn quantity_bytes(q: &str) -> u64 {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    let mult = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => panic!("unexpected unit in quantity {q}"),
    };
    n * mult
}

/// The node a Stead PV is pinned to by its required node affinity.
pub fn pinned_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let [term] = terms.as_slice() else {
        return None;
    };
    let exprs = term.match_expressions.as_ref()?;
    let [expr] = exprs.as_slice() else {
        return None;
    };
    match expr.values.as_deref() {
        Some([node]) if expr.key == TOPOLOGY_KEY && expr.operator == "In" => Some(node.clone()),
        _ => None,
    }
}

/// The CSI volume handle of a Stead PV.
pub fn volume_handle(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .unwrap_or_else(|| panic!("PV {} has no csi source", pv.name_any()))
}

/// The node a pod runs on.
pub fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| panic!("pod {} is not scheduled", pod.name_any()))
}

/// Runs `sh -c script` in the pod's first container and returns its standard
/// output; panics with its standard error if it fails.
pub async fn sh(pods: &Api<Pod>, pod: &str, script: &str) -> String {
    try_sh(pods, pod, script)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`sh`], with its failure as an error: for a pod that may not run yet
/// (kubelet, just restarted, still shows its last status).
pub async fn try_sh(pods: &Api<Pod>, pod: &str, script: &str) -> Result<String, String> {
    let run = async {
        let mut proc = pods
            .exec(pod, ["sh", "-c", script], &AttachParams::default())
            .await
            .map_err(|e| format!("exec in pod {pod}: {e}"))?;
        let mut stdout = proc.stdout().ok_or("stdout is not attached")?;
        let mut stderr = proc.stderr().ok_or("stderr is not attached")?;
        let status = proc.take_status().ok_or("no exec status")?;
        let (mut out, mut err) = (String::new(), String::new());
        let (o, e) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        o.and(e)
            .map_err(|e| format!("reading the output of exec in pod {pod}: {e}"))?;
        let status = status.await;
        let _ = proc.join().await;
        match status {
            Some(s) if s.status.as_deref() == Some("Success") => Ok(out),
            s => Err(format!(
                "`{script}` failed in pod {pod}: {}\nstderr: {err}",
                s.and_then(|s| s.message)
                    .unwrap_or_else(|| "no status".into())
            )),
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| Err(format!("`{script}` in pod {pod} did not end within 60 s")))
}

/// A busybox pod spec running `script` (then sleeping, so it can be exec'd
/// into), with extra pod-spec fields merged in.
pub fn busybox_pod(name: &str, script: &str, spec: serde_json::Value) -> Pod {
    let mut pod = json!({
        "metadata": { "name": name },
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "main",
                "image": busybox_image(),
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", format!("trap 'exit 0' TERM; {script}\nwhile true; do sleep 1; done")],
            }],
        },
    });
    merge(&mut pod["spec"], spec);
    from_json(pod)
}

/// JSON merge of `patch` into `into`: objects merge, arrays of containers
/// merge element-wise, anything else replaces.
fn merge(into: &mut serde_json::Value, patch: serde_json::Value) {
    use serde_json::Value;
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (x, y) in a.iter_mut().zip(b) {
                merge(x, y);
            }
        }
        (a, b) => *a = b,
    }
}

/// The agent pod on `node`, Ready.
pub async fn agent_pod(client: &Client, node: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), STEAD_NAMESPACE);
    let lp = ListParams::default()
        .labels(AGENT_LABELS)
        .fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&lp).await.expect("listing the agent's pods");
    let live: Vec<_> = list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let [pod] = live.as_slice() else {
        panic!(
            "expected one Stead agent pod on node {node}, found {}",
            live.len()
        )
    };
    wait_ready(&pods, &pod.name_any()).await
}

/// Deletes the agent pod on `node` and waits until its replacement is Ready.
pub async fn restart_agent(client: &Client, node: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), STEAD_NAMESPACE);
    let old = agent_pod(client, node).await;
    let old_uid = old.uid().expect("pods have uids");
    delete(&pods, &old.name_any()).await;
    let lp = ListParams::default()
        .labels(AGENT_LABELS)
        .fields(&format!("spec.nodeName={node}"));
    let deadline = Instant::now() + POD_READY;
    loop {
        let list = pods.list(&lp).await.expect("listing the agent's pods");
        if let Some(new) = list
            .items
            .into_iter()
            .find(|p| p.uid().as_deref() != Some(old_uid.as_str()) && is_ready(p))
        {
            return new;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {POD_READY:?} waiting for a new Stead agent pod on node {node} to be Ready"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A look at the pools on a node's disk, from a busybox pod on that node
/// with the agent's pool folders (the `pool-*` hostPath volumes of its
/// DaemonSet, wherever a kustomize patch put them) mounted read-only at
/// `/pools/<pool>`.
pub struct NodeDisk {
    pods: Api<Pod>,
    name: String,
}

impl NodeDisk {
    pub async fn open(scn: &Scenario, node: &str) -> Self {
        let ds = Api::<DaemonSet>::namespaced(scn.client.clone(), STEAD_NAMESPACE)
            .get(AGENT_DAEMONSET)
            .await
            .unwrap_or_else(|e| {
                panic!("reading DaemonSet {STEAD_NAMESPACE}/{AGENT_DAEMONSET}: {e}")
            });
        let volumes: Vec<_> = ds
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.volumes)
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.name.starts_with("pool-") && v.host_path.is_some())
            .collect();
        assert!(
            !volumes.is_empty(),
            "the Stead DaemonSet has no pool-* hostPath volume"
        );
        let mounts: Vec<_> = volumes
            .iter()
            .map(|v| json!({ "name": v.name, "mountPath": format!("/pools/{}", &v.name["pool-".len()..]), "readOnly": true }))
            .collect();
        let name = format!("node-disk-{node}");
        let pod = busybox_pod(
            &name,
            "",
            json!({
                "nodeName": node,
                "tolerations": [{ "operator": "Exists" }],
                "volumes": volumes,
                "containers": [{ "volumeMounts": mounts }],
            }),
        );
        let pods: Api<Pod> = scn.api();
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
        wait_ready(&pods, &name).await;
        NodeDisk { pods, name }
    }

    /// Runs a shell script in the node-disk pod.
    pub async fn sh(&self, script: &str) -> String {
        sh(&self.pods, &self.name, script).await
    }

    /// The folder of volume `id` in `pool` (`/pools/<pool>/<folder>`), found
    /// by its record `volume.json`, if the volume exists on the disk.
    pub async fn volume_dir(&self, pool: &str, id: &str) -> Option<String> {
        let out = self
            .sh(&format!(
                "grep -l -F '\"{id}\"' /pools/{pool}/*/volume.json 2>/dev/null || true"
            ))
            .await;
        out.lines()
            .next()
            .map(|l| l.trim_end_matches("/volume.json").to_owned())
    }
}

/// What happened to a pod, as a watch saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    Created,
    Ready,
    Terminating,
    Gone,
}

/// Records when pods matching a label selector are created, become Ready,
/// start terminating and are gone, from a watch started before the
/// scenario acts.
pub struct PodTimeline {
    log: Arc<Mutex<Vec<(Instant, String, Moment)>>>,
    task: JoinHandle<()>,
}

impl PodTimeline {
    pub async fn watch(pods: Api<Pod>, labels: &str) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let stream = watcher(pods, watcher::Config::default().labels(labels));
        let sink = log.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut started = Some(started_tx);
            // Per pod uid: the moments already recorded.
            let mut seen: HashMap<String, Vec<Moment>> = HashMap::new();
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let (pod, gone) = match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                    Ok(watcher::Event::Delete(p)) => (p, true),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = started.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Ok(watcher::Event::Init) | Err(_) => continue,
                };
                let moments = seen.entry(pod.uid().unwrap_or_default()).or_default();
                let mut record = |m: Moment| {
                    if !moments.contains(&m) {
                        moments.push(m);
                        sink.lock().unwrap().push((now, pod.name_any(), m));
                    }
                };
                record(Moment::Created);
                if is_ready(&pod) {
                    record(Moment::Ready);
                }
                if pod.metadata.deletion_timestamp.is_some() {
                    record(Moment::Terminating);
                }
                if gone {
                    record(Moment::Gone);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), started_rx)
            .await
            .expect("the pod watch to list within 30 s")
            .expect("the pod watch to start");
        PodTimeline { log, task }
    }

    /// Names of the pods that had `moment` after `since`, in order.
    pub fn order(&self, moment: Moment, since: Instant) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, m)| *m == moment && *t >= since)
            .map(|(_, n, _)| n.clone())
            .collect()
    }

    /// When `pod` first had `moment` after `since`.
    pub fn when(&self, pod: &str, moment: Moment, since: Instant) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|(t, n, m)| n == pod && *m == moment && *t >= since)
            .map(|(t, _, _)| *t)
    }
}

impl Drop for PodTimeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node of the bundled local cluster (`tests/cluster`): a network
/// namespace named after it, a mount namespace pinned in `STEAD_MNTNS_DIR`,
/// and its folders under `STEAD_NODES_DIR/<name>`, bind-mounted in that
/// namespace at the standard paths. Only the suites that run processes on a
/// node (the provisioner's) need it; the others work on any cluster.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub name: String,
    /// Its address on the cluster's bridge, reachable from the host.
    pub address: String,
    dir: PathBuf,
    mntns: PathBuf,
}

impl LocalNode {
    /// The nodes named by the local cluster's env file (`STEAD_NODE_NAMES`,
    /// `STEAD_NODE_ADDRESSES`, `STEAD_NODES_DIR`, `STEAD_MNTNS_DIR`).
    pub fn all() -> Vec<LocalNode> {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: source the local cluster's env file (make cluster-up writes it)")
            })
        };
        let names = var("STEAD_NODE_NAMES");
        let addresses = var("STEAD_NODE_ADDRESSES");
        let dir = PathBuf::from(var("STEAD_NODES_DIR"));
        let mntns = PathBuf::from(var("STEAD_MNTNS_DIR"));
        let names: Vec<&str> = names.split_whitespace().collect();
        let addresses: Vec<&str> = addresses.split_whitespace().collect();
        assert_eq!(
            names.len(),
            addresses.len(),
            "STEAD_NODE_NAMES and STEAD_NODE_ADDRESSES differ in length"
        );
        names
            .iter()
            .zip(addresses)
            .map(|(n, a)| LocalNode {
                name: n.to_string(),
                address: a.to_string(),
                dir: dir.join(n),
                mntns: mntns.join(n),
            })
            .collect()
    }

    /// The first node (`STEAD_NODE_NAME`).
    pub fn first() -> LocalNode {
        LocalNode::all()
            .into_iter()
            .next()
            .expect("the local cluster has no node")
    }

    /// Where a path inside the node is on the host: its kubelet and Stead
    /// folders are its own, everything else is the host's.
    pub fn host_path(&self, inside: impl AsRef<std::path::Path>) -> PathBuf {
        let inside = inside.as_ref();
        for (standard, own) in [("/var/lib/kubelet", "kubelet"), ("/var/lib/stead", "stead")] {
            if let Ok(rest) = inside.strip_prefix(standard) {
                return self.dir.join(own).join(rest);
            }
        }
        inside.to_owned()
    }

    /// A command that runs `program` inside the node (its network and mount
    /// namespaces), as its kubelet and containerd run.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg(format!("--mount={}", self.mntns.display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

/// A change to a Node made for one test (cordon, taint), undone when
/// dropped, also when the test fails.
pub struct NodeChange {
    node: String,
    /// The taint key it added, or none for a cordon.
    taint: Option<String>,
}

impl NodeChange {
    /// `kubectl cordon`: the node takes no new pods.
    pub async fn cordon(client: &Client, node: &str) -> NodeChange {
        patch_node(client, node, json!({"spec": {"unschedulable": true}})).await;
        step(&format!("node {node} cordoned"));
        NodeChange {
            node: node.to_string(),
            taint: None,
        }
    }

    /// `kubectl taint nodes NODE KEY=VALUE:EFFECT`.
    pub async fn taint(
        client: &Client,
        node: &str,
        key: &str,
        value: &str,
        effect: &str,
    ) -> NodeChange {
        let mut taints = node_taints(client, node).await;
        taints.retain(|t| t["key"] != key);
        taints.push(json!({"key": key, "value": value, "effect": effect}));
        patch_node(client, node, json!({"spec": {"taints": taints}})).await;
        step(&format!("node {node} tainted {key}={value}:{effect}"));
        NodeChange {
            node: node.to_string(),
            taint: Some(key.to_string()),
        }
    }

    async fn undo(node: &str, taint: Option<&str>) {
        let client = client().await;
        match taint {
            None => patch_node(&client, node, json!({"spec": {"unschedulable": null}})).await,
            Some(key) => {
                let mut taints = node_taints(&client, node).await;
                taints.retain(|t| t["key"] != key);
                patch_node(&client, node, json!({"spec": {"taints": taints}})).await;
            }
        }
    }

    /// Undoes the change now (and says so).
    pub async fn revert(mut self) {
        let taint = self.taint.take();
        NodeChange::undo(&self.node, taint.as_deref()).await;
        step(&format!(
            "node {}: {} undone",
            self.node,
            taint.map_or("cordon".to_string(), |k| format!("taint {k}"))
        ));
        self.node.clear();
    }
}

impl Drop for NodeChange {
    fn drop(&mut self) {
        if self.node.is_empty() {
            return;
        }
        // The test's runtime is blocked in this drop: undo on one of its own.
        let (node, taint) = (self.node.clone(), self.taint.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(NodeChange::undo(&node, taint.as_deref()));
        })
        .join();
    }
}

async fn node_taints(client: &Client, node: &str) -> Vec<serde_json::Value> {
    let n = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get(node)
        .await
        .unwrap_or_else(|e| panic!("reading node {node}: {e}"));
    n.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| serde_json::to_value(t).expect("taint as JSON"))
        .collect()
}

async fn patch_node(client: &Client, node: &str, patch: serde_json::Value) {
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("patching node {node}: {e}"));
}

/// A node pods can be scheduled on (Ready, not cordoned, no NoSchedule or
/// NoExecute taint), with its zone label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterNode {
    pub name: String,
    pub zone: Option<String>,
}

/// The schedulable nodes of the cluster, by name.
pub async fn schedulable_nodes(client: &Client) -> Vec<ClusterNode> {
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("listing nodes: {e}"));
    let mut out: Vec<ClusterNode> = nodes
        .items
        .into_iter()
        .filter(|n| {
            let spec = n.spec.clone().unwrap_or_default();
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            ready
                && spec.unschedulable != Some(true)
                && !spec
                    .taints
                    .unwrap_or_default()
                    .iter()
                    .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        })
        .map(|n| ClusterNode {
            zone: n.labels().get("topology.kubernetes.io/zone").cloned(),
            name: n.name_any(),
        })
        .collect();
    out.sort();
    out
}

/// Creates an object, or fails the test naming it.
pub async fn create<K>(api: &Api<K>, obj: &K)
where
    K: Clone + Debug + Serialize + DeserializeOwned + Resource,
{
    api.create(&PostParams::default(), obj)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", obj.name_any()));
}

/// The local cluster's state folder (`STEAD_CLUSTER_DIR`, else the folder of
/// its kubeconfig, as `tests/cluster` lays it out).
fn cluster_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("STEAD_CLUSTER_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var("KUBECONFIG")
        .ok()
        .and_then(|k| PathBuf::from(k).parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp/stead-cluster"))
}

/// A node's kubelet killed by [`LocalNode::kill_kubelet`]: what it takes to
/// start it again as `tests/cluster/up.sh` started it.
#[derive(Debug)]
pub struct StoppedKubelet {
    node: LocalNode,
    /// The kubelet's own argv (after the nsenter that started it).
    argv: Vec<String>,
}

impl LocalNode {
    /// SIGKILLs this node's kubelet (its pid file in the cluster's
    /// `pids/<node>.kubelet.pid`, checked to be a kubelet), as a node that
    /// dies does: its containers go on running, nobody reports its status.
    pub async fn kill_kubelet(&self) -> StoppedKubelet {
        let pid_file = cluster_dir()
            .join("pids")
            .join(format!("{}.kubelet.pid", self.name));
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()));
        let pid = pid.trim().to_string();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap_or_else(|e| panic!("kubelet of {} (pid {pid}) does not run: {e}", self.name));
        assert!(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .ends_with("/kubelet"),
            "pid {pid} of {} is {}, not a kubelet",
            pid_file.display(),
            exe.display()
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the kubelet's cmdline");
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        signal_kill(&pid);
        // Polled: the kernel reaps it at once; there is nothing to wait on.
        poll_until(
            &format!("kubelet of {} (pid {pid}) to exit", self.name),
            Duration::from_secs(30),
            || match std::fs::read_link(format!("/proc/{pid}/exe")) {
                Ok(e) if e.to_string_lossy().contains("kubelet") => Err("still running".into()),
                _ => Ok(()),
            },
        )
        .await;
        StoppedKubelet {
            node: self.clone(),
            argv,
        }
    }

    /// SIGKILLs the Stead agent of this node: the `stead` processes in the
    /// node's cgroup tree (`tests/cluster` gives each node's kubelet
    /// `cgroupRoot: /<node>`, so its pods' processes are under it in every
    /// hierarchy). With its kubelet dead, nobody starts it again; the node's
    /// other pods go on running, as on a node cut off from the cluster. The
    /// number of processes killed.
    pub async fn kill_agent(&self) -> usize {
        let root = format!("/{}/", self.name);
        let mut killed = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let is_stead = std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|e| e.file_name().is_some_and(|n| n == "stead"));
            let here = is_stead
                && std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
                    c.lines().any(|l| {
                        l.splitn(3, ':')
                            .nth(2)
                            .is_some_and(|p| p.starts_with(&root))
                    })
                });
            if here {
                signal_kill(&pid);
                killed.push(pid);
            }
        }
        // Polled: SIGKILL ends them at once; there is nothing to wait on.
        poll_until(
            &format!("Stead agent of {} to exit", self.name),
            Duration::from_secs(30),
            || match killed
                .iter()
                .find(|p| std::path::Path::new(&format!("/proc/{p}/exe")).exists())
            {
                Some(p) => Err(format!("pid {p} still runs")),
                None => Ok(()),
            },
        )
        .await;
        killed.len()
    }
}

impl StoppedKubelet {
    /// Starts the kubelet again, in the node's namespaces, with the same
    /// arguments, its output appended to its log and its pid where the
    /// cluster keeps it (so that `make cluster-down` stops it); then waits
    /// until its Node is Ready (it registers the Node again if it was
    /// deleted).
    pub async fn start(self, client: &Client) {
        let name = &self.node.name;
        let log = cluster_dir()
            .join("logs")
            .join(format!("{name}.kubelet.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let err = out.try_clone().expect("log file");
        let mut cmd = std::process::Command::new("setsid");
        cmd.arg("nsenter")
            .arg(format!("--net=/run/netns/{name}"))
            .arg(format!("--mount={}", self.node.mntns.display()))
            .arg("--")
            .args(&self.argv)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the kubelet of {name} again: {e}"));
        // setsid and nsenter exec: the child's pid is the kubelet's.
        let pid_file = cluster_dir()
            .join("pids")
            .join(format!("{name}.kubelet.pid"));
        std::fs::write(&pid_file, format!("{}\n", child.id()))
            .unwrap_or_else(|e| panic!("writing {}: {e}", pid_file.display()));
        // The kubelet outlives the test run as it would outlive up.sh; a
        // thread reaps it should it end while the suite still runs.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
        wait_for(
            &nodes,
            name,
            "the Node to be Ready again",
            Duration::from_secs(180),
            |n| {
                n.and_then(|n| n.status.as_ref())
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            },
        )
        .await;
    }
}

fn signal_kill(pid: &str) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", pid])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -KILL {pid} failed");
}
