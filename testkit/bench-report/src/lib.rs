//! Benchmark figures for `cargo xtask bench`.
//!
//! Every benchmark target of the workspace (`[[bench]]` with
//! `harness = false`) builds a [`Report`], records its figures with
//! [`Report::metric`] or says why it could not measure one with
//! [`Report::skip`], and calls [`Report::finish`]. When the environment
//! variable [`REPORT_DIR_ENV`] names a directory (as `cargo xtask bench`
//! sets it), the part is written there as `<source>.json`; the xtask merges
//! every part into `target/bench/report.json`. Without it the figures are
//! printed, so `cargo bench -p <crate>` stays useful on its own.
//!
//! The helpers [`percentile`] and [`Samples`] keep the statistics the same
//! across benchmarks. Figures are absolute; goals that have a baseline are
//! judged by comparing two figures measured in the same run.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The environment variable naming the directory where parts are written.
pub const REPORT_DIR_ENV: &str = "BENCH_REPORT_DIR";

/// One benchmark target's figures: the same shape as the merged report.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// Figure name (`crate.what_unit`) to value.
    pub metrics: BTreeMap<String, f64>,
    /// Figure name to the reason it was not measured.
    pub skipped: BTreeMap<String, String>,
}

/// Figures collected by one benchmark target.
#[derive(Debug)]
pub struct Report {
    source: String,
    part: Part,
}

impl Report {
    /// Starts a report for the benchmark target `source` (used as the part's
    /// file name, so it must be unique in the workspace).
    #[must_use]
    pub fn new(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            part: Part::default(),
        }
    }

    /// Records a figure. Non-finite values are recorded as skipped.
    pub fn metric(&mut self, name: &str, value: f64) {
        println!("{name:<48} {value:>14.3}");
        if value.is_finite() {
            self.part.metrics.insert(name.to_owned(), value);
        } else {
            self.skip(name, &format!("measured a non-finite value ({value})"));
        }
    }

    /// Records that a figure could not be measured here, and why.
    pub fn skip(&mut self, name: &str, reason: &str) {
        println!("{name:<48} skipped: {reason}");
        self.part.skipped.insert(name.to_owned(), reason.to_owned());
    }

    /// The figures recorded so far.
    #[must_use]
    pub fn part(&self) -> &Part {
        &self.part
    }

    /// Writes the part into the directory named by [`REPORT_DIR_ENV`], if
    /// set, and returns the path written.
    ///
    /// # Errors
    /// When the directory or the file cannot be written.
    pub fn finish(self) -> io::Result<Option<PathBuf>> {
        match std::env::var_os(REPORT_DIR_ENV) {
            Some(dir) => self.write_to(Path::new(&dir)).map(Some),
            None => Ok(None),
        }
    }

    /// Writes the part as `<dir>/<source>.json`.
    ///
    /// # Errors
    /// When the directory or the file cannot be written.
    pub fn write_to(self, dir: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.source));
        let text = serde_json::to_string_pretty(&self.part).map_err(io::Error::other)?;
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// The `p`-th percentile (0–100) of `values` by the nearest-rank method, or
/// `None` for an empty slice. Sorts `values`.
#[must_use]
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    let index = rank.clamp(1, values.len()) - 1;
    values.get(index).copied()
}

/// Durations measured one sample at a time.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: Vec<f64>,
}

impl Samples {
    /// An empty set of samples.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one duration.
    pub fn push(&mut self, d: Duration) {
        self.values.push(d.as_secs_f64());
    }

    /// Runs `f` `n` times and records each run's wall time.
    pub fn time<T>(&mut self, n: usize, mut f: impl FnMut() -> T) {
        for _ in 0..n {
            let start = Instant::now();
            std::hint::black_box(f());
            self.push(start.elapsed());
        }
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: &Samples) {
        self.values.extend_from_slice(&other.values);
    }

    /// How many samples were taken.
    #[must_use]
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no sample was taken.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `p`-th percentile in milliseconds.
    #[must_use]
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        percentile(&mut self.values.clone(), p).map(|s| s * 1e3)
    }

    /// The `p`-th percentile in microseconds.
    #[must_use]
    pub fn percentile_us(&self, p: f64) -> Option<f64> {
        percentile(&mut self.values.clone(), p).map(|s| s * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(percentile(&mut v, 0.0), Some(1.0));
        assert_eq!(percentile(&mut [], 50.0), None);
        assert_eq!(percentile(&mut [7.0], 99.0), Some(7.0));
    }

    #[test]
    fn samples_convert_units() {
        let mut s = Samples::new();
        s.push(Duration::from_millis(2));
        s.push(Duration::from_millis(4));
        assert_eq!(s.len(), 2);
        assert_eq!(s.percentile_ms(50.0), Some(2.0));
        assert_eq!(s.percentile_us(100.0), Some(4000.0));
    }

    #[test]
    fn part_is_written_as_json_and_non_finite_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Report::new("example");
        r.metric("example.a_ms", 1.5);
        r.metric("example.b_ms", f64::NAN);
        r.skip("example.c_ms", "needs root");
        let path = r.write_to(dir.path()).unwrap();
        assert_eq!(path, dir.path().join("example.json"));
        let back: Part = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(back.metrics.get("example.a_ms"), Some(&1.5));
        assert!(back.skipped.contains_key("example.b_ms"));
        assert_eq!(back.skipped.get("example.c_ms").unwrap(), "needs root");
    }
}
