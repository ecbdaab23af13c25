//! The caller's deadline, as gRPC carries it (the `grpc-timeout` header),
//! so that it can travel all the way to the database (see `db::within`).

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

/// When the caller stops waiting, if it said so; measured from now, which is
/// as close to the arrival of the request as a handler gets.
pub fn of(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse(value).map(|timeout| Instant::now() + timeout)
}

/// Parses a `grpc-timeout` value: 1 to 8 digits and a unit (H, M, S, m, u,
/// n). Anything else is ignored, as the gRPC spec tells servers to.
fn parse(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse_in_every_unit() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("10n"), Some(Duration::from_nanos(10)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S", "5x"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
