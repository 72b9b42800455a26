//! One GPU, one owner: the device plugin and the DRA driver of a node
//! must never both hand out its GPUs. Whichever holds the node's owner
//! lock — an exclusive `flock(2)` on one host file both mount — serves;
//! the other waits and serves nothing. The kernel drops the lock when its
//! holder exits, however it exits, so a crashed owner never blocks the
//! other for good. The file names the holder for people (and for the
//! waiting side's log); the lock, not the text, is what counts.
//!
//! Which of the two runs at all is chosen per node by a label (see
//! `docs/dra.md`); the lock is what makes the rule hold while a node
//! changes mode or when both were started by hand.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The node label choosing who hands out a node's GPUs: `dra` (the DRA
/// driver) or `device-plugin` (the default). The labeller marks the node
/// for the chosen DaemonSet only (`intelgpu=enabled` or
/// `intelgpu-dra=enabled`); the DRA driver also reads it and stands by on
/// a `device-plugin` node.
pub const MODE_LABEL: &str = "intel.com/gpu-allocation";
/// [`MODE_LABEL`]'s value for the DRA driver.
pub const MODE_DRA: &str = "dra";
/// [`MODE_LABEL`]'s value for the device plugin.
pub const MODE_DEVICE_PLUGIN: &str = "device-plugin";

/// How often a waiting side tries the lock: an open and a `flock`, so a
/// handover takes at most this long.
pub const POLL: Duration = Duration::from_millis(200);

/// The lock file the shipped manifests mount in both DaemonSets.
pub const DEFAULT_OWNER_LOCK: &str = "/run/intel-gpu/owner.lock"; // tidy: allow-host-path

/// Why the lock could not be taken or tried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnerError {
    /// The file cannot be opened or created.
    #[error("cannot open the GPU owner lock {}", path.display())]
    Open {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ops_kit::fs::FsError,
    },
    /// `flock` failed for another reason than contention.
    #[error("cannot lock {}: {errno}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The errno.
        errno: Errno,
    },
}

/// The held lock; dropping it (or exiting) lets the other side in.
#[derive(Debug)]
pub struct OwnerLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl OwnerLock {
    /// Takes the lock at `path` for `who` (e.g. `intel-gpu-dra pid 42`),
    /// or says who holds it.
    ///
    /// # Errors
    /// When the file cannot be opened or locked for another reason than
    /// someone else holding it.
    pub fn try_acquire(path: &Path, who: &str) -> Result<Result<Self, String>, OwnerError> {
        // Never through a link planted at the name, never a FIFO: the
        // directory is a hostPath other processes may write.
        let open_error = |source| OwnerError::Open {
            path: path.to_owned(),
            source,
        };
        let (dir, name) = ops_kit::fs::split(path).map_err(open_error)?;
        let file = ops_kit::fs::open_owned(dir, name, 0o644).map_err(open_error)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                // The holder's name, for the other side's log; the lock
                // itself does not depend on it.
                let _ = lock.set_len(0);
                let _ = lock.rewind();
                let _ = writeln!(lock, "{who}");
                Ok(Ok(Self {
                    _lock: lock,
                    path: path.to_owned(),
                }))
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                // A name, not a file to read whole: capped.
                let _ = (&mut file).take(4096).read_to_string(&mut text);
                let holder = text.trim();
                Ok(Err(if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    holder.to_owned()
                }))
            }
            Err((_, errno)) => Err(OwnerError::Lock {
                path: path.to_owned(),
                errno,
            }),
        }
    }

    /// Waits for the lock, trying every `every` and calling `waiting`
    /// with the holder's name whenever it is found held by someone new
    /// (so the caller can log and report not-ready without repeating
    /// itself).
    ///
    /// # Errors
    /// As [`OwnerLock::try_acquire`].
    pub async fn acquire(
        path: &Path,
        who: &str,
        every: Duration,
        mut waiting: impl FnMut(&str),
    ) -> Result<Self, OwnerError> {
        let mut last = None;
        loop {
            match Self::try_acquire(path, who)? {
                Ok(lock) => return Ok(lock),
                Err(holder) => {
                    if last.as_ref() != Some(&holder) {
                        waiting(&holder);
                        last = Some(holder);
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_at_a_time_and_the_next_after_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner.lock");
        let plugin = OwnerLock::try_acquire(&path, "intel-gpu-plugin pid 1")
            .unwrap()
            .unwrap();
        // flock locks belong to the open file description: a second open,
        // even in the same process, is refused as another process is.
        let refused = OwnerLock::try_acquire(&path, "intel-gpu-dra pid 2")
            .unwrap()
            .unwrap_err();
        assert_eq!(refused, "intel-gpu-plugin pid 1");
        drop(plugin);
        let dra = OwnerLock::try_acquire(&path, "intel-gpu-dra pid 2")
            .unwrap()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dra.path()).unwrap(),
            "intel-gpu-dra pid 2\n"
        );
    }

    #[test]
    fn a_link_or_fifo_planted_at_the_lock_name_is_refused_and_not_touched() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("kubelet-state");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("owner.lock");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let mode = std::fs::metadata(&victim).unwrap().mode();
        let err = OwnerLock::try_acquire(&path, "x").unwrap_err();
        assert!(
            ops_kit::Chain(&err)
                .to_string()
                .contains("not a regular file"),
            "{}",
            ops_kit::Chain(&err)
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode(), mode);
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Returns at once (a plain open of a FIFO would wait for a writer).
        assert!(OwnerLock::try_acquire(&path, "x").is_err());
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let err = OwnerLock::try_acquire(Path::new("/nonexistent/dir/owner.lock"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/dir/owner.lock"), "{err}");
    }
}
