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

/// A time formatted on the stack: the API writes five per build, and a `String` each was a
/// tenth of an uncached build list's allocations. Serializes as the string it holds.
#[derive(Clone, Copy)]
pub struct TimeText {
    buf: [u8; 24],
    len: u8,
}

impl TimeText {
    fn new() -> TimeText {
        TimeText {
            buf: [0; 24],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever pushed, so this never fails.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(usize::from(self.len)) {
            *slot = b;
            self.len += 1;
        }
    }

    fn push_str(&mut self, s: &str) {
        s.bytes().for_each(|b| self.push(b));
    }

    /// Appends `v` as at least `width` decimal digits.
    fn push_num(&mut self, v: i32, width: usize) {
        let mut digits = [0u8; 11];
        let mut n = v.unsigned_abs();
        let mut len = 0;
        while n > 0 || len < width {
            digits[len] = b'0' + (n % 10) as u8;
            n /= 10;
            len += 1;
        }
        if v < 0 {
            self.push(b'-');
        }
        digits[..len].iter().rev().for_each(|&d| self.push(d));
    }

    /// `01:50:05`, the time of day both formats end with.
    fn push_clock(&mut self, t: OffsetDateTime) {
        self.push_num(t.hour().into(), 2);
        self.push(b':');
        self.push_num(t.minute().into(), 2);
        self.push(b':');
        self.push_num(t.second().into(), 2);
    }
}

impl std::fmt::Display for TimeText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TimeText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl serde::Serialize for TimeText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `19/08/2020 @ 01:50:05` (UTC), as the described system showed times. (Formatted by hand:
/// `format!` took a tenth of an uncached build list's time.)
pub fn legacy_text(secs: f64) -> TimeText {
    let t = at(secs);
    let mut s = TimeText::new();
    s.push_num(t.day().into(), 2);
    s.push(b'/');
    s.push_num(u8::from(t.month()).into(), 2);
    s.push(b'/');
    s.push_num(t.year(), 4);
    s.push_str(" @ ");
    s.push_clock(t);
    s
}

/// [`legacy_text`] as a `String`.
pub fn legacy(secs: f64) -> String {
    legacy_text(secs).as_str().to_owned()
}

/// `2020-08-19T01:50:05Z`.
pub fn iso_text(secs: f64) -> TimeText {
    let t = at(secs);
    let mut s = TimeText::new();
    s.push_num(t.year(), 4);
    s.push(b'-');
    s.push_num(u8::from(t.month()).into(), 2);
    s.push(b'-');
    s.push_num(t.day().into(), 2);
    s.push(b'T');
    s.push_clock(t);
    s.push(b'Z');
    s
}

/// [`iso_text`] as a `String`.
pub fn iso(secs: f64) -> String {
    iso_text(secs).as_str().to_owned()
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
        assert_eq!(super::legacy(-62198755200.0), "01/01/-0001 @ 00:00:00");
        // The stack form serializes as the same string.
        assert_eq!(
            serde_json::to_string(&super::iso_text(1597801805.5)).unwrap(),
            "\"2020-08-19T01:50:05Z\""
        );
    }
}
