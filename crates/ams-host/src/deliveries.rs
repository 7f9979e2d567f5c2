//! Upkeep of the delivery log: drops the bodies of deliveries older than
//! `delivery_body_max_age_days` and keeps SQLite's write-ahead log from growing under a steady
//! stream of deliveries (a checkpoint can be starved by overlapping readers; the log is then
//! checkpointed whole and truncated once it passes [`WAL_MAX_PAGES`]; the store's own
//! checkpointer does the everyday copying back). Runs beside the loop, never in it.

use crate::timefmt;
use ams_core::retention::DAY_SECS;
use ams_store::Store;
use std::time::Duration;

/// The longest pause between two runs.
pub const EVERY: Duration = Duration::from_secs(5);
/// A write-ahead log of more pages than this (64 MiB of 4 KiB pages) is truncated.
pub const WAL_MAX_PAGES: i64 = 16_384;

/// The pause between runs: [`EVERY`], or a quarter of a shorter body age (at least 50 ms), so
/// a body outlives its age by at most a quarter of it.
pub fn period(max_age_days: Option<f64>) -> Duration {
    match max_age_days {
        Some(d) => Duration::from_secs_f64((d * DAY_SECS / 4.0).clamp(0.05, EVERY.as_secs_f64())),
        None => EVERY,
    }
}

/// Runs for as long as the host does.
pub async fn upkeep(store: Store, max_age_days: Option<f64>) {
    let every = period(max_age_days);
    // A failing database is reported once per run of failures, not every few seconds.
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let mut result = Ok(());
        if let Some(days) = max_age_days {
            match store
                .drop_delivery_bodies(timefmt::now() - days * DAY_SECS)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!("dropped the bodies of {n} old webhook deliveries"),
                Err(e) => result = Err(e),
            }
        }
        // The store's checkpointer copies the log back after commits; here only a log that
        // readers kept from restarting, grown past the limit, is checkpointed on the writer.
        if store.wal_bytes() > WAL_MAX_PAGES as u64 * 4096 {
            if let Err(e) = store.checkpoint(WAL_MAX_PAGES).await {
                result = Err(e);
            }
        }
        match result {
            Err(e) if !failing => {
                tracing::warn!("delivery log upkeep failed (retried every {every:?}): {e}");
                failing = true;
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_age_is_checked_often_a_long_one_every_few_seconds() {
        assert_eq!(period(None), EVERY);
        assert_eq!(period(Some(7.0)), EVERY);
        assert_eq!(period(Some(2.0 / DAY_SECS)), Duration::from_millis(500));
        assert_eq!(period(Some(1e-9)), Duration::from_millis(50));
    }
}
