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

/// Appends `v` as at least `width` decimal digits.
fn push_num(out: &mut String, v: i32, width: usize) {
    let mut digits = [0u8; 11];
    let mut n = v.unsigned_abs();
    let mut len = 0;
    while n > 0 || len < width {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
    }
    if v < 0 {
        out.push('-');
    }
    out.extend(digits[..len].iter().rev().map(|&d| d as char));
}

/// `19/08/2020 @ 01:50:05` (UTC), as the described system showed times. (Formatted by hand:
/// the API writes five times per build, and `format!` took a tenth of an uncached build
/// list's time.)
pub fn legacy(secs: f64) -> String {
    let t = at(secs);
    let mut s = String::with_capacity(21);
    push_num(&mut s, t.day().into(), 2);
    s.push('/');
    push_num(&mut s, u8::from(t.month()).into(), 2);
    s.push('/');
    push_num(&mut s, t.year(), 4);
    s.push_str(" @ ");
    push_clock(&mut s, t);
    s
}

/// `01:50:05`, the time of day both formats end with.
fn push_clock(s: &mut String, t: OffsetDateTime) {
    push_num(s, t.hour().into(), 2);
    s.push(':');
    push_num(s, t.minute().into(), 2);
    s.push(':');
    push_num(s, t.second().into(), 2);
}

/// `2020-08-19T01:50:05Z`.
pub fn iso(secs: f64) -> String {
    let t = at(secs);
    let mut s = String::with_capacity(20);
    push_num(&mut s, t.year(), 4);
    s.push('-');
    push_num(&mut s, u8::from(t.month()).into(), 2);
    s.push('-');
    push_num(&mut s, t.day().into(), 2);
    s.push('T');
    push_clock(&mut s, t);
    s.push('Z');
    s
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
        // Years before 1000 keep four digits; before year 1, a sign.
        assert_eq!(super::iso(-59011459200.0), "0100-01-01T00:00:00Z");
        assert_eq!(super::iso(-62198755200.0), "-0001-01-01T00:00:00Z");
        assert_eq!(super::legacy(253402300799.0), "31/12/9999 @ 23:59:59");
    }
}
