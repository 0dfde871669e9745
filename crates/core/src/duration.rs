//! Durations as written in workflow files: `500ms`, `10s`, `5m`, `2h`, `1d` (fractions allowed,
//! a bare number means milliseconds). One parser for every place that takes a duration.

use crate::error::{Code, Result, SmithersError};

/// Parses a duration into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = || {
        SmithersError::new(
            Code::InvalidDuration,
            format!(
                "invalid duration `{text}`: use a number with a unit ms, s, m, h or d (e.g. `500ms`, `10s`, `1.5h`)"
            ),
        )
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let factor = match unit {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err(bad()),
    };
    let ms = (n * factor).floor();
    if !ms.is_finite() || ms > 1e15 {
        return Err(bad());
    }
    Ok(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("10s").unwrap(), 10_000);
        assert_eq!(parse_duration_ms("5m").unwrap(), 300_000);
        assert_eq!(parse_duration_ms("2h").unwrap(), 7_200_000);
        assert_eq!(parse_duration_ms("1d").unwrap(), 86_400_000);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1_500);
        assert_eq!(parse_duration_ms("250").unwrap(), 250);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "s",
            "10x",
            "1..2s",
            ".5s",
            "5.s",
            "-1s",
            "1e3s",
            "10 s",
            "99999999999999999999d",
        ] {
            let e = parse_duration_ms(bad).unwrap_err();
            assert_eq!(e.code, Code::InvalidDuration, "{bad}");
        }
    }
}
