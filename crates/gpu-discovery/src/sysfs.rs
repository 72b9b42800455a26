//! Careful reads of sysfs and devfs: every read is capped, every failure
//! carries the path, nothing panics on garbage, and nothing blocks: a
//! file is opened with `O_NONBLOCK` and refused unless it is a regular
//! file (a FIFO planted where an attribute belongs would otherwise hold
//! `inspect` or the scanner for ever).

use std::path::{Path, PathBuf};

/// The most bytes read from one attribute file.
pub(crate) const MAX_ATTR: u64 = 4096;

/// Why a sysfs attribute could not be used; each names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttrError {
    /// The file does not exist.
    #[error("{} is missing", .0.display())]
    Missing(PathBuf),
    /// Reading it failed (the OS error's text).
    #[error("{path} could not be read: {1}", path = .0.display())]
    Unreadable(PathBuf, String),
    /// It is not a regular file (a FIFO, a socket, a device, a directory):
    /// not read, since reading it could block or never end.
    #[error("{} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    /// It is larger than any attribute we read.
    #[error("{} is larger than {MAX_ATTR} bytes", .0.display())]
    TooLarge(PathBuf),
    /// It is not UTF-8.
    #[error("{} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    /// It holds something other than what it should (clipped text, and
    /// what was expected).
    #[error("{path} holds {1:?}, not {2}", path = .0.display())]
    Garbage(PathBuf, String, &'static str),
}

/// The bytes of the regular file at `path`, at most `limit` of them.
/// Only a regular file is opened (`ops_kit::fs::open_regular_following`:
/// looked at first, opened `O_NONBLOCK | O_NOCTTY`, the same inode
/// checked); links are followed (sysfs is made of them).
///
/// # Errors
/// [`AttrError::Missing`], [`AttrError::NotRegular`],
/// [`AttrError::TooLarge`] or [`AttrError::Unreadable`], naming `path`.
pub(crate) fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, AttrError> {
    // Looked at before it is opened: a device node is never opened (that
    // alone has effects), a FIFO never waited on.
    let bytes = ops_kit::fs::read_following_capped(path, limit)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AttrError::Missing(path.to_owned())
            } else {
                AttrError::Unreadable(path.to_owned(), e.to_string())
            }
        })?
        .ok_or_else(|| AttrError::NotRegular(path.to_owned()))?;
    if bytes.len() as u64 > limit {
        return Err(AttrError::TooLarge(path.to_owned()));
    }
    Ok(bytes)
}

/// The trimmed text of an attribute file: at most 4096 bytes of UTF-8 in
/// a regular file, opened without blocking (a FIFO or device planted at
/// `path` is refused, never waited on). For callers outside the scan that
/// read sysfs by name (hwmon temperatures, `power/runtime_status`).
///
/// # Errors
/// Each [`AttrError`] names `path`.
pub fn read_attribute(path: &Path) -> Result<String, AttrError> {
    read_attr(path)
}

/// The trimmed text of an attribute file.
pub(crate) fn read_attr(path: &Path) -> Result<String, AttrError> {
    let bytes = read_capped(path, MAX_ATTR)?;
    let text = String::from_utf8(bytes).map_err(|_| AttrError::NotUtf8(path.to_owned()))?;
    Ok(text.trim().to_owned())
}

/// A `0x`-prefixed hexadecimal attribute (`vendor`, `device`, `class`).
pub(crate) fn read_hex(path: &Path, max: u32) -> Result<u32, AttrError> {
    let text = read_attr(path)?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u32::from_str_radix(digits, 16)
        .ok()
        .filter(|v| *v <= max && !digits.is_empty() && digits.len() <= 8)
        .ok_or_else(|| AttrError::Garbage(path.to_owned(), clip(&text), "a hexadecimal number"))
}

/// A decimal attribute.
pub(crate) fn read_dec<T: std::str::FromStr>(
    path: &Path,
    what: &'static str,
) -> Result<T, AttrError> {
    let text = read_attr(path)?;
    text.parse()
        .map_err(|_| AttrError::Garbage(path.to_owned(), clip(&text), what))
}

/// The names in a directory, sorted; an unreadable or missing directory
/// gives none. Names that are not UTF-8 are left out.
pub(crate) fn list_dir(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// `prefix` followed by a decimal number: the number.
pub(crate) fn numbered(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Names in `dir` with `prefix` and a number, sorted numerically.
pub(crate) fn numbered_entries(dir: &Path, prefix: &str) -> Vec<(u32, String)> {
    numbered_among(&list_dir(dir), prefix)
}

/// Names among `names` with `prefix` and a number, sorted numerically.
pub(crate) fn numbered_among(names: &[String], prefix: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = names
        .iter()
        .filter_map(|n| numbered(n, prefix).map(|i| (i, n.clone())))
        .collect();
    out.sort();
    out
}

/// The final path component of a symlink's target (e.g. a driver name).
pub(crate) fn link_basename(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

/// Whether `name` is a PCI address `dddd:bb:dd.f`.
pub(crate) fn is_pci_address(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
        && [0, 1, 2, 3, 5, 6, 8, 9]
            .iter()
            .all(|&i| b[i].is_ascii_digit() || (b'a'..=b'f').contains(&b[i]))
}

/// Quotes at most 64 characters of garbage for a message.
pub(crate) fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(64).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        for ok in ["0000:03:00.0", "0000:4d:1f.7", "abcd:ef:01.2"] {
            assert!(is_pci_address(ok), "{ok}");
        }
        for bad in [
            "0000:03:00.8",
            "0000:03:00",
            "0000:03:0g.0",
            "0000-03:00.0",
            "pci0000:00",
            "0000:03:00.0x",
        ] {
            assert!(!is_pci_address(bad), "{bad}");
        }
    }

    #[test]
    fn numbered_names() {
        assert_eq!(numbered("card10", "card"), Some(10));
        assert_eq!(numbered("card0-DP-1", "card"), None);
        assert_eq!(numbered("card", "card"), None);
        assert_eq!(numbered("card99999999999", "card"), None);
        assert_eq!(numbered("renderD128", "renderD"), Some(128));
    }

    #[test]
    fn attributes_are_capped_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        std::fs::write(&p, "0x8086\n").unwrap();
        assert_eq!(read_hex(&p, 0xffff), Ok(0x8086));
        std::fs::write(&p, "0x18086\n").unwrap();
        assert!(matches!(read_hex(&p, 0xffff), Err(AttrError::Garbage(..))));
        std::fs::write(&p, "banana").unwrap();
        assert!(matches!(read_hex(&p, 0xffff), Err(AttrError::Garbage(..))));
        std::fs::write(&p, b"\xff\xfe").unwrap();
        assert!(matches!(read_attr(&p), Err(AttrError::NotUtf8(_))));
        std::fs::write(&p, vec![b'1'; 5000]).unwrap();
        assert!(matches!(read_attr(&p), Err(AttrError::TooLarge(_))));
        assert!(matches!(
            read_attr(&dir.path().join("none")),
            Err(AttrError::Missing(_))
        ));
        assert!(matches!(
            read_attr(dir.path()),
            Err(AttrError::NotRegular(_))
        ));
    }

    /// A FIFO planted where an attribute belongs: refused at once, naming
    /// the path, instead of blocking (on the old code `File::open` waits
    /// for a writer for ever, so this test would hang; the thread and the
    /// timeout turn that into a failure).
    #[test]
    fn a_fifo_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("vendor");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_hex(&p, 0xffff));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading a FIFO blocked");
        let err = got.unwrap_err();
        assert_eq!(err, AttrError::NotRegular(fifo.clone()));
        assert!(err.to_string().contains(&*fifo.to_string_lossy()), "{err}");
        // /dev/null: a character device, refused the same way.
        assert!(matches!(
            read_attr(Path::new("/dev/null")),
            Err(AttrError::NotRegular(_))
        ));
    }

    /// The scanner over a tree with a FIFO where card0's `vendor` belongs:
    /// it finishes, and the card is not advertised, for that reason.
    #[test]
    fn a_fifo_in_the_tree_does_not_stop_the_scan() {
        use fake_gpu_node::{FakeNode, NodeSpec};
        let dir = tempfile::tempdir().unwrap();
        let node = FakeNode::build(dir.path(), &NodeSpec::starlingx_edge()).unwrap();
        let vendor = node.sysfs_root().join("class/drm/card0/device/vendor");
        std::fs::remove_file(&vendor).unwrap();
        nix::unistd::mkfifo(&vendor, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let config = crate::DiscoveryConfig::new(node.sysfs_root(), node.devfs_root());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(crate::scan(&config));
        });
        let inventory = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the scan blocked on a FIFO")
            .unwrap();
        let shown = serde_json::to_string(&inventory).unwrap();
        assert!(inventory.advertised().all(|g| g.card != "card0"), "{shown}");
        assert!(shown.contains("is not a regular file"), "{shown}");
        assert!(inventory.advertised().count() > 0, "{shown}");
    }
}
