//! What the cluster benchmarks (`src/bin/bench_*.rs`) share: percentiles,
//! the machine they ran on, and their section of docs/BENCHMARKS.md.

use std::path::Path;
use std::time::Duration;

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

fn replace_section(old: &str, start: &str, end: &str, section: &str) -> String {
    match (old.find(start), old.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &old[..a], &old[b + end.len()..])
        }
        _ => format!("{}\n\n{section}\n", old.trim_end()),
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
}
