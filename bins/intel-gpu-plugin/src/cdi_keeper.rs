//! Keeps one CDI spec per card on disk, and knows which are there: an
//! Allocate answer names a card's CDI device only when its spec is written
//! (a runtime fails the whole container on a name it cannot resolve).
//!
//! - A failed write is retried with backoff (0.5 s doubling to 30 s),
//!   counted, logged once per change of error, and shown by `inspect`.
//! - A spec someone removed is written again.
//! - A card missing from the plan keeps its spec for a grace period
//!   ([`GRACE`] by default): one scan
//!   that misses a card (a transient EIO, a rescan race) must not take away
//!   the spec that the kubelet's cached Allocate answer names when it
//!   restarts a container.
//! - A removal that fails is retried; it never stops the others.
//!
//! Every file operation runs on the blocking pool under [`IO_TIMEOUT`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use devplugin_api::Backoff;
use devplugin_api::cdi::{Spec, SpecDir};
use ops_kit::Chain;
use tokio::time::Instant;

use crate::plan::{self, ByPath, Plan};
use crate::progress::Progress;

/// How long a card absent from the plan keeps its spec, by default.
pub const GRACE: Duration = Duration::from_secs(60);
/// How long one batch of file operations may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Backoff = Backoff {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(30),
};

/// Figures for `/metrics`.
#[derive(Debug, Default)]
pub struct CdiStats {
    /// Writes that failed.
    pub write_failures: AtomicU64,
    /// Removals that failed.
    pub removal_failures: AtomicU64,
    /// Cards whose spec is not on disk now.
    pub missing: AtomicU64,
}

/// Where one card's spec stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecState {
    /// On disk as rendered.
    Written,
    /// Not written yet, or the last write failed: retried at `next_try`.
    Pending {
        /// Failed attempts so far.
        attempts: u32,
        /// The last error.
        error: Option<String>,
    },
}

#[derive(Debug)]
struct Entry {
    spec: Spec,
    state: SpecState,
    next_try: Instant,
    absent_since: Option<Instant>,
}

/// The specs of this process.
#[derive(Debug)]
pub struct CdiKeeper {
    dir: SpecDir,
    grace: Duration,
    entries: BTreeMap<String, Entry>,
    stats: Arc<CdiStats>,
    /// Whether specs left by an earlier run have been swept once.
    swept: bool,
}

enum Job {
    Write(String, Spec),
    Check(String),
}

impl CdiKeeper {
    /// Removes the temporaries of a plugin killed mid-write. Call it once
    /// this process owns the node's GPUs (a second instance's live
    /// temporaries must not go).
    pub fn remove_stale_temporaries(&self) {
        let stale = self.dir.remove_stale_temporaries();
        if stale > 0 {
            tracing::info!(files = stale, "temporaries of a killed write removed");
        }
    }

    /// Specs in `dir`; a card absent from the plan keeps its spec for
    /// `grace`.
    #[must_use]
    pub fn new(dir: SpecDir, grace: Duration) -> Self {
        Self {
            dir,
            grace,
            entries: BTreeMap::new(),
            stats: Arc::new(CdiStats::default()),
            swept: false,
        }
    }

    /// The figures.
    #[must_use]
    pub fn stats(&self) -> Arc<CdiStats> {
        Arc::clone(&self.stats)
    }

    /// Brings the directory in step with `plan` and marks each card of the
    /// plan whose spec is on disk (`Card::cdi`).
    pub async fn sync(&mut self, plan: &mut Plan, bypath: ByPath, progress: &Arc<Progress>) {
        let now = Instant::now();
        let mut wanted = BTreeSet::new();
        for card in plan.cards.values() {
            let name = plan::cdi_file_name(card);
            let spec = plan::cdi_spec(card, bypath);
            let entry = self.entries.entry(name.clone()).or_insert_with(|| Entry {
                spec: spec.clone(),
                state: SpecState::Pending {
                    attempts: 0,
                    error: None,
                },
                next_try: now,
                absent_since: None,
            });
            entry.absent_since = None;
            if entry.spec != spec {
                entry.spec = spec;
                entry.state = SpecState::Pending {
                    attempts: 0,
                    error: None,
                };
                entry.next_try = now;
            }
            wanted.insert(name);
        }
        for (name, entry) in &mut self.entries {
            if !wanted.contains(name) && entry.absent_since.is_none() {
                entry.absent_since = Some(now);
            }
        }
        // Writes that are due, and a look at what is believed written.
        let jobs: Vec<Job> = self
            .entries
            .iter()
            .filter(|(_, e)| e.absent_since.is_none())
            .filter_map(|(name, e)| match e.state {
                SpecState::Written => Some(Job::Check(name.clone())),
                SpecState::Pending { .. } if e.next_try <= now => {
                    Some(Job::Write(name.clone(), e.spec.clone()))
                }
                SpecState::Pending { .. } => None,
            })
            .collect();
        // Removals: absent past the grace (and past the wait after a
        // failed removal).
        let expired: BTreeSet<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.absent_since
                    .is_some_and(|t| now.duration_since(t) >= self.grace && now >= e.next_try)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let keep: BTreeSet<String> = self
            .entries
            .keys()
            .filter(|n| !expired.contains(*n))
            .cloned()
            .collect();
        let dir = self.dir.clone();
        // Also once at the start: specs an earlier run left behind go.
        let cleanup = !expired.is_empty() || self.entries.is_empty() || !self.swept;
        // The guard goes with the work: stuck I/O stays counted.
        let guard = progress.begin("CDI spec writes");
        let work = move || {
            let _guard = guard;
            let results: Vec<(String, Result<bool, String>)> = jobs
                .into_iter()
                .map(|job| match job {
                    Job::Write(name, spec) => {
                        let r = dir.write(&name, &spec).map_err(|e| Chain(&e).to_string());
                        (name, r)
                    }
                    Job::Check(name) => {
                        let there = dir.dir().join(&name).exists();
                        (name, if there { Ok(false) } else { Err(String::new()) })
                    }
                })
                .collect();
            let retained = cleanup.then(|| dir.retain(&keep));
            (results, retained)
        };
        let outcome = tokio::time::timeout(IO_TIMEOUT, tokio::task::spawn_blocking(work)).await;
        let (results, retained) = match outcome {
            Ok(Ok(done)) => done,
            Ok(Err(error)) => {
                tracing::error!(%error, "the CDI writer task failed");
                return self.mark(plan);
            }
            Err(_) => {
                tracing::error!(dir = %self.dir.dir().display(), timeout = ?IO_TIMEOUT, "CDI spec writes did not finish in time; retrying later");
                for e in self.entries.values_mut() {
                    if let SpecState::Pending { attempts, .. } = &mut e.state {
                        *attempts += 1;
                        e.next_try = now + RETRY.delay(*attempts);
                    }
                }
                return self.mark(plan);
            }
        };
        for (name, result) in results {
            let Some(entry) = self.entries.get_mut(&name) else {
                continue;
            };
            match result {
                Ok(wrote) => {
                    if wrote || entry.state != SpecState::Written {
                        tracing::info!(spec = %name, "CDI spec written");
                    }
                    entry.state = SpecState::Written;
                }
                // Believed written, found missing: write it again now.
                Err(error) if error.is_empty() => {
                    tracing::warn!(spec = %name, "CDI spec vanished from disk; writing it again");
                    entry.state = SpecState::Pending {
                        attempts: 0,
                        error: Some("removed by someone else".to_owned()),
                    };
                    entry.next_try = now;
                }
                Err(error) => {
                    self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                    let (attempts, changed) = match &entry.state {
                        SpecState::Pending {
                            attempts,
                            error: last,
                        } => (attempts + 1, last.as_deref() != Some(error.as_str())),
                        SpecState::Written => (1, true),
                    };
                    let delay = RETRY.delay(attempts.saturating_sub(1));
                    if changed {
                        tracing::error!(spec = %name, %error, retry_in = ?delay, "could not write the CDI spec; Allocate answers leave its name out until it is written");
                    }
                    entry.state = SpecState::Pending {
                        attempts,
                        error: Some(error),
                    };
                    entry.next_try = now + delay;
                }
            }
        }
        match retained {
            Some(Ok(r)) => {
                for name in &r.removed {
                    tracing::info!(spec = %name, "CDI spec removed");
                }
                for error in &r.failed {
                    self.stats.removal_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %Chain(error), "could not remove a CDI spec; retrying later");
                }
                let failed: BTreeSet<String> = r
                    .failed
                    .iter()
                    .filter_map(|e| match e {
                        devplugin_api::cdi::CdiError::Io { path, .. } => {
                            path.file_name()?.to_str().map(str::to_owned)
                        }
                        _ => None,
                    })
                    .collect();
                self.entries
                    .retain(|n, _| !expired.contains(n) || failed.contains(n));
                self.retry_later(&failed, now);
                self.swept = true;
            }
            Some(Err(error)) => {
                self.stats.removal_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %Chain(&error), "could not clean up CDI specs; retrying later");
                self.retry_later(&expired, now);
            }
            None => {}
        }
        self.mark(plan);
    }

    /// A removal that failed is tried again after the longest retry delay,
    /// not at once: the deadline would otherwise stay in the past.
    fn retry_later(&mut self, names: &BTreeSet<String>, now: Instant) {
        for name in names {
            if let Some(e) = self.entries.get_mut(name) {
                e.next_try = now + RETRY.max;
            }
        }
    }

    fn mark(&self, plan: &mut Plan) {
        let mut missing = 0;
        for card in plan.cards.values_mut() {
            let name = plan::cdi_file_name(card);
            card.cdi = self
                .entries
                .get(&name)
                .is_some_and(|e| e.state == SpecState::Written);
            if !card.cdi {
                missing += 1;
            }
        }
        self.stats.missing.store(missing, Ordering::Relaxed);
    }

    /// When [`CdiKeeper::sync`] has work again without a new plan: the next
    /// retry or the end of a grace.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match (e.absent_since, &e.state) {
                (Some(t), _) => Some((t + self.grace).max(e.next_try)),
                (None, SpecState::Pending { .. }) => Some(e.next_try),
                (None, SpecState::Written) => None,
            })
            .min()
    }

    /// Each spec file with its state.
    #[must_use]
    pub fn states(&self) -> BTreeMap<String, SpecState> {
        self.entries
            .iter()
            .map(|(n, e)| (n.clone(), e.state.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fake_gpu_node::{FakeNode, GpuSpec, NodeSpec};
    use gpu_discovery::{DiscoveryConfig, scan};

    fn plan_of(node: &FakeNode) -> Plan {
        let inv = scan(&DiscoveryConfig::new(node.sysfs_root(), node.devfs_root())).unwrap();
        let options = plan::Options {
            shared_dev_num: 1,
            bypath: ByPath::Single,
            monitoring: None,
            temp_limit: None,
            temp_hysteresis: 5.0,
            host_dri: "/dev/dri".into(),
        };
        plan::plan(
            &inv,
            &options,
            &mut plan::Memory::default(),
            &BTreeMap::new(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_card_missing_from_one_scan_keeps_its_spec_for_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(
            &dir.path().join("node"),
            &NodeSpec {
                name: "t".into(),
                gpus: vec![GpuSpec::new(0), GpuSpec::new(1)],
            },
        )
        .unwrap();
        let cdi = dir.path().join("cdi");
        let progress = Progress::shared();
        let mut keeper = CdiKeeper::new(
            SpecDir::new(&cdi, plan::CDI_PREFIX),
            Duration::from_millis(300),
        );
        let mut full = plan_of(&node);
        keeper.sync(&mut full, ByPath::Single, &progress).await;
        assert!(full.cards.values().all(|c| c.cdi));
        let card1 = cdi.join("intel.cdi.k8s.io-gpu-card1.yaml");
        assert!(card1.exists());
        // One scan misses card1 (a transient read error, say).
        let mut partial = full.clone();
        partial.cards.remove(&1);
        keeper.sync(&mut partial, ByPath::Single, &progress).await;
        assert!(card1.exists(), "kept during the grace");
        let due = keeper.next_deadline().unwrap();
        assert!(due > Instant::now());
        // Back within the grace: nothing happened, nothing is due.
        keeper.sync(&mut full, ByPath::Single, &progress).await;
        assert!(card1.exists());
        assert_eq!(keeper.next_deadline(), None);
        // Gone for good: removed once the grace is over.
        keeper.sync(&mut partial, ByPath::Single, &progress).await;
        tokio::time::sleep_until(keeper.next_deadline().unwrap()).await;
        keeper.sync(&mut partial, ByPath::Single, &progress).await;
        assert!(!card1.exists(), "removed after the grace");
        assert!(cdi.join("intel.cdi.k8s.io-gpu-card0.yaml").exists());
        assert_eq!(keeper.states().len(), 1);
    }

    fn two_card_node(dir: &std::path::Path) -> FakeNode {
        FakeNode::build(
            &dir.join("node"),
            &NodeSpec {
                name: "t".into(),
                gpus: vec![GpuSpec::new(0), GpuSpec::new(1)],
            },
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn specs_an_earlier_run_left_are_swept_on_the_first_sync() {
        let dir = tempfile::tempdir().unwrap();
        let node = two_card_node(dir.path());
        let cdi = dir.path().join("cdi");
        std::fs::create_dir_all(&cdi).unwrap();
        let left = cdi.join("intel.cdi.k8s.io-gpu-card7.yaml");
        std::fs::write(&left, "{}").unwrap();
        let foreign = cdi.join("vendor.example-thing.yaml");
        std::fs::write(&foreign, "{}").unwrap();
        let mut keeper = CdiKeeper::new(
            SpecDir::new(&cdi, plan::CDI_PREFIX),
            Duration::from_secs(60),
        );
        keeper
            .sync(&mut plan_of(&node), ByPath::Single, &Progress::shared())
            .await;
        assert!(!left.exists(), "an earlier run's spec for a gone card");
        assert!(foreign.exists(), "someone else's spec");
        assert!(cdi.join("intel.cdi.k8s.io-gpu-card0.yaml").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_removal_waits_before_it_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let node = two_card_node(dir.path());
        let cdi = dir.path().join("cdi");
        let progress = Progress::shared();
        let mut keeper = CdiKeeper::new(
            SpecDir::new(&cdi, plan::CDI_PREFIX),
            Duration::from_millis(50),
        );
        let mut full = plan_of(&node);
        keeper.sync(&mut full, ByPath::Single, &progress).await;
        // card1 goes, and its spec becomes something remove_file refuses
        // (a directory), even as root.
        let card1 = cdi.join("intel.cdi.k8s.io-gpu-card1.yaml");
        std::fs::remove_file(&card1).unwrap();
        std::fs::create_dir(&card1).unwrap();
        std::fs::write(card1.join("x"), "").unwrap();
        let mut partial = full.clone();
        partial.cards.remove(&1);
        keeper.sync(&mut partial, ByPath::Single, &progress).await;
        tokio::time::sleep_until(keeper.next_deadline().unwrap()).await;
        keeper.sync(&mut partial, ByPath::Single, &progress).await;
        assert!(card1.exists());
        assert!(keeper.stats().removal_failures.load(Ordering::Relaxed) >= 1);
        // Not due again at once (which would spin the plugin's loop).
        let due = keeper.next_deadline().unwrap();
        assert!(due > Instant::now() + Duration::from_secs(10), "{due:?}");
    }
}
