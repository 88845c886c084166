//! The agent's metrics: every family in one [`Registry`], served by the
//! health endpoint's `/metrics` in the OpenMetrics text format.
//!
//! Built on `prometheus-client`, the official Prometheus client for Rust
//! and the one kube-rs's controller-rs example uses: label sets are typed
//! structs (`derive(EncodeLabelSet)`), the text is OpenMetrics, and there is
//! no global registry. [`Metrics`] is made once in `main` and shared (`Arc`)
//! with what records, so that a test makes its own.
//!
//! Every label is bounded: CSI methods and codes, apiserver verbs,
//! resources and status codes, StorageClass and pool names, fixed reasons
//! and outcomes; never a volume, claim or error message.
//!
//! Rooms: [`rpc`] (the CSI RPC histogram: a tower layer on the socket's
//! server and a wrapper of the provisioner's in-process controller),
//! [`apiserver`] (a tower layer on the kube client), both through
//! [`layer`], and [`pools`] (the pool gauges, read from the store at each
//! scrape).

pub mod apiserver;
pub mod layer;
pub mod pools;
pub mod rpc;

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::storage::PoolStats;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bounds of the RPC histogram, in seconds: from GetCapacity's fraction of
/// a millisecond to a copied snapshot's minutes.
const RPC_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Bounds of the provisioning and deletion histograms, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// How an operation ended, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Failure,
    /// A claim's node choice was given back (no room, or its data is on
    /// another node): the scheduler or another agent goes on with it.
    Released,
    /// A claim deleted before its volume was made.
    Abandoned,
    /// A deleted PV whose reclaim policy keeps the data.
    Retained,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Released => "released",
            Outcome::Abandoned => "abandoned",
            Outcome::Retained => "retained",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassOutcome {
    class: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeOnly {
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReconcileError {
    controller: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// A latency from the moment an object is first seen to its outcome, kept
/// per object uid until then. The clocks live in memory: after a restart
/// of the agent an object's clock starts again from when it is seen anew.
pub struct Latency {
    family: Histograms<ClassOutcome>,
    started: Mutex<HashMap<String, (Instant, String)>>,
}

impl Latency {
    fn new(registry: &mut Registry, name: &str, help: &str) -> Latency {
        let family = Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(name, help, Unit::Seconds, family.clone());
        Latency {
            family,
            started: Mutex::default(),
        }
    }

    fn clocks(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, String)>> {
        self.started.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the clock of object `uid` of StorageClass `class`, unless it
    /// runs already.
    pub fn start(&self, uid: &str, class: &str) {
        self.clocks()
            .entry(uid.to_string())
            .or_insert_with(|| (Instant::now(), class.to_string()));
    }

    /// Stops the clock of `uid` and observes its time with `outcome`; does
    /// nothing when it was not started.
    pub fn finish(&self, uid: &str, outcome: Outcome) {
        let Some((since, class)) = self.clocks().remove(uid) else {
            return;
        };
        self.family
            .get_or_create(&ClassOutcome { class, outcome })
            .observe(since.elapsed().as_secs_f64());
    }

    /// Stops the clock of `uid` without observing it.
    pub fn forget(&self, uid: &str) {
        self.clocks().remove(uid);
    }
}

/// A counter family registered as `name`.
fn counters<L>(registry: &mut Registry, name: &str, help: &str) -> Family<L, Counter>
where
    Family<L, Counter>: prometheus_client::registry::Metric + Clone + Default,
{
    let family = Family::default();
    registry.register(name, help, family.clone());
    family
}

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The agent's metric families and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    rpc: Histograms<rpc::Labels>,
    /// Claims: first seen by the agent that provisions them → PV created
    /// (or the claim given back, or deleted).
    pub provisioning: Latency,
    /// PVs: Released (or deleted) seen → volume deleted and finalizer
    /// removed (or the PV gone).
    pub deletion: Latency,
    reconcile_errors: Family<ReconcileError, Counter>,
    apiserver: Family<apiserver::Labels, Counter>,
    events_dropped: Family<Reason, Counter>,
    expansions: Family<OutcomeOnly, Counter>,
}

impl Metrics {
    /// The families, registered under the prefix `stead`; `pools` is read
    /// at every scrape for the pool gauges (see [`pools`]).
    pub fn new(pools: impl Fn() -> Vec<PoolStats> + Send + Sync + 'static) -> Metrics {
        let mut registry = Registry::with_prefix("stead");
        registry.register(
            "build",
            "The agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let rpc = Histograms::new_with_constructor(rpc_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "csi_rpc_duration",
            "CSI RPCs served, on the socket or in-process for the provisioner, by method and gRPC code",
            Unit::Seconds,
            rpc.clone(),
        );
        let provisioning = Latency::new(
            &mut registry,
            "provision_duration",
            "Claims, from first seen by the agent that provisions them to their PV created (success), their node choice given back (released) or their deletion (abandoned)",
        );
        let deletion = Latency::new(
            &mut registry,
            "deletion_duration",
            "PVs of this node, from Released or deleted seen to volume deleted and finalizer removed (success), or finalizer removed with the data kept (retained)",
        );
        let reconcile_errors = counters(
            &mut registry,
            "reconcile_errors",
            "Reconciles that failed and are retried with backoff, by controller and reason",
        );
        let apiserver = counters(
            &mut registry,
            "apiserver_requests",
            "Requests to the Kubernetes apiserver, by verb, resource and HTTP status (error: no response)",
        );
        let events_dropped = counters(
            &mut registry,
            "events_dropped",
            "Kubernetes Events not recorded: the queue was full, or the apiserver did not take them",
        );
        let expansions = counters(
            &mut registry,
            "volume_expansions",
            "Claims grown by the provisioner (ControllerExpandVolume and the PV and claim updates), by outcome",
        );
        registry.register_collector(Box::new(pools::Pools::new(pools)));
        Metrics {
            registry,
            rpc,
            provisioning,
            deletion,
            reconcile_errors,
            apiserver,
            events_dropped,
            expansions,
        }
    }

    /// The OpenMetrics text of every family. Blocking: the pool gauges are
    /// read from the pools' filesystems.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// One CSI RPC of `method` (a name from csi.proto) that ended with `code`.
    pub fn observe_rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.rpc
            .get_or_create(&rpc::Labels::new(method, code))
            .observe(elapsed.as_secs_f64());
    }

    /// A reconcile of `controller` (`claim`, `volume`, `snapshot`) failed
    /// for `reason` (a fixed word, see `provisioner::Error::reason`).
    pub fn reconcile_error(&self, controller: &'static str, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&ReconcileError { controller, reason })
            .inc();
    }

    /// An Event was not recorded: `queue_full` or `not_recorded`.
    pub fn event_dropped(&self, reason: &'static str) {
        self.events_dropped.get_or_create(&Reason { reason }).inc();
    }

    /// A claim's expansion ended with `outcome`.
    pub fn expansion(&self, outcome: Outcome) {
        self.expansions
            .get_or_create(&OutcomeOnly { outcome })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Attachment, BackendKind};

    /// The samples of `text` whose name and labels start with `prefix`.
    fn samples<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn families_are_named_by_convention_and_end_in_eof() {
        let m = Metrics::new(Vec::new);
        m.observe_rpc("Probe", tonic::Code::Ok, Duration::ZERO);
        m.provisioning.start("u", "c");
        m.provisioning.finish("u", Outcome::Success);
        m.deletion.start("u", "c");
        m.deletion.finish("u", Outcome::Success);
        m.reconcile_error("claim", "csi");
        m.event_dropped("queue_full");
        m.expansion(Outcome::Success);
        m.apiserver
            .get_or_create(&apiserver::Labels::new("get", "nodes", "200"))
            .inc();
        let text = m.encode().unwrap();
        for name in [
            "# TYPE stead_build info",
            "# TYPE stead_csi_rpc_duration_seconds histogram",
            "# UNIT stead_csi_rpc_duration_seconds seconds",
            "# TYPE stead_provision_duration_seconds histogram",
            "# TYPE stead_deletion_duration_seconds histogram",
            "# TYPE stead_reconcile_errors counter",
            "# TYPE stead_apiserver_requests counter",
            "# TYPE stead_events_dropped counter",
            "# TYPE stead_volume_expansions counter",
            "# TYPE stead_pool_capacity_bytes gauge",
            "# UNIT stead_pool_capacity_bytes bytes",
            "# TYPE stead_pool_volumes gauge",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains(&format!(
            "stead_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_family_shows_once_it_has_a_series() {
        let text = Metrics::new(Vec::new).encode().unwrap();
        assert!(!text.contains("stead_csi_rpc_duration_seconds"), "{text}");
    }

    #[test]
    fn rpcs_are_counted_by_method_and_code() {
        let m = Metrics::new(Vec::new);
        let ms = Duration::from_millis(1);
        m.observe_rpc("CreateVolume", tonic::Code::Ok, ms);
        m.observe_rpc("CreateVolume", tonic::Code::Ok, 3 * ms);
        m.observe_rpc("CreateVolume", tonic::Code::InvalidArgument, ms);
        m.observe_rpc("Probe", tonic::Code::Cancelled, ms);
        let text = m.encode().unwrap();
        let count = |labels: &str| {
            value(
                &text,
                &format!("stead_csi_rpc_duration_seconds_count{{{labels}}}"),
            )
        };
        assert_eq!(count(r#"method="CreateVolume",code="OK""#), Some(2.0));
        assert_eq!(
            count(r#"method="CreateVolume",code="InvalidArgument""#),
            Some(1.0)
        );
        // grpc-go's names, which dashboards of gRPC servers expect.
        assert_eq!(count(r#"method="Probe",code="Canceled""#), Some(1.0));
        let sum = value(
            &text,
            r#"stead_csi_rpc_duration_seconds_sum{method="CreateVolume",code="OK"}"#,
        )
        .unwrap();
        assert!((sum - 0.004).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(
                &text,
                r#"stead_csi_rpc_duration_seconds_bucket{le="0.001",method="CreateVolume",code="OK"}"#
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn a_latency_is_observed_once_from_its_first_start() {
        let m = Metrics::new(Vec::new);
        m.provisioning.start("uid-1", "stead");
        m.provisioning.start("uid-1", "other");
        m.provisioning.finish("uid-1", Outcome::Success);
        // Finished already, never started, forgotten: nothing more.
        m.provisioning.finish("uid-1", Outcome::Success);
        m.provisioning.finish("uid-2", Outcome::Abandoned);
        m.provisioning.start("uid-3", "stead");
        m.provisioning.forget("uid-3");
        m.provisioning.finish("uid-3", Outcome::Released);
        m.deletion.start("pv-uid", "stead");
        m.deletion.finish("pv-uid", Outcome::Retained);
        let text = m.encode().unwrap();
        assert_eq!(
            samples(&text, "stead_provision_duration_seconds_count"),
            [r#"stead_provision_duration_seconds_count{class="stead",outcome="success"} 1"#]
        );
        assert_eq!(
            samples(&text, "stead_deletion_duration_seconds_count"),
            [r#"stead_deletion_duration_seconds_count{class="stead",outcome="retained"} 1"#]
        );
    }

    #[test]
    fn counters_carry_their_labels_and_total_suffix() {
        let m = Metrics::new(Vec::new);
        m.reconcile_error("claim", "kube");
        m.reconcile_error("claim", "kube");
        m.reconcile_error("volume", "csi");
        m.event_dropped("queue_full");
        m.expansion(Outcome::Success);
        m.expansion(Outcome::Failure);
        let text = m.encode().unwrap();
        for (series, n) in [
            (
                r#"stead_reconcile_errors_total{controller="claim",reason="kube"}"#,
                2.0,
            ),
            (
                r#"stead_reconcile_errors_total{controller="volume",reason="csi"}"#,
                1.0,
            ),
            (r#"stead_events_dropped_total{reason="queue_full"}"#, 1.0),
            (r#"stead_volume_expansions_total{outcome="success"}"#, 1.0),
            (r#"stead_volume_expansions_total{outcome="failure"}"#, 1.0),
        ] {
            assert_eq!(value(&text, series), Some(n), "{series} in:\n{text}");
        }
    }

    #[test]
    fn pool_gauges_are_read_at_every_scrape() {
        let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = scrapes.clone();
        let m = Metrics::new(move || {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            vec![PoolStats {
                pool: "fast".into(),
                backend: BackendKind::Image,
                size: 1000,
                free: 600,
                available: 500,
                promised: 300 * n,
                used: 100,
                volumes: Attachment::ALL
                    .iter()
                    .map(|&a| (a, u64::from(a == Attachment::Published)))
                    .collect(),
            }]
        });
        let labels = r#"{pool="fast",backend="image"}"#;
        let text = m.encode().unwrap();
        for (name, v) in [
            ("capacity", 1000.0),
            ("free", 600.0),
            ("available", 500.0),
            ("promised", 300.0),
            ("used", 100.0),
        ] {
            assert_eq!(
                value(&text, &format!("stead_pool_{name}_bytes{labels}")),
                Some(v)
            );
        }
        assert_eq!(
            samples(&text, "stead_pool_volumes{"),
            [
                r#"stead_pool_volumes{pool="fast",backend="image",state="idle"} 0"#,
                r#"stead_pool_volumes{pool="fast",backend="image",state="staged"} 0"#,
                r#"stead_pool_volumes{pool="fast",backend="image",state="published"} 1"#,
                r#"stead_pool_volumes{pool="fast",backend="image",state="unknown"} 0"#,
            ]
        );
        let text = m.encode().unwrap();
        assert_eq!(
            value(&text, &format!("stead_pool_promised_bytes{labels}")),
            Some(600.0),
            "a second scrape reads the pools again"
        );
    }

    /// A sample line without its value: what a query selects.
    fn series_of(text: &str) -> std::collections::BTreeSet<&str> {
        text.lines()
            .map(|l| match l.strip_prefix('#') {
                Some(_) => l,
                None => l.rsplit_once(' ').map_or(l, |(series, _)| series),
            })
            .collect()
    }

    /// tests/dashboard/go/testdata/every-family.om, against which `make
    /// dashboard-check` evaluates every panel of the Grafana dashboard, has
    /// the series this registry exposes: every family, and the label values
    /// the panels select (a non-OK code, outcome="success", a non-2xx
    /// status). STEAD_BLESS=1 writes it anew.
    #[test]
    fn the_dashboards_fixture_has_every_series_the_agent_exposes() {
        let m = Metrics::new(|| {
            vec![PoolStats {
                pool: "image".into(),
                backend: BackendKind::Image,
                size: 1 << 30,
                free: 700 << 20,
                available: 600 << 20,
                promised: 300 << 20,
                used: 200 << 20,
                volumes: Attachment::ALL
                    .iter()
                    .map(|&a| (a, u64::from(a == Attachment::Published)))
                    .collect(),
            }]
        });
        let ms = Duration::from_millis(1);
        m.observe_rpc("CreateVolume", tonic::Code::Ok, ms);
        m.observe_rpc("CreateVolume", tonic::Code::InvalidArgument, ms);
        m.provisioning.start("u", "stead");
        m.provisioning.finish("u", Outcome::Success);
        m.deletion.start("u", "stead");
        m.deletion.finish("u", Outcome::Success);
        m.reconcile_error("claim", "csi");
        m.event_dropped("queue_full");
        m.expansion(Outcome::Success);
        for code in ["200", "404"] {
            m.apiserver
                .get_or_create(&apiserver::Labels::new(
                    "get",
                    "persistentvolumeclaims",
                    code,
                ))
                .inc();
        }
        let text = m.encode().unwrap();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/dashboard/go/testdata/every-family.om"
        );
        if std::env::var_os("STEAD_BLESS").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        let fixture = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            series_of(&fixture),
            series_of(&text),
            "{path} is not what the agent exposes: run STEAD_BLESS=1 cargo test --lib metrics, then make dashboard-check"
        );
    }
}
