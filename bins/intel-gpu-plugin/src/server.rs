//! The running plugin: follows the inventory, keeps CDI specs and resources
//! in step, answers the kubelet, serves health and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use devplugin_api::cdi::SpecDir;
use devplugin_api::{
    AllocateRequest, ContainerAllocation, DeviceList, Framework, FrameworkConfig, Metrics, Plugin,
    PluginError, PluginOptions, PreferredRequest, RegistrationStatus, ResourceHandle, ResourceName,
};
use gpu_discovery::{DiscoveryConfig, Inventory, InventoryWatcher, WatcherConfig};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::plan::{self, Memory, Options, Plan, Policy, ResourceKind};
use ops_http as http;

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
    /// The HTTP endpoint.
    pub http: Option<std::net::SocketAddr>,
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

    fn preferred_allocation(&self, r: &PreferredRequest) -> Result<Vec<String>, PluginError> {
        Ok(plan::prefer(
            self.policy,
            &r.available,
            &r.must_include,
            r.size,
        ))
    }
}

/// Reads each card's hottest hwmon input, in °C.
fn temperatures(inventory: &Inventory) -> BTreeMap<u32, f64> {
    let mut out = BTreeMap::new();
    for gpu in &inventory.gpus {
        let hottest = gpu
            .temperature_inputs
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<f64>().ok())
            .map(|m| m / 1000.0)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });
        if let Some(t) = hottest {
            out.insert(gpu.index, t);
        }
    }
    out
}

struct State {
    config: RunConfig,
    options: Arc<Options>,
    framework: Framework,
    cdi: SpecDir,
    /// The CDI specs this process wrote, by file name.
    written: BTreeMap<String, devplugin_api::cdi::Spec>,
    memory: Memory,
    shared: Shared,
    handles: BTreeMap<ResourceName, ResourceHandle>,
    statuses: Arc<RwLock<BTreeMap<ResourceName, watch::Receiver<RegistrationStatus>>>>,
}

impl State {
    fn reconcile(&mut self, inventory: &Inventory) {
        let temps = if self.options.temp_limit.is_some() {
            temperatures(inventory)
        } else {
            BTreeMap::new()
        };
        let plan = plan::plan(inventory, &self.options, &mut self.memory, &temps);
        // CDI specs first: a card is never advertised before its spec exists.
        // Only specs that differ from what this process last wrote, or that
        // someone removed, are written (the temperature tick re-plans every
        // 5 s: a stat per card instead of a read).
        let mut keep = BTreeSet::new();
        for card in plan.cards.values() {
            let name = plan::cdi_file_name(card);
            let spec = plan::cdi_spec(card, self.options.bypath);
            if self.written.get(&name) != Some(&spec) || !self.cdi.dir().join(&name).exists() {
                match self.cdi.write(&name, &spec) {
                    Ok(wrote) => {
                        if wrote {
                            tracing::info!(card = %card.name, "CDI spec written");
                        }
                        self.written.insert(name.clone(), spec);
                    }
                    Err(error) => {
                        tracing::error!(card = %card.name, error = %chain(&error), "could not write the CDI spec")
                    }
                }
            }
            keep.insert(name);
        }
        self.written.retain(|name, _| keep.contains(name));
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
        match self.cdi.retain(&keep) {
            Ok(removed) => {
                for name in removed {
                    tracing::info!(spec = %name, "CDI spec removed");
                }
            }
            Err(error) => tracing::error!(error = %chain(&error), "could not clean up CDI specs"),
        }
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut src = error.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

struct Endpoints {
    metrics: Arc<Metrics>,
    statuses: Arc<RwLock<BTreeMap<ResourceName, watch::Receiver<RegistrationStatus>>>>,
    plan: Shared,
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
        out.push_str("# HELP intel_gpu_plugin_cards GPUs advertised, by health.\n# TYPE intel_gpu_plugin_cards gauge\n");
        out.push_str(&format!(
            "intel_gpu_plugin_cards{{health=\"healthy\"}} {healthy}\n"
        ));
        out.push_str(&format!(
            "intel_gpu_plugin_cards{{health=\"unhealthy\"}} {}\n",
            plan.cards.len() - healthy
        ));
        out
    }

    fn ready(&self) -> Result<(), String> {
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
    let watcher = InventoryWatcher::spawn(WatcherConfig::new(config.discovery.clone()))
        .context("cannot read the GPU inventory")?;
    tracing::info!(sources = ?watcher.sources(), "following hotplug");
    let framework = Framework::new(FrameworkConfig::new(&config.kubelet_dir));
    let shared: Shared = Arc::new(RwLock::new(Arc::new(Plan::default())));
    let statuses = Arc::new(RwLock::new(BTreeMap::new()));
    if let Some(addr) = config.http {
        let listener = http::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(address = %listener.local_addr().map_or(addr, |a| a), "serving /metrics, /healthz, /readyz");
        let endpoints = Endpoints {
            metrics: Arc::clone(framework.metrics()),
            statuses: Arc::clone(&statuses),
            plan: Arc::clone(&shared),
        };
        tokio::spawn(http::serve(listener, Arc::new(endpoints)));
    }
    let mut state = State {
        options: Arc::new(config.options.clone()),
        cdi: SpecDir::new(&config.cdi_dir, plan::CDI_PREFIX),
        written: BTreeMap::new(),
        config,
        framework,
        memory: Memory::default(),
        shared,
        handles: BTreeMap::new(),
        statuses,
    };
    let mut inventory = watcher.subscribe();
    state.reconcile(&watcher.current());
    let temp_every = Duration::from_secs(5);
    let mut temp_tick = tokio::time::interval(temp_every);
    temp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watch_temps = state.options.temp_limit.is_some();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = inventory.changed() => {
                if changed.is_err() { break }
                let inv = Arc::clone(&inventory.borrow_and_update());
                state.reconcile(&inv);
            }
            _ = temp_tick.tick(), if watch_temps => {
                let inv = Arc::clone(&inventory.borrow());
                state.reconcile(&inv);
            }
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
