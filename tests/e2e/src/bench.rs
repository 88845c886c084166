//! What the cluster benchmarks (`src/bin/bench_*.rs`) share: percentiles,
//! the machine they ran on, their section of docs/BENCHMARKS.md, the
//! processes they read from /proc, and the watches that time claims, pods and
//! PV deletions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume};
use k8s_openapi::serde::de::DeserializeOwned;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

/// The `p` quantile (0..=1) of durations sorted ascending, nearest rank;
/// zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Whole milliseconds, with the unit.
pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The machine, as the benchmark sections state it: cores, CPU model,
/// memory, kernel, and the load when the run started (the cores are shared
/// with whatever else runs: figures are medians for that reason).
pub fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease");
    let load = read("/proc/loadavg");
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cores} cores (`nproc` = {cores}), {cpu}, {:.1} GiB memory, Linux {}; load average at start {}: the cores are shared with other builds",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim(),
        load.join(" ")
    )
}

/// Replaces the text between the markers `start` and `end` of
/// docs/BENCHMARKS.md (markers included, `section` must hold them) with
/// `section`, or appends it when the markers are not there.
pub fn write_section(start: &str, end: &str, section: &str) -> std::io::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    std::fs::write(&path, replace_section(&old, start, end, section))
}

/// `old` with the text between `start` and `end` (markers included)
/// replaced by `section`, or with `section` appended when the markers are not
/// there.
pub fn replace_section(old: &str, start: &str, end: &str, section: &str) -> String {
    match (old.find(start), old.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &old[..a], &old[b + end.len()..])
        }
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    }
}

/// What the cluster helpers below fail with.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Clock ticks per second in /proc/PID/stat (`CLK_TCK`, 100 on Linux x86_64).
const CLK_TCK: f64 = 100.0;

/// One reading of a process from /proc.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// VmRSS, KiB (0 for a kernel thread).
    pub rss_kib: u64,
    /// utime + stime, seconds.
    pub cpu: f64,
    /// When it started, in clock ticks after boot: with the PID it names one
    /// process, as PIDs are reused.
    pub start: u64,
}

/// `pid` read from /proc, or None when it is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_proc(&status, &stat))
}

/// A process's VmRSS (KiB) and CPU seconds; zeros when it is gone.
pub fn proc_stats(pid: u32) -> (u64, f64) {
    proc_sample(pid)
        .map(|s| (s.rss_kib, s.cpu))
        .unwrap_or((0, 0.0))
}

fn parse_proc(status: &str, stat: &str) -> ProcSample {
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    // The fields after the command name, which is in parentheses and may
    // hold spaces: the state is the first (field 3 of proc(5)).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> u64 { f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    ProcSample {
        rss_kib,
        cpu: (field(14) + field(15)) as f64 / CLK_TCK,
        start: field(22),
    }
}

/// The machine's uptime in clock ticks, the unit of [`ProcSample::start`].
pub fn uptime_ticks() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * CLK_TCK) as u64)
        .unwrap_or(0)
}

/// When each object of a watch first met a condition (a claim Bound, a pod
/// Running), by the key `key` returns for it then (None: not yet). The watch
/// has listed before [`FirstSeen::start`] returns, so nothing created
/// afterwards is missed.
pub struct FirstSeen {
    times: Arc<Mutex<HashMap<String, Instant>>>,
    count: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl FirstSeen {
    pub async fn start<K, F>(api: Api<K>, key: F) -> Result<FirstSeen, Error>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> Option<String> + Send + 'static,
    {
        let times: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let (count_tx, count) = tokio::sync::watch::channel(0);
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let task = {
            let times = times.clone();
            tokio::spawn(async move {
                let mut listed_tx = Some(listed_tx);
                let stream = watcher(api, watcher::Config::default()).default_backoff();
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let now = Instant::now();
                    let obj = match event {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = listed_tx.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        // A deletion meets no condition; errors: the watcher
                        // lists again after its backoff.
                        Ok(watcher::Event::Init | watcher::Event::Delete(_)) | Err(_) => continue,
                    };
                    if let Some(k) = key(&obj) {
                        let mut times = times.lock().unwrap();
                        if let std::collections::hash_map::Entry::Vacant(e) = times.entry(k) {
                            e.insert(now);
                            count_tx.send_replace(times.len());
                        }
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(60), listed)
            .await
            .map_err(|_| "the watch did not list within 60 s")??;
        Ok(FirstSeen { times, count, task })
    }

    /// Waits until `n` objects met the condition, or `until`; the count
    /// reached when it gives up as the error.
    pub async fn wait(&mut self, n: usize, until: Instant) -> Result<(), usize> {
        let until = tokio::time::Instant::from_std(until);
        let reached = tokio::time::timeout_at(until, self.count.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(*self.count.borrow())
        }
    }

    /// What was seen so far, by key.
    pub fn times(&self) -> HashMap<String, Instant> {
        self.times.lock().unwrap().clone()
    }
}

impl Drop for FirstSeen {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A deletion as a PV watch saw it: the PVs whose claim was in one namespace.
#[derive(Debug, Default, Clone)]
pub struct Deletion {
    pub pvs: usize,
    /// How many of them the watch saw Released before gone (the PVs the
    /// percentiles below are of).
    pub released: usize,
    /// From the delete call until the last PV is gone.
    pub all_gone: Duration,
    /// From the moment the watch sees a PV Released to the moment it sees
    /// it deleted.
    pub released_p50: Duration,
    pub released_p99: Duration,
}

fn claim_namespace(pv: &PersistentVolume) -> Option<&str> {
    pv.spec.as_ref()?.claim_ref.as_ref()?.namespace.as_deref()
}

/// How many PVs are bound (or were, Released) to claims of `ns`.
pub async fn pvs_of(client: &Client, ns: &str) -> Result<usize, Error> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    Ok(pvs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|pv| claim_namespace(pv) == Some(ns))
        .count())
}

/// Waits until the namespace `name` is gone, polled each second up to
/// `within`.
pub async fn namespace_gone(client: &Client, name: &str, within: Duration) -> Result<(), Error> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + within;
    while namespaces.get_opt(name).await?.is_some() {
        if Instant::now() > deadline {
            return Err(
                format!("namespace {name} still there after {} s", within.as_secs()).into(),
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Times a deletion of the PVs of one namespace's claims by a PV watch.
pub struct PvDeletion {
    ns: String,
    released: Arc<Mutex<HashMap<String, Instant>>>,
    gone: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PvDeletion {
    /// Starts the watch and returns after its initial list, which holds
    /// every PV of `ns`: a delete made afterwards misses no transition.
    pub async fn watch(client: &Client, ns: &str) -> Result<PvDeletion, Error> {
        let released: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let gone: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let task = {
            let (released, gone) = (released.clone(), gone.clone());
            let ns = ns.to_string();
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            tokio::spawn(async move {
                let mut listed_tx = Some(listed_tx);
                let stream = watcher(pvs, watcher::Config::default()).default_backoff();
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let (pv, deleted) = match event {
                        Ok(watcher::Event::Apply(pv) | watcher::Event::InitApply(pv)) => {
                            (pv, false)
                        }
                        Ok(watcher::Event::Delete(pv)) => (pv, true),
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = listed_tx.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        Ok(watcher::Event::Init) | Err(_) => continue,
                    };
                    if claim_namespace(&pv) != Some(ns.as_str()) {
                        continue;
                    }
                    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
                    if deleted {
                        gone.lock().unwrap().insert(pv.name_any(), Instant::now());
                    } else if phase == Some("Released") {
                        released
                            .lock()
                            .unwrap()
                            .entry(pv.name_any())
                            .or_insert_with(Instant::now);
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(60), listed)
            .await
            .map_err(|_| "the PV watch did not list within 60 s")??;
        Ok(PvDeletion {
            ns: ns.to_string(),
            released,
            gone,
            task,
        })
    }

    /// Waits until no PV of the namespace is left (listed each second, up to
    /// `within`) and the watch has seen `expected` of them deleted, then
    /// times them from `deleting`, the moment the delete call was made.
    pub async fn finish(
        self,
        client: &Client,
        deleting: Instant,
        expected: usize,
        within: Duration,
    ) -> Result<Deletion, Error> {
        let deadline = Instant::now() + within;
        loop {
            let left = pvs_of(client, &self.ns).await?;
            if left == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "namespace {}: {left} PVs still there after {} s",
                    self.ns,
                    within.as_secs()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The last deletions may reach the watch a moment after the list
        // shows them: polled, with a deadline; the condition is the watch's
        // count, the 100 ms only the poll's step.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.gone.lock().unwrap().len() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (released, gone) = (self.released.lock().unwrap(), self.gone.lock().unwrap());
        let mut lat: Vec<Duration> = gone
            .iter()
            .filter_map(|(pv, t)| released.get(pv).map(|r| t.saturating_duration_since(*r)))
            .collect();
        lat.sort();
        Ok(Deletion {
            pvs: gone.len(),
            released: lat.len(),
            all_gone: gone
                .values()
                .max()
                .map(|t| t.saturating_duration_since(deleting))
                .unwrap_or_default(),
            released_p50: percentile(&lat, 0.5),
            released_p99: percentile(&lat, 0.99),
        })
    }
}

impl Drop for PvDeletion {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let d: Vec<Duration> = (1..=10).map(Duration::from_secs).collect();
        assert_eq!(percentile(&d, 0.5), Duration::from_secs(6));
        assert_eq!(percentile(&d, 0.99), Duration::from_secs(10));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn a_section_is_replaced_in_place_or_appended() {
        let doc = "# B\n\n<!-- a -->old<!-- /a -->\n\nrest\n";
        assert_eq!(
            replace_section(doc, "<!-- a -->", "<!-- /a -->", "<!-- a -->new<!-- /a -->"),
            "# B\n\n<!-- a -->new<!-- /a -->\n\nrest\n"
        );
        assert_eq!(
            replace_section(
                "# B\n",
                "<!-- x -->",
                "<!-- /x -->",
                "<!-- x -->s<!-- /x -->"
            ),
            "# B\n\n<!-- x -->s<!-- /x -->\n"
        );
    }

    #[test]
    fn a_process_is_read_from_its_status_and_stat() {
        let status = "Name:\tcsi-provisioner\nVmHWM:\t   30000 kB\nVmRSS:\t   24576 kB\n";
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime prio nice threads
        // itrealvalue starttime ...
        let stat = "4242 (csi provisioner) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 12 0 987654 0 0";
        assert_eq!(
            parse_proc(status, stat),
            ProcSample {
                rss_kib: 24576,
                cpu: 3.0,
                start: 987654,
            }
        );
        let kernel_thread = parse_proc(
            "Name:\tkworker\n",
            "7 (kworker/0:1) I 2 0 0 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 5 0",
        );
        assert_eq!(kernel_thread.rss_kib, 0);
        assert_eq!(kernel_thread.start, 5);
    }
}
