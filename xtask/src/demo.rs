//! `cargo xtask demo [--keep]`: builds the real binaries and the demo
//! driver, then runs the whole system on a simulated StarlingX edge node.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{cargo, run, target_dir};

/// The lines a passing demo prints.
pub(crate) const STEPS: usize = 7;
pub(crate) const ALL_HELD: &str = "demo: all 7 steps held";

/// What `cargo` builds for the demo: never `-q`, so a cold build shows
/// its progress.
const BUILD_ARGS: &[&str] = &[
    "build",
    "--locked",
    "-p",
    "intel-gpu-plugin",
    "-p",
    "intel-gpu-labeler",
    "-p",
    "intel-gpu-dra",
    "-p",
    "demo",
];

/// Builds what the demo runs and returns the command that runs it.
pub(crate) fn command(keep: bool) -> Result<Command> {
    // A cold build takes minutes: say so, and let cargo show its progress.
    eprintln!(
        "demo: building the plugin, the labeller, the DRA driver and the demo driver (a first build takes about 2 minutes on 2 cores; cargo's progress follows)"
    );
    run(cargo().args(BUILD_ARGS)).context("could not build the demo")?;
    let bin = target_dir().join("debug");
    let mut cmd = Command::new(bin.join("demo"));
    cmd.arg("--plugin")
        .arg(bin.join("intel-gpu-plugin"))
        .arg("--labeler")
        .arg(bin.join("intel-gpu-labeler"))
        .arg("--dra")
        .arg(bin.join("intel-gpu-dra"));
    if keep {
        cmd.arg("--keep");
    }
    Ok(cmd)
}

pub(crate) fn task(keep: bool) -> Result<()> {
    let status = command(keep)?
        .status()
        .context("could not start the demo")?;
    if !status.success() {
        bail!("the demo failed ({status}); the step that did not hold is named above");
    }
    Ok(())
}

/// The CI check: the demo exits 0 and prints every step's summary line.
pub(crate) fn check() -> Result<()> {
    let out = command(false)?
        .output()
        .context("could not start the demo")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the demo exited with {}", out.status);
    }
    for n in 1..=STEPS {
        let prefix = format!("demo: step {n} ");
        if !text
            .lines()
            .any(|l| l.starts_with(&prefix) && l.ends_with(": ok"))
        {
            bail!("the demo did not report step {n} as ok");
        }
    }
    if !text.lines().any(|l| l == ALL_HELD) {
        bail!("the demo did not print `{ALL_HELD}`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_build_is_not_silent() {
        assert!(
            !super::BUILD_ARGS
                .iter()
                .any(|a| *a == "-q" || *a == "--quiet")
        );
    }
}
