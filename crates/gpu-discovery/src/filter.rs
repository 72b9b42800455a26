//! Allow and deny lists of PCI device ids, parsed as leniently as the Go
//! plugin accepted them.

use std::collections::BTreeSet;
use std::fmt;

/// Which PCI device ids may be advertised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum IdFilter {
    /// Every id.
    #[default]
    All,
    /// Only these ids.
    Allow(BTreeSet<u16>),
    /// Every id but these.
    Deny(BTreeSet<u16>),
}

/// A list of device ids that means nothing sensible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// Both an allow and a deny list were given.
    #[error("both an allow list ({allow:?}) and a deny list ({deny:?}) were given; use one")]
    Both {
        /// The allow list as given.
        allow: String,
        /// The deny list as given.
        deny: String,
    },
    /// An item is not a hexadecimal PCI device id.
    #[error("{list} list item {item:?} is not a PCI device id such as 0x56a0")]
    BadId {
        /// `allow` or `deny`.
        list: &'static str,
        /// The offending item.
        item: String,
    },
}

/// A parsed filter and what was normalised on the way, for the caller to
/// log as warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter {
    /// The filter.
    pub filter: IdFilter,
    /// One message per item that was accepted but not written canonically.
    pub warnings: Vec<String>,
}

impl IdFilter {
    /// Builds a filter from the `--allow-ids` and `--deny-ids` values
    /// (empty or absent when not given). Items are separated by commas
    /// and/or white space; case, a missing `0x` and surrounding spaces are
    /// accepted with a warning.
    ///
    /// # Errors
    /// When both lists have items, or an item is not a 16-bit hex id.
    pub fn parse(allow: Option<&str>, deny: Option<&str>) -> Result<ParsedFilter, FilterError> {
        let allow = allow.unwrap_or("");
        let deny = deny.unwrap_or("");
        let mut warnings = Vec::new();
        let allow_ids = parse_list("allow", allow, &mut warnings)?;
        let deny_ids = parse_list("deny", deny, &mut warnings)?;
        let filter = match (allow_ids.is_empty(), deny_ids.is_empty()) {
            (true, true) => Self::All,
            (false, true) => Self::Allow(allow_ids),
            (true, false) => Self::Deny(deny_ids),
            (false, false) => {
                return Err(FilterError::Both {
                    allow: allow.to_owned(),
                    deny: deny.to_owned(),
                });
            }
        };
        Ok(ParsedFilter { filter, warnings })
    }

    /// Whether `device_id` passes the filter.
    #[must_use]
    pub fn admits(&self, device_id: u16) -> bool {
        match self {
            Self::All => true,
            Self::Allow(ids) => ids.contains(&device_id),
            Self::Deny(ids) => !ids.contains(&device_id),
        }
    }
}

impl fmt::Display for IdFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ids: &BTreeSet<u16>| {
            ids.iter()
                .map(|i| format!("{i:#06x}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Self::All => f.write_str("all device ids"),
            Self::Allow(ids) => write!(f, "only device ids {}", list(ids)),
            Self::Deny(ids) => write!(f, "all device ids but {}", list(ids)),
        }
    }
}

fn parse_list(
    list: &'static str,
    text: &str,
    warnings: &mut Vec<String>,
) -> Result<BTreeSet<u16>, FilterError> {
    let mut ids = BTreeSet::new();
    let items = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty());
    for item in items {
        let bad = || FilterError::BadId {
            list,
            item: item.to_owned(),
        };
        let digits = item
            .strip_prefix("0x")
            .or_else(|| item.strip_prefix("0X"))
            .unwrap_or(item);
        if digits.is_empty() || digits.len() > 4 {
            return Err(bad());
        }
        let id = u16::from_str_radix(digits, 16).map_err(|_| bad())?;
        let canonical = format!("{id:#06x}");
        if item != canonical {
            warnings.push(format!("{list} list item {item:?} read as {canonical}"));
        }
        if !ids.insert(id) {
            warnings.push(format!("{list} list names {canonical} more than once"));
        }
    }
    if text.contains(", ") || text.trim() != text || text.contains(",,") {
        warnings.push(format!(
            "{list} list {text:?} has extra spaces or commas; read as {}",
            {
                ids.iter()
                    .map(|i| format!("{i:#06x}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u16]) -> BTreeSet<u16> {
        v.iter().copied().collect()
    }

    #[test]
    fn lenient_lists_with_warnings() {
        let cases: &[(&str, &[u16], usize)] = &[
            ("0x56a0", &[0x56a0], 0),
            ("0x56a0,0x56c0", &[0x56a0, 0x56c0], 0),
            ("0x56A0", &[0x56a0], 1),
            ("56a0", &[0x56a0], 1),
            (" 0x56a0 , 0x56c0 ", &[0x56a0, 0x56c0], 1),
            ("0x56a0,,0x56c0", &[0x56a0, 0x56c0], 1),
            ("0x56a0 0x56c0", &[0x56a0, 0x56c0], 0),
            ("0x56a0,0x56a0", &[0x56a0], 1),
            ("0X0BD5", &[0x0bd5], 1),
        ];
        for (text, want, warns) in cases {
            let got = IdFilter::parse(Some(text), None).unwrap();
            assert_eq!(got.filter, IdFilter::Allow(ids(want)), "{text}");
            assert_eq!(got.warnings.len(), *warns, "{text}: {:?}", got.warnings);
        }
    }

    #[test]
    fn meaningless_input_is_rejected() {
        for bad in ["0xzz", "0x", "0x12345", "gpu", "-1", "0x56a0;0x56c0"] {
            let err = IdFilter::parse(None, Some(bad)).unwrap_err();
            assert!(
                matches!(err, FilterError::BadId { list: "deny", .. }),
                "{bad}: {err}"
            );
        }
        let err = IdFilter::parse(Some("0x56a0"), Some("0x56c0")).unwrap_err();
        assert!(matches!(err, FilterError::Both { .. }));
        assert!(err.to_string().contains("use one"));
    }

    #[test]
    fn empty_lists_admit_everything() {
        for (a, d) in [(None, None), (Some(""), Some("")), (Some(" , "), None)] {
            assert_eq!(IdFilter::parse(a, d).unwrap().filter, IdFilter::All);
        }
    }

    #[test]
    fn admits() {
        let allow = IdFilter::Allow(ids(&[0x56a0]));
        assert!(allow.admits(0x56a0) && !allow.admits(0x56c0));
        let deny = IdFilter::Deny(ids(&[0x56a0]));
        assert!(!deny.admits(0x56a0) && deny.admits(0x56c0));
        assert_eq!(deny.to_string(), "all device ids but 0x56a0");
    }
}
