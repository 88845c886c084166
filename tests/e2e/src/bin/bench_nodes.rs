//! `make bench-nodes` (issue 15's figures): reads what tests/bench/nodes.sh
//! gathered on the bundled three-node cluster and writes the section
//! "Moving data between nodes, and recovering from a lost node" of
//! docs/BENCHMARKS.md.
//!
//! The log it reads holds, from the e2e suites run by the script, the
//! `Pulled` event of each move ("node A received 1.0Gi of data (… volume)
//! from node B in 4.1 s (262.3 MB/s) …") and each node loss's line
//! ("  db-ss-1 on stead-node-2 after 38 s (node stead-node-3 deleted) …"),
//! and from the script lines `dd <bytes> <seconds>` of its `dd` copies
//! through the same disk.
//!
//!   bench_nodes LOG

use stead_e2e::bench;

const SECTION_START: &str =
    "<!-- bench-nodes:start (written by tests/e2e/src/bin/bench_nodes.rs) -->";
const SECTION_END: &str = "<!-- bench-nodes:end -->";

/// One move's pull, from its `Pulled` event.
#[derive(Debug, Clone, PartialEq)]
struct Pull {
    data: String,
    volume: String,
    seconds: f64,
    mb_per_s: f64,
}

fn parse_pull(line: &str) -> Option<Pull> {
    let rest = &line[line.find(" received ")? + " received ".len()..];
    let (data, rest) = rest.split_once(" of data (")?;
    let (volume, rest) = rest.split_once(" volume)")?;
    let rest = &rest[rest.find(" in ")? + 4..];
    let (seconds, rest) = rest.split_once(" s (")?;
    let (rate, _) = rest.split_once(" MB/s)")?;
    Some(Pull {
        data: data.to_string(),
        volume: volume.to_string(),
        seconds: seconds.parse().ok()?,
        mb_per_s: rate.parse().ok()?,
    })
}

/// One node loss: seconds from the kubelet and agent killed and the Node
/// deleted to the replica Ready on another node.
fn parse_loss(line: &str) -> Option<f64> {
    let rest = &line[line.find(" after ")? + " after ".len()..];
    let (secs, rest) = rest.split_once(" s (node ")?;
    rest.contains(" deleted)").then_some(())?;
    secs.parse().ok()
}

/// One `dd` copy: bytes and seconds.
fn parse_dd(line: &str) -> Option<(f64, f64)> {
    let mut it = line.strip_prefix("dd ")?.split_whitespace();
    let bytes = it.next()?.parse().ok()?;
    let secs = it.next()?.parse().ok()?;
    Some((bytes, secs))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.1}–{max:.1}")
}

fn section(log: &str, machine: &str, date: &str) -> Result<String, String> {
    let pulls: Vec<Pull> = log.lines().filter_map(parse_pull).collect();
    let losses: Vec<f64> = log.lines().filter_map(parse_loss).collect();
    let dds: Vec<(f64, f64)> = log.lines().filter_map(parse_dd).collect();
    if pulls.is_empty() {
        return Err("no move's Pulled event in the log: did the move suite pass?".into());
    }
    if losses.is_empty() {
        return Err("no node loss's recovery line in the log: did the nodeloss suite pass?".into());
    }
    if dds.is_empty() {
        return Err("no dd copy in the log".into());
    }
    let rate = median(pulls.iter().map(|p| p.mb_per_s).collect());
    let secs = median(pulls.iter().map(|p| p.seconds).collect());
    let dd_rates: Vec<f64> = dds.iter().map(|(b, s)| b / s / 1e6).collect();
    let dd_rate = median(dd_rates.clone());
    let dd_secs = median(dds.iter().map(|d| d.1).collect());
    let loss = median(losses.clone());
    let mut s = String::new();
    s.push_str(SECTION_START);
    s.push_str("\n## Moving data between nodes, and recovering from a lost node\n\n");
    s.push_str(&format!("- Machine: {machine}\n"));
    s.push_str("- Command: `make bench-nodes` (tests/bench/nodes.sh), as root, on the bundled three-node cluster (`make cluster-up`: each node a network namespace on a bridge, its pools on the machine's disk)\n");
    s.push_str(&format!("- Date: {date}\n"));
    s.push_str(&format!(
        "- *Move*: the move suite (`tests/e2e/tests/move.rs`) with `STEAD_MOVE_MIB={}`: a one-replica StatefulSet writes that much random data (every byte is data, nothing is skipped as a hole), is asked to move (`stead.csi.dev/move-to`), and the target's agent pulls the volume from the holder's over mutual TLS between the nodes' addresses; the time and rate are those of the `Pulled` event (the pull itself: handshake, chunks with their BLAKE3, the content digest on both sides, the fsyncs). {} moves.\n",
        std::env::var("STEAD_MOVE_MIB").unwrap_or_else(|_| "1024".into()),
        pulls.len()
    ));
    s.push_str(&format!(
        "- *dd*: the same amount copied with `dd bs=1M conv=fsync` from a file in a node's image pool folder to another in it (the same disk the pull reads and writes), its source dropped from the page cache first. {} copies.\n",
        dds.len()
    ));
    s.push_str(&format!(
        "- *Node loss*: the node-loss suite (`tests/e2e/tests/nodeloss.rs`): with a class `onNodeLoss: release`, a node's kubelet and agent are killed and its Node deleted; timed until the StatefulSet's replica of that node is Ready on another node on a new volume. {} losses.\n\n",
        losses.len()
    ));
    s.push_str("| figure | median | min–max | runs |\n|---|---|---|---|\n");
    s.push_str(&format!(
        "| move: pull of {} of data ({} volume) | {secs:.1} s, **{rate:.0} MB/s** | {} MB/s | {} |\n",
        pulls[0].data,
        pulls[0].volume,
        range(&pulls.iter().map(|p| p.mb_per_s).collect::<Vec<_>>()),
        pulls.len()
    ));
    s.push_str(&format!(
        "| dd through the same disk | {dd_secs:.1} s, **{dd_rate:.0} MB/s** | {} MB/s | {} |\n",
        range(&dd_rates),
        dds.len()
    ));
    s.push_str(&format!(
        "| node lost (Node deleted) → its replica Ready on another node | **{loss:.0} s** | {} s | {} |\n\n",
        range(&losses),
        losses.len()
    ));
    s.push_str(&format!(
        "- pull / dd: **{:.0}%** of the copy rate through the same disk.\n",
        100.0 * rate / dd_rate
    ));
    s.push_str(SECTION_END);
    Ok(s)
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: bench_nodes LOG");
        std::process::exit(2);
    };
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("bench_nodes: reading {path}: {e}");
        std::process::exit(1);
    });
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    match section(&log, &bench::machine(), &date) {
        Ok(s) => {
            if let Err(e) = bench::write_section(SECTION_START, SECTION_END, &s) {
                eprintln!("bench_nodes: writing docs/BENCHMARKS.md: {e}");
                std::process::exit(1);
            }
            println!("{s}");
        }
        Err(e) => {
            eprintln!("bench_nodes: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figures_are_read_from_the_suites_lines() {
        let log = "\
[e2e] Normal Pulled: node stead-node-1 received 1.0Gi of data (1.3Gi volume) from node stead-node-3 in 4.0 s (268.4 MB/s); content digest verified
  db-ss-1 on stead-node-2 after 41 s (node stead-node-3 deleted), new PV pvc-x
dd 1073741824 2.0
[e2e] Normal Pulled: node stead-node-2 received 1.0Gi of data (1.3Gi volume) from node stead-node-1 in 5.0 s (214.7 MB/s); content digest verified
dd 1073741824 1.0
";
        let s = section(log, "m", "d").unwrap();
        assert!(
            s.contains("| move: pull of 1.0Gi of data (1.3Gi volume) | 4.5 s, **242 MB/s**"),
            "{s}"
        );
        assert!(s.contains("**805 MB/s**"), "{s}");
        assert!(s.contains("**41 s**"), "{s}");
        assert!(s.contains("**30%**"), "{s}");
        assert!(section("dd 1 1\n", "m", "d").is_err());
    }
}
