//! The StarlingX enabled-plugins file (`enabled_kube_plugins`): which
//! Kubernetes device plugins the cluster enabled at bootstrap, and the node
//! label that marks nodes for each.
//!
//! Start with [`parse`] (content from anywhere) or [`read_file`] (a path);
//! both give an [`EnabledPlugins`] whose [`EnabledPlugins::gpu_plugin`]
//! answers the labeller's question: is the GPU plugin enabled, and with
//! which label? [`render_starlingx`] writes the form StarlingX reads,
//! byte for byte as its Ansible wrote it. [`FileWatcher`] follows a file as
//! it is created, replaced, edited or removed.
//!
//! Three forms are read, detected from the content ([`Form`]):
//!
//! ```
//! # fn main() -> Result<(), enabled_plugins::ParseError> {
//! use enabled_plugins::parse;
//!
//! let shipped = parse("example", br#"{"intel-gpu-plugin": "intelgpu=enabled"}"#)?;
//! let list = parse("example", br#"["intelgpu", "intelqat"]"#)?;
//! let lines = parse("example", b"# enabled plugins\nintelgpu\n")?;
//! for set in [&shipped, &list, &lines] {
//!     assert_eq!(set.gpu_plugin().map(|l| l.to_string()).as_deref(), Some("intelgpu=enabled"));
//! }
//! assert_eq!(enabled_plugins::render_starlingx(&lines), r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#);
//! # Ok(()) }
//! ```
//!
//! A missing or unreadable file is not "nothing enabled": [`ReadError`]
//! keeps it apart ([`ReadError::is_unavailable`]) so that callers treat the
//! decision as unknown. Neither is an empty or blank file
//! ([`ReadError::Blank`]): that is what a reader sees while a writer is half
//! way through it. "Nothing enabled" is an empty list or object (`{}`).

mod file;
pub mod label;
mod model;
mod parse;
mod render;
mod watch;

pub use file::{
    BUILD_INFO, BuildInfoError, FILE_NAME, HOST_FILE, MAX_BUILD_INFO, MAX_RELEASE_LEN, NotARelease,
    REPLICATED_DIR, ReadError, read_bytes, read_file, starlingx_locations, sw_version,
};
pub use label::{Label, LabelError};
pub use model::{
    ENABLED, EnabledPlugins, GPU_PLUGIN, InsertError, KNOWN_PLUGINS, KnownPlugin, canonical_name,
    default_label,
};
pub use parse::{Form, MAX_SIZE, ParseError, Position, detect_form, is_blank, parse};
pub use render::render_starlingx;
pub use watch::{FileWatcher, Update, WatchConfig};
