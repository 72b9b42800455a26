//! Reading the file from disk, and where StarlingX keeps it.

use std::io;
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
/// The most bytes of `build.info` read (it holds a dozen short lines).
pub const MAX_BUILD_INFO: u64 = 16 * 1024;
/// The longest release `SW_VERSION` may name (`22.12`, `24.09.300`).
pub const MAX_RELEASE_LEN: usize = 16;

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
    /// The file exists but is not a regular file (a FIFO, a device, a
    /// directory): not read, since that could block or never end. The
    /// decision is unknown.
    #[error("enabled-plugins file {} is not a regular file", path.display())]
    NotRegular {
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
            Self::Missing { .. }
                | Self::NotRegular { .. }
                | Self::Unreadable { .. }
                | Self::Blank { .. }
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
    let bytes = read_capped(path, MAX_SIZE as u64)?;
    if crate::parse::is_blank(&bytes) {
        return Err(ReadError::Blank {
            path: path.to_owned(),
        });
    }
    Ok(parse(&path.display().to_string(), &bytes)?)
}

/// The raw bytes of an enabled-plugins file, at most [`MAX_SIZE`] + 1 of
/// them (more means too large), read as [`read_file`] reads: never
/// blocking on a FIFO, only from a regular file. For callers that need
/// the exact content (the publisher).
///
/// # Errors
/// [`ReadError::Missing`], [`ReadError::NotRegular`] or
/// [`ReadError::Unreadable`], each naming the path.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_capped(path, MAX_SIZE as u64)
}

/// The file's bytes, at most `limit + 1` of them (the caller tells "too
/// large" by the length). Only a regular file is opened
/// (`ops_kit::fs::open_regular_following`), so a FIFO planted at the name
/// never blocks the reader and a device is never opened; a link is
/// followed (a ConfigMap volume's files are links).
pub(crate) fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    // Looked at before it is opened: a device node is never opened, a
    // FIFO never waited on.
    ops_kit::fs::read_following_capped(path, limit)
        .map_err(|source| classify(path, source))?
        .ok_or_else(|| ReadError::NotRegular {
            path: path.to_owned(),
        })
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

/// Why the release could not be learnt from `build.info`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildInfoError {
    /// It exists but could not be read (not a regular file, an I/O
    /// error); the cause names the file.
    #[error("could not use the StarlingX build description")]
    Unreadable(#[source] ReadError),
    /// It is larger than [`MAX_BUILD_INFO`].
    #[error("{} is larger than {MAX_BUILD_INFO} bytes, too large for a build description", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Its `SW_VERSION` is not a release.
    #[error("{} names no usable release", path.display())]
    NotARelease {
        /// The file.
        path: PathBuf,
        /// What is wrong with the value.
        #[source]
        source: NotARelease,
    },
}

/// A `SW_VERSION` value that is not a release: it would become a path
/// component, so only digits and single dots are accepted (`22.12`,
/// `24.09`), at most [`MAX_RELEASE_LEN`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "SW_VERSION {value:?} is not a release such as 22.12 (digits separated by single dots, at most {MAX_RELEASE_LEN} characters)"
)]
pub struct NotARelease {
    /// The value (at most 64 characters of it).
    pub value: String,
}

/// The StarlingX locations of the file under `root` (the host's `/`), the
/// authoritative first: the replicated, backed-up
/// `/opt/platform/config/<release>/enabled_kube_plugins` when the release
/// can be read from `SW_VERSION` in `/etc/build.info` (as StarlingX's
/// `tsconfig` finds it), then the older per-host
/// `/etc/platform/enabled_kube_plugins` (lost on controller switch-over,
/// which is why StarlingX moved it). Without `build.info`, or without
/// `SW_VERSION` in it, only the per-host location.
///
/// # Errors
/// When `build.info` exists but cannot be read (at most
/// [`MAX_BUILD_INFO`] bytes of a regular file) or its `SW_VERSION` is not
/// a release: each names the file. Nothing from it is used then.
pub fn starlingx_locations(root: &Path) -> Result<Vec<PathBuf>, BuildInfoError> {
    let mut out = Vec::new();
    let path = root.join(BUILD_INFO);
    match read_capped(&path, MAX_BUILD_INFO) {
        Ok(bytes) if bytes.len() as u64 > MAX_BUILD_INFO => {
            return Err(BuildInfoError::TooLarge { path });
        }
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            match sw_version(&text) {
                Ok(Some(release)) => {
                    out.push(root.join(REPLICATED_DIR).join(release).join(FILE_NAME));
                }
                Ok(None) => {}
                Err(source) => return Err(BuildInfoError::NotARelease { path, source }),
            }
        }
        Err(ReadError::Missing { .. }) => {}
        Err(e) => return Err(BuildInfoError::Unreadable(e)),
    }
    out.push(root.join(HOST_FILE));
    Ok(out)
}

/// `SW_VERSION` from the content of `build.info` (`KEY="value"` lines):
/// `None` when there is no such line.
///
/// # Errors
/// When the value is not a release (digits separated by single dots, at
/// most [`MAX_RELEASE_LEN`] characters): it must never become a path.
pub fn sw_version(build_info: &str) -> Result<Option<String>, NotARelease> {
    let Some(value) = build_info
        .lines()
        .find_map(|line| line.trim().strip_prefix("SW_VERSION="))
    else {
        return Ok(None);
    };
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let release = !value.is_empty()
        && value.len() <= MAX_RELEASE_LEN
        && value
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    if release {
        Ok(Some(value.to_owned()))
    } else {
        Err(NotARelease {
            value: value.chars().take(64).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sw_version_reads_quoted_and_bare_values() {
        assert_eq!(
            sw_version("OS=\"centos\"\nSW_VERSION=\"22.12\"\n"),
            Ok(Some("22.12".into()))
        );
        assert_eq!(sw_version("SW_VERSION=24.09"), Ok(Some("24.09".into())));
        assert_eq!(
            sw_version("SW_VERSION=\"25.09.1\""),
            Ok(Some("25.09.1".into()))
        );
        assert_eq!(sw_version("NOTHING=1"), Ok(None));
        assert_eq!(sw_version(""), Ok(None));
    }

    /// Anything but digits and single dots, or too long, is refused (it
    /// would become a path component under /opt/platform/config).
    #[test]
    fn sw_version_must_look_like_a_release() {
        let long = format!("SW_VERSION={}", "1".repeat(MAX_RELEASE_LEN + 1));
        for bad in [
            "SW_VERSION=\"../../etc\"",
            "SW_VERSION=\"..\"",
            "SW_VERSION=\"\"",
            "SW_VERSION=22..12",
            "SW_VERSION=.22",
            "SW_VERSION=22.",
            "SW_VERSION=22.12-rc1",
            "SW_VERSION=\"22.12/x\"",
            "SW_VERSION=stx",
            "SW_VERSION=2\u{0}2",
            long.as_str(),
        ] {
            let err = sw_version(bad).unwrap_err();
            assert!(err.to_string().contains("not a release"), "{bad}: {err}");
        }
    }

    #[test]
    fn locations_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            starlingx_locations(dir.path()).unwrap(),
            vec![dir.path().join(HOST_FILE)]
        );
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join(BUILD_INFO), "SW_VERSION=\"22.12\"\n").unwrap();
        assert_eq!(
            starlingx_locations(dir.path()).unwrap(),
            vec![
                dir.path()
                    .join("opt/platform/config/22.12/enabled_kube_plugins"),
                dir.path().join(HOST_FILE),
            ]
        );
        std::fs::write(dir.path().join(BUILD_INFO), "OS=x\n").unwrap();
        assert_eq!(
            starlingx_locations(dir.path()).unwrap(),
            vec![dir.path().join(HOST_FILE)]
        );
    }

    /// A bad build.info is an error naming it, never a path: a release
    /// that is not one, a huge file, a FIFO (which would block the reader
    /// for ever on the old code), a directory.
    #[test]
    fn a_bad_build_info_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let info = dir.path().join(BUILD_INFO);
        let shown = |e: &BuildInfoError| ops_kit::Chain(e).to_string();
        std::fs::write(&info, "SW_VERSION=\"../../../var/lib/kubelet\"\n").unwrap();
        let err = starlingx_locations(dir.path()).unwrap_err();
        assert!(matches!(err, BuildInfoError::NotARelease { .. }), "{err:?}");
        assert!(
            shown(&err).contains(&*info.to_string_lossy()),
            "{}",
            shown(&err)
        );
        assert!(shown(&err).contains("not a release"), "{}", shown(&err));
        let mut big = b"SW_VERSION=22.12\n".to_vec();
        big.resize(usize::try_from(MAX_BUILD_INFO).unwrap() + 10, b'#');
        std::fs::write(&info, big).unwrap();
        let err = starlingx_locations(dir.path()).unwrap_err();
        assert!(matches!(err, BuildInfoError::TooLarge { .. }), "{err:?}");
        assert!(shown(&err).contains(&*info.to_string_lossy()));
        std::fs::remove_file(&info).unwrap();
        nix::unistd::mkfifo(&info, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let root = dir.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(starlingx_locations(&root).map_err(|e| ops_kit::Chain(&e).to_string()));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading build.info blocked on a FIFO");
        let err = got.unwrap_err();
        assert!(
            err.contains("not a regular file") && err.contains(&*info.to_string_lossy()),
            "{err}"
        );
        std::fs::remove_file(&info).unwrap();
        std::fs::create_dir(&info).unwrap();
        let err = starlingx_locations(dir.path()).unwrap_err();
        assert!(
            shown(&err).contains("not a regular file"),
            "{}",
            shown(&err)
        );
    }

    /// A FIFO planted as the enabled-plugins file: no decision, at once.
    #[test]
    fn a_fifo_is_no_decision_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enabled_kube_plugins");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_file(&p));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO blocked")
            .unwrap_err();
        assert!(matches!(err, ReadError::NotRegular { .. }), "{err:?}");
        assert!(err.is_unavailable());
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
        assert!(matches!(err, ReadError::NotRegular { .. }), "{err:?}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_SIZE * 4]).unwrap();
        let err = read_file(&big).unwrap_err();
        assert!(
            matches!(err, ReadError::Invalid(ParseError::TooLarge { size, .. }) if size == MAX_SIZE + 1),
            "{err:?}"
        );
    }
}
