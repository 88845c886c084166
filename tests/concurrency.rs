//! Concurrent RPCs: different volumes in parallel, one volume serialized,
//! capacity never over-committed.

mod common;

use common::*;
use stead::proto::csi::v1::*;

#[tokio::test]
async fn twenty_concurrent_creates_all_land() {
    let a = Agent::start("conc").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = a.controller.clone();
        let pool = if i % 2 == 0 { "dir" } else { "image" };
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req(
                &format!("pvc-c{i:02}"),
                pool,
                mount_cap(""),
                16 * MIB,
            ))
            .await
            .map(|r| r.into_inner().volume.unwrap().volume_id)
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("concurrent create");
    }
    // And 20 concurrent creates of one name yield one volume.
    let mut same = Vec::new();
    for _ in 0..20 {
        let mut c = a.controller.clone();
        same.push(tokio::spawn(async move {
            c.create_volume(create_req("pvc-same", "image", mount_cap(""), 16 * MIB))
                .await
                .map(|r| r.into_inner().volume.unwrap().volume_id)
        }));
    }
    for t in same {
        assert_eq!(t.await.unwrap().unwrap(), "pvc-same");
    }
    let mut c = a.controller.clone();
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 7,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 7);
        ids.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(ids.len(), 21);
    assert_eq!(std::fs::read_dir(a.dir_pool()).unwrap().count(), 10);
    assert_eq!(std::fs::read_dir(a.image_pool()).unwrap().count(), 11);
}

#[tokio::test]
async fn capacity_shrinks_by_what_volumes_are_promised() {
    // On a filesystem of its own: free space on the machine's disk moves
    // with whatever else writes there (the other test of this file makes
    // 21 volumes meanwhile), and the drop must be this volume's alone.
    let mut a = Agent::start_on_fs("cap", "ext4", 2048, common::default_pools).await;
    let cap_of = |pool: &str| GetCapacityRequest {
        parameters: [("pool".to_owned(), pool.to_owned())].into(),
        ..Default::default()
    };
    let before = a
        .controller
        .get_capacity(cap_of("dir"))
        .await
        .unwrap()
        .into_inner();
    a.create("pvc-big", "dir", mount_cap(""), 512 * MIB).await;
    let after = a
        .controller
        .get_capacity(cap_of("dir"))
        .await
        .unwrap()
        .into_inner();
    let drop = before.available_capacity - after.available_capacity;
    assert!(
        (512 * MIB - 64 * MIB..=512 * MIB + 64 * MIB).contains(&drop),
        "capacity dropped by {drop}"
    );
    // Another node's topology: nothing here.
    let other = a
        .controller
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(Topology {
                segments: [(stead::TOPOLOGY_KEY.to_owned(), "elsewhere".to_owned())].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.available_capacity, 0);
    let unknown = a
        .controller
        .get_capacity(cap_of("nosuchpool"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unknown.available_capacity, 0);
}
