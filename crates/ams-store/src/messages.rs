//! Each user's message panel.

use crate::conn::Store;
use crate::error::Result;
use rusqlite::{params, Row};
use serde::{Deserialize, Serialize};

/// A line of a user's message panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: i64,
    pub at: f64,
    /// `ok`, `error`, `info`, or a build's final status.
    pub kind: String,
    pub text: String,
    pub project: Option<String>,
    pub build: Option<String>,
}

impl Message {
    fn from_row(r: &Row) -> rusqlite::Result<Message> {
        Ok(Message {
            id: r.get("id")?,
            at: r.get("at")?,
            kind: r.get("kind")?,
            text: r.get("text")?,
            project: r.get("project")?,
            build: r.get("build")?,
        })
    }
}

/// Messages kept per user; older ones are dropped.
pub const MESSAGES_KEPT: i64 = 100;

/// A user's newest messages: bound to the user and the count.
pub(crate) const MESSAGES_OF: &str =
    "SELECT * FROM messages WHERE user = ? ORDER BY id DESC LIMIT ?";

impl Store {
    /// Adds a message to a user's panel (and drops the oldest beyond [`MESSAGES_KEPT`]).
    pub async fn add_message(
        &self,
        user: &str,
        kind: &str,
        text: &str,
        project: Option<&str>,
        build: Option<&str>,
        at: f64,
    ) -> Result<()> {
        let (user, kind, text) = (user.to_owned(), kind.to_owned(), text.to_owned());
        let (project, build) = (project.map(str::to_owned), build.map(str::to_owned));
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO messages (user, at, kind, text, project, build) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM users WHERE name = ?1)",
            )?
            .execute(params![user, at, kind, text, project, build])?;
            c.prepare_cached(
                "DELETE FROM messages WHERE user = ?1 AND id <= (SELECT id FROM messages \
                 WHERE user = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![user, MESSAGES_KEPT])?;
            Ok(())
        })
        .await
    }

    /// A user's messages, newest first.
    pub async fn messages_of(&self, user: &str, limit: i64) -> Result<Vec<Message>> {
        let user = user.to_owned();
        self.read_now(move |c| {
            let mut st = c.prepare_cached(MESSAGES_OF)?;
            let rows = st.query_map(params![user, limit], Message::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Empties a user's message panel.
    pub async fn clear_messages(&self, user: &str) -> Result<u64> {
        let user = user.to_owned();
        self.write(move |c| {
            Ok(c.prepare_cached("DELETE FROM messages WHERE user = ?")?
                .execute([&user])? as u64)
        })
        .await
    }
}
