//! `null-dra`: the example DRA driver built on `dra-api`, as a plugin
//! author would write one. It offers N fake devices (`null-0` …), publishes
//! them as ResourceSlices of its node, and prepares a claim by writing one
//! CDI spec for it (an environment variable per device) and answering its
//! CDI device names; unpreparing removes the spec.
//!
//! ```text
//! null-dra --node-name NODE [--devices N] [--driver-name NAME]
//!          [--kubeconfig FILE] [--registry-dir DIR] [--plugin-dir DIR]
//!          [--cdi-dir DIR]
//! ```
//!
//! Defaults are a node's: `/var/lib/kubelet/plugins_registry`,
//! `/var/lib/kubelet/plugins/<driver>`, `/var/run/cdi`, in-cluster
//! credentials. SIGTERM or SIGINT: the registration socket goes first
//! (the kubelet stops calling), then the service; slices and the
//! checkpoint stay.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use dra_api::cdi::ClaimSpecs;
use dra_api::slices::{Attribute, DeviceSet, PublisherConfig, SliceDevice, SlicePublisher};
use dra_api::{
    Allocated, ClaimRef, DevicePrepared, DraConfig, DraServer, Driver, DriverError, DriverName,
    KubeClaims, PreparedClaim, Registrar, RegistrarConfig,
};
use kubelet_plumbing::cdi::ContainerEdits;

/// The CDI kind of the fake devices.
const CDI_KIND: &str = "example.com/null";

struct Args {
    node: String,
    devices: usize,
    driver: String,
    kubeconfig: Option<PathBuf>,
    registry_dir: PathBuf,
    plugin_dir: Option<PathBuf>,
    cdi_dir: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        node: String::new(),
        devices: 4,
        driver: "null.example.com".into(),
        kubeconfig: None,
        registry_dir: PathBuf::from(dra_api::REGISTRY_DIR),
        plugin_dir: None,
        cdi_dir: PathBuf::from("/var/run/cdi"), // tidy: allow-host-path
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--node-name" => a.node = value()?,
            "--devices" => {
                let v = value()?;
                a.devices = v
                    .parse()
                    .with_context(|| format!("--devices {v:?} is not a number"))?;
            }
            "--driver-name" => a.driver = value()?,
            "--kubeconfig" => a.kubeconfig = Some(value()?.into()),
            "--registry-dir" => a.registry_dir = value()?.into(),
            "--plugin-dir" => a.plugin_dir = Some(value()?.into()),
            "--cdi-dir" => a.cdi_dir = value()?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    if a.node.is_empty() {
        bail!("--node-name is required");
    }
    Ok(a)
}

/// Prepares a claim: an environment variable per allocated device; the
/// framework writes the claim's CDI spec.
struct Null;

impl Driver for Null {
    fn prepare(
        &self,
        _claim: &ClaimRef,
        devices: &[Allocated],
    ) -> Result<Vec<DevicePrepared>, DriverError> {
        Ok(devices
            .iter()
            .map(|d| DevicePrepared {
                requests: vec![d.request.clone()],
                pool: d.pool.clone(),
                device: d.device.clone(),
                edits: ContainerEdits {
                    env: vec![format!(
                        "NULL_DEVICE_{}=1",
                        d.device.replace('-', "_").to_uppercase()
                    )],
                    ..ContainerEdits::default()
                },
            })
            .collect())
    }

    fn unprepare(&self, _claim: &ClaimRef, _: Option<&PreparedClaim>) -> Result<(), DriverError> {
        // Nothing of its own to undo: the framework removes the spec.
        Ok(())
    }
}

async fn run(a: Args) -> anyhow::Result<()> {
    let driver = DriverName::new(&a.driver)?;
    let plugin_dir = a
        .plugin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/kubelet/plugins").join(driver.as_str())); // tidy: allow-host-path
    let client = dra_api::kube_client(a.kubeconfig.as_deref()).await?;
    let devices = DeviceSet::new(
        (0..a.devices)
            .map(|i| {
                SliceDevice::new(&format!("null-{i}")).map(|d| {
                    d.attribute(
                        "index",
                        Attribute::Int(i64::try_from(i).unwrap_or(i64::MAX)),
                    )
                    .attribute("model", Attribute::String("null".into()))
                })
            })
            .collect::<Result<_, _>>()?,
    )?;
    let publisher = SlicePublisher::start(
        client.clone(),
        PublisherConfig::new(driver.clone(), &a.node),
        devices,
    );
    let endpoint = plugin_dir.join("dra.sock");
    // The framework brings the checkpoint and the CDI specs in step at
    // start: specs written again after a reboot, specs of claims never
    // recorded removed, a lost record rebuilt from the specs.
    let cdi = ClaimSpecs::new(&a.cdi_dir, CDI_KIND, &format!("{driver}-claim_"));
    let server = DraServer::start(
        DraConfig::new(
            driver.clone(),
            &endpoint,
            plugin_dir.join("prepared-claims.json"),
            cdi,
        ),
        Arc::new(Null),
        Arc::new(KubeClaims::new(client)),
    )?;
    let registrar = Registrar::start(RegistrarConfig::new(driver, &a.registry_dir, &endpoint))?;
    tracing::info!(endpoint = %endpoint.display(), "serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    registrar.stop().await;
    server.stop().await;
    publisher.stop().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("null-dra: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(a).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("null-dra: {e:#}");
            ExitCode::FAILURE
        }
    }
}
