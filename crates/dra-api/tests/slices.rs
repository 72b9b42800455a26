//! ResourceSlice publication against the API-server emulator (which
//! validates slices as the API server does).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use apiserver_emulator::{ApiServer, DeviceRequest, DraApi};
use dra_api::DriverName;
use dra_api::slices::*;
use serde_json::json;

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

    // An unhealthy device is tainted; with a taint, 64 devices per slice
    // (the gate DRADeviceTaints is alpha in 1.34: enabled here).
    api.set_dra(apiserver_emulator::DraApi::V1_34.with_all_gates());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_are_probed_without_storing_anything() {
    let api = ApiServer::start().await.unwrap();
    api.add_node(NODE);
    let c = client(&api);
    let driver = DriverName::new(DRIVER).unwrap();
    let cases = [
        (DraApi::V1_34, Features::default()),
        (
            DraApi::V1_34.with_all_gates(),
            Features {
                consumable_capacity: true,
                device_taints: true,
                partitionable: Some(CounterLayout::SameSlice),
            },
        ),
        (DraApi::V1_35, Features::default()),
        (
            DraApi::V1_35.with_all_gates(),
            Features {
                consumable_capacity: true,
                device_taints: true,
                partitionable: Some(CounterLayout::OwnSlices),
            },
        ),
        (
            DraApi {
                device_taints: false,
                ..DraApi::V1_36
            },
            Features {
                consumable_capacity: true,
                device_taints: false,
                partitionable: Some(CounterLayout::OwnSlices),
            },
        ),
    ];
    for (release, want) in cases {
        api.set_dra(release);
        let got = probe_features(&c, &driver, NODE).await.unwrap();
        assert_eq!(got, want, "{release:?}");
    }
    assert!(api.resource_slices().is_empty(), "dry runs store nothing");
}

/// A PF (drawing all 2 slots) and 2 VFs (1 each) of one counter set.
fn sriov_family(layout: CounterLayout) -> DeviceSet {
    let vf = |n: &str| {
        SliceDevice::new(n)
            .unwrap()
            .attribute("type", Attribute::String("vf".into()))
            .consumes("pf", &[("slots", "1")])
    };
    DeviceSet::with_counters(
        vec![
            SliceDevice::new("pf")
                .unwrap()
                .attribute("type", Attribute::String("gpu".into()))
                .consumes("pf", &[("slots", "2")]),
            vf("vf-1"),
            vf("vf-2"),
        ],
        vec![CounterSet::new("pf").unwrap().counter("slots", "2")],
        layout,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_keep_a_pf_and_its_vfs_apart_on_both_layouts() {
    for (release, layout, slices) in [
        (DraApi::V1_34, CounterLayout::SameSlice, 1),
        (DraApi::V1_35, CounterLayout::OwnSlices, 2),
    ] {
        let api = ApiServer::start().await.unwrap();
        api.set_dra(release.with_all_gates());
        api.add_node(NODE);
        let config = PublisherConfig::new(DriverName::new(DRIVER).unwrap(), NODE);
        let p = SlicePublisher::start(client(&api), config, sriov_family(layout));
        assert_eq!(
            published(&p, 1).await,
            PublishState::Published {
                generation: 1,
                slices
            },
            "{release:?}"
        );
        let gpu = || DeviceRequest::new("gpu", DRIVER).attribute("type", json!({"string": "gpu"}));
        let vf = || DeviceRequest::new("vf", DRIVER).attribute("type", json!({"string": "vf"}));
        for n in ["a", "b", "c"] {
            api.create_resource_claim("default", n, json!({}));
        }
        // A VF first: the PF no longer fits, the other VF does.
        api.allocate("default", "a", &[vf()]).unwrap();
        let err = api.allocate("default", "b", &[gpu()]).unwrap_err();
        assert!(err.contains("only 0 of 1"), "{err}");
        api.allocate("default", "b", &[vf()]).unwrap();
        // Both VFs freed: the PF fits, and then no VF does.
        api.delete_resource_claim("default", "a");
        api.delete_resource_claim("default", "b");
        api.allocate("default", "c", &[gpu()]).unwrap();
        api.create_resource_claim("default", "d", json!({}));
        assert!(
            api.allocate("default", "d", &[vf()]).is_err(),
            "{release:?}"
        );
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_device_is_split_by_its_capacity() {
    let api = ApiServer::start().await.unwrap();
    api.set_dra(DraApi::V1_34.with_all_gates());
    api.add_node(NODE);
    let policy = RequestPolicy {
        default: "1000".into(),
        valid: ValidAmounts::Range {
            min: "10".into(),
            max: Some("1000".into()),
            step: Some("10".into()),
        },
    };
    let set = DeviceSet::new(vec![
        SliceDevice::new("gpu-0")
            .unwrap()
            .allow_multiple_allocations()
            .consumable("millicores", "1000", policy),
    ])
    .unwrap();
    let config = PublisherConfig::new(DriverName::new(DRIVER).unwrap(), NODE);
    let p = SlicePublisher::start(client(&api), config, set);
    published(&p, 1).await;
    let share = |m: &str| DeviceRequest::new("gpu", DRIVER).capacity("millicores", m);
    for n in ["a", "b", "c", "d"] {
        api.create_resource_claim("default", n, json!({}));
    }
    let a = api.allocate("default", "a", &[share("500")]).unwrap();
    assert!(a[0].share_id.is_some());
    assert_eq!(a[0].consumed["millicores"], "500");
    // 251 rounds up to 260: 500 + 260 fit, another 250 does not.
    let b = api.allocate("default", "b", &[share("251")]).unwrap();
    assert_eq!(b[0].consumed["millicores"], "260");
    assert!(api.allocate("default", "c", &[share("250")]).is_err());
    api.allocate("default", "c", &[share("240")]).unwrap();
    // A claim asking nothing takes the default: the whole GPU.
    api.delete_resource_claim("default", "a");
    api.delete_resource_claim("default", "b");
    api.delete_resource_claim("default", "c");
    let d = api
        .allocate("default", "d", &[DeviceRequest::new("gpu", DRIVER)])
        .unwrap();
    assert_eq!(d[0].consumed["millicores"], "1000");
    p.stop().await;
}
