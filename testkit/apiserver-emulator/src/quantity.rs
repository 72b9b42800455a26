//! Kubernetes quantities (`staging/src/k8s.io/apimachinery/pkg/api/
//! resource/quantity.go`): a decimal number with an optional binary
//! (`Ki`…`Ei`) or decimal (`m`, `k`, `M`…`E`) suffix or exponent, here in
//! thousandths (so `1m` is 1 and `1Gi` is 1 073 741 824 000). Enough for
//! capacities, counters and requests; fractions finer than `m` round up
//! as the API server's canonical form does.

/// A quantity in thousandths of a unit.
pub(crate) type Milli = i128;

/// Parses `text`, or `None` when it is not a quantity.
pub(crate) fn parse(text: &str) -> Option<Milli> {
    let t = text;
    let (sign, t) = match t.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, t.strip_prefix('+').unwrap_or(t)),
    };
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(end);
    if number.is_empty() || number == "." {
        return None;
    }
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits: String = format!("{int}{frac}");
    let mantissa: i128 = digits.parse().ok()?;
    let scale = i32::try_from(frac.len()).ok()?;
    // value = mantissa × 10^-scale × multiplier; in milli: × 1000.
    let (num, den): (i128, i128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 10i128.pow(6), 1),
        "G" => (1000 * 10i128.pow(9), 1),
        "T" => (1000 * 10i128.pow(12), 1),
        "P" => (1000 * 10i128.pow(15), 1),
        "E" => (1000 * 10i128.pow(18), 1),
        "Ki" => (1000 << 10, 1),
        "Mi" => (1000 << 20, 1),
        "Gi" => (1000 << 30, 1),
        "Ti" => (1000 << 40, 1),
        "Pi" => (1000 << 50, 1),
        "Ei" => (1000 << 60, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().ok()?;
            if exp >= 0 {
                (1000 * 10i128.checked_pow(u32::try_from(exp).ok()?)?, 1)
            } else {
                (1000, 10i128.checked_pow(u32::try_from(-exp).ok()?)?)
            }
        }
        _ => return None,
    };
    let den = den.checked_mul(10i128.checked_pow(u32::try_from(scale).ok()?)?)?;
    let value = mantissa.checked_mul(num)?;
    // Round up, as the canonical form does for sub-milli fractions.
    let milli = value.checked_add(den - 1)? / den;
    Some(sign * milli)
}

/// The integer value (`Quantity.Value()`: rounded up to a whole unit), in
/// whole units, which the API's step checks use.
pub(crate) fn whole(m: Milli) -> i128 {
    if m >= 0 { (m + 999) / 1000 } else { m / 1000 }
}

/// `m` as a quantity text: whole units when it is whole (binary-suffixed
/// when it is a multiple of 1Mi, as the allocator's `BinarySI` results
/// print), else milli.
pub(crate) fn format(m: Milli) -> String {
    if m % 1000 != 0 {
        return format!("{m}m");
    }
    let units = m / 1000;
    for (suffix, shift) in [("Gi", 30), ("Mi", 20)] {
        if units != 0 && units % (1 << shift) == 0 {
            return format!("{}{suffix}", units >> shift);
        }
    }
    units.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse("1"), Some(1000));
        assert_eq!(parse("250m"), Some(250));
        assert_eq!(parse("1.5"), Some(1500));
        assert_eq!(parse("1Ki"), Some(1024 * 1000));
        assert_eq!(parse("16Gi"), Some((16i128 << 30) * 1000));
        assert_eq!(parse("2k"), Some(2_000_000));
        assert_eq!(parse("1e3"), Some(1_000_000));
        assert_eq!(parse("0.0001"), Some(1), "rounded up");
        for bad in ["", "Gi", "1X", "1.2.3", ".", " 1", &"9".repeat(45)] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(format(parse("16Gi").unwrap()), "16Gi");
        assert_eq!(format(parse("512Mi").unwrap()), "512Mi");
        assert_eq!(format(parse("250").unwrap()), "250");
        assert_eq!(format(parse("250m").unwrap()), "250m");
        assert_eq!(whole(parse("250m").unwrap()), 1);
    }
}
