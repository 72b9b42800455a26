//! The wire is pinned: representative messages encode to bytes computed by
//! hand from the protobuf encoding rules (tag = field number << 3 | wire
//! type; 0 = varint, 2 = length-delimited), covering every field number of
//! every message, and decode back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use devplugin_api::pb;
use prost::Message;

#[track_caller]
fn pin<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, bytes: &[u8]) {
    assert_eq!(msg.encode_to_vec(), bytes, "{msg:?}");
    assert_eq!(&M::decode(bytes).unwrap(), msg);
}

fn s(v: &str) -> String {
    v.to_owned()
}

#[test]
fn device_plugin_options() {
    let o = pb::DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: true,
    };
    pin(&o, &[0x08, 0x01, 0x10, 0x01]);
}

#[test]
fn register_request() {
    let r = pb::RegisterRequest {
        version: s("v1beta1"),
        endpoint: s("e.sock"),
        resource_name: s("a/b"),
        options: Some(pb::DevicePluginOptions {
            pre_start_required: true,
            get_preferred_allocation_available: true,
        }),
    };
    let mut want = vec![0x0a, 7];
    want.extend_from_slice(b"v1beta1");
    want.extend_from_slice(&[0x12, 6]);
    want.extend_from_slice(b"e.sock");
    want.extend_from_slice(&[0x1a, 3]);
    want.extend_from_slice(b"a/b");
    want.extend_from_slice(&[0x22, 4, 0x08, 0x01, 0x10, 0x01]);
    pin(&r, &want);
}

#[test]
fn list_and_watch_with_topology() {
    let msg = pb::ListAndWatchResponse {
        devices: vec![pb::Device {
            id: s("d"),
            health: s("Healthy"),
            topology: Some(pb::TopologyInfo {
                nodes: vec![pb::NumaNode { id: 1 }],
            }),
        }],
    };
    let mut device = vec![0x0a, 1, b'd', 0x12, 7];
    device.extend_from_slice(b"Healthy");
    // Device.topology (3) > TopologyInfo.nodes (1) > NUMANode.ID (1, varint).
    device.extend_from_slice(&[0x1a, 4, 0x0a, 2, 0x08, 1]);
    let mut want = vec![0x0a, u8::try_from(device.len()).unwrap()];
    want.extend_from_slice(&device);
    pin(&msg, &want);
}

#[test]
fn pre_start_and_empty() {
    pin(
        &pb::PreStartContainerRequest {
            devices_ids: vec![s("x")],
        },
        &[0x0a, 1, b'x'],
    );
    pin(&pb::PreStartContainerResponse {}, &[]);
    pin(&pb::Empty {}, &[]);
}

#[test]
fn preferred_allocation() {
    let req = pb::PreferredAllocationRequest {
        container_requests: vec![pb::ContainerPreferredAllocationRequest {
            available_device_i_ds: vec![s("a")],
            must_include_device_i_ds: vec![s("b")],
            allocation_size: 2,
        }],
    };
    pin(&req, &[0x0a, 8, 0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 2]);
    let resp = pb::PreferredAllocationResponse {
        container_responses: vec![pb::ContainerPreferredAllocationResponse {
            device_i_ds: vec![s("a")],
        }],
    };
    pin(&resp, &[0x0a, 3, 0x0a, 1, b'a']);
}

#[test]
fn allocate() {
    let req = pb::AllocateRequest {
        container_requests: vec![pb::ContainerAllocateRequest {
            devices_ids: vec![s("a")],
        }],
    };
    pin(&req, &[0x0a, 3, 0x0a, 1, b'a']);

    let c = pb::ContainerAllocateResponse {
        envs: [(s("k"), s("v"))].into_iter().collect(),
        mounts: vec![pb::Mount {
            container_path: s("c"),
            host_path: s("h"),
            read_only: true,
        }],
        devices: vec![pb::DeviceSpec {
            container_path: s("c"),
            host_path: s("h"),
            permissions: s("rw"),
        }],
        annotations: [(s("a"), s("b"))].into_iter().collect(),
        cdi_devices: vec![pb::CdiDevice { name: s("n") }],
    };
    let container: Vec<u8> = [
        // envs (1): a map entry is a message {key = 1, value = 2}.
        &[0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v'][..],
        // mounts (2): container_path 1, host_path 2, read_only 3.
        &[0x12, 8, 0x0a, 1, b'c', 0x12, 1, b'h', 0x18, 1],
        // devices (3): container_path 1, host_path 2, permissions 3.
        &[0x1a, 10, 0x0a, 1, b'c', 0x12, 1, b'h', 0x1a, 2, b'r', b'w'],
        // annotations (4).
        &[0x22, 6, 0x0a, 1, b'a', 0x12, 1, b'b'],
        // cdi_devices (5): name 1.
        &[0x2a, 3, 0x0a, 1, b'n'],
    ]
    .concat();
    pin(&c, &container);
    let mut want = vec![0x0a, u8::try_from(container.len()).unwrap()];
    want.extend_from_slice(&container);
    pin(
        &pb::AllocateResponse {
            container_responses: vec![c],
        },
        &want,
    );
}

#[test]
fn service_names_and_method_paths() {
    assert_eq!(
        pb::registration_server::SERVICE_NAME,
        "v1beta1.Registration"
    );
    assert_eq!(
        pb::device_plugin_server::SERVICE_NAME,
        "v1beta1.DevicePlugin"
    );
    // The method paths are part of the wire: they are in the generated code.
    let code = include_str!("../src/pb/v1beta1.rs");
    for path in [
        "/v1beta1.Registration/Register",
        "/v1beta1.DevicePlugin/GetDevicePluginOptions",
        "/v1beta1.DevicePlugin/ListAndWatch",
        "/v1beta1.DevicePlugin/GetPreferredAllocation",
        "/v1beta1.DevicePlugin/Allocate",
        "/v1beta1.DevicePlugin/PreStartContainer",
    ] {
        assert!(code.contains(&format!("\"{path}\"")), "{path}");
    }
}
