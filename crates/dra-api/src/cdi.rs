//! CDI specs for prepared claims, on `devplugin-api`'s spec writer
//! (atomic through `ops_kit::fs`, mode 0644, unchanged content not
//! rewritten, only files with the driver's prefix ever removed). The
//! [`crate::DraServer`] owns them: it writes a claim's spec before it
//! answers, writes it again wherever a claim is answered from the record,
//! and rebuilds the record from them when the checkpoint is lost.
//!
//! One spec file per claim, `<prefix><claim uid>.json`, whose devices are
//! named `<claim uid>-<device>`: CDI names unique per claim (the DRA
//! helper's guidance, so a runtime's cache never hands one claim another
//! claim's edits), and a claim's spec written and removed on its own,
//! without rewriting a file other claims share while the kubelet prepares
//! them concurrently. The spec names its claim (file name) and its devices
//! (device names), which is what lets a lost checkpoint be rebuilt.
//!
//! Every UID is checked ([`crate::check_uid`]) before it becomes part of a
//! file name.

use std::collections::BTreeMap;

use kubelet_plumbing::cdi::{CdiError, ContainerEdits, Spec, SpecDevice, SpecDir};

use crate::names::{ClaimRefError, check_uid};

/// Why a claim's spec could not be written, read or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimSpecError {
    /// The claim's UID cannot name a file.
    #[error(transparent)]
    Uid(#[from] ClaimRefError),
    /// The spec writer failed.
    #[error(transparent)]
    Cdi(#[from] CdiError),
    /// A spec on disk is not ours to read.
    #[error("the CDI spec {file} cannot be read back: {reason}")]
    Unreadable {
        /// Its file name.
        file: String,
        /// Why.
        reason: String,
    },
}

/// The CDI specs of a driver's claims.
#[derive(Debug, Clone)]
pub struct ClaimSpecs {
    dir: SpecDir,
    kind: String,
    prefix: String,
}

impl ClaimSpecs {
    /// Specs of CDI kind `kind` (`vendor/class`, e.g. `intel.com/gpu`) in
    /// `dir` (the runtime's CDI directory, e.g. `/var/run/cdi`), files named
    /// `<prefix><claim uid>.json` (the prefix should name the driver, e.g.
    /// `gpu.intel.com-claim_`).
    #[must_use]
    pub fn new(dir: impl Into<std::path::PathBuf>, kind: &str, prefix: &str) -> Self {
        Self {
            dir: SpecDir::new(dir, prefix),
            kind: kind.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &std::path::Path {
        self.dir.dir()
    }

    /// Removes the temporaries a writer killed between create and rename
    /// left for this driver's specs; returns how many.
    pub fn remove_stale_temporaries(&self) -> usize {
        self.dir.remove_stale_temporaries()
    }

    fn file(&self, uid: &str) -> Result<String, ClaimRefError> {
        check_uid(uid)?;
        Ok(format!("{}{uid}.json", self.prefix))
    }

    /// The CDI device of `device` in claim `uid`'s spec: `<uid>-<device>`.
    #[must_use]
    pub fn device_name(uid: &str, device: &str) -> String {
        format!("{uid}-{device}")
    }

    /// The fully qualified CDI name of a spec device.
    #[must_use]
    pub fn qualified(&self, spec_device: &str) -> String {
        format!("{}={spec_device}", self.kind)
    }

    /// Writes the spec of claim `uid` with one CDI device per `(device,
    /// edits)`, and returns their fully qualified names, in order.
    ///
    /// # Errors
    /// When the UID is invalid or the spec cannot be written (nothing is
    /// half written).
    pub fn write(
        &self,
        uid: &str,
        devices: &[(&str, ContainerEdits)],
    ) -> Result<Vec<String>, ClaimSpecError> {
        let spec_devices: Vec<SpecDevice> = devices
            .iter()
            .map(|(name, edits)| SpecDevice {
                name: Self::device_name(uid, name),
                annotations: BTreeMap::new(),
                container_edits: edits.clone(),
            })
            .collect();
        self.write_devices(uid, &spec_devices)?;
        Ok(spec_devices
            .iter()
            .map(|d| self.qualified(&d.name))
            .collect())
    }

    /// Writes the spec of claim `uid` with exactly these devices (as
    /// recorded); returns whether the file had to be written (it was
    /// missing or different).
    ///
    /// # Errors
    /// When the UID is invalid or the spec cannot be written.
    pub fn write_devices(&self, uid: &str, devices: &[SpecDevice]) -> Result<bool, ClaimSpecError> {
        let spec = Spec {
            kind: self.kind.clone(),
            devices: devices.to_vec(),
            container_edits: ContainerEdits::default(),
            annotations: BTreeMap::new(),
        };
        Ok(self.dir.write(&self.file(uid)?, &spec)?)
    }

    /// Whether claim `uid`'s spec is on disk (a link there does not count).
    #[must_use]
    pub fn exists(&self, uid: &str) -> bool {
        self.file(uid).is_ok_and(|f| {
            std::fs::symlink_metadata(self.dir.dir().join(f)).is_ok_and(|m| m.is_file())
        })
    }

    /// Removes the spec of claim `uid`; a missing one is not an error.
    ///
    /// # Errors
    /// When the UID is invalid, or the spec exists and cannot be removed.
    pub fn remove(&self, uid: &str) -> Result<(), ClaimSpecError> {
        let path = self.dir.dir().join(self.file(uid)?);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CdiError::Io {
                action: "remove",
                path,
                source,
            }
            .into()),
        }
    }

    /// Removes the specs of claims not in `prepared` (after a crash between
    /// writing a spec and recording the claim). Only ever called with a
    /// checkpoint that was read whole: a lost record is rebuilt from the
    /// specs, never swept. Returns the files removed.
    ///
    /// # Errors
    /// When the directory cannot be listed.
    pub fn retain<'a>(
        &self,
        prepared: impl IntoIterator<Item = &'a String>,
    ) -> Result<Vec<String>, ClaimSpecError> {
        let keep = prepared
            .into_iter()
            .filter_map(|uid| self.file(uid).ok())
            .collect();
        Ok(self.dir.retain(&keep)?.removed)
    }

    /// The claim specs of this driver on disk whose UID `skip` does not
    /// reject, by claim UID, at most `limit` of them: what each holds (see
    /// [`Listed`]). Files whose name does not hold a valid UID are not
    /// looked at.
    ///
    /// # Errors
    /// When the directory cannot be listed (a missing one holds nothing).
    pub fn list(
        &self,
        limit: usize,
        skip: impl Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, Listed>, ClaimSpecError> {
        let entries = match std::fs::read_dir(self.dir.dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(CdiError::Io {
                    action: "list the directory of",
                    path: self.dir.dir().to_owned(),
                    source,
                }
                .into());
            }
        };
        let mut out = BTreeMap::new();
        for entry in entries.flatten() {
            if out.len() >= limit {
                break;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(uid) = name
                .strip_prefix(&self.prefix)
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if check_uid(uid).is_err() || skip(uid) {
                continue;
            }
            out.insert(uid.to_owned(), self.read_devices(uid, &name));
        }
        Ok(out)
    }

    fn read_devices(&self, uid: &str, file: &str) -> Listed {
        let bytes = match ops_kit::fs::read_capped(self.dir.dir(), file, MAX_CLAIM_SPEC) {
            Ok(b) => b,
            Err(
                e @ (ops_kit::fs::FsError::NotRegular { .. }
                | ops_kit::fs::FsError::TooLarge { .. }),
            ) => return Listed::NotOurs(e.to_string()),
            Err(e) => return Listed::Unreadable(ops_kit::Chain(&e).to_string()),
        };
        let spec = match Spec::from_json(&bytes) {
            Ok(s) => s,
            Err(e) => return Listed::NotOurs(format!("not a CDI spec of ours: {e}")),
        };
        if spec.kind != self.kind {
            return Listed::NotOurs(format!("its kind is {}, not {}", spec.kind, self.kind));
        }
        let own = format!("{uid}-");
        if let Some(d) = spec.devices.iter().find(|d| !d.name.starts_with(&own)) {
            return Listed::NotOurs(format!("device {} is not named for claim {uid}", d.name));
        }
        Listed::Ours(spec.devices)
    }
}

/// The largest claim spec this driver writes (a few KiB): a larger file
/// with a claim spec's name is not ours.
pub const MAX_CLAIM_SPEC: u64 = 256 << 10;

/// What a file with a claim spec's name holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// A spec this driver could have written: its devices.
    Ours(Vec<SpecDevice>),
    /// Not one this driver writes (a link, a FIFO, too large, another
    /// kind, devices not named for the claim, not JSON): why.
    NotOurs(String),
    /// It could not be read (an I/O error): it may be a running pod's.
    Unreadable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID1: &str = "11111111-1111-4111-8111-111111111111";
    const UID2: &str = "22222222-2222-4222-8222-222222222222";

    #[test]
    fn a_spec_per_claim_names_unique_per_claim_removed_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let specs = ClaimSpecs::new(dir.path(), "example.com/gpu", "gpu.example.com-claim_");
        let edits = ContainerEdits {
            env: vec!["GPU=1".into()],
            ..ContainerEdits::default()
        };
        let ids = specs
            .write(UID1, &[("gpu-0", edits.clone()), ("gpu-1", edits.clone())])
            .unwrap();
        assert_eq!(
            ids,
            [
                format!("example.com/gpu={UID1}-gpu-0"),
                format!("example.com/gpu={UID1}-gpu-1")
            ]
        );
        specs.write(UID2, &[("gpu-0", edits)]).unwrap();
        let file1 = dir
            .path()
            .join(format!("gpu.example.com-claim_{UID1}.json"));
        let text = std::fs::read_to_string(&file1).unwrap();
        assert!(
            text.contains(&format!("\"{UID1}-gpu-1\"")) && text.contains("GPU=1"),
            "{text}"
        );
        let listed = specs.list(10, |_| false).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(matches!(&listed[UID1], Listed::Ours(d) if d.len() == 2));
        specs.remove(UID1).unwrap();
        specs.remove(UID1).unwrap();
        assert!(!file1.exists());
        std::fs::write(dir.path().join("other-vendor.json"), "{}").unwrap();
        let removed = specs
            .retain(&["33333333-3333-4333-8333-333333333333".to_owned()])
            .unwrap();
        assert_eq!(removed, [format!("gpu.example.com-claim_{UID2}.json")]);
        assert!(dir.path().join("other-vendor.json").exists(), "not ours");
    }

    #[test]
    fn a_uid_that_is_not_a_uuid_never_becomes_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let cdi = dir.path().join("cdi");
        let victim = dir.path().join("victim.json");
        std::fs::write(&victim, "precious").unwrap();
        let specs = ClaimSpecs::new(&cdi, "example.com/gpu", "p_");
        for uid in ["x/../../victim", "../victim", ""] {
            assert!(matches!(specs.remove(uid), Err(ClaimSpecError::Uid(_))));
            assert!(matches!(
                specs.write(uid, &[("gpu-0", ContainerEdits::default())]),
                Err(ClaimSpecError::Uid(_))
            ));
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn specs_that_cannot_be_read_back_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let specs = ClaimSpecs::new(dir.path(), "example.com/gpu", "p_");
        std::fs::write(dir.path().join(format!("p_{UID1}.json")), "{not json").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join(format!("p_{UID2}.json")))
            .unwrap();
        std::fs::write(dir.path().join("p_not-a-uid.json"), "{}").unwrap();
        let listed = specs.list(10, |_| false).unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(matches!(&listed[UID1], Listed::NotOurs(_)));
        assert!(
            matches!(&listed[UID2], Listed::NotOurs(why) if why.contains("not a regular file"))
        );
        assert_eq!(specs.list(1, |_| false).unwrap().len(), 1, "limited");
        assert!(
            !specs.list(10, |u| u == UID1).unwrap().contains_key(UID1),
            "skipped"
        );
        assert!(!specs.exists(UID2), "a link is not a spec");
    }
}
