//! The workload behind `make dashboard-local` (tests/dashboard/README.md):
//! two agents, each on a 1 GiB xfs of its own, scraped by
//! tests/dashboard/capture.sh while real CSI RPCs on their sockets create,
//! mount, fill, grow and delete volumes, with a few refused ones. Ignored by
//! `cargo test`: it takes minutes and writes a capture where
//! STEAD_DASHBOARD_CAPTURE says.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use stead::proto::csi::v1::*;
use tokio::time::sleep;
use tonic::Code;

/// What one volume of the workload is.
struct Vol {
    id: String,
    agent: usize,
    cap: VolumeCapability,
    /// Its mount, when it has a filesystem the workload writes into.
    target: Option<PathBuf>,
}

const VOLUMES: usize = 30;

fn spec(i: usize) -> (&'static str, VolumeCapability, i64) {
    match i % 3 {
        0 => ("dir", mount_cap(""), 32 * MIB),
        1 => ("image", mount_cap("ext4"), 48 * MIB),
        _ => ("image", block_cap(), 32 * MIB),
    }
}

/// Writes `mib` MiB into a file of the mounted volume at `target`.
fn fill(target: &Path, mib: usize) {
    std::fs::write(target.join("data"), vec![0x5a; mib * MIB as usize]).unwrap();
}

#[tokio::test]
#[ignore = "minutes long: make dashboard-local"]
async fn dashboard_workload_on_two_agents() {
    let out = std::env::var("STEAD_DASHBOARD_CAPTURE")
        .expect("STEAD_DASHBOARD_CAPTURE: the directory the capture goes to");
    let interval = std::env::var("STEAD_DASHBOARD_INTERVAL").unwrap_or_else(|_| "5".into());
    let mut agents = vec![
        Agent::start_on_fs("dash-a", "xfs", 1024, default_pools).await,
        Agent::start_on_fs("dash-b", "xfs", 1024, default_pools).await,
    ];
    let mut urls = vec![];
    for (name, a) in ["local-a", "local-b"].iter().zip(&agents) {
        urls.push(format!("{name}=http://{}/metrics", a.health_addr().await));
    }
    let stop = PathBuf::from(&out).join("stop");
    let _ = std::fs::remove_file(&stop);
    let mut capture = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/dashboard/capture.sh"
    ))
    .arg(&out)
    .args(["--interval", &interval, "--duration", "1200", "--until"])
    .arg(&stop)
    .args(&urls)
    .spawn()
    .expect("start tests/dashboard/capture.sh");
    let pace = |s: u64| sleep(Duration::from_secs(s));

    // A quiet start: the pools as they are, no RPCs yet.
    pace(15).await;

    // Thirty volumes, one every two seconds, alternating agents: each
    // created, staged, published, and written into when it has a filesystem.
    // Every sixth step also sends what a confused CO might: a create without
    // capabilities and a publish of a volume that does not exist.
    let mut vols = vec![];
    for i in 0..VOLUMES {
        let agent = i % 2;
        let (pool, cap, bytes) = spec(i);
        let id = format!("pvc-dash-{i:02}");
        let a = &mut agents[agent];
        a.create(&id, pool, cap.clone(), bytes).await;
        let target = a.mount(&id, &cap).await;
        let mounted = matches!(
            cap.access_type,
            Some(volume_capability::AccessType::Mount(_))
        );
        if mounted {
            fill(&target, 8 + i % 4 * 4);
        }
        a.available(pool).await;
        vols.push(Vol {
            id,
            agent,
            cap,
            target: mounted.then_some(target),
        });
        if i % 6 == 5 {
            let refused = a
                .controller
                .create_volume(CreateVolumeRequest {
                    name: format!("pvc-dash-bad-{i}"),
                    volume_capabilities: vec![],
                    ..Default::default()
                })
                .await
                .expect_err("a create without capabilities is refused");
            assert_eq!(refused.code(), Code::InvalidArgument);
            let staging = a.staging("pvc-dash-missing");
            let target = a.target("pvc-dash-missing");
            let missing = a
                .publish("pvc-dash-missing", &staging, &target, mount_cap(""), false)
                .await
                .expect_err("a publish of no volume fails");
            assert_eq!(missing.code(), Code::NotFound);
        }
        pace(2).await;
    }

    // Time at rest, the kubelet asking for volume stats now and then.
    for _ in 0..6 {
        for v in &vols {
            if let Some(t) = &v.target {
                agents[v.agent].stats(&v.id, t).await;
            }
        }
        pace(5).await;
    }

    // One ext4 volume grown online, as the resizer and the kubelet do it.
    let grown = vols.iter().find(|v| v.id.ends_with("01")).unwrap();
    let target = grown.target.clone().unwrap();
    let a = &mut agents[grown.agent];
    let range = Some(CapacityRange {
        required_bytes: 96 * MIB,
        limit_bytes: 0,
    });
    let r = a
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: grown.id.clone(),
            capacity_range: range,
            volume_capability: Some(grown.cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("ControllerExpandVolume {}: {e}", grown.id))
        .into_inner();
    assert_eq!(r.capacity_bytes, 96 * MIB);
    let online = a
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: grown.id.clone(),
            volume_path: path_str(&target),
            capacity_range: range,
            volume_capability: Some(grown.cap.clone()),
            ..Default::default()
        })
        .await;
    if let Err(e) = online {
        // Without CAP_SYS_RESOURCE the kernel refuses online ext4 growth
        // (tests/lifecycle.rs): the volume grows offline on its next stage.
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        a.unmount(&grown.id).await;
        a.mount(&grown.id, &grown.cap).await;
    }
    fill(&target, 64);
    pace(20).await;

    // Half the volumes go: unpublished, unstaged, deleted, one every two
    // seconds.
    for v in vols.drain(..VOLUMES / 2) {
        agents[v.agent].unmount(&v.id).await;
        agents[v.agent].delete(&v.id).await;
        pace(2).await;
    }

    // A quiet end, so that the rates fall back to nothing.
    pace(40).await;
    std::fs::write(&stop, "").unwrap();
    let st = capture.wait().unwrap();
    assert!(st.success(), "capture.sh: {st}");

    // The agents' roots are released when they are dropped: the rest first.
    for v in vols {
        agents[v.agent].unmount(&v.id).await;
        agents[v.agent].delete(&v.id).await;
    }
}
