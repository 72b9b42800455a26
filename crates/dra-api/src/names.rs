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

/// Why a claim reference from the kubelet is refused before it reaches a
/// path (the CDI spec's file name), a URL (the claim's GET) or the
/// checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("claim {field} {value:?} is invalid: {reason}")]
pub struct ClaimRefError {
    /// Which part: `uid`, `namespace` or `name`.
    pub field: &'static str,
    /// What was given (cut at 80 bytes).
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks a claim's UID: an object UID as the API server makes them, a
/// lowercase RFC 4122 UUID (`8-4-4-4-12` hexadecimal digits; apimachinery
/// `types.UID` from `uuid.NewUUID`). Anything else — a `/`, `..`, a NUL —
/// never becomes part of a file name.
///
/// # Errors
/// When it is not such a UUID.
pub fn check_uid(uid: &str) -> Result<(), ClaimRefError> {
    let groups: Vec<&str> = uid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    let ok = groups.len() == lengths.len()
        && groups.iter().zip(lengths).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(claim_error(
            "uid",
            uid,
            "not a lowercase UUID (8-4-4-4-12 hexadecimal digits)",
        ))
    }
}

fn claim_error(field: &'static str, value: &str, reason: &'static str) -> ClaimRefError {
    let mut cut = value.len().min(80);
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    ClaimRefError {
        field,
        value: value.get(..cut).unwrap_or_default().to_owned(),
        reason,
    }
}

fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(f), Some(l)) => {
            b.len() <= 63
                && f.is_ascii_alphanumeric()
                && l.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        }
        _ => false,
    }
}

/// Checks what the kubelet says of a claim: the UID ([`check_uid`]), the
/// namespace a DNS label (RFC 1123, at most 63 characters), the name a DNS
/// subdomain (at most 253 characters; ResourceClaim names are validated
/// as such by the API server).
///
/// # Errors
/// The first part that is invalid.
pub fn check_claim_ref(namespace: &str, name: &str, uid: &str) -> Result<(), ClaimRefError> {
    check_uid(uid)?;
    if !dns_label(namespace) {
        return Err(claim_error(
            "namespace",
            namespace,
            "not a DNS label (lowercase letters, digits, '-', at most 63)",
        ));
    }
    if name.is_empty() || name.len() > 253 || !name.split('.').all(dns_label) {
        return Err(claim_error(
            "name",
            name,
            "not a DNS subdomain (lowercase letters, digits, '-', '.', at most 253)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod claim_ref_tests {
    use super::*;

    #[test]
    fn claim_references_are_checked_before_they_reach_a_path_or_url() {
        let uid = "0b5e8c7a-1f2d-4c3b-9a8e-7d6c5b4a3f21";
        assert_eq!(check_claim_ref("default", "gpu-claim.a", uid), Ok(()));
        for (ns, name, uid, field) in [
            ("default", "c", "x/../../victim", "uid"),
            (
                "default",
                "c",
                "0B5E8C7A-1F2D-4C3B-9A8E-7D6C5B4A3F21",
                "uid",
            ),
            ("default", "c", "0b5e8c7a-1f2d-4c3b-9a8e-7d6c5b4a3f2", "uid"),
            (
                "default",
                "c",
                "0b5e8c7a-1f2d-4c3b-9a8e-7d6c5b4a3f2/",
                "uid",
            ),
            ("default", "c", "", "uid"),
            ("../kube-system", "c", uid, "namespace"),
            ("default", "a/b", uid, "name"),
            ("default", "..", uid, "name"),
            ("default", "", uid, "name"),
            ("default", "a?x=1", uid, "name"),
        ] {
            let err = check_claim_ref(ns, name, uid).unwrap_err();
            assert_eq!(err.field, field, "{ns} {name} {uid}");
        }
        let long = "é".repeat(100);
        assert!(
            check_claim_ref("default", &long, uid)
                .unwrap_err()
                .value
                .len()
                <= 80
        );
    }
}
