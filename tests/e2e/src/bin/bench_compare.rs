//! `make bench-compare`: Stead side by side with what users would install
//! instead (issue 16), on the bundled 3-node cluster, in the same run.
//!
//! For each round (`ROUNDS`, default 2) and each configuration (`CONFIGS`,
//! default `stead sidecar-defaults sidecar-tuned local-path`),
//! `tests/bench/anchors/deploy.sh NAME` deploys it and writes
//! `$BENCH_STATE/current.env` (its classes and its version); then, each in a
//! fresh namespace:
//!
//! - (a) `BENCH_PODS` (100) pods created at once, each with its own claim of
//!   the WaitForFirstConsumer class: until all claims are Bound, until all
//!   pods are Running, and per claim from the return of its create call to
//!   the moment a watch sees it Bound (p50, p99);
//! - (c) everything of (a) deleted at once (the namespace's pods and claims):
//!   until every PV is gone, and per PV from Released to gone (p50);
//! - (d) a StatefulSet of `BENCH_REPLICAS` (20), OrderedReady, with a claim
//!   template: until all are Ready;
//! - (e) `BENCH_CLAIMS` (500) claims of the Immediate class where the
//!   provisioner has one: until all are Bound, claim→Bound p50.
//!
//! (b), the baseline, once per round with no provisioner deployed: the pods of
//! (a) with an emptyDir instead of a claim. While (a), (c), (d) and (e) run,
//! the provisioner's processes (`tests/bench/anchors/pids.sh`, run again at
//! every sample) are read from /proc every 500 ms: the peak of their summed
//! VmRSS and their CPU time. Then `undeploy.sh NAME`.
//!
//! Medians over the rounds, Stead ÷ peer ratios and the targets of item 3
//! replace this benchmark's section of docs/BENCHMARKS.md and go to stdout.
//! A configuration that fails a workload (a deadline, a script) is reported
//! as failed with the reason, and the run goes on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use stead_e2e::bench::{
    self, Error, FirstSeen, ProcSample, PvDeletion, machine, percentile, proc_sample, pvs_of,
    uptime_ticks,
};
use stead_e2e::{busybox_image, from_json, is_ready};

const SECTION_START: &str =
    "<!-- bench-compare:start (written by tests/e2e/src/bin/bench_compare.rs) -->";
const SECTION_END: &str = "<!-- bench-compare:end -->";
/// The configuration whose figures are divided by the others'.
const STEAD: &str = "stead";
/// The column of the baseline (b): no provisioner, an emptyDir per pod.
const EMPTYDIR: &str = "emptyDir";
const DEFAULT_CONFIGS: &str = "stead sidecar-defaults sidecar-tuned local-path";
/// Concurrent clients creating the objects of a workload, as in
/// bench-provision.
const CREATORS: usize = 32;
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The label of the namespaces this benchmark makes, so that a run removes
/// what an interrupted one left.
const NS_LABEL: &str = "stead.csi.dev/bench";
const NS_LABEL_VALUE: &str = "compare";
/// A script of the anchors (deploy, undeploy) may take this long.
const SCRIPT_WITHIN: Duration = Duration::from_secs(900);

/// The sizes of the workloads.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    pods: usize,
    replicas: usize,
    claims: usize,
}

/// One figure of the table. The order is the table's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    BurstBound,
    BurstRunning,
    BurstBoundP50,
    BurstBoundP99,
    BurstRss,
    BurstCpu,
    DeleteGone,
    DeleteReleasedP50,
    DeleteRss,
    DeleteCpu,
    StsReady,
    StsRss,
    StsCpu,
    ImmBound,
    ImmBoundP50,
    ImmRss,
    ImmCpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    MiB,
    CpuSeconds,
}

impl Figure {
    const ALL: [Figure; 17] = [
        Figure::BurstBound,
        Figure::BurstRunning,
        Figure::BurstBoundP50,
        Figure::BurstBoundP99,
        Figure::BurstRss,
        Figure::BurstCpu,
        Figure::DeleteGone,
        Figure::DeleteReleasedP50,
        Figure::DeleteRss,
        Figure::DeleteCpu,
        Figure::StsReady,
        Figure::StsRss,
        Figure::StsCpu,
        Figure::ImmBound,
        Figure::ImmBoundP50,
        Figure::ImmRss,
        Figure::ImmCpu,
    ];

    fn label(self, s: &Sizes) -> String {
        let (p, r, c) = (s.pods, s.replicas, s.claims);
        match self {
            Figure::BurstBound => format!("(a) {p} pods, a claim each: all claims Bound"),
            Figure::BurstRunning => {
                format!("(a) all {p} pods Running ((b) emptyDir: the same pods, no claim)")
            }
            Figure::BurstBoundP50 => "(a) claim→Bound p50".into(),
            Figure::BurstBoundP99 => "(a) claim→Bound p99".into(),
            Figure::BurstRss => "(a) memory: peak of the summed RSS".into(),
            Figure::BurstCpu => "(a) CPU seconds".into(),
            Figure::DeleteGone => "(c) delete all of (a): every PV gone".into(),
            Figure::DeleteReleasedP50 => "(c) a PV from Released to gone, p50".into(),
            Figure::DeleteRss => "(c) memory: peak of the summed RSS".into(),
            Figure::DeleteCpu => "(c) CPU seconds".into(),
            Figure::StsReady => format!("(d) {r}-replica StatefulSet (OrderedReady): all Ready"),
            Figure::StsRss => "(d) memory: peak of the summed RSS".into(),
            Figure::StsCpu => "(d) CPU seconds".into(),
            Figure::ImmBound => format!("(e) {c} Immediate claims: all Bound"),
            Figure::ImmBoundP50 => "(e) claim→Bound p50".into(),
            Figure::ImmRss => "(e) memory: peak of the summed RSS".into(),
            Figure::ImmCpu => "(e) CPU seconds".into(),
        }
    }

    fn unit(self) -> Unit {
        match self {
            Figure::BurstRss | Figure::DeleteRss | Figure::StsRss | Figure::ImmRss => Unit::MiB,
            Figure::BurstCpu | Figure::DeleteCpu | Figure::StsCpu | Figure::ImmCpu => {
                Unit::CpuSeconds
            }
            _ => Unit::Seconds,
        }
    }
}

/// The workloads, by the letters of the issue's brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Burst,
    Baseline,
    Delete,
    StatefulSet,
    Immediate,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Burst => "(a) pods with a claim each",
            Workload::Baseline => "(b) pods with an emptyDir",
            Workload::Delete => "(c) delete all",
            Workload::StatefulSet => "(d) StatefulSet",
            Workload::Immediate => "(e) Immediate claims",
        }
    }

    fn figures(self) -> &'static [Figure] {
        match self {
            Workload::Burst => &[
                Figure::BurstBound,
                Figure::BurstRunning,
                Figure::BurstBoundP50,
                Figure::BurstBoundP99,
                Figure::BurstRss,
                Figure::BurstCpu,
            ],
            Workload::Baseline => &[Figure::BurstRunning],
            Workload::Delete => &[
                Figure::DeleteGone,
                Figure::DeleteReleasedP50,
                Figure::DeleteRss,
                Figure::DeleteCpu,
            ],
            Workload::StatefulSet => &[Figure::StsReady, Figure::StsRss, Figure::StsCpu],
            Workload::Immediate => &[
                Figure::ImmBound,
                Figure::ImmBoundP50,
                Figure::ImmRss,
                Figure::ImmCpu,
            ],
        }
    }

    /// Its memory and CPU figures; none for the baseline, which runs with no
    /// provisioner.
    fn usage_figures(self) -> Option<(Figure, Figure)> {
        match self {
            Workload::Burst => Some((Figure::BurstRss, Figure::BurstCpu)),
            Workload::Delete => Some((Figure::DeleteRss, Figure::DeleteCpu)),
            Workload::StatefulSet => Some((Figure::StsRss, Figure::StsCpu)),
            Workload::Immediate => Some((Figure::ImmRss, Figure::ImmCpu)),
            Workload::Baseline => None,
        }
    }
}

/// One round's result for one figure of one configuration.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Seconds, MiB or CPU seconds, by the figure's unit.
    Value(f64),
    Failed(String),
}

/// A table cell: the rounds of one configuration for one figure.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    /// Not measured (no such workload for this configuration).
    Missing,
    /// Every round failed; the first reason.
    Failed(String),
    /// The median of the rounds that gave a value.
    Value {
        median: f64,
        failed: usize,
        rounds: usize,
    },
}

impl Cell {
    fn value(&self) -> Option<f64> {
        match self {
            Cell::Value { median, .. } => Some(*median),
            _ => None,
        }
    }
}

/// Everything the rounds gave.
#[derive(Debug, Default)]
struct Results {
    /// The configurations in the order of the table's columns.
    columns: Vec<String>,
    cells: BTreeMap<(String, Figure), Vec<Outcome>>,
    /// "round R, WORKLOAD on CONFIG: reason", in the order they happened.
    failures: Vec<String>,
    /// Configurations that have no Immediate class, so no (e).
    no_immediate: BTreeSet<String>,
}

impl Results {
    fn with_columns(columns: &[&str]) -> Results {
        Results {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            ..Results::default()
        }
    }

    /// A workload's figures for one round, or its failure (then each of its
    /// figures is failed with that reason).
    fn record(
        &mut self,
        round: usize,
        config: &str,
        workload: Workload,
        outcome: Result<Vec<(Figure, Outcome)>, String>,
    ) {
        let figures = match outcome {
            Ok(figures) => {
                // A figure that failed alone (the memory of a workload that
                // ran): each reason once, named with its workload.
                let reasons: BTreeSet<String> = figures
                    .iter()
                    .filter_map(|(_, o)| match o {
                        Outcome::Failed(r) => Some(r.clone()),
                        Outcome::Value(_) => None,
                    })
                    .collect();
                for reason in reasons {
                    self.failure(round, config, workload.name(), &reason);
                }
                figures
            }
            Err(reason) => {
                self.failure(round, config, workload.name(), &reason);
                workload
                    .figures()
                    .iter()
                    .map(|f| (*f, Outcome::Failed(reason.clone())))
                    .collect()
            }
        };
        for (figure, outcome) in figures {
            self.cells
                .entry((config.to_string(), figure))
                .or_default()
                .push(outcome);
        }
    }

    fn failure(&mut self, round: usize, config: &str, what: &str, reason: &str) {
        // Round 0: before the rounds (removing what was deployed).
        let when = match round {
            0 => "before the rounds".to_string(),
            r => format!("round {r}"),
        };
        let line = format!("{when}, {what} on {config}: {reason}");
        eprintln!("bench-compare: {line}");
        self.failures.push(line);
    }

    fn cell(&self, config: &str, figure: Figure) -> Cell {
        let Some(outcomes) = self.cells.get(&(config.to_string(), figure)) else {
            return Cell::Missing;
        };
        let mut values: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Value(v) => Some(*v),
                Outcome::Failed(_) => None,
            })
            .collect();
        let failed = outcomes.len() - values.len();
        match median(&mut values) {
            Some(median) => Cell::Value {
                median,
                failed,
                rounds: outcomes.len(),
            },
            None => Cell::Failed(
                outcomes
                    .iter()
                    .find_map(|o| match o {
                        Outcome::Failed(r) => Some(r.clone()),
                        Outcome::Value(_) => None,
                    })
                    .unwrap_or_default(),
            ),
        }
    }

    /// The columns Stead is compared with: every other configuration, the
    /// baseline too.
    fn peers(&self) -> Vec<&str> {
        self.columns
            .iter()
            .map(String::as_str)
            .filter(|c| *c != STEAD)
            .collect()
    }
}

/// The median; the mean of the middle two for an even count.
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Stead's figure divided by the peer's (< 1: Stead is faster or smaller).
fn ratio(stead: f64, peer: f64) -> Option<f64> {
    (peer > 0.0).then(|| stead / peer)
}

fn fmt_value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Seconds if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        Unit::Seconds | Unit::CpuSeconds => format!("{v:.1} s"),
        Unit::MiB => format!("{v:.1} MiB"),
    }
}

/// A reason as it fits in a table cell: one line, no `|`, at most 120
/// characters.
fn cell_text(reason: &str) -> String {
    let one_line: String = reason
        .chars()
        .map(|c| match c {
            '|' => '/',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect();
    if one_line.chars().count() > 120 {
        format!("{}…", one_line.chars().take(119).collect::<String>())
    } else {
        one_line
    }
}

fn fmt_cell(cell: &Cell, unit: Unit) -> String {
    match cell {
        Cell::Missing => "—".into(),
        Cell::Failed(reason) => format!("failed: {}", cell_text(reason)),
        Cell::Value {
            median, failed: 0, ..
        } => fmt_value(unit, *median),
        Cell::Value {
            median,
            failed,
            rounds,
        } => format!(
            "{} (failed in {failed} of {rounds} rounds)",
            fmt_value(unit, *median)
        ),
    }
}

/// The table: a row per figure that any configuration has, a column per
/// configuration (the median over the rounds), then Stead ÷ each peer.
fn render_table(results: &Results, sizes: &Sizes) -> String {
    let with_stead = results.columns.iter().any(|c| c == STEAD);
    let peers = if with_stead { results.peers() } else { vec![] };
    let mut header = vec!["figure".to_string()];
    header.extend(results.columns.iter().cloned());
    header.extend(peers.iter().map(|p| format!("Stead ÷ {p}")));
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---|".repeat(header.len()));
    for figure in Figure::ALL {
        let cells: Vec<Cell> = results
            .columns
            .iter()
            .map(|c| results.cell(c, figure))
            .collect();
        if cells.iter().all(|c| *c == Cell::Missing) {
            continue;
        }
        let mut row = vec![figure.label(sizes)];
        row.extend(cells.iter().map(|c| fmt_cell(c, figure.unit())));
        let stead = results.cell(STEAD, figure).value();
        for peer in &peers {
            let peer = results.cell(peer, figure).value();
            row.push(match (stead, peer) {
                (Some(s), Some(p)) => ratio(s, p).map_or("—".into(), |r| format!("{r:.2}")),
                _ => "—".into(),
            });
        }
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Met,
    Missed,
    NotMeasured,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::NotMeasured => "not measured",
        })
    }
}

/// All met: met; any missed: missed; else not measured.
fn overall(verdicts: &[Verdict]) -> Verdict {
    if verdicts.contains(&Verdict::Missed) {
        Verdict::Missed
    } else if !verdicts.is_empty() && verdicts.iter().all(|v| *v == Verdict::Met) {
        Verdict::Met
    } else {
        Verdict::NotMeasured
    }
}

/// Stead against the best peer configuration (the baseline is no peer) on
/// one figure: at most its value, or below it when `strictly`.
fn against_best_peer(
    results: &Results,
    sizes: &Sizes,
    figure: Figure,
    strictly: bool,
) -> (Verdict, String) {
    let unit = figure.unit();
    let label = figure.label(sizes);
    let best = results
        .peers()
        .into_iter()
        .filter(|p| *p != EMPTYDIR)
        .filter_map(|p| results.cell(p, figure).value().map(|v| (p, v)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let stead = results.cell(STEAD, figure);
    match (stead.value(), best) {
        (_, None) => (
            Verdict::NotMeasured,
            format!("{label}: no peer measured it"),
        ),
        (None, Some((peer, v))) => (
            Verdict::Missed,
            format!(
                "{label}: Stead {}, best peer {} ({peer})",
                fmt_cell(&stead, unit),
                fmt_value(unit, v)
            ),
        ),
        (Some(s), Some((peer, v))) => {
            let ok = if strictly { s < v } else { s <= v };
            (
                if ok { Verdict::Met } else { Verdict::Missed },
                format!(
                    "{label}: Stead {}, best peer {} ({peer})",
                    fmt_value(unit, s),
                    fmt_value(unit, v)
                ),
            )
        }
    }
}

/// The targets of issue 16, item 3, on the medians, as markdown bullets.
fn render_targets(results: &Results, sizes: &Sizes) -> String {
    let mut out = String::new();
    let group = |title: &str, figures: Vec<Figure>, strictly: bool, out: &mut String| {
        let checked: Vec<(Verdict, String)> = figures
            .into_iter()
            .filter(|f| {
                results
                    .columns
                    .iter()
                    .any(|c| results.cell(c, *f) != Cell::Missing)
            })
            .map(|f| against_best_peer(results, sizes, f, strictly))
            .collect();
        let verdicts: Vec<Verdict> = checked.iter().map(|(v, _)| v.clone()).collect();
        *out += &format!("- {title}: {}\n", overall(&verdicts));
        for (verdict, text) in checked {
            *out += &format!("  - {text}: {verdict}\n");
        }
    };
    group(
        "Stead at least as fast as the best peer configuration on every time figure",
        Figure::ALL
            .into_iter()
            .filter(|f| f.unit() == Unit::Seconds)
            .collect(),
        false,
        &mut out,
    );
    let running = results.cell(STEAD, Figure::BurstRunning).value();
    let baseline = results.cell(EMPTYDIR, Figure::BurstRunning).value();
    out += &match (running, baseline) {
        (Some(s), Some(b)) if b > 0.0 => format!(
            "- all pods Running within 1.15× of the emptyDir baseline: Stead {} ÷ emptyDir {} = {:.2}: {}\n",
            fmt_value(Unit::Seconds, s),
            fmt_value(Unit::Seconds, b),
            s / b,
            if s / b <= 1.15 {
                Verdict::Met
            } else {
                Verdict::Missed
            }
        ),
        _ => format!(
            "- all pods Running within 1.15× of the emptyDir baseline: {}\n",
            Verdict::NotMeasured
        ),
    };
    group(
        "memory below every peer",
        Figure::ALL
            .into_iter()
            .filter(|f| f.unit() == Unit::MiB)
            .collect(),
        true,
        &mut out,
    );
    out += &match results.cell(STEAD, Figure::DeleteReleasedP50).value() {
        Some(v) => format!(
            "- a PV from Released to gone < 1 s p50: Stead {}: {}\n",
            fmt_value(Unit::Seconds, v),
            if v < 1.0 {
                Verdict::Met
            } else {
                Verdict::Missed
            }
        ),
        None => format!(
            "- a PV from Released to gone < 1 s p50: {}\n",
            Verdict::NotMeasured
        ),
    };
    out
}

/// What the section states besides the figures.
struct Report {
    machine: String,
    date: String,
    kubernetes: String,
    rounds: usize,
    configs: Vec<String>,
    /// The pods' image.
    image: String,
    /// BENCH_VERSION of each configuration.
    versions: BTreeMap<String, String>,
}

fn render_section(results: &Results, sizes: &Sizes, report: &Report) -> String {
    let mut versions = String::new();
    for config in &report.configs {
        let v = report
            .versions
            .get(config)
            .map(String::as_str)
            .unwrap_or("not deployed (see the failures)");
        versions += &format!("  - `{config}`: {v}\n");
    }
    versions += &format!("  - `{EMPTYDIR}`: no provisioner (the baseline)\n");
    let failures = if results.failures.is_empty() {
        "Failures: none.\n".to_string()
    } else {
        let mut f = "Failures:\n".to_string();
        for line in &results.failures {
            f += &format!("- {}\n", cell_text(line));
        }
        f
    };
    let no_immediate = if results.no_immediate.is_empty() {
        String::new()
    } else {
        format!(
            "No Immediate class, so no (e): {}.\n\n",
            results
                .no_immediate
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "{SECTION_START}
## Side by side (make bench-compare)

- Machine: {machine}
- Command: `make bench-compare ROUNDS={rounds} CONFIGS=\"{configs}\"` on the bundled local cluster (3 nodes, Kubernetes {kubernetes}); each configuration deployed by `tests/bench/anchors/deploy.sh`, alone, then removed again
- Date: {date}
- Versions:
{versions}- Workloads, each in a fresh namespace, objects created by {CREATORS} concurrent clients, 16Mi claims, pods of `{image}` that write a file to the volume and sleep (terminationGracePeriodSeconds 0): (a) {pods} pods, a WaitForFirstConsumer claim each, timed from the first create until a watch sees every claim Bound and every pod Running, claim→Bound per claim from the return of its create call; (b) the same pods with an emptyDir, with no provisioner deployed: what the nodes themselves take to start them; (c) the pods and claims of (a) deleted at once, until a PV watch has seen every PV deleted, and per PV from Released to gone; (d) a {replicas}-replica StatefulSet (OrderedReady) with a claim template, until all are Ready, then deleted with its claims; (e) {claims} Immediate claims, until all are Bound. Between workloads the run waits until the workload's namespace and its PVs are gone.
- Memory and CPU: during each workload, every 500 ms, the PIDs of the provisioner's processes from `tests/bench/anchors/pids.sh` (all containers of its pods on every node, sidecars and sandboxes included; for local-path also the helper pods that exist at that moment; a sample comes later when pids.sh itself takes longer), read from /proc: memory is the peak over the samples of their summed VmRSS; CPU is the sum over the processes of utime+stime from the first sample that saw each (from zero for one that started during the workload) to the last. A process that exits between two samples loses the CPU it used after its last sample, and one that lives shorter than a sample is missed: short-lived helper pods are undercounted.
- Each cell: the median over {rounds} rounds; Stead ÷ peer < 1 means Stead is faster or smaller; — means not measured.

{table}
{no_immediate}{failures}
Targets (issue 16, item 3), on the medians:
{targets}{SECTION_END}",
        machine = report.machine,
        rounds = report.rounds,
        configs = report.configs.join(" "),
        kubernetes = report.kubernetes,
        date = report.date,
        image = report.image,
        pods = sizes.pods,
        replicas = sizes.replicas,
        claims = sizes.claims,
        table = render_table(results, sizes),
        targets = render_targets(results, sizes),
    )
}

/// The memory and CPU of the sampled processes during one workload.
#[derive(Debug, Default)]
struct Usage {
    /// The uptime (clock ticks) when sampling began: a process that started
    /// later is counted from zero CPU.
    since: u64,
    samples: usize,
    peak_rss_kib: u64,
    /// Per process (PID, start time): its CPU seconds when first seen (zero
    /// when it started after `since`) and when last seen.
    cpu: HashMap<(u32, u64), (f64, f64)>,
    /// The last failure of pids.sh, and how many samples failed.
    error: Option<String>,
    failed_samples: usize,
}

impl Usage {
    fn add(&mut self, readings: &[(u32, ProcSample)]) {
        self.samples += 1;
        let rss: u64 = readings.iter().map(|(_, s)| s.rss_kib).sum();
        self.peak_rss_kib = self.peak_rss_kib.max(rss);
        for (pid, s) in readings {
            let first = if s.start >= self.since { 0.0 } else { s.cpu };
            self.cpu.entry((*pid, s.start)).or_insert((first, s.cpu)).1 = s.cpu;
        }
    }

    fn cpu_seconds(&self) -> f64 {
        self.cpu.values().map(|(first, last)| last - first).sum()
    }

    fn figures(&self, rss: Figure, cpu: Figure) -> Vec<(Figure, Outcome)> {
        if self.cpu.is_empty() {
            let reason = match &self.error {
                Some(e) => format!("pids.sh failed in {} samples: {e}", self.failed_samples),
                None => format!("pids.sh printed no PID in {} samples", self.samples),
            };
            return vec![
                (rss, Outcome::Failed(reason.clone())),
                (cpu, Outcome::Failed(reason)),
            ];
        }
        vec![
            (rss, Outcome::Value(self.peak_rss_kib as f64 / 1024.0)),
            (cpu, Outcome::Value(self.cpu_seconds())),
        ]
    }
}

/// The PIDs pids.sh prints, one a line.
async fn list_pids(pids_sh: &Path) -> Result<Vec<u32>, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(pids_sh)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "did not finish within 10 s".to_string())?
    .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, last_line(&out.stderr)));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().map_err(|_| format!("not a PID: {l:?}")))
        .collect()
}

/// Samples the provisioner's processes every [`SAMPLE_EVERY`] (or as often
/// as pids.sh allows, when it takes longer) until stopped.
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Usage>,
}

impl Sampler {
    fn start(pids_sh: PathBuf) -> Sampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut usage = Usage {
                since: uptime_ticks(),
                ..Usage::default()
            };
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let last = tokio::select! {
                    _ = &mut stopped => true,
                    _ = tick.tick() => false,
                };
                match list_pids(&pids_sh).await {
                    Ok(pids) => {
                        let readings: Vec<(u32, ProcSample)> = pids
                            .into_iter()
                            .filter_map(|p| proc_sample(p).map(|s| (p, s)))
                            .collect();
                        usage.add(&readings);
                    }
                    Err(e) => {
                        usage.failed_samples += 1;
                        usage.error = Some(e);
                    }
                }
                if last {
                    return usage;
                }
            }
        });
        Sampler { stop, task }
    }

    /// Takes a last sample and returns what was seen.
    async fn stop(self) -> Usage {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// The last non-empty line of a script's output.
fn last_line(output: &[u8]) -> String {
    String::from_utf8_lossy(output)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Runs an anchors script; its output goes to stderr (stdout is the table's),
/// its last line is the reason when it fails.
async fn script(path: &Path, args: &[&str]) -> Result<(), String> {
    let what = format!(
        "{} {}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        args.join(" ")
    );
    eprintln!("bench-compare: {what}");
    let out = tokio::time::timeout(
        SCRIPT_WITHIN,
        tokio::process::Command::new(path)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{what} did not finish within {} s", SCRIPT_WITHIN.as_secs()))?
    .map_err(|e| format!("{what}: {e}"))?;
    let mut stderr = std::io::stderr();
    let _ = stderr.write_all(&out.stdout);
    let _ = stderr.write_all(&out.stderr);
    if out.status.success() {
        Ok(())
    } else {
        let line = last_line(&out.stderr);
        let line = if line.is_empty() {
            last_line(&out.stdout)
        } else {
            line
        };
        Err(format!("{what}: {} ({line})", out.status))
    }
}

/// What deploy.sh wrote to `$BENCH_STATE/current.env`.
#[derive(Debug, PartialEq)]
struct Deployed {
    name: String,
    class_wffc: String,
    class_immediate: Option<String>,
    version: String,
}

/// Reads current.env as bash sources it (its values may be quoted).
fn read_current_env(path: &Path) -> Result<Deployed, String> {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(
            r#"set -eu; source "$1"; printf '%s\0' "${BENCH_NAME-}" "${BENCH_CLASS_WFFC-}" "${BENCH_CLASS_IMMEDIATE-}" "${BENCH_VERSION-}""#,
        )
        .arg("bash")
        .arg(path)
        .output()
        .map_err(|e| format!("sourcing {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "sourcing {}: {}",
            path.display(),
            last_line(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<&str> = text.split('\0').collect();
    let get = |i: usize| v.get(i).copied().unwrap_or("").to_string();
    let deployed = Deployed {
        name: get(0),
        class_wffc: get(1),
        class_immediate: Some(get(2)).filter(|c| !c.is_empty()),
        version: get(3),
    };
    if deployed.class_wffc.is_empty() {
        return Err(format!("{} sets no BENCH_CLASS_WFFC", path.display()));
    }
    Ok(deployed)
}

/// What the workloads share.
struct Ctx {
    client: Client,
    sizes: Sizes,
    /// Every wait of a workload ends by this much after its start.
    deadline: Duration,
    image: String,
    pids_sh: PathBuf,
}

fn namespace_name(round: usize, config: &str, what: &str) -> String {
    format!("cmp-r{round}-{config}-{what}").to_lowercase()
}

async fn create_namespace(client: &Client, name: &str) -> Result<(), Error> {
    let ns: Namespace = from_json(json!({
        "metadata": {"name": name, "labels": {NS_LABEL: NS_LABEL_VALUE}},
    }));
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// Deletes the namespace (if it is there) and waits until it is gone and no
/// PV of its claims is left.
async fn quiet(client: &Client, ns: &str, within: Duration) -> Result<(), Error> {
    match Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(format!("deleting namespace {ns}: {e}").into()),
    }
    let deadline = Instant::now() + within;
    bench::namespace_gone(client, ns, within).await?;
    loop {
        let left = pvs_of(client, ns).await?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "namespace {ns}: {left} PVs still there after {} s",
                within.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn bench_claim(name: &str, class: &str) -> PersistentVolumeClaim {
    from_json(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                 "resources": {"requests": {"storage": "16Mi"}}},
    }))
}

/// The container of every workload: writes a file to its volume, then
/// sleeps. Grace period 0: `sleep` as PID 1 ignores SIGTERM, and the
/// deletion would otherwise wait the default 30 s for every pod.
/// `volume` is the source of the volume `v` (a claim, an emptyDir); None
/// for a StatefulSet's template, whose `v` is its claim template.
fn bench_pod_spec(image: &str, volume: Option<serde_json::Value>) -> serde_json::Value {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", "echo written > /v/file && exec sleep 3600"],
            "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
    });
    if let Some(mut volume) = volume {
        volume["name"] = json!("v");
        spec["volumes"] = json!([volume]);
    }
    spec
}

fn secs(d: Duration) -> Outcome {
    Outcome::Value(d.as_secs_f64())
}

/// Per claim, from the return of its create call to the moment it was seen
/// Bound, sorted.
fn since_created(
    created: &HashMap<String, Instant>,
    seen: &HashMap<String, Instant>,
) -> Vec<Duration> {
    let mut lat: Vec<Duration> = seen
        .iter()
        .filter_map(|(name, t)| created.get(name).map(|c| t.saturating_duration_since(*c)))
        .collect();
    lat.sort();
    lat
}

/// From `start` to the last moment seen.
fn last_since(seen: &HashMap<String, Instant>, start: Instant) -> Duration {
    seen.values()
        .max()
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or_default()
}

fn claim_bound(pvc: &PersistentVolumeClaim) -> Option<String> {
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    (phase == Some("Bound")).then(|| pvc.name_any())
}

fn pod_running(pod: &Pod) -> Option<String> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    (phase == Some("Running")).then(|| pod.name_any())
}

/// (a) with `class`, (b) with none: the pods created at once.
async fn burst(ctx: &Ctx, ns: &str, class: Option<&str>) -> Result<Vec<(Figure, Outcome)>, Error> {
    let n = ctx.sizes.pods;
    create_namespace(&ctx.client, ns).await?;
    let mut bound = FirstSeen::start(
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns),
        claim_bound,
    )
    .await?;
    let mut running =
        FirstSeen::start(Api::<Pod>::namespaced(ctx.client.clone(), ns), pod_running).await?;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let created = created.clone();
            async move {
                let name = format!("c-{i:04}");
                let volume = match class {
                    Some(class) => {
                        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
                            .create(&PostParams::default(), &bench_claim(&name, class))
                            .await
                            .map_err(|e| format!("creating claim {name}: {e}"))?;
                        created.lock().unwrap().insert(name.clone(), Instant::now());
                        json!({"persistentVolumeClaim": {"claimName": name}})
                    }
                    None => json!({"emptyDir": {}}),
                };
                let pod: Pod = from_json(json!({
                    "metadata": {"name": name},
                    "spec": bench_pod_spec(&ctx.image, Some(volume)),
                }));
                Api::<Pod>::namespaced(ctx.client.clone(), ns)
                    .create(&PostParams::default(), &pod)
                    .await
                    .map_err(|e| format!("creating pod {name}: {e}"))?;
                Ok::<_, String>(())
            }
        })
        .buffer_unordered(CREATORS)
        .try_collect::<Vec<()>>()
        .await?;
    let until = start + ctx.deadline;
    let limit = ctx.deadline.as_secs();
    if class.is_some() {
        bound
            .wait(n, until)
            .await
            .map_err(|seen| format!("{seen} of {n} claims Bound after {limit} s"))?;
    }
    running
        .wait(n, until)
        .await
        .map_err(|seen| format!("{seen} of {n} pods Running after {limit} s"))?;
    let running = running.times();
    if class.is_none() {
        return Ok(vec![(
            Figure::BurstRunning,
            secs(last_since(&running, start)),
        )]);
    }
    let bound = bound.times();
    let lat = since_created(&created.lock().unwrap(), &bound);
    Ok(vec![
        (Figure::BurstBound, secs(last_since(&bound, start))),
        (Figure::BurstRunning, secs(last_since(&running, start))),
        (Figure::BurstBoundP50, secs(percentile(&lat, 0.5))),
        (Figure::BurstBoundP99, secs(percentile(&lat, 0.99))),
    ])
}

/// (c): the pods and claims of (a)'s namespace deleted at once.
async fn delete_all(ctx: &Ctx, ns: &str) -> Result<Vec<(Figure, Outcome)>, Error> {
    let expected = ctx.sizes.pods;
    let watch = PvDeletion::watch(&ctx.client, ns).await?;
    let (dp, lp) = (DeleteParams::default(), ListParams::default());
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns);
    let deleting = Instant::now();
    futures::try_join!(
        pods.delete_collection(&dp, &lp),
        pvcs.delete_collection(&dp, &lp)
    )?;
    let d = watch
        .finish(&ctx.client, deleting, expected, ctx.deadline)
        .await?;
    if d.pvs < expected {
        return Err(format!("the PV watch saw {} of {expected} PVs deleted", d.pvs).into());
    }
    let released = if d.released == 0 {
        Outcome::Failed("the PV watch saw no PV Released".into())
    } else {
        secs(d.released_p50)
    };
    Ok(vec![
        (Figure::DeleteGone, secs(d.all_gone)),
        (Figure::DeleteReleasedP50, released),
    ])
}

/// (d): a StatefulSet with a claim template, OrderedReady.
async fn statefulset(ctx: &Ctx, ns: &str, class: &str) -> Result<Vec<(Figure, Outcome)>, Error> {
    let n = ctx.sizes.replicas;
    create_namespace(&ctx.client, ns).await?;
    let mut ready = FirstSeen::start(Api::<Pod>::namespaced(ctx.client.clone(), ns), |p: &Pod| {
        is_ready(p).then(|| p.name_any())
    })
    .await?;
    let sts: StatefulSet = from_json(json!({
        "metadata": {"name": "sts"},
        "spec": {
            "replicas": n,
            "podManagementPolicy": "OrderedReady",
            "serviceName": "sts",
            "selector": {"matchLabels": {"app": "bench-compare"}},
            "template": {
                "metadata": {"labels": {"app": "bench-compare"}},
                "spec": bench_pod_spec(&ctx.image, None),
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "v"},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                         "resources": {"requests": {"storage": "16Mi"}}},
            }],
        },
    }));
    let start = Instant::now();
    Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
        .create(&PostParams::default(), &sts)
        .await?;
    ready.wait(n, start + ctx.deadline).await.map_err(|seen| {
        format!(
            "{seen} of {n} replicas Ready after {} s",
            ctx.deadline.as_secs()
        )
    })?;
    Ok(vec![(
        Figure::StsReady,
        secs(last_since(&ready.times(), start)),
    )])
}

/// (e): claims of the Immediate class, no pods.
async fn immediate(ctx: &Ctx, ns: &str, class: &str) -> Result<Vec<(Figure, Outcome)>, Error> {
    let n = ctx.sizes.claims;
    create_namespace(&ctx.client, ns).await?;
    let mut bound = FirstSeen::start(
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns),
        claim_bound,
    )
    .await?;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let created = created.clone();
            async move {
                let name = format!("c-{i:04}");
                Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
                    .create(&PostParams::default(), &bench_claim(&name, class))
                    .await
                    .map_err(|e| format!("creating claim {name}: {e}"))?;
                created.lock().unwrap().insert(name, Instant::now());
                Ok::<_, String>(())
            }
        })
        .buffer_unordered(CREATORS)
        .try_collect::<Vec<()>>()
        .await?;
    bound.wait(n, start + ctx.deadline).await.map_err(|seen| {
        format!(
            "{seen} of {n} claims Bound after {} s",
            ctx.deadline.as_secs()
        )
    })?;
    let bound = bound.times();
    let lat = since_created(&created.lock().unwrap(), &bound);
    Ok(vec![
        (Figure::ImmBound, secs(last_since(&bound, start))),
        (Figure::ImmBoundP50, secs(percentile(&lat, 0.5))),
    ])
}

/// Runs a workload with the provisioner's processes sampled meanwhile; its
/// figures with the memory and CPU ones, or why it failed.
async fn measured<F>(
    ctx: &Ctx,
    workload: Workload,
    run: F,
) -> Result<Vec<(Figure, Outcome)>, String>
where
    F: std::future::Future<Output = Result<Vec<(Figure, Outcome)>, Error>>,
{
    eprintln!("bench-compare: {}", workload.name());
    let sampler = workload
        .usage_figures()
        .map(|_| Sampler::start(ctx.pids_sh.clone()));
    let result = run.await;
    let usage = match sampler {
        Some(s) => Some(s.stop().await),
        None => None,
    };
    let mut figures = result.map_err(|e| e.to_string())?;
    if let (Some(usage), Some((rss, cpu))) = (usage, workload.usage_figures()) {
        figures.extend(usage.figures(rss, cpu));
    }
    Ok(figures)
}

/// Waits for the namespace to be gone; a failure is recorded and the run
/// goes on (the next workload has its own namespace).
async fn settle(ctx: &Ctx, results: &mut Results, round: usize, config: &str, ns: &str) {
    if let Err(e) = quiet(&ctx.client, ns, ctx.deadline).await {
        results.failure(
            round,
            config,
            "waiting for the cluster to be quiet",
            &e.to_string(),
        );
    }
}

/// One configuration in one round: deployed, its workloads, removed.
async fn run_config(
    ctx: &Ctx,
    anchors: &Path,
    state: &Path,
    results: &mut Results,
    versions: &mut BTreeMap<String, String>,
    round: usize,
    config: &str,
) {
    let deployed = match script(&anchors.join("deploy.sh"), &[config]).await {
        Ok(()) => read_current_env(&state.join("current.env")).and_then(|d| {
            if d.name == config {
                Ok(d)
            } else {
                Err(format!("current.env names {:?}, not {config:?}", d.name))
            }
        }),
        Err(e) => Err(e),
    };
    let deployed = match deployed {
        Ok(d) => d,
        Err(reason) => {
            for w in [
                Workload::Burst,
                Workload::Delete,
                Workload::StatefulSet,
                Workload::Immediate,
            ] {
                results.record(round, config, w, Err(format!("not deployed: {reason}")));
            }
            let _ = script(&anchors.join("undeploy.sh"), &[config]).await;
            return;
        }
    };
    versions
        .entry(config.to_string())
        .or_insert_with(|| deployed.version.clone());
    let wffc = deployed.class_wffc.as_str();

    let ns = namespace_name(round, config, "burst");
    let a = measured(ctx, Workload::Burst, burst(ctx, &ns, Some(wffc))).await;
    let a_ok = a.is_ok();
    results.record(round, config, Workload::Burst, a);
    let c = if a_ok {
        measured(ctx, Workload::Delete, delete_all(ctx, &ns)).await
    } else {
        Err("not run: (a) failed".into())
    };
    results.record(round, config, Workload::Delete, c);
    settle(ctx, results, round, config, &ns).await;

    let ns = namespace_name(round, config, "sts");
    let d = measured(ctx, Workload::StatefulSet, statefulset(ctx, &ns, wffc)).await;
    results.record(round, config, Workload::StatefulSet, d);
    settle(ctx, results, round, config, &ns).await;

    match &deployed.class_immediate {
        Some(class) => {
            let ns = namespace_name(round, config, "immediate");
            let e = measured(ctx, Workload::Immediate, immediate(ctx, &ns, class)).await;
            results.record(round, config, Workload::Immediate, e);
            settle(ctx, results, round, config, &ns).await;
        }
        None => {
            results.no_immediate.insert(config.to_string());
        }
    }

    if let Err(e) = script(&anchors.join("undeploy.sh"), &[config]).await {
        results.failure(round, config, "undeploy.sh", &e);
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a valid value")),
        _ => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let anchors = repo.join("tests/bench/anchors");
    let state = PathBuf::from(env_or("BENCH_STATE", "/tmp/stead-bench".to_string())?);
    let configs: Vec<String> = env_or("CONFIGS", DEFAULT_CONFIGS.to_string())?
        .split_whitespace()
        .map(String::from)
        .collect();
    let rounds: usize = env_or("ROUNDS", 2)?;
    if rounds == 0 || configs.is_empty() {
        return Err("ROUNDS must be at least 1 and CONFIGS name at least one configuration".into());
    }
    let sizes = Sizes {
        pods: env_or("BENCH_PODS", 100)?,
        replicas: env_or("BENCH_REPLICAS", 20)?,
        claims: env_or("BENCH_CLAIMS", 500)?,
    };
    let client = Client::try_default().await?;
    let kubernetes = client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_else(|e| format!("(version unknown: {e})"));
    let ctx = Ctx {
        client: client.clone(),
        sizes,
        deadline: Duration::from_secs(env_or("BENCH_DEADLINE", 900)?),
        image: busybox_image(),
        pids_sh: anchors.join("pids.sh"),
    };
    let machine = machine();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();

    let mut columns: Vec<&str> = configs.iter().map(String::as_str).collect();
    columns.push(EMPTYDIR);
    let mut results = Results::with_columns(&columns);
    let mut versions = BTreeMap::new();

    // What an interrupted run left, then no provisioner for the baseline.
    let leftovers = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{NS_LABEL}={NS_LABEL_VALUE}")))
        .await?;
    for ns in leftovers.items {
        quiet(&client, &ns.name_any(), ctx.deadline).await?;
    }
    if let Err(e) = script(&anchors.join("undeploy.sh"), &["all"]).await {
        results.failure(0, "all", "undeploy.sh", &e);
    }

    for round in 1..=rounds {
        eprintln!("bench-compare: round {round} of {rounds}");
        let ns = namespace_name(round, EMPTYDIR, "baseline");
        let b = measured(&ctx, Workload::Baseline, burst(&ctx, &ns, None)).await;
        results.record(round, EMPTYDIR, Workload::Baseline, b);
        settle(&ctx, &mut results, round, EMPTYDIR, &ns).await;
        for config in &configs {
            eprintln!("bench-compare: round {round}, {config}");
            run_config(
                &ctx,
                &anchors,
                &state,
                &mut results,
                &mut versions,
                round,
                config,
            )
            .await;
        }
    }

    let report = Report {
        machine,
        date,
        kubernetes,
        rounds,
        configs,
        image: ctx.image.clone(),
        versions,
    };
    let section = render_section(&results, &sizes, &report);
    bench::write_section(SECTION_START, SECTION_END, &section)?;
    println!("{section}");
    if !results.failures.is_empty() {
        eprintln!(
            "bench-compare: {} failures, listed in the section",
            results.failures.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: Sizes = Sizes {
        pods: 100,
        replicas: 20,
        claims: 500,
    };

    fn values(
        results: &mut Results,
        config: &str,
        workload: Workload,
        rounds: &[&[(Figure, f64)]],
    ) {
        for (i, figures) in rounds.iter().enumerate() {
            let figures = figures
                .iter()
                .map(|(f, v)| (*f, Outcome::Value(*v)))
                .collect();
            results.record(i + 1, config, workload, Ok(figures));
        }
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [9.0, 3.0]), Some(6.0));
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 10.0]), Some(3.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn a_ratio_is_steads_figure_over_the_peers() {
        assert_eq!(ratio(8.0, 16.0), Some(0.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(fmt_value(Unit::Seconds, 0.1234), "123 ms");
        assert_eq!(fmt_value(Unit::Seconds, 19.46), "19.5 s");
        assert_eq!(fmt_value(Unit::MiB, 23.04), "23.0 MiB");
    }

    #[test]
    fn the_table_has_the_medians_and_the_ratios() {
        let mut r = Results::with_columns(&[STEAD, "local-path", EMPTYDIR]);
        values(
            &mut r,
            STEAD,
            Workload::Burst,
            &[
                &[(Figure::BurstBound, 8.0), (Figure::BurstRunning, 20.0)],
                &[(Figure::BurstBound, 10.0), (Figure::BurstRunning, 22.0)],
            ],
        );
        values(
            &mut r,
            "local-path",
            Workload::Burst,
            &[
                &[(Figure::BurstBound, 150.0), (Figure::BurstRunning, 160.0)],
                &[(Figure::BurstBound, 170.0), (Figure::BurstRunning, 170.0)],
            ],
        );
        values(
            &mut r,
            EMPTYDIR,
            Workload::Baseline,
            &[
                &[(Figure::BurstRunning, 19.0)],
                &[(Figure::BurstRunning, 21.0)],
            ],
        );
        let table = render_table(&r, &SIZES);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "| figure | stead | local-path | emptyDir | Stead ÷ local-path | Stead ÷ emptyDir |",
                "|---|---|---|---|---|---|",
                "| (a) 100 pods, a claim each: all claims Bound | 9.0 s | 160.0 s | — | 0.06 | — |",
                "| (a) all 100 pods Running ((b) emptyDir: the same pods, no claim) | 21.0 s | 165.0 s | 20.0 s | 0.13 | 1.05 |",
            ]
        );
    }

    #[test]
    fn a_failed_config_is_reported_with_its_reason_and_the_run_goes_on() {
        let mut r = Results::with_columns(&[STEAD, "sidecar-tuned"]);
        values(
            &mut r,
            STEAD,
            Workload::StatefulSet,
            &[&[(Figure::StsReady, 40.0)], &[(Figure::StsReady, 50.0)]],
        );
        r.record(
            1,
            "sidecar-tuned",
            Workload::StatefulSet,
            Err("12 of 20 replicas Ready after 900 s".into()),
        );
        r.record(
            2,
            "sidecar-tuned",
            Workload::StatefulSet,
            Ok(vec![
                (Figure::StsReady, Outcome::Value(60.0)),
                (Figure::StsRss, Outcome::Value(110.0)),
            ]),
        );
        r.record(
            1,
            STEAD,
            Workload::Immediate,
            Err("not deployed: deploy.sh stead: exit status: 1 (timed out)".into()),
        );
        assert_eq!(
            r.failures,
            [
                "round 1, (d) StatefulSet on sidecar-tuned: 12 of 20 replicas Ready after 900 s",
                "round 1, (e) Immediate claims on stead: not deployed: deploy.sh stead: exit status: 1 (timed out)",
            ]
        );
        let table = render_table(&r, &SIZES);
        assert!(
            table.contains(
                "| (d) 20-replica StatefulSet (OrderedReady): all Ready | 45.0 s | 60.0 s (failed in 1 of 2 rounds) | 0.75 |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| (e) 500 Immediate claims: all Bound | failed: not deployed: deploy.sh stead: exit status: 1 (timed out) | — | — |"
            ),
            "{table}"
        );
    }

    #[test]
    fn the_targets_are_marked_met_or_missed() {
        let mut r = Results::with_columns(&[STEAD, "sidecar-defaults", "sidecar-tuned", EMPTYDIR]);
        let stead: &[(Figure, f64)] = &[
            (Figure::BurstBound, 8.6),
            (Figure::BurstRunning, 26.0),
            (Figure::BurstRss, 23.0),
        ];
        values(&mut r, STEAD, Workload::Burst, &[stead]);
        values(
            &mut r,
            "sidecar-defaults",
            Workload::Burst,
            &[&[
                (Figure::BurstBound, 19.5),
                (Figure::BurstRunning, 29.2),
                (Figure::BurstRss, 110.0),
            ]],
        );
        values(
            &mut r,
            "sidecar-tuned",
            Workload::Burst,
            &[&[
                (Figure::BurstBound, 7.9),
                (Figure::BurstRunning, 32.1),
                (Figure::BurstRss, 110.0),
            ]],
        );
        values(
            &mut r,
            EMPTYDIR,
            Workload::Baseline,
            &[&[(Figure::BurstRunning, 20.0)]],
        );
        values(
            &mut r,
            STEAD,
            Workload::Delete,
            &[&[(Figure::DeleteReleasedP50, 0.4)]],
        );
        let targets = render_targets(&r, &SIZES);
        assert_eq!(
            targets,
            "\
- Stead at least as fast as the best peer configuration on every time figure: **missed**
  - (a) 100 pods, a claim each: all claims Bound: Stead 8.6 s, best peer 7.9 s (sidecar-tuned): **missed**
  - (a) all 100 pods Running ((b) emptyDir: the same pods, no claim): Stead 26.0 s, best peer 29.2 s (sidecar-defaults): met
  - (c) a PV from Released to gone, p50: no peer measured it: not measured
- all pods Running within 1.15× of the emptyDir baseline: Stead 26.0 s ÷ emptyDir 20.0 s = 1.30: **missed**
- memory below every peer: met
  - (a) memory: peak of the summed RSS: Stead 23.0 MiB, best peer 110.0 MiB (sidecar-defaults): met
- a PV from Released to gone < 1 s p50: Stead 400 ms: met
"
        );
    }

    #[test]
    fn the_section_replaces_the_old_one_and_keeps_the_others() {
        let mut r = Results::with_columns(&[STEAD, EMPTYDIR]);
        values(
            &mut r,
            STEAD,
            Workload::Burst,
            &[&[(Figure::BurstRunning, 12.0)]],
        );
        r.no_immediate.insert("local-path".into());
        let report = Report {
            machine: "2 cores".into(),
            date: "2026-12-04 10:00 UTC".into(),
            kubernetes: "v1.34.4".into(),
            rounds: 1,
            configs: vec![STEAD.into()],
            image: "localhost/busybox:stead".into(),
            versions: BTreeMap::from([(STEAD.to_string(), "Stead v0.1.0".to_string())]),
        };
        let section = render_section(&r, &SIZES, &report);
        assert!(section.starts_with(&format!(
            "{SECTION_START}\n## Side by side (make bench-compare)\n"
        )));
        assert!(section.ends_with(SECTION_END));
        assert!(section.contains("  - `stead`: Stead v0.1.0\n"));
        assert!(section.contains("No Immediate class, so no (e): `local-path`.\n"));
        assert!(section.contains("Failures: none.\n"));
        assert!(section.contains(
            "| (a) all 100 pods Running ((b) emptyDir: the same pods, no claim) | 12.0 s | — | — |"
        ));
        let doc = format!(
            "# Benchmarks\n\n<!-- a -->A<!-- /a -->\n\n{SECTION_START}\nold table\n{SECTION_END}\n\n<!-- b -->B<!-- /b -->\n"
        );
        let new = bench::replace_section(&doc, SECTION_START, SECTION_END, &section);
        assert_eq!(
            new,
            format!(
                "# Benchmarks\n\n<!-- a -->A<!-- /a -->\n\n{section}\n\n<!-- b -->B<!-- /b -->\n"
            )
        );
        assert_eq!(new.matches("## Side by side").count(), 1);
    }

    #[test]
    fn usage_sums_memory_per_sample_and_cpu_per_process() {
        let p = |rss_kib, cpu, start| ProcSample {
            rss_kib,
            cpu,
            start,
        };
        let mut u = Usage {
            since: 1000,
            ..Usage::default()
        };
        // Two processes from before the workload.
        u.add(&[(10, p(10240, 5.0, 100)), (11, p(20480, 1.0, 200))]);
        // A helper started during it (from zero), the first one busier.
        u.add(&[
            (10, p(10240, 6.5, 100)),
            (11, p(20480, 1.0, 200)),
            (12, p(30720, 0.5, 1500)),
        ]);
        // The helper exited; its PID reused by a new process.
        u.add(&[
            (10, p(10240, 7.0, 100)),
            (11, p(20480, 1.5, 200)),
            (12, p(1024, 0.25, 1800)),
        ]);
        assert_eq!(u.peak_rss_kib, 61440);
        assert!((u.cpu_seconds() - 3.25).abs() < 1e-9, "{}", u.cpu_seconds());
        assert_eq!(
            u.figures(Figure::BurstRss, Figure::BurstCpu),
            vec![
                (Figure::BurstRss, Outcome::Value(60.0)),
                (Figure::BurstCpu, Outcome::Value(u.cpu_seconds())),
            ]
        );
        let none = Usage {
            samples: 4,
            ..Usage::default()
        };
        assert_eq!(
            none.figures(Figure::StsRss, Figure::StsCpu)[0],
            (
                Figure::StsRss,
                Outcome::Failed("pids.sh printed no PID in 4 samples".into())
            )
        );
    }

    #[test]
    fn current_env_is_read_as_bash_sources_it() {
        let dir = std::env::temp_dir().join(format!("bench-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("current.env");
        std::fs::write(
            &file,
            "BENCH_NAME=sidecar-tuned\nBENCH_CLASS_WFFC=bench-wffc\nBENCH_CLASS_IMMEDIATE=\nBENCH_VERSION=\"Stead v0.1.0-3-gabc + external-provisioner v5.3.0 (tuned)\"\n",
        )
        .unwrap();
        let read = read_current_env(&file);
        std::fs::write(&file, "BENCH_NAME=stead\n").unwrap();
        let without_class = read_current_env(&file);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            read,
            Ok(Deployed {
                name: "sidecar-tuned".into(),
                class_wffc: "bench-wffc".into(),
                class_immediate: None,
                version: "Stead v0.1.0-3-gabc + external-provisioner v5.3.0 (tuned)".into(),
            })
        );
        assert!(
            without_class
                .unwrap_err()
                .ends_with("sets no BENCH_CLASS_WFFC")
        );
    }

    #[test]
    fn a_reason_fits_in_a_cell() {
        assert_eq!(cell_text("a | b\nc"), "a / b c");
        assert_eq!(cell_text(&"x".repeat(200)).chars().count(), 120);
    }
}
