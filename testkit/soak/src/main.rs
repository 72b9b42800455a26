//! The soak driver behind `cargo xtask soak`: the real release binaries
//! against the kubelet and API-server emulators on fake nodes, for
//! thousands of kubelet restarts, hotplug events, API faults and kill -9s.
//! Four parts, each reporting figures (as `bench-report` parts) and every
//! failure it saw, with the seed that replays the run:
//!
//! - `plugin`: kubelet restarts, dropped streams, absences, old versions;
//! - `hotplug`: uevent storms on a fake node (needs a hermetic user+net
//!   namespace to inject uevents; the driver re-runs itself in one);
//! - `labeler`: a compressed hour of cluster life with API faults;
//! - `crash`: kill -9 of both binaries at random points.
//!
//! `soak --plugin PATH --labeler PATH --out DIR [--seed N] [--quick]
//! [--duration D] [--part NAME]…`. Exits 0 when no failure was seen, 1
//! otherwise (the goals on the figures are judged by the xtask).

mod crash;
mod hotplug;
mod labeler;
mod plugin;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bench_report::Report;

/// Set in the environment of the driver re-run inside a namespace.
const CHILD_ENV: &str = "SOAK_HERMETIC_CHILD";

/// What the run is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) plugin: PathBuf,
    pub(crate) labeler: PathBuf,
    /// Where parts and logs go.
    pub(crate) out: PathBuf,
    pub(crate) seed: u64,
    /// The CI size: the same scenarios, fewer of them, shorter pauses.
    pub(crate) quick: bool,
    /// The cluster time the labeller part compresses (an hour by default).
    pub(crate) duration: Duration,
    pub(crate) parts: Vec<String>,
}

const PARTS: [&str; 4] = ["plugin", "hotplug", "labeler", "crash"];

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .with_context(|| format!("--duration {s:?}: not a number"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => bail!("--duration {s:?}: unknown unit {other:?} (ms, s, m, h)"),
    })
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        plugin: PathBuf::new(),
        labeler: PathBuf::new(),
        out: PathBuf::from("target/soak"),
        seed: fastrand::u64(..),
        quick: false,
        duration: Duration::from_secs(3600),
        parts: Vec::new(),
    };
    let mut duration = None;
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--plugin" => o.plugin = value("--plugin")?.into(),
            "--labeler" => o.labeler = value("--labeler")?.into(),
            "--out" => o.out = value("--out")?.into(),
            "--seed" => {
                let v = value("--seed")?;
                o.seed = v
                    .parse()
                    .with_context(|| format!("--seed {v:?} is not a number"))?;
            }
            "--quick" => o.quick = true,
            "--duration" => duration = Some(parse_duration(&value("--duration")?)?),
            "--part" => {
                let p = value("--part")?;
                if !PARTS.contains(&p.as_str()) {
                    bail!("--part {p:?}: one of {}", PARTS.join(", "));
                }
                o.parts.push(p);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.plugin.as_os_str().is_empty() || o.labeler.as_os_str().is_empty() {
        bail!("--plugin PATH and --labeler PATH are required");
    }
    o.duration = duration.unwrap_or(if o.quick {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(3600)
    });
    if o.parts.is_empty() {
        o.parts = PARTS.iter().map(|p| (*p).to_owned()).collect();
    }
    Ok(o)
}

/// Runs one part, writes its figures, returns its failures.
async fn run_part(o: &Opts, part: &str) -> anyhow::Result<Vec<String>> {
    let mut report = Report::new(&format!("soak_{part}"));
    let mut failures = Vec::new();
    let started = std::time::Instant::now();
    println!("\n== soak part {part} (seed {})", o.seed);
    let result = match part {
        "plugin" => plugin::run(o, &mut report, &mut failures).await,
        "hotplug" if std::env::var_os(CHILD_ENV).is_some() => {
            hotplug::run(o, &mut report, &mut failures).await
        }
        "hotplug" => return hermetic_hotplug(o),
        "labeler" => labeler::run(o, &mut report, &mut failures).await,
        "crash" => crash::run(o, &mut report, &mut failures).await,
        other => bail!("no part {other}"),
    };
    if let Err(e) = result {
        failures.push(format!("{part}: could not run: {e:#}"));
    }
    println!(
        "== soak part {part}: {} failures in {:.1} s",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    report
        .write_to(&o.out.join("parts"))
        .with_context(|| format!("cannot write the {part} part"))?;
    Ok(failures)
}

/// The hotplug part needs to inject uevents: it runs in a hermetic
/// user+net namespace (the driver again, with only that part). Where such
/// namespaces are not permitted, its figures are reported as skipped.
fn hermetic_hotplug(o: &Opts) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the soak driver")?;
    let seed = o.seed.to_string();
    let duration = format!("{}ms", o.duration.as_millis());
    let (plugin, labeler, out) = (
        o.plugin.to_string_lossy().into_owned(),
        o.labeler.to_string_lossy().into_owned(),
        o.out.to_string_lossy().into_owned(),
    );
    let mut args = vec![
        "--plugin",
        &plugin,
        "--labeler",
        &labeler,
        "--out",
        &out,
        "--seed",
        &seed,
        "--duration",
        &duration,
        "--part",
        "hotplug",
    ];
    if o.quick {
        args.push("--quick");
    }
    match fake_gpu_node::run_hermetic(&exe, &args, (CHILD_ENV, "1")) {
        Ok(output) => {
            print!("{}", String::from_utf8_lossy(&output.stdout));
            eprint!("{}", String::from_utf8_lossy(&output.stderr));
            if output.status.success() {
                Ok(Vec::new())
            } else {
                Ok(vec![format!(
                    "hotplug: the namespaced run failed ({})",
                    output.status
                )])
            }
        }
        Err(reason) => {
            let mut report = Report::new("soak_hotplug");
            for name in hotplug::FIGURES {
                report.skip(
                    name,
                    &format!("uevent injection needs a hermetic namespace: {reason}"),
                );
            }
            report.write_to(&o.out.join("parts"))?;
            Ok(Vec::new())
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(o.out.join("parts")) {
        eprintln!("soak: cannot create {}: {e}", o.out.display());
        return ExitCode::FAILURE;
    }
    let mut failures = Vec::new();
    for part in &o.parts {
        match run_part(&o, part).await {
            Ok(f) => failures.extend(f),
            Err(e) => failures.push(format!("{part}: {e:#}")),
        }
    }
    if failures.is_empty() {
        println!("\nsoak: no failure (seed {})", o.seed);
        return ExitCode::SUCCESS;
    }
    println!("\nsoak: {} failures:", failures.len());
    for f in failures.iter().take(50) {
        println!("  {f}");
    }
    if failures.len() > 50 {
        println!("  … and {} more", failures.len() - 50);
    }
    println!(
        "soak: replay with `cargo xtask soak --seed {}{}`",
        o.seed,
        if o.quick { " --quick" } else { "" }
    );
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("42").unwrap(), Duration::from_secs(42));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("m").is_err());
    }
}
