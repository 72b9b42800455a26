//! Prepared claims, kept on disk: the kubelet's unprepare call carries
//! only the claim's namespace, name and UID, so a driver must remember what
//! it prepared — across its own restarts too (the Go helper leaves this to
//! each driver).
//!
//! The file is JSON, `{"version": 1, "claims": {UID: {"namespace", "name",
//! "devices": [{"requests", "pool", "device", "cdiDeviceIds"}],
//! "cdiDevices": [CDI spec devices], "rebuilt"}}}`, written whole with
//! `ops_kit::fs::write_atomic` (mode 0600): a crash leaves the old file or
//! the new one, never a half. `cdiDevices` (the claim's CDI spec, so it
//! can be written again after a reboot empties the CDI directory) and
//! `rebuilt` were added within version 1: older records lack them and
//! older readers ignore them. A file that cannot be read as that is never
//! overwritten: it is moved aside (`<name>.corrupt`) and reported; the
//! server then rebuilds the record from the claims' CDI specs (see
//! [`crate::DraServer`]). The file is read capped at
//! [`MAX_CHECKPOINT_SIZE`] and never through a link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kubelet_plumbing::cdi::SpecDevice;
use serde::{Deserialize, Serialize};

/// The checkpoint format this code writes.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The largest checkpoint read (a node's claims take a few KiB each).
pub const MAX_CHECKPOINT_SIZE: u64 = 64 << 20;

/// One device prepared for a claim, and what the container runtime is
/// told about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The claim's requests the device serves (empty: all).
    pub requests: Vec<String>,
    /// The pool (the node's pool, for a node-local driver).
    pub pool: String,
    /// The device's name in the pool.
    pub device: String,
    /// Fully qualified CDI device names (`vendor/class=name`).
    pub cdi_device_ids: Vec<String>,
}

/// A claim this driver prepared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// The claim's namespace (empty in a record rebuilt from its spec).
    pub namespace: String,
    /// The claim's name (empty in a record rebuilt from its spec).
    pub name: String,
    /// What was prepared.
    pub devices: Vec<PreparedDevice>,
    /// The devices of the claim's CDI spec, as written (empty in records
    /// of older versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdi_devices: Vec<SpecDevice>,
    /// Rebuilt from the CDI spec after the checkpoint was lost: the
    /// devices in use are known, the requests and pool are not, so the
    /// claim's next prepare is done in full (and the record completed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebuilt: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    version: u32,
    claims: BTreeMap<String, PreparedClaim>,
    /// The boot the records were made in (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    /// A rebuild from the claims' specs could not read them all: specs not
    /// in the record may still be running pods', so none is swept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    rebuild_incomplete: bool,
}

/// A checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading, writing, syncing or renaming failed.
    #[error("could not {action} the checkpoint {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the file failed.
    #[error("could not {action} the checkpoint {}", path.display())]
    File {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ops_kit::fs::FsError,
    },
}

/// What loading found besides the claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// No checkpoint yet.
    Fresh,
    /// The checkpoint was read.
    Read,
    /// The file was not a checkpoint of this format; it was moved to
    /// `aside` and the record starts empty.
    Corrupt {
        /// Why it was refused.
        reason: String,
        /// Where it is now.
        aside: PathBuf,
    },
}

/// The prepared claims, by claim UID, backed by a file.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    claims: BTreeMap<String, PreparedClaim>,
    boot_id: Option<String>,
    rebuild_incomplete: bool,
}

impl Checkpoint {
    /// Reads the checkpoint at `path` (see the module's rules for a file
    /// that is not one).
    ///
    /// # Errors
    /// When the file exists but cannot be read, or a corrupt one cannot be
    /// moved aside.
    pub fn load(path: &Path) -> Result<(Self, Loaded), CheckpointError> {
        let empty = || Self {
            path: path.to_owned(),
            claims: BTreeMap::new(),
            boot_id: None,
            rebuild_incomplete: false,
        };
        let (dir, name) = ops_kit::fs::split(path).map_err(|source| CheckpointError::File {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        let bytes = match ops_kit::fs::read_capped(dir, name, MAX_CHECKPOINT_SIZE) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok((empty(), Loaded::Fresh)),
            // A link, a FIFO, a file too large: not a checkpoint of ours.
            Err(
                e @ (ops_kit::fs::FsError::NotRegular { .. }
                | ops_kit::fs::FsError::TooLarge { .. }),
            ) => {
                return Self::aside(path, e.to_string());
            }
            Err(source) => {
                return Err(CheckpointError::File {
                    action: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let reason = match serde_json::from_slice::<File>(&bytes) {
            Ok(f) if f.version == CHECKPOINT_VERSION => {
                return Ok((
                    Self {
                        path: path.to_owned(),
                        claims: f.claims,
                        boot_id: f.boot_id,
                        rebuild_incomplete: f.rebuild_incomplete,
                    },
                    Loaded::Read,
                ));
            }
            Ok(f) => format!(
                "format version {} (this driver writes {CHECKPOINT_VERSION})",
                f.version
            ),
            Err(e) => e.to_string(),
        };
        Self::aside(path, reason)
    }

    fn aside(path: &Path, reason: String) -> Result<(Self, Loaded), CheckpointError> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".corrupt");
        let aside = PathBuf::from(aside);
        std::fs::rename(path, &aside).map_err(|source| CheckpointError::Io {
            action: "move aside",
            path: path.to_owned(),
            source,
        })?;
        let empty = Self {
            path: path.to_owned(),
            claims: BTreeMap::new(),
            boot_id: None,
            rebuild_incomplete: false,
        };
        Ok((empty, Loaded::Corrupt { reason, aside }))
    }

    /// The claim prepared under `uid`, if any.
    #[must_use]
    pub fn get(&self, uid: &str) -> Option<&PreparedClaim> {
        self.claims.get(uid)
    }

    /// Every prepared claim.
    #[must_use]
    pub fn claims(&self) -> &BTreeMap<String, PreparedClaim> {
        &self.claims
    }

    /// Records a prepared claim; on disk before it returns.
    ///
    /// # Errors
    /// When the file cannot be written (the record is unchanged then).
    pub fn insert(&mut self, uid: &str, claim: PreparedClaim) -> Result<(), CheckpointError> {
        let old = self.claims.insert(uid.to_owned(), claim);
        self.save().inspect_err(|_| {
            match &old {
                Some(c) => self.claims.insert(uid.to_owned(), c.clone()),
                None => self.claims.remove(uid),
            };
        })
    }

    /// Forgets a claim; on disk before it returns.
    ///
    /// # Errors
    /// When the file cannot be written (the record is unchanged then).
    pub fn remove(&mut self, uid: &str) -> Result<(), CheckpointError> {
        let Some(old) = self.claims.remove(uid) else {
            return Ok(());
        };
        self.save().inspect_err(|_| {
            self.claims.insert(uid.to_owned(), old.clone());
        })
    }

    /// The boot the records were made in, if known.
    #[must_use]
    pub fn boot_id(&self) -> Option<&str> {
        self.boot_id.as_deref()
    }

    /// Whether a rebuild could not read every claim spec (then nothing
    /// may be swept).
    #[must_use]
    pub fn rebuild_incomplete(&self) -> bool {
        self.rebuild_incomplete
    }

    /// Moves the record into boot `boot_id`. A record made in another
    /// boot — or whose boot is not known (written by an older version) —
    /// is not trusted for device nodes: every claim is marked for a full prepare
    /// (`rebuilt`; nodes are numbered anew at every boot). The boot and
    /// `incomplete` are recorded; on disk before it returns. With `None`
    /// (the driver does not track boots) the record is trusted. Returns
    /// whether the record was of another (or an unknown) boot.
    ///
    /// # Errors
    /// When the file cannot be written (the record is unchanged then).
    pub fn enter_boot(
        &mut self,
        boot_id: Option<&str>,
        incomplete: bool,
    ) -> Result<bool, CheckpointError> {
        let other = match (boot_id, self.boot_id.as_deref()) {
            // The driver does not track boots: the record is trusted.
            (None, _) => false,
            (Some(now), Some(then)) => now != then,
            // Written before boots were recorded: not trusted.
            (Some(_), None) => !self.claims.is_empty(),
        };
        // Kept to put back if the file cannot be written.
        let before = (
            self.claims.clone(),
            self.boot_id.clone(),
            self.rebuild_incomplete,
        );
        let mut changed = self.rebuild_incomplete != incomplete;
        if other {
            for claim in self.claims.values_mut() {
                changed |= !claim.rebuilt || !claim.cdi_devices.is_empty();
                claim.rebuilt = true;
                // Another boot's edits are never written again.
                claim.cdi_devices.clear();
            }
        }
        if let Some(now) = boot_id
            && self.boot_id.as_deref() != Some(now)
        {
            self.boot_id = Some(now.to_owned());
            changed = true;
        }
        self.rebuild_incomplete = incomplete;
        if !changed {
            return Ok(other);
        }
        self.save().inspect_err(|_| {
            (self.claims, self.boot_id, self.rebuild_incomplete) = before.clone();
        })?;
        Ok(other)
    }

    /// Removes the temporaries a writer killed mid-write left beside the
    /// checkpoint at `path`; returns how many.
    #[must_use]
    pub fn remove_stale_temporaries(path: &Path) -> usize {
        ops_kit::fs::split(path).map_or(0, |(dir, name)| {
            ops_kit::fs::remove_stale_temporaries(dir, name)
        })
    }

    /// How many records are rebuilt (unverified) ones.
    #[must_use]
    pub fn rebuilt_count(&self) -> usize {
        self.claims.values().filter(|c| c.rebuilt).count()
    }

    /// Records claims rebuilt from their CDI specs (those already
    /// recorded are kept as they are); on disk before it returns.
    ///
    /// # Errors
    /// When the file cannot be written (the record is unchanged then).
    pub fn rebuild(
        &mut self,
        rebuilt: BTreeMap<String, PreparedClaim>,
    ) -> Result<(), CheckpointError> {
        let before = self.claims.clone();
        for (uid, claim) in rebuilt {
            self.claims.entry(uid).or_insert(claim);
        }
        self.save().inspect_err(|_| self.claims = before)
    }

    fn save(&self) -> Result<(), CheckpointError> {
        let file = File {
            version: CHECKPOINT_VERSION,
            claims: self.claims.clone(),
            boot_id: self.boot_id.clone(),
            rebuild_incomplete: self.rebuild_incomplete,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| CheckpointError::Io {
            action: "encode",
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let file_error = |source| CheckpointError::File {
            action: "write",
            path: self.path.clone(),
            source,
        };
        let (dir, name) = ops_kit::fs::split(&self.path).map_err(file_error)?;
        ops_kit::fs::write_atomic(dir, name, &text, 0o600).map_err(file_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str) -> PreparedClaim {
        PreparedClaim {
            namespace: "default".into(),
            name: name.into(),
            devices: vec![PreparedDevice {
                requests: vec!["gpu".into()],
                pool: "node-0".into(),
                device: "gpu-0".into(),
                cdi_device_ids: vec!["example.com/gpu=gpu-0".into()],
            }],
            cdi_devices: Vec::new(),
            rebuilt: false,
        }
    }

    #[test]
    fn a_link_or_fifo_at_the_checkpoint_is_set_aside_never_read_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "{\"version\": 1, \"claims\": {}}").unwrap();
        let path = dir.path().join("prepared-claims.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let (mut c, how) = Checkpoint::load(&path).unwrap();
        assert!(matches!(how, Loaded::Corrupt { .. }), "{how:?}");
        c.insert("uid-1", claim("a")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "{\"version\": 1, \"claims\": {}}"
        );
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (_, how) = Checkpoint::load(&fifo).unwrap();
        assert!(matches!(how, Loaded::Corrupt { .. }), "{how:?}");
    }

    #[test]
    fn claims_survive_a_reload_and_removal_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/prepared-claims.json");
        let (mut c, how) = Checkpoint::load(&path).unwrap();
        assert_eq!(how, Loaded::Fresh);
        c.insert("uid-1", claim("a")).unwrap();
        c.insert("uid-2", claim("b")).unwrap();
        c.remove("uid-1").unwrap();
        c.remove("never").unwrap();
        let (again, how) = Checkpoint::load(&path).unwrap();
        assert_eq!(how, Loaded::Read);
        assert_eq!(again.claims().len(), 1);
        assert_eq!(again.get("uid-2"), Some(&claim("b")));
        let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["prepared-claims.json"], "no temporary file left");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"cdiDeviceIds\"") && text.contains("\"version\": 1"),
            "{text}"
        );
    }

    #[test]
    fn a_corrupt_or_foreign_checkpoint_is_moved_aside_not_overwritten() {
        for content in [
            "{\"version\": 1, \"claims\": {\"x\": ",
            "{\"version\": 7, \"claims\": {}}",
            "",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("prepared-claims.json");
            std::fs::write(&path, content).unwrap();
            let (c, how) = Checkpoint::load(&path).unwrap();
            assert!(c.claims().is_empty());
            let Loaded::Corrupt { reason, aside } = how else {
                panic!("{content:?}: {how:?}")
            };
            assert!(!reason.is_empty());
            assert_eq!(
                std::fs::read_to_string(&aside).unwrap(),
                content,
                "kept for the operator"
            );
            assert!(!path.exists());
        }
    }

    #[test]
    fn a_failed_write_leaves_the_record_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = Checkpoint::load(&dir.path().join("sub/prepared-claims.json")).unwrap();
        // The checkpoint's directory turns out to be a file: nothing can
        // be written (root ignores permissions, not this).
        std::fs::write(dir.path().join("sub"), "").unwrap();
        let e = c.insert("uid-1", claim("a")).unwrap_err();
        assert!(e.to_string().contains("prepared-claims.json"), "{e}");
        assert!(c.get("uid-1").is_none());
    }
}
