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
mod events;
pub mod ledger;
pub mod pv;
pub mod quantity;
mod reclaim;
mod reconcile;
pub mod schedulable;
pub mod snapshot_api;
mod snapshotter;
pub mod source;
pub mod stranded;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, ResourceExt};
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
        }
    }
}

/// What every reconcile needs.
pub(crate) struct Ctx<C> {
    client: Client,
    csi: Arc<C>,
    config: Config,
    classes: Store<StorageClass>,
    claims: Store<PersistentVolumeClaim>,
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
    capacity_changed: Arc<Notify>,
    /// Consecutive failures per object uid, for backoff.
    failures: Mutex<backoff::Backoffs>,
    metrics: Arc<Metrics>,
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

    /// The object succeeded or is being deleted: its backoff is forgotten.
    fn succeeded(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(uid);
    }

    /// A reconcile of `controller` failed with `err`: counted, and its
    /// retry delay returned (see [`Ctx::backoff`]).
    fn failed(&self, controller: &'static str, uid: Option<String>, err: &Error) -> Duration {
        self.metrics.reconcile_error(controller, err.reason());
        self.backoff(&uid.unwrap_or_default())
    }
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
    let shutdown = shutdown.shared();

    let (classes, class_writer) = reflector::store();
    let class_events = reflector::reflector(
        class_writer,
        watcher(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
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

    let claims_ctrl = Controller::new(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller::Config::default().concurrency(config.workers))
    .reconcile_all_on(tokio_stream::wrappers::ReceiverStream::new(resync_rx));
    let claims = claims_ctrl.store();
    // A StorageClass created (or fixed) after its claims re-triggers them.
    let claims_of_class = claims.clone();
    let claims_ctrl = claims_ctrl.watches(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
        move |sc| {
            let name = sc.name_any();
            claims_of_class
                .state()
                .into_iter()
                .filter(|c| claim::class_name(c) == Some(name.as_str()))
                .map(|c| reflector::ObjectRef::from_obj(&*c))
                .collect::<Vec<_>>()
        },
    );

    let volumes_ctrl = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(controller::Config::default().concurrency(config.workers));
    let volumes = volumes_ctrl.store();

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
        ledger,
        capacity_changed: Arc::new(Notify::new()),
        failures: Mutex::default(),
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
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
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

    tokio::select! {
        _ = async { tokio::join!(claims_run, volumes_run) } => {}
        _ = &mut class_watch => return Err(Error::WatchEnded("StorageClasses")),
        // These loop forever, logging what fails and going on.
        _ = capacity => {}
        _ = reaper => {}
        _ = own_node => {}
        _ = stranded => {}
        _ = snapshots => {}
        _ = shutdown => {}
    }
    class_watch.abort();
    record_events.abort();
    tracing::info!("provisioner stopped");
    Ok(())
}

/// A retry came due for an object that is gone from the store (deleted
/// while it waited for its backoff): its backoff entry goes with it, and
/// its clock: a claim gone before its PV was made was abandoned.
fn forget_if_gone<C, T, E1, E2>(ctx: &Ctx<C>, r: &Result<T, controller::Error<E1, E2>>)
where
    E1: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    if let Err(controller::Error::ObjectNotFound(obj)) = r
        && let Some(uid) = &obj.extra.uid
    {
        ctx.succeeded(uid);
        ctx.metrics.provisioning.finish(uid, Outcome::Abandoned);
        ctx.metrics.deletion.forget(uid);
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

    use kube::runtime::reflector::store::Writer;

    use super::*;
    use crate::csi::{self, ControllerService, Plugin};
    use crate::metrics::rpc::ObservedController;
    use crate::metrics::{self, apiserver};
    use crate::storage::{BackendKind, PoolSpec, Reserve};

    pub const NODE: &str = "node-a";

    pub(crate) type TestCtx = Ctx<ObservedController<ControllerService>>;

    /// The context, with the writer of its PV store and the requests the
    /// fake apiserver got ("METHOD path").
    pub(crate) struct Fake {
        pub ctx: Arc<TestCtx>,
        pub volumes: Writer<PersistentVolume>,
        pub requests: Arc<StdMutex<Vec<String>>>,
        _tmp: tempfile::TempDir,
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

        pub fn requested(&self, request: &str) -> bool {
            self.requests.lock().unwrap().iter().any(|r| r == request)
        }
    }

    /// Answers every request with 200 (201 for a create) and an object of
    /// the kind its path names, as an apiserver that takes everything.
    fn apiserver(
        requests: Arc<StdMutex<Vec<String>>>,
    ) -> impl tower::Service<
        http::Request<kube::client::Body>,
        Response = http::Response<String>,
        Error = std::convert::Infallible,
        Future = impl Future + Send,
    > + Send
    + Clone {
        tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let path = req.uri().path().to_string();
            requests
                .lock()
                .unwrap()
                .push(format!("{} {path}", req.method()));
            let kind = if path.contains("persistentvolumeclaims") {
                "PersistentVolumeClaim"
            } else {
                "PersistentVolume"
            };
            let status = if req.method() == http::Method::POST {
                201
            } else {
                200
            };
            let body =
                format!(r#"{{"apiVersion":"v1","kind":"{kind}","metadata":{{"name":"x"}}}}"#);
            async move { Ok(http::Response::builder().status(status).body(body).unwrap()) }
        })
    }

    /// A fresh context whose class store holds `classes`.
    pub(crate) async fn fake(classes: &[StorageClass]) -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        let plugin = Plugin::new(csi::Config {
            node_id: NODE.into(),
            pools: vec![
                PoolSpec::new("dir", BackendKind::Dir, tmp.path().join("pool"))
                    .with_reserve(Reserve::Bytes(0)),
            ],
            max_volumes_per_node: None,
            kubelet_dir: tmp.path().join("kubelet"),
        })
        .unwrap();
        let metrics = Arc::new(metrics::Metrics::new(Vec::new));
        let requests = Arc::default();
        let service = tower::Layer::layer(
            &apiserver::layer(metrics.clone()),
            apiserver(Arc::clone(&requests)),
        );
        let client = Client::new(service, "default");
        let (class_store, mut class_writer) = reflector::store();
        for sc in classes {
            class_writer.apply_watcher_event(&watcher::Event::Apply(sc.clone()));
        }
        let (volume_store, volumes) = reflector::store();
        let reporter = Reporter {
            controller: crate::DRIVER_NAME.into(),
            instance: None,
        };
        // The events' drain is not run: they stay queued.
        let (events, _drain) =
            events::Events::new(Recorder::new(client.clone(), reporter), metrics.clone());
        let config = Config {
            node: NODE.into(),
            workers: 1,
            state_dir: tmp.path().join("state"),
            capacity_namespace: "stead-system".into(),
            capacity_interval: Duration::from_secs(60),
            leak_grace: Duration::from_secs(60),
            pod_name: None,
            pod_namespace: None,
        };
        let ctx = Ctx {
            client,
            csi: Arc::new(ObservedController::new(
                plugin.controller_service(),
                metrics.clone(),
            )),
            ledger: ledger::AsyncLedger::open(&config.state_dir).await.unwrap(),
            config,
            classes: class_store,
            claims: reflector::store().0,
            volumes: volume_store,
            nodes: reflector::store().0,
            immediate_waiting: AtomicBool::new(false),
            events,
            capacity_changed: Arc::new(Notify::new()),
            failures: Mutex::default(),
            metrics,
        };
        Fake {
            ctx: Arc::new(ctx),
            volumes,
            requests,
            _tmp: tmp,
        }
    }
}
