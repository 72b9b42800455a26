//! The lifecycle against the kubelet emulator, over real Unix sockets in a
//! temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Null, config, list, res};

use devplugin_api::*;
use kubelet_emulator::{KubeletEmulator, View};

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
        handle.publish(list(n)).unwrap();
        kubelet
            .wait_until(LIMIT, |v| count(v, RES) == Some(n))
            .await
            .unwrap();
    }
    // An empty list keeps the resource registered with capacity 0.
    handle.publish(DeviceList::empty()).unwrap();
    let v = kubelet
        .wait_until(LIMIT, |v| count(v, RES) == Some(0))
        .await
        .unwrap();
    assert!(v.is_connected(RES));

    // Health flows both ways.
    let mut devices = list(2).devices().to_vec();
    devices[1].health = Health::Unhealthy;
    handle
        .publish(DeviceList::new(devices.clone()).unwrap())
        .unwrap();
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
    handle.publish(DeviceList::new(devices).unwrap()).unwrap();
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
    assert_eq!(
        handle.metrics().kubelet_restarts.load(Ordering::Relaxed),
        50
    );
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
    assert_eq!(
        handle.metrics().allocation_failures.load(Ordering::Relaxed),
        1
    );
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
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_and_oversized_lists_are_refused() {
    assert!(ResourceName::new("null").is_err());
    assert!(DeviceId::new(&"x".repeat(64)).is_err());
    let dir = tempfile::tempdir().unwrap();
    let fw = Framework::new(config(dir.path()));
    // 4 MiB of device IDs: about 70 000 IDs of 60 characters.
    let big: Vec<Device> = (0..70_000)
        .map(|i| Device::healthy(DeviceId::new(&format!("{i:060}")).unwrap()))
        .collect();
    let big = DeviceList::new(big).unwrap();
    let err = fw
        .serve(res(RES), Arc::new(Null::default()), big.clone())
        .unwrap_err();
    assert!(
        matches!(err, ServeError::TooLarge { bytes, .. } if bytes > MAX_MESSAGE_BYTES),
        "{err}"
    );
    let handle = fw
        .serve(res(RES), Arc::new(Null::default()), list(1))
        .unwrap();
    assert!(matches!(
        handle.publish(big),
        Err(ServeError::TooLarge { .. })
    ));
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
    assert_eq!(
        handle
            .metrics()
            .registration_failures
            .load(Ordering::Relaxed),
        1
    );
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
