//! Reading the file from disk, and where StarlingX keeps it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::model::EnabledPlugins;
use crate::parse::{MAX_SIZE, ParseError, parse};

/// The per-host location, relative to the host's root.
pub const HOST_FILE: &str = "etc/platform/enabled_kube_plugins";
/// The build description holding `SW_VERSION`, relative to the root.
pub const BUILD_INFO: &str = "etc/build.info";
/// The replicated location's directory, relative to the root; the release
/// (`SW_VERSION`) and the file name follow.
pub const REPLICATED_DIR: &str = "opt/platform/config";
/// The file name in both locations.
pub const FILE_NAME: &str = "enabled_kube_plugins";

/// Why the enabled-plugins file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The file (or a directory on its path) does not exist: the decision
    /// is unknown, not "disabled".
    #[error("enabled-plugins file {} does not exist", path.display())]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file exists but could not be read: the decision is unknown.
    #[error("could not read enabled-plugins file {}", path.display())]
    Unreadable {
        /// The path read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is empty or holds only white space: what a reader sees
    /// while `cat > file`, `tee` or `echo >` is writing it. No decision.
    #[error("enabled-plugins file {} is empty or blank (a writer may be half way through it)", path.display())]
    Blank {
        /// The path read.
        path: PathBuf,
    },
    /// The file was read but its content is invalid.
    #[error(transparent)]
    Invalid(#[from] ParseError),
}

impl ReadError {
    /// Whether the decision is unknown because there was nothing to read
    /// (missing or unreadable), as opposed to content that is invalid.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Missing { .. } | Self::Unreadable { .. } | Self::Blank { .. }
        )
    }
}

/// Reads and parses the file at `path`, reading at most one byte more than
/// [`MAX_SIZE`].
///
/// # Errors
/// [`ReadError::Missing`] when it does not exist, [`ReadError::Unreadable`]
/// when it cannot be read, [`ReadError::Blank`] when it is empty or blank,
/// [`ReadError::Invalid`] when its content is invalid.
pub fn read_file(path: &Path) -> Result<EnabledPlugins, ReadError> {
    let bytes = read_capped(path)?;
    if crate::parse::is_blank(&bytes) {
        return Err(ReadError::Blank {
            path: path.to_owned(),
        });
    }
    Ok(parse(&path.display().to_string(), &bytes)?)
}

/// The file's bytes, at most `MAX_SIZE + 1` of them.
pub(crate) fn read_capped(path: &Path) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path).map_err(|source| classify(path, source))?;
    let mut bytes = Vec::new();
    file.take(MAX_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| classify(path, source))?;
    Ok(bytes)
}

fn classify(path: &Path, source: io::Error) -> ReadError {
    let missing =
        source.kind() == io::ErrorKind::NotFound || source.kind() == io::ErrorKind::NotADirectory;
    if missing {
        ReadError::Missing {
            path: path.to_owned(),
        }
    } else {
        ReadError::Unreadable {
            path: path.to_owned(),
            source,
        }
    }
}

/// The StarlingX locations of the file under `root` (the host's `/`), the
/// authoritative first: the replicated, backed-up
/// `/opt/platform/config/<release>/enabled_kube_plugins` when the release
/// can be read from `SW_VERSION` in `/etc/build.info` (as StarlingX's
/// `tsconfig` finds it), then the older per-host
/// `/etc/platform/enabled_kube_plugins` (lost on controller switch-over,
/// which is why StarlingX moved it).
#[must_use]
pub fn starlingx_locations(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(release) = std::fs::read_to_string(root.join(BUILD_INFO))
        .ok()
        .as_deref()
        .and_then(sw_version)
    {
        out.push(root.join(REPLICATED_DIR).join(release).join(FILE_NAME));
    }
    out.push(root.join(HOST_FILE));
    out
}

/// `SW_VERSION` from the content of `build.info` (`KEY="value"` lines),
/// when it is a plain release number such as `24.09`.
#[must_use]
pub fn sw_version(build_info: &str) -> Option<String> {
    build_info.lines().find_map(|line| {
        let value = line.trim().strip_prefix("SW_VERSION=")?.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let plain = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        plain.then(|| value.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sw_version_reads_quoted_and_bare_values() {
        assert_eq!(
            sw_version("OS=\"centos\"\nSW_VERSION=\"22.12\"\n").as_deref(),
            Some("22.12")
        );
        assert_eq!(sw_version("SW_VERSION=24.09").as_deref(), Some("24.09"));
        assert_eq!(sw_version("SW_VERSION=\"../../etc\""), None);
        assert_eq!(sw_version("SW_VERSION=\"\""), None);
        assert_eq!(sw_version("NOTHING=1"), None);
    }

    #[test]
    fn locations_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            starlingx_locations(dir.path()),
            vec![dir.path().join(HOST_FILE)]
        );
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join(BUILD_INFO), "SW_VERSION=\"22.12\"\n").unwrap();
        assert_eq!(
            starlingx_locations(dir.path()),
            vec![
                dir.path()
                    .join("opt/platform/config/22.12/enabled_kube_plugins"),
                dir.path().join(HOST_FILE),
            ]
        );
    }

    #[test]
    fn empty_and_blank_files_are_no_decision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enabled_kube_plugins");
        for content in [&b""[..], b"\n", b"  \t\r\n", b"\xef\xbb\xbf\n"] {
            std::fs::write(&path, content).unwrap();
            let err = read_file(&path).unwrap_err();
            assert!(matches!(err, ReadError::Blank { .. }), "{content:?}: {err}");
            assert!(err.is_unavailable());
            assert!(err.to_string().contains("half way"), "{err}");
        }
        // "Nothing enabled" is written, not implied.
        std::fs::write(&path, "{}").unwrap();
        assert!(read_file(&path).unwrap().gpu_plugin().is_none());
    }

    #[test]
    fn missing_unreadable_and_oversized_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/enabled_kube_plugins");
        assert!(matches!(
            read_file(&missing),
            Err(ReadError::Missing { .. })
        ));
        let not_dir = dir.path().join("file");
        std::fs::write(&not_dir, "x").unwrap();
        let err = read_file(&not_dir.join("child")).unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        // A directory where the file belongs cannot be read.
        let err = read_file(dir.path()).unwrap_err();
        assert!(matches!(err, ReadError::Unreadable { .. }), "{err:?}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_SIZE * 4]).unwrap();
        let err = read_file(&big).unwrap_err();
        assert!(
            matches!(err, ReadError::Invalid(ParseError::TooLarge { size, .. }) if size == MAX_SIZE + 1),
            "{err:?}"
        );
    }
}
