//! Cross-node restore: a claim restored from a snapshot (or cloned from a
//! claim) whose pod the scheduler put on this node, while the data is on
//! another node (the holder). This node's agent makes the volume as for any
//! claim (intent first, CreateVolume of the claim's size and parameters,
//! with no content source), pulls the data from the holder's agent into it
//! (`transfer::receiver`: a staging file beside the volume's image, durable
//! checkpoints, a digest of the whole content checked), settles it as the
//! volume's image (`storage::incoming`), and only then makes the PV.
//!
//! A pull that breaks (the network, the holder's agent restarting, this
//! agent killed) keeps its volume, its intent and its checkpoint: the next
//! reconcile resumes from the checkpoint. A pull that can never succeed as
//! it is (the digest differs, the source is gone, a `dir` source, data that
//! does not fit the volume) is rolled back: the staging, the volume and the
//! intent go, and the claim says why and what to do.
//!
//! Finding the holder's transfer endpoint: the Stead agent pods of this
//! agent's own namespace on the holder's node are listed (field selector
//! `spec.nodeName`), and that pod's IP and its container port named
//! `transfer` are used. The agents may list pods already (the stranded-pod
//! and node-loss paths), so this needs no new right, and nothing is written
//! for it: an annotation each agent writes on its own Node would need a
//! Node patch right for every agent and an admission rule to keep it to its
//! own Node. A pod's IP is also what changes when the agent restarts, and
//! it is read anew at each attempt.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::class::ClassSpec;
use super::{Ctx, Error, claim, csi_error, quantity};
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::proto::csi::v1::volume_content_source::Type;
use crate::proto::csi::v1::{DeleteVolumeRequest, Volume, VolumeContentSource};
use crate::storage::{BackendKind, VolumeId};
use crate::transfer::{self, Arrival, Landing, SourceRef, TrustDir, receiver};

/// The labels of the Stead agent pods (deploy/base/daemonset.yaml).
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=stead,app.kubernetes.io/component=node";
/// The name of the agents' transfer port in their pod.
pub const PORT_NAME: &str = "transfer";
/// The Secret deploy mounts as the transfer trust material.
pub const TRUST_SECRET: &str = "stead-transfer-tls";

/// What this agent needs to pull data from another node's agent.
pub struct Transfer {
    /// The volumes of this node that receive data.
    pub landing: Arc<dyn Landing>,
    /// The trust material (`ca.crt`, `tls.crt`, `tls.key`), read when a
    /// pull needs it: the Secret may be mounted after the agent started.
    pub trust_dir: PathBuf,
    /// The name a peer's certificate must carry.
    pub server_name: String,
    /// The port of a peer whose pod names no `transfer` port.
    pub port: u16,
    /// The agents' namespace, where their pods are listed.
    pub namespace: String,
    /// How pulls go about it (checkpoints, attempts per reconcile).
    pub options: receiver::Options,
    trust: Mutex<Option<Arc<TrustDir>>>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("trust_dir", &self.trust_dir)
            .field("server_name", &self.server_name)
            .field("port", &self.port)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Transfer {
    pub fn new(
        landing: Arc<dyn Landing>,
        trust_dir: PathBuf,
        server_name: String,
        port: u16,
        namespace: String,
    ) -> Self {
        Transfer {
            landing,
            trust_dir,
            server_name,
            port,
            namespace,
            options: receiver::Options::default(),
            trust: Mutex::new(None),
        }
    }

    /// This agent's trust material, opened once it is there (it is read
    /// again at every connection, so a rotation needs nothing here).
    pub fn trust(&self) -> Result<Arc<TrustDir>, transfer::Error> {
        let mut slot = self.trust.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = Arc::new(TrustDir::open(&self.trust_dir, &self.server_name)?);
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// A claim's data to pull: decided by `reconcile::fill_from`.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub holder: String,
    pub source: SourceRef,
    /// The source's size, when the API says it.
    pub size_bytes: Option<i64>,
    /// The claim's data source, for messages (`VolumeSnapshot ns/name`).
    pub what: String,
}

/// Why this node cannot pull a claim's data: said on the claim, and its
/// node choice moved to the holder (as `crossNodeRestore: refuse` does).
pub(crate) fn cannot_pull<C>(ctx: &Ctx<C>, class: &ClassSpec) -> Option<String> {
    let node = &ctx.config.node;
    let Some(t) = &ctx.config.transfer else {
        return Some(format!(
            "node {node}'s agent does not pull data from other nodes (stead node runs without --transfer-addr)"
        ));
    };
    if let Err(e) = t.trust() {
        return Some(format!(
            "node {node}'s agent has no transfer trust material ({e}); create Secret {TRUST_SECRET} in namespace {} from `stead transfer-certs` so that agents pull data between nodes",
            t.namespace
        ));
    }
    match t.landing.backend(class.pool.as_deref()) {
        Some(BackendKind::Image) => None,
        Some(BackendKind::Dir) => Some(format!(
            "StorageClass {} puts its volumes in pool {} of node {node}, a dir pool, and dir volumes cannot be transferred between nodes (only image volumes can); to restore onto another node, use a class of an image pool",
            class.name,
            class.pool.as_deref().unwrap_or("(default)")
        )),
        // CreateVolume names the unknown pool in its own refusal.
        None => None,
    }
}

/// The transfer source a claim's content source names; `None` for a
/// handle that is not a volume id (said by the caller).
pub(crate) fn source_of(content: &VolumeContentSource) -> Option<SourceRef> {
    match content.r#type.as_ref()? {
        Type::Snapshot(s) => VolumeId::parse(&s.snapshot_id)
            .ok()
            .map(SourceRef::Snapshot),
        Type::Volume(v) => VolumeId::parse(&v.volume_id).ok().map(SourceRef::Volume),
    }
}

/// The address (`ip:port`) of the transfer server of `holder`'s agent,
/// from its pod (see module doc); `Err` says why there is none now.
async fn endpoint<C>(ctx: &Ctx<C>, t: &Transfer, holder: &str) -> Result<String, String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &t.namespace);
    let params = ListParams::default()
        .fields(&format!("spec.nodeName={holder}"))
        .labels(AGENT_SELECTOR);
    let list = pods.list(&params).await.map_err(|e| {
        format!(
            "listing the Stead agent pods of node {holder} in namespace {}: {e}",
            t.namespace
        )
    })?;
    let running = list.items.iter().find_map(|pod| {
        let status = pod.status.as_ref()?;
        if status.phase.as_deref() != Some("Running") || pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
        let port = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(PORT_NAME))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(t.port);
        // An IPv6 address is bracketed in host:port.
        Some(if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        })
    });
    running.ok_or_else(|| {
        format!(
            "no running Stead agent pod with an IP on node {holder} (namespace {}, labels {AGENT_SELECTOR})",
            t.namespace
        )
    })
}

/// What a failed pull means for the claim.
enum Outcome {
    /// Try again later from the checkpoint: the volume and intent stay.
    Resume(String),
    /// Never succeeds as it is: roll back, say this.
    Roll(String),
    /// The source cannot be transferred (a dir volume): roll back and
    /// move the claim to the holder.
    Untransferable(String),
}

fn classify(e: &transfer::Error, plan: &Plan, node: &str) -> Outcome {
    use tonic::Code;
    let holder = &plan.holder;
    match e {
        transfer::Error::DigestMismatch { .. } => Outcome::Roll(format!(
            "{e}; the volume was removed and a new pull starts at the next attempt; if this repeats, the data of {} on node {holder} may be damaged",
            plan.what
        )),
        transfer::Error::Rpc { status, .. } if status.code() == Code::NotFound => {
            Outcome::Roll(format!(
                "{e}; node {holder} no longer holds it: the volume was removed, and the claim waits for its data source again"
            ))
        }
        transfer::Error::Rpc { status, .. } if status.code() == Code::Unimplemented => {
            Outcome::Untransferable(format!(
                "{e}; dir volumes cannot be transferred between nodes (only image volumes can)"
            ))
        }
        transfer::Error::Rpc { status, .. }
            if matches!(
                status.code(),
                Code::InvalidArgument | Code::DataLoss | Code::PermissionDenied
            ) =>
        {
            Outcome::Roll(format!(
                "{e}; the volume was removed; the agents' logs on nodes {node} and {holder} tell more"
            ))
        }
        transfer::Error::Protocol { .. } | transfer::Error::TargetExists(_) => Outcome::Roll(
            format!("{e}; the volume was removed and a new pull starts at the next attempt"),
        ),
        transfer::Error::Trust { .. } => Outcome::Resume(format!(
            "{e}; check Secret {TRUST_SECRET} (made with `stead transfer-certs`) on both nodes"
        )),
        transfer::Error::Connect { .. } => Outcome::Resume(format!(
            "{e}; is the agent of node {holder} serving transfers (--transfer-addr) with the same trust material?"
        )),
        _ => Outcome::Resume(e.to_string()),
    }
}

/// The pull of `plan` into `volume`, just made for claim `pvc`: `Ok(Ok)`
/// once its data is in and verified (the PV may be made), `Ok(Err)` with
/// what to do meanwhile (a pull to resume later, a rollback done).
pub(crate) async fn receive<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    plan: &Plan,
    volume: &Volume,
) -> Result<Result<(), Action>, Error> {
    let node = &ctx.config.node;
    let key = claim::claim_key(pvc);
    let uid = pvc.uid().unwrap_or_default();
    let id = volume.volume_id.as_str();
    let holder = &plan.holder;
    let Some(t) = ctx.config.transfer.clone() else {
        // Checked before the volume was made (`cannot_pull`); a context
        // without it never gets here.
        return Ok(Err(Action::requeue(Duration::from_secs(30))));
    };
    let received = format!("{} ({}) from node {holder}", plan.what, plan.source);
    let arrival = match t.landing.begin(id).await {
        Ok(a) => a,
        // Not rolled back: a volume this call did not prepare is not known
        // to hold nothing of anyone's (the intent lets the reaper remove it
        // once its claim is gone).
        Err(e) => {
            let wait = ctx.backoff(&uid);
            ctx.fail(
                pvc,
                format!(
                    "node {node} cannot receive the data of {} into volume {id} for claim {key}: {e}; the volume is left as it is and looked at again in {} s; the agent's log on node {node} tells more",
                    plan.what,
                    wait.as_secs()
                ),
            );
            return Ok(Err(Action::requeue(wait)));
        }
    };
    let target = match arrival {
        Arrival::Settled => return Ok(Ok(())),
        Arrival::Arrived(target) => {
            // Installed by an earlier pull that was killed before it
            // settled: only what the receiver left beside it goes.
            if let Err(e) = transfer::rollback(&target) {
                tracing::warn!(pvc = %key, volume.id = %id, error = %e, "could not remove a finished transfer's work files");
            }
            return settle(ctx, pvc, &t, id, &target, &received).await;
        }
        Arrival::Pull(target) => target,
    };
    let peer = match endpoint(ctx, &t, holder).await {
        Ok(p) => p,
        Err(why) => {
            let wait = ctx.backoff(&uid);
            ctx.fail(
                pvc,
                format!(
                    "node {node} cannot reach the agent of node {holder} to pull {} for claim {key}: {why}; volume {id} is kept and the pull starts when that agent runs (next try in {} s)",
                    plan.what,
                    wait.as_secs()
                ),
            );
            return Ok(Err(Action::requeue(wait)));
        }
    };
    let trust = match t.trust() {
        Ok(trust) => trust,
        Err(e) => {
            let wait = ctx.backoff(&uid);
            ctx.fail(
                pvc,
                format!(
                    "node {node} cannot pull {} for claim {key}: {e}; create Secret {TRUST_SECRET} from `stead transfer-certs` (next try in {} s)",
                    plan.what,
                    wait.as_secs()
                ),
            );
            return Ok(Err(Action::requeue(wait)));
        }
    };
    ctx.event(
        pvc,
        EventType::Normal,
        "Pulling",
        format!(
            "node {node} pulls {} ({}) from the agent of node {holder} at {peer} into volume {id}",
            plan.what,
            plan.size_bytes
                .map_or_else(|| "size not known yet".to_string(), quantity::human)
        ),
    );
    tracing::info!(pvc = %key, volume.id = %id, holder = %holder, peer = %peer, source = %plan.source, "pulling");
    let started = Instant::now();
    let pulled = receiver::pull(&peer, &trust, &plan.source, &target, &t.options).await;
    let report = match pulled {
        Ok(r) => r,
        Err(e) => {
            return match classify(&e, plan, node) {
                Outcome::Resume(why) => {
                    let wait = ctx.backoff(&uid);
                    ctx.fail(
                        pvc,
                        format!(
                            "node {node} could not finish pulling {} from node {holder} for claim {key}: {why}; volume {id} and what was received are kept, and the pull resumes from its checkpoint in {} s",
                            plan.what,
                            wait.as_secs()
                        ),
                    );
                    Ok(Err(Action::requeue(wait)))
                }
                Outcome::Roll(why) => {
                    let note = format!(
                        "node {node} could not pull {} from node {holder} for claim {key}: {why}",
                        plan.what
                    );
                    rollback(ctx, pvc, id, &target, note).await
                }
                Outcome::Untransferable(why) => {
                    let note = format!(
                        "node {node} could not pull {} from node {holder} for claim {key}: {why}",
                        plan.what
                    );
                    let action = rollback(ctx, pvc, id, &target, note).await?;
                    super::reconcile::move_node(ctx, pvc, holder).await?;
                    Ok(action)
                }
            };
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        report.received_bytes as f64 / secs / 1e6
    } else {
        0.0
    };
    tracing::info!(pvc = %key, volume.id = %id, holder = %holder, size = report.size,
        received.bytes = report.received_bytes, resumed_from = report.resumed_from,
        streams = report.streams, seconds = secs, digest = %report.digest, "pulled");
    if let Err(action) = settle(ctx, pvc, &t, id, &target, &received).await? {
        return Ok(Err(action));
    }
    ctx.event(
        pvc,
        EventType::Normal,
        "Pulled",
        format!(
            "node {node} received {} of data ({} volume{}{}) from node {holder} in {secs:.1} s ({rate:.1} MB/s); content digest verified",
            quantity::human(report.received_bytes as i64),
            quantity::human(report.size as i64),
            if report.resumed_from > 0 {
                format!(", resumed at {}", quantity::human(report.resumed_from as i64))
            } else {
                String::new()
            },
            if report.streams > 1 {
                format!(", over {} streams: a broken one was resumed", report.streams)
            } else {
                String::new()
            }
        ),
    );
    Ok(Ok(()))
}

/// Makes the received data the volume's image; a refusal (it does not fit
/// the volume) rolls back.
async fn settle<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    t: &Transfer,
    id: &str,
    target: &std::path::Path,
    received: &str,
) -> Result<Result<(), Action>, Error> {
    match t.landing.settle(id, received).await {
        Ok(()) => Ok(Ok(())),
        Err(e) => {
            let note = format!(
                "node {} received the data of claim {} into volume {id}, but it cannot be used: {e}",
                ctx.config.node,
                claim::claim_key(pvc)
            );
            rollback(ctx, pvc, id, target, note).await
        }
    }
}

/// Removes what a pull that can never succeed made: its work files, the
/// volume (DeleteVolume takes its folder and everything in it), and the
/// intent; then says `note` on the claim.
async fn rollback<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    id: &str,
    target: &std::path::Path,
    note: String,
) -> Result<Result<(), Action>, Error> {
    let node = &ctx.config.node;
    if let Err(e) = transfer::rollback(target) {
        tracing::warn!(volume.id = %id, error = %e, "could not remove the transfer's work files; DeleteVolume removes them with the volume");
    }
    let deleted = ctx
        .csi
        .delete_volume(tonic::Request::new(DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        }))
        .await;
    if let Err(status) = deleted {
        // The intent stays, so the reaper (or the next attempt) finishes.
        ctx.fail(
            pvc,
            format!(
                "{note}; removing volume {id} failed too ({}), retried",
                status.message()
            ),
        );
        return Err(csi_error("DeleteVolume", id, node, status));
    }
    ctx.ledger.remove(id).await?;
    ctx.capacity_changed.notify_one();
    ctx.fail(pvc, format!("{note}; nothing of it is left on node {node}"));
    let wait = ctx.backoff(&pvc.uid().unwrap_or_default());
    Ok(Err(Action::requeue(wait.max(Duration::from_secs(30)))))
}

#[cfg(test)]
mod tests {
    //! Two real plugins on temp pools: node-a holds a snapshot of known
    //! content and serves it on 127.0.0.1 over mutual TLS; node-b's
    //! provisioner, on the fake apiserver, restores a claim from it.

    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use k8s_openapi::api::core::v1::TypedLocalObjectReference;
    use kube::runtime::controller::Action;
    use serde_json::json;

    use super::*;
    use crate::csi::Plugin;
    use crate::metrics::Metrics;
    use crate::proto::csi::v1::CreateSnapshotRequest;
    use crate::proto::csi::v1::DeleteSnapshotRequest;
    use crate::provisioner::claim::tests::pvc;
    use crate::provisioner::class::tests::class;
    use crate::provisioner::reconcile::reconcile;
    use crate::provisioner::tests::{Answer, Fake, fake_node_in, plugin_on};
    use crate::transfer::{TransferService, certs};

    const HOLDER: &str = "node-a";
    const HERE: &str = "node-b";
    const MIB: u64 = 1 << 20;
    /// The source volume's size, and the restored claim's.
    const SIZE: &str = "32Mi";

    /// Node-a: its plugin, the snapshot it holds, that snapshot's file, and
    /// the transfer service it serves.
    struct Holder {
        plugin: Plugin,
        snapshot: String,
        snapshot_file: std::path::PathBuf,
        service: TransferService,
        port: u16,
        trust_dir: std::path::PathBuf,
        _stop: tokio::sync::oneshot::Sender<()>,
        _tmp: tempfile::TempDir,
    }

    /// An ext4 image volume on node-a with 6 MiB of known bytes past its
    /// filesystem's metadata (and holes), snapshotted, served.
    async fn holder() -> Holder {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new(Vec::new));
        let (csi, plugin) = plugin_on(
            HOLDER,
            &[("image", BackendKind::Image)],
            tmp.path(),
            &metrics,
        );
        let sc = class(
            "stead",
            &[("pool", "image")],
            "WaitForFirstConsumer",
            "Delete",
        );
        let spec = crate::provisioner::class::parse(&sc).unwrap();
        let mut source = pvc("db", SIZE, Some(HOLDER));
        source.metadata.uid = Some("5050c0de-0000-4000-8000-00000000000a".into());
        let req = claim::create_request(&source, &spec, HOLDER).unwrap();
        let vol = csi
            .create_volume(tonic::Request::new(req))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let img = tmp
            .path()
            .join("image")
            .join(
                VolumeId::parse(&vol.volume_id)
                    .unwrap()
                    .folder_name()
                    .unwrap(),
            )
            .join(crate::storage::image::IMAGE_FILE);
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,nodiscard"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let pattern: Vec<u8> = (0..6 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&pattern, 20 * MIB).unwrap();
        f.sync_all().unwrap();
        let snap = csi
            .create_snapshot(tonic::Request::new(CreateSnapshotRequest {
                source_volume_id: vol.volume_id.clone(),
                name: "snapcontent-1".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        let snapshot_file = tmp
            .path()
            .join("image")
            .join(crate::storage::snapshot::SNAPSHOT_DIR)
            .join(
                VolumeId::parse(&snap.snapshot_id)
                    .unwrap()
                    .folder_name()
                    .unwrap(),
            )
            .join(crate::storage::image::IMAGE_FILE);
        assert!(snapshot_file.exists(), "{}", snapshot_file.display());

        let trust_dir = tmp.path().join("trust");
        certs::generate(transfer::DEFAULT_SERVER_NAME, 1)
            .unwrap()
            .write_to(&trust_dir)
            .unwrap();
        let trust = Arc::new(TrustDir::open(&trust_dir, transfer::DEFAULT_SERVER_NAME).unwrap());
        let service = TransferService::new(Arc::new(plugin.clone()));
        let listener = transfer::server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(transfer::serve(
            listener,
            service.clone(),
            trust,
            async move {
                let _ = stopped.await;
            },
        ));
        Holder {
            plugin,
            snapshot: snap.snapshot_id,
            snapshot_file,
            service,
            port,
            trust_dir,
            _stop: stop,
            _tmp: tmp,
        }
    }

    /// The apiserver as node-b sees it: VolumeSnapshot db/snap bound to a
    /// ready content that names `snapshot` on node-a, and node-a's agent
    /// pod at 127.0.0.1 with its `transfer` port.
    fn apiserver(snapshot: &str, port: u16) -> Answer {
        let snapshot = snapshot.to_string();
        Arc::new(move |method: &http::Method, path: &str, query: &str| {
            if *method != http::Method::GET {
                return None;
            }
            let body = match path {
                "/apis/snapshot.storage.k8s.io/v1/namespaces/db/volumesnapshots/snap" => json!({
                    "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                    "metadata": {"name": "snap", "namespace": "db"},
                    "spec": {"source": {"persistentVolumeClaimName": "db"}},
                    "status": {"boundVolumeSnapshotContentName": "snapcontent-1", "readyToUse": true},
                }),
                "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/snapcontent-1" => json!({
                    "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
                    "metadata": {"name": "snapcontent-1", "labels": {crate::NODE_LABEL: HOLDER}},
                    "spec": {
                        "driver": crate::DRIVER_NAME, "deletionPolicy": "Delete",
                        "source": {"volumeHandle": "pvc-5050c0de-0000-4000-8000-00000000000a"},
                        "volumeSnapshotRef": {"name": "snap", "namespace": "db"},
                    },
                    "status": {"snapshotHandle": snapshot, "readyToUse": true, "restoreSize": 32 * MIB},
                }),
                "/api/v1/namespaces/stead-system/pods" => {
                    let on_holder = query.contains("spec.nodeName%3Dnode-a")
                        || query.contains("spec.nodeName=node-a");
                    let items = if on_holder {
                        vec![json!({
                            "metadata": {"name": "stead-node-abcde", "namespace": "stead-system"},
                            "spec": {"nodeName": HOLDER, "containers": [{
                                "name": "stead",
                                "ports": [{"name": "health", "containerPort": 9809},
                                          {"name": "transfer", "containerPort": port}],
                            }]},
                            "status": {"phase": "Running", "podIP": "127.0.0.1"},
                        })]
                    } else {
                        vec![]
                    };
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                }
                _ => return None,
            };
            Some((200, body.to_string()))
        })
    }

    /// Node-b's provisioner, pulling with the holder's trust material.
    async fn puller(h: &Holder, pool: &str, options: receiver::Options) -> Fake {
        puller_in(tempfile::tempdir().unwrap(), h, pool, options).await
    }

    /// [`puller`] on what an earlier one left in `tmp` (its agent restarted).
    async fn puller_in(
        tmp: tempfile::TempDir,
        h: &Holder,
        pool: &str,
        options: receiver::Options,
    ) -> Fake {
        let sc = class("stead", &[("pool", pool)], "WaitForFirstConsumer", "Delete");
        let trust_dir = h.trust_dir.clone();
        fake_node_in(
            tmp,
            HERE,
            &[("image", BackendKind::Image), ("dir", BackendKind::Dir)],
            &[sc],
            Some(apiserver(&h.snapshot, h.port)),
            move |plugin| {
                let mut t = Transfer::new(
                    Arc::new(plugin.clone()),
                    trust_dir,
                    transfer::DEFAULT_SERVER_NAME.into(),
                    // Not the holder's: its pod names its port.
                    1,
                    "stead-system".into(),
                );
                t.options = options;
                Some(t)
            },
        )
        .await
    }

    /// Claim db/restore of class stead from VolumeSnapshot snap, its pod
    /// put on node-b by the scheduler.
    fn restore() -> Arc<PersistentVolumeClaim> {
        let mut c = pvc("restore", SIZE, Some(HERE));
        c.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
            api_group: Some("snapshot.storage.k8s.io".into()),
            kind: "VolumeSnapshot".into(),
            name: "snap".into(),
        });
        Arc::new(c)
    }

    fn digest_of(path: &Path, len: u64) -> blake3::Hash {
        let mut buf = vec![0u8; len as usize];
        std::fs::File::open(path)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        blake3::hash(&buf)
    }

    /// The restored claim's volume folder on node-b.
    fn volume_folder(f: &Fake) -> std::path::PathBuf {
        let id = claim::volume_name(&*restore()).unwrap();
        f.tmp
            .path()
            .join("image")
            .join(VolumeId::parse(&id).unwrap().folder_name().unwrap())
    }

    fn fast(attempts: u32) -> receiver::Options {
        receiver::Options {
            checkpoint_every: MIB,
            attempts,
            ..Default::default()
        }
    }

    fn reasons(posted: &[(String, String)]) -> Vec<&str> {
        posted.iter().map(|(r, _)| r.as_str()).collect()
    }

    async fn intents(f: &Fake) -> usize {
        f.ctx.ledger.older_than(Duration::ZERO).await.unwrap().len()
    }

    const PV_POST: &str = "POST /api/v1/persistentvolumes";

    #[tokio::test]
    async fn a_snapshot_on_another_node_is_pulled_verified_and_its_pv_made() {
        let h = holder().await;
        let f = puller(&h, "image", fast(3)).await;
        let action = reconcile(restore(), f.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "Pulled", "ProvisioningSucceeded"],
            "{posted:#?}"
        );
        let (_, pulling) = &posted[0];
        assert!(
            pulling.contains("node-a") && pulling.contains("32Mi") && pulling.contains("127.0.0.1"),
            "{pulling}"
        );
        let (_, pulled) = &posted[1];
        assert!(
            pulled.contains("MB/s") && pulled.contains("digest verified"),
            "{pulled}"
        );
        let (_, done) = &posted[2];
        assert!(done.contains("pulled from node node-a"), "{done}");
        assert!(f.requested(PV_POST), "the PV is made once the data is in");

        let folder = volume_folder(&f);
        let img = folder.join(crate::storage::image::IMAGE_FILE);
        assert_eq!(
            digest_of(&img, 32 * MIB),
            digest_of(&h.snapshot_file, 32 * MIB),
            "the restored volume holds the snapshot's content"
        );
        let left: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "volume.json" && n != "disk.img")
            .collect();
        assert!(
            left.is_empty(),
            "no marker, staging or checkpoint left: {left:?}"
        );
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("volume.json")).unwrap()).unwrap();
        assert_eq!(record["formatted"], "ext4", "{record}");
        assert!(
            record["received"]
                .as_str()
                .unwrap()
                .contains("from node node-a"),
            "{record}"
        );
        assert_eq!(intents(&f).await, 0, "the intent ends with the PV");
    }

    #[tokio::test]
    async fn a_pull_cut_half_way_resumes_from_its_checkpoint_at_the_next_reconcile() {
        let h = holder().await;
        let f = puller(&h, "image", fast(1)).await;
        h.service.cut_next_stream_after(3 * MIB);
        let action = reconcile(restore(), f.ctx.clone()).await.unwrap();
        assert_ne!(action, Action::await_change(), "retried later");
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "ProvisioningFailed"],
            "{posted:#?}"
        );
        assert!(
            posted[1].1.contains("resumes from its checkpoint"),
            "{}",
            posted[1].1
        );
        assert!(!f.requested(PV_POST), "no PV for a volume without its data");
        let folder = volume_folder(&f);
        assert!(
            folder.join(".incoming").exists(),
            "the volume waits for its data"
        );
        assert!(
            folder.join(".transfer-incoming.img.json").exists(),
            "a checkpoint"
        );
        assert_eq!(intents(&f).await, 1, "the intent stays");

        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "Pulled", "ProvisioningSucceeded"],
            "{posted:#?}"
        );
        assert!(posted[1].1.contains("resumed at"), "{}", posted[1].1);
        assert!(f.requested(PV_POST));
        assert_eq!(
            digest_of(&folder.join("disk.img"), 32 * MIB),
            digest_of(&h.snapshot_file, 32 * MIB)
        );
        assert_eq!(intents(&f).await, 0);
    }

    #[tokio::test]
    async fn a_pull_cut_half_way_resumes_after_the_agent_restarts() {
        let h = holder().await;
        let f = puller(&h, "image", fast(1)).await;
        h.service.cut_next_stream_after(5 * MIB);
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        assert!(!f.requested(PV_POST));
        // The agent of node-b is killed and starts again on the same disk.
        let Fake { tmp, .. } = f;
        let f = puller_in(tmp, &h, "image", fast(3)).await;
        assert_eq!(intents(&f).await, 1, "the intent is on disk");
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "Pulled", "ProvisioningSucceeded"],
            "{posted:#?}"
        );
        assert!(posted[1].1.contains("resumed at"), "{}", posted[1].1);
        assert_eq!(
            digest_of(&volume_folder(&f).join("disk.img"), 32 * MIB),
            digest_of(&h.snapshot_file, 32 * MIB)
        );
        assert_eq!(intents(&f).await, 0);
    }

    #[tokio::test]
    async fn a_claim_cloned_from_a_claim_on_another_node_gets_its_volumes_data() {
        let h = holder().await;
        let sc = class(
            "stead",
            &[("pool", "image")],
            "WaitForFirstConsumer",
            "Delete",
        );
        let trust_dir = h.trust_dir.clone();
        // The source claim db, bound to its PV on node-a.
        let mut source = pvc("db", SIZE, Some(HOLDER));
        source.metadata.uid = Some("5050c0de-0000-4000-8000-00000000000a".into());
        let mut pv = crate::provisioner::pv::tests::made_for(&source, HOLDER);
        pv.spec.as_mut().unwrap().capacity = Some(std::collections::BTreeMap::from([(
            "storage".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(SIZE.into()),
        )]));
        let pv_name = pv.metadata.name.clone().unwrap();
        let spec = source.spec.as_mut().unwrap();
        spec.volume_name = Some(pv_name.clone());
        source.status = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        });
        let snapshots = apiserver(&h.snapshot, h.port);
        let answer: Answer = Arc::new(move |method: &http::Method, path: &str, query: &str| {
            if *method == http::Method::GET {
                if path == "/api/v1/namespaces/db/persistentvolumeclaims/db" {
                    return Some((200, serde_json::to_string(&source).unwrap()));
                }
                if path == format!("/api/v1/persistentvolumes/{pv_name}") {
                    return Some((200, serde_json::to_string(&pv).unwrap()));
                }
            }
            snapshots(method, path, query)
        });
        let f = fake_node_in(
            tempfile::tempdir().unwrap(),
            HERE,
            &[("image", BackendKind::Image)],
            &[sc],
            Some(answer),
            move |plugin| {
                Some(Transfer::new(
                    Arc::new(plugin.clone()),
                    trust_dir,
                    transfer::DEFAULT_SERVER_NAME.into(),
                    1,
                    "stead-system".into(),
                ))
            },
        )
        .await;
        let mut clone = pvc("restore", SIZE, Some(HERE));
        clone.spec.as_mut().unwrap().data_source = Some(TypedLocalObjectReference {
            api_group: None,
            kind: "PersistentVolumeClaim".into(),
            name: "db".into(),
        });
        reconcile(Arc::new(clone), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "Pulled", "ProvisioningSucceeded"],
            "{posted:#?}"
        );
        assert!(
            posted[0].1.contains("PersistentVolumeClaim db/db"),
            "{}",
            posted[0].1
        );
        let source_img = h
            .snapshot_file
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join(
                VolumeId::parse("pvc-5050c0de-0000-4000-8000-00000000000a")
                    .unwrap()
                    .folder_name()
                    .unwrap(),
            )
            .join(crate::storage::image::IMAGE_FILE);
        assert_eq!(
            digest_of(&volume_folder(&f).join("disk.img"), 32 * MIB),
            digest_of(&source_img, 32 * MIB),
            "the clone holds the source volume's data"
        );
    }

    #[tokio::test]
    async fn a_volume_in_use_on_its_node_is_not_sent_until_it_is_unstaged() {
        use crate::proto::csi::v1::node_server::Node as _;
        use crate::proto::csi::v1::volume_capability::{
            AccessMode, AccessType, MountVolume, access_mode::Mode,
        };
        use crate::proto::csi::v1::{
            NodeStageVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
        };
        let h = holder().await;
        let id = "pvc-5050c0de-0000-4000-8000-00000000000a";
        let node = h.plugin.node_service();
        let staging = h._tmp.path().join("kubelet/staging").join(id);
        std::fs::create_dir_all(&staging).unwrap();
        let staging_path = staging.display().to_string();
        node.node_stage_volume(tonic::Request::new(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging_path.clone(),
            volume_capability: Some(VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(AccessType::Mount(MountVolume {
                    fs_type: "ext4".into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
        let here = tempfile::tempdir().unwrap();
        let target = here.path().join("disk.img");
        let trust = Arc::new(TrustDir::open(&h.trust_dir, transfer::DEFAULT_SERVER_NAME).unwrap());
        let peer = format!("127.0.0.1:{}", h.port);
        let source = SourceRef::Volume(VolumeId::parse(id).unwrap());
        let refused = receiver::pull(&peer, &trust, &source, &target, &fast(1)).await;
        match refused {
            Err(transfer::Error::Rpc { status, .. }) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                assert!(
                    status.message().contains("no pod uses it"),
                    "{}",
                    status.message()
                );
            }
            other => panic!("a staged volume was sent: {other:?}"),
        }
        assert!(!target.exists(), "nothing installed for a refused pull");
        node.node_unstage_volume(tonic::Request::new(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging_path,
        }))
        .await
        .unwrap();
        let report = receiver::pull(&peer, &trust, &source, &target, &fast(1))
            .await
            .expect("sent once unstaged");
        assert_eq!(report.size, 32 * MIB);
    }

    /// Nothing of the claim is left on node-b: no volume folder, no
    /// intent, no PV.
    async fn nothing_left(f: &Fake) {
        let pool = f.tmp.path().join("image");
        let left: Vec<_> = std::fs::read_dir(&pool)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "pool holds {left:?}");
        assert_eq!(intents(f).await, 0, "no intent");
        assert!(!f.requested(PV_POST), "no PV");
    }

    #[tokio::test]
    async fn a_digest_mismatch_rolls_back_volume_staging_and_intent() {
        let h = holder().await;
        let f = puller(&h, "image", fast(1)).await;
        h.service.cut_next_stream_after(3 * MIB);
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        f.posted();
        // What was received rots on disk before the pull resumes: the
        // digest over the whole content tells.
        let staging = volume_folder(&f).join(".transfer-incoming.img.part");
        let s = std::fs::OpenOptions::new()
            .write(true)
            .open(&staging)
            .unwrap();
        s.write_all_at(b"rot", 1024 + 7).unwrap();
        drop(s);
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "ProvisioningFailed"],
            "{posted:#?}"
        );
        let note = &posted[1].1;
        assert!(
            note.contains("content digest")
                && note.contains("nothing of it is left on node node-b"),
            "{note}"
        );
        nothing_left(&f).await;
    }

    #[tokio::test]
    async fn a_source_gone_from_its_node_rolls_back_and_says_so() {
        let h = holder().await;
        let f = puller(&h, "image", fast(3)).await;
        h.plugin
            .controller_service()
            .delete_snapshot(tonic::Request::new(DeleteSnapshotRequest {
                snapshot_id: h.snapshot.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(
            reasons(&posted),
            ["Pulling", "ProvisioningFailed"],
            "{posted:#?}"
        );
        assert!(
            posted[1].1.contains("no longer holds it"),
            "{}",
            posted[1].1
        );
        nothing_left(&f).await;
    }

    /// The claim's PATCH requests: its node choice moved to the holder.
    fn moved_to_holder(f: &Fake) -> bool {
        f.requests.lock().unwrap().iter().any(|r| {
            r.method == "PATCH"
                && r.path.ends_with("/persistentvolumeclaims/restore")
                && r.body.contains(HOLDER)
        })
    }

    #[tokio::test]
    async fn a_dir_class_is_not_pulled_into_and_the_claim_goes_to_the_holder() {
        let h = holder().await;
        let f = puller(&h, "dir", fast(3)).await;
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(reasons(&posted), ["ProvisioningFailed"], "{posted:#?}");
        let note = &posted[0].1;
        assert!(
            note.contains("dir volumes cannot be transferred between nodes")
                && note.contains("use a class of an image pool")
                && note.contains("moved to node-a"),
            "{note}"
        );
        assert!(moved_to_holder(&f));
        assert_eq!(
            std::fs::read_dir(f.tmp.path().join("pool")).map_or(0, |d| d.count()),
            0
        );
        nothing_left(&f).await;
    }

    #[tokio::test]
    async fn a_refuse_class_or_an_agent_without_trust_moves_the_claim_to_the_holder() {
        let h = holder().await;
        let mut f = puller(&h, "image", fast(3)).await;
        let refuse = class(
            "stead",
            &[("pool", "image"), ("crossNodeRestore", "refuse")],
            "WaitForFirstConsumer",
            "Delete",
        );
        let (classes, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(refuse));
        Arc::get_mut(&mut f.ctx).unwrap().classes = classes;
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(reasons(&posted), ["ProvisioningFailed"], "{posted:#?}");
        assert!(
            posted[0].1.contains("crossNodeRestore: refuse")
                && posted[0].1.contains("does not move data"),
            "{}",
            posted[0].1
        );
        assert!(moved_to_holder(&f));
        nothing_left(&f).await;

        std::fs::remove_dir_all(&h.trust_dir).unwrap();
        let f = puller(&h, "image", fast(3)).await;
        reconcile(restore(), f.ctx.clone()).await.unwrap();
        let posted = f.posted();
        assert_eq!(reasons(&posted), ["ProvisioningFailed"], "{posted:#?}");
        assert!(
            posted[0].1.contains("no transfer trust material")
                && posted[0].1.contains("stead-transfer-tls"),
            "{}",
            posted[0].1
        );
        assert!(moved_to_holder(&f));
        nothing_left(&f).await;
    }
}
