//! One reconcile, end to end: decide from the enabled-plugins sources,
//! read the Node (or the NFD feature file), decide what to own, write it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use enabled_plugins::{EnabledPlugins, ParseError, ReadError, parse, read_file};
use gpu_discovery::Inventory;
use ops_kit::Chain;

use crate::cluster::{Cluster, ClusterError};
use crate::desired::{Decision, Refusal};
use crate::reconcile::{ABSENT_SINCE_ANNOTATION, Conflict, Intent, NodeView, Policy, reconcile};

/// The ConfigMap key that holds the enabled-plugins content.
pub const CONFIGMAP_KEY: &str = "enabled_kube_plugins";
/// The NFD feature file the labeller writes in its features directory.
pub const NFD_FILE: &str = "intel-gpu-labeler";

/// Where the enabled-plugins decision may come from, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file (StarlingX: `/etc/platform/enabled_kube_plugins`).
    File(PathBuf),
    /// A ConfigMap's `enabled_kube_plugins` key.
    ConfigMap {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::ConfigMap { namespace, name } => write!(f, "configmap {namespace}/{name}"),
        }
    }
}

fn decision_of(set: &EnabledPlugins) -> Decision {
    set.gpu_plugin()
        .map_or(Decision::Disabled, |l| Decision::Enabled(l.clone()))
}

/// The decision of the first source that exists. Missing sources are
/// skipped; a source that exists but cannot be read, or is empty or blank
/// (being written), makes the decision unknown; invalid content is an
/// error (the daemon keeps its last good decision, `--oneshot` fails).
///
/// # Errors
/// The parse error of the first existing source, naming it and the
/// position.
pub async fn decide(sources: &[Source], cluster: Option<&Cluster>) -> Result<Decision, ParseError> {
    Ok(decide_with_evidence(sources, cluster).await?.decision)
}

/// A decision as read, with what it rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The decision.
    pub decision: Decision,
    /// The source and the content read from it (empty when the decision
    /// is unknown), for [`Settle`].
    pub evidence: String,
    /// The source that decided (a path or `configmap NS/NAME`), if one
    /// did: where a refused label came from.
    pub source: Option<String>,
}

impl Reading {
    fn read(source: &Source, set: &EnabledPlugins) -> Self {
        Self {
            decision: decision_of(set),
            evidence: format!("{source}: {set:?}"),
            source: Some(source.to_string()),
        }
    }

    fn unknown(why: String) -> Self {
        Self {
            decision: Decision::Unknown(why),
            evidence: String::new(),
            source: None,
        }
    }
}

/// [`decide`], with what the decision rests on ([`Reading`]).
///
/// # Errors
/// As [`decide`].
pub async fn decide_with_evidence(
    sources: &[Source],
    cluster: Option<&Cluster>,
) -> Result<Reading, ParseError> {
    // One truth per cluster: where a ConfigMap is configured (and the API
    // is there to read it), it alone decides. Every node of a DaemonSet
    // reads the same object, so no two can disagree; a stale file on one
    // host is never consulted, and a missing ConfigMap is unknown rather
    // than a fall-back to that file. Files decide where no ConfigMap is
    // configured (host mode, standalone) or nothing can read it.
    let cluster_wide = cluster.is_some()
        && sources
            .iter()
            .any(|s| matches!(s, Source::ConfigMap { .. }));
    let mut looked = Vec::new();
    for source in sources {
        if cluster_wide && matches!(source, Source::File(_)) {
            continue;
        }
        match source {
            Source::File(path) => match read_file(path) {
                Ok(set) => return Ok(Reading::read(source, &set)),
                Err(ReadError::Missing { .. }) => looked.push(format!("{source} is missing")),
                Err(ReadError::Invalid(e)) => return Err(e),
                Err(e) => return Ok(Reading::unknown(Chain(&e).to_string())),
            },
            Source::ConfigMap { namespace, name } => {
                let Some(cluster) = cluster else {
                    looked.push(format!("{source} needs the API"));
                    continue;
                };
                match cluster.configmap(namespace, name, CONFIGMAP_KEY).await {
                    // Blank content is no decision, as for a file.
                    Ok(Some(text)) if enabled_plugins::is_blank(text.as_bytes()) => {
                        return Ok(Reading::unknown(format!(
                            "{source} (key {CONFIGMAP_KEY}) is blank"
                        )));
                    }
                    Ok(Some(text)) => {
                        let set = parse(&source.to_string(), text.as_bytes())?;
                        return Ok(Reading::read(source, &set));
                    }
                    Ok(None) => looked.push(format!("{source} (key {CONFIGMAP_KEY}) is missing")),
                    Err(e) => return Ok(Reading::unknown(Chain(&e).to_string())),
                }
            }
        }
    }
    let why = if looked.is_empty() {
        "no enabled-plugins source is configured".into()
    } else {
        looked.join("; ")
    };
    Ok(Reading::unknown(why))
}

/// Confirms a "disabled" decision before it removes anything: the same
/// content must be read twice, at least `wait` apart. Until then the
/// decision acted on is unknown (the plugin label stays). An enabled or
/// unknown decision passes at once. One reading of a file half rewritten
/// (truncated, then a shorter list) therefore never evicts the plugin.
#[derive(Debug, Clone)]
pub struct Settle {
    wait: std::time::Duration,
    pending: Option<(String, tokio::time::Instant)>,
}

impl Settle {
    /// Confirms after `wait` (the labeller's `--settle`, default 2 s).
    #[must_use]
    pub fn new(wait: std::time::Duration) -> Self {
        Self {
            wait,
            pending: None,
        }
    }

    /// The decision to act on now, and when to read again if it is still
    /// being confirmed.
    pub fn filter(
        &mut self,
        decision: Decision,
        evidence: &str,
        now: tokio::time::Instant,
    ) -> (Decision, Option<tokio::time::Instant>) {
        if decision != Decision::Disabled || self.wait.is_zero() {
            self.pending = None;
            return (decision, None);
        }
        match &self.pending {
            Some((seen, first)) if seen == evidence => {
                let due = *first + self.wait;
                if now >= due {
                    (Decision::Disabled, None)
                } else {
                    (Self::confirming(self.wait), Some(due))
                }
            }
            _ => {
                self.pending = Some((evidence.to_owned(), now));
                (Self::confirming(self.wait), Some(now + self.wait))
            }
        }
    }

    fn confirming(wait: std::time::Duration) -> Decision {
        Decision::Unknown(format!(
            "the GPU plugin reads as not enabled; confirming with a second read {wait:?} later"
        ))
    }
}

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The Node does not exist: nothing was written (never re-created).
    NodeMissing,
    /// The Node opted out.
    OptedOut,
    /// The Node already carries what we want: nothing was written.
    Unchanged {
        /// Labels owned.
        labels: BTreeMap<String, String>,
        /// Conflicts left alone.
        conflicts: Vec<Conflict>,
        /// The plugin label the decision names, if it was refused.
        refused: Option<Refusal>,
    },
    /// New owned labels were written.
    Applied {
        /// Labels owned now.
        labels: BTreeMap<String, String>,
        /// Conflicts left alone.
        conflicts: Vec<Conflict>,
        /// Why the plugin label is as it is.
        note: String,
        /// The plugin label the decision names, if it was refused.
        refused: Option<Refusal>,
    },
}

impl Outcome {
    /// The refused plugin label, if any.
    #[must_use]
    pub fn refused(&self) -> Option<&Refusal> {
        match self {
            Self::Unchanged { refused, .. } | Self::Applied { refused, .. } => refused.as_ref(),
            Self::NodeMissing | Self::OptedOut => None,
        }
    }
}

/// Reports a refused plugin label as a Warning Event (`LabelRefused`) on
/// the Node, naming the key and the source it came from. Best effort, as
/// every Event; nothing when the Node is missing.
pub async fn report_refused(cluster: &Cluster, refusal: &Refusal, source: &str) {
    let uid = match cluster.read().await {
        Ok(Some(state)) => state.uid,
        Ok(None) => return,
        Err(error) => {
            tracing::debug!(error = %Chain(&error), "cannot read the Node to report a refused label");
            return;
        }
    };
    let message = format!(
        "{refusal}; named by {source}; the plugin label is left as it is, the other labels are applied"
    );
    cluster.warn_event(&uid, "LabelRefused", &message).await;
}

/// Reconciles the Node through the API once (re-reading and retrying when
/// the Node changed under the write).
///
/// # Errors
/// When the API server fails or keeps answering 409.
pub async fn reconcile_node(
    cluster: &Cluster,
    inventory: &Inventory,
    decision: &Decision,
    policy: &Policy,
    now: u64,
) -> Result<Outcome, ClusterError> {
    for attempt in 0..3 {
        // The watch cache first; after a refused write, the server itself.
        let read = if attempt == 0 {
            cluster.read().await?
        } else {
            cluster.read_fresh().await?
        };
        let Some(state) = read else {
            return Ok(Outcome::NodeMissing);
        };
        let Intent::Apply {
            labels,
            annotations,
            conflicts,
            changed,
            note,
            refused,
        } = reconcile(&state.view, inventory, decision, policy, now)
        else {
            return Ok(Outcome::OptedOut);
        };
        if !changed {
            return Ok(Outcome::Unchanged {
                labels,
                conflicts,
                refused,
            });
        }
        match cluster
            .apply(
                &labels,
                &annotations,
                &state.uid,
                // From the watch cache: only if nothing changed since.
                (attempt == 0).then_some(state.resource_version.as_str()),
            )
            .await
        {
            Ok(()) => {
                tracing::info!(node = %cluster.node(), labels = labels.len(), %note, "labels applied");
                for c in &conflicts {
                    tracing::warn!(key = %c.key, wanted = %c.wanted, found = %c.found, "label set by someone else to another value; leaving it");
                    let message = format!(
                        "label {} is {:?}, set by another manager; the labeller wanted {:?} and left it",
                        c.key, c.found, c.wanted
                    );
                    cluster
                        .warn_event(&state.uid, "LabelConflict", &message)
                        .await;
                }
                return Ok(Outcome::Applied {
                    labels,
                    conflicts,
                    note,
                    refused,
                });
            }
            // The Node was deleted or replaced since the read (the uid
            // precondition failed), or someone took a field: read again.
            Err(e) if e.code() == Some(409) => {
                tracing::debug!(error = %Chain(&e), "node changed meanwhile; reading it again")
            }
            // Creation forbidden (RBAC without `create`): it is gone.
            Err(e) if e.code() == Some(403) && cluster.read_fresh().await?.is_none() => {
                return Ok(Outcome::NodeMissing);
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClusterError::KeepsChanging {
        node: cluster.node().to_owned(),
    })
}

/// Removes exactly what the labeller owns on the Node.
///
/// # Errors
/// When the API server fails.
pub async fn cleanup(cluster: &Cluster) -> Result<Outcome, ClusterError> {
    let Some(state) = cluster.read().await? else {
        return Ok(Outcome::NodeMissing);
    };
    if state.view.owned_labels.is_empty() && state.view.owned_annotations.is_empty() {
        return Ok(Outcome::Unchanged {
            labels: BTreeMap::new(),
            conflicts: Vec::new(),
            refused: None,
        });
    }
    cluster
        .apply(&BTreeMap::new(), &BTreeMap::new(), &state.uid, None)
        .await?;
    Ok(Outcome::Applied {
        labels: BTreeMap::new(),
        conflicts: Vec::new(),
        note: "cleanup".into(),
        refused: None,
    })
}

/// NFD's directive giving a feature file an expiry time (RFC 3339): after
/// it NFD ignores the file, so labels of a labeller that died do not claim
/// GPUs for ever (NFD's `features.d` format).
const EXPIRY_DIRECTIVE: &str = "# +expiry-time=";

/// The NFD feature file as a [`NodeView`]: its labels are ours; the grace
/// clock is kept in a comment.
#[must_use]
pub fn read_features_file(dir: &Path) -> NodeView {
    read_features(dir).0
}

/// The feature file's view and its expiry (Unix seconds), if any.
fn read_features(dir: &Path) -> (NodeView, Option<i64>) {
    let mut view = NodeView::default();
    let mut expiry = None;
    // Capped and never through a link: a plant reads as no file.
    let Ok(text) = ops_kit::fs::read_capped(dir, NFD_FILE, 1 << 20)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    else {
        return (view, expiry);
    };
    for line in text.lines() {
        if let Some(at) = line.strip_prefix(EXPIRY_DIRECTIVE) {
            expiry = at
                .trim()
                .parse::<k8s_openapi::jiff::Timestamp>()
                .ok()
                .map(|t| t.as_second());
        } else if let Some(since) = line.strip_prefix(&format!("# {ABSENT_SINCE_ANNOTATION}=")) {
            view.annotations
                .insert(ABSENT_SINCE_ANNOTATION.into(), since.trim().into());
            view.owned_annotations
                .insert(ABSENT_SINCE_ANNOTATION.into());
        } else if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            view.labels.insert(k.trim().into(), v.trim().into());
            view.owned_labels.insert(k.trim().into());
        }
    }
    (view, expiry)
}

/// Removes the temporaries of a labeller killed while writing the NFD
/// feature file in `dir`; call it once at start. Returns how many went.
pub fn remove_stale_features_temporaries(dir: &Path) -> usize {
    ops_kit::fs::remove_stale_temporaries(dir, NFD_FILE)
}

/// Writes the NFD feature file atomically (`key=value` lines; NFD prefixes
/// unprefixed keys with `feature.node.kubernetes.io/`).
///
/// # Errors
/// When the directory or file cannot be written.
pub fn write_features_file(
    dir: &Path,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    expires: i64,
) -> std::io::Result<()> {
    let mut text = String::from("# Written by intel-gpu-labeler. Do not edit.\n");
    if let Ok(at) = k8s_openapi::jiff::Timestamp::from_second(expires) {
        text.push_str(&format!("{EXPIRY_DIRECTIVE}{at}\n"));
    }
    if let Some(since) = annotations.get(ABSENT_SINCE_ANNOTATION) {
        text.push_str(&format!("# {ABSENT_SINCE_ANNOTATION}={since}\n"));
    }
    for (k, v) in labels {
        text.push_str(&format!("{k}={v}\n"));
    }
    // NFD's features.d is shared with other feature sources: written
    // without following anything planted there.
    ops_kit::fs::write_atomic(dir, NFD_FILE, text.as_bytes(), 0o644).map_err(std::io::Error::other)
}

/// Reconciles the NFD feature file once. The file expires `ttl` after it
/// is written (NFD then drops its labels); it is written again when its
/// content changes or half of that time has passed.
///
/// # Errors
/// When the file cannot be written.
pub fn reconcile_features_file(
    dir: &Path,
    inventory: &Inventory,
    decision: &Decision,
    policy: &Policy,
    now: u64,
    ttl: std::time::Duration,
) -> std::io::Result<Outcome> {
    let (view, expiry) = read_features(dir);
    let now_s = i64::try_from(now).unwrap_or(i64::MAX);
    let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let stale = expiry.is_none_or(|e| e - now_s < ttl_s / 2);
    let Intent::Apply {
        labels,
        annotations,
        conflicts,
        changed,
        note,
        refused,
    } = reconcile(&view, inventory, decision, policy, now)
    else {
        return Ok(Outcome::OptedOut);
    };
    if !changed && !stale && dir.join(NFD_FILE).exists() {
        return Ok(Outcome::Unchanged {
            labels,
            conflicts,
            refused,
        });
    }
    write_features_file(dir, &labels, &annotations, now_s.saturating_add(ttl_s))?;
    Ok(Outcome::Applied {
        labels,
        conflicts,
        note,
        refused,
    })
}
