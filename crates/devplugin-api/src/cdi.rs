//! Container Device Interface specs: the writer and the spec model live in
//! `kubelet-plumbing` (re-exported here, so `devplugin_api::cdi::*` keeps
//! working); [`CdiName`], the name the device plugin answers `Allocate`
//! with, is validated here.

pub use kubelet_plumbing::cdi::*;

/// A fully qualified CDI device name, `vendor.com/class=name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CdiName(String);

impl CdiName {
    /// Builds `kind=name` where kind is `vendor/class`.
    ///
    /// # Errors
    /// When the kind is not `vendor/class` or the name is empty or holds
    /// characters CDI does not allow.
    pub fn new(kind: &str, name: &str) -> Result<Self, crate::InvalidName> {
        let full = format!("{kind}={name}");
        let bad = |reason| crate::InvalidName::Cdi {
            name: full.clone(),
            reason,
        };
        let (vendor, class) = kind
            .split_once('/')
            .ok_or_else(|| bad("the kind must be vendor/class"))?;
        let ok = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
        };
        if !ok(vendor, b"-_.") || !ok(class, b"-_") {
            return Err(bad(
                "vendor and class must be letters, digits, '-', '_' (and '.' in the vendor)",
            ));
        }
        if !ok(name, b"-_.:") {
            return Err(bad(
                "the device name must be letters, digits, '-', '_', '.', ':'",
            ));
        }
        Ok(Self(full))
    }

    /// The full name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CdiName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
