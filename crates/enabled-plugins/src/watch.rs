//! Following the file: created, replaced (atomic rename), edited, removed,
//! or its directory appearing later.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dir_watch::{DirWatch, Mask, WatchId};
use tokio::time::Instant;

use crate::file::{ReadError, read_capped};
use crate::model::EnabledPlugins;
use crate::parse::{ParseError, parse};

/// What the watcher learned about the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum Update {
    /// The file parsed, and its content differs from the last update.
    Loaded(EnabledPlugins),
    /// The file (or a directory on its path) does not exist: the decision
    /// is unknown.
    Missing,
    /// The file exists but cannot be read: the decision is unknown.
    Unreadable(ReadError),
    /// The file's content is invalid. The last good content, if there was
    /// one, stays in force.
    Invalid {
        /// What is wrong with it.
        error: ParseError,
        /// The last content that parsed, still in force.
        last_good: Option<EnabledPlugins>,
    },
}

/// How the watcher behaves.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    path: PathBuf,
    resync: Duration,
    settle: Duration,
    events: bool,
}

impl WatchConfig {
    /// Watches `path`, re-reading it every 30 s even without an event
    /// (a shared `/opt/platform` may change without a local event).
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            resync: Duration::from_secs(30),
            settle: Duration::from_millis(10),
            events: true,
        }
    }

    /// Re-reads periodically only, without file events: for filesystems
    /// whose changes raise no local event (e.g. replicated from another
    /// host).
    #[must_use]
    pub fn poll_only(mut self) -> Self {
        self.events = false;
        self
    }

    /// How often the file is re-read without an event.
    #[must_use]
    pub fn resync(mut self, every: Duration) -> Self {
        self.resync = every.max(Duration::from_millis(1));
        self
    }

    /// How long to wait after an event for the rest of its burst before
    /// reading.
    #[must_use]
    pub fn settle(mut self, wait: Duration) -> Self {
        self.settle = wait;
        self
    }
}

/// Comparable summary of what was last reported.
#[derive(Debug, PartialEq)]
enum Seen {
    Loaded(EnabledPlugins),
    Missing,
    Unreadable(String),
    Invalid(ParseError),
}

/// Follows one enabled-plugins file. Call [`FileWatcher::next`] in a loop:
/// the first call reports the current state at once, later calls return
/// when the state differs from the last one reported.
#[derive(Debug)]
pub struct FileWatcher {
    config: WatchConfig,
    inotify: Option<DirWatch>,
    watched: Option<(PathBuf, WatchId)>,
    last: Option<Seen>,
    last_good: Option<EnabledPlugins>,
    next_resync: Instant,
}

const MASK: Mask = Mask::IN_CLOSE_WRITE
    .union(Mask::IN_MOVED_TO)
    .union(Mask::IN_MOVED_FROM)
    .union(Mask::IN_CREATE)
    .union(Mask::IN_DELETE)
    .union(Mask::IN_ATTRIB)
    .union(Mask::IN_DELETE_SELF)
    .union(Mask::IN_MOVE_SELF);

impl FileWatcher {
    /// Starts watching. Must be called inside a tokio runtime. When inotify
    /// is not available the watcher still works, by periodic re-reads only
    /// (logged once).
    #[must_use]
    pub fn new(config: WatchConfig) -> Self {
        let opened = if config.events {
            DirWatch::new()
        } else {
            Err(io::Error::other("file events are turned off"))
        };
        let inotify = match opened {
            Ok(fd) => Some(fd),
            Err(error) => {
                tracing::warn!(
                    path = %config.path.display(),
                    %error,
                    every = ?config.resync,
                    "inotify is unavailable; re-reading the enabled-plugins file periodically only"
                );
                None
            }
        };
        let next_resync = Instant::now() + config.resync;
        Self {
            config,
            inotify,
            watched: None,
            last: None,
            last_good: None,
            next_resync,
        }
    }

    /// Whether file events are watched (otherwise only periodic re-reads).
    #[must_use]
    pub fn is_event_driven(&self) -> bool {
        self.inotify.is_some()
    }

    /// The last content that parsed.
    #[must_use]
    pub fn last_good(&self) -> Option<&EnabledPlugins> {
        self.last_good.as_ref()
    }

    /// The path watched.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// The next change of state (the current state on the first call).
    pub async fn next(&mut self) -> Update {
        loop {
            if self.last.is_some() {
                self.wait_for_change().await;
            }
            self.rearm();
            if let Some(update) = self.read() {
                return update;
            }
        }
    }

    /// Waits for a relevant event (then lets its burst settle) or for the
    /// periodic re-read.
    async fn wait_for_change(&mut self) {
        let resync = tokio::time::sleep_until(self.next_resync);
        tokio::pin!(resync);
        let Some(watch) = self.inotify.as_mut() else {
            resync.await;
            self.next_resync = Instant::now() + self.config.resync;
            return;
        };
        loop {
            tokio::select! {
                () = &mut resync => {
                    self.next_resync = Instant::now() + self.config.resync;
                    return;
                }
                events = watch.next() => match events {
                    Ok(events) if events.iter().any(relevant) => break,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(path = %self.config.path.display(), %error, "inotify failed; re-reading the enabled-plugins file periodically only");
                        self.inotify = None;
                        self.watched = None;
                        return;
                    }
                },
            }
        }
        // Let the rest of the burst arrive, then drop it: one read follows.
        tokio::time::sleep(self.config.settle).await;
        watch.drain();
    }

    /// Watches the file's directory, or its nearest existing ancestor
    /// while the directory does not exist. Repeats until the nearest
    /// ancestor is stable, so a directory created just before the watch was
    /// added is not missed.
    fn rearm(&mut self) {
        let Some(watch) = self.inotify.as_mut() else {
            return;
        };
        let dir = self.config.path.parent().unwrap_or(Path::new("."));
        // Each round moves the watch down one or more levels or stops; the
        // bound only guards against a directory that flaps forever.
        for _ in 0..64 {
            let target = dir
                .ancestors()
                .find(|a| a.is_dir())
                .unwrap_or(dir)
                .to_path_buf();
            if self.watched.as_ref().is_some_and(|(p, _)| *p == target) {
                return;
            }
            if let Some((_, id)) = self.watched.take() {
                watch.remove(id);
            }
            match watch.add(&target, MASK) {
                Ok(wd) => {
                    tracing::debug!(dir = %target.display(), "watching");
                    self.watched = Some((target, wd));
                }
                Err(error) => {
                    tracing::warn!(dir = %target.display(), %error, "could not watch directory; relying on periodic re-reads");
                    return;
                }
            }
        }
    }

    /// Reads the file; returns an update when the state changed.
    fn read(&mut self) -> Option<Update> {
        let path = &self.config.path;
        let (seen, update) = match read_capped(path, crate::parse::MAX_SIZE as u64) {
            Ok(bytes) if crate::parse::is_blank(&bytes) => {
                let error = ReadError::Blank { path: path.clone() };
                (
                    Seen::Unreadable(error.to_string()),
                    Update::Unreadable(error),
                )
            }
            Ok(bytes) => match parse(&path.display().to_string(), &bytes) {
                Ok(set) => {
                    self.last_good = Some(set.clone());
                    (Seen::Loaded(set.clone()), Update::Loaded(set))
                }
                Err(error) => (
                    Seen::Invalid(error.clone()),
                    Update::Invalid {
                        error,
                        last_good: self.last_good.clone(),
                    },
                ),
            },
            Err(ReadError::Missing { .. }) => (Seen::Missing, Update::Missing),
            Err(ReadError::Invalid(error)) => (
                Seen::Invalid(error.clone()),
                Update::Invalid {
                    error,
                    last_good: self.last_good.clone(),
                },
            ),
            Err(error) => (
                Seen::Unreadable(ops_kit::Chain(&error).to_string()),
                Update::Unreadable(error),
            ),
        };
        if self.last.as_ref() == Some(&seen) {
            return None;
        }
        self.last = Some(seen);
        Some(update)
    }
}

/// Whether an event may concern the file: every event except a plain file
/// being created (its content follows with `IN_CLOSE_WRITE`; reading it now
/// could see it empty and mean "nothing enabled").
fn relevant(event: &dir_watch::Event) -> bool {
    let created_file = event.mask.contains(Mask::IN_CREATE) && !event.mask.contains(Mask::IN_ISDIR);
    !created_file
}
