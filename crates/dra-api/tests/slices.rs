//! ResourceSlice publication against the API-server emulator (which
//! validates slices as the API server does).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use apiserver_emulator::ApiServer;
use dra_api::DriverName;
use dra_api::slices::*;

const NODE: &str = "worker-0";
const DRIVER: &str = "gpu.example.com";
const LIMIT: Duration = Duration::from_secs(10);

fn client(api: &ApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

fn devices(n: usize) -> DeviceSet {
    DeviceSet::new(
        (0..n)
            .map(|i| {
                SliceDevice::new(&format!("gpu-{i}"))
                    .unwrap()
                    .attribute("model", Attribute::String("Flex 170".into()))
                    .attribute("index", Attribute::Int(i64::try_from(i).unwrap()))
                    .capacity("memory", "16Gi")
            })
            .collect(),
    )
    .unwrap()
}

async fn published(p: &SlicePublisher, generation: i64) -> PublishState {
    let mut rx = p.watch_status();
    tokio::time::timeout(
        LIMIT,
        rx.wait_for(
            |s| matches!(s, PublishState::Published { generation: g, .. } if *g == generation),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("generation {generation} not published: {:?}", p.status()))
    .unwrap()
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_per_node_split_owned_and_kept_up_to_date() {
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let node_uid = api.node(NODE).unwrap().uid;
    let config = PublisherConfig::new(DriverName::new(DRIVER).unwrap(), NODE)
        .resync(Duration::from_millis(200));
    let p = SlicePublisher::start(client(&api), config, devices(300));
    assert_eq!(
        published(&p, 1).await,
        PublishState::Published {
            generation: 1,
            slices: 3
        }
    );
    let slices = api.resource_slices();
    let names: Vec<&String> = slices.keys().collect();
    assert_eq!(
        names,
        [
            "worker-0-gpu.example.com-0",
            "worker-0-gpu.example.com-1",
            "worker-0-gpu.example.com-2"
        ]
    );
    let s = &slices["worker-0-gpu.example.com-0"];
    assert_eq!(s["spec"]["pool"]["name"], NODE);
    assert_eq!(s["spec"]["pool"]["resourceSliceCount"], 3);
    assert_eq!(s["spec"]["nodeName"], NODE);
    assert_eq!(s["spec"]["devices"].as_array().unwrap().len(), 128);
    assert_eq!(
        s["spec"]["devices"][0]["attributes"]["model"]["string"],
        "Flex 170"
    );
    assert_eq!(
        s["spec"]["devices"][0]["capacity"]["memory"]["value"],
        "16Gi"
    );
    let owner = &s["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["uid"].as_str()),
        (Some("Node"), Some(node_uid.as_str()))
    );

    // Fewer devices: one slice, a new generation, the stale ones deleted.
    p.publish(devices(100));
    published(&p, 2).await;
    assert_eq!(api.resource_slices().len(), 1);
    // Resyncs of an unchanged set keep the generation.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        p.status(),
        PublishState::Published {
            generation: 2,
            slices: 1
        }
    );

    // A kubelet starting wipes its node's slices: they come back, newer.
    assert_eq!(api.wipe_resource_slices(NODE, None), 1);
    published(&p, 3).await;
    assert_eq!(api.resource_slices().len(), 1);

    // An unhealthy device is tainted; with a taint, 64 devices per slice.
    let mut set: Vec<SliceDevice> = devices(100).devices().to_vec();
    set[7] = set[7].clone().taint(DeviceTaint {
        key: "gpu.example.com/unhealthy".into(),
        value: Some("hang".into()),
        effect: TaintEffect::NoExecute,
    });
    p.publish(DeviceSet::new(set).unwrap());
    assert_eq!(
        published(&p, 4).await,
        PublishState::Published {
            generation: 4,
            slices: 2
        }
    );
    let tainted = api
        .resource_slices()
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().unwrap().clone())
        .find(|d| d["taints"].is_array())
        .unwrap();
    assert_eq!(tainted["taints"][0]["effect"], "NoExecute");

    // No devices: no slices.
    p.publish(DeviceSet::default());
    published(&p, 5).await;
    assert!(api.resource_slices().is_empty());

    // The Node goes: so would its slices (owned by it).
    p.publish(devices(2));
    published(&p, 6).await;
    p.stop().await;
    api.delete_node(NODE);
    assert!(api.resource_slices().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_failures_are_retried_and_shown() {
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    api.fault_rate(1.0);
    let config =
        PublisherConfig::new(DriverName::new(DRIVER).unwrap(), NODE).backoff(ops_kit_backoff());
    let p = SlicePublisher::start(client(&api), config, devices(3));
    let mut rx = p.watch_status();
    tokio::time::timeout(
        LIMIT,
        rx.wait_for(|s| matches!(s, PublishState::Retrying { attempt, .. } if *attempt >= 1)),
    )
    .await
    .unwrap()
    .unwrap();
    api.fault_rate(0.0);
    published(&p, 1).await;
    assert_eq!(api.resource_slices().len(), 1);
    p.stop().await;
}

fn ops_kit_backoff() -> ops_kit::Backoff {
    ops_kit::Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    }
}

/// The emulator's allocator stand-in picks published devices by attribute
/// equality, each once, and says when too few match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_devices_are_allocated_by_attributes() {
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let p = SlicePublisher::start(
        client(&api),
        PublisherConfig::new(DriverName::new(DRIVER).unwrap(), NODE),
        devices(4),
    );
    published(&p, 1).await;
    api.create_resource_claim("default", "one", serde_json::json!({}));
    api.create_resource_claim("default", "two", serde_json::json!({}));
    api.create_resource_claim("default", "many", serde_json::json!({}));
    let one = api
        .allocate_resource_claim_matching(
            "default",
            "one",
            "gpu",
            DRIVER,
            &[("index", serde_json::json!({"int": 1}))],
            1,
        )
        .unwrap();
    assert_eq!(one, ["gpu-1"]);
    let two = api
        .allocate_resource_claim_matching(
            "default",
            "two",
            "gpu",
            DRIVER,
            &[("model", serde_json::json!({"string": "Flex 170"}))],
            2,
        )
        .unwrap();
    assert_eq!(two.len(), 2);
    assert!(
        !two.contains(&"gpu-1".to_owned()),
        "gpu-1 is taken: {two:?}"
    );
    let e = api
        .allocate_resource_claim_matching("default", "many", "gpu", DRIVER, &[], 2)
        .unwrap_err();
    assert!(e.contains("only 1 of 2"), "{e}");
    p.stop().await;
}
