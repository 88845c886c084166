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

/// The series of the count of `method`'s RPCs that ended with `code`.
fn rpcs(method: &str, code: &str) -> String {
    format!(r#"stead_csi_rpc_duration_seconds_count{{method="{method}",code="{code}"}}"#)
}

/// The series of the volumes of `pool` (a pool named as its backend) in
/// `state`.
fn volumes(pool: &str, state: &str) -> String {
    format!(r#"stead_pool_volumes{{pool="{pool}",backend="{pool}",state="{state}"}}"#)
}

/// Each series of `expected` has its value in `text`.
fn assert_values(text: &str, expected: &[(String, u64)]) {
    for (series, n) in expected {
        assert_eq!(value(text, series), Some(*n), "{series} in:\n{text}");
    }
}

fn pool_bytes(text: &str, gauge: &str, pool: &str) -> u64 {
    let series = format!(r#"stead_pool_{gauge}_bytes{{pool="{pool}",backend="{pool}"}}"#);
    value(text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
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
    assert_values(
        &text,
        &[
            (rpcs("CreateVolume", "OK"), 3),
            (rpcs("CreateVolume", "InvalidArgument"), 1),
            (rpcs("DeleteVolume", "OK"), 1),
            (rpcs("NodeGetCapabilities", "OK"), 1),
            (rpcs("NodeStageVolume", "OK"), 1),
            (volumes("dir", "staged"), 1),
            (volumes("dir", "idle"), 0),
            (volumes("image", "idle"), 1),
            (volumes("image", "staged"), 0),
            (volumes("image", "published"), 0),
        ],
    );
    // Only what happened has a series: no failed delete, no ListVolumes.
    assert_eq!(value(&text, &rpcs("DeleteVolume", "NotFound")), None);
    assert_eq!(value(&text, &rpcs("ListVolumes", "OK")), None);

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
    assert!(text.ends_with("# EOF\n"), "{text}");

    // A second scrape counts the RPCs since, and reads the pools again.
    a.unstage("pvc-dir", &staging).await;
    a.delete("pvc-img").await;
    let text = a.metrics().await;
    assert_values(
        &text,
        &[
            (rpcs("DeleteVolume", "OK"), 2),
            (rpcs("NodeUnstageVolume", "OK"), 1),
            (volumes("image", "idle"), 0),
            (volumes("dir", "idle"), 1),
            (volumes("dir", "staged"), 0),
        ],
    );
    assert_eq!(pool_bytes(&text, "promised", "image"), 0, "{text}");
}
