//! The file watcher against a real directory: create, atomic replace, edit,
//! delete, bad then good content, a directory that appears later, and
//! periodic re-reads.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;
use std::time::Duration;

use enabled_plugins::{FileWatcher, Update, WatchConfig};

const LIMIT: Duration = Duration::from_secs(10);

async fn next(w: &mut FileWatcher) -> Update {
    tokio::time::timeout(LIMIT, w.next())
        .await
        .expect("the watcher reported nothing within the limit")
}

fn gpu_label(update: &Update) -> Option<String> {
    match update {
        Update::Loaded(set) => set.gpu_plugin().map(ToString::to_string),
        other => panic!("expected Loaded, got {other:?}"),
    }
}

fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A resync so long that only file events can explain an update.
fn events_only(path: &Path) -> WatchConfig {
    WatchConfig::new(path).resync(Duration::from_secs(3600))
}

#[tokio::test]
async fn create_edit_replace_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enabled_kube_plugins");
    let mut w = FileWatcher::new(events_only(&path));
    assert!(w.is_event_driven());
    assert!(matches!(next(&mut w).await, Update::Missing));

    std::fs::write(&path, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#).unwrap();
    assert_eq!(
        gpu_label(&next(&mut w).await).as_deref(),
        Some("intelgpu=enabled")
    );

    // An in-place edit.
    std::fs::write(&path, r#"{"intel-qat-plugin": "intelqat=enabled"}"#).unwrap();
    assert_eq!(gpu_label(&next(&mut w).await), None);

    // An atomic replace.
    write_atomically(&path, r#"["intelgpu"]"#);
    assert_eq!(
        gpu_label(&next(&mut w).await).as_deref(),
        Some("intelgpu=enabled")
    );

    // Rewriting the same set in another form is no change: the next
    // update is the deletion.
    write_atomically(&path, "intelgpu\n");
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(next(&mut w).await, Update::Missing));
}

#[tokio::test]
async fn bad_content_keeps_the_last_good_set_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enabled_kube_plugins");
    std::fs::write(&path, r#"["intelgpu"]"#).unwrap();
    let mut w = FileWatcher::new(events_only(&path));
    assert_eq!(
        gpu_label(&next(&mut w).await).as_deref(),
        Some("intelgpu=enabled")
    );

    write_atomically(&path, r#"{"intel-gpu-plugin": "intelgpu=enabled""#);
    match next(&mut w).await {
        Update::Invalid { error, last_good } => {
            assert!(
                error.to_string().contains("invalid JSON at line 1"),
                "{error}"
            );
            assert_eq!(
                last_good.unwrap().gpu_plugin().unwrap().to_string(),
                "intelgpu=enabled"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(w.last_good().is_some());

    write_atomically(&path, r#"{"intel-gpu-plugin": "accel=gpu"}"#);
    assert_eq!(gpu_label(&next(&mut w).await).as_deref(), Some("accel=gpu"));
}

#[tokio::test]
async fn a_directory_that_appears_later_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join("opt/platform/config/24.09/enabled_kube_plugins");
    let mut w = FileWatcher::new(events_only(&path));
    assert!(matches!(next(&mut w).await, Update::Missing));

    // Directories appear one at a time, then the file.
    std::fs::create_dir(dir.path().join("opt")).unwrap();
    std::fs::create_dir_all(dir.path().join("opt/platform/config")).unwrap();
    std::fs::create_dir(dir.path().join("opt/platform/config/24.09")).unwrap();
    write_atomically(&path, r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
    assert_eq!(
        gpu_label(&next(&mut w).await).as_deref(),
        Some("intelgpu=enabled")
    );

    // The whole directory goes away again.
    std::fs::remove_dir_all(dir.path().join("opt/platform")).unwrap();
    assert!(matches!(next(&mut w).await, Update::Missing));
}

#[tokio::test]
async fn periodic_rereads_see_changes_without_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enabled_kube_plugins");
    let config = WatchConfig::new(&path)
        .resync(Duration::from_millis(20))
        .poll_only();
    let mut w = FileWatcher::new(config);
    assert!(!w.is_event_driven());
    assert!(matches!(next(&mut w).await, Update::Missing));
    write_atomically(&path, r#"["intelgpu"]"#);
    assert_eq!(
        gpu_label(&next(&mut w).await).as_deref(),
        Some("intelgpu=enabled")
    );
}

#[tokio::test]
async fn an_unreadable_path_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file belongs cannot be read as a file.
    let path = dir.path().join("enabled_kube_plugins");
    std::fs::create_dir(&path).unwrap();
    let mut w = FileWatcher::new(events_only(&path));
    match next(&mut w).await {
        Update::Unreadable(e) => assert!(e.is_unavailable(), "{e}"),
        other => panic!("expected Unreadable, got {other:?}"),
    }
    std::fs::remove_dir(&path).unwrap();
    assert!(matches!(next(&mut w).await, Update::Missing));
}
