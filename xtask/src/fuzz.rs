//! `cargo xtask fuzz [CRATE/TARGET] [--seconds N]`: runs a `cargo fuzz`
//! target with the nightly toolchain (opt-in, not part of CI), seeded from
//! `crates/<crate>/fuzz/corpus/<target>` (which a stable test of the crate
//! replays in CI) and growing a work corpus under `target/fuzz-corpus/`.
//! Without a target it lists them.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::util::{cargo, project_root, run, succeeds};

/// Every `crates/<crate>/fuzz/fuzz_targets/<target>.rs`, as
/// `(crate, target)`.
pub(crate) fn targets() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let crates = project_root().join("crates");
    for entry in std::fs::read_dir(&crates)
        .with_context(|| format!("could not list {}", crates.display()))?
    {
        let krate = entry?.path();
        let dir = krate.join("fuzz/fuzz_targets");
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for file in files {
            let path = file?.path();
            if path.extension().is_some_and(|e| e == "rs") {
                let name = |p: &std::path::Path| {
                    p.file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                };
                let krate_name = krate
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                out.push((krate_name, name(&path)));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn task(target: Option<&str>, seconds: u64) -> Result<()> {
    let all = targets()?;
    let Some(target) = target else {
        println!("fuzz targets (run one with `cargo xtask fuzz CRATE/TARGET [--seconds N]`):");
        for (k, t) in &all {
            println!("  {k}/{t}");
        }
        return Ok(());
    };
    let Some((krate, name)) = all.iter().find(|(k, t)| format!("{k}/{t}") == target) else {
        bail!("no fuzz target `{target}`; run `cargo xtask fuzz` to list them");
    };
    if !succeeds(std::process::Command::new("rustup").args([
        "run",
        "nightly",
        "rustc",
        "--version",
    ])) {
        bail!("cargo fuzz needs a nightly toolchain: `rustup toolchain install nightly`");
    }
    if !succeeds(cargo().args(["fuzz", "--version"])) {
        eprintln!("cargo-fuzz is missing: installing it from crates.io");
        run(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let fuzz_dir: PathBuf = project_root().join("crates").join(krate).join("fuzz");
    // New inputs go to a work corpus under target/; the checked-in seeds
    // (replayed by a stable test) are read, never grown by a run.
    let seeds = fuzz_dir.join("corpus").join(name);
    let work = project_root()
        .join("target/fuzz-corpus")
        .join(krate)
        .join(name);
    std::fs::create_dir_all(&work)
        .with_context(|| format!("could not create {}", work.display()))?;
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(&fuzz_dir)
        .args(["+nightly", "fuzz", "run", name])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"));
    run(&mut cmd)?;
    println!(
        "fuzzed {target} for {seconds}s; new inputs are in {} (copy the interesting ones to {})",
        work.display(),
        seeds.display()
    );
    Ok(())
}
