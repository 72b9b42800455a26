//! The running plugin: follows the inventory, keeps CDI specs and resources
//! in step, answers the kubelet, serves health and metrics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use devplugin_api::cdi::SpecDir;
use devplugin_api::{
    AllocateRequest, ContainerAllocation, DeviceId, DeviceList, Framework, FrameworkConfig,
    Metrics, Plugin, PluginError, PluginOptions, PreferredRequest, RegistrationStatus,
    ResourceHandle, ResourceName,
};
use gpu_discovery::{DiscoveryConfig, Driver, Inventory, InventoryWatcher, WatcherConfig};
use ops_kit::prometheus::{Kind, Text};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cdi_keeper::{CdiKeeper, CdiStats};
use crate::plan::{self, Memory, Options, Plan, Policy, ResourceKind};
use crate::progress::Progress;
use crate::temps;
use ops_http as http;

/// How long the loop, a rescan or a blocking operation may go without
/// progress before `/healthz` fails (the liveness probe then restarts the
/// pod).
pub const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How long the loop waits for one round of hwmon reads; a read that
/// takes longer goes on alone, and no new round starts until it ends.
const TEMPS_TIMEOUT: Duration = Duration::from_secs(1);
/// The main loop beats at least this often.
const BEAT: Duration = Duration::from_secs(5);

/// Everything the plugin needs to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Discovery (roots, drivers, id filter).
    pub discovery: DiscoveryConfig,
    /// Plan options.
    pub options: Options,
    /// GetPreferredAllocation policy.
    pub policy: Policy,
    /// The kubelet directory.
    pub kubelet_dir: PathBuf,
    /// The CDI directory.
    pub cdi_dir: PathBuf,
    /// A test kernel's netlink port, if any (see `WatcherConfig`).
    pub trust_uevent_port: Option<u32>,
    /// How long a vanished card keeps its CDI spec.
    pub cdi_grace: Duration,
    /// How long without progress fails `/healthz` ([`STALL_LIMIT`]).
    pub stall_limit: Duration,
    /// Flags accepted and ignored (Go's and klog's, and unknown Go-style
    /// ones), for `/metrics`.
    pub ignored_flags: usize,
    /// The HTTP endpoint.
    pub http: Option<std::net::SocketAddr>,
    /// The node's GPU owner lock, shared with the DRA driver (one GPU,
    /// one owner): nothing is served until it is held.
    pub owner_lock: Option<PathBuf>,
}

type Shared = Arc<RwLock<Arc<Plan>>>;

/// One resource's allocation logic over the shared plan.
struct GpuPlugin {
    kind: ResourceKind,
    plan: Shared,
    options: Arc<Options>,
    policy: Policy,
}

impl Plugin for GpuPlugin {
    fn allocate(&self, request: &AllocateRequest) -> Result<ContainerAllocation, PluginError> {
        let plan = Arc::clone(&self.plan.read().unwrap_or_else(PoisonError::into_inner));
        let ids: Vec<&str> = request
            .device_ids
            .iter()
            .map(devplugin_api::DeviceId::as_str)
            .collect();
        plan::allocate(&plan, &self.kind, &ids, &self.options)
    }

    fn options(&self) -> PluginOptions {
        PluginOptions {
            preferred_allocation: matches!(self.kind, ResourceKind::Gpu(_)),
            pre_start_required: false,
        }
    }

    fn preferred_allocation(&self, r: &PreferredRequest) -> Result<Vec<DeviceId>, PluginError> {
        Ok(plan::prefer(
            self.policy,
            &r.available,
            &r.must_include,
            r.size,
        ))
    }
}

struct State {
    config: RunConfig,
    options: Arc<Options>,
    framework: Framework,
    cdi: CdiKeeper,
    progress: Arc<Progress>,
    /// The last temperature readings (for the plan, and for `/metrics`).
    readings: Arc<RwLock<BTreeMap<u32, temps::Reading>>>,
    /// A round of hwmon reads that outlived its wait (stuck in the kernel):
    /// none starts while it runs.
    stuck_read: Option<tokio::task::JoinHandle<BTreeMap<u32, temps::Reading>>>,
    memory: Memory,
    shared: Shared,
    handles: BTreeMap<ResourceName, ResourceHandle>,
    statuses: Arc<RwLock<BTreeMap<ResourceName, watch::Receiver<RegistrationStatus>>>>,
}

impl State {
    /// Reads temperatures off the async workers, under a timeout, without
    /// waking suspended GPUs.
    async fn read_temps(&mut self, inventory: &Arc<Inventory>) -> BTreeMap<u32, f64> {
        if self.options.temp_limit.is_none() {
            return BTreeMap::new();
        }
        if let Some(stuck) = &self.stuck_read {
            if !stuck.is_finished() {
                // Still stuck: no reading (hot cards stay hot), no wait.
                return BTreeMap::new();
            }
            self.stuck_read = None;
            tracing::info!("hwmon reads answer again");
        }
        let inv = Arc::clone(inventory);
        // The guard goes with the read: a read stuck in D state stays
        // counted (and fails /healthz) after the loop stopped waiting.
        let guard = self.progress.begin("reading hwmon temperatures");
        let mut task = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            temps::read(&inv)
        });
        let readings = match tokio::time::timeout(TEMPS_TIMEOUT, &mut task).await {
            Ok(Ok(r)) => r,
            Ok(Err(error)) => {
                tracing::warn!(%error, "the temperature reader failed");
                BTreeMap::new()
            }
            Err(_) => {
                tracing::warn!(timeout = ?TEMPS_TIMEOUT, "a hwmon read is stuck (a GPU in reset?); temperatures unknown until it returns");
                self.stuck_read = Some(task);
                BTreeMap::new()
            }
        };
        let celsius = temps::celsius(&readings);
        *self
            .readings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = readings;
        celsius
    }

    async fn reconcile(&mut self, inventory: &Arc<Inventory>) {
        let temps = self.read_temps(inventory).await;
        let mut plan = plan::plan(inventory, &self.options, &mut self.memory, &temps);
        // CDI specs first: a card's Allocate answer names its spec only
        // once the spec is on disk.
        self.cdi
            .sync(&mut plan, self.options.bypath, &self.progress)
            .await;
        // Health changes are logged once, when they happen.
        let previous = Arc::clone(&self.shared.read().unwrap_or_else(PoisonError::into_inner));
        for card in plan.cards.values() {
            let before = previous.cards.get(&card.index).map(|c| &c.why);
            match (&card.why, before) {
                (Some(why), Some(None) | None) => {
                    tracing::warn!(card = %card.name, reason = %why, "card is unhealthy")
                }
                (None, Some(Some(_))) => tracing::info!(card = %card.name, "card is healthy again"),
                _ => {}
            }
        }
        *self.shared.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(plan.clone());
        for (name, (kind, list)) in &plan.resources {
            match self.handles.get(name) {
                Some(handle) => handle.publish(list.clone()),
                None => {
                    let plugin = GpuPlugin {
                        kind: kind.clone(),
                        plan: Arc::clone(&self.shared),
                        options: Arc::clone(&self.options),
                        policy: self.config.policy,
                    };
                    match self
                        .framework
                        .serve(name.clone(), Arc::new(plugin), list.clone())
                    {
                        Ok(handle) => {
                            tracing::info!(resource = %name, devices = list.devices().len(), "resource appeared");
                            self.statuses
                                .write()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(name.clone(), handle.watch_status());
                            self.handles.insert(name.clone(), handle);
                        }
                        Err(error) => {
                            tracing::error!(resource = %name, %error, "cannot serve resource")
                        }
                    }
                }
            }
        }
        // A resource whose last GPU went stays registered with capacity 0.
        for (name, handle) in &self.handles {
            if !plan.resources.contains_key(name) {
                handle.publish(DeviceList::empty());
            }
        }
    }
}

struct Endpoints {
    metrics: Arc<Metrics>,
    statuses: Arc<RwLock<BTreeMap<ResourceName, watch::Receiver<RegistrationStatus>>>>,
    plan: Shared,
    cdi: Arc<CdiStats>,
    progress: Arc<Progress>,
    watcher: Arc<InventoryWatcher>,
    readings: Arc<RwLock<BTreeMap<u32, temps::Reading>>>,
    stall_limit: Duration,
    /// Set once the first inventory has been planned and served.
    started: Arc<std::sync::atomic::AtomicBool>,
    /// Who holds the node's GPU owner lock while this plugin waits for it.
    waiting_for: Arc<RwLock<Option<String>>>,
    ignored_flags: usize,
}

impl http::Endpoints for Endpoints {
    fn metrics(&self) -> String {
        let mut out = self.metrics.render("intel_gpu_plugin");
        let plan = Arc::clone(&self.plan.read().unwrap_or_else(PoisonError::into_inner));
        let healthy = plan
            .cards
            .values()
            .filter(|c| c.health == devplugin_api::Health::Healthy)
            .count();
        let mut text = Text::new();
        text.family(
            "intel_gpu_plugin_cards",
            Kind::Gauge,
            "GPUs advertised, by health.",
        )
        .sample("intel_gpu_plugin_cards", &[("health", "healthy")], healthy)
        .sample(
            "intel_gpu_plugin_cards",
            &[("health", "unhealthy")],
            plan.cards.len() - healthy,
        );
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "cdi_write_failures_total",
                Kind::Counter,
                "CDI spec writes that failed.",
                load(&self.cdi.write_failures),
            ),
            (
                "cdi_removal_failures_total",
                Kind::Counter,
                "CDI spec removals that failed.",
                load(&self.cdi.removal_failures),
            ),
            (
                "cdi_specs_missing",
                Kind::Gauge,
                "Advertised cards whose CDI spec is not on disk (their Allocate answers carry no CDI name).",
                load(&self.cdi.missing),
            ),
            (
                "planted_files_total",
                Kind::Counter,
                "Links or files planted where the plugin writes (its CDI specs), found and not followed.",
                ops_kit::fs::planted_total(),
            ),
            (
                "uevents_refused_total",
                Kind::Counter,
                "Netlink messages refused as uevents because they did not come from their real sender (the kernel's port 0, or udevd as root): forged uevents.",
                self.watcher.refused_uevents(),
            ),
            (
                "ignored_flags",
                Kind::Gauge,
                "Command-line flags accepted and ignored (the Go plugin's, klog's, unknown Go-style ones).",
                u64::try_from(self.ignored_flags).unwrap_or(u64::MAX),
            ),
        ] {
            text.single(&format!("intel_gpu_plugin_{name}"), kind, help, value);
        }
        text.single(
            "intel_gpu_plugin_longest_blocking_operation_seconds",
            Kind::Gauge,
            "How long the longest sysfs, hwmon or CDI operation running now has run (a read stuck in D state grows it; /healthz fails past --stall-limit-ms).",
            self.progress
                .longest_running()
                .max(self.watcher.scan_running_for().unwrap_or_default())
                .as_secs_f64(),
        );
        let readings = self.readings.read().unwrap_or_else(PoisonError::into_inner);
        if !readings.is_empty() {
            const TEMP: &str = "intel_gpu_plugin_temperature_celsius";
            text.family(
                TEMP,
                Kind::Gauge,
                "Hottest hwmon input per card (suspended cards are not read).",
            );
            for (card, r) in readings.iter() {
                if let temps::Reading::Celsius(c) = r {
                    text.sample(TEMP, &[("card", &format!("card{card}"))], c);
                }
            }
        }
        out.push_str(&text.finish());
        out
    }

    fn live(&self) -> Result<(), String> {
        self.progress.check(self.stall_limit)?;
        match self.watcher.scan_running_for() {
            Some(t) if t > self.stall_limit => Err(format!(
                "a sysfs rescan has been running for {} s",
                t.as_secs()
            )),
            _ => Ok(()),
        }
    }

    fn ready(&self) -> Result<(), String> {
        if let Some(holder) = self
            .waiting_for
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            return Err(format!(
                "waiting for the node's GPU owner lock, held by {holder}"
            ));
        }
        if !self.started.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("starting: the first inventory is not served yet".to_owned());
        }
        let statuses = self.statuses.read().unwrap_or_else(PoisonError::into_inner);
        let waiting: Vec<String> = statuses
            .iter()
            .filter(|(_, s)| !s.borrow().is_registered())
            .map(|(n, s)| format!("{n}: {:?}", *s.borrow()))
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting.join("; "))
        }
    }
}

/// Runs until SIGTERM or SIGINT; then removes the sockets and returns.
///
/// # Errors
/// When discovery cannot start or the HTTP address cannot be bound.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let watcher = Arc::new(
        InventoryWatcher::spawn(match config.trust_uevent_port {
            Some(port) => WatcherConfig::new(config.discovery.clone()).trust_uevent_port(port),
            None => WatcherConfig::new(config.discovery.clone()),
        })
        .context("cannot read the GPU inventory")?,
    );
    tracing::info!(sources = ?watcher.sources(), "following hotplug");
    let framework = Framework::new(FrameworkConfig::new(&config.kubelet_dir));
    // A killed instance may have served a resource this one will not
    // (its last card of that driver gone meanwhile): no orphaned socket.
    let every_resource: Vec<_> = Driver::ALL
        .into_iter()
        .flat_map(|d| [plan::resource_name(d), plan::monitoring_name(Some(d))])
        .chain([plan::monitoring_name(None)])
        .collect();
    framework.remove_stale_sockets(&every_resource).await;
    let shared: Shared = Arc::new(RwLock::new(Arc::new(Plan::default())));
    let statuses = Arc::new(RwLock::new(BTreeMap::new()));
    let cdi = CdiKeeper::new(
        SpecDir::new(&config.cdi_dir, plan::CDI_PREFIX),
        config.cdi_grace,
    );
    let progress = Progress::shared();
    progress.beat();
    let readings = Arc::new(RwLock::new(BTreeMap::new()));
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiting_for = Arc::new(RwLock::new(None));
    if let Some(addr) = config.http {
        let listener = http::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(address = %listener.local_addr().map_or(addr, |a| a), "serving /metrics, /healthz, /readyz");
        let endpoints = Endpoints {
            metrics: Arc::clone(framework.metrics()),
            statuses: Arc::clone(&statuses),
            plan: Arc::clone(&shared),
            cdi: cdi.stats(),
            progress: Arc::clone(&progress),
            watcher: Arc::clone(&watcher),
            readings: Arc::clone(&readings),
            stall_limit: config.stall_limit,
            started: Arc::clone(&started),
            waiting_for: Arc::clone(&waiting_for),
            ignored_flags: config.ignored_flags,
        };
        tokio::spawn(http::serve(listener, Arc::new(endpoints)));
    }
    // One GPU, one owner: nothing is registered until the node's owner
    // lock is ours. The endpoint is up meanwhile: alive (the watchdog is
    // fed), not ready, naming the holder.
    let _owner = match &config.owner_lock {
        Some(path) => {
            let who = format!("intel-gpu-plugin pid {}", std::process::id());
            loop {
                progress.beat();
                match gpu_discovery::owner::OwnerLock::try_acquire(path, &who)? {
                    Ok(lock) => {
                        *waiting_for.write().unwrap_or_else(PoisonError::into_inner) = None;
                        break Some(lock);
                    }
                    Err(holder) => {
                        let mut w = waiting_for.write().unwrap_or_else(PoisonError::into_inner);
                        if w.as_ref() != Some(&holder) {
                            tracing::warn!(lock = %path.display(), holder, "the node's GPUs are owned by another process; waiting");
                            *w = Some(holder);
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(gpu_discovery::owner::POLL) => {}
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
            }
        }
        None => None,
    };
    // The node's GPUs are ours now: a killed instance's temporaries go.
    cdi.remove_stale_temporaries();
    let mut state = State {
        options: Arc::new(config.options.clone()),
        cdi,
        progress: Arc::clone(&progress),
        readings,
        stuck_read: None,
        config,
        framework,
        memory: Memory::default(),
        shared,
        handles: BTreeMap::new(),
        statuses,
    };
    let mut inventory = watcher.subscribe();
    state.reconcile(&watcher.current()).await;
    started.store(true, std::sync::atomic::Ordering::Relaxed);
    let temp_every = Duration::from_secs(5);
    let mut temp_tick = tokio::time::interval(temp_every);
    temp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watch_temps = state.options.temp_limit.is_some();
    loop {
        progress.beat();
        // CDI retries and grace ends wake the loop by themselves.
        let cdi_due = state.cdi.next_deadline();
        let cdi_wait = async {
            match cdi_due {
                Some(t) => tokio::time::sleep_until(t.max(Instant::now())).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = inventory.changed() => {
                if changed.is_err() { break }
                let inv = Arc::clone(&inventory.borrow_and_update());
                state.reconcile(&inv).await;
            }
            _ = temp_tick.tick(), if watch_temps => {
                let inv = Arc::clone(&inventory.borrow());
                state.reconcile(&inv).await;
            }
            () = cdi_wait => {
                let inv = Arc::clone(&inventory.borrow());
                state.reconcile(&inv).await;
            }
            _ = beat.tick() => {}
        }
    }
    tracing::info!("stopping: removing sockets");
    let stops: Vec<_> = std::mem::take(&mut state.handles)
        .into_values()
        .map(|h| tokio::spawn(h.stop()))
        .collect();
    for stop in stops {
        let _ = stop.await;
    }
    Ok(())
}
