//! The projects' secrets, sealed: the store never sees a value open.

use crate::conn::Store;
use crate::error::{Result, StoreError};
use rusqlite::{params, Connection, Row};
use serde::{Deserialize, Serialize};

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    /// Unix seconds.
    pub set_at: f64,
    pub set_by: String,
}

impl SecretInfo {
    fn from_row(r: &Row) -> rusqlite::Result<SecretInfo> {
        Ok(SecretInfo {
            name: r.get("name")?,
            set_at: r.get("set_at")?,
            set_by: r.get("set_by")?,
        })
    }
}

/// A secret as stored: its value sealed (see migration 0012); the store never sees it open.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedSecret {
    pub project: String,
    pub name: String,
    /// Which key sealed it (a hash of the key).
    pub key_id: String,
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub sealed: Vec<u8>,
    pub set_at: f64,
    pub set_by: String,
}

impl SealedSecret {
    fn from_row(r: &Row) -> rusqlite::Result<SealedSecret> {
        Ok(SealedSecret {
            project: r.get("project")?,
            name: r.get("name")?,
            key_id: r.get("key_id")?,
            nonce: r.get("nonce")?,
            sealed: r.get("sealed")?,
            set_at: r.get("set_at")?,
            set_by: r.get("set_by")?,
        })
    }
}

/// What a project may hold: checked in the same transaction as the write.
#[derive(Debug, Clone, Copy)]
pub struct SecretLimits {
    pub max_count: usize,
    /// The most bytes of sealed values (each its value plus `overhead`) together.
    pub max_bytes: usize,
    /// Bytes a sealed value has beyond its value (the tag).
    pub overhead: usize,
}

/// Stores a secret within the limits, in the caller's transaction.
fn put(c: &Connection, s: &SealedSecret, limits: SecretLimits) -> Result<()> {
    let (count, bytes): (i64, i64) = c
        .prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(length(sealed)), 0) FROM secrets \
             WHERE project = ? AND name != ?",
        )?
        .query_row([&s.project, &s.name], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (count, bytes) = (count.max(0) as usize, bytes.max(0) as usize);
    if count >= limits.max_count {
        return Err(StoreError::Invalid(format!(
            "project `{}` holds {count} secrets, the most a project may; remove one first",
            s.project
        )));
    }
    let value_bytes = |sealed: usize, n: usize| sealed.saturating_sub(n * limits.overhead);
    let total = value_bytes(bytes, count) + value_bytes(s.sealed.len(), 1);
    let max = limits.max_bytes;
    if total > max {
        return Err(StoreError::Invalid(format!(
            "the secrets of project `{}` would hold {total} bytes of values together, over \
             the limit of {max}; remove or shorten some first",
            s.project
        )));
    }
    c.prepare_cached(
        "INSERT INTO secrets (project, name, key_id, nonce, sealed, set_at, set_by) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(project, name) DO UPDATE SET \
         key_id = excluded.key_id, nonce = excluded.nonce, sealed = excluded.sealed, \
         set_at = excluded.set_at, set_by = excluded.set_by",
    )?
    .execute(params![
        s.project, s.name, s.key_id, s.nonce, s.sealed, s.set_at, s.set_by
    ])?;
    Ok(())
}

impl Store {
    /// Stores a secret (replacing one of the same name) if the project stays within `limits`,
    /// counted in the same transaction; otherwise `Invalid` with the reason.
    pub async fn put_secret(&self, s: &SealedSecret, limits: SecretLimits) -> Result<()> {
        let s = s.clone();
        self.write(move |c| put(c, &s, limits)).await
    }

    /// A project's secrets, by name: names, when and by whom, never values.
    pub async fn secrets_of(&self, project: &str) -> Result<Vec<SecretInfo>> {
        let project = project.to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT name, set_at, set_by FROM secrets WHERE project = ? ORDER BY name",
            )?;
            let rows = st.query_map([&project], SecretInfo::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// A project's secrets as stored (sealed), by name.
    pub async fn sealed_secrets(&self, project: &str) -> Result<Vec<SealedSecret>> {
        let project = project.to_owned();
        self.read(move |c| {
            let mut st =
                c.prepare_cached("SELECT * FROM secrets WHERE project = ? ORDER BY name")?;
            let rows = st.query_map([&project], SealedSecret::from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Removes a secret; whether it existed.
    pub async fn remove_secret(&self, project: &str, name: &str) -> Result<bool> {
        let key = [project.to_owned(), name.to_owned()];
        self.write(move |c| {
            Ok(
                c.prepare_cached("DELETE FROM secrets WHERE project = ? AND name = ?")?
                    .execute(key)?
                    == 1,
            )
        })
        .await
    }

    /// How many secrets are stored, in every project.
    pub async fn secret_count(&self) -> Result<i64> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT COUNT(*) FROM secrets")?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }
}
