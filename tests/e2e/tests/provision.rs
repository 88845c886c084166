//! The provisioner against a real control plane, with the agent run as a
//! host process (`stead node --provisioner=true --registration=true`) so
//! that a test can kill it at chosen points. `make provision-test` runs it on
//! the bundled local cluster, with Stead's DaemonSet not deployed (the two
//! agents would share the node).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use stead::proto::csi::v1::controller_client::ControllerClient;
use stead::provisioner::{claim, class, ledger::Ledger};
use stead_e2e::*;

/// The agent's CSI socket inside its node, where the kubelet looks for it.
const CSI_SOCKET: &str = "/var/lib/kubelet/plugins/stead.csi.dev/csi.sock";

/// What an agent logs when its node stops taking Immediate claims.
const NOT_SCHEDULABLE_LOG: &str = "Immediate claims are left to other nodes";

fn node_name() -> String {
    LocalNode::first().name
}

fn stead_bin() -> PathBuf {
    std::env::var_os("STEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/stead")
        })
}

/// The agent as a process on a node of the local cluster (in the node's
/// namespaces, as the DaemonSet's container would be), registered with that
/// node's kubelet, with pools of its own on the node's disk.
struct Agent {
    node: LocalNode,
    /// Its folder as the node sees it, and as the host does.
    root_in: PathBuf,
    root: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Agent {
    /// An agent on the cluster's first node.
    fn new(test: &str, extra: &[&str]) -> Agent {
        Agent::on(&LocalNode::first(), test, extra)
    }

    fn on(node: &LocalNode, test: &str, extra: &[&str]) -> Agent {
        let root_in = PathBuf::from(format!("/var/lib/stead/provision/{test}-{}", token()));
        let root = node.host_path(&root_in);
        std::fs::create_dir_all(&root).expect("agent root");
        Agent {
            node: node.clone(),
            root_in,
            root,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn pool(&self, name: &str) -> PathBuf {
        self.root.join("pools").join(name)
    }

    fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    fn log(&self) -> PathBuf {
        self.root.join("agent.log")
    }

    /// Starts the agent (CSI + registration + provisioner) and waits until
    /// its CSI socket answers.
    async fn start(&mut self, provisioner: bool) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("agent log");
        let inside = |p: &str| self.root_in.join(p).display().to_string();
        let child = self
            .node
            .command(stead_bin())
            .arg("node")
            .args(["--node-id", &self.node.name])
            .arg("--endpoint")
            .arg(format!("unix://{CSI_SOCKET}"))
            .arg("--pool")
            // No reserve: the nodes' pools share this machine's disk.
            .arg(format!("image:image:{}:reserve=0", inside("pools/image")))
            .arg("--pool")
            .arg(format!("dir:dir:{}:reserve=0", inside("pools/dir")))
            .arg("--registration=true")
            .arg(format!("--provisioner={provisioner}"))
            .arg("--state-dir")
            .arg(inside("state"))
            .args(["--capacity-namespace", "default"])
            .args(&self.extra)
            .env("RUST_LOG", "info,stead=debug")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", stead_bin().display()));
        self.child = Some(child);
        self.csi().await;
        step(&format!(
            "agent started on {} (provisioner={provisioner})",
            self.node.name
        ));
    }

    /// A CSI controller client on the agent's socket (waits for it).
    async fn csi(&self) -> ControllerClient<tonic::transport::Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let socket = self.node.host_path(CSI_SOCKET);
        let endpoint = format!("unix://{}", socket.display());
        loop {
            if socket.exists()
                && let Ok(ch) = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .expect("endpoint")
                    .connect()
                    .await
            {
                return ControllerClient::new(ch);
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not serve {endpoint}; its log: {}",
                self.log().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Leaves what a provisioning agent killed right after CreateVolume
    /// leaves: its intent, and the volume made by the very request the
    /// provisioner sends (built by the same code). Returns the volume name.
    async fn crash_after_create_volume(
        &mut self,
        pvc: &PersistentVolumeClaim,
        class: &class::ClassSpec,
    ) -> String {
        self.start(false).await;
        let req = claim::create_request(pvc, class, &self.node.name).expect("request");
        Ledger::open(&self.state())
            .unwrap()
            .record(&req.name, &claim::claim_key(pvc), &pvc.uid().unwrap())
            .unwrap();
        self.csi()
            .await
            .create_volume(req.clone())
            .await
            .expect("CreateVolume");
        self.kill();
        req.name
    }

    /// SIGKILL: the agent gets no chance to finish anything.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            step("agent killed (SIGKILL)");
        }
    }

    /// Volumes on disk (folders with metadata) in a pool.
    fn volumes(&self, pool: &str) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.pool(pool)) else {
            return vec![];
        };
        let mut v: Vec<String> = dir
            .flatten()
            .filter(|e| e.path().join("volume.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }

    async fn wait_volumes(&self, pool: &str, want: &[String], what: &str) {
        let mut want = want.to_vec();
        want.sort();
        poll_until(what, Duration::from_secs(60), || {
            let got = self.volumes(pool);
            if got == want {
                return Ok(());
            }
            Err(format!(
                "pool {pool} holds {got:?}, expected {want:?} (agent log {})",
                self.log().display()
            ))
        })
        .await;
    }

    /// The lines of the agent's log that contain `needle`.
    fn log_count(&self, needle: &str) -> usize {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        log.lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the agent's log has a line containing `needle`.
    async fn wait_log(&self, needle: &str, what: &str) {
        self.wait_log_count(needle, 1, what).await;
    }

    /// Waits until the agent's log has `count` lines containing `needle`.
    async fn wait_log_count(&self, needle: &str, count: usize, what: &str) {
        poll_until(what, Duration::from_secs(60), || {
            let seen = self.log_count(needle);
            if seen >= count {
                return Ok(());
            }
            Err(format!(
                "{seen} of {count} lines with {needle:?} in {}",
                self.log().display()
            ))
        })
        .await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: graceful, as the kubelet would stop it.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
        // Its CSIStorageCapacity objects outlive it (the DaemonSet's own are
        // removed with the DaemonSet, through their owner): left behind, the
        // scheduler would go on trusting a pool no agent serves any more,
        // and a later suite on this node would see two capacities of a class.
        let node = self.node.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let caps = Api::<k8s_openapi::api::storage::v1::CSIStorageCapacity>::namespaced(
                        client, "default",
                    );
                    let _ = caps
                        .delete_collection(
                            &DeleteParams::default(),
                            &ListParams::default().labels(&format!("stead.csi.dev/node={node}")),
                        )
                        .await;
                }
            });
        })
        .join();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// A cluster-scoped StorageClass for one test, deleted at the end.
struct Class {
    name: String,
}

impl Class {
    async fn create(
        client: &Client,
        name: &str,
        params: &[(&str, &str)],
        mode: &str,
        reclaim: &str,
    ) -> Class {
        let api: Api<StorageClass> = Api::all(client.clone());
        let name = format!("{name}-{}", &token()[..6]);
        let params: BTreeMap<&str, &str> = params.iter().copied().collect();
        let sc: StorageClass = from_json(json!({
            "metadata": {"name": name},
            "provisioner": DRIVER,
            "parameters": params,
            "volumeBindingMode": mode,
            "reclaimPolicy": reclaim,
            "allowVolumeExpansion": true,
        }));
        api.create(&PostParams::default(), &sc)
            .await
            .unwrap_or_else(|e| panic!("creating StorageClass {name}: {e}"));
        Class { name }
    }
}

impl Drop for Class {
    fn drop(&mut self) {
        // The test's runtime is blocked in this drop, and the client's
        // connection lives on it: delete through a client of its own.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let _ = Api::<StorageClass>::all(client)
                        .delete(&name, &DeleteParams::default())
                        .await;
                }
            });
        })
        .join();
    }
}

fn claim_of(name: &str, class: &str, size: &str) -> PersistentVolumeClaim {
    from_json(json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        }
    }))
}

async fn create_claim(
    scn: &Scenario,
    name: &str,
    class: &str,
    size: &str,
) -> PersistentVolumeClaim {
    scn.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim_of(name, class, size))
        .await
        .unwrap_or_else(|e| panic!("creating claim {name}: {e}"))
}

/// The CSIDriver object the scheduler reads for capacity tracking.
async fn ensure_csidriver(client: &Client) {
    use k8s_openapi::api::storage::v1::CSIDriver;
    let api: Api<CSIDriver> = Api::all(client.clone());
    let drv: CSIDriver = from_json(json!({
        "metadata": {"name": DRIVER},
        "spec": {"attachRequired": false, "podInfoOnMount": true, "storageCapacity": true,
                 "fsGroupPolicy": "File", "volumeLifecycleModes": ["Persistent"]},
    }));
    match api.create(&PostParams::default(), &drv).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating CSIDriver: {e}"),
    }
}

/// All PVs whose claimRef names this claim uid.
async fn pvs_of_claim(client: &Client, uid: &str) -> Vec<PersistentVolume> {
    Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list PVs")
        .items
        .into_iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.as_deref())
                == Some(uid)
        })
        .collect()
}

#[tokio::test]
async fn seed_statefulset_gets_one_bound_volume_per_node_mounted_by_kubelet() {
    let nodes = LocalNode::all();
    let mut agents: Vec<Agent> = nodes.iter().map(|n| Agent::on(n, "seed", &[])).collect();
    for a in &mut agents {
        a.start(true).await;
    }
    let replicas = nodes.len().min(3);
    let scn = Scenario::new("prov-seed").await;
    ensure_csidriver(&scn.client).await;
    let sc = Class::create(
        &scn.client,
        "prov-wffc",
        &[("pool", "image")],
        "WaitForFirstConsumer",
        "Delete",
    )
    .await;

    step(&format!(
        "StatefulSet db-ss, {replicas} replicas, one per node (podAntiAffinity), volumeClaimTemplates db-vol 500Mi"
    ));
    let sts: StatefulSet = from_json(json!({
        "metadata": {"name": "db-ss"},
        "spec": {
            "serviceName": "db-ss",
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": {"app": "db"}},
                        "topologyKey": "kubernetes.io/hostname",
                    }]}},
                    "containers": [{
                        "name": "db",
                        "image": busybox_image(),
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", "hostname > /var/lib/db/owner && exec sleep 3600"],
                        "volumeMounts": [{"name": "db-vol", "mountPath": "/var/lib/db"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "db-vol"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": sc.name,
                    "resources": {"requests": {"storage": "500Mi"}},
                },
            }],
        },
    }));
    scn.api::<StatefulSet>()
        .create(&PostParams::default(), &sts)
        .await
        .expect("create StatefulSet");

    let pods = scn.api::<Pod>();
    let pvcs = scn.api::<PersistentVolumeClaim>();
    let mut handles = Vec::new();
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..replicas {
        let pod = format!("db-ss-{i}");
        let running = wait_ready(&pods, &pod).await;
        let claim = wait_bound(&pvcs, &format!("db-vol-db-ss-{i}")).await;
        let pv = volume_of(&scn.client, &claim).await;
        let spec = pv.spec.as_ref().expect("PV spec");
        let cref = spec.claim_ref.as_ref().expect("claimRef");
        assert_eq!(cref.name.as_deref(), Some(claim.name_any().as_str()));
        assert_eq!(cref.namespace.as_deref(), Some(scn.ns.as_str()));
        assert_eq!(cref.uid, claim.uid());
        assert_eq!(pv.name_any(), format!("pvc-{}", claim.uid().unwrap()));
        assert_eq!(
            pinned_node(&pv).as_deref(),
            Some(node_of(&running).as_str()),
            "{pod}'s PV is pinned to the pod's node"
        );
        let csi = spec.csi.as_ref().expect("csi source");
        assert_eq!(csi.driver, DRIVER);
        assert_eq!(csi.volume_handle, pv.name_any());
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "500Mi");
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some(sc.name.as_str()));
        assert_eq!(
            pv.annotations()
                .get("pv.kubernetes.io/provisioned-by")
                .map(String::as_str),
            Some(DRIVER)
        );
        let owner = sh(
            &pods,
            &pod,
            "cat /var/lib/db/owner; grep ' /var/lib/db ' /proc/mounts",
        )
        .await;
        assert!(
            owner.starts_with(&pod),
            "pod {pod} wrote its name into its volume: {owner}"
        );
        assert!(
            owner.contains("ext4"),
            "kubelet mounted the ext4 volume: {owner}"
        );
        step(&format!(
            "{pod} on {}: claim Bound to {}, mounted by kubelet",
            node_of(&running),
            pv.name_any()
        ));
        handles.push(csi.volume_handle.clone());
        per_node
            .entry(node_of(&running))
            .or_default()
            .push(csi.volume_handle.clone());
    }
    handles.sort();
    handles.dedup();
    assert_eq!(handles.len(), replicas, "distinct volumes");
    assert_eq!(
        per_node.len(),
        replicas,
        "one replica per node: {per_node:?}"
    );
    for a in &agents {
        let want = per_node.get(&a.node.name).cloned().unwrap_or_default();
        a.wait_volumes(
            "image",
            &want,
            &format!("{}'s pool to hold its replica's volume only", a.node.name),
        )
        .await;
    }

    step("delete the namespace (StatefulSet, pods, claims): the Delete policy removes the volumes");
    scn.finish().await;
    for a in &agents {
        a.wait_volumes(
            "image",
            &[],
            &format!("{}'s volume to be deleted", a.node.name),
        )
        .await;
    }
}

#[tokio::test]
async fn immediate_class_binds_without_pods_and_reclaim_policies_hold() {
    let mut agent = Agent::new("reclaim", &[]);
    agent.start(true).await;
    let scn = Scenario::new("prov-reclaim").await;
    let delete = Class::create(
        &scn.client,
        "prov-now",
        &[("pool", "dir")],
        "Immediate",
        "Delete",
    )
    .await;
    let retain = Class::create(
        &scn.client,
        "prov-keep",
        &[("pool", "dir")],
        "Immediate",
        "Retain",
    )
    .await;
    let pvcs = scn.api::<PersistentVolumeClaim>();
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());

    step("an Immediate claim is Bound with no pod, and its PV is pinned to this node");
    create_claim(&scn, "gone", &delete.name, "64Mi").await;
    create_claim(&scn, "kept", &retain.name, "64Mi").await;
    let gone = wait_bound(&pvcs, "gone").await;
    let kept = wait_bound(&pvcs, "kept").await;
    let gone_pv = volume_of(&scn.client, &gone).await;
    let kept_pv = volume_of(&scn.client, &kept).await;
    assert_eq!(
        claim::selected_node(&pvcs.get("gone").await.unwrap()),
        Some(node_name().as_str()),
        "the agent took the Immediate claim for its node"
    );
    assert!(
        gone_pv
            .finalizers()
            .iter()
            .any(|f| f == "stead.csi.dev/volume-protection"),
        "Delete PVs carry Stead's finalizer: {:?}",
        gone_pv.finalizers()
    );
    assert!(
        !kept_pv
            .finalizers()
            .iter()
            .any(|f| f.starts_with("stead.csi.dev")),
        "Retain PVs carry no Stead finalizer: {:?}",
        kept_pv.finalizers()
    );
    agent
        .wait_volumes(
            "dir",
            &[gone_pv.name_any(), kept_pv.name_any()],
            "both volumes on disk",
        )
        .await;
    let data = agent
        .pool("dir")
        .join(kept_pv.name_any())
        .join("data/precious");
    std::fs::write(&data, "keep me").expect("write into the retained volume");

    step("delete both claims: Delete removes PV and data, Retain keeps both");
    let gone_uid = gone_pv.uid().unwrap();
    pvcs.delete("gone", &DeleteParams::default()).await.unwrap();
    pvcs.delete("kept", &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvs, &gone_pv.name_any(), &gone_uid, "the Delete-policy PV").await;
    wait_for(
        &pvs,
        &kept_pv.name_any(),
        "the Retain PV to be Released",
        GONE,
        |pv| {
            pv.and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Released")
        },
    )
    .await;
    agent
        .wait_volumes(
            "dir",
            &[kept_pv.name_any()],
            "only the retained volume left",
        )
        .await;
    assert_eq!(std::fs::read_to_string(&data).unwrap(), "keep me");
    step("Retain: PV Released, data intact");
    pvs.delete(&kept_pv.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    scn.finish().await;
}

#[tokio::test]
async fn bad_class_and_oversized_claim_fail_with_events_and_create_nothing() {
    let mut agent = Agent::new("refuse", &[]);
    agent.start(true).await;
    let scn = Scenario::new("prov-refuse").await;
    let odd = Class::create(
        &scn.client,
        "prov-odd",
        &[("pool", "dir"), ("speed", "ludicrous")],
        "Immediate",
        "Delete",
    )
    .await;
    let plain = Class::create(
        &scn.client,
        "prov-plain",
        &[("pool", "dir")],
        "Immediate",
        "Delete",
    )
    .await;
    let pvcs = scn.api::<PersistentVolumeClaim>();

    step("a class with an unknown parameter: ProvisioningFailed naming it");
    let a = create_claim(&scn, "odd", &odd.name, "64Mi").await;
    let events = wait_event(
        &scn.client,
        "odd",
        "ProvisioningFailed",
        &["speed", &odd.name],
        Duration::from_secs(60),
    )
    .await;
    step(&format!("events of claim odd:\n{events}"));

    step("a claim larger than the pool: Pending, ProvisioningFailed with the free space");
    let b = create_claim(&scn, "huge", &plain.name, "900Ti").await;
    let events = wait_event(
        &scn.client,
        "huge",
        "ProvisioningFailed",
        &["900Ti", "free", &node_name()],
        Duration::from_secs(60),
    )
    .await;
    step(&format!("events of claim huge:\n{events}"));

    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, uid) in [("odd", a.uid().unwrap()), ("huge", b.uid().unwrap())] {
        let c = pvcs.get(name).await.unwrap();
        assert_eq!(
            c.status.and_then(|s| s.phase).as_deref(),
            Some("Pending"),
            "claim {name}"
        );
        assert!(
            pvs_of_claim(&scn.client, &uid).await.is_empty(),
            "no PV for claim {name}"
        );
    }
    assert!(
        agent.volumes("dir").is_empty(),
        "no volume on disk: {:?}",
        agent.volumes("dir")
    );
    scn.finish().await;
}

#[tokio::test]
async fn agent_killed_at_each_step_converges_without_duplicates_or_leaks() {
    let mut agent = Agent::new("crash", &["--leak-grace", "2"]);
    let client = stead_e2e::client().await;
    let scn = Scenario::new("prov-crash").await;
    let sc_obj = Class::create(
        &client,
        "prov-crash",
        &[("pool", "dir")],
        "Immediate",
        "Delete",
    )
    .await;
    let pvcs = scn.api::<PersistentVolumeClaim>();
    let class = class::parse(
        &Api::<StorageClass>::all(client.clone())
            .get(&sc_obj.name)
            .await
            .unwrap(),
    )
    .unwrap();

    step("1. killed before CreateVolume: the claim waits, the restarted agent provisions it");
    agent.start(true).await;
    agent.kill();
    let before = create_claim(&scn, "before", &sc_obj.name, "64Mi").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pvcs.get("before")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            .as_deref(),
        Some("Pending")
    );
    agent.start(true).await;
    wait_bound(&pvcs, "before").await;
    assert_eq!(pvs_of_claim(&client, &before.uid().unwrap()).await.len(), 1);

    step("2. killed between CreateVolume and the PV: the restart reuses the volume");
    agent.kill();
    let mid = create_claim(&scn, "mid", &sc_obj.name, "64Mi").await;
    let volume = agent.crash_after_create_volume(&mid, &class).await;
    agent.start(true).await;
    let bound = wait_bound(&pvcs, "mid").await;
    assert_eq!(
        bound.spec.unwrap().volume_name.as_deref(),
        Some(volume.as_str())
    );
    assert_eq!(
        pvs_of_claim(&client, &mid.uid().unwrap()).await.len(),
        1,
        "exactly one PV"
    );

    step("3. killed after the PV: the restart changes nothing");
    let expected: Vec<String> = [before.uid().unwrap(), mid.uid().unwrap()]
        .iter()
        .map(|u| format!("pvc-{u}"))
        .collect();
    // Until the restarted agent has looked at both claims again (its log is
    // appended to across restarts: one more line of each than before).
    agent.kill();
    let looked: Vec<(String, usize)> = ["before", "mid"]
        .iter()
        .map(|n| {
            let needle = format!("pvc={}/{n}", scn.ns);
            let seen = agent.log_count(&needle);
            (needle, seen)
        })
        .collect();
    agent.start(true).await;
    for (needle, seen) in &looked {
        agent
            .wait_log_count(
                needle,
                seen + 1,
                "the restarted agent's verdict on the claim",
            )
            .await;
    }
    agent
        .wait_volumes("dir", &expected, "the two volumes, no more")
        .await;
    for c in [&before, &mid] {
        assert_eq!(pvs_of_claim(&client, &c.uid().unwrap()).await.len(), 1);
    }

    step("4. claim deleted while the agent was down after CreateVolume: the volume is reclaimed");
    agent.kill();
    let leak = create_claim(&scn, "leak", &sc_obj.name, "64Mi").await;
    agent.crash_after_create_volume(&leak, &class).await;
    pvcs.delete("leak", &DeleteParams::default()).await.unwrap();
    wait_deleted(&pvcs, "leak", &leak.uid().unwrap(), "the leaked claim").await;
    agent.start(true).await;
    agent
        .wait_volumes("dir", &expected, "the leaked volume to be reclaimed")
        .await;
    // Logged once DeleteVolume has returned, a moment after the volume's
    // folder went.
    agent
        .wait_log("reclaimed leaked volume", "the reclaim is logged")
        .await;
    assert!(
        Ledger::open(&agent.state())
            .unwrap()
            .older_than(Duration::ZERO)
            .unwrap()
            .is_empty()
    );

    scn.finish().await;
    agent
        .wait_volumes("dir", &[], "the claims' volumes deleted with the namespace")
        .await;
}

#[tokio::test]
async fn grown_claim_is_expanded_online_and_the_pod_sees_it() {
    let mut agent = Agent::new("expand", &[]);
    agent.start(true).await;
    let scn = Scenario::new("prov-expand").await;
    ensure_csidriver(&scn.client).await;
    let sc = Class::create(
        &scn.client,
        "prov-xfs",
        &[("pool", "image"), ("csi.storage.k8s.io/fstype", "xfs")],
        "WaitForFirstConsumer",
        "Delete",
    )
    .await;
    let pvcs = scn.api::<PersistentVolumeClaim>();
    let pods = scn.api::<Pod>();
    create_claim(&scn, "grow", &sc.name, "320Mi").await;
    let pod = busybox_pod(
        "grow",
        "true",
        json!({
            "containers": [{"volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "grow"}}],
        }),
    );
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_ready(&pods, "grow").await;
    let df_kib = |out: &str| -> u64 {
        out.lines()
            .last()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = df_kib(&sh(&pods, "grow", "df -k /data").await);

    step("grow the claim from 320Mi to 640Mi while the pod runs");
    pvcs.patch(
        "grow",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            json!({"spec": {"resources": {"requests": {"storage": "640Mi"}}}}),
        ),
    )
    .await
    .expect("resize request");
    wait_for(
        &pvcs,
        "grow",
        "the claim's capacity to reach 640Mi",
        POD_READY,
        |c| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .is_some_and(|q| q.0 == "640Mi")
        },
    )
    .await;
    let after = df_kib(&sh(&pods, "grow", "df -k /data").await);
    step(&format!(
        "df inside the pod: {before} KiB before, {after} KiB after"
    ));
    assert!(
        after > before + 250 * 1024,
        "the filesystem grew online: {before} KiB -> {after} KiB"
    );
    scn.finish().await;
    agent
        .wait_volumes("image", &[], "the volume deleted with the namespace")
        .await;
}

/// Creates `n` Immediate claims `{prefix}-NN` and waits until each is Bound
/// to exactly one PV whose node is its `selected-node`; returns the volume
/// handles per node.
async fn immediate_batch(
    scn: &Scenario,
    class: &str,
    prefix: &str,
    n: usize,
) -> BTreeMap<String, Vec<String>> {
    let pvcs = scn.api::<PersistentVolumeClaim>();
    let mut claims = Vec::new();
    for i in 0..n {
        claims.push(create_claim(scn, &format!("{prefix}-{i:02}"), class, "16Mi").await);
    }
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &claims {
        let bound = wait_bound(&pvcs, &c.name_any()).await;
        let pvs = pvs_of_claim(&scn.client, &c.uid().unwrap()).await;
        assert_eq!(pvs.len(), 1, "claim {}: PVs {:?}", c.name_any(), pvs);
        let pv = &pvs[0];
        let node = pinned_node(pv).expect("PV pinned to a node");
        let selected = bound
            .annotations()
            .get(claim::ANN_SELECTED_NODE)
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            selected,
            node,
            "claim {}: selected-node vs PV",
            c.name_any()
        );
        per_node.entry(node).or_default().push(volume_handle(pv));
    }
    step(&format!(
        "{prefix}: claims per node {:?}",
        per_node
            .iter()
            .map(|(n, v)| (n, v.len()))
            .collect::<Vec<_>>()
    ));
    per_node
}

/// Adds a batch's volumes to `taken`, checking that node `skipped` (how it
/// was made unschedulable: `why`) took none.
fn merge_excluding(
    taken: &mut BTreeMap<String, Vec<String>>,
    batch: BTreeMap<String, Vec<String>>,
    skipped: &str,
    why: &str,
) {
    assert!(
        !batch.contains_key(skipped),
        "the {why} {skipped} took none: {batch:?}"
    );
    for (node, handles) in batch {
        taken.entry(node).or_default().extend(handles);
    }
}

#[tokio::test]
async fn racing_agents_take_each_immediate_claim_exactly_once_on_schedulable_nodes() {
    const CLAIMS: usize = 15;
    let nodes = LocalNode::all();
    assert!(
        nodes.len() >= 3,
        "the race needs three nodes, the cluster has {}",
        nodes.len()
    );
    let mut agents: Vec<Agent> = nodes.iter().map(|n| Agent::on(n, "race", &[])).collect();
    for a in &mut agents {
        a.start(true).await;
    }
    let scn = Scenario::new("prov-race").await;
    let sc = Class::create(
        &scn.client,
        "prov-race",
        &[("pool", "dir")],
        "Immediate",
        "Delete",
    )
    .await;
    let odd = Class::create(
        &scn.client,
        "prov-race-odd",
        &[("pool", "dir"), ("speed", "ludicrous")],
        "Immediate",
        "Delete",
    )
    .await;
    let (n1, n2, n3) = (&nodes[0].name, &nodes[1].name, &nodes[2].name);
    let mut taken: BTreeMap<String, Vec<String>> = BTreeMap::new();

    step(&format!(
        "{n3} cordoned: {CLAIMS} Immediate claims, the agents of {} nodes racing for each",
        agents.len()
    ));
    let cordon = NodeChange::cordon(&scn.client, n3).await;
    agents[2]
        .wait_log(
            NOT_SCHEDULABLE_LOG,
            &format!("{n3}'s agent to see the cordon"),
        )
        .await;
    let batch = immediate_batch(&scn, &sc.name, "c", CLAIMS).await;
    merge_excluding(&mut taken, batch, n3, "cordoned");
    cordon.revert().await;

    step(&format!(
        "{n2} tainted NoSchedule, {n3} uncordoned: {CLAIMS} more claims"
    ));
    let taint =
        NodeChange::taint(&scn.client, n2, "stead.csi.dev/test", "race", "NoSchedule").await;
    agents[1]
        .wait_log(
            NOT_SCHEDULABLE_LOG,
            &format!("{n2}'s agent to see the taint"),
        )
        .await;
    let batch = immediate_batch(&scn, &sc.name, "t", CLAIMS).await;
    merge_excluding(&mut taken, batch, n2, "tainted");
    taint.revert().await;
    step(&format!(
        "all claims per node: {:?}",
        taken.iter().map(|(n, v)| (n, v.len())).collect::<Vec<_>>()
    ));
    assert!(
        taken.contains_key(n1),
        "{n1}, schedulable throughout, took some: {taken:?}"
    );
    for a in &agents {
        let want = taken.get(&a.node.name).cloned().unwrap_or_default();
        a.wait_volumes(
            "dir",
            &want,
            &format!("the volumes of node {}", a.node.name),
        )
        .await;
    }
    let total: usize = agents.iter().map(|a| a.volumes("dir").len()).sum();
    assert_eq!(total, 2 * CLAIMS, "one volume per claim across the nodes");

    step("a claim of a broken Immediate class: taken and reported by one agent only");
    create_claim(&scn, "odd", &odd.name, "16Mi").await;
    wait_event(
        &scn.client,
        "odd",
        "ProvisioningFailed",
        &["speed"],
        Duration::from_secs(60),
    )
    .await;
    // Absence of a second report is only meaningful once every agent has
    // looked at the claim: each one logs its verdict on it (taken, lost the
    // race, or skipped as another node's).
    let odd_key = format!("{}/odd", scn.ns);
    for a in &agents {
        a.wait_log(
            &format!("pvc={odd_key}"),
            &format!("node {} decided on claim odd", a.node.name),
        )
        .await;
    }
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(scn.client.clone(), &scn.ns)
            .list(&ListParams::default())
            .await
            .expect("list events");
    let reporters: std::collections::BTreeSet<String> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("odd"))
        // Only Stead's own reports count: kube-controller-manager reports
        // ProvisioningFailed too ("storageclass not found", empty reporting
        // instance) while its informer has not yet seen a class created a
        // moment before, which says nothing about the agents.
        .filter(|e| e.reporting_controller.as_deref() == Some(stead::DRIVER_NAME))
        .map(|e| e.reporting_instance.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        reporters.len(),
        1,
        "ProvisioningFailed reported by {reporters:?}"
    );
    let total: usize = agents.iter().map(|a| a.volumes("dir").len()).sum();
    assert_eq!(total, 2 * CLAIMS, "no volume for the broken claim");

    step("delete everything: every agent deletes the volumes it made");
    scn.finish().await;
    for a in &agents {
        a.wait_volumes("dir", &[], &format!("node {} emptied", a.node.name))
            .await;
    }
    drop(sc);
    drop(odd);
}
