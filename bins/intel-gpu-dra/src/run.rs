//! The daemon: owner lock, mode, discovery, slices, the DRA service and
//! registration, until SIGTERM or SIGINT.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use dra_api::health::{DeviceHealth, HEALTH_SERVICE, HealthEntry};
use dra_api::slices::{Features, PublishState, PublisherConfig, SlicePublisher};
use dra_api::{DraConfig, DraServer, DriverName, KubeClaims, Registrar, RegistrarConfig};
use gpu_discovery::owner::{MODE_DEVICE_PLUGIN, MODE_LABEL, OwnerLock};
use gpu_discovery::{DiscoveryConfig, Inventory, InventoryWatcher, WatcherConfig};
use k8s_openapi::api::core::v1::Node;
use ops_kit::prometheus::{Kind, Text};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{Sharing, Sriov, Taints};
use crate::devices::{DRIVER, Mode, publish};
use crate::prepare::{Current, GpuDriver};

/// What [`run`] needs.
#[derive(Debug)]
pub struct RunConfig {
    /// The node.
    pub node: String,
    /// Discovery.
    pub discovery: DiscoveryConfig,
    /// Credentials.
    pub kubeconfig: Option<PathBuf>,
    /// Registration directory.
    pub registry_dir: PathBuf,
    /// Data directory.
    pub plugin_dir: PathBuf,
    /// CDI directory.
    pub cdi_dir: PathBuf,
    /// A test kernel's netlink port, if any (see `WatcherConfig`).
    pub trust_uevent_port: Option<u32>,
    /// How long without progress fails `/healthz`.
    pub stall_limit: Duration,
    /// Where the boot ID is read (`/proc/sys/kernel/random/boot_id`).
    pub boot_id_file: PathBuf,
    /// Sharing wanted.
    pub sharing: Sharing,
    /// SR-IOV rule wanted.
    pub sriov: Sriov,
    /// Taints wanted.
    pub taints: Taints,
    /// The owner lock, if any.
    pub owner_lock: Option<PathBuf>,
    /// The ops endpoint, if any.
    pub http: Option<std::net::SocketAddr>,
}

/// The mode from what the cluster keeps and what the flags want.
///
/// # Errors
/// When a flag requires what the cluster drops.
pub fn decide(
    features: Features,
    sharing: Sharing,
    sriov: Sriov,
    taints: Taints,
) -> anyhow::Result<Mode> {
    let need = |wanted: bool, have: bool, what: &str, gate: &str| {
        if wanted && !have {
            bail!(
                "{what} was required, but the API server drops its fields (feature gate {gate} off?)"
            );
        }
        Ok(())
    };
    need(
        sharing == Sharing::On,
        features.consumable_capacity,
        "--sharing on",
        "DRAConsumableCapacity",
    )?;
    need(
        sriov == Sriov::Counters,
        features.partitionable.is_some(),
        "--sriov counters",
        "DRAPartitionableDevices",
    )?;
    need(
        taints == Taints::On,
        features.device_taints,
        "--taints on",
        "DRADeviceTaints",
    )?;
    Ok(Mode {
        shared: sharing != Sharing::Off && features.consumable_capacity,
        counters: if sriov == Sriov::HidePf {
            None
        } else {
            features.partitionable
        },
        taints: taints != Taints::Off && features.device_taints,
    })
}

/// Retries `f` with backoff until it succeeds (callers race it against
/// the signals); each attempt is progress.
async fn retry<T, F, Fut>(progress: &ops_http::Progress, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let backoff = ops_kit::Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(30),
    };
    let mut attempt = 0;
    loop {
        progress.beat();
        match f().await {
            Ok(v) => return v,
            Err(error) => {
                tracing::warn!(%error, attempt, "{what}; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
        }
    }
}

struct Ops {
    /// The liveness watchdog: the main loop beats, prepares are timed.
    progress: Arc<ops_http::Progress>,
    stall_limit: Duration,
    ready: AtomicBool,
    devices: AtomicU64,
    prepared: AtomicU64,
    state: RwLock<String>,
    /// At start: claims rebuilt from their CDI specs, specs written
    /// again, problems.
    rebuilt: AtomicU64,
    rewritten: AtomicU64,
    start_problems: AtomicU64,
    /// The node's kubelet has a known DRA defect (its issue), if so.
    kubelet_issue: RwLock<Option<&'static str>>,
    /// The watcher, once discovery started.
    watcher: std::sync::OnceLock<Arc<InventoryWatcher>>,
    /// Claim references the DRA service refused.
    claims_refused: AtomicU64,
}

impl Ops {
    fn new(progress: Arc<ops_http::Progress>, stall_limit: Duration) -> Self {
        Self {
            progress,
            stall_limit,
            ready: AtomicBool::new(false),
            devices: AtomicU64::new(0),
            prepared: AtomicU64::new(0),
            state: RwLock::new("starting".to_owned()),
            rebuilt: AtomicU64::new(0),
            rewritten: AtomicU64::new(0),
            start_problems: AtomicU64::new(0),
            kubelet_issue: RwLock::new(None),
            watcher: std::sync::OnceLock::new(),
            claims_refused: AtomicU64::new(0),
        }
    }

    /// The hostile inputs refused so far: planted files, forged uevents,
    /// claim references that could steer a path.
    fn hostile(&self) -> [u64; 3] {
        [
            ops_kit::fs::planted_total(),
            self.watcher.get().map_or(0, |w| w.refused_uevents()),
            self.claims_refused.load(Ordering::Relaxed),
        ]
    }
}

/// What each kind of hostile input gets on the Node: an Event whose count
/// grows with every round in which more were refused (the message stays
/// the same, so it is one Event, not a pile).
const HOSTILE: [(&str, &str); 3] = [
    (
        "PlantedFileRefused",
        "a link or file planted where intel-gpu-dra writes (CDI specs, its checkpoint) was found and not followed; see its log and intel_gpu_dra_planted_files_total",
    ),
    (
        "ForgedUeventRefused",
        "netlink messages posing as uevents, not from the kernel or udevd, were refused; see intel-gpu-dra's log and intel_gpu_dra_uevents_refused_total",
    ),
    (
        "ClaimReferenceRefused",
        "the kubelet named a claim whose UID, namespace or name could steer a path or URL; refused, see intel-gpu-dra's log and intel_gpu_dra_claims_refused_total",
    ),
];

/// Records an Event for each kind of hostile input refused since `seen`
/// (in the background: reporting never holds up the loop).
fn report_hostile(
    seen: &mut [u64; 3],
    now: [u64; 3],
    events: &node_events::NodeEvents,
    node_uid: &str,
) {
    for ((before, after), (reason, message)) in seen.iter().zip(now).zip(HOSTILE) {
        if after > *before {
            let (events, uid) = (events.clone(), node_uid.to_owned());
            tokio::spawn(async move { events.warn(&uid, reason, message).await });
        }
    }
    *seen = now;
}

impl ops_http::Endpoints for Ops {
    fn metrics(&self) -> String {
        let mut text = Text::new();
        text.single(
            "intel_gpu_dra_devices",
            Kind::Gauge,
            "Devices published.",
            self.devices.load(Ordering::Relaxed),
        )
        .single(
            "intel_gpu_dra_prepared_devices",
            Kind::Gauge,
            "Devices prepared for a claim.",
            self.prepared.load(Ordering::Relaxed),
        )
        .single(
            "intel_gpu_dra_claims_rebuilt",
            Kind::Gauge,
            "Prepared claims rebuilt from their CDI specs at start (the checkpoint was missing or corrupt).",
            self.rebuilt.load(Ordering::Relaxed),
        )
        .single(
            "intel_gpu_dra_cdi_specs_rewritten",
            Kind::Gauge,
            "CDI specs of prepared claims written again at start (missing or changed, e.g. after a reboot).",
            self.rewritten.load(Ordering::Relaxed),
        )
        .single(
            "intel_gpu_dra_start_problems",
            Kind::Gauge,
            "What could not be done when bringing the checkpoint and CDI specs in step at start.",
            self.start_problems.load(Ordering::Relaxed),
        );
        let issue = *self
            .kubelet_issue
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        text.single(
            "intel_gpu_dra_planted_files_total",
            Kind::Counter,
            "Links or files planted where the driver writes (CDI specs, checkpoint), found and not followed.",
            ops_kit::fs::planted_total(),
        )
        .single(
            "intel_gpu_dra_claims_refused_total",
            Kind::Counter,
            "Claim references (UID, namespace, name) from the kubelet refused because they could steer a path or URL.",
            self.claims_refused.load(Ordering::Relaxed),
        );
        text.single(
            "intel_gpu_dra_uevents_refused_total",
            Kind::Counter,
            "Netlink messages refused as uevents because they did not come from their real sender (the kernel's port 0, or udevd as root): forged uevents.",
            self.watcher.get().map_or(0, |w| w.refused_uevents()),
        );
        let name = "intel_gpu_dra_kubelet_known_issue";
        text.family(
            name,
            Kind::Gauge,
            "1 when this node's kubelet has a known DRA defect, named by the issue label.",
        );
        if let Some(issue) = issue {
            text.sample(name, &[("issue", issue)], 1);
        }
        text.finish()
    }

    fn live(&self) -> Result<(), String> {
        self.progress.check(self.stall_limit)?;
        match self.watcher.get().and_then(|w| w.scan_running_for()) {
            Some(t) if t > self.stall_limit => Err(format!(
                "a sysfs rescan has been running for {} s",
                t.as_secs()
            )),
            _ => Ok(()),
        }
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(self
                .state
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone())
        }
    }
}

/// Runs until SIGTERM or SIGINT.
///
/// # Errors
/// When the service cannot start or a required feature is missing.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let progress = ops_http::Progress::shared();
    progress.beat();
    let ops = Arc::new(Ops::new(Arc::clone(&progress), config.stall_limit));
    let set_state = |s: String| *ops.state.write().unwrap_or_else(PoisonError::into_inner) = s;
    let _http = match config.http {
        Some(addr) => {
            let listener = ops_http::bind(addr)
                .await
                .with_context(|| format!("cannot serve on {addr}"))?;
            let endpoints: Arc<dyn ops_http::Endpoints> = ops.clone();
            Some(tokio::spawn(ops_http::serve(listener, endpoints)))
        }
        None => None,
    };
    let driver_name = DriverName::new(DRIVER)?;
    let client = dra_api::kube_client(config.kubeconfig.as_deref()).await?;

    // One GPU, one owner. The node's mode label first: a node given to
    // the device plugin is left alone, and its owner lock is not even
    // tried (holding it would keep the plugin out). Then the lock, tried
    // every 200 ms; the label is read again every 10 s meanwhile.
    let who = format!("intel-gpu-dra pid {}", std::process::id());
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let mut last_holder = None;
    let mut mode: Option<(std::time::Instant, Option<String>)> = None;
    let mut this_node: Option<Node> = None;
    let _lock = loop {
        progress.beat();
        let stale = mode
            .as_ref()
            .is_none_or(|(read, _)| read.elapsed() >= Duration::from_secs(10));
        if stale {
            let node = retry(&progress, "cannot read this node", || async {
                nodes
                    .get(&config.node)
                    .await
                    .map_err(|e| ops_kit::Chain(&e).to_string())
            });
            let node = tokio::select! {
                n = node => n,
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            };
            let label = node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MODE_LABEL))
                .cloned();
            mode = Some((std::time::Instant::now(), label));
            this_node = Some(node);
        }
        let device_plugin = mode
            .as_ref()
            .is_some_and(|(_, l)| l.as_deref() == Some(MODE_DEVICE_PLUGIN));
        let wait = if device_plugin {
            mode = None;
            let s = format!(
                "node {} has {MODE_LABEL}={MODE_DEVICE_PLUGIN}: its GPUs are the device plugin's",
                config.node
            );
            tracing::warn!("{s}");
            set_state(s);
            Duration::from_secs(10)
        } else {
            match &config.owner_lock {
                None => break None,
                Some(path) => match OwnerLock::try_acquire(path, &who)? {
                    Ok(lock) => break Some(lock),
                    Err(holder) => {
                        let s = format!(
                            "waiting for the GPU owner lock {}: held by {holder}",
                            path.display()
                        );
                        if last_holder.as_ref() != Some(&holder) {
                            tracing::warn!("{s}");
                            last_holder = Some(holder);
                        }
                        set_state(s);
                        gpu_discovery::owner::POLL
                    }
                },
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    };

    // What the cluster keeps decides the mode.
    let probe = retry(&progress, "cannot probe the DRA API", || {
        dra_api::slices::probe_features(&client, &driver_name, &config.node)
    });
    let features = tokio::select! {
        f = probe => f,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let mode = decide(features, config.sharing, config.sriov, config.taints)?;
    tracing::info!(%features, ?mode, "DRA features of the cluster");

    let mut watch = WatcherConfig::new(config.discovery.clone());
    if let Some(port) = config.trust_uevent_port {
        watch = watch.trust_uevent_port(port);
    }
    let watcher = Arc::new(InventoryWatcher::spawn(watch).context("cannot start discovery")?);
    let _ = ops.watcher.set(Arc::clone(&watcher));
    let mut inventory = watcher.subscribe();
    let current: Current = Arc::new(RwLock::new(BTreeMap::new()));
    let gpus =
        Arc::new(GpuDriver::new(&config.node, Arc::clone(&current)).timed(Arc::clone(&progress)));
    let endpoint = config.plugin_dir.join("dra.sock");
    // The devices present, known before the service answers a prepare.
    let first = Arc::clone(&inventory.borrow_and_update());
    render(&first, &config, mode, &gpus, &current, &ops)?;
    let mut dra_config = DraConfig::new(
        driver_name.clone(),
        &endpoint,
        config.plugin_dir.join("prepared-claims.json"),
        GpuDriver::specs(&config.cdi_dir),
    );
    match read_boot_id(&config.boot_id_file) {
        Ok(id) => dra_config = dra_config.boot_id(id),
        Err(error) => {
            tracing::warn!(
                file = %config.boot_id_file.display(),
                %error,
                "cannot read the boot ID: a reboot cannot be told from a restart, so no recorded CDI spec is written back; each claim is prepared again in full"
            );
            // A boot no record was made in: nothing is trusted.
            dra_config = dra_config.boot_id(format!("unknown-{:016x}", fastrand::u64(..)));
        }
    }
    // The driver learns the record's claims inside `start`, before the
    // socket exists.
    let server = DraServer::start(
        dra_config,
        Arc::clone(&gpus),
        Arc::new(KubeClaims::new(client.clone())),
    )?;
    let events = node_events::NodeEvents::new(client.clone(), &config.node, "intel-gpu-dra");
    let node_uid = this_node
        .as_ref()
        .and_then(|n| n.metadata.uid.clone())
        .unwrap_or_default();
    // Reported in the background: a slow API server never holds up the
    // start (or the watchdog).
    report_start(server.start_report(), &ops, &events, &node_uid);
    tokio::spawn(follow_kubelet(
        nodes.clone(),
        config.node.clone(),
        this_node,
        Arc::clone(&ops),
        events.clone(),
    ));
    let mut prepared_rx = gpus.watch_prepared();

    // Again, with the prepared devices the checkpoint named.
    let (set, health) = render(&first, &config, mode, &gpus, &current, &ops)?;
    let publisher = SlicePublisher::start(
        client.clone(),
        PublisherConfig::new(driver_name.clone(), &config.node),
        set,
    );
    server.publish_health(health);
    let registrar = Registrar::start(
        RegistrarConfig::new(driver_name, &config.registry_dir, &endpoint)
            .extra_service(HEALTH_SERVICE),
    )?;
    let mut published = publisher.watch_status();
    let mut registered = registrar.watch_status();
    tracing::info!(endpoint = %endpoint.display(), "serving");
    // The loop wakes at least this often, so a quiet node is not a stuck
    // one.
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut hostile_seen = [0; 3];
    loop {
        progress.beat();
        ops.claims_refused
            .store(server.refused_claims(), Ordering::Relaxed);
        report_hostile(&mut hostile_seen, ops.hostile(), &events, &node_uid);
        let ready = matches!(*published.borrow(), PublishState::Published { .. })
            && matches!(
                *registered.borrow(),
                dra_api::RegistrationStatus::Registered
            );
        ops.ready.store(ready, Ordering::Relaxed);
        if !ready {
            set_state(format!(
                "slices: {:?}; registration: {:?}",
                *published.borrow(),
                *registered.borrow()
            ));
        }
        tokio::select! {
            changed = inventory.changed() => {
                if changed.is_err() { break; }
            }
            changed = prepared_rx.changed() => {
                if changed.is_err() { break; }
            }
            changed = published.changed() => {
                if changed.is_err() { bail!("the slice publisher stopped"); }
                continue;
            }
            changed = registered.changed() => {
                if changed.is_err() { bail!("the registrar stopped"); }
                continue;
            }
            _ = heartbeat.tick() => continue,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let inv = Arc::clone(&inventory.borrow_and_update());
        prepared_rx.borrow_and_update();
        match render(&inv, &config, mode, &gpus, &current, &ops) {
            Ok((set, health)) => {
                publisher.publish(set);
                server.publish_health(health);
            }
            Err(error) => {
                tracing::error!(%error, "the device set was refused; the last one stays published")
            }
        }
    }
    // The kubelet stops calling first; slices and the checkpoint stay.
    registrar.stop().await;
    server.stop().await;
    publisher.stop().await;
    Ok(())
}

/// Kubelet releases with a known defect of their DRA client: the issue and
/// what to do. Kubelets 1.34.0 and 1.34.1 stop talking to a DRA plugin
/// whose connection went idle (about 30 minutes without a call): the
/// next prepare fails until the kubelet restarts (kubernetes#133920,
/// fixed in 1.34.2 by re-dialling a connection that is not READY).
/// Suffixes of distributions (`v1.34.1+k3s1`, `-rc.0`) do not change the
/// release.
#[must_use]
pub fn kubelet_known_issue(version: &str) -> Option<(&'static str, &'static str)> {
    let release = version.trim_start_matches('v');
    let core = release.split(['+', '-']).next().unwrap_or_default();
    matches!(core, "1.34.0" | "1.34.1").then_some((
        "kubernetes#133920",
        "this kubelet drops its connection to DRA drivers after about 30 idle minutes and then fails to prepare claims until it is restarted (kubernetes#133920); upgrade the kubelet to 1.34.2 or later, or enable its ResourceHealthStatus feature gate so the health stream this driver serves keeps the connection in use",
    ))
}

/// Reads the boot ID (`/proc/sys/kernel/random/boot_id`), capped.
fn read_boot_id(file: &std::path::Path) -> anyhow::Result<String> {
    let (dir, name) = ops_kit::fs::split(file)?;
    let bytes = ops_kit::fs::read_capped(dir, name, 64)?;
    let id = String::from_utf8_lossy(&bytes).trim().to_owned();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        bail!("{} does not hold a boot ID", file.display());
    }
    Ok(id)
}

/// How often the Node's kubelet version is read again (a kubelet upgraded
/// in place keeps the driver running).
const KUBELET_CHECK: Duration = Duration::from_secs(600);

/// Follows the Node's `status.nodeInfo.kubeletVersion`: the metric follows
/// it, and a kubelet with a known DRA defect gets an Event when it is seen.
async fn follow_kubelet(
    nodes: kube::Api<Node>,
    node: String,
    mut seen: Option<Node>,
    ops: Arc<Ops>,
    events: node_events::NodeEvents,
) {
    let mut reported: Option<String> = None;
    loop {
        if let Some(n) = seen.take() {
            let uid = n.metadata.uid.clone().unwrap_or_default();
            let kubelet = n
                .status
                .and_then(|s| s.node_info)
                .map(|i| i.kubelet_version)
                .unwrap_or_default();
            let issue = kubelet_known_issue(&kubelet);
            *ops.kubelet_issue
                .write()
                .unwrap_or_else(PoisonError::into_inner) = issue.map(|(i, _)| i);
            match issue {
                Some((issue, advice)) if reported.as_deref() != Some(kubelet.as_str()) => {
                    tracing::error!(kubelet = %kubelet, issue, "{advice}");
                    events
                        .warn(
                            &uid,
                            "KubeletDraIdleConnection",
                            &format!("kubelet {kubelet}: {advice}"),
                        )
                        .await;
                    reported = Some(kubelet);
                }
                Some(_) => {}
                None => reported = None,
            }
        }
        tokio::time::sleep(KUBELET_CHECK).await;
        match nodes.get(&node).await {
            Ok(n) => seen = Some(n),
            Err(error) => tracing::debug!(%error, "cannot read this node's kubelet version; later"),
        }
    }
}

/// Reports what the framework did with the checkpoint and the CDI specs
/// at start: metrics, and an Event on the Node when it had to recover
/// (in the background).
fn report_start(
    report: &dra_api::StartReport,
    ops: &Ops,
    events: &node_events::NodeEvents,
    node_uid: &str,
) {
    ops.rebuilt
        .store(report.rebuilt.len() as u64, Ordering::Relaxed);
    ops.rewritten
        .store(report.rewritten.len() as u64, Ordering::Relaxed);
    ops.start_problems
        .store(report.problems.len() as u64, Ordering::Relaxed);
    if !report.recovered() {
        return;
    }
    let mut message = match &report.loaded {
        dra_api::checkpoint::Loaded::Corrupt { reason, aside } => format!(
            "the prepared-claims checkpoint was unreadable ({reason}) and was moved to {}; ",
            aside.display()
        ),
        dra_api::checkpoint::Loaded::Fresh => "the prepared-claims checkpoint was missing; ".into(),
        dra_api::checkpoint::Loaded::Read => String::new(),
    };
    message.push_str(&format!(
        "{} claim(s) rebuilt from their CDI specs, {} CDI spec(s) written again, ",
        report.rebuilt.len(),
        report.rewritten.len()
    ));
    if report.removed.is_empty() {
        message.push_str("nothing removed");
    } else {
        message.push_str(&format!(
            "{} spec(s) of claims never recorded removed ({})",
            report.removed.len(),
            report.removed.join(", ")
        ));
    }
    for p in &report.problems {
        message.push_str("; ");
        message.push_str(p);
    }
    // A lost record is worse news than specs a reboot took away.
    let reason = if report.rebuilt.is_empty() && report.loaded == dra_api::checkpoint::Loaded::Read
    {
        "CdiSpecsRewritten"
    } else {
        "PreparedClaimsRebuilt"
    };
    let (events, uid) = (events.clone(), node_uid.to_owned());
    tokio::spawn(async move { events.warn(&uid, reason, &message).await });
}

/// Publishes the inventory: the device set for the slices, the facts for
/// prepare, the health for the kubelet.
fn render(
    inventory: &Inventory,
    config: &RunConfig,
    mode: Mode,
    gpus: &GpuDriver,
    current: &Current,
    ops: &Ops,
) -> anyhow::Result<(dra_api::slices::DeviceSet, Vec<HealthEntry>)> {
    let prepared = gpus.prepared_devices();
    let out = publish(inventory, &config.discovery, mode, &prepared)?;
    for (device, why) in &out.withheld {
        tracing::debug!(device, reason = %why, "not published");
    }
    let health = out
        .set
        .devices()
        .iter()
        .map(|d| {
            // Published devices are unhealthy exactly when tainted.
            let bad = !d.taints().is_empty();
            HealthEntry {
                pool: config.node.clone(),
                device: d.name().to_owned(),
                health: if bad {
                    DeviceHealth::Unhealthy
                } else {
                    DeviceHealth::Healthy
                },
                message: d
                    .taints()
                    .first()
                    .map(|t| t.key.clone())
                    .unwrap_or_default(),
            }
        })
        .collect();
    ops.devices
        .store(out.set.devices().len() as u64, Ordering::Relaxed);
    ops.prepared.store(prepared.len() as u64, Ordering::Relaxed);
    *current.write().unwrap_or_else(PoisonError::into_inner) = out.facts;
    Ok((out.set, health))
}

#[cfg(test)]
mod tests {
    use super::kubelet_known_issue;
    use ops_http::Endpoints as _;

    #[test]
    fn healthz_fails_on_a_stuck_prepare_or_a_silent_loop() {
        let progress = ops_http::Progress::shared();
        progress.beat();
        let ops = super::Ops::new(
            std::sync::Arc::clone(&progress),
            super::Duration::from_millis(50),
        );
        assert_eq!(ops.live(), Ok(()));
        let stuck = progress.begin("a claim's prepare");
        std::thread::sleep(super::Duration::from_millis(80));
        let err = ops.live().unwrap_err();
        assert!(err.contains("a claim's prepare has been running"), "{err}");
        drop(stuck);
        let err = ops.live().unwrap_err();
        assert!(err.contains("no progress"), "{err}");
        progress.beat();
        assert_eq!(ops.live(), Ok(()));
    }

    #[test]
    fn kubelets_with_the_idle_connection_defect_are_named() {
        for (version, affected) in [
            ("v1.34.0", true),
            ("v1.34.1", true),
            ("v1.34.1+k3s1", true),
            ("v1.34.0-rc.1", true),
            ("1.34.1", true),
            ("v1.34.2", false),
            ("v1.34.10", false),
            ("v1.33.5", false),
            ("v1.35.0", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(
                kubelet_known_issue(version).is_some(),
                affected,
                "{version}"
            );
        }
        let (issue, advice) = kubelet_known_issue("v1.34.1").unwrap_or_default();
        assert_eq!(issue, "kubernetes#133920");
        assert!(advice.contains("1.34.2") && advice.contains("ResourceHealthStatus"));
    }
}
