//! Files we own in directories others share, written and read so that
//! nobody else in the directory can turn the writer against the node.
//!
//! The threat: this process runs as root; `/var/run/cdi`, `/run` and the
//! kubelet's plugin directories are written by other root processes too
//! (any CDI producer, any DRA driver). A writer that creates a fixed
//! temporary name with a plain `open(O_CREAT)` follows a link planted at
//! that name, and so overwrites (and re-modes) whatever the link points
//! at. [`write_atomic`] never does:
//!
//! - the temporary file has a fresh random name (`.<name>.<random>.tmp`)
//!   and is created with `O_CREAT | O_EXCL | O_NOFOLLOW` relative to the
//!   directory's descriptor, so a planted link or file at that name makes
//!   the create fail (`EEXIST`) and another random name is tried — the
//!   plant is reported and never followed;
//! - its mode is set with `fchmod` on the descriptor (not by umask, not
//!   through a path);
//! - file and directory are synced, then the temporary is renamed over
//!   the target — `rename(2)` replaces a link planted at the target name
//!   itself, it does not write through it;
//! - the temporary is removed on every error path.
//!
//! [`read_capped`] reads a file we own by name without following a link
//! at the last component, refuses anything but a regular file (a FIFO
//! would block the reader for ever) and reads at most a given size.

use std::io::Read as _;
use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

/// Plants met by this process's writers (a link or file at a fresh
/// temporary name, a link at a file's own name): process-wide, because a
/// plant is a fact about the node, whichever writer met it.
static PLANTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many plants (links or files someone else put where this process's
/// writers create or replace files) the writers have met and refused to
/// follow since the process started: a daemon exports it as a metric and
/// reports a rise.
#[must_use]
pub fn planted_total() -> u64 {
    PLANTED.load(std::sync::atomic::Ordering::Relaxed)
}

fn count_plant() {
    PLANTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many random temporary names are tried before giving up (each
/// taken name is a plant or a collision of 64 random bits).
const ATTEMPTS: u32 = 8;

/// Why a file could not be written or read safely.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// The file name is not one plain component.
    #[error("{name:?} is not a plain file name (no '/', not '.' or '..', not empty)")]
    BadName {
        /// The name given.
        name: String,
    },
    /// A step of writing or reading failed.
    #[error("could not {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Every temporary name tried was taken.
    #[error(
        "could not create a temporary file for {} : {ATTEMPTS} random names were all taken",
        path.display()
    )]
    NoTemporary {
        /// The file that was to be written.
        path: PathBuf,
    },
    /// The file is not a regular file (a link, a FIFO, a directory, …).
    #[error("{} is not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than the reader accepts.
    #[error("{} is larger than {limit} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The cap.
        limit: u64,
    },
}

impl FsError {
    /// Whether the error is "the file does not exist".
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(Errno) -> FsError + use<> {
    let path = path.to_owned();
    move |errno| FsError::Io {
        action,
        path,
        source: std::io::Error::from(errno),
    }
}

/// `path` as the directory and the plain file name the functions here
/// take (a path without a directory is in `.`).
///
/// # Errors
/// [`FsError::BadName`] when it has no file name or one that is not UTF-8.
pub fn split(path: &Path) -> Result<(&Path, &str), FsError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FsError::BadName {
            name: path.display().to_string(),
        })?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((dir, name))
}

fn check_name(name: &str) -> Result<(), FsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn open_dir(dir: &Path) -> Result<OwnedFd, FsError> {
    // The directory itself is configuration (it may legitimately be
    // reached through a link, /var/run -> /run); only names inside it
    // are guarded.
    nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open the directory", dir))
}

fn temporary_name(name: &str) -> String {
    format!(".{name}.{:016x}.tmp", fastrand::u64(..))
}

/// Writes `content` as `dir/name` atomically with mode `mode` (see the
/// module's rules). The directory is created if missing. Returns whether
/// a link or file planted at a temporary name was met (and avoided).
///
/// # Errors
/// When the name is not a plain file name or any step fails; the target
/// then still holds its old content and no temporary file is left.
pub fn write_atomic(dir: &Path, name: &str, content: &[u8], mode: u32) -> Result<(), FsError> {
    check_name(name)?;
    let target = dir.join(name);
    std::fs::create_dir_all(dir).map_err(|source| FsError::Io {
        action: "create the directory of",
        path: target.clone(),
        source,
    })?;
    let dirfd = open_dir(dir)?;
    let perm = Mode::from_bits_truncate(mode);
    let (tmp, file) = 'created: {
        for _ in 0..ATTEMPTS {
            let tmp = temporary_name(name);
            match openat(
                &dirfd,
                tmp.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                perm,
            ) {
                Ok(fd) => break 'created (tmp, std::fs::File::from(fd)),
                Err(Errno::EEXIST) => {
                    count_plant();
                    let planted = dir.join(&tmp);
                    tracing::warn!(
                        path = %planted.display(),
                        "something already exists at a fresh temporary name (planted?); not followed, trying another"
                    );
                }
                Err(e) => return Err(io("create a temporary file for", &target)(e)),
            }
        }
        return Err(FsError::NoTemporary { path: target });
    };
    let tmp_path = dir.join(&tmp);
    let remove_tmp = || {
        let _ = unlinkat(&dirfd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    };
    let filled = (|| {
        let mut file = file;
        file.write_all(content).map_err(|source| FsError::Io {
            action: "write",
            path: tmp_path.clone(),
            source,
        })?;
        // The mode asked for, whatever the umask took away.
        fchmod(file.as_fd(), perm).map_err(io("set the mode of", &tmp_path))?;
        fsync(file.as_fd()).map_err(io("sync", &tmp_path))
    })();
    if let Err(e) = filled {
        remove_tmp();
        return Err(e);
    }
    if let Ok(st) = fstatat(&dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        && SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
    {
        count_plant();
        tracing::warn!(
            path = %target.display(),
            "a link stands at the file's own name; replacing the link, not writing through it"
        );
    }
    if let Err(e) = renameat(&dirfd, tmp.as_str(), &dirfd, name) {
        remove_tmp();
        return Err(io("rename into place", &target)(e));
    }
    // The rename itself must survive a crash.
    fsync(dirfd.as_fd()).map_err(io("sync the directory of", &target))
}

/// Reads the regular file `dir/name` — never through a link at `name`,
/// never a FIFO or device — and at most `limit` bytes of it.
///
/// # Errors
/// [`FsError::Io`] when it cannot be opened or read (see
/// [`FsError::is_not_found`]), [`FsError::NotRegular`] for a link or
/// anything but a regular file, [`FsError::TooLarge`] past the limit.
pub fn read_capped(dir: &Path, name: &str, limit: u64) -> Result<Vec<u8>, FsError> {
    check_name(name)?;
    let path = dir.join(name);
    let dirfd = open_dir(dir)?;
    let fd = open_regular(&dirfd, name, &path, OFlag::O_RDONLY, None)?;
    let mut out = Vec::new();
    std::fs::File::from(fd)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| FsError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
    if out.len() as u64 > limit {
        return Err(FsError::TooLarge { path, limit });
    }
    Ok(out)
}

/// Opens `name` in `dirfd` only if it is a regular file, and only that
/// file: first as a path (`O_PATH | O_NOFOLLOW`, which opens nothing —
/// opening a device node has effects of its own: a watchdog arms, a tty
/// becomes the controlling terminal; a FIFO blocks), then, once `fstat`
/// of that descriptor shows a regular file, that same inode is opened
/// through `/proc/self/fd` — no other file can be swapped in between.
/// With `create`, a missing file is created with that mode, `O_EXCL`.
fn open_regular(
    dirfd: &OwnedFd,
    name: &str,
    path: &Path,
    access: OFlag,
    create: Option<Mode>,
) -> Result<OwnedFd, FsError> {
    let flags = access | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let pinned = match openat(
        dirfd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if create.is_some() => {
            let mode = create.unwrap_or(Mode::empty());
            return match openat(dirfd, name, flags | OFlag::O_CREAT | OFlag::O_EXCL, mode) {
                Ok(fd) => Ok(fd),
                // Someone created it meanwhile: whatever it is, not ours.
                Err(Errno::EEXIST | Errno::ELOOP) => Err(FsError::NotRegular {
                    path: path.to_owned(),
                }),
                Err(e) => Err(io("create", path)(e)),
            };
        }
        Err(e) => return Err(io("open", path)(e)),
    };
    reopen_regular(&pinned, path, flags & !OFlag::O_NOFOLLOW)
}

/// Opens the inode `pinned` (an `O_PATH` descriptor) for real, if it is
/// a regular file.
fn reopen_regular(pinned: &OwnedFd, path: &Path, flags: OFlag) -> Result<OwnedFd, FsError> {
    use std::os::fd::AsRawFd as _;
    let st = fstat(pinned.as_fd()).map_err(io("inspect", path))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(FsError::NotRegular {
            path: path.to_owned(),
        });
    }
    let magic = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    nix::fcntl::open(magic.as_str(), flags, Mode::empty()).map_err(io("open", path))
}

/// Opens (creating it, mode `mode`, if missing; the directory must
/// exist) the regular file `dir/name` for reading and writing — never
/// through a link at `name` (symbolic or hard: a file with other names is
/// someone else's), never a FIFO or device: for lock files in shared
/// directories.
///
/// # Errors
/// As [`read_capped`], less the size.
pub fn open_owned(dir: &Path, name: &str, mode: u32) -> Result<std::fs::File, FsError> {
    check_name(name)?;
    let path = dir.join(name);
    let dirfd = open_dir(dir)?;
    let fd = open_regular(
        &dirfd,
        name,
        &path,
        OFlag::O_RDWR,
        Some(Mode::from_bits_truncate(mode)),
    )?;
    let st = fstat(fd.as_fd()).map_err(io("inspect", &path))?;
    if st.st_nlink != 1 {
        return Err(FsError::NotRegular { path });
    }
    Ok(std::fs::File::from(fd))
}

/// Opens the file at `path` for reading, following links (sysfs and
/// ConfigMap volumes are made of them), but only if what it leads to is a
/// regular file: opened first as a path (`O_PATH`, which opens nothing),
/// then that same inode through `/proc/self/fd`, `O_NONBLOCK | O_NOCTTY`.
/// `Ok(None)`: it is not a regular file (a FIFO, a device, a directory)
/// and was never opened.
///
/// # Errors
/// When it cannot be looked at or opened (`NotFound` for a missing one).
pub fn open_regular_following(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let pinned = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(std::io::Error::from)?;
    match reopen_regular(
        &pinned,
        path,
        OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
    ) {
        Ok(fd) => Ok(Some(std::fs::File::from(fd))),
        Err(FsError::NotRegular { .. }) => Ok(None),
        Err(FsError::Io { source, .. }) => Err(source),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// The bytes of the regular file `path` leads to (links followed, see
/// [`open_regular_following`]), at most `limit + 1` of them: the caller
/// tells "too large" by the length. `Ok(None)`: not a regular file.
///
/// # Errors
/// When it cannot be looked at, opened or read.
pub fn read_following_capped(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let Some(file) = open_regular_following(path)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    Ok(Some(out))
}

/// Removes the temporaries this module's writer leaves in `dir` when the
/// process is killed between create and rename
/// (`.<name>.<16 hex digits>.tmp` for names starting with `prefix`);
/// returns how many went. Call it at start, before writing: a temporary
/// of a live writer in another process would go too.
pub fn remove_stale_temporaries(dir: &Path, prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .is_some_and(|(base, hex)| {
                base.starts_with(prefix)
                    && hex.len() == 16
                    && hex.bytes().all(|b| b.is_ascii_hexdigit())
            });
        // Unlinking a name never follows it.
        if ours && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    #[test]
    fn writes_replace_atomically_with_the_mode_asked_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        write_atomic(&sub, "x.json", b"one", 0o600).unwrap();
        write_atomic(&sub, "x.json", b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(sub.join("x.json")).unwrap(), b"two");
        let mode = std::fs::metadata(sub.join("x.json")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["x.json"]);
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", ".", "..", "a/b", "../x"] {
            assert!(
                matches!(
                    write_atomic(dir.path(), name, b"", 0o600),
                    Err(FsError::BadName { .. })
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_link_at_the_target_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::os::unix::fs::symlink(&victim, shared.join("spec.json")).unwrap();
        write_atomic(&shared, "spec.json", b"ours", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        let meta = std::fs::symlink_metadata(shared.join("spec.json")).unwrap();
        assert!(meta.is_file());
        assert_eq!(std::fs::read(shared.join("spec.json")).unwrap(), b"ours");
    }

    /// Plants a link at every temporary name the writer will try (the
    /// thread's generator is seeded, so the names are known), and at the
    /// fixed name older writers used.
    fn plant(dir: &Path, victim: &Path, seed: u64, count: u32) {
        fastrand::seed(seed);
        for _ in 0..count {
            std::os::unix::fs::symlink(victim, dir.join(temporary_name("spec.json"))).unwrap();
        }
        std::os::unix::fs::symlink(victim, dir.join(".spec.json.tmp")).unwrap();
        fastrand::seed(seed);
    }

    #[test]
    fn links_planted_at_every_temporary_name_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("kubelet-state");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let shared = dir.path().join("cdi");
        std::fs::create_dir(&shared).unwrap();
        // All but the last name planted: written at the last.
        plant(&shared, &victim, 7, ATTEMPTS - 1);
        let before = planted_total();
        write_atomic(&shared, "spec.json", b"ours", 0o644).unwrap();
        assert!(
            planted_total() >= before + u64::from(ATTEMPTS - 1),
            "counted"
        );
        assert_eq!(std::fs::read(shared.join("spec.json")).unwrap(), b"ours");
        // Every name planted: refused, nothing written anywhere.
        let shared2 = dir.path().join("cdi2");
        std::fs::create_dir(&shared2).unwrap();
        plant(&shared2, &victim, 8, ATTEMPTS);
        assert!(matches!(
            write_atomic(&shared2, "spec.json", b"ours", 0o644),
            Err(FsError::NoTemporary { .. })
        ));
        assert!(!shared2.join("spec.json").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let meta = std::fs::metadata(&victim).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "never re-moded");
    }

    #[test]
    fn a_hard_link_is_not_an_owned_file_and_devices_are_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::hard_link(&victim, dir.path().join("lock")).unwrap();
        assert!(matches!(
            open_owned(dir.path(), "lock", 0o600),
            Err(FsError::NotRegular { .. })
        ));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A character device (root only: mknod) is refused before any
        // open; /dev/null stands in for a watchdog.
        let dev = dir.path().join("spec.json");
        // mknod needs root (CAP_MKNOD); elsewhere this part cannot run.
        if nix::sys::stat::mknod(
            &dev,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        )
        .is_ok()
        {
            assert!(matches!(
                read_capped(dir.path(), "spec.json", 9),
                Err(FsError::NotRegular { .. })
            ));
        } else {
            eprintln!("SKIPPED the device-node part: mknod is not permitted here");
        }
    }

    #[test]
    fn temporaries_of_a_killed_writer_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".claim_1.json.0123456789abcdef.tmp",
            ".claim_2.json.fedcba9876543210.tmp",
            ".claim_3.json.tmp",
            ".other.json.0123456789abcdef.tmp",
            "claim_4.json",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path(), "claim_"), 2);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".claim_3.json.tmp",
                ".other.json.0123456789abcdef.tmp",
                "claim_4.json"
            ]
        );
    }

    #[test]
    fn reads_refuse_links_fifos_and_oversize() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "12345").unwrap();
        assert_eq!(read_capped(dir.path(), "f", 5).unwrap(), b"12345");
        assert!(matches!(
            read_capped(dir.path(), "f", 4),
            Err(FsError::TooLarge { limit: 4, .. })
        ));
        std::os::unix::fs::symlink(dir.path().join("f"), dir.path().join("l")).unwrap();
        assert!(matches!(
            read_capped(dir.path(), "l", 99),
            Err(FsError::NotRegular { .. })
        ));
        nix::unistd::mkfifo(&dir.path().join("p"), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            read_capped(dir.path(), "p", 99),
            Err(FsError::NotRegular { .. })
        ));
        assert!(matches!(
            open_owned(dir.path(), "p", 0o600),
            Err(FsError::NotRegular { .. })
        ));
        assert!(matches!(
            open_owned(dir.path(), "l", 0o600),
            Err(FsError::NotRegular { .. })
        ));
        assert!(
            read_capped(dir.path(), "missing", 9)
                .unwrap_err()
                .is_not_found()
        );
        let f = open_owned(dir.path(), "lock", 0o600).unwrap();
        assert_eq!(f.metadata().unwrap().mode() & 0o777 & !0o022, 0o600);
    }
}
