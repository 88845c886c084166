//! The provisioner inside every `stead node` agent: it turns the claims of
//! Stead StorageClasses that land on its node into volumes and bound
//! PersistentVolumes, deletes released volumes, reclaims leaks, and publishes
//! the node's free capacity for the scheduler. It talks to Kubernetes only
//! through kube-rs and to storage only through the CSI controller service.

mod backoff;
pub mod capacity;
pub mod claim;
pub mod class;
pub mod client;
pub mod crossnode;
mod events;
pub mod ledger;
pub mod moving;
pub mod nodeloss;
pub mod pv;
pub mod quantity;
mod reclaim;
mod reconcile;
pub mod schedulable;
pub mod scope;
pub mod snapshot_api;
mod snapshotter;
pub mod source;
pub mod stranded;
pub mod supervisor;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::{Notify, mpsc};

use crate::metrics::{Metrics, Outcome};
use crate::proto::csi::v1::controller_server::Controller as CsiController;

/// How the provisioner runs; every field has a flag in `stead node`.
#[derive(Debug, Clone)]
pub struct Config {
    /// This agent's Kubernetes node name.
    pub node: String,
    /// Claims (and PVs) reconciled at once.
    pub workers: u16,
    /// Where the provisioner keeps its intents (see `ledger`).
    pub state_dir: PathBuf,
    /// Namespace of the CSIStorageCapacity objects.
    pub capacity_namespace: String,
    /// How often capacity is re-published when nothing changes.
    pub capacity_interval: Duration,
    /// How long a volume may stay without PV or claim before it is reclaimed.
    pub leak_grace: Duration,
    /// The agent's own pod, for owner references (downward API).
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// The plugin's signal that a volume is no longer mounted on this node
    /// (`Plugin::freed`): a released volume kubelet was still unmounting is
    /// deleted on it. Not a flag; the default is never told.
    pub freed: crate::storage::Freed,
    /// How this agent pulls a claim's data from another node's agent
    /// (`crossnode`); `None`: it does not, and such a claim goes to the
    /// node that holds its data.
    pub transfer: Option<Arc<crossnode::Transfer>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("{op} of volume {volume} on node {node} failed: {code:?}: {message}")]
    Csi {
        op: &'static str,
        volume: String,
        node: String,
        code: tonic::Code,
        message: String,
    },
    #[error("PV {pv} exists already and is not the PV of claim {claim}: {mismatch}")]
    ForeignPv {
        pv: String,
        claim: String,
        mismatch: pv::PvMismatch,
    },
    #[error("PV {pv} conflicted on create but was gone when read back; retrying")]
    PvVanished { pv: String },
    #[error("watch of {0} ended")]
    WatchEnded(&'static str),
    #[error("{step}: {source}")]
    LegacyPvs { step: String, source: kube::Error },
}

impl Error {
    /// What failed, in a word: the `reason` of the reconcile error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "apiserver_refused",
            Error::Kube(_) => "apiserver_unreachable",
            Error::Ledger(_) => "ledger",
            Error::Csi { .. } => "csi",
            Error::ForeignPv { .. } => "foreign_pv",
            Error::PvVanished { .. } => "pv_vanished",
            Error::WatchEnded(_) => "watch_ended",
            Error::LegacyPvs { .. } => "legacy_pvs",
        }
    }
}

/// What every reconcile needs.
pub(crate) struct Ctx<C> {
    client: Client,
    csi: Arc<C>,
    config: Config,
    classes: Store<StorageClass>,
    /// The metadata of every claim (the claim watch is metadata only): a
    /// claim that concerns this node is read whole (see `claim::concerns`).
    claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    /// This node's PVs, selected by their node label (see `scope`).
    volumes: Store<PersistentVolume>,
    /// This agent's own Node (a watch of it alone; empty until synced, or
    /// when the node has no Node object).
    nodes: Store<Node>,
    /// Set when an Immediate claim was passed over because this node was
    /// not schedulable (or its labels did not match the class's
    /// allowedTopologies): the next time the node is schedulable, or its
    /// labels change, every claim is looked at again (see
    /// `schedulable::follow`).
    immediate_waiting: AtomicBool,
    events: events::Events,
    ledger: ledger::AsyncLedger,
    /// The volumes of `release` classes (see `ledger::NODE_LOSS`).
    releasable: ledger::AsyncLedger,
    capacity_changed: Arc<Notify>,
    /// Consecutive failures per object uid, for backoff.
    failures: Mutex<backoff::Backoffs>,
    /// The uids of the Immediate claims this node said it has no room for:
    /// said once per claim, not at every look again.
    no_room: Mutex<HashSet<String>>,
    /// The PVs this agent created that its PV watch may not show yet, with
    /// when: a claim event that comes between the create and the watch
    /// (the take's echo, the binder's writes) must not create it again (see
    /// [`Ctx::pv_known`]).
    made: Mutex<HashMap<String, std::time::Instant>>,
    /// The uids of the Immediate claims whose take this node has already
    /// put off once (see [`take_turn`]).
    staggered: Mutex<HashSet<String>>,
    /// How many nodes publish Stead's capacity (counted at each collection
    /// of abandoned capacity objects): the number of take turns.
    stead_nodes: AtomicU64,
    /// For the bound claims of this node read whole: when the size they
    /// were read with was written (`claim::Writes`), so that a change that
    /// cannot have grown one is not read again.
    sizes_read: Mutex<HashMap<String, SizeRead>>,
    /// The Immediate claims this node took from their metadata and gave
    /// back (by uid): their class and size, so that they are taken again
    /// only when this node could serve them.
    given_back: Mutex<HashMap<String, GivenBack>>,
    /// The claims being moved, from the claim watch: a claim made again
    /// under such a name gets no volume of its own (`moving::InFlight`).
    in_flight: Arc<moving::InFlight>,
    metrics: Arc<Metrics>,
}

/// See [`Ctx::sizes_read`]: when the size of the version read was written,
/// and that version.
#[derive(Debug, Clone)]
struct SizeRead {
    size: Timestamp,
    version: Option<String>,
}

/// See [`Ctx::given_back`].
#[derive(Debug, Clone)]
struct GivenBack {
    class: String,
    bytes: i64,
}

impl<C> Ctx<C> {
    /// This agent's Node, if known.
    fn own_node(&self) -> Option<Arc<Node>> {
        self.nodes
            .get(&reflector::ObjectRef::new(&self.config.node))
    }

    /// Exponential backoff per object: 1 s, 2 s, 4 s … 5 min.
    fn backoff(&self, uid: &str) -> Duration {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(uid, std::time::Instant::now())
    }

    /// As [`Ctx::backoff`], with how long the object has been failing.
    fn backoff_since(&self, uid: &str) -> (Duration, Duration) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed_since(uid, std::time::Instant::now())
    }

    /// The object succeeded or is being deleted: its backoff is forgotten.
    fn succeeded(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(uid);
    }

    /// The object is being deleted, or gone: what is kept of it goes (its
    /// backoff, its clocks: a claim gone before its PV was made was
    /// abandoned).
    fn forget(&self, uid: &str) {
        self.succeeded(uid);
        self.metrics.provisioning.finish(uid, Outcome::Abandoned);
        self.metrics.deletion.forget(uid);
        self.no_room
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.staggered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.sizes_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.given_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    /// What this node remembers of an Immediate claim it gave back.
    fn given_back(&self, uid: &str) -> Option<GivenBack> {
        self.given_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    /// This node gave back the Immediate claim of `uid` (of `class`, asking
    /// for `bytes`).
    fn give_back(&self, uid: &str, class: &str, bytes: i64) {
        self.given_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                uid.to_string(),
                GivenBack {
                    class: class.to_string(),
                    bytes,
                },
            );
    }

    /// When the size of the claim of `uid` was written, as this node last
    /// read the claim whole (a bound claim of this node), if it did.
    fn size_read(&self, uid: &str) -> Option<SizeRead> {
        self.sizes_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    /// A claim of this node whose volume is made was read whole as `meta`.
    fn read_size(
        &self,
        uid: &str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) {
        let mut read = self.sizes_read.lock().unwrap_or_else(|p| p.into_inner());
        match claim::Writes::of(meta).size {
            Some(size) => read.insert(
                uid.to_string(),
                SizeRead {
                    size,
                    version: meta.resource_version.clone(),
                },
            ),
            None => read.remove(uid),
        };
    }

    /// Whether PV `name` exists as far as this agent knows: its watch holds
    /// it, or this agent created it less than [`MADE_FOR`] ago (a PV
    /// deleted meanwhile by someone else is then found by the create's
    /// conflict, as before).
    fn pv_known(&self, name: &str) -> bool {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if self.volumes.get(&ObjectRef::new(name)).is_some() {
            made.remove(name);
            return true;
        }
        let now = std::time::Instant::now();
        made.retain(|_, at| now.saturating_duration_since(*at) < MADE_FOR);
        made.contains_key(name)
    }

    /// The claim's PV exists as far as this agent knows (see
    /// [`Ctx::pv_known`]).
    fn has_pv<K: Resource>(&self, pvc: &K) -> bool {
        claim::volume_name(pvc).is_some_and(|v| self.pv_known(&v))
    }

    /// This agent created PV `name` (or found its own there).
    fn made_pv(&self, name: &str) {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), std::time::Instant::now());
    }

    /// How long this node puts off its first take of Immediate claim
    /// `uid`, or `None` once it has (see [`take_turn`]).
    fn stagger(&self, uid: &str) -> Option<Duration> {
        let first = self
            .staggered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string());
        let slots = take_slots(self.stead_nodes.load(Ordering::Relaxed));
        let wait = take_turn(uid, &self.config.node, slots);
        (first && !wait.is_zero()).then_some(wait)
    }

    /// Whether this node is yet to say that it has no room for the claim of
    /// `uid` (and from now on, has said so).
    fn first_no_room(&self, uid: &str) -> bool {
        self.no_room
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string())
    }

    /// A reconcile of `controller` failed with `err`: counted, and its
    /// retry delay returned (see [`Ctx::backoff`]).
    fn failed(&self, controller: &'static str, uid: Option<String>, err: &Error) -> Duration {
        self.metrics.reconcile_error(controller, err.reason());
        self.backoff(&uid.unwrap_or_default())
    }
}

/// How long a PV this agent created counts as known before its watch shows
/// it (see [`Ctx::pv_known`]); the watch takes milliseconds.
const MADE_FOR: Duration = Duration::from_secs(60);

/// Turns of the first take of an Immediate claim: how many, and how far
/// apart. Every schedulable agent sees a new Immediate claim at once, and
/// only one take can win: the others are refused (409), one wasted request
/// per node and claim. Each node instead waits its turn, a slot drawn from
/// the claim and the node: the first to go takes the claim, and those whose
/// turn comes later have seen the take in their watch by then and send
/// nothing. Only nodes that drew the same first slot still race. With
/// three nodes and four slots the first take waits 70 ms on average.
/// There are as many slots as nodes publish Stead's capacity (at least
/// [`TAKE_SLOTS`], at most [`MAX_TAKE_SLOTS`]), so that on a large cluster
/// few nodes share the first slot: at 100 nodes with 4 slots, 25 raced for
/// every claim (`make bench-scale`: 95 agent requests per Immediate claim).
/// The cap bounds the wait when few of many nodes can serve a class: 6.4 s
/// at worst.
const TAKE_SLOTS: u64 = 4;
const MAX_TAKE_SLOTS: u64 = 64;
const TAKE_SLOT: Duration = Duration::from_millis(100);

/// The take turns for `nodes` nodes of Stead's (0 when not counted yet).
fn take_slots(nodes: u64) -> u64 {
    nodes.clamp(TAKE_SLOTS, MAX_TAKE_SLOTS)
}

/// This node's turn for claim `uid` (see [`TAKE_SLOTS`]): the same on every
/// look and after a restart, different from node to node.
fn take_turn(uid: &str, node: &str, slots: u64) -> Duration {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the same turn in every process
    // of one build (another Rust release may hash otherwise, which only
    // shifts the turns of agents of different versions).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (uid, node).hash(&mut h);
    TAKE_SLOT * (h.finish() % slots.max(1)) as u32
}

/// Runs the provisioner until `shutdown` resolves; tells `status` once its
/// watches are synced. An error ends the run (see `supervisor`, which
/// starts it again); errors of single objects never do.
pub async fn run<C, F>(
    client: Client,
    csi: Arc<C>,
    config: Config,
    metrics: Arc<Metrics>,
    status: Arc<supervisor::Status>,
    shutdown: F,
) -> Result<(), Error>
where
    C: CsiController,
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let ledger = ledger::AsyncLedger::open(&config.state_dir).await?;
    let releasable = ledger::AsyncLedger::open_named(&config.state_dir, ledger::NODE_LOSS).await?;
    let shutdown = shutdown.shared();

    // Before any watch: every PV of this node carries its node's label, so
    // that the label-selected PV watch below holds all of them (see `scope`).
    let labelled = tokio::select! {
        r = scope::label_legacy_pvs(&client, &config.node) => r?,
        // The apiserver may be unreachable: a signal must still stop us.
        _ = shutdown.clone() => return Ok(()),
    };

    // One watch of the StorageClasses: its store, the capacity publisher's
    // signal and the claims controller's re-trigger all follow it.
    let (classes, class_writer) = reflector::store_shared(CLASS_EVENTS);
    let class_changes = class_writer
        .subscribe()
        .expect("a shared store gives subscribers");
    let class_events = watcher(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect_shared(class_writer)
    .applied_objects();

    // Only this agent's own Node: whether it is schedulable decides if it
    // takes Immediate claims, and explains pods stranded from its volumes.
    let (nodes, node_writer) = reflector::store();
    let node_events = reflector::reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", config.node)),
        ),
    )
    .default_backoff();
    // The node turned schedulable: the claims it passed over meanwhile
    // (Immediate claims, which nothing else re-triggers) are looked at again.
    let (resync, resync_rx) = mpsc::channel::<()>(1);

    // Only this node's PVs, by their label.
    let volumes_ctrl = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        scope::pv_watch(&labelled, &config.node),
    )
    .with_config(controller::Config::default().concurrency(config.workers));
    let volumes = volumes_ctrl.store();
    // A volume that kubelet stops using: its PV (if any, and released) is
    // reconciled at once, not at the backoff of its refused deletion.
    let freed = {
        let volumes = volumes.clone();
        tokio_stream::wrappers::BroadcastStream::new(config.freed.subscribe()).filter_map(
            move |id| {
                let pv = id.ok().and_then(|id| {
                    volumes
                        .state()
                        .into_iter()
                        .find(|pv| pv::stead_volume_handle(pv) == Some(id.as_str()))
                        .map(|pv| ObjectRef::from_obj(&*pv))
                });
                std::future::ready(pv)
            },
        )
    };
    let volumes_ctrl = volumes_ctrl.reconcile_on(freed);

    // Every claim, as metadata only: the few that concern this node are
    // read whole by the reconcile (`reconcile::reconcile_meta`).
    // Of those, the store keeps the ones of this node (`claim::kept_in_store`):
    // a claim that stops concerning it leaves the store as if deleted.
    let (claims, claim_writer) = reflector::store();
    let dropped = {
        let (volumes, node) = (volumes.clone(), config.node.clone());
        move |c: &PartialObjectMeta<PersistentVolumeClaim>| {
            claim::dropped_from_store(c, &node, has_pv(&volumes, c))
        }
    };
    let in_flight = Arc::new(moving::InFlight::default());
    let seen = in_flight.clone();
    let claim_events = watcher(
        Api::<PartialObjectMeta<PersistentVolumeClaim>>::all(client.clone()),
        watcher::Config::default(),
    )
    .filter_map(move |event| {
        // Every claim's event, before the store keeps this node's.
        if let Ok(e) = &event {
            seen.observe(e);
        }
        std::future::ready(match event {
            Ok(watcher::Event::InitApply(c)) if dropped(&c).is_some() => None,
            Ok(watcher::Event::Apply(c)) => match dropped(&c) {
                // A change that makes a claim another node's (another
                // agent took it, the scheduler chose elsewhere): this
                // agent's verdict on it, logged as the reconcile logs its
                // own, since the reconcile will not see it again.
                Some(why) => {
                    tracing::debug!(pvc = %claim::claim_key(&c), why,
                        "skipped: dropped from this node's claim store");
                    Some(Ok(watcher::Event::Delete(c)))
                }
                None => Some(Ok(watcher::Event::Apply(c))),
            },
            other => Some(other),
        })
    })
    .modify(|c| claim::keep_what_is_read(&mut c.metadata))
    .default_backoff()
    .reflect(claim_writer)
    .applied_objects();
    // A Stead StorageClass created again (fixed) after its claims
    // re-triggers the claims of this node still waiting for a volume.
    let pending = {
        let (claims, volumes, node) = (claims.clone(), volumes.clone(), config.node.clone());
        move |sc: Arc<StorageClass>| {
            if !class::is_stead(&sc) {
                return vec![];
            }
            claims
                .state()
                .into_iter()
                .filter(|c| waits_here(c, &volumes, &node))
                .map(|c| ObjectRef::from_obj(&*c))
                .collect::<Vec<_>>()
        }
    };
    let claims_ctrl = Controller::for_stream(claim_events, claims.clone())
        .with_config(controller::Config::default().concurrency(config.workers))
        .reconcile_all_on(tokio_stream::wrappers::ReceiverStream::new(resync_rx))
        .watches_shared_stream(class_changes, pending);

    let reporter = Reporter {
        controller: crate::DRIVER_NAME.to_string(),
        instance: Some(
            config
                .pod_name
                .clone()
                .unwrap_or_else(|| config.node.clone()),
        ),
    };
    let (events, record_events) =
        events::Events::new(Recorder::new(client.clone(), reporter), metrics.clone());
    let ctx = Arc::new(Ctx {
        events,
        client,
        csi,
        config,
        classes: classes.clone(),
        claims,
        volumes,
        nodes,
        immediate_waiting: AtomicBool::new(false),
        stead_nodes: AtomicU64::new(0),
        ledger,
        releasable,
        capacity_changed: Arc::new(Notify::new()),
        failures: Mutex::default(),
        no_room: Mutex::default(),
        staggered: Mutex::default(),
        made: Mutex::default(),
        sizes_read: Mutex::default(),
        given_back: Mutex::default(),
        in_flight,
        metrics,
    });

    tracing::info!(
        node = %ctx.config.node,
        workers = ctx.config.workers,
        "provisioner started"
    );

    let class_watch = {
        let ctx = ctx.clone();
        async move {
            let mut events = std::pin::pin!(class_events);
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(sc) if class::is_stead(&sc) => ctx.capacity_changed.notify_one(),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "StorageClass watch error"),
                }
            }
        }
    };
    // Claims are looked at only once the classes are known: a claim whose
    // class is not in the store yet would be skipped until it next changes.
    let mut class_watch = tokio::spawn(class_watch);
    let record_events = tokio::spawn(record_events);
    tokio::select! {
        r = classes.wait_until_ready() => {
            if r.is_err() {
                return Err(Error::WatchEnded("StorageClasses"));
            }
        }
        _ = &mut class_watch => return Err(Error::WatchEnded("StorageClasses")),
        // The apiserver may be unreachable: a signal must still stop us.
        _ = shutdown.clone() => {
            class_watch.abort();
            record_events.abort();
            return Ok(());
        }
    }
    status.serving();
    let claims_run = claims_ctrl
        .graceful_shutdown_on(shutdown.clone())
        .run(
            reconcile::reconcile_meta,
            reconcile::error_policy,
            ctx.clone(),
        )
        .for_each(|r| {
            forget_if_gone(&ctx, &r);
            async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "claim reconcile");
                }
            }
        });
    let volumes_run = volumes_ctrl
        .graceful_shutdown_on(shutdown.clone())
        .run(reclaim::reconcile, reclaim::error_policy, ctx.clone())
        .for_each(|r| {
            forget_if_gone(&ctx, &r);
            async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "volume reconcile");
                }
            }
        });
    let capacity = capacity::run(ctx.clone());
    let reaper = reclaim::reap_leaks(ctx.clone());
    let node_changed = Arc::new(Notify::new());
    let own_node = schedulable::follow(ctx.clone(), node_events, resync, node_changed.clone());
    let stranded = stranded::run(ctx.clone(), node_changed);
    let snapshots = snapshotter::run(ctx.clone());
    let node_loss = nodeloss::run(ctx.clone());
    let drain = moving::drain(ctx.clone());

    tokio::select! {
        _ = async { tokio::join!(claims_run, volumes_run) } => {}
        _ = &mut class_watch => return Err(Error::WatchEnded("StorageClasses")),
        // These loop forever, logging what fails and going on.
        _ = capacity => {}
        _ = reaper => {}
        _ = own_node => {}
        _ = stranded => {}
        _ = snapshots => {}
        _ = node_loss => {}
        _ = drain => {}
        _ = shutdown => {}
    }
    class_watch.abort();
    record_events.abort();
    tracing::info!("provisioner stopped");
    Ok(())
}

/// Events of the StorageClass watch buffered for the claims controller
/// before the watch waits for it (classes are few).
const CLASS_EVENTS: usize = 256;

/// Whether this node's PV store (`volumes`) holds the PV of claim `pvc`.
fn has_pv<K: Resource>(volumes: &Store<PersistentVolume>, pvc: &K) -> bool {
    claim::volume_name(pvc).is_some_and(|v| volumes.get(&ObjectRef::new(&v)).is_some())
}

/// Whether a claim (its metadata) waits for a volume of `node`: not being
/// deleted, not bound, and read whole by its reconcile.
fn waits_here(
    pvc: &PartialObjectMeta<PersistentVolumeClaim>,
    volumes: &Store<PersistentVolume>,
    node: &str,
) -> bool {
    let meta = pvc.meta();
    meta.deletion_timestamp.is_none()
        && !meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(claim::ANN_BIND_COMPLETED))
        && matches!(
            claim::concerns(pvc, node, has_pv(volumes, pvc)),
            claim::Concern::Read | claim::Concern::Take
        )
}

/// A retry came due for an object that is gone from the store (deleted
/// while it waited for its backoff): what is kept of it goes with it (see
/// [`Ctx::forget`]).
fn forget_if_gone<C, T, E1, E2>(ctx: &Ctx<C>, r: &Result<T, controller::Error<E1, E2>>)
where
    E1: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    if let Err(controller::Error::ObjectNotFound(obj)) = r
        && let Some(uid) = &obj.extra.uid
    {
        ctx.forget(uid);
    }
}

/// Maps a CSI status to the provisioner's error, naming the volume and node.
pub(crate) fn csi_error(op: &'static str, volume: &str, node: &str, s: tonic::Status) -> Error {
    Error::Csi {
        op,
        volume: volume.to_string(),
        node: node.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! A provisioner context for reconcile tests: the real plugin on one
    //! `dir` pool in a temp dir, and a fake apiserver that says yes.

    use std::sync::Mutex as StdMutex;

    use kube::runtime::events::Event;
    use kube::runtime::reflector::store::Writer;

    use super::*;

    #[test]
    fn each_node_takes_an_immediate_claim_in_a_turn_of_its_own() {
        let uid = "0a1b2c3d-0000-4000-8000-000000000001";
        assert_eq!(
            take_turn(uid, "node-a", TAKE_SLOTS),
            take_turn(uid, "node-a", TAKE_SLOTS),
            "stable"
        );
        // Over many claims, every slot is drawn, and a node's turn does not
        // follow another node's.
        let turns = |node: &str| -> Vec<Duration> {
            (0..400)
                .map(|i| take_turn(&format!("uid-{i}"), node, TAKE_SLOTS))
                .collect()
        };
        let (a, b) = (turns("node-a"), turns("node-b"));
        for slot in 0..TAKE_SLOTS as u32 {
            let n = a.iter().filter(|t| **t == TAKE_SLOT * slot).count();
            assert!((50..150).contains(&n), "slot {slot}: {n} of 400");
        }
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!((50..150).contains(&same), "{same} of 400 turns equal");
    }

    #[test]
    fn a_large_cluster_has_a_turn_per_node_up_to_the_cap() {
        assert_eq!(take_slots(0), TAKE_SLOTS, "not counted yet");
        assert_eq!(take_slots(3), TAKE_SLOTS);
        assert_eq!(take_slots(20), 20);
        assert_eq!(take_slots(100), MAX_TAKE_SLOTS);
        // With a slot per node, a claim's first slot is shared by few: over
        // 200 claims of 20 nodes, on average under 2 nodes race.
        let nodes: Vec<String> = (0..20).map(|i| format!("node-{i}")).collect();
        let racing: usize = (0..200)
            .map(|c| {
                let uid = format!("uid-{c}");
                let turns: Vec<Duration> = nodes
                    .iter()
                    .map(|n| take_turn(&uid, n, take_slots(20)))
                    .collect();
                let first = turns.iter().min().copied().unwrap_or_default();
                turns.iter().filter(|t| **t == first).count()
            })
            .sum();
        assert!(racing < 2 * 200, "{racing} racing takes for 200 claims");
        assert!(take_turn("uid", "node-a", 64) < TAKE_SLOT * 64);
    }
    use crate::csi::{self, ControllerService, Plugin};
    use crate::metrics::rpc::ObservedController;
    use crate::metrics::{self, apiserver};
    use crate::storage::{BackendKind, PoolSpec, Reserve};

    pub const NODE: &str = "node-a";

    pub(crate) type TestCtx = Ctx<ObservedController<ControllerService>>;

    /// A request the fake apiserver got.
    #[derive(Debug, Clone)]
    pub(crate) struct Seen {
        pub method: String,
        pub path: String,
        pub query: String,
        pub body: String,
    }

    /// A test's own answer to a request (method, path, query): status and
    /// body; `None` leaves it to the default (see [`apiserver`]).
    pub(crate) type Answer =
        Arc<dyn Fn(&http::Method, &str, &str) -> Option<(u16, String)> + Send + Sync>;

    /// The context, with the writer of its PV store and the requests the
    /// fake apiserver got.
    pub(crate) struct Fake {
        pub ctx: Arc<TestCtx>,
        pub volumes: Writer<PersistentVolume>,
        pub requests: Arc<StdMutex<Vec<Seen>>>,
        posted: StdMutex<mpsc::Receiver<(k8s_openapi::api::core::v1::ObjectReference, Event)>>,
        /// The node service of the same plugin (to stage a volume).
        pub node: csi::NodeService,
        /// Pool, kubelet dir and state live under it.
        pub tmp: tempfile::TempDir,
    }

    impl Fake {
        /// The metrics' text, checked to hold each of `lines`.
        pub fn metrics(&self, lines: &[&str]) -> String {
            let text = self.ctx.metrics.encode().unwrap();
            for line in lines {
                assert!(text.lines().any(|l| l == *line), "{line} in:\n{text}");
            }
            text
        }

        /// The events posted since last asked: (reason, note).
        pub fn posted(&self) -> Vec<(String, String)> {
            let mut rx = self.posted.lock().unwrap();
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|(_, e)| (e.reason, e.note.unwrap_or_default()))
                .collect()
        }

        /// Whether the apiserver got `request` ("METHOD path").
        pub fn requested(&self, request: &str) -> bool {
            self.requests
                .lock()
                .unwrap()
                .iter()
                .any(|r| format!("{} {}", r.method, r.path) == request)
        }
    }

    /// Answers what `answer` answers; every other request with 200 (201 for
    /// a create) and an object of the kind its path names, as an apiserver
    /// that takes everything. Each request is kept in `requests`.
    fn apiserver(
        requests: Arc<StdMutex<Vec<Seen>>>,
        answer: Option<Answer>,
    ) -> impl tower::Service<
        http::Request<kube::client::Body>,
        Response = http::Response<String>,
        Error = std::convert::Infallible,
        Future = impl Future + Send,
    > + Send
    + Clone {
        tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (requests, answer) = (requests.clone(), answer.clone());
            async move {
                let (parts, body) = req.into_parts();
                let path = parts.uri.path().to_string();
                let query = parts.uri.query().unwrap_or_default().to_string();
                let body = body.collect_bytes().await.unwrap_or_default();
                requests.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: path.clone(),
                    query: query.clone(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let (status, body) = answer
                    .and_then(|a| a(&parts.method, &path, &query))
                    .unwrap_or_else(|| {
                        let kind = if path.contains("persistentvolumeclaims") {
                            "PersistentVolumeClaim"
                        } else {
                            "PersistentVolume"
                        };
                        let status = if parts.method == http::Method::POST {
                            201
                        } else {
                            200
                        };
                        let body = format!(
                            r#"{{"apiVersion":"v1","kind":"{kind}","metadata":{{"name":"x"}}}}"#
                        );
                        (status, body)
                    });
                Ok(http::Response::builder().status(status).body(body).unwrap())
            }
        })
    }

    /// A client of the fake apiserver (see [`apiserver`]), with what it got.
    pub(crate) fn fake_client(answer: Option<Answer>) -> (Client, Arc<StdMutex<Vec<Seen>>>) {
        let requests = Arc::default();
        let client = Client::new(apiserver(Arc::clone(&requests), answer), "default");
        (client, requests)
    }

    /// The plugin's controller service on one `dir` pool under `tmp`, as
    /// the provisioner calls it.
    fn controller(
        tmp: &std::path::Path,
        metrics: &Arc<metrics::Metrics>,
    ) -> Arc<ObservedController<ControllerService>> {
        controller_and_node(tmp, metrics).0
    }

    /// [`controller`] and the node service of the same plugin.
    fn controller_and_node(
        tmp: &std::path::Path,
        metrics: &Arc<metrics::Metrics>,
    ) -> (
        Arc<ObservedController<ControllerService>>,
        csi::NodeService,
        crate::storage::Freed,
    ) {
        let (controller, plugin) = plugin_on(NODE, &[("dir", BackendKind::Dir)], tmp, metrics);
        (controller, plugin.node_service(), plugin.freed())
    }

    /// The real plugin of node `node` with `pools` (name, backend), each in
    /// `tmp/<name>` (the first, `dir`, in `tmp/pool` as it always was), and
    /// its controller service as the provisioner calls it.
    pub(crate) fn plugin_on(
        node: &str,
        pools: &[(&str, BackendKind)],
        tmp: &std::path::Path,
        metrics: &Arc<metrics::Metrics>,
    ) -> (Arc<ObservedController<ControllerService>>, Plugin) {
        let plugin = Plugin::new(csi::Config {
            node_id: node.into(),
            pools: pools
                .iter()
                .enumerate()
                .map(|(i, (name, backend))| {
                    let dir = if i == 0 && *name == "dir" {
                        tmp.join("pool")
                    } else {
                        tmp.join(name)
                    };
                    PoolSpec::new(name, *backend, dir).with_reserve(Reserve::Bytes(0))
                })
                .collect(),
            max_volumes_per_node: None,
            kubelet_dir: tmp.join("kubelet"),
        })
        .unwrap();
        let controller = Arc::new(ObservedController::new(
            plugin.controller_service(),
            metrics.clone(),
        ));
        (controller, plugin)
    }

    /// The provisioner's config for node [`NODE`], its state under `tmp`.
    fn config(tmp: &std::path::Path) -> Config {
        Config {
            node: NODE.into(),
            workers: 1,
            state_dir: tmp.join("state"),
            capacity_namespace: "stead-system".into(),
            capacity_interval: Duration::from_secs(60),
            leak_grace: Duration::from_secs(60),
            pod_name: None,
            pod_namespace: None,
            freed: Default::default(),
            transfer: None,
        }
    }

    /// A fresh context whose class store holds `classes` and whose node
    /// store this node (Ready), on the fake apiserver (`answer`, see
    /// [`apiserver`]).
    pub(crate) async fn fake_answering(classes: &[StorageClass], answer: Option<Answer>) -> Fake {
        fake_node(NODE, &[("dir", BackendKind::Dir)], classes, answer, |_| {
            None
        })
        .await
    }

    /// [`fake_answering`] for node `node` with `pools` (see [`plugin_on`]),
    /// pulling from other nodes as `transfer` makes it (given the plugin).
    pub(crate) async fn fake_node(
        node: &str,
        pools: &[(&str, BackendKind)],
        classes: &[StorageClass],
        answer: Option<Answer>,
        transfer: impl FnOnce(&Plugin) -> Option<crossnode::Transfer>,
    ) -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        fake_node_in(tmp, node, pools, classes, answer, transfer).await
    }

    /// [`fake_node`] on the pools and state an earlier one left in `tmp`:
    /// the agent of that node, restarted.
    pub(crate) async fn fake_node_in(
        tmp: tempfile::TempDir,
        node: &str,
        pools: &[(&str, BackendKind)],
        classes: &[StorageClass],
        answer: Option<Answer>,
        transfer: impl FnOnce(&Plugin) -> Option<crossnode::Transfer>,
    ) -> Fake {
        let metrics = Arc::new(metrics::Metrics::new(Vec::new));
        let requests = Arc::default();
        let service = tower::Layer::layer(
            &apiserver::layer(metrics.clone()),
            apiserver(Arc::clone(&requests), answer),
        );
        let client = Client::new(service, "default");
        let (class_store, mut class_writer) = reflector::store();
        for sc in classes {
            class_writer.apply_watcher_event(&watcher::Event::Apply(sc.clone()));
        }
        let (volume_store, volumes) = reflector::store();
        let (node_store, mut nodes) = reflector::store();
        nodes.apply_watcher_event(&watcher::Event::Apply(schedulable::tests::node(node)));
        // Posted events are queued for the test to read, never recorded.
        let (events, posted) = events::Events::queued(metrics.clone());
        let (csi, plugin) = plugin_on(node, pools, tmp.path(), &metrics);
        let config = Config {
            node: node.into(),
            freed: plugin.freed(),
            transfer: transfer(&plugin).map(Arc::new),
            ..config(tmp.path())
        };
        let ctx = Ctx {
            client,
            csi,
            ledger: ledger::AsyncLedger::open(&config.state_dir).await.unwrap(),
            releasable: ledger::AsyncLedger::open_named(&config.state_dir, ledger::NODE_LOSS)
                .await
                .unwrap(),
            config,
            classes: class_store,
            claims: reflector::store().0,
            volumes: volume_store,
            nodes: node_store,
            immediate_waiting: AtomicBool::new(false),
            stead_nodes: AtomicU64::new(0),
            events,
            capacity_changed: Arc::new(Notify::new()),
            failures: Mutex::default(),
            no_room: Mutex::default(),
            staggered: Mutex::default(),
            made: Mutex::default(),
            sizes_read: Mutex::default(),
            given_back: Mutex::default(),
            in_flight: Default::default(),
            metrics,
        };
        Fake {
            ctx: Arc::new(ctx),
            volumes,
            requests,
            posted: StdMutex::new(posted),
            node: plugin.node_service(),
            tmp,
        }
    }

    /// [`fake_answering`] with an apiserver that takes everything.
    pub(crate) async fn fake(classes: &[StorageClass]) -> Fake {
        fake_answering(classes, None).await
    }

    /// An error status of the apiserver, as it answers `code`.
    pub(crate) fn status(code: u16, reason: &str) -> (u16, String) {
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{reason} (fake apiserver)"), "reason": reason, "code": code,
        });
        (code, body.to_string())
    }

    /// The unlabelled PV this node's agent made before PVs carried their
    /// node's label.
    pub(crate) fn legacy_pv() -> PersistentVolume {
        let claim = claim::tests::pvc("data-0", "16Mi", Some(NODE));
        let mut made = pv::tests::made_for(&claim, NODE);
        made.metadata.labels = None;
        made
    }

    /// An apiserver whose only unlabelled PV is [`legacy_pv`] and that
    /// answers a label patch with `patched`; every other request as
    /// [`apiserver`] does.
    fn with_legacy_pv(patched: (u16, String)) -> Answer {
        Arc::new(move |method: &http::Method, path: &str, query: &str| {
            if *method == http::Method::PATCH {
                return Some(patched.clone());
            }
            (*method == http::Method::GET
                && path == "/api/v1/persistentvolumes"
                && query.contains("labelSelector=%21"))
            .then(|| {
                let list = serde_json::json!({
                    "apiVersion": "v1", "kind": "PersistentVolumeList",
                    "metadata": {}, "items": [legacy_pv()],
                });
                (200, list.to_string())
            })
        })
    }

    /// Runs the provisioner on the fake apiserver (`answer`) until it ends or
    /// `stop` resolves; its result and the requests it made.
    async fn run_until(
        answer: Answer,
        stop: impl Future<Output = ()> + Send + Sync + 'static,
    ) -> (Result<(), Error>, Vec<Seen>) {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = Arc::new(metrics::Metrics::new(Vec::new));
        let (client, seen) = fake_client(Some(answer));
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            run(
                client,
                controller(tmp.path(), &metrics),
                config(tmp.path()),
                metrics,
                Arc::new(supervisor::Status::default()),
                stop,
            ),
        )
        .await
        .expect("the provisioner stops");
        let seen = seen.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn nothing_is_watched_before_this_nodes_unlabelled_pvs_are_labelled() {
        // The label patch refused: the provisioner does not start.
        let (result, seen) = run_until(
            with_legacy_pv(status(403, "Forbidden")),
            std::future::pending(),
        )
        .await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, Error::LegacyPvs { .. }),
            "the start fails on the label: {err}"
        );
        let asked: Vec<String> = seen
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        let pv = legacy_pv().metadata.name.unwrap();
        assert_eq!(
            asked,
            [
                "GET /api/v1/persistentvolumes".to_string(),
                format!("PATCH /api/v1/persistentvolumes/{pv}"),
            ],
            "no watch, no reclaim, no capacity before the labelling: {seen:?}"
        );

        // Labelled: the watches start only then.
        let watching = Arc::new(Notify::new());
        let answer = {
            let (legacy, watching) = (with_legacy_pv((200, "{}".into())), watching.clone());
            Arc::new(move |method: &http::Method, path: &str, query: &str| {
                if path.ends_with("/storageclasses") {
                    watching.notify_one();
                }
                legacy(method, path, query)
            }) as Answer
        };
        let (result, seen) = run_until(answer, async move { watching.notified().await }).await;
        result.unwrap();
        let patch = seen.iter().position(|r| r.method == "PATCH").unwrap();
        let first_watch = seen
            .iter()
            .position(|r| r.method == "GET" && !r.query.contains("labelSelector=%21"))
            .unwrap();
        assert!(
            patch < first_watch,
            "the label first, then the watches: {seen:?}"
        );
    }
}
