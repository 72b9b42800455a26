//! Wiring: flags → sources, discovery, the cluster; dry run, oneshot,
//! cleanup and the daemon loop.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use enabled_plugins::starlingx_locations;
use gpu_discovery::{DiscoveryConfig, IdFilter, scan};
use node_labeler::cluster::Cluster;
use node_labeler::desired::{Decision, LabelPrefixes, Refusal};
use node_labeler::engine::{
    Outcome, Settle, Source, cleanup, decide_with_evidence, reconcile_features_file, reconcile_node,
};
use node_labeler::reconcile::{Intent, NodeView, OPT_OUT_ANNOTATION, Policy, reconcile};
use ops_kit::Chain;

use crate::daemon::daemon;
use crate::publish::publish;
use crate::{Cli, Command, LogFormat, Output};

/// Exit code for unusable flags.
const USAGE: u8 = 2;

pub(crate) struct Setup {
    pub(crate) sources: Vec<Source>,
    pub(crate) discovery: DiscoveryConfig,
    pub(crate) policy: Policy,
    pub(crate) http: Option<std::net::SocketAddr>,
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("intel-gpu-labeler: {message}");
    ExitCode::from(USAGE)
}

pub(crate) fn now() -> u64 {
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
    // Colours only for a person at a terminal: `kubectl logs` and
    // journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        match starlingx_locations(&cli.host_root) {
            Ok(found) => found.into_iter().map(Source::File).collect(),
            // Where the ConfigMap decides, the files are only a fallback
            // without an API: go on with the per-host file.
            Err(e) if cli.enabled_plugins_configmap.is_some() => {
                tracing::error!(error = %Chain(&e), "the replicated enabled-plugins file is not consulted");
                vec![Source::File(cli.host_root.join(enabled_plugins::HOST_FILE))]
            }
            Err(e) => {
                eprintln!("intel-gpu-labeler: {}", Chain(&e));
                return ExitCode::FAILURE;
            }
        }
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
    let mut prefixes = LabelPrefixes::unprefixed_only();
    for p in &cli.allowed_label_prefixes {
        prefixes = match prefixes.allow(p) {
            Ok(allowed) => allowed,
            Err(e) => return usage(format!("--allowed-label-prefix: {e}")),
        };
    }
    let setup = Setup {
        sources,
        discovery: DiscoveryConfig::new(&cli.sysfs_root, &cli.devfs_root).filter(id_filter),
        policy: Policy {
            discovery_labels: !cli.no_discovery_labels,
            removal_grace: cli.removal_grace,
            plugin_label_prefixes: prefixes,
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
pub(crate) fn credential_files(
    cli: &Cli,
) -> Option<Vec<(std::path::PathBuf, std::time::SystemTime)>> {
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

pub(crate) async fn client(cli: &Cli) -> anyhow::Result<kube::Client> {
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
        let reading = decide_with_evidence(&setup.sources, None).await?;
        let decision = reading.decision;
        let Intent::Apply {
            labels, refused, ..
        } = reconcile(
            &NodeView::default(),
            &inventory,
            &decision,
            &setup.policy,
            now(),
        )
        else {
            bail!("unreachable: an empty node cannot opt out");
        };
        if let Some(r) = &refused {
            log_refused(r, reading.source.as_deref().unwrap_or("?"));
        }
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
        let mut source = None;
        for _ in 0..4 {
            let read = decide_with_evidence(&setup.sources, cluster.as_ref()).await?;
            let (acted, recheck) =
                settle.filter(read.decision, &read.evidence, tokio::time::Instant::now());
            decision = acted;
            source = read.source;
            match recheck {
                Some(at) => tokio::time::sleep_until(at).await,
                None => break,
            }
        }
        let out = once(&cli, &setup, cluster.as_ref(), &inventory, &decision).await?;
        if let Some(r) = out.refused() {
            let source = source.as_deref().unwrap_or("?");
            log_refused(r, source);
            if let Some(c) = &cluster {
                node_labeler::engine::report_refused(c, r, source).await;
            }
        }
        println!("{}", summary(&out));
        return Ok(());
    }
    daemon(cli, setup, cluster).await
}

pub(crate) async fn once(
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

/// The one log line of a refused plugin label: the key, why, and where
/// it came from.
pub(crate) fn log_refused(refusal: &Refusal, source: &str) {
    tracing::error!(
        key = refusal.key(),
        %source,
        error = %refusal,
        "the plugin label named by the enabled-plugins content is refused; it is not applied (the other labels are)"
    );
}

pub(crate) fn summary(out: &Outcome) -> String {
    match out {
        Outcome::NodeMissing => "node does not exist; nothing written".into(),
        Outcome::OptedOut => {
            "node opted out (gpu.intel.com/labeler: disabled); nothing written".into()
        }
        Outcome::Unchanged {
            labels, conflicts, ..
        } => format!(
            "unchanged: {} labels owned, {} conflicts",
            labels.len(),
            conflicts.len()
        ),
        Outcome::Applied {
            labels,
            conflicts,
            note,
            ..
        } => format!(
            "applied: {} labels owned, {} conflicts; {note}",
            labels.len(),
            conflicts.len()
        ),
    }
}

/// Follows every enabled-plugins file among `sources` (inotify, and a
/// re-read every `resync`); each change sends one trigger on `tx`. The
/// tasks end when the receiver goes.
pub(crate) fn watch_files(
    sources: &[Source],
    resync: std::time::Duration,
    tx: &tokio::sync::mpsc::Sender<()>,
) {
    for source in sources {
        if let Source::File(path) = source {
            let mut fw = enabled_plugins::FileWatcher::new(
                enabled_plugins::WatchConfig::new(path).resync(resync),
            );
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
}

/// The first enabled-plugins file that exists, with its bytes (at most
/// 64 KiB + 1 are read, never from a FIFO or device).
pub(crate) fn first_file(
    sources: &[Source],
) -> anyhow::Result<Option<(std::path::PathBuf, Vec<u8>)>> {
    for source in sources {
        let Source::File(path) = source else { continue };
        match enabled_plugins::read_bytes(path) {
            Ok(bytes) => return Ok(Some((path.clone(), bytes))),
            Err(enabled_plugins::ReadError::Missing { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}
