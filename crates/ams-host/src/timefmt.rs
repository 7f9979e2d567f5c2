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

/// `19/08/2020 @ 01:50:05` (UTC), as the described system showed times.
pub fn legacy(secs: f64) -> String {
    at(secs)
        .format(format_description!(
            "[day]/[month]/[year] @ [hour]:[minute]:[second]"
        ))
        .unwrap_or_default()
}

/// `2020-08-19T01:50:05Z`.
pub fn iso(secs: f64) -> String {
    at(secs)
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default()
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
    }
}
