//! Kubernetes resource quantities (`500m`, `1.5`, `64Mi`, `1e3`) as integers the scheduler can
//! add: CPU in millicores, everything else in whole units (bytes, pods), rounded up as
//! kube-scheduler rounds requests.
//!
//! Hand-written: k8s-openapi keeps a `Quantity` as its string, and no maintained crate parses
//! the grammar without pulling in the whole apimachinery port.

/// A quantity that does not follow the Kubernetes grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a resource quantity (e.g. 500m, 2, 64Mi, 1G)")]
pub struct QuantityError(pub String);

/// `q` in thousandths of its unit (CPU millicores when `q` is CPU), rounded up, saturating.
pub fn milli(q: &str) -> Result<i64, QuantityError> {
    let bad = || QuantityError(q.to_string());
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num == "+" || num == "-" {
        return Err(bad());
    }
    // value = mantissa * 10^exp10 * 2^exp2, computed in milli units with i128.
    let (exp10, exp2): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        e if e.starts_with(['e', 'E']) => (e[1..].parse().map_err(|_| bad())?, 0),
        _ => return Err(bad()),
    };
    let negative = num.starts_with('-');
    let digits = num.strip_prefix(['+', '-']).unwrap_or(num);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // mantissa = int.frac as an integer times 10^-len(frac); milli units add 3 to exp10.
    let mantissa: i128 = format!("{int}{frac}")
        .trim_start_matches('0')
        .parse()
        .unwrap_or(0);
    let exp = exp10 + 3 - frac.len() as i32;
    let scaled = mantissa.saturating_mul(1i128 << exp2);
    let value = if exp >= 0 {
        scaled.saturating_mul(10i128.saturating_pow(exp as u32))
    } else {
        let div = 10i128.checked_pow((-exp) as u32).unwrap_or(i128::MAX);
        // Round up, as requests are.
        scaled / div + i128::from(scaled % div != 0)
    };
    let value = if negative { -value } else { value };
    Ok(value.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

/// `q` in whole units, rounded up (bytes of memory, pods).
pub fn units(q: &str) -> Result<i64, QuantityError> {
    let m = milli(q)?;
    Ok(m / 1000 + i64::from(m % 1000 > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_kubernetes_writes() {
        assert_eq!(milli("500m"), Ok(500));
        assert_eq!(milli("2"), Ok(2000));
        assert_eq!(milli("1.5"), Ok(1500));
        assert_eq!(milli("0.1"), Ok(100));
        assert_eq!(milli("100u"), Ok(1), "rounded up");
        assert_eq!(units("64Mi"), Ok(64 << 20));
        assert_eq!(units("1G"), Ok(1_000_000_000));
        assert_eq!(units("1.5Gi"), Ok(3 << 29));
        assert_eq!(units("1e3"), Ok(1000));
        assert_eq!(units("110"), Ok(110));
        assert_eq!(units("129Ki"), Ok(129 * 1024));
        assert_eq!(milli("0"), Ok(0));
    }

    #[test]
    fn garbage_is_refused_naming_it() {
        for q in ["", "m", "1x", "1.2.3", "Mi", "--1", "1 Mi"] {
            let e = milli(q).unwrap_err();
            assert_eq!(e.0, q);
        }
        assert!(milli("1Ei").is_ok(), "saturates instead of overflowing");
    }
}
