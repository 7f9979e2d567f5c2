//! Users, their sessions and their API tokens.

use crate::conn::Store;
use crate::error::{Result, StoreError};
use ams_core::access::Grant;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

/// A user of the web interface and API. The password is stored only as its argon2id hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(skip_serializing)]
    pub password_hash: String,
    /// SERVER ADMIN, or a level on each assigned project.
    pub grant: Grant,
    pub created_at: f64,
    pub password_changed_at: f64,
}

impl User {
    /// A user row. `projects` may still be in the described system's shape (a list that takes
    /// `level`): [`Grant::from_stored`] reads both.
    fn from_row(r: &Row) -> rusqlite::Result<User> {
        let projects: String = r.get("projects")?;
        Ok(User {
            name: r.get("name")?,
            password_hash: r.get("password_hash")?,
            grant: Grant::from_stored(r.get("level")?, &projects),
            created_at: r.get("created_at")?,
            password_changed_at: r.get("password_changed_at")?,
        })
    }
}

/// An API token as listed (its secret is never stored, only its hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: i64,
    pub user: String,
    pub label: String,
    pub created_at: f64,
    pub last_used: Option<f64>,
}

impl ApiToken {
    fn from_row(r: &Row) -> rusqlite::Result<ApiToken> {
        Ok(ApiToken {
            id: r.get("id")?,
            user: r.get("user")?,
            label: r.get("label")?,
            created_at: r.get("created_at")?,
            last_used: r.get("last_used")?,
        })
    }
}

/// Ends every session of a user and revokes its tokens, in the caller's transaction.
fn log_out_everywhere(c: &Connection, name: &str) -> Result<()> {
    c.prepare_cached("DELETE FROM sessions WHERE user = ?")?
        .execute([name])?;
    c.prepare_cached("DELETE FROM api_tokens WHERE user = ?")?
        .execute([name])?;
    Ok(())
}

/// The stored grant of a user, as its raw columns (for compare-and-set).
fn raw_grant(c: &Connection, name: &str) -> Result<Option<(i64, String)>> {
    Ok(
        c.prepare_cached("SELECT level, projects FROM users WHERE name = ?")?
            .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?,
    )
}

fn end_session(c: &Connection, id_hash: &str) -> Result<()> {
    c.prepare_cached("DELETE FROM sessions WHERE id_hash = ?")?
        .execute([id_hash])?;
    Ok(())
}

/// Whether an error is a UNIQUE or PRIMARY KEY constraint that failed.
fn is_unique_violation(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi;
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

impl Store {
    pub async fn user_count(&self) -> Result<i64> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT COUNT(*) FROM users")?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }

    /// Creates a user; fails when the name is taken.
    pub async fn create_user(&self, u: &User) -> Result<()> {
        let u = u.clone();
        self.write(move |c| {
            let (level, projects) = u.grant.to_stored();
            c.prepare_cached(
                "INSERT INTO users (name, password_hash, level, projects, created_at, \
                 password_changed_at) VALUES (?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                u.name,
                u.password_hash,
                i64::from(level),
                projects,
                u.created_at,
                u.password_changed_at
            ])
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Invalid(format!("user `{}` already exists", u.name))
                } else {
                    StoreError::from(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    pub async fn user(&self, name: &str) -> Result<Option<User>> {
        let name = name.to_owned();
        self.read_now(move |c| {
            Ok(c.prepare_cached("SELECT * FROM users WHERE name = ?")?
                .query_row([&name], User::from_row)
                .optional()?)
        })
        .await
    }

    pub async fn users(&self) -> Result<Vec<User>> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT * FROM users ORDER BY name")?;
            let rows = st.query_map([], User::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Sets a new password hash, ends every session of the user and revokes its API tokens:
    /// whoever knew the old password may have made one.
    pub async fn set_password(&self, name: &str, hash: &str, at: f64) -> Result<bool> {
        let (name, hash) = (name.to_owned(), hash.to_owned());
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE name = ?",
                )?
                .execute(params![hash, at, name])?;
            log_out_everywhere(c, &name)?;
            Ok(n == 1)
        })
        .await
    }

    /// Changes a user's grant to `f(current)`, where `current` is read in the same
    /// compare-and-set: two managers changing the same user at once each see the other's
    /// change, so neither undoes an entry it may not touch. `Ok(None)` when there is no such
    /// user; `f`'s refusal comes back as [`StoreError::Invalid`].
    pub async fn update_grant(
        &self,
        name: &str,
        f: impl Fn(&Grant) -> std::result::Result<Grant, String>,
    ) -> Result<Option<Grant>> {
        for _ in 0..16 {
            let who = name.to_owned();
            let Some((level, projects)) = self.read(move |c| raw_grant(c, &who)).await? else {
                return Ok(None);
            };
            let new = f(&Grant::from_stored(level, &projects)).map_err(StoreError::Invalid)?;
            let (new_level, new_projects) = new.to_stored();
            let who = name.to_owned();
            let n = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "UPDATE users SET level = ?, projects = ? \
                         WHERE name = ? AND level = ? AND projects = ?",
                    )?
                    .execute(params![
                        i64::from(new_level),
                        new_projects,
                        who,
                        level,
                        projects
                    ])?)
                })
                .await?;
            if n == 1 {
                return Ok(Some(new));
            }
        }
        Err(StoreError::Invalid(format!(
            "the user `{name}` keeps changing; try again"
        )))
    }

    /// Removes a user with its sessions and tokens when `allowed(current grant)` says so, in
    /// the same compare-and-set as [`Store::update_grant`]. `Ok(false)` when there is no such
    /// user; the refusal comes back as [`StoreError::Invalid`].
    pub async fn remove_user_if(
        &self,
        name: &str,
        allowed: impl Fn(&Grant) -> std::result::Result<(), String>,
    ) -> Result<bool> {
        for _ in 0..16 {
            let who = name.to_owned();
            let Some((level, projects)) = self.read(move |c| raw_grant(c, &who)).await? else {
                return Ok(false);
            };
            allowed(&Grant::from_stored(level, &projects)).map_err(StoreError::Invalid)?;
            let who = name.to_owned();
            let removed = self
                .write(move |c| {
                    let n = c
                        .prepare_cached(
                            "DELETE FROM users WHERE name = ? AND level = ? AND projects = ?",
                        )?
                        .execute(params![who, level, projects])?;
                    if n == 1 {
                        log_out_everywhere(c, &who)?;
                    }
                    Ok(n == 1)
                })
                .await?;
            if removed {
                return Ok(true);
            }
        }
        Err(StoreError::Invalid(format!(
            "the user `{name}` keeps changing; try again"
        )))
    }

    /// Removes a user with its sessions and tokens.
    pub async fn remove_user(&self, name: &str) -> Result<bool> {
        self.remove_user_if(name, |_| Ok(())).await
    }

    /// Opens a session for a user whose password was just checked against `password_hash`.
    /// The insert happens only if that is still the user's password, in the same statement:
    /// a password changed while the check ran (which ends every session) leaves nothing
    /// behind. Returns whether the session was made.
    pub async fn create_session(
        &self,
        id_hash: &str,
        user: &str,
        csrf: &str,
        at: f64,
        password_hash: &str,
    ) -> Result<bool> {
        let (id_hash, user, csrf, password_hash) = (
            id_hash.to_owned(),
            user.to_owned(),
            csrf.to_owned(),
            password_hash.to_owned(),
        );
        self.write(move |c| {
            let n = c
                .prepare_cached(
                    "INSERT INTO sessions (id_hash, user, csrf, created_at, last_seen) \
                     SELECT ?1, ?2, ?3, ?4, ?4 WHERE EXISTS \
                     (SELECT 1 FROM users WHERE name = ?2 AND password_hash = ?5)",
                )?
                .execute(params![id_hash, user, csrf, at, password_hash])?;
            Ok(n == 1)
        })
        .await
    }

    /// A live session: ends it (and answers `None`) when idle or too old, else marks it used.
    /// Returns the user and the session's CSRF token.
    pub async fn session(
        &self,
        id_hash: &str,
        now: f64,
        idle_secs: f64,
        max_secs: f64,
    ) -> Result<Option<(User, String)>> {
        let id = id_hash.to_owned();
        let found = self
            .read_now(move |c| {
                Ok(c.prepare_cached(
                    "SELECT u.*, s.csrf AS s_csrf, s.created_at AS s_created, \
                     s.last_seen AS s_last \
                     FROM sessions s JOIN users u ON u.name = s.user WHERE s.id_hash = ?",
                )?
                .query_row([&id], |r| {
                    Ok((
                        User::from_row(r)?,
                        r.get::<_, String>("s_csrf")?,
                        r.get::<_, f64>("s_created")?,
                        r.get::<_, f64>("s_last")?,
                    ))
                })
                .optional()?)
            })
            .await?;
        let Some((user, csrf, created, last)) = found else {
            return Ok(None);
        };
        if now - last > idle_secs || now - created > max_secs {
            self.end_session(id_hash).await?;
            return Ok(None);
        }
        // Use is recorded coarsely (a quarter of the idle limit, at most 30 s), so browsing and
        // live streams do not write on every request; idle expiry is late by that much at most.
        if now - last >= (idle_secs / 4.0).min(30.0) {
            let id = id_hash.to_owned();
            self.write(move |c| {
                c.prepare_cached("UPDATE sessions SET last_seen = ? WHERE id_hash = ?")?
                    .execute(params![now, id])?;
                Ok(())
            })
            .await?;
        }
        Ok(Some((user, csrf)))
    }

    pub async fn end_session(&self, id_hash: &str) -> Result<()> {
        let id = id_hash.to_owned();
        self.write(move |c| end_session(c, &id)).await
    }

    /// Stores an API token by its hash. With `password_hash` (a token made on the web after
    /// checking the current password), only if that is still the user's password, in the same
    /// statement, so a password change racing the check revokes it too. `None` when the
    /// password changed meanwhile.
    pub async fn create_token(
        &self,
        user: &str,
        label: &str,
        token_hash: &str,
        at: f64,
        password_hash: Option<&str>,
    ) -> Result<Option<i64>> {
        let (user, label, token_hash, password_hash) = (
            user.to_owned(),
            label.to_owned(),
            token_hash.to_owned(),
            password_hash.map(str::to_owned),
        );
        self.write(move |c| {
            Ok(c.prepare_cached(
                "INSERT INTO api_tokens (token_hash, user, label, created_at) \
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM users WHERE name = ?2 \
                 AND (?5 IS NULL OR password_hash = ?5)) RETURNING id",
            )?
            .query_row(params![token_hash, user, label, at, password_hash], |r| {
                r.get(0)
            })
            .optional()?)
        })
        .await
    }

    /// The user of an API token. One read per request; `last_used` is written at most once a
    /// minute per token, so a busy script does not turn every request into a write.
    pub async fn token_user(&self, token_hash: &str, at: f64) -> Result<Option<User>> {
        let hash = token_hash.to_owned();
        let found = self
            .read_now(move |c| {
                Ok(c.prepare_cached(
                    "SELECT u.*, t.id AS token_id, t.last_used AS token_last_used \
                     FROM api_tokens t JOIN users u ON u.name = t.user WHERE t.token_hash = ?",
                )?
                .query_row([&hash], |r| {
                    Ok((
                        User::from_row(r)?,
                        r.get::<_, i64>("token_id")?,
                        r.get::<_, Option<f64>>("token_last_used")?,
                    ))
                })
                .optional()?)
            })
            .await?;
        let Some((user, id, last)) = found else {
            return Ok(None);
        };
        if last.is_none_or(|l| at - l >= 60.0) {
            self.write(move |c| {
                c.prepare_cached("UPDATE api_tokens SET last_used = ? WHERE id = ?")?
                    .execute(params![at, id])?;
                Ok(())
            })
            .await?;
        }
        Ok(Some(user))
    }

    pub async fn tokens_of(&self, user: &str) -> Result<Vec<ApiToken>> {
        let user = user.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT * FROM api_tokens WHERE user = ? ORDER BY id")?;
            let rows = st.query_map([&user], ApiToken::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    pub async fn revoke_token(&self, user: &str, id: i64) -> Result<bool> {
        let user = user.to_owned();
        self.write(move |c| {
            Ok(
                c.prepare_cached("DELETE FROM api_tokens WHERE user = ? AND id = ?")?
                    .execute(params![user, id])?
                    == 1,
            )
        })
        .await
    }
}
