//! The slot each schedule last fired for.

use crate::conn::Store;
use crate::error::Result;
use rusqlite::{params, OptionalExtension};

impl Store {
    /// The slot a schedule last fired for (or was first seen at), unix seconds.
    pub async fn schedule_slot(
        &self,
        project: &str,
        cron: &str,
        branch: &str,
    ) -> Result<Option<i64>> {
        let key = [project.to_owned(), cron.to_owned(), branch.to_owned()];
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT last_slot FROM schedule_runs WHERE project = ? AND cron = ? AND branch = ?",
            )?
            .query_row(key, |r| r.get(0))
            .optional()?)
        })
        .await
    }

    /// Remembers the slot a schedule fired for (or was first seen at).
    pub async fn set_schedule_slot(
        &self,
        project: &str,
        cron: &str,
        branch: &str,
        slot: i64,
    ) -> Result<()> {
        let (project, cron, branch) = (project.to_owned(), cron.to_owned(), branch.to_owned());
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO schedule_runs (project, cron, branch, last_slot) VALUES (?, ?, ?, ?) \
                 ON CONFLICT(project, cron, branch) DO UPDATE SET last_slot = excluded.last_slot",
            )?
            .execute(params![project, cron, branch, slot])?;
            Ok(())
        })
        .await
    }
}
