//! The daemon loop: inventory and enabled-plugins watchers, cluster watches,
//! resync and backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use gpu_discovery::{InventoryWatcher, WatcherConfig};
use node_labeler::cluster::Cluster;
use node_labeler::desired::Decision;
use node_labeler::engine::{Outcome, Settle, decide_with_evidence, report_refused};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::{Cli, Output};

use crate::metrics::Stats;
use crate::run::{Setup, client, credential_files, log_refused, now, once, summary, watch_files};

pub(crate) async fn daemon(
    cli: Cli,
    setup: Setup,
    mut cluster: Option<Cluster>,
) -> anyhow::Result<()> {
    // Host mode: the kubelet rotates its client certificate; a client
    // built from the old one would fail once it expires.
    let mut creds = credential_files(&cli);
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let stats = Arc::new(Stats::new(cli.stall_limit));
    if cli.output == Output::NfdFeaturesFile {
        // A labeller killed while writing left its temporary.
        node_labeler::engine::remove_stale_features_temporaries(&cli.nfd_features_dir);
    }
    // While the loop waits for something to do it beats this often: only
    // a round that does not come back (a write that hangs, a stuck read)
    // stops the beats and fails /healthz.
    let beat_every = (cli.stall_limit / 4).max(Duration::from_millis(100));
    crate::metrics::serve(setup.http, &stats).await?;
    let watcher = InventoryWatcher::spawn(WatcherConfig::new(setup.discovery.clone()))
        .context("cannot read the GPU inventory")?;
    let mut inventory = watcher.subscribe();
    let (trigger_tx, mut triggers) = mpsc::channel::<()>(8);
    watch_files(&setup.sources, cli.resync, &trigger_tx);
    let mut last_good: Option<Decision> = None;
    // What was last said about the decision: logged once per change, not
    // on every resync.
    let mut said = String::new();
    let mut failures: u32 = 0;
    let mut settle = Settle::new(cli.settle);
    let mut node_missing = false;
    // Where the decision was last read from, and the refusal last
    // reported: a refused label is reported once per change, not on
    // every resync.
    let mut source: Option<String> = None;
    let mut reported: Option<node_labeler::desired::Refusal> = None;
    // Watches on the Node and the ConfigMap (API mode): they fill the
    // cache reads come from and wake the loop on every change.
    let mut followers = follow(&cli, cluster.as_ref(), &trigger_tx);
    loop {
        stats.progress.beat();
        let now_creds = credential_files(&cli);
        if now_creds != creds
            && let Some(current) = &cluster
        {
            match client(&cli).await {
                Ok(c) => {
                    tracing::info!("the client credentials changed on disk; using the new ones");
                    cluster = Some(
                        Cluster::new(c, current.node()).with_field_manager(current.field_manager()),
                    );
                    creds = now_creds;
                    for f in followers.drain(..) {
                        f.abort();
                    }
                    followers = follow(&cli, cluster.as_ref(), &trigger_tx);
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "the client credentials changed but cannot be used yet; keeping the old ones");
                }
            }
        }
        stats.reconciles.fetch_add(1, Ordering::Relaxed);
        let mut recheck = None;
        let (decision, note) = match decide_with_evidence(&setup.sources, cluster.as_ref()).await {
            Ok(read) => {
                if read.source.is_some() {
                    source.clone_from(&read.source);
                }
                let (d, again) =
                    settle.filter(read.decision, &read.evidence, tokio::time::Instant::now());
                recheck = again;
                if recheck.is_none() {
                    last_good = Some(d.clone());
                }
                let note = format!("{d:?}");
                (d, note)
            }
            Err(e) => {
                let note = format!(
                    "invalid enabled-plugins content ({e}); keeping the last good decision"
                );
                (
                    last_good
                        .clone()
                        .unwrap_or_else(|| Decision::Unknown(format!("invalid content: {e}"))),
                    note,
                )
            }
        };
        if note != said {
            match &decision {
                _ if note.starts_with("invalid") => tracing::error!("{note}"),
                Decision::Unknown(why) => {
                    tracing::warn!(%why, "enabled-plugins decision unknown: the plugin label is neither added nor removed")
                }
                Decision::Enabled(label) => tracing::info!(%label, "the GPU plugin is enabled"),
                Decision::Disabled => tracing::info!("the GPU plugin is not enabled"),
            }
            said = note;
        }
        let current = std::sync::Arc::clone(&inventory.borrow_and_update());
        let wait = match once(&cli, &setup, cluster.as_ref(), &current, &decision).await {
            Ok(out) => {
                failures = 0;
                // A missing Node: said once, and not ready until it is back.
                let missing = out == Outcome::NodeMissing;
                if missing && !node_missing {
                    tracing::warn!(
                        node = cluster.as_ref().map_or("", |c| c.node()),
                        "the Node does not exist; waiting for it (it is never created by the labeller)"
                    );
                } else if !missing && node_missing {
                    tracing::info!("the Node exists again");
                }
                node_missing = missing;
                stats.ready.store(!missing, Ordering::Relaxed);
                stats.last_success.store(now(), Ordering::Relaxed);
                let (labels, conflicts): (Option<&BTreeMap<String, String>>, usize) = match &out {
                    Outcome::Applied {
                        labels, conflicts, ..
                    } => {
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                        (Some(labels), conflicts.len())
                    }
                    Outcome::Unchanged {
                        labels, conflicts, ..
                    } => (Some(labels), conflicts.len()),
                    _ => (None, 0),
                };
                stats
                    .owned
                    .store(labels.map_or(0, |l| l.len() as u64), Ordering::Relaxed);
                stats.conflicts.store(conflicts as u64, Ordering::Relaxed);
                let refused = out.refused();
                if refused != reported.as_ref() {
                    if let Some(r) = refused {
                        let from = source.as_deref().unwrap_or("?");
                        log_refused(r, from);
                        stats.refused_total.fetch_add(1, Ordering::Relaxed);
                        if let Some(c) = cluster.as_ref().filter(|_| cli.output == Output::Api) {
                            report_refused(c, r, from).await;
                        }
                    } else if !matches!(out, Outcome::NodeMissing | Outcome::OptedOut) {
                        tracing::info!(
                            "the plugin label named by the enabled-plugins content is accepted again"
                        );
                    }
                    if !matches!(out, Outcome::NodeMissing | Outcome::OptedOut) {
                        reported = refused.cloned();
                    }
                }
                stats
                    .refused
                    .store(u64::from(reported.is_some()), Ordering::Relaxed);
                tracing::debug!(outcome = %summary(&out), "reconciled");
                // Without watches, a missing node is polled until it
                // (re)appears; with them, its return wakes the loop.
                if missing && followers.is_empty() {
                    Duration::from_secs(5).min(cli.resync)
                } else {
                    cli.resync
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.ready.store(false, Ordering::Relaxed);
                let delay = backoff(failures);
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "reconcile failed");
                delay
            }
        };
        // A "not enabled" reading is read again once it may be confirmed.
        let wait = recheck.map_or(wait, |at| {
            wait.min(at.saturating_duration_since(tokio::time::Instant::now()))
        });
        // `wait` is at most a day (--resync is range-checked): no overflow.
        let until = tokio::time::Instant::now() + wait;
        let stop = loop {
            stats.progress.beat();
            tokio::select! {
                _ = term.recv() => break true,
                _ = int.recv() => break true,
                changed = inventory.changed() => break changed.is_err(),
                Some(()) = triggers.recv() => break false,
                () = tokio::time::sleep_until(until) => break false,
                () = tokio::time::sleep(beat_every) => {}
            }
        };
        if stop {
            break;
        }
    }
    for f in followers {
        f.abort();
    }
    // Labels are never removed on shutdown or rollout.
    tracing::info!("stopping; labels stay as they are");
    Ok(())
}

/// Starts the watches of API mode; their changes become triggers.
fn follow(
    cli: &Cli,
    cluster: Option<&Cluster>,
    triggers: &mpsc::Sender<()>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(cluster) = cluster.filter(|_| cli.output == Output::Api) else {
        return Vec::new();
    };
    let configmap = cli
        .enabled_plugins_configmap
        .as_deref()
        .and_then(|c| c.split_once('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()));
    let tx = triggers.clone();
    cluster.follow(
        configmap,
        Arc::new(move || {
            // A full queue already holds a wake-up.
            let _ = tx.try_send(());
        }),
    )
}

/// 1 s, 2 s, 4 s … capped at 60 s, ±20 % jitter: after the `failures`th
/// failure in a row.
pub(crate) fn backoff(failures: u32) -> Duration {
    const RETRY: ops_kit::Backoff = ops_kit::Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    RETRY.delay(failures.saturating_sub(1))
}
