//! Driver names and DRA service names, checked as the kubelet and the API
//! server check them.

use std::fmt;

/// A name the framework refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("driver name {name:?} is invalid: {reason}")]
pub struct NameError {
    /// The name given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A DRA driver name: a DNS subdomain of at most 63 characters, lowercase
/// (`resource.k8s.io/v1` `ResourceSlice.spec.driver` validation; the
/// kubelet's plugin watcher names the plugin by it), e.g. `gpu.intel.com`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriverName(String);

/// The longest driver name the API accepts.
pub const MAX_DRIVER_NAME: usize = 63;

impl DriverName {
    /// Checks `name`.
    ///
    /// # Errors
    /// When it is empty, too long, or not a lowercase DNS subdomain.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let bad = |reason| NameError {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_DRIVER_NAME {
            return Err(bad("it is longer than 63 characters"));
        }
        for label in name.split('.') {
            let bytes = label.as_bytes();
            let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
                return Err(bad("it has an empty label (two dots, or a dot at an end)"));
            };
            if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
                return Err(bad(
                    "a label starts or ends with something other than a letter or digit",
                ));
            }
            if !bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            {
                return Err(bad(
                    "only lowercase letters, digits, '-' and '.' are allowed",
                ));
            }
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DRA gRPC service a driver serves, as `PluginInfo.supported_versions`
/// names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DraService {
    /// `v1.DRAPlugin`: chosen by kubelets 1.34+ when listed first.
    V1,
    /// `v1beta1.DRAPlugin`: what kubelets 1.32 and 1.33 use (they fall
    /// back to the removed v1alpha4 when it is missing).
    V1beta1,
}

impl DraService {
    /// Every service, in the order the framework advertises them: kubelets
    /// 1.34+ take the first they support, 1.32–1.33 look for v1beta1.
    pub const ALL: [Self; 2] = [Self::V1, Self::V1beta1];

    /// The identifier in `supported_versions`.
    #[must_use]
    pub fn identifier(self) -> &'static str {
        match self {
            Self::V1 => "v1.DRAPlugin",
            Self::V1beta1 => "v1beta1.DRAPlugin",
        }
    }

    /// The full gRPC service name on the wire.
    #[must_use]
    pub fn grpc_service(self) -> &'static str {
        match self {
            Self::V1 => "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
            Self::V1beta1 => "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_are_lowercase_dns_subdomains_of_at_most_63() {
        for ok in ["gpu.intel.com", "a", "x-1.example.com", "0abc"] {
            assert!(DriverName::new(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("GPU.intel.com", "lowercase"),
            ("gpu..intel.com", "empty label"),
            (".gpu", "empty label"),
            ("gpu-.intel.com", "starts or ends"),
            ("gpu_intel", "lowercase letters"),
            (&"a".repeat(64), "longer than 63"),
        ] {
            let e = DriverName::new(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
            assert_eq!(e.name, bad);
        }
    }

    #[test]
    fn services_are_named_as_the_kubelet_expects() {
        assert_eq!(DraService::ALL[0].identifier(), "v1.DRAPlugin");
        assert_eq!(DraService::V1beta1.identifier(), "v1beta1.DRAPlugin");
        assert!(DraService::V1.grpc_service().ends_with(".dra.v1.DRAPlugin"));
    }
}
