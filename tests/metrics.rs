//! The agent's `/metrics` counts what it served: real RPCs on its socket,
//! then a scrape, whose histogram counts and pool gauges must match them.

mod common;

use common::*;
use stead::proto::csi::v1::*;
use tonic::Code;

/// The value of the sample `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{series}: {v}: {e}")))
}

fn rpc_count(text: &str, method: &str, code: &str) -> Option<u64> {
    value(
        text,
        &format!(r#"stead_csi_rpc_duration_seconds_count{{method="{method}",code="{code}"}}"#),
    )
}

fn pool_bytes(text: &str, gauge: &str, pool: &str) -> u64 {
    let series = format!(r#"stead_pool_{gauge}_bytes{{pool="{pool}",backend="{pool}"}}"#);
    value(text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn volumes(text: &str, pool: &str, state: &str) -> Option<u64> {
    value(
        text,
        &format!(r#"stead_pool_volumes{{pool="{pool}",backend="{pool}",state="{state}"}}"#),
    )
}

#[tokio::test]
async fn metrics_count_the_rpcs_served_and_what_the_pools_promised() {
    let mut a = Agent::start("metrics").await;
    a.create("pvc-dir", "dir", mount_cap(""), 16 * MIB).await;
    a.create("pvc-img", "image", block_cap(), 32 * MIB).await;
    a.create("pvc-gone", "dir", mount_cap(""), 8 * MIB).await;
    a.delete("pvc-gone").await;
    let refused = a
        .controller
        .create_volume(CreateVolumeRequest {
            name: "pvc-bad".into(),
            volume_capabilities: vec![],
            ..Default::default()
        })
        .await
        .expect_err("a create without capabilities is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    a.node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap();
    let staging = a.staging("pvc-dir");
    a.stage("pvc-dir", &staging, mount_cap("")).await;

    let text = a.metrics().await;
    for (method, code, n) in [
        ("CreateVolume", "OK", 3),
        ("CreateVolume", "InvalidArgument", 1),
        ("DeleteVolume", "OK", 1),
        ("NodeGetCapabilities", "OK", 1),
        ("NodeStageVolume", "OK", 1),
    ] {
        assert_eq!(
            rpc_count(&text, method, code),
            Some(n),
            "{method} {code} in:\n{text}"
        );
    }
    // Only what happened has a series: no failed delete, no ListVolumes.
    assert_eq!(rpc_count(&text, "DeleteVolume", "NotFound"), None);
    assert_eq!(rpc_count(&text, "ListVolumes", "OK"), None);

    // What the pools were promised is the sizes of the volumes they keep.
    assert_eq!(pool_bytes(&text, "promised", "dir"), 16 * MIB as u64);
    assert_eq!(pool_bytes(&text, "promised", "image"), 32 * MIB as u64);
    for pool in ["dir", "image"] {
        let capacity = pool_bytes(&text, "capacity", pool);
        let free = pool_bytes(&text, "free", pool);
        let available = pool_bytes(&text, "available", pool);
        assert!(capacity > 0 && free <= capacity, "{pool}: {text}");
        // No reserve: what a volume may still get is the free space less
        // what was promised and not yet taken (a thick image took it all).
        assert!(available <= free, "{pool}: {text}");
    }
    // The thick image holds its blocks; the empty directory next to none.
    assert!(
        pool_bytes(&text, "used", "image") >= 32 * MIB as u64,
        "{text}"
    );
    assert!(pool_bytes(&text, "used", "dir") < MIB as u64, "{text}");
    for (pool, state, n) in [
        ("dir", "staged", 1),
        ("dir", "idle", 0),
        ("image", "idle", 1),
        ("image", "staged", 0),
        ("image", "published", 0),
    ] {
        assert_eq!(
            volumes(&text, pool, state),
            Some(n),
            "{pool} {state}: {text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");

    // A second scrape counts the RPCs since, and reads the pools again.
    a.unstage("pvc-dir", &staging).await;
    a.delete("pvc-img").await;
    let text = a.metrics().await;
    assert_eq!(rpc_count(&text, "DeleteVolume", "OK"), Some(2), "{text}");
    assert_eq!(
        rpc_count(&text, "NodeUnstageVolume", "OK"),
        Some(1),
        "{text}"
    );
    assert_eq!(pool_bytes(&text, "promised", "image"), 0, "{text}");
    assert_eq!(volumes(&text, "image", "idle"), Some(0), "{text}");
    assert_eq!(volumes(&text, "dir", "idle"), Some(1), "{text}");
}
