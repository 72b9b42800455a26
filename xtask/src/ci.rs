//! `cargo xtask ci`: exactly what CI runs, one timed step after another.
//!
//! Every step runs even when an earlier one failed, so one run shows every
//! problem; the task fails when any step failed.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::util::{cargo, run, secs, succeeds};

/// The steps, in order, with what each checks.
pub(crate) const STEPS: &[(&str, &str)] = &[
    ("fmt", "cargo fmt --check"),
    ("codegen", "generated gRPC code is fresh"),
    ("clippy", "clippy on all targets, warnings denied"),
    (
        "test",
        "every test of the workspace, the grpcio interop tests included",
    ),
    ("tidy", "repository rules (xtask's own tests)"),
    ("demo", "cargo xtask demo exits 0 and reports every step"),
    (
        "soak",
        "cargo xtask soak --quick: every soak scenario, fewer times, meets every goal",
    ),
    (
        "manifests",
        "deploy/ renders, validates (each overlay from its oldest Kubernetes to 1.34), lints, and replaces StarlingX's plugin in place",
    ),
    (
        "image",
        "image assembly is deterministic, typed (oci-spec) and read back by skopeo",
    ),
    (
        "ansible",
        "the StarlingX role writes, renders and re-runs as a no-op",
    ),
    (
        "libudev",
        "gpu-discovery's optional libudev monitor builds, lints and opens",
    ),
    ("deny", "cargo deny: bans, licenses, sources"),
];

pub(crate) fn task(args: &[String]) -> Result<()> {
    let selected: Vec<&str> = if args.is_empty() {
        STEPS.iter().map(|(name, _)| *name).collect()
    } else {
        for a in args {
            if !STEPS.iter().any(|(name, _)| name == a) {
                let known: Vec<&str> = STEPS.iter().map(|(n, _)| *n).collect();
                bail!("unknown ci step `{a}`; the steps are {}", known.join(", "));
            }
        }
        args.iter().map(String::as_str).collect()
    };

    let total = Instant::now();
    let mut results: Vec<(&str, Duration, Result<()>)> = Vec::new();
    for step in selected {
        eprintln!("\n==> ci step `{step}`");
        let start = Instant::now();
        let outcome = run_step(step);
        let took = start.elapsed();
        match &outcome {
            Ok(()) => eprintln!("==> `{step}` passed in {}", secs(took)),
            Err(e) => eprintln!("==> `{step}` FAILED in {}: {e:#}", secs(took)),
        }
        results.push((step, took, outcome));
    }

    eprintln!("\nci summary:");
    for (step, took, outcome) in &results {
        let verdict = if outcome.is_ok() { "ok" } else { "FAILED" };
        eprintln!("  {step:<8} {verdict:<7} {:>8}", secs(*took));
    }
    eprintln!("  total            {:>8}", secs(total.elapsed()));
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, _, r)| r.is_err())
        .map(|(s, _, _)| *s)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("ci steps failed: {}", failed.join(", "))
    }
}

fn run_step(step: &str) -> Result<()> {
    match step {
        "fmt" => run(cargo().args(["fmt", "--all", "--", "--check"])).map(drop),
        "clippy" => run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
        .map(drop),
        "codegen" => crate::codegen::task(true),
        "test" => {
            // The interop tests need Python's grpcio; here they must run.
            let python = crate::deploy::venv()?.join("python");
            run(cargo()
                .args(["test", "--workspace", "--locked", "--exclude", "xtask"])
                .env("DEVPLUGIN_INTEROP_PYTHON", python)
                .env("INTEROP_REQUIRED", "1")
                // Snapshots are checked here, never rewritten.
                .env_remove("UPDATE_EXPECT"))
            .map(drop)
        }
        "tidy" => run(cargo()
            .args(["test", "--locked", "-p", "xtask"])
            .env_remove("UPDATE_EXPECT"))
        .map(drop),
        "demo" => crate::demo::check(),
        "soak" => crate::soak::task(None, true, None),
        "manifests" => crate::deploy::check_manifests(),
        "ansible" => crate::deploy::check_ansible(),
        "image" => {
            // skopeo, an independent OCI implementation, reads the archive.
            ensure_debian(
                &["skopeo"],
                "the image tests inspect the archive with it",
                &|| succeeds(std::process::Command::new("skopeo").arg("--version")),
            )?;
            run(cargo().args([
                "test", "--locked", "-p", "xtask", "--bin", "xtask", "image::",
            ]))
            .map(drop)
        }
        "libudev" => {
            ensure_libudev()?;
            let feature = ["-p", "gpu-discovery", "--features", "libudev"];
            run(cargo()
                .args(["clippy", "--locked", "--all-targets"])
                .args(feature)
                .args(["--", "-D", "warnings"]))?;
            run(cargo()
                .args(["test", "--locked", "--test", "hotplug"])
                .args(feature)
                .arg("libudev"))
            .map(drop)
        }
        "deny" => {
            ensure_cargo_deny()?;
            run(cargo().args(["deny", "--locked", "check", "bans", "licenses", "sources"]))
                .map(drop)
        }
        other => bail!("no such step `{other}`"),
    }
}

/// Installs Debian's `libudev-dev` when pkg-config cannot find libudev.
/// Installs Debian `packages` with apt-get when `found` says they are
/// missing and we run as root; otherwise says exactly what to install.
fn ensure_debian(packages: &[&str], why: &str, found: &dyn Fn() -> bool) -> Result<()> {
    if found() {
        return Ok(());
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let list = packages.join(" ");
    if !root {
        bail!("{list} missing ({why}): run `sudo apt-get install {list}`");
    }
    eprintln!("{list} missing ({why}): installing with apt-get");
    run(std::process::Command::new("apt-get").args(["update", "-qq"]))?;
    run(std::process::Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !found() {
        bail!("{list} was installed but is still not found");
    }
    Ok(())
}

fn ensure_libudev() -> Result<()> {
    ensure_debian(
        &["libudev-dev", "pkg-config"],
        "needed to build the `libudev` feature",
        &|| succeeds(std::process::Command::new("pkg-config").args(["--exists", "libudev"])),
    )
}

/// Installs `cargo-deny` from crates.io when `cargo deny` does not run.
fn ensure_cargo_deny() -> Result<()> {
    if succeeds(cargo().args(["deny", "--version"])) {
        return Ok(());
    }
    eprintln!("cargo-deny is missing: installing it from crates.io (a few minutes, once)");
    run(cargo().args(["install", "--locked", "cargo-deny"]))?;
    Ok(())
}
