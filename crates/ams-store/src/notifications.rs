//! The log of out-going notifications.

use crate::conn::Store;
use crate::error::Result;
use rusqlite::{params, Row};
use serde::{Deserialize, Serialize};

/// One try to deliver a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at: f64,
    /// The HTTP status, or what went wrong (`timeout`, `connect: …`, `refused: …`).
    pub outcome: String,
    pub millis: u64,
}

/// A notification as recorded. The target is only its host: the URL may carry a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub id: i64,
    pub project: String,
    pub build_name: String,
    pub hook: String,
    pub kind: String,
    pub target_host: String,
    pub event: String,
    /// `sent`, or `failed: …`.
    pub outcome: String,
    pub attempts: Vec<Attempt>,
    pub created_at: f64,
    pub finished_at: f64,
}

impl Notification {
    fn from_row(r: &Row) -> rusqlite::Result<Notification> {
        let attempts: String = r.get("attempts")?;
        Ok(Notification {
            id: r.get("id")?,
            project: r.get("project")?,
            build_name: r.get("build_name")?,
            hook: r.get("hook")?,
            kind: r.get("kind")?,
            target_host: r.get("target_host")?,
            event: r.get("event")?,
            outcome: r.get("outcome")?,
            attempts: serde_json::from_str(&attempts).unwrap_or_default(),
            created_at: r.get("created_at")?,
            finished_at: r.get("finished_at")?,
        })
    }
}

/// A project's newest notifications: bound to the project and the count.
pub(crate) const NOTIFICATIONS_OF: &str =
    "SELECT * FROM notifications WHERE project = ? ORDER BY id DESC LIMIT ?";

impl Store {
    pub async fn record_notification(&self, n: &Notification) -> Result<i64> {
        let n = n.clone();
        self.write(move |c| {
            Ok(c.prepare_cached(
                "INSERT INTO notifications (project, build_name, hook, kind, target_host, event, \
                 outcome, attempts, created_at, finished_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            )?
            .query_row(
                params![
                    n.project,
                    n.build_name,
                    n.hook,
                    n.kind,
                    n.target_host,
                    n.event,
                    n.outcome,
                    serde_json::to_string(&n.attempts).unwrap_or_else(|_| "[]".into()),
                    n.created_at,
                    n.finished_at
                ],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// A project's notifications, newest first.
    pub async fn notifications_of(&self, project: &str, limit: i64) -> Result<Vec<Notification>> {
        let project = project.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(NOTIFICATIONS_OF)?;
            let rows = st.query_map(params![project, limit], Notification::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}
