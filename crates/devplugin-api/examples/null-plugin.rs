//! The framework's front door: a device plugin for `N` devices that do
//! nothing.
//!
//! ```text
//! cargo run -p devplugin-api --example null-plugin -- \
//!     --kubelet-dir /var/lib/kubelet/device-plugins --resource example.com/null --count 4
//! ```
//!
//! It advertises `null-0 … null-(N-1)` as healthy, prefers allocations that
//! honour `must_include` (the framework's default), refuses unknown IDs with
//! `InvalidArgument` (the framework checks them before `allocate` runs), and
//! on SIGTERM or SIGINT removes its socket and exits 0.

use std::process::ExitCode;
use std::sync::Arc;

use devplugin_api::{
    AllocateRequest, ContainerAllocation, Device, DeviceId, DeviceList, Framework, FrameworkConfig,
    Plugin, PluginError, PluginOptions, ResourceName,
};
use tokio::signal::unix::{SignalKind, signal};

/// The whole allocation logic: tell the container which devices it got.
struct NullPlugin;

impl Plugin for NullPlugin {
    fn allocate(&self, request: &AllocateRequest) -> Result<ContainerAllocation, PluginError> {
        let ids: Vec<&str> = request.device_ids.iter().map(DeviceId::as_str).collect();
        let mut allocation = ContainerAllocation::default();
        allocation.envs.insert("NULL_DEVICES".into(), ids.join(","));
        Ok(allocation)
    }

    fn options(&self) -> PluginOptions {
        PluginOptions {
            preferred_allocation: true,
            pre_start_required: false,
        }
    }
}

struct Args {
    kubelet_dir: String,
    resource: String,
    count: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut resource, mut count) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--kubelet-dir" => dir = Some(value),
            "--resource" => resource = Some(value),
            "--count" => {
                count = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--count: {value:?} is not a number"))?,
                )
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(Args {
        kubelet_dir: dir.ok_or("--kubelet-dir is required")?,
        resource: resource.unwrap_or_else(|| "example.com/null".into()),
        count: count.unwrap_or(1),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "null-plugin: {e}\nusage: null-plugin --kubelet-dir DIR [--resource NAME] [--count N]"
            );
            return ExitCode::from(2);
        }
    };
    let built = ResourceName::new(&args.resource)
        .map_err(|e| e.to_string())
        .and_then(|name| {
            let ids =
                (0..args.count).map(|i| DeviceId::new(&format!("null-{i}")).map(Device::healthy));
            let devices = ids
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            Ok((name, DeviceList::new(devices).map_err(|e| e.to_string())?))
        });
    let (name, devices) = match built {
        Ok(b) => b,
        Err(e) => {
            eprintln!("null-plugin: {e}");
            return ExitCode::from(2);
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("null-plugin: cannot handle signals");
        return ExitCode::FAILURE;
    };

    let framework = Framework::new(FrameworkConfig::new(&args.kubelet_dir));
    let handle = match framework.serve(name, Arc::new(NullPlugin), devices) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("null-plugin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut status = handle.watch_status();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = status.changed() => {
                if changed.is_err() { break }
                println!("status: {:?}", *status.borrow_and_update());
            }
        }
    }
    handle.stop().await;
    println!("stopped; socket removed");
    ExitCode::SUCCESS
}
