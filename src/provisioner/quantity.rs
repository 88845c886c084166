//! Kubernetes resource quantities (`500Mi`, `1G`, `1.5Gi`, `1e9`) as bytes.
//!
//! A claim's `resources.requests.storage` arrives as a string; the CSI
//! `CapacityRange` wants bytes. Fractional results are rounded up, because a
//! volume must hold at least what was asked for.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError {
    pub value: String,
    pub reason: &'static str,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "quantity {:?} {}", self.value, self.reason)
    }
}

impl std::error::Error for QuantityError {}

/// Parses a quantity into whole bytes (rounded up); negative values and
/// values beyond `i64` are refused.
pub fn to_bytes(value: &str) -> Result<i64, QuantityError> {
    let err = |reason| QuantityError {
        value: value.to_string(),
        reason,
    };
    let s = value.trim();
    if s.is_empty() {
        return Err(err("is empty"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    // A decimal exponent ("1e9", "2E3") is a suffix of its own kind.
    let (multiplier, divisor): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        exp if exp.starts_with(['e', 'E']) => {
            let e: u32 = exp[1..]
                .parse()
                .map_err(|_| err("has a malformed exponent"))?;
            if e > 30 {
                return Err(err("is too large"));
            }
            (10u128.pow(e), 1)
        }
        _ => return Err(err("has an unknown suffix")),
    };
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.starts_with('-') {
        return Err(err("is negative"));
    }
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(err("has no digits"));
    }
    if !whole
        .chars()
        .chain(frac.chars())
        .all(|c| c.is_ascii_digit())
        || frac.len() > 18
    {
        return Err(err("is not a number"));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err("is too large"))?
    };
    let frac_scale = 10u128.pow(frac.len() as u32);
    let frac_val: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| err("is not a number"))?
    };
    // value = (whole + frac_val/frac_scale) * multiplier / divisor, rounded up.
    let numerator = whole
        .checked_mul(frac_scale)
        .and_then(|v| v.checked_add(frac_val))
        .and_then(|v| v.checked_mul(multiplier))
        .ok_or_else(|| err("is too large"))?;
    let denominator = frac_scale * divisor;
    let bytes = numerator.div_ceil(denominator);
    i64::try_from(bytes).map_err(|_| err("is too large"))
}

/// Bytes as a Kubernetes quantity: the largest binary suffix that divides
/// it exactly (`500Mi`), else plain bytes. Exact, so it parses back to the
/// same number.
pub fn format(bytes: i64) -> String {
    const SUFFIXES: [(&str, i64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    SUFFIXES
        .iter()
        .find(|(_, unit)| bytes > 0 && bytes % unit == 0)
        .map(|(suffix, unit)| format!("{}{suffix}", bytes / unit))
        .unwrap_or_else(|| bytes.to_string())
}

/// Formats bytes for people: the largest binary unit that keeps one decimal.
pub fn human(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[unit])
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes() {
        assert_eq!(to_bytes("500Mi").unwrap(), 500 * 1024 * 1024);
        assert_eq!(to_bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(to_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(to_bytes("2k").unwrap(), 2000);
        assert_eq!(to_bytes("1048576").unwrap(), 1_048_576);
        assert_eq!(to_bytes("1e9").unwrap(), 1_000_000_000);
    }

    #[test]
    fn fractions_round_up_to_whole_bytes() {
        assert_eq!(to_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(to_bytes("1500m").unwrap(), 2);
        assert_eq!(to_bytes("0.1Ki").unwrap(), 103);
    }

    #[test]
    fn garbage_is_refused_with_the_value_named() {
        for bad in ["", "Mi", "-1Gi", "1Xi", "1.2.3", "99999999999Ei", "1e99"] {
            let e = to_bytes(bad).unwrap_err();
            assert_eq!(e.value, bad);
        }
    }

    #[test]
    fn exact_quantities_round_trip() {
        for b in [500 << 20, 3 << 29, 4096, 1000, 0, 5 << 40] {
            assert_eq!(to_bytes(&format(b)).unwrap(), b);
        }
        assert_eq!(format(500 << 20), "500Mi");
        assert_eq!(format(1000), "1000");
    }

    #[test]
    fn human_readable_sizes() {
        assert_eq!(human(500 * 1024 * 1024), "500Mi");
        assert_eq!(human(1536 * 1024 * 1024), "1.5Gi");
        assert_eq!(human(12), "12B");
    }
}
