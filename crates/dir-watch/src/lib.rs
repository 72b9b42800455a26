//! Async inotify directory watches for tokio.
//!
//! [`DirWatch`] owns one inotify descriptor; [`DirWatch::add`] watches a
//! directory for the events in a [`Mask`]; [`DirWatch::next`] waits for the
//! next batch of events. Events are hints (the queue can overflow): the
//! watchers built on it always re-read the truth after an event.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use dir_watch::{DirWatch, Mask};
//!
//! let mut watch = DirWatch::new()?;
//! watch.add("/var/lib/kubelet/device-plugins".as_ref(), Mask::IN_CREATE | Mask::IN_DELETE)?;
//! for event in watch.next().await? {
//!     println!("{:?} {:?}", event.name, event.mask);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

pub use nix::sys::inotify::AddWatchFlags as Mask;
use nix::sys::inotify::{InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The watched directory, when the event belongs to a live watch.
    pub dir: Option<PathBuf>,
    /// The entry inside the directory, for events about entries.
    pub name: Option<OsString>,
    /// What happened.
    pub mask: Mask,
}

impl Event {
    /// Whether the queue overflowed and events were lost: re-read
    /// everything.
    #[must_use]
    pub fn is_overflow(&self) -> bool {
        self.mask.contains(Mask::IN_Q_OVERFLOW)
    }
}

/// An identifier of a watch, for [`DirWatch::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WatchId(WatchDescriptor);

#[derive(Debug)]
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches on directories, read asynchronously.
#[derive(Debug)]
pub struct DirWatch {
    fd: AsyncFd<Fd>,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl DirWatch {
    /// Opens an inotify descriptor. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When inotify cannot be initialised (e.g. the per-user instance limit).
    pub fn new() -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the descriptor is owned by the `Inotify` inside `Fd`,
        // which the `AsyncFd` owns for its whole life; `as_raw_fd` always
        // returns that same open descriptor.
        let fd = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(io::Error::from)?;
        Ok(Self {
            fd,
            dirs: HashMap::new(),
        })
    }

    /// Watches `dir` for `mask` (adding to an existing watch of the same
    /// directory replaces its mask).
    ///
    /// # Errors
    /// When the directory cannot be watched (missing, no permission, the
    /// watch limit).
    pub fn add(&mut self, dir: &Path, mask: Mask) -> io::Result<WatchId> {
        let wd = self.fd.get_ref().0.add_watch(dir, mask)?;
        self.dirs.insert(wd, dir.to_owned());
        Ok(WatchId(wd))
    }

    /// Stops a watch. Removing a watch whose directory is gone is not an
    /// error.
    pub fn remove(&mut self, id: WatchId) {
        self.dirs.remove(&id.0);
        let _ = self.fd.get_ref().0.rm_watch(id.0);
    }

    /// The directories watched.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.values().map(PathBuf::as_path)
    }

    /// Waits for the next batch of events (at least one).
    ///
    /// # Errors
    /// When reading the descriptor fails.
    pub async fn next(&mut self) -> io::Result<Vec<Event>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| inner.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) if !events.is_empty() => {
                    let mut dropped = Vec::new();
                    let out = events
                        .into_iter()
                        .map(|e| {
                            // The kernel dropped this watch (its directory
                            // was deleted or unmounted): the descriptor is
                            // dead even if a new directory of the same name
                            // exists by now.
                            if e.mask.contains(Mask::IN_IGNORED) {
                                dropped.push(e.wd);
                            }
                            Event {
                                dir: self.dirs.get(&e.wd).cloned(),
                                name: e.name,
                                mask: e.mask,
                            }
                        })
                        .collect();
                    for wd in dropped {
                        self.dirs.remove(&wd);
                    }
                    return Ok(out);
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Drains what is queued without waiting.
    pub fn drain(&mut self) {
        let _ = self.fd.get_ref().0.read_events();
    }

    /// Whether the watch is still live (the kernel has not dropped it).
    #[must_use]
    pub fn is_live(&self, id: WatchId) -> bool {
        self.dirs.contains_key(&id.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sees_create_and_delete_with_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new().unwrap();
        w.add(dir.path(), Mask::IN_CREATE | Mask::IN_DELETE)
            .unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(events[0].name.as_deref(), Some(std::ffi::OsStr::new("a")));
        assert!(events[0].mask.contains(Mask::IN_CREATE));
        assert_eq!(events[0].dir.as_deref(), Some(dir.path()));
        std::fs::remove_file(dir.path().join("a")).unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        assert!(events.iter().any(|e| e.mask.contains(Mask::IN_DELETE)));
    }

    #[tokio::test]
    async fn a_deleted_and_recreated_directory_needs_a_new_watch() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dri");
        std::fs::create_dir(&dir).unwrap();
        let mut w = DirWatch::new().unwrap();
        let id = w.add(&dir, Mask::IN_CREATE | Mask::IN_DELETE_SELF).unwrap();
        // Gone and back before anyone looked: the old watch is dead.
        std::fs::remove_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        assert!(events.iter().any(|e| e.mask.contains(Mask::IN_DELETE_SELF)));
        // IN_IGNORED may come in the same batch or the next.
        if w.is_live(id) {
            let more = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap()
                .unwrap();
            assert!(more.iter().any(|e| e.mask.contains(Mask::IN_IGNORED)));
        }
        assert!(
            !w.is_live(id),
            "a dropped watch is not live although the path is a directory"
        );
        assert!(dir.is_dir());
        let again = w.add(&dir, Mask::IN_CREATE).unwrap();
        assert!(w.is_live(again));
        std::fs::write(dir.join("card0"), "").unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("card0")))
        );
    }

    #[tokio::test]
    async fn a_missing_directory_cannot_be_watched() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new().unwrap();
        assert!(w.add(&dir.path().join("nope"), Mask::IN_CREATE).is_err());
        assert_eq!(w.dirs().count(), 0);
    }
}
