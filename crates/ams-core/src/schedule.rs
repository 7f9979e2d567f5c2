//! Schedules of pipeline-config.json: standard five-field cron expressions in UTC, and the rule
//! that decides when a schedule fires: once per due slot, and a run of slots missed while the
//! host was down fires once, not once per slot.

use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use serde::Deserialize;

/// Most schedules one project may have.
pub const MAX_SCHEDULES: usize = 16;

/// One entry of `"schedules"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Minute, hour, day of month, month, day of week (UTC), or a nickname such as `@daily`.
    pub cron: String,
    /// The branch to build; without it, the project's default branch.
    #[serde(default)]
    pub branch: Option<String>,
}

/// Parses a five-field cron expression; the error says what to write instead. An expression
/// that never matches (the 30th of February) is refused too.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(expr.trim())
        .map_err(|e| {
            format!(
                "`{expr}` is not a cron expression ({e}); write five fields in UTC: minute hour \
                 day-of-month month day-of-week, e.g. \"0 3 * * *\" for 03:00 every day"
            )
        })?;
    let from = Utc.timestamp_opt(0, 0).single().unwrap_or_default();
    cron.find_next_occurrence(&from, false)
        .map_err(|_| format!("`{expr}` never matches a date; check its day and month fields"))?;
    Ok(cron)
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

/// What a schedule should do at `now`, given the last slot it fired for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Queue a build now.
    pub fire: bool,
    /// The slot to remember as fired (unchanged when not firing): the latest slot at or before
    /// `now`, so missed slots collapse into this one run.
    pub last: i64,
    /// The next slot after `now`.
    pub next: Option<i64>,
}

/// Decides for a schedule whose last fired (or first seen) slot is `last`, at `now` (both
/// unix seconds).
pub fn due(cron: &Cron, last: i64, now: i64) -> Due {
    let next_after = |t: i64| {
        cron.find_next_occurrence(&at(t), false)
            .ok()
            .map(|d| d.timestamp())
    };
    let fire = next_after(last).is_some_and(|n| n <= now);
    let last = if fire {
        cron.find_previous_occurrence(&at(now), true)
            .map(|d| d.timestamp())
            .unwrap_or(now)
    } else {
        last
    };
    Due {
        fire,
        last,
        next: next_after(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    /// 2026-11-30T00:00:00Z.
    const MIDNIGHT: i64 = 1_795_996_800;

    #[test]
    fn five_fields_in_utc_or_a_clear_error() {
        assert!(parse_cron("0 3 * * *").is_ok());
        assert!(parse_cron("@daily").is_ok());
        assert!(parse_cron("*/5 * * * MON-FRI").is_ok());
        let e = parse_cron("0 0 3 * * *").unwrap_err();
        assert!(e.contains("five fields"), "{e}");
        assert!(parse_cron("bogus").unwrap_err().contains("\"0 3 * * *\""));
        assert!(parse_cron("0 0 30 2 *")
            .unwrap_err()
            .contains("never matches"));
    }

    #[test]
    fn fires_once_per_slot_and_once_for_many_missed_slots() {
        let c = parse_cron("0 3 * * *").unwrap();
        let three = MIDNIGHT + 3 * 3600;
        // Seen at midnight: nothing until 03:00, then once.
        let d = due(&c, MIDNIGHT, MIDNIGHT + 60);
        assert_eq!((d.fire, d.last, d.next), (false, MIDNIGHT, Some(three)));
        let d = due(&c, MIDNIGHT, three);
        assert_eq!((d.fire, d.last), (true, three));
        let d = due(&c, three, three + 59);
        assert!(!d.fire, "the same slot never fires twice");
        // Down for three days: one run at start, for the latest slot.
        let d = due(&c, three, three + 3 * DAY + 3600);
        assert_eq!((d.fire, d.last), (true, three + 3 * DAY));
        assert_eq!(d.next, Some(three + 4 * DAY));
    }
}
