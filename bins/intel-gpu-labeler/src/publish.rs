//! `publish`: a controller publishes the replicated enabled-plugins file as
//! the cluster's ConfigMap.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::Cli;
use crate::metrics::Stats;

use crate::daemon::backoff;
use crate::run::{Setup, client, first_file, watch_files};

/// `intel-gpu-labeler publish`: the enabled-plugins file's exact bytes
/// become the cluster's ConfigMap. Nothing is published from a file caught
/// mid-write: it must be non-blank, valid, and read the same twice
/// `--settle` apart; the same bytes are published once (two controllers
/// publishing the same bytes change nothing).
pub(crate) async fn publish(cli: &Cli, setup: &Setup, target: &str) -> anyhow::Result<()> {
    let Some((namespace, name)) = target
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        bail!("--configmap {target:?} is not NAMESPACE/NAME");
    };
    let client = client(cli).await?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    // The same watchdog and figures as the labeller's daemon: rounds are
    // reconciles, publications writes; /healthz fails when a round does
    // not come back within --stall-limit, /readyz while publishing fails.
    let stats = Arc::new(Stats::new(cli.stall_limit));
    let beat_every = (cli.stall_limit / 4).max(std::time::Duration::from_millis(100));
    crate::metrics::serve(setup.http.filter(|_| !cli.oneshot), &stats).await?;
    let (tx, mut triggers) = mpsc::channel::<()>(8);
    watch_files(&setup.sources, cli.resync, &tx);
    let mut published: Option<Vec<u8>> = None;
    let mut failures: u32 = 0;
    let mut pending: Option<(Vec<u8>, tokio::time::Instant)> = None;
    let mut said = String::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        stats.progress.beat();
        stats.reconciles.fetch_add(1, Ordering::Relaxed);
        let mut recheck = None;
        let note = match first_file(&setup.sources) {
            Ok(None) => "no enabled-plugins file here: nothing to publish".to_owned(),
            Ok(Some((path, bytes))) if enabled_plugins::is_blank(&bytes) => {
                pending = None;
                format!(
                    "{} is blank (being written?): not published",
                    path.display()
                )
            }
            Ok(Some((path, bytes))) => {
                match enabled_plugins::parse(&path.display().to_string(), &bytes) {
                    Err(e) => {
                        pending = None;
                        format!("not published: {e}")
                    }
                    Ok(_) if published.as_ref() == Some(&bytes) => {
                        format!("{} published", path.display())
                    }
                    Ok(_) => {
                        let now = tokio::time::Instant::now();
                        match &pending {
                            Some((seen, since)) if *seen == bytes && now >= *since + cli.settle => {
                                let text = String::from_utf8_lossy(&bytes).into_owned();
                                let sent = node_labeler::cluster::publish_configmap(
                                    &client,
                                    namespace,
                                    name,
                                    node_labeler::engine::CONFIGMAP_KEY,
                                    &text,
                                )
                                .await;
                                match sent {
                                    Ok(()) => {
                                        tracing::info!(file = %path.display(), configmap = %target, "enabled-plugins content published");
                                        published = Some(bytes);
                                        pending = None;
                                        failures = 0;
                                        stats.writes.fetch_add(1, Ordering::Relaxed);
                                        stats
                                            .last_success
                                            .store(crate::run::now(), Ordering::Relaxed);
                                        format!("{} published", path.display())
                                    }
                                    Err(e) if cli.oneshot => return Err(e.into()),
                                    // A passing API error: the same bytes
                                    // are published on the next attempt.
                                    Err(e) => {
                                        stats.errors.fetch_add(1, Ordering::Relaxed);
                                        failures = failures.saturating_add(1);
                                        recheck = Some(now + backoff(failures));
                                        format!("publishing {target} failed: {e:#}; retrying")
                                    }
                                }
                            }
                            Some((seen, since)) if *seen == bytes => {
                                recheck = Some(*since + cli.settle);
                                "confirming".to_owned()
                            }
                            _ => {
                                pending = Some((bytes, now));
                                recheck = Some(now + cli.settle);
                                "confirming".to_owned()
                            }
                        }
                    }
                }
            }
            Err(e) => format!("{e:#}"),
        };
        if note != said && note != "confirming" {
            tracing::info!("{note}");
            said.clone_from(&note);
        }
        if cli.oneshot && recheck.is_none() {
            if published.is_none() {
                bail!("{note}");
            }
            println!("published {target}");
            return Ok(());
        }
        if cli.oneshot && rounds > 8 {
            bail!("the enabled-plugins file kept changing; nothing published");
        }
        // Ready while the API answers: a controller without the file, or
        // with a file being written, has nothing to publish and is fine.
        stats.ready.store(failures == 0, Ordering::Relaxed);
        let wait = recheck.map_or(cli.resync, |at| {
            at.saturating_duration_since(tokio::time::Instant::now())
        });
        // `wait` is at most a day (--resync is range-checked): no overflow.
        let until = tokio::time::Instant::now() + wait;
        loop {
            stats.progress.beat();
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                Some(()) = triggers.recv() => break,
                () = tokio::time::sleep_until(until) => break,
                () = tokio::time::sleep(beat_every) => {}
            }
        }
    }
}
