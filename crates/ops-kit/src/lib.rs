//! What every daemon in the workspace shares, so each thing is done one
//! way: [`Backoff`] for retry delays and [`Chain`] to show an error with its
//! causes; [`fs`] for files we own in directories other root processes
//! share (one atomic writer, capped reads that never follow a link).

pub mod fs;

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Retry delays: exponential from `initial` to `max`, each scaled by a
/// random factor in 0.8..=1.2, so callers that failed together (the `i915`
/// and `xe` resources after one kubelet restart, every node's labeller
/// after an API server outage) do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay (before jitter).
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based).
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        // fastrand's generator is per thread and seeded from the OS at
        // first use: independent between callers and processes.
        self.delay_with(attempt, fastrand::f64())
    }

    /// The delay before retry `attempt` for a uniform sample `unit` in
    /// 0..1: what [`delay`](Self::delay) computes, reproducibly.
    #[must_use]
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.max);
        let factor = 0.8 + 0.4 * unit.clamp(0.0, 1.0);
        base.mul_f64(factor)
    }
}

/// Shows an error and each of its causes, `outer: inner: root`: for log
/// fields and for reasons kept as text.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_the_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.delay_with(0, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay_with(1, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay_with(3, 0.5), Duration::from_millis(800));
        assert_eq!(b.delay_with(4, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay_with(u32::MAX, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay_with(0, 0.0), Duration::from_millis(80));
        assert_eq!(b.delay_with(0, 1.0), Duration::from_millis(120));
        for attempt in 0..30 {
            let d = b.delay(attempt);
            assert!(
                d >= Duration::from_millis(80) && d <= Duration::from_millis(1200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn two_callers_do_not_share_their_delays() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let here: Vec<Duration> = (0..8).map(|a| b.delay(a)).collect();
        let there = std::thread::spawn(move || (0..8).map(|a| b.delay(a)).collect::<Vec<_>>())
            .join()
            .unwrap_or_default();
        assert_eq!(there.len(), 8);
        assert_ne!(here, there);
    }

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &dyn Error)
        }
    }

    #[test]
    fn a_chain_shows_every_cause_in_order() {
        let e = E(
            "outer",
            Some(Box::new(E("middle", Some(Box::new(E("root", None)))))),
        );
        assert_eq!(Chain(&e).to_string(), "outer: middle: root");
        assert_eq!(Chain(&E("alone", None)).to_string(), "alone");
    }
}

pub mod prometheus {
    //! The Prometheus text exposition format (version 0.0.4), the one
    //! renderer behind every `/metrics`: families with `# HELP` and
    //! `# TYPE`, samples with escaped label values.

    use std::fmt::{Display, Write as _};

    /// A metric family's type.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// Only goes up (names end in `_total`).
        Counter,
        /// Goes up and down.
        Gauge,
    }

    /// Exposition text being written.
    #[derive(Debug, Default)]
    pub struct Text {
        out: String,
    }

    impl Text {
        /// Empty text.
        #[must_use]
        pub fn new() -> Self {
            Self::default()
        }

        /// Starts the family `name`: its help line and type.
        pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let help = help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            self
        }

        /// One sample of the family just started.
        pub fn sample(
            &mut self,
            name: &str,
            labels: &[(&str, &str)],
            value: impl Display,
        ) -> &mut Self {
            self.out.push_str(name);
            if !labels.is_empty() {
                self.out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let _ = write!(self.out, "{k}=\"{v}\"");
                }
                self.out.push('}');
            }
            let _ = writeln!(self.out, " {value}");
            self
        }

        /// A family with one unlabelled sample.
        pub fn single(
            &mut self,
            name: &str,
            kind: Kind,
            help: &str,
            value: impl Display,
        ) -> &mut Self {
            self.family(name, kind, help).sample(name, &[], value)
        }

        /// The text.
        #[must_use]
        pub fn finish(self) -> String {
            self.out
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn families_samples_and_escapes() {
            let mut t = Text::new();
            t.single("a_total", Kind::Counter, "Things\\done.\nTwice", 3);
            t.family("b", Kind::Gauge, "B.")
                .sample("b", &[("card", "card0")], 1.5)
                .sample("b", &[("x", "q\"\\\n"), ("y", "")], 0);
            assert_eq!(
                t.finish(),
                "# HELP a_total Things\\\\done.\\nTwice\n# TYPE a_total counter\na_total 3\n\
                 # HELP b B.\n# TYPE b gauge\nb{card=\"card0\"} 1.5\nb{x=\"q\\\"\\\\\\n\",y=\"\"} 0\n"
            );
        }
    }
}
