//! `cargo xtask soak [--duration D] [--quick] [--seed N]`: builds the
//! release binaries and the soak driver (`testkit/soak`), runs it, merges
//! its parts into `target/soak/report.json` and prints a table that judges
//! each figure against the goals of the soak issue. Fails when the driver
//! saw a failure or a goal is missed, naming the seed that replays the
//! run. `--quick` is the CI size (under a minute once built).

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{Goal, merge, missed, render_table};
use crate::util::{cargo, run, target_dir};

/// The soak's goals. The sizes differ between a full and a quick run;
/// what must never happen is the same.
pub(crate) fn goals(quick: bool) -> Vec<(&'static str, Goal)> {
    let (restarts, events, kills) = if quick {
        (40.0, 500.0, 20.0)
    } else {
        (1000.0, 10_000.0, 200.0)
    };
    let mut goals = vec![
        ("soak.plugin.restarts_survived", Goal::AtLeast(restarts)),
        ("soak.plugin.reregister_ms_p99", Goal::AtMost(100.0)),
        ("soak.plugin.fd_growth", Goal::AtMost(0.0)),
        ("soak.hotplug.events", Goal::AtLeast(events)),
        ("soak.hotplug.mismatches", Goal::AtMost(0.0)),
        ("soak.hotplug.time_to_truth_ms_p99", Goal::AtMost(25.0)),
        ("soak.labeler.foreign_changes", Goal::AtMost(0.0)),
        ("soak.labeler.nodes_recreated", Goal::AtMost(0.0)),
        (
            "soak.labeler.plugin_label_removed_while_unknown",
            Goal::AtMost(0.0),
        ),
        ("soak.labeler.convergence_s_p99", Goal::AtMost(5.0)),
        ("soak.crash.kills", Goal::AtLeast(kills)),
        ("soak.crash.inconsistent_states", Goal::AtMost(0.0)),
    ];
    // Memory is judged after a warm-up of a hundred restarts; forty are
    // all warm-up (the allocator and the buffers still fill: +300 KiB over
    // the first thirty, then flat), so a quick run only reports it.
    if !quick {
        goals.push(("soak.plugin.rss_growth_pct", Goal::AtMost(1.0)));
    }
    goals
}

pub(crate) fn task(duration: Option<&str>, quick: bool, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(|| fastrand::u64(..));
    eprintln!(
        "soak: building the release plugin, labeller and soak driver (a first build takes about 4 minutes on 2 cores)"
    );
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "intel-gpu-plugin",
        "-p",
        "intel-gpu-labeler",
        "-p",
        "soak",
    ]))
    .context("could not build the soak")?;
    let out = target_dir().join("soak");
    let parts_dir = out.join("parts");
    // Every run starts clean: parts, logs and samples are this run's.
    if out.exists() {
        std::fs::remove_dir_all(&out)
            .with_context(|| format!("could not clear {}", out.display()))?;
    }
    std::fs::create_dir_all(&parts_dir)
        .with_context(|| format!("could not create {}", parts_dir.display()))?;
    let bin = target_dir().join("release");
    let mut cmd = Command::new(bin.join("soak"));
    cmd.arg("--plugin")
        .arg(bin.join("intel-gpu-plugin"))
        .arg("--labeler")
        .arg(bin.join("intel-gpu-labeler"))
        .arg("--out")
        .arg(&out)
        .args(["--seed", &seed.to_string()]);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(d) = duration {
        cmd.args(["--duration", d]);
    }
    let status = cmd.status().context("could not start the soak driver")?;

    let parts = crate::bench::read_parts(&parts_dir)?;
    let report = merge(parts)?;
    let json = serde_json::json!({
        "seed": seed,
        "quick": quick,
        "metrics": report.metrics,
        "skipped": report.skipped,
    });
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("could not write {}", path.display()))?;
    let goals = goals(quick);
    println!("{}", render_table(&report, &goals));
    println!("report written to {}", path.display());
    let missed = missed(&report, &goals);
    let replay = format!(
        "cargo xtask soak --seed {seed}{}{}",
        if quick { " --quick" } else { "" },
        duration
            .map(|d| format!(" --duration {d}"))
            .unwrap_or_default()
    );
    if !status.success() || !missed.is_empty() {
        for m in &missed {
            eprintln!("soak: goal missed: {m}");
        }
        bail!("the soak failed ({status}); replay it with `{replay}`");
    }
    println!("soak: every goal met (seed {seed})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_goal_names_a_soak_figure_and_the_sizes_differ() {
        let full = goals(false);
        let quick = goals(true);
        assert_eq!(full.len(), quick.len() + 1, "memory growth: full runs only");
        assert!(full.iter().all(|(n, _)| n.starts_with("soak.")));
        assert!(full.contains(&("soak.plugin.restarts_survived", Goal::AtLeast(1000.0))));
        assert!(full.contains(&("soak.hotplug.events", Goal::AtLeast(10_000.0))));
        assert!(quick.contains(&("soak.crash.inconsistent_states", Goal::AtMost(0.0))));
    }
}
