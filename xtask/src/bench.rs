//! `cargo xtask bench`: runs every benchmark target and merges their parts
//! into `target/bench/report.json` (`{"metrics": {...}, "skipped": {...}}`),
//! then prints a table that judges each figure against its goal.
//!
//! Benchmarks are `[[bench]]` targets with `harness = false` that report
//! through the `bench-report` crate. Extra arguments are passed to
//! `cargo bench` (e.g. `-p gpu-discovery`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use bench_report::{Part, REPORT_DIR_ENV};

use crate::util::{cargo, project_root, run};

/// What a figure is judged against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Goal {
    /// The figure must not exceed this absolute value.
    AtMost(f64),
    /// The figure must reach at least this absolute value.
    AtLeast(f64),
    /// The figure divided by the baseline figure (same run) must not exceed
    /// the ratio.
    RatioAtMost { baseline: &'static str, ratio: f64 },
}

/// The goals the issues set. A figure without a goal is reported as is.
pub(crate) const GOALS: &[(&str, Goal)] = &[
    (
        "framework.allocate_us_p50",
        Goal::RatioAtMost {
            baseline: "framework.allocate_baseline_us_p50",
            ratio: 1.5,
        },
    ),
    ("framework.update_ms_p99", Goal::AtMost(2.0)),
    ("framework.reregister_ms_p99", Goal::AtMost(200.0)),
    (
        "framework.stream_drop_reregister_ms_p99",
        Goal::AtMost(100.0),
    ),
    (
        "framework.allocate_adapter_us_p50",
        Goal::RatioAtMost {
            baseline: "framework.allocate_baseline_us_p50",
            ratio: 1.5,
        },
    ),
    (
        "discovery.scan_ms_512",
        Goal::RatioAtMost {
            baseline: "discovery.scan_baseline_ms_512",
            ratio: 1.5,
        },
    ),
    ("discovery.event_to_inventory_ms_p99", Goal::AtMost(25.0)),
    ("discovery.idle_cpu_ms_per_30s", Goal::AtMost(5.0)),
    ("labeler.oneshot_ms", Goal::AtMost(200.0)),
    ("labeler.rss_kib", Goal::AtMost(20.0 * 1024.0)),
    ("labeler.idle_requests_per_hour", Goal::AtMost(60.0)),
    ("plugin.hotplug_add_ms_p99", Goal::AtMost(5.0)),
    ("plugin.hotplug_remove_ms_p99", Goal::AtMost(5.0)),
    ("plugin.allocate_us_p99", Goal::AtMost(1000.0)),
    ("plugin.startup_ms", Goal::AtMost(100.0)),
    ("plugin.rss_kib", Goal::AtMost(12.0 * 1024.0)),
    ("plugin.idle_cpu_ms_per_30s", Goal::AtMost(20.0)),
    ("dra.gpu_hotplug_ms_p99", Goal::AtMost(5.0)),
];

pub(crate) fn task(args: &[String]) -> Result<()> {
    let root = project_root();
    let out_dir = root.join("target").join("bench");
    let parts_dir = out_dir.join("parts");
    if parts_dir.exists() {
        std::fs::remove_dir_all(&parts_dir)
            .with_context(|| format!("could not clear {}", parts_dir.display()))?;
    }
    std::fs::create_dir_all(&parts_dir)
        .with_context(|| format!("could not create {}", parts_dir.display()))?;

    let mut cmd = cargo();
    cmd.args(["bench", "--locked", "--benches"]);
    if !args.iter().any(|a| a == "-p" || a.starts_with("--package")) {
        cmd.arg("--workspace");
    }
    cmd.args(args).env(REPORT_DIR_ENV, &parts_dir);
    run(&mut cmd)?;

    let parts = read_parts(&parts_dir)?;
    let report = merge(parts)?;
    let json = serde_json::json!({ "metrics": report.metrics, "skipped": report.skipped });
    let path = out_dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("could not write {}", path.display()))?;
    println!("{}", render_table(&report, GOALS));
    println!("report written to {}", path.display());
    Ok(())
}

pub(crate) fn read_parts(dir: &Path) -> Result<Vec<(String, Part)>> {
    let mut parts = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("could not read {}", path.display()))?;
            let part: Part = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a benchmark part", path.display()))?;
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            parts.push((name, part));
        }
    }
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(parts)
}

/// Merges the parts of several benchmark targets; a figure reported by two
/// targets is an error (names are global).
pub(crate) fn merge(parts: Vec<(String, Part)>) -> Result<Part> {
    let mut all = Part::default();
    let mut origin: std::collections::BTreeMap<String, String> = Default::default();
    for (source, part) in parts {
        let names = part.metrics.keys().chain(part.skipped.keys());
        for name in names {
            if let Some(first) = origin.insert(name.clone(), source.clone()) {
                bail!("figure `{name}` is reported by both `{first}` and `{source}`");
            }
        }
        all.metrics.extend(part.metrics);
        all.skipped.extend(part.skipped);
    }
    Ok(all)
}

/// The verdict of one goal against a report.
pub(crate) fn judge(report: &Part, name: &str, goal: Goal) -> String {
    let Some(&value) = report.metrics.get(name) else {
        return match report.skipped.get(name) {
            Some(reason) => format!("skipped: {reason}"),
            None => "not measured".to_owned(),
        };
    };
    match goal {
        Goal::AtMost(max) => {
            let verdict = if value <= max { "met" } else { "MISSED" };
            format!("{verdict} (goal <= {max})")
        }
        Goal::AtLeast(min) => {
            let verdict = if value >= min { "met" } else { "MISSED" };
            format!("{verdict} (goal >= {min})")
        }
        Goal::RatioAtMost { baseline, ratio } => match report.metrics.get(baseline) {
            Some(&base) if base > 0.0 => {
                let r = value / base;
                let verdict = if r <= ratio { "met" } else { "MISSED" };
                format!("{verdict}: ratio {r:.2} (goal <= {ratio} x {baseline})")
            }
            _ => format!("no baseline `{baseline}` to compare with"),
        },
    }
}

/// The goals a report missed, with their verdicts; a figure with a goal
/// that was not measured (and not skipped with a reason) counts as missed.
pub(crate) fn missed(report: &Part, goals: &[(&str, Goal)]) -> Vec<String> {
    goals
        .iter()
        .map(|(name, goal)| (name, judge(report, name, *goal)))
        .filter(|(_, verdict)| verdict.starts_with("MISSED") || verdict == "not measured")
        .map(|(name, verdict)| format!("{name}: {verdict}"))
        .collect()
}

pub(crate) fn render_table(report: &Part, goals: &[(&str, Goal)]) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:<46} {:>14}  {}\n", "figure", "value", "goal"));
    for (name, value) in &report.metrics {
        let goal = goals
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, g)| judge(report, n, *g))
            .unwrap_or_default();
        out.push_str(&format!("{name:<46} {value:>14.3}  {goal}\n"));
    }
    for (name, reason) in &report.skipped {
        out.push_str(&format!("{name:<46} {:>14}  {reason}\n", "skipped"));
    }
    for (name, _) in goals {
        if !report.metrics.contains_key(*name) && !report.skipped.contains_key(*name) {
            out.push_str(&format!(
                "{name:<46} {:>14}  has a goal, no benchmark measured it\n",
                "-"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(metrics: &[(&str, f64)], skipped: &[(&str, &str)]) -> Part {
        Part {
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            skipped: skipped
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn merge_joins_parts_and_rejects_duplicate_names() {
        let a = part(&[("a.x_ms", 1.0)], &[("a.y_ms", "needs root")]);
        let b = part(&[("b.x_ms", 2.0)], &[]);
        let merged = merge(vec![("a".into(), a.clone()), ("b".into(), b)]).unwrap();
        assert_eq!(merged.metrics.len(), 2);
        assert_eq!(merged.skipped.len(), 1);

        let dup = part(&[], &[("a.x_ms", "again")]);
        let err = merge(vec![("a".into(), a), ("c".into(), dup)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("`a.x_ms` is reported by both `a` and `c`"),
            "{err}"
        );
    }

    #[test]
    fn judge_absolute_and_ratio_goals() {
        let r = part(
            &[("x", 3.0), ("base", 2.0), ("y", 5.0)],
            &[("z", "no namespaces")],
        );
        assert!(judge(&r, "x", Goal::AtMost(3.0)).starts_with("met"));
        assert!(judge(&r, "y", Goal::AtMost(3.0)).starts_with("MISSED"));
        assert!(
            judge(
                &r,
                "x",
                Goal::RatioAtMost {
                    baseline: "base",
                    ratio: 1.5
                }
            )
            .starts_with("met: ratio 1.50")
        );
        assert!(
            judge(
                &r,
                "y",
                Goal::RatioAtMost {
                    baseline: "base",
                    ratio: 1.5
                }
            )
            .starts_with("MISSED: ratio 2.50")
        );
        assert!(
            judge(
                &r,
                "x",
                Goal::RatioAtMost {
                    baseline: "nope",
                    ratio: 1.5
                }
            )
            .starts_with("no baseline")
        );
        assert_eq!(judge(&r, "z", Goal::AtMost(1.0)), "skipped: no namespaces");
        assert_eq!(judge(&r, "w", Goal::AtMost(1.0)), "not measured");
        assert!(judge(&r, "y", Goal::AtLeast(5.0)).starts_with("met"));
        assert!(judge(&r, "x", Goal::AtLeast(5.0)).starts_with("MISSED"));
        let m = missed(
            &r,
            &[
                ("x", Goal::AtLeast(5.0)),
                ("y", Goal::AtMost(9.0)),
                ("w", Goal::AtMost(1.0)),
                ("z", Goal::AtMost(1.0)),
            ],
        );
        assert_eq!(m, ["x: MISSED (goal >= 5)", "w: not measured"]);
    }

    #[test]
    fn table_lists_every_figure() {
        let r = part(&[("framework.allocate_us_p50", 1.0)], &[("q", "why")]);
        let t = render_table(&r, GOALS);
        assert!(t.contains("framework.allocate_us_p50"));
        assert!(t.contains("no baseline `framework.allocate_baseline_us_p50`"));
        assert!(t.contains("plugin.startup_ms") && t.contains("no benchmark measured it"));
        assert!(t.contains("q") && t.contains("why"));
    }
}
