//! The labeller's figures, served on /metrics, /healthz and /readyz.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ops_http::Progress;
use ops_kit::prometheus::{Kind, Text};

pub(crate) struct Stats {
    /// The daemon loop's watchdog, and how long a round may take.
    pub(crate) progress: Arc<Progress>,
    pub(crate) stall_limit: Duration,
    pub(crate) reconciles: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) owned: AtomicU64,
    pub(crate) refused_total: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) last_success: AtomicU64,
    pub(crate) ready: AtomicBool,
}

impl Stats {
    pub(crate) fn new(stall_limit: Duration) -> Self {
        let progress = Progress::shared();
        progress.beat();
        Self {
            progress,
            stall_limit,
            reconciles: AtomicU64::default(),
            writes: AtomicU64::default(),
            errors: AtomicU64::default(),
            conflicts: AtomicU64::default(),
            owned: AtomicU64::default(),
            refused_total: AtomicU64::default(),
            refused: AtomicU64::default(),
            last_success: AtomicU64::default(),
            ready: AtomicBool::default(),
        }
    }
}

/// Serves `stats` on `/metrics`, `/healthz`, `/readyz` at `addr`, if one
/// is given, until the process ends.
///
/// # Errors
/// When the address cannot be bound.
pub(crate) async fn serve(
    addr: Option<std::net::SocketAddr>,
    stats: &Arc<Stats>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(addr) = addr {
        let listener = ops_http::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tokio::spawn(ops_http::serve(
            listener,
            Arc::clone(stats) as Arc<dyn ops_http::Endpoints>,
        ));
    }
    Ok(())
}

impl ops_http::Endpoints for Stats {
    fn metrics(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = [
            (
                "reconciles_total",
                Kind::Counter,
                "Reconciles run.",
                g(&self.reconciles),
            ),
            (
                "writes_total",
                Kind::Counter,
                "Reconciles that wrote labels.",
                g(&self.writes),
            ),
            (
                "errors_total",
                Kind::Counter,
                "Reconciles that failed.",
                g(&self.errors),
            ),
            (
                "label_conflicts",
                Kind::Gauge,
                "Labels left alone because someone else set another value.",
                g(&self.conflicts),
            ),
            (
                "owned_labels",
                Kind::Gauge,
                "Labels the labeller owns on the node.",
                g(&self.owned),
            ),
            (
                "planted_files_total",
                Kind::Counter,
                "Links or files planted where the labeller writes (the NFD features file), found and not followed.",
                ops_kit::fs::planted_total(),
            ),
            (
                "refused_labels_total",
                Kind::Counter,
                "Plugin labels named by the enabled-plugins content that were refused (a prefix not allowed, or Kubernetes' own).",
                g(&self.refused_total),
            ),
            (
                "refused_labels",
                Kind::Gauge,
                "1 while the plugin label the enabled-plugins content names is refused.",
                g(&self.refused),
            ),
            (
                "last_success_timestamp_seconds",
                Kind::Gauge,
                "Unix time of the last successful reconcile.",
                g(&self.last_success),
            ),
        ];
        let mut text = Text::new();
        for (name, kind, help, v) in rows {
            text.single(&format!("intel_gpu_labeler_{name}"), kind, help, v);
        }
        text.finish()
    }

    fn live(&self) -> Result<(), String> {
        self.progress.check(self.stall_limit)
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the last reconcile did not succeed".into())
        }
    }
}
