//! Wiring: flags → sources, discovery, the cluster; dry run, oneshot,
//! cleanup and the daemon loop.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ops_kit::prometheus::{Kind, Text};

use anyhow::{Context as _, bail};
use enabled_plugins::{FileWatcher, WatchConfig, starlingx_locations};
use gpu_discovery::{DiscoveryConfig, IdFilter, InventoryWatcher, WatcherConfig, scan};
use node_labeler::cluster::Cluster;
use node_labeler::desired::Decision;
use node_labeler::engine::{
    Outcome, Settle, Source, cleanup, decide, decide_with_evidence, reconcile_features_file,
    reconcile_node,
};
use node_labeler::reconcile::{Intent, NodeView, OPT_OUT_ANNOTATION, Policy, reconcile};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::{Cli, Command, LogFormat, Output};

/// Exit code for unusable flags.
const USAGE: u8 = 2;

struct Setup {
    sources: Vec<Source>,
    discovery: DiscoveryConfig,
    policy: Policy,
    http: Option<std::net::SocketAddr>,
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("intel-gpu-labeler: {message}");
    ExitCode::from(USAGE)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn main(cli: Cli) -> ExitCode {
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(_) => {
            return usage(format!(
                "--log-level {:?} is not a level such as info or debug",
                cli.log_level
            ));
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let id_filter = match IdFilter::parse(cli.allow_ids.as_deref(), cli.deny_ids.as_deref()) {
        Ok(p) => {
            for w in p.warnings {
                tracing::warn!("{w}");
            }
            p.filter
        }
        Err(e) => return usage(e),
    };
    let http = if cli.http_address.is_empty() {
        None
    } else {
        match cli.http_address.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                return usage(format!(
                    "--http-address {:?} is not an address such as 0.0.0.0:8081",
                    cli.http_address
                ));
            }
        }
    };
    let mut sources: Vec<Source> = if cli.enabled_plugins_files.is_empty() {
        starlingx_locations(&cli.host_root)
            .into_iter()
            .map(Source::File)
            .collect()
    } else {
        cli.enabled_plugins_files
            .iter()
            .cloned()
            .map(Source::File)
            .collect()
    };
    if let Some(cm) = &cli.enabled_plugins_configmap {
        match cm.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                sources.push(Source::ConfigMap {
                    namespace: ns.into(),
                    name: name.into(),
                });
            }
            _ => {
                return usage(format!(
                    "--enabled-plugins-configmap {cm:?} is not NAMESPACE/NAME"
                ));
            }
        }
    }
    if cli.field_manager.is_empty() || cli.field_manager.len() > 128 {
        return usage("--field-manager must be 1 to 128 characters");
    }
    let setup = Setup {
        sources,
        discovery: DiscoveryConfig::new(&cli.sysfs_root, &cli.devfs_root).filter(id_filter),
        policy: Policy {
            discovery_labels: !cli.no_discovery_labels,
            removal_grace: cli.removal_grace,
        },
        http,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("intel-gpu-labeler: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, setup)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intel-gpu-labeler: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The Node to label: `--node-name` (or `NODE_NAME`), else the node whose
/// own credentials these are — the API server's answer to "who am I"
/// (`SelfSubjectReview`, Kubernetes ≥ 1.28) is `system:node:<name>` for a
/// kubelet's identity. Unlike systemd's `%l` it is right on nodes
/// registered by FQDN.
async fn node_name(cli: &Cli, client: &kube::Client) -> anyhow::Result<String> {
    if let Some(name) = cli.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Ok(name.to_owned());
    }
    let user = node_labeler::cluster::who_am_i(client).await.context(
        "no --node-name (or NODE_NAME), and the API server cannot say who these credentials are",
    )?;
    match user.strip_prefix("system:node:") {
        Some(name) if !name.is_empty() => {
            tracing::info!(node = name, "node name from the kubelet's credentials");
            Ok(name.to_owned())
        }
        _ => bail!(
            "no --node-name (or NODE_NAME), and the credentials are {user:?}, not a node's (system:node:<name>)"
        ),
    }
}

/// What identifies the credentials' files now: the client certificate, key
/// and token files a kubeconfig names, with their modification times (the
/// kubelet rotates `kubelet-client-current.pem` by replacing the file a
/// symlink points to). `None` without such files.
fn credential_files(cli: &Cli) -> Option<Vec<(std::path::PathBuf, std::time::SystemTime)>> {
    let path = cli.kubeconfig.as_ref()?;
    let kc = kube::config::Kubeconfig::read_from(path).ok()?;
    let base = path.parent().unwrap_or(std::path::Path::new("/"));
    let mut out = Vec::new();
    for named in &kc.auth_infos {
        let Some(auth) = &named.auth_info else {
            continue;
        };
        for file in [&auth.client_certificate, &auth.client_key, &auth.token_file]
            .into_iter()
            .flatten()
        {
            let p = base.join(file);
            let modified = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            out.push((p, modified));
        }
    }
    Some(out)
}

async fn client(cli: &Cli) -> anyhow::Result<kube::Client> {
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("cannot use kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster configuration")?,
    };
    kube::Client::try_from(config).context("cannot build the Kubernetes client")
}

async fn dispatch(cli: Cli, setup: Setup) -> anyhow::Result<()> {
    if cli.dry_run {
        let inventory = scan(&setup.discovery).context("cannot read the GPU inventory")?;
        let decision = decide(&setup.sources, None).await?;
        let Intent::Apply { labels, .. } = reconcile(
            &NodeView::default(),
            &inventory,
            &decision,
            &setup.policy,
            now(),
        ) else {
            bail!("unreachable: an empty node cannot opt out");
        };
        println!("{}", serde_json::to_string_pretty(&labels)?);
        return Ok(());
    }
    if let Some(Command::Publish { configmap }) = &cli.command {
        return publish(&cli, &setup, configmap).await;
    }
    let needs_api = cli.output == Output::Api
        || cli.enabled_plugins_configmap.is_some()
        || cli.command == Some(Command::Cleanup);
    let cluster = if needs_api {
        let c = client(&cli).await?;
        let node = node_name(&cli, &c).await?;
        Some(Cluster::new(c, &node).with_field_manager(&cli.field_manager))
    } else {
        // NFD mode: the API only to read the opt-out, where there is one.
        let found = match client(&cli).await {
            Ok(c) => node_name(&cli, &c).await.map(|n| (c, n)),
            Err(e) => Err(e),
        };
        match found {
            Ok((c, node)) => Some(Cluster::new(c, &node).with_field_manager(&cli.field_manager)),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "no API client: the opt-out annotation is not checked in NFD mode");
                None
            }
        }
    };
    if cli.command == Some(Command::Cleanup) {
        let Some(cluster) = &cluster else {
            bail!("cleanup needs the API")
        };
        let out = cleanup(cluster).await?;
        println!("cleanup: {}", summary(&out));
        return Ok(());
    }
    if cli.oneshot {
        let inventory = scan(&setup.discovery).context("cannot read the GPU inventory")?;
        // A "not enabled" reading is read again --settle later; the content
        // must not have changed (at most a few rounds while it keeps
        // changing, then the decision stays unknown).
        let mut settle = Settle::new(cli.settle);
        let mut decision = Decision::Unknown("not read yet".into());
        for _ in 0..4 {
            let (read, evidence) = decide_with_evidence(&setup.sources, cluster.as_ref()).await?;
            let (acted, recheck) = settle.filter(read, &evidence, tokio::time::Instant::now());
            decision = acted;
            match recheck {
                Some(at) => tokio::time::sleep_until(at).await,
                None => break,
            }
        }
        let out = once(&cli, &setup, cluster.as_ref(), &inventory, &decision).await?;
        println!("{}", summary(&out));
        return Ok(());
    }
    daemon(cli, setup, cluster).await
}

async fn once(
    cli: &Cli,
    setup: &Setup,
    cluster: Option<&Cluster>,
    inventory: &gpu_discovery::Inventory,
    decision: &Decision,
) -> anyhow::Result<Outcome> {
    match (cli.output, cluster) {
        (Output::Api, Some(c)) => {
            Ok(reconcile_node(c, inventory, decision, &setup.policy, now()).await?)
        }
        (Output::NfdFeaturesFile, cluster) => {
            // The opt-out holds here too, where the Node can be read; a
            // failed read does not stop the file.
            if let Some(c) = cluster {
                match c.read().await {
                    Ok(Some(n))
                        if n.view
                            .annotations
                            .get(OPT_OUT_ANNOTATION)
                            .is_some_and(|v| v == "disabled") =>
                    {
                        return Ok(Outcome::OptedOut);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(error = %format!("{error}"), "could not read the Node for its opt-out");
                    }
                }
            }
            reconcile_features_file(
                &cli.nfd_features_dir,
                inventory,
                decision,
                &setup.policy,
                now(),
                cli.nfd_expiry,
            )
        }
        .with_context(|| {
            format!(
                "cannot write the feature file in {}",
                cli.nfd_features_dir.display()
            )
        }),
        (Output::Api, None) => bail!("no API client"),
    }
}

fn summary(out: &Outcome) -> String {
    match out {
        Outcome::NodeMissing => "node does not exist; nothing written".into(),
        Outcome::OptedOut => {
            "node opted out (gpu.intel.com/labeler: disabled); nothing written".into()
        }
        Outcome::Unchanged { labels, conflicts } => format!(
            "unchanged: {} labels owned, {} conflicts",
            labels.len(),
            conflicts.len()
        ),
        Outcome::Applied {
            labels,
            conflicts,
            note,
        } => format!(
            "applied: {} labels owned, {} conflicts; {note}",
            labels.len(),
            conflicts.len()
        ),
    }
}

#[derive(Default)]
struct Stats {
    reconciles: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
    conflicts: AtomicU64,
    owned: AtomicU64,
    last_success: AtomicU64,
    ready: AtomicBool,
}

impl ops_http::Endpoints for Stats {
    fn metrics(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = [
            (
                "reconciles_total",
                Kind::Counter,
                "Reconciles run.",
                g(&self.reconciles),
            ),
            (
                "writes_total",
                Kind::Counter,
                "Reconciles that wrote labels.",
                g(&self.writes),
            ),
            (
                "errors_total",
                Kind::Counter,
                "Reconciles that failed.",
                g(&self.errors),
            ),
            (
                "label_conflicts",
                Kind::Gauge,
                "Labels left alone because someone else set another value.",
                g(&self.conflicts),
            ),
            (
                "owned_labels",
                Kind::Gauge,
                "Labels the labeller owns on the node.",
                g(&self.owned),
            ),
            (
                "last_success_timestamp_seconds",
                Kind::Gauge,
                "Unix time of the last successful reconcile.",
                g(&self.last_success),
            ),
        ];
        let mut text = Text::new();
        for (name, kind, help, v) in rows {
            text.single(&format!("intel_gpu_labeler_{name}"), kind, help, v);
        }
        text.finish()
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the last reconcile did not succeed".into())
        }
    }
}

async fn daemon(cli: Cli, setup: Setup, mut cluster: Option<Cluster>) -> anyhow::Result<()> {
    // Host mode: the kubelet rotates its client certificate; a client
    // built from the old one would fail once it expires.
    let mut creds = credential_files(&cli);
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let stats = Arc::new(Stats::default());
    if let Some(addr) = setup.http {
        let listener = ops_http::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tokio::spawn(ops_http::serve(
            listener,
            Arc::clone(&stats) as Arc<dyn ops_http::Endpoints>,
        ));
    }
    let watcher = InventoryWatcher::spawn(WatcherConfig::new(setup.discovery.clone()))
        .context("cannot read the GPU inventory")?;
    let mut inventory = watcher.subscribe();
    let (trigger_tx, mut triggers) = mpsc::channel::<()>(8);
    for source in &setup.sources {
        if let Source::File(path) = source {
            let mut fw = FileWatcher::new(WatchConfig::new(path).resync(cli.resync));
            let tx = trigger_tx.clone();
            tokio::spawn(async move {
                loop {
                    let _ = fw.next().await;
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    let mut last_good: Option<Decision> = None;
    // What was last said about the decision: logged once per change, not
    // on every resync.
    let mut said = String::new();
    let mut failures: u32 = 0;
    let mut settle = Settle::new(cli.settle);
    let mut node_missing = false;
    // Watches on the Node and the ConfigMap (API mode): they fill the
    // cache reads come from and wake the loop on every change.
    let mut followers = follow(&cli, cluster.as_ref(), &trigger_tx);
    loop {
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
            Ok((read, evidence)) => {
                let (d, again) = settle.filter(read, &evidence, tokio::time::Instant::now());
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
                    Outcome::Unchanged { labels, conflicts } => (Some(labels), conflicts.len()),
                    _ => (None, 0),
                };
                stats
                    .owned
                    .store(labels.map_or(0, |l| l.len() as u64), Ordering::Relaxed);
                stats.conflicts.store(conflicts as u64, Ordering::Relaxed);
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
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = inventory.changed() => if changed.is_err() { break },
            Some(()) = triggers.recv() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    for f in followers {
        f.abort();
    }
    // Labels are never removed on shutdown or rollout.
    tracing::info!("stopping; labels stay as they are");
    Ok(())
}

/// The first enabled-plugins file that exists, with its bytes (at most
/// 64 KiB + 1 are read).
fn first_file(sources: &[Source]) -> anyhow::Result<Option<(std::path::PathBuf, Vec<u8>)>> {
    use std::io::Read as _;
    for source in sources {
        let Source::File(path) = source else { continue };
        match std::fs::File::open(path) {
            Ok(f) => {
                let mut bytes = Vec::new();
                f.take(enabled_plugins::MAX_SIZE as u64 + 1)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                return Ok(Some((path.clone(), bytes)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(None)
}

/// `intel-gpu-labeler publish`: the enabled-plugins file's exact bytes
/// become the cluster's ConfigMap. Nothing is published from a file caught
/// mid-write: it must be non-blank, valid, and read the same twice
/// `--settle` apart; the same bytes are published once (two controllers
/// publishing the same bytes change nothing).
async fn publish(cli: &Cli, setup: &Setup, target: &str) -> anyhow::Result<()> {
    let Some((namespace, name)) = target
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        bail!("--configmap {target:?} is not NAMESPACE/NAME");
    };
    let client = client(cli).await?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (tx, mut triggers) = mpsc::channel::<()>(8);
    for source in &setup.sources {
        if let Source::File(path) = source {
            let mut fw = FileWatcher::new(WatchConfig::new(path).resync(cli.resync));
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let _ = fw.next().await;
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    let mut published: Option<Vec<u8>> = None;
    let mut pending: Option<(Vec<u8>, tokio::time::Instant)> = None;
    let mut said = String::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
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
                                node_labeler::cluster::publish_configmap(
                                    &client,
                                    namespace,
                                    name,
                                    node_labeler::engine::CONFIGMAP_KEY,
                                    &text,
                                )
                                .await?;
                                tracing::info!(file = %path.display(), configmap = %target, "enabled-plugins content published");
                                published = Some(bytes);
                                pending = None;
                                format!("{} published", path.display())
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
        let wait = recheck.map_or(cli.resync, |at| {
            at.saturating_duration_since(tokio::time::Instant::now())
        });
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            Some(()) = triggers.recv() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
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
fn backoff(failures: u32) -> Duration {
    const RETRY: ops_kit::Backoff = ops_kit::Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    RETRY.delay(failures.saturating_sub(1))
}
