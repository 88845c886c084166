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
        Err(e) => {
            let note = format!(
                "node {node} cannot receive the data of {} into volume {id} for claim {key}: {e}",
                plan.what
            );
            return rollback(ctx, pvc, id, None, note).await;
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
                    rollback(ctx, pvc, id, Some(&target), note).await
                }
                Outcome::Untransferable(why) => {
                    let note = format!(
                        "node {node} could not pull {} from node {holder} for claim {key}: {why}",
                        plan.what
                    );
                    let action = rollback(ctx, pvc, id, Some(&target), note).await?;
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
            "node {node} received {} of data ({} volume{}) from node {holder} in {secs:.1} s ({rate:.1} MB/s); content digest verified",
            quantity::human(report.received_bytes as i64),
            quantity::human(report.size as i64),
            if report.resumed_from > 0 {
                format!(", resumed at {}", quantity::human(report.resumed_from as i64))
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
            rollback(ctx, pvc, id, Some(target), note).await
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
    target: Option<&std::path::Path>,
    note: String,
) -> Result<Result<(), Action>, Error> {
    let node = &ctx.config.node;
    if let Some(target) = target
        && let Err(e) = transfer::rollback(target)
    {
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
