//! `intel-gpu-labeler`: labels Kubernetes nodes that have Intel GPUs.

use clap::Parser;

/// Labels nodes that have Intel GPUs (`intelgpu=enabled` and the
/// `gpu.intel.com/*` discovery labels) when the cluster enables the GPU
/// plugin.
#[derive(Debug, Parser)]
#[command(name = "intel-gpu-labeler", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the node labeller is not built yet: only --version and --help work")
}
