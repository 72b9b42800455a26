//! The lifecycle against the kubelet emulator, over real Unix sockets in a
//! temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Null, config, list, res};
use prost::Message as _;

use devplugin_api::*;
use kubelet_emulator::{KubeletEmulator, KubeletVersion, View};

const LIMIT: Duration = Duration::from_secs(10);
const RES: &str = "example.com/null";

fn count(v: &View, resource: &str) -> Option<usize> {
    v.devices(resource).map(|d| d.devices().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_and_streams_every_update() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(2))
        .unwrap();
    let view = kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(2))
        .await
        .unwrap();
    let r = &view.resources[RES];
    assert!(r.options.get_preferred_allocation_available);
    assert!(
        r.endpoint.starts_with("example.com-null-") && r.endpoint.ends_with(".sock"),
        "{}",
        r.endpoint
    );
    let mut status = handle.watch_status();
    tokio::time::timeout(LIMIT, status.wait_for(RegistrationStatus::is_registered))
        .await
        .unwrap()
        .unwrap();

    for n in [3, 0, 5] {
        handle.publish(list(n));
        kubelet
            .wait_until(LIMIT, |v| count(v, RES) == Some(n))
            .await
            .unwrap();
    }
    // An empty list keeps the resource registered with capacity 0.
    handle.publish(DeviceList::empty());
    let v = kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(0))
        .await
        .unwrap();
    assert!(v.is_connected(RES));

    // Health flows both ways.
    let mut devices = list(2).devices().to_vec();
    devices[1].health = Health::Unhealthy;
    handle.publish(DeviceList::new(devices.clone()).unwrap());
    kubelet
        .wait_until(LIMIT, |v| {
            v.devices(RES).is_some_and(|d| {
                d.devices()
                    .get(1)
                    .is_some_and(|x| x.health == Health::Unhealthy)
            })
        })
        .await
        .unwrap();
    devices[1].health = Health::Healthy;
    handle.publish(DeviceList::new(devices).unwrap());
    kubelet
        .wait_until(LIMIT, |v| {
            v.devices(RES).is_some_and(|d| {
                d.devices()
                    .get(1)
                    .is_some_and(|x| x.health == Health::Healthy)
            })
        })
        .await
        .unwrap();
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_come_and_go_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    let a = fw
        .serve(res("example.com/a"), Arc::new(Null::default()), list(1))
        .unwrap();
    let b = fw
        .serve(res("example.com/b"), Arc::new(Null::default()), list(2))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| {
            count(v, "example.com/a") == Some(1) && count(v, "example.com/b") == Some(2)
        })
        .await
        .unwrap();
    let again = fw.serve(res("example.com/a"), Arc::new(Null::default()), list(1));
    assert!(matches!(again, Err(ServeError::AlreadyServed(_))));
    let b_socket = dir
        .path()
        .join(&kubelet.view().resources["example.com/b"].endpoint);
    assert!(b_socket.exists());
    b.stop().await;
    assert!(!b_socket.exists(), "a stopped resource removes its socket");
    kubelet
        .wait_until(LIMIT, |v| !v.is_connected("example.com/b"))
        .await
        .unwrap();
    assert!(kubelet.view().is_connected("example.com/a"));
    // Served again after stopping.
    let b = fw
        .serve(res("example.com/b"), Arc::new(Null::default()), list(4))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, "example.com/b") == Some(4))
        .await
        .unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kubelet_restarts_in_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    std::fs::write(dir.path().join(kubelet_emulator::CHECKPOINT), "{}").unwrap();
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(3))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(3))
        .await
        .unwrap();
    for i in 1..=50u32 {
        kubelet.restart().await.unwrap();
        let v = kubelet
            .wait_until(LIMIT, |v| {
                v.registrations(RES) == i + 1 && count(v, RES) == Some(3) && v.is_connected(RES)
            })
            .await
            .unwrap_or_else(|e| panic!("restart {i}: {e}"));
        assert_eq!(v.devices(RES).unwrap(), &list(3));
    }
    // Exactly one stream per registration is alive: none leaked.
    assert_eq!(handle.metrics().streams(), 1);
    assert_eq!(handle.metrics().kubelet_restarts(), 50);
    assert!(dir.path().join(kubelet_emulator::CHECKPOINT).exists());
    // Only the current socket of ours exists.
    let ours: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with("example.com-null"))
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_absent_at_start_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = KubeletEmulator::absent(dir.path());
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let mut status = handle.watch_status();
    tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| *s == RegistrationStatus::WaitingForKubelet),
    )
    .await
    .unwrap()
    .unwrap();
    kubelet.resume().await.unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    // And a kubelet that goes away and comes back.
    kubelet.stop().await;
    kubelet.resume().await.unwrap();
    kubelet
        .wait_until(LIMIT, |v| v.registrations(RES) == 2 && v.is_connected(RES))
        .await
        .unwrap();
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sockets_of_ours_are_removed_and_foreign_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    // A dead socket with our prefix (e.g. the Go plugin's), a live one, and
    // a foreign dead one.
    let dead = dir.path().join("example.com-null.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let live_path = dir.path().join("example.com-null-other.sock");
    let _live = std::os::unix::net::UnixListener::bind(&live_path).unwrap();
    let foreign = dir.path().join("qat.intel.com-generic.sock");
    drop(std::os::unix::net::UnixListener::bind(&foreign).unwrap());
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    assert!(!dead.exists(), "our dead socket is removed");
    assert!(live_path.exists(), "a live instance's socket is kept");
    assert!(foreign.exists(), "another plugin's socket is kept");
    handle.stop().await;
}

/// A killed instance's socket of a resource this instance does not serve
/// (yet) is removed when asked, with the same care as at serve time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sockets_of_resources_not_served_are_removed_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("example.com-other-4242-abcdef-3.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let live_path = dir.path().join("example.com-other-17-fedcba-1.sock");
    let _live = std::os::unix::net::UnixListener::bind(&live_path).unwrap();
    let unasked = dir.path().join("example.com-third-1-a-1.sock");
    drop(std::os::unix::net::UnixListener::bind(&unasked).unwrap());
    let fw = Framework::new(config(dir.path()));
    fw.remove_stale_sockets(&[res("example.com/other")]).await;
    assert!(
        !dead.exists(),
        "the dead socket of a named resource is removed"
    );
    assert!(live_path.exists(), "a live instance's socket is kept");
    assert!(unasked.exists(), "a resource not named is not touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_checks_ids_and_runs_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = Arc::new(KubeletEmulator::start(dir.path()).await.unwrap());
    let fw = Framework::new(config(dir.path()));
    let plugin = Arc::new(Null::default());
    let mut devices = list(4).devices().to_vec();
    devices[3].health = Health::Unhealthy;
    let handle = fw
        .serve(
            res(RES),
            Arc::clone(&plugin),
            DeviceList::new(devices).unwrap(),
        )
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(4))
        .await
        .unwrap();

    let ok = kubelet.allocate(RES, &["null-0", "null-2"]).await.unwrap();
    assert_eq!(ok.envs["NULL_DEVICES"], "null-0,null-2");
    let err = kubelet
        .allocate(RES, &["null-0", "nope", "null-3"])
        .await
        .unwrap_err();
    let kubelet_emulator::EmulatorError::Rpc(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "example.com/null: unknown device IDs nope; unhealthy device IDs null-3"
    );

    let mut calls = Vec::new();
    for i in 0..16 {
        let k = Arc::clone(&kubelet);
        calls.push(tokio::spawn(async move {
            k.allocate(RES, &[&format!("null-{}", i % 3)]).await
        }));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(plugin.calls.load(Ordering::SeqCst), 17);
    assert_eq!(handle.metrics().allocation_failures(), 1);
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(4))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(4))
        .await
        .unwrap();
    let avail = ["null-0", "null-1", "null-2", "null-3"];
    assert_eq!(
        kubelet
            .preferred(RES, &avail, &["null-3"], 2)
            .await
            .unwrap(),
        ["null-3", "null-0"]
    );
    for (must, size, want) in [
        (
            &["null-3"][..],
            5,
            "asked for 5 devices but only 4 are available",
        ),
        (
            &["null-9"][..],
            2,
            "must-include device IDs null-9 are not available",
        ),
        (
            &["null-1", "null-2"][..],
            1,
            "2 devices must be included but only 1 are asked for",
        ),
        (&[][..], -1, "allocation size -1 is negative"),
    ] {
        let err = kubelet
            .preferred(RES, &avail, must, size)
            .await
            .unwrap_err();
        let kubelet_emulator::EmulatorError::Rpc(status) = err else {
            panic!("{err}")
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().ends_with(want), "{}", status.message());
    }
    // An ID the plugin could never have advertised is refused before the
    // plugin sees it: the trait only ever carries valid DeviceIds.
    let err = kubelet
        .preferred(RES, &["null-0", "bad id"], &[], 1)
        .await
        .unwrap_err();
    let kubelet_emulator::EmulatorError::Rpc(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("bad id"), "{}", status.message());
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_refused_and_oversized_lists_clamped() {
    assert!(ResourceName::new("null").is_err());
    assert!(DeviceId::new(&"x".repeat(64)).is_err());
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    // Over 4 MiB of device IDs: 70 000 IDs of 60 characters.
    let big: Vec<Device> = (0..70_000)
        .map(|i| Device::healthy(DeviceId::new(&format!("{i:060}")).unwrap()))
        .collect();
    let big = DeviceList::new(big).unwrap();
    assert!(big.to_pb().encoded_len() > MAX_MESSAGE_BYTES);
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    handle.publish(big.clone());
    // The kubelet gets what fits, in the order given, on a live stream.
    let view = kubelet
        .wait_until(LIMIT, |v| count(v, RES).is_some_and(|n| n > 1))
        .await
        .unwrap();
    let got = view.devices(RES).unwrap().devices();
    let dropped = handle.metrics().clamped_devices();
    assert!(dropped > 0);
    assert_eq!(got.len() + usize::try_from(dropped).unwrap(), 70_000);
    assert_eq!(got, &big.devices()[..got.len()]);
    assert!(kubelet.view().is_connected(RES), "the stream survived");
    assert!(
        fw.metrics()
            .render("t")
            .contains("t_clamped_devices{resource=\"example.com/null\"} ")
    );
    // Back under the limit: nothing left out.
    handle.publish(list(2));
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(2))
        .await
        .unwrap();
    assert_eq!(handle.metrics().clamped_devices(), 0);
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_registration_is_visible_and_retried_after_a_kubelet_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    kubelet.refuse_registrations(Some("the ResourceName \"example.com/null\" is invalid"));
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let mut status = handle.watch_status();
    let s = tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| matches!(s, RegistrationStatus::Rejected { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(
        s,
        RegistrationStatus::Rejected {
            reason: "the ResourceName \"example.com/null\" is invalid".into()
        }
    );
    // A refusal is not retried in a loop: only a new kubelet is asked again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handle.metrics().registration_failures(), 1);
    kubelet.refuse_registrations(None);
    kubelet.restart().await.unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, status.wait_for(RegistrationStatus::is_registered))
        .await
        .unwrap()
        .unwrap();
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_over_the_limit_is_refused_clearly() {
    let base = tempfile::tempdir().unwrap();
    let long = base.path().join("d".repeat(100));
    std::fs::create_dir(&long).unwrap();
    let fw = Framework::new(config(&long));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let mut status = handle.watch_status();
    let s = tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| matches!(s, RegistrationStatus::Rejected { .. })),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let RegistrationStatus::Rejected { reason } = s else {
        unreachable!()
    };
    assert!(reason.contains("longer than 107 bytes"), "{reason}");
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_removes_the_socket_and_ends_streams() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let v = kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    let socket = dir.path().join(&v.resources[RES].endpoint);
    let metrics = Arc::clone(handle.metrics());
    tokio::time::timeout(Duration::from_secs(2), handle.stop())
        .await
        .unwrap();
    assert!(!socket.exists());
    kubelet
        .wait_until(LIMIT, |v| !v.is_connected(RES))
        .await
        .unwrap();
    assert_eq!(metrics.streams(), 0);
}

async fn registered(handle: &ResourceHandle) {
    let mut status = handle.watch_status();
    tokio::time::timeout(LIMIT, status.wait_for(RegistrationStatus::is_registered))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_every_kubelet_version() {
    for version in KubeletVersion::ALL {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = KubeletEmulator::start_as(dir.path(), version)
            .await
            .unwrap();
        let fw = Framework::new(config(dir.path()));
        let handle = fw
            .serve(res(RES), Arc::new(Null::default()), list(2))
            .unwrap();
        kubelet
            .wait_until(LIMIT, |v| count(v, RES) == Some(2))
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        registered(&handle).await;
        let a = kubelet.allocate(RES, &["null-1"]).await.unwrap();
        assert_eq!(a.envs["NULL_DEVICES"], "null-1", "{version:?}");
        handle.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_while_the_kubelet_stays_up_is_followed_by_a_new_registration() {
    for version in KubeletVersion::ALL {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = KubeletEmulator::start_as(dir.path(), version)
            .await
            .unwrap();
        let fw = Framework::new(config(dir.path()));
        let handle = fw
            .serve(res(RES), Arc::new(Null::default()), list(2))
            .unwrap();
        kubelet
            .wait_until(LIMIT, |v| count(v, RES) == Some(2))
            .await
            .unwrap();
        registered(&handle).await;
        let mut status = handle.watch_status();
        for round in 2..=4u32 {
            let ended = std::time::Instant::now();
            assert!(kubelet.end_stream(RES));
            // The kubelet marks the devices unhealthy at once...
            let c = kubelet.capacity(RES).unwrap();
            assert_eq!((c.capacity, c.allocatable), (2, 0), "{version:?}");
            // ...the plugin is not ready while it has no stream...
            tokio::time::timeout(LIMIT, status.wait_for(|s| !s.is_registered()))
                .await
                .unwrap()
                .unwrap();
            // ...and registers again, well within a second.
            let v = kubelet
                .wait_until(LIMIT, |v| {
                    v.registrations(RES) == round && v.is_connected(RES) && count(v, RES) == Some(2)
                })
                .await
                .unwrap();
            let at = v.resources[RES].registered_at.unwrap();
            let took = at.saturating_duration_since(ended);
            assert!(
                took < Duration::from_secs(1),
                "{took:?} after the stream ended"
            );
            registered(&handle).await;
            let c = kubelet.capacity(RES).unwrap();
            assert_eq!((c.capacity, c.allocatable), (2, 2), "{version:?}");
        }
        assert_eq!(handle.metrics().stream_losses(), 3);
        handle.stop().await;
    }
}

/// Kubelets 1.25–1.34 disconnect the *current* client of a resource when an
/// older client's stream ends (kubernetes issue 121994): in a rolling
/// update the old instance's exit knocks out the new one. The new one
/// registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_old_stream_that_disconnects_the_new_instance_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let old_fw = Framework::new(config(dir.path()));
    let old = old_fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    let new_fw = Framework::new(config(dir.path()));
    let new = new_fw
        .serve(res(RES), Arc::new(Null::default()), list(3))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| {
            v.registrations(RES) == 2 && count(v, RES) == Some(3)
        })
        .await
        .unwrap();
    let new_endpoint = kubelet.view().resources[RES].endpoint.clone();
    registered(&new).await;
    old.stop().await;
    let v = kubelet
        .wait_until(LIMIT, |v| {
            v.registrations(RES) == 3 && v.is_connected(RES) && count(v, RES) == Some(3)
        })
        .await
        .unwrap();
    assert_eq!(v.resources[RES].endpoint, new_endpoint);
    assert_eq!(new.metrics().stream_losses(), 1);
    new.stop().await;
}

/// A kubelet that accepts `Register` but never opens a stream (its
/// dial-back lost) is asked again after the stream timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_without_a_stream_is_repeated() {
    use devplugin_api::pb::registration_server::{Registration, RegistrationServer};
    struct Silent(Arc<AtomicUsize>);
    #[tonic::async_trait]
    impl Registration for Silent {
        async fn register(
            &self,
            _: tonic::Request<pb::RegisterRequest>,
        ) -> Result<tonic::Response<pb::Empty>, tonic::Status> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(tonic::Response::new(pb::Empty {}))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::UnixListener::bind(dir.path().join(KUBELET_SOCKET)).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Silent(Arc::clone(&calls))))
            .serve_with_incoming(uds::incoming(listener)),
    );
    let fw = Framework::new(config(dir.path()).stream_timeout(Duration::from_millis(200)));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let mut status = handle.watch_status();
    tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| matches!(s, RegistrationStatus::AwaitingStream { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!handle.status().is_registered(), "no stream, not ready");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while calls.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Register was not repeated"
        );
        status.changed().await.unwrap();
    }
    handle.stop().await;
}

/// A kubelet whose stream opens and ends before the plugin looks (here:
/// before `Register` even answers) has dropped the stream: the plugin
/// registers again at once, not after the stream timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_before_it_is_seen_is_noticed() {
    use devplugin_api::pb::device_plugin_client::DevicePluginClient;
    use devplugin_api::pb::registration_server::{Registration, RegistrationServer};
    struct Fleeting {
        dir: std::path::PathBuf,
        calls: Arc<AtomicUsize>,
    }
    #[tonic::async_trait]
    impl Registration for Fleeting {
        async fn register(
            &self,
            request: tonic::Request<pb::RegisterRequest>,
        ) -> Result<tonic::Response<pb::Empty>, tonic::Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let endpoint = self.dir.join(request.into_inner().endpoint);
            let channel = uds::connect(&endpoint, Duration::from_secs(5))
                .await
                .map_err(|e| tonic::Status::unknown(e.to_string()))?;
            let mut client = DevicePluginClient::new(channel);
            let mut stream = client.list_and_watch(pb::Empty {}).await?.into_inner();
            let _first = stream.message().await?;
            // Stream and connection dropped before the answer.
            drop(stream);
            drop(client);
            Ok(tonic::Response::new(pb::Empty {}))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::UnixListener::bind(dir.path().join(KUBELET_SOCKET)).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Fleeting {
                dir: dir.path().to_owned(),
                calls: Arc::clone(&calls),
            }))
            .serve_with_incoming(uds::incoming(listener)),
    );
    // A stream timeout far beyond the test's limit: only noticing the lost
    // stream can repeat the registration in time.
    let fw = Framework::new(config(dir.path()).stream_timeout(Duration::from_secs(600)));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while calls.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a stream lost before it was seen was not noticed ({} registrations)",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(handle.metrics().stream_losses() >= 2);
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_backoff_is_not_cut_short_by_other_plugins_sockets() {
    let dir = tempfile::tempdir().unwrap();
    // A kubelet.sock that refuses connections: every attempt fails.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join(KUBELET_SOCKET)).unwrap());
    let fw = Framework::new(config(dir.path()).backoff(Backoff {
        initial: Duration::from_secs(2),
        max: Duration::from_secs(2),
    }));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let mut status = handle.watch_status();
    tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| matches!(s, RegistrationStatus::Retrying { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    // Another plugin's socket comes and goes, many times.
    for i in 0..50 {
        let p = dir.path().join(format!("qat.intel.com-{i}.sock"));
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        std::fs::remove_file(&p).unwrap();
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        handle.metrics().registration_failures(),
        1,
        "the backoff was cut short"
    );
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_handle_frees_its_name_only_after_its_socket_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()));
    let first = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(1))
        .await
        .unwrap();
    let first_socket = dir.path().join(&kubelet.view().resources[RES].endpoint);
    let mut status = first.watch_status();
    drop(first);
    tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| *s == RegistrationStatus::Stopped),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        !first_socket.exists(),
        "the socket went before the name was freed"
    );
    let second = fw
        .serve(res(RES), Arc::new(Null::default()), list(2))
        .unwrap();
    let v = kubelet
        .wait_until(LIMIT, |v| {
            v.registrations(RES) == 2 && count(v, RES) == Some(2)
        })
        .await
        .unwrap();
    assert_ne!(
        dir.path().join(&v.resources[RES].endpoint),
        first_socket,
        "socket names never repeat"
    );
    second.stop().await;
}

/// Streams lost right after they open count as failed attempts and back
/// off; a new kubelet is a fresh start: its first lost stream is attempt
/// 0 again, not the previous kubelet's count (which had grown to
/// multi-second delays in soak runs that end streams and restart the
/// kubelet at short intervals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kubelet_starts_the_retry_count_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()).backoff(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(10),
    }));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    let mut status = handle.watch_status();
    let attempt_after_a_lost_stream = |status: &mut tokio::sync::watch::Receiver<_>| {
        let status = status.clone();
        async move {
            let mut status = status;
            let s = tokio::time::timeout(
                LIMIT,
                status.wait_for(|s| matches!(s, RegistrationStatus::Retrying { .. })),
            )
            .await
            .unwrap()
            .unwrap()
            .clone();
            match s {
                RegistrationStatus::Retrying { attempt, .. } => attempt,
                _ => unreachable!(),
            }
        }
    };
    let mut last = 0;
    // A stream is ended only once it is open (the registration's first
    // list arrived): ended before it opened, the kubelet would simply
    // never have opened one, which the plugin waits out for its stream
    // timeout (10 s) — a test that raced there stalled or timed out.
    for round in 1..=4u32 {
        kubelet
            .wait_until(LIMIT, |v| {
                v.registrations(RES) == round && v.is_connected(RES) && v.devices(RES).is_some()
            })
            .await
            .unwrap();
        tokio::time::timeout(LIMIT, status.wait_for(RegistrationStatus::is_registered))
            .await
            .unwrap()
            .unwrap();
        // Lost at once: unstable.
        assert!(kubelet.end_stream(RES));
        last = attempt_after_a_lost_stream(&mut status).await;
    }
    assert!(last >= 3, "unstable losses back off: attempt {last}");
    kubelet
        .wait_until(LIMIT, |v| v.registrations(RES) == 5 && v.is_connected(RES))
        .await
        .unwrap();
    kubelet.restart().await.unwrap();
    kubelet
        .wait_until(LIMIT, |v| {
            v.registrations(RES) == 6 && v.is_connected(RES) && v.devices(RES).is_some()
        })
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, status.wait_for(RegistrationStatus::is_registered))
        .await
        .unwrap()
        .unwrap();
    assert!(kubelet.end_stream(RES));
    let fresh = attempt_after_a_lost_stream(&mut status).await;
    assert_eq!(fresh, 1, "the new kubelet's first lost stream");
    handle.stop().await;
}

/// A new kubelet binds its socket before it listens: a dial in between is
/// refused. While a new kubelet is starting, refusals are retried every
/// 20 ms and not counted, instead of waiting out the backoff (2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_kubelet_that_refuses_is_retried_soon() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = KubeletEmulator::start(dir.path()).await.unwrap();
    let fw = Framework::new(config(dir.path()).backoff(Backoff {
        initial: Duration::from_secs(2),
        max: Duration::from_secs(2),
    }));
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    registered(&handle).await;
    kubelet.stop().await;
    // A new kubelet cleans the directory (`CleanupPluginDirectory`), then
    // its socket exists but does not listen yet.
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".sock") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    drop(std::os::unix::net::UnixListener::bind(dir.path().join(KUBELET_SOCKET)).unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failures = handle.metrics().registration_failures();
    assert!(
        failures >= 3,
        "{failures} refused dials in 300 ms: the 2 s backoff was waited out"
    );
    assert!(
        matches!(
            handle.status(),
            RegistrationStatus::Retrying { attempt: 0, .. }
        ),
        "{:?}: a starting kubelet's refusals are not counted",
        handle.status()
    );
    // It listens: registered.
    kubelet.resume().await.unwrap();
    registered(&handle).await;
    handle.stop().await;
}
