//! The liveness watchdog behind `/healthz`, one for every daemon: the main
//! loop beats, and every operation that may block (a sysfs read of a GPU
//! in reset can sit in D state) is timed while it runs. `/healthz` fails
//! when the loop has not beaten, or an operation has run, for longer than
//! the limit, so the kubelet's liveness probe restarts a daemon that is
//! stuck. A loop that waits for events beats while it waits (it is not
//! stuck then), so only time spent inside its work counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Progress of a running daemon.
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    /// Milliseconds since `epoch` of the main loop's last beat.
    beat: AtomicU64,
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, (&'static str, Instant)>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            beat: AtomicU64::new(0),
            next: AtomicU64::new(0),
            running: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Times one operation until dropped. It owns its watchdog, so it can go
/// with the work onto a blocking thread and stay counted while that thread
/// is stuck, past any timeout its caller gave up at.
#[derive(Debug)]
pub struct Running {
    progress: Arc<Progress>,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.progress
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Progress {
    /// A new watchdog, shared by the loop and the HTTP endpoint.
    #[must_use]
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The main loop made progress.
    pub fn beat(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat.store(ms, Ordering::Relaxed);
    }

    /// Times `what` until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>, what: &'static str) -> Running {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (what, Instant::now()));
        Running {
            progress: Arc::clone(self),
            id,
        }
    }

    /// How long the longest operation running now has been running.
    #[must_use]
    pub fn longest_running(&self) -> Duration {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|(_, t)| t.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// Ok while the loop beat and nothing ran for longer than `limit`.
    ///
    /// # Errors
    /// What is stuck, and for how long.
    pub fn check(&self, limit: Duration) -> Result<(), String> {
        // The stuck operation first: it is the more precise answer.
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((what, since)) = running.values().find(|(_, t)| t.elapsed() > limit) {
            return Err(format!(
                "{what} has been running for {} ms",
                since.elapsed().as_millis()
            ));
        }
        drop(running);
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let quiet = Duration::from_millis(now.saturating_sub(self.beat.load(Ordering::Relaxed)));
        if quiet > limit {
            return Err(format!(
                "the main loop has made no progress for {} ms",
                quiet.as_millis()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_loop_or_operation_fails_the_check() {
        let p = Progress::shared();
        p.beat();
        assert!(p.check(Duration::from_secs(1)).is_ok());
        let guard = p.begin("reading hwmon");
        std::thread::sleep(Duration::from_millis(30));
        p.beat();
        let err = p.check(Duration::from_millis(10)).unwrap_err();
        assert!(err.starts_with("reading hwmon has been running"), "{err}");
        drop(guard);
        p.beat();
        assert!(p.check(Duration::from_millis(10)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        let err = p.check(Duration::from_millis(10)).unwrap_err();
        assert!(err.contains("main loop"), "{err}");
    }
}
