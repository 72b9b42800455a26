//! The framework's servers answer whatever `:authority` a client sends, and
//! a connection that sends garbage is closed without harming the others.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use common::serve_null;
use devplugin_api::authority::AuthorityRule;
use devplugin_api::pb::device_plugin_client::DevicePluginClient;
use devplugin_api::pb::registration_client::RegistrationClient;
use devplugin_api::pb::registration_server::{Registration, RegistrationServer};
use devplugin_api::{pb, uds};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tonic::{Request, Response, Status};

const LIMIT: Duration = Duration::from_secs(10);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The authorities clients are known to send to a Unix socket, and worse.
fn authorities(path: &std::path::Path) -> Vec<(&'static str, AuthorityRule)> {
    let raw = path.to_str().unwrap().as_bytes().to_vec();
    let percent: Vec<u8> = raw
        .iter()
        .flat_map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                vec![b]
            } else {
                format!("%{b:02X}").into_bytes()
            }
        })
        .collect();
    vec![
        ("absent", AuthorityRule::Remove),
        ("empty", AuthorityRule::Set(Vec::new())),
        (
            "localhost (kubelet ≥ 1.26)",
            AuthorityRule::Set(b"localhost".to_vec()),
        ),
        (
            "raw path (grpc-go, kubelet < 1.26)",
            AuthorityRule::Set(raw),
        ),
        (
            "percent-encoded path (grpc-core ≥ 1.57)",
            AuthorityRule::Set(percent),
        ),
        (
            "unix: URI",
            AuthorityRule::Set(b"unix:///run/x.sock".to_vec()),
        ),
        (
            "control and high bytes",
            AuthorityRule::Set(b"\x01\x7f\xff\xfe a b".to_vec()),
        ),
        ("8 KiB", AuthorityRule::Set(vec![b'/'; 8192])),
    ]
}

async fn every_rpc(
    mut client: DevicePluginClient<tonic::transport::Channel>,
) -> Result<(), Status> {
    let o = client
        .get_device_plugin_options(pb::Empty {})
        .await?
        .into_inner();
    assert!(o.get_preferred_allocation_available);
    let mut stream = client.list_and_watch(pb::Empty {}).await?.into_inner();
    let first = stream.message().await?.expect("a first list");
    assert_eq!(first.devices.len(), 3);
    let preferred = client
        .get_preferred_allocation(pb::PreferredAllocationRequest {
            container_requests: vec![pb::ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["null-0".into(), "null-1".into(), "null-2".into()],
                must_include_device_i_ds: vec!["null-2".into()],
                allocation_size: 2,
            }],
        })
        .await?
        .into_inner();
    assert!(
        preferred.container_responses[0]
            .device_i_ds
            .contains(&"null-2".to_owned())
    );
    let allocated = client
        .allocate(pb::AllocateRequest {
            container_requests: vec![pb::ContainerAllocateRequest {
                devices_ids: vec!["null-1".into()],
            }],
        })
        .await?
        .into_inner();
    assert_eq!(
        allocated.container_responses[0].envs["NULL_DEVICES"],
        "null-1"
    );
    client
        .pre_start_container(pb::PreStartContainerRequest {
            devices_ids: vec!["null-1".into()],
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_whatever_authority_the_client_sends() {
    let (_dir, handle, socket) = serve_null().await;
    for (what, rule) in authorities(&socket) {
        let channel = uds::connect_with_authority(&socket, LIMIT, rule)
            .await
            .unwrap();
        let outcome =
            tokio::time::timeout(LIMIT, every_rpc(DevicePluginClient::new(channel))).await;
        assert!(matches!(outcome, Ok(Ok(()))), "{what}: {outcome:?}");
    }
    handle.stop().await;
}

struct Accept;

#[tonic::async_trait]
impl Registration for Accept {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        Ok(Response::new(pb::Empty {}))
    }
}

/// The control: the same requests against tonic without the adapter fail,
/// so the test above would catch the adapter's loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tonic_refuses_the_path_authorities_the_adapter_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.sock");
    let adapted = dir.path().join("adapted.sock");
    let l = UnixListener::bind(&plain).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Accept))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
    );
    let l = UnixListener::bind(&adapted).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Accept))
            .serve_with_incoming(uds::incoming(l)),
    );
    let call = |path: std::path::PathBuf, rule| async move {
        let channel = uds::connect_with_authority(&path, LIMIT, rule)
            .await
            .unwrap();
        RegistrationClient::new(channel)
            .register(pb::RegisterRequest::default())
            .await
    };
    for (what, rule) in authorities(&plain) {
        // h2 takes only what parses as a URI authority.
        let refused = !(what == "absent" || what.starts_with("localhost"));
        let got = call(plain.clone(), rule.clone()).await;
        assert_eq!(got.is_err(), refused, "plain tonic, {what}: {got:?}");
        let got = call(adapted.clone(), rule).await;
        assert!(got.is_ok(), "adapted, {what}: {got:?}");
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = len[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads until the server closes the connection; false if it stays open.
async fn closed_by_server(conn: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_all)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_connections_close_and_the_others_keep_being_served() {
    let (_dir, handle, socket) = serve_null().await;
    // A well-behaved client, connected before and used after each attack.
    let good = DevicePluginClient::new(uds::connect(&socket, LIMIT).await.unwrap());
    // A connection that stops mid-frame and holds: it must stall nobody.
    let mut stalled = UnixStream::connect(&socket).await.unwrap();
    stalled.write_all(PREFACE).await.unwrap();
    stalled
        .write_all(&frame(0x1, 0x4, 1, &[0x82, 0x86])[..7])
        .await
        .unwrap();

    let settings = frame(0x4, 0, 0, &[]);
    let with_settings = |frames: Vec<u8>| {
        let mut w = PREFACE.to_vec();
        w.extend(&settings);
        w.extend(frames);
        w
    };
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("not HTTP/2", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "bad HPACK index",
            with_settings(frame(0x1, 0x5, 1, &[0xff, 0x7f])),
        ),
        (
            "padding past the payload",
            with_settings(frame(0x1, 0xd, 1, &[200, 0x82])),
        ),
        (
            "CONTINUATION without HEADERS",
            with_settings(frame(0x9, 0x4, 1, &[0x82])),
        ),
        ("DATA inside a header block", {
            let mut f = frame(0x1, 0x0, 1, &[0x83]);
            f.extend(frame(0x0, 0x1, 1, b"x"));
            with_settings(f)
        }),
        (
            "PUSH_PROMISE from a client",
            with_settings(frame(0x5, 0x4, 1, &[0, 0, 0, 2, 0x82])),
        ),
        ("oversized header block", {
            let mut f = frame(0x1, 0x0, 1, &[0u8; 16_384]);
            for _ in 0..70 {
                f.extend(frame(0x9, 0x0, 1, &[0u8; 16_384]));
            }
            with_settings(f)
        }),
        (
            "frame larger than allowed",
            with_settings(frame(0x0, 0x0, 1, &[0u8; 70_000])),
        ),
        (
            "random bytes",
            with_settings(
                (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            ),
        ),
    ];
    for (what, bytes) in attacks {
        let mut conn = UnixStream::connect(&socket).await.unwrap();
        // The server may close before reading everything: a write error is
        // an answer too.
        let _ = conn.write_all(&bytes).await;
        assert!(
            closed_by_server(&mut conn).await,
            "{what}: the connection stayed open"
        );
        let outcome = tokio::time::timeout(LIMIT, every_rpc(good.clone())).await;
        assert!(matches!(outcome, Ok(Ok(()))), "after {what}: {outcome:?}");
    }
    // A new connection works as well as the old one.
    let fresh = DevicePluginClient::new(uds::connect(&socket, LIMIT).await.unwrap());
    every_rpc(fresh).await.unwrap();
    drop(stalled);
    handle.stop().await;
}
