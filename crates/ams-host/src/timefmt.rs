//! Time helpers: unix seconds, the described system's `dd/mm/yyyy @ HH:MM:SS`, ISO 8601.

use time::macros::format_description;
use time::OffsetDateTime;

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn at(secs: f64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `19/08/2020 @ 01:50:05` (UTC), as the described system showed times. (Formatted by hand:
/// the API writes five times per build, and this is several times faster than a format
/// description.)
pub fn legacy(secs: f64) -> String {
    let t = at(secs);
    format!(
        "{:02}/{:02}/{:04} @ {:02}:{:02}:{:02}",
        t.day(),
        u8::from(t.month()),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `2020-08-19T01:50:05Z`.
pub fn iso(secs: f64) -> String {
    let t = at(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `20200819-015005`, safe inside a file name (the `{created}` variable).
pub fn compact(secs: f64) -> String {
    at(secs)
        .format(format_description!(
            "[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::legacy(1597801805.5), "19/08/2020 @ 01:50:05");
        assert_eq!(super::iso(1597801805.5), "2020-08-19T01:50:05Z");
        assert_eq!(super::compact(1597801805.5), "20200819-015005");
        assert_eq!(super::legacy(0.0), "01/01/1970 @ 00:00:00");
        assert_eq!(super::iso(1709251199.0), "2024-02-29T23:59:59Z");
    }
}
