//! Registration against the emulated plugin watcher, over real Unix sockets
//! in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use dra_api::*;
use kubelet_emulator::{KubeletVersion, LEGACY_SERVICE, PluginWatcher, WatcherView};

const DRIVER: &str = "gpu.example.com";
/// The watcher reconciles once a second; a few rounds at most.
const LIMIT: Duration = Duration::from_secs(10);

fn config(dir: &std::path::Path) -> RegistrarConfig {
    RegistrarConfig::new(
        DriverName::new(DRIVER).unwrap(),
        dir.join("plugins_registry"),
        dir.join("plugins").join(DRIVER).join("dra.sock"),
    )
}

async fn registered(registrar: &Registrar) -> RegistrationStatus {
    let mut rx = registrar.watch_status();
    tokio::time::timeout(
        LIMIT,
        rx.wait_for(|s| {
            matches!(
                s,
                RegistrationStatus::Registered | RegistrationStatus::Rejected { .. }
            )
        }),
    )
    .await
    .expect("a verdict in time")
    .unwrap()
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kubelet_version_gets_the_service_it_takes() {
    for (version, services, want) in [
        (KubeletVersion::V1_34, &DraService::ALL[..], "v1.DRAPlugin"),
        (
            KubeletVersion::V1_32,
            &DraService::ALL[..],
            "v1beta1.DRAPlugin",
        ),
        (
            KubeletVersion::V1_34,
            &[DraService::V1beta1][..],
            "v1beta1.DRAPlugin",
        ),
        // Without v1beta1 a 1.32 kubelet falls back to the removed API.
        (KubeletVersion::V1_32, &[DraService::V1][..], LEGACY_SERVICE),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let watcher = PluginWatcher::start(&dir.path().join("plugins_registry"), version).unwrap();
        let registrar = Registrar::start(config(dir.path()).services(services)).unwrap();
        assert_eq!(registered(&registrar).await, RegistrationStatus::Registered);
        let v = watcher
            .wait_until(LIMIT, |v| v.plugins.contains_key(DRIVER))
            .await
            .unwrap();
        let p = &v.plugins[DRIVER];
        assert_eq!(p.service, want, "{version:?} {services:?}");
        assert_eq!(p.socket, "gpu.example.com-reg.sock");
        assert_eq!(
            p.endpoint,
            dir.path()
                .join("plugins/gpu.example.com/dra.sock")
                .to_string_lossy()
        );
        registrar.stop().await;
        watcher
            .wait_until(LIMIT, |v| v.plugins.is_empty())
            .await
            .expect("a removed socket unregisters the plugin");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_without_the_dra_handler_refuses_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let _watcher =
        PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_25).unwrap();
    let registrar = Registrar::start(config(dir.path())).unwrap();
    match registered(&registrar).await {
        RegistrationStatus::Rejected { reason } => {
            assert!(
                reason.contains("no handler registered for plugin type: DRAPlugin"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    registrar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_socket_is_served_again_and_a_kubelet_restart_registers_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut watcher =
        PluginWatcher::start(&dir.path().join("plugins_registry"), KubeletVersion::V1_34).unwrap();
    let registrar = Registrar::start(config(dir.path())).unwrap();
    let once = |n: usize| {
        move |v: &WatcherView| v.registrations_of(DRIVER) == n && v.plugins.contains_key(DRIVER)
    };
    watcher.wait_until(LIMIT, once(1)).await.unwrap();
    // Deleted (a careless cleanup, a node agent): served again, registered
    // again, even when the new socket reuses the inode number.
    std::fs::remove_file(registrar.socket()).unwrap();
    watcher.wait_until(LIMIT, once(2)).await.unwrap();
    // The kubelet restarts: it deletes nothing and registers what it finds.
    watcher.restart().await.unwrap();
    watcher.wait_until(LIMIT, once(3)).await.unwrap();
    assert!(registrar.socket().exists());
    assert_eq!(registrar.status(), RegistrationStatus::Registered);
    registrar.stop().await;
    assert!(
        !dir.path()
            .join("plugins_registry/gpu.example.com-reg.sock")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_sockets_of_a_killed_instance_go_live_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("plugins_registry");
    std::fs::create_dir_all(&reg).unwrap();
    let dead = reg.join("gpu.example.com-old-reg.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let live = reg.join("gpu.example.com-other-reg.sock");
    let _live = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let foreign = reg.join("csi.example.com-reg.sock");
    drop(std::os::unix::net::UnixListener::bind(&foreign).unwrap());
    let registrar = Registrar::start(config(dir.path()).instance("new")).unwrap();
    let mut rx = registrar.watch_status();
    tokio::time::timeout(
        LIMIT,
        rx.wait_for(|s| *s == RegistrationStatus::WaitingForKubelet),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!dead.exists(), "a dead socket of ours is removed");
    assert!(live.exists(), "another live instance's socket stays");
    assert!(foreign.exists(), "another driver's socket stays");
    assert!(reg.join("gpu.example.com-new-reg.sock").exists());
    registrar.stop().await;
}

#[tokio::test]
async fn configurations_that_cannot_work_are_refused() {
    let d = DriverName::new(DRIVER).unwrap();
    let e = Registrar::start(RegistrarConfig::new(d.clone(), "/r", "dra.sock")).unwrap_err();
    assert!(e.to_string().contains("not an absolute path"), "{e}");
    let e = Registrar::start(RegistrarConfig::new(d.clone(), "/r", "/x/dra.sock").services(&[]))
        .unwrap_err();
    assert!(e.to_string().contains("no DRA service"), "{e}");
    let long = format!("/{}", "d".repeat(120));
    let e = Registrar::start(RegistrarConfig::new(d, long, "/x/dra.sock")).unwrap_err();
    assert!(e.to_string().contains("longer than 107 bytes"), "{e}");
}
