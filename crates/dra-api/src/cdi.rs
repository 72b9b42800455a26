//! CDI specs for prepared claims, on `devplugin-api`'s spec writer
//! (atomic, mode 0644, unchanged content not rewritten, only files with
//! the driver's prefix ever removed).
//!
//! One spec file per claim, `<prefix><claim uid>.json`, whose devices are
//! named `<claim uid>-<device>`: CDI names unique per claim (the DRA
//! helper's guidance, so a runtime's cache never hands one claim another
//! claim's edits), and a claim's spec written and removed on its own,
//! without rewriting a file other claims share while the kubelet prepares
//! them concurrently.

use std::collections::BTreeMap;

use devplugin_api::cdi::{CdiError, ContainerEdits, Spec, SpecDevice, SpecDir};

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

    fn file(&self, uid: &str) -> String {
        format!("{}{uid}.json", self.prefix)
    }

    /// Writes the spec of claim `uid` with one CDI device per `(device,
    /// edits)`, and returns their fully qualified names, in order.
    ///
    /// # Errors
    /// When the spec cannot be written (nothing is half written).
    pub fn write(
        &self,
        uid: &str,
        devices: &[(&str, ContainerEdits)],
    ) -> Result<Vec<String>, CdiError> {
        let spec = Spec {
            kind: self.kind.clone(),
            devices: devices
                .iter()
                .map(|(name, edits)| SpecDevice {
                    name: format!("{uid}-{name}"),
                    annotations: BTreeMap::new(),
                    container_edits: edits.clone(),
                })
                .collect(),
            container_edits: ContainerEdits::default(),
            annotations: BTreeMap::new(),
        };
        self.dir.write(&self.file(uid), &spec)?;
        Ok(devices
            .iter()
            .map(|(name, _)| format!("{}={uid}-{name}", self.kind))
            .collect())
    }

    /// Removes the spec of claim `uid`; a missing one is not an error.
    ///
    /// # Errors
    /// When it exists and cannot be removed.
    pub fn remove(&self, uid: &str) -> Result<(), CdiError> {
        let path = self.dir.dir().join(self.file(uid));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CdiError::Io {
                action: "remove",
                path,
                source,
            }),
        }
    }

    /// Removes the specs of claims not in `prepared` (after a crash between
    /// writing a spec and recording the claim, or a lost checkpoint).
    /// Returns the files removed.
    ///
    /// # Errors
    /// When the directory cannot be listed.
    pub fn retain<'a>(
        &self,
        prepared: impl IntoIterator<Item = &'a String>,
    ) -> Result<Vec<String>, CdiError> {
        let keep = prepared.into_iter().map(|uid| self.file(uid)).collect();
        Ok(self.dir.retain(&keep)?.removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_per_claim_names_unique_per_claim_removed_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let specs = ClaimSpecs::new(dir.path(), "example.com/gpu", "gpu.example.com-claim_");
        let edits = ContainerEdits {
            env: vec!["GPU=1".into()],
            ..ContainerEdits::default()
        };
        let ids = specs
            .write(
                "uid-1",
                &[("gpu-0", edits.clone()), ("gpu-1", edits.clone())],
            )
            .unwrap();
        assert_eq!(
            ids,
            ["example.com/gpu=uid-1-gpu-0", "example.com/gpu=uid-1-gpu-1"]
        );
        specs.write("uid-2", &[("gpu-0", edits)]).unwrap();
        let text =
            std::fs::read_to_string(dir.path().join("gpu.example.com-claim_uid-1.json")).unwrap();
        assert!(
            text.contains("\"uid-1-gpu-1\"") && text.contains("GPU=1"),
            "{text}"
        );
        specs.remove("uid-1").unwrap();
        specs.remove("uid-1").unwrap();
        assert!(!dir.path().join("gpu.example.com-claim_uid-1.json").exists());
        std::fs::write(dir.path().join("other-vendor.json"), "{}").unwrap();
        let removed = specs.retain(&["uid-9".to_owned()]).unwrap();
        assert_eq!(removed, ["gpu.example.com-claim_uid-2.json"]);
        assert!(dir.path().join("other-vendor.json").exists(), "not ours");
    }
}
