//! Kubernetes label syntax: keys (`[prefix/]name`) and values.

use std::fmt;

/// The longest label name (the part after an optional prefix) and value.
pub const MAX_NAME_LEN: usize = 63;
/// The longest label key prefix (a DNS subdomain).
pub const MAX_PREFIX_LEN: usize = 253;

/// A node label `key=value` whose key and value are valid Kubernetes label
/// syntax.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    key: String,
    value: String,
}

impl Label {
    /// A label from a key and a value.
    ///
    /// # Errors
    /// When the key or the value is not valid label syntax; the message says
    /// which rule is broken.
    pub fn new(key: &str, value: &str) -> Result<Self, LabelError> {
        check_key(key).map_err(|reason| LabelError::Key {
            key: key.to_owned(),
            reason,
        })?;
        check_value(value).map_err(|reason| LabelError::Value {
            value: value.to_owned(),
            reason,
        })?;
        Ok(Self {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Parses `key=value` (the first `=` separates them).
    ///
    /// # Errors
    /// When there is no `=`, or the key or the value is invalid.
    pub fn parse(text: &str) -> Result<Self, LabelError> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| LabelError::NotKeyValue {
                text: text.to_owned(),
            })?;
        Self::new(key, value)
    }

    /// The label key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The label value.
    #[must_use]
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// A label that is not valid Kubernetes label syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// The text has no `=` between key and value.
    #[error("{text:?} is not a label of the form key=value")]
    NotKeyValue {
        /// The offending text.
        text: String,
    },
    /// The key is invalid.
    #[error("invalid label key {key:?}: {reason}")]
    Key {
        /// The offending key.
        key: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The value is invalid.
    #[error("invalid label value {value:?}: {reason}")]
    Value {
        /// The offending value.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a
/// name of 1 to 63 characters.
///
/// # Errors
/// The rule the key breaks.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            check_dns_subdomain(prefix)?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("the name part is empty");
    }
    check_name(name)
}

/// Checks a label value: empty, or 1 to 63 characters of the name syntax.
///
/// # Errors
/// The rule the value breaks.
pub fn check_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value)
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let first_last_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    if !first_last_ok(name.as_bytes().first()) || !first_last_ok(name.as_bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn check_dns_subdomain(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("the prefix before '/' is empty");
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return Err("the prefix is longer than 253 characters");
    }
    for part in prefix.split('.') {
        let ok = !part.is_empty()
            && part.len() <= 63
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err(
                "the prefix must be a DNS subdomain (lower-case letters, digits, '-', '.')",
            );
        }
    }
    Ok(())
}

/// The prefix of a label key (`gpu.intel.com` of `gpu.intel.com/tiles`),
/// or `None` for an unprefixed key.
#[must_use]
pub fn prefix(key: &str) -> Option<&str> {
    key.split_once('/').map(|(prefix, _)| prefix)
}

/// The prefixes Kubernetes keeps for its own labels: `kubernetes.io` and
/// `k8s.io`, with every subdomain of either (`node-role.kubernetes.io`,
/// `topology.kubernetes.io`, `node-restriction.kubernetes.io`, …).
pub const RESERVED_DOMAINS: [&str; 2] = ["kubernetes.io", "k8s.io"];

/// Whether `prefix` is one of [`RESERVED_DOMAINS`] or a subdomain of one.
/// Labels there steer node identity and scheduling (`kubernetes.io/hostname`,
/// `node-role.kubernetes.io/*`, `topology.kubernetes.io/zone`).
#[must_use]
pub fn is_reserved_prefix(prefix: &str) -> bool {
    let prefix = prefix.to_ascii_lowercase();
    RESERVED_DOMAINS.iter().any(|d| {
        prefix == *d
            || prefix
                .strip_suffix(d)
                .is_some_and(|head| head.ends_with('.'))
    })
}

/// Checks a label key prefix on its own: a DNS subdomain of at most 253
/// characters.
///
/// # Errors
/// The rule the prefix breaks.
pub fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    check_dns_subdomain(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "intelgpu",
            "gpu.intel.com/device-id.0300-56a0.present",
            "a",
            "A_b.c-D",
            "x.y/z",
        ] {
            assert_eq!(check_key(ok), Ok(()), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "/x",
            "x/",
            "-a",
            "a-",
            "a b",
            "Intel.com/x",
            "a/b/c",
            "é",
            long.as_str(),
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserved_prefixes() {
        for reserved in [
            "kubernetes.io",
            "k8s.io",
            "node-role.kubernetes.io",
            "node-restriction.kubernetes.io",
            "topology.kubernetes.io",
            "a.b.k8s.io",
            "Kubernetes.IO",
        ] {
            assert!(is_reserved_prefix(reserved), "{reserved}");
        }
        for free in [
            "gpu.intel.com",
            "notkubernetes.io",
            "k8s.io.example.com",
            "xk8s.io",
            "kubernetes.io-x",
            "io",
        ] {
            assert!(!is_reserved_prefix(free), "{free}");
        }
        assert_eq!(prefix("kubernetes.io/hostname"), Some("kubernetes.io"));
        assert_eq!(prefix("intelgpu"), None);
        assert_eq!(check_prefix("gpu.intel.com"), Ok(()));
        assert!(check_prefix("Intel.com").is_err());
        assert!(check_prefix("").is_err());
    }

    #[test]
    fn values() {
        assert_eq!(check_value(""), Ok(()));
        assert_eq!(check_value("enabled"), Ok(()));
        assert!(check_value("en abled").is_err());
        assert!(check_value("a/b").is_err());
        assert!(check_value(&"v".repeat(64)).is_err());
    }

    #[test]
    fn parse_splits_at_first_equals() {
        let l = Label::parse("intelgpu=enabled").unwrap();
        assert_eq!((l.key(), l.value()), ("intelgpu", "enabled"));
        assert_eq!(l.to_string(), "intelgpu=enabled");
        assert!(matches!(
            Label::parse("intelgpu"),
            Err(LabelError::NotKeyValue { .. })
        ));
        assert!(matches!(
            Label::parse("a=b=c"),
            Err(LabelError::Value { .. })
        ));
        assert!(matches!(Label::parse("=x"), Err(LabelError::Key { .. })));
    }
}
