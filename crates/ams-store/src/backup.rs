//! A consistent copy of the database beside a writing host.

use crate::error::{Result, StoreError};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

/// What [`backup`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    /// Builds in the copy.
    pub builds: i64,
    /// The copy's size in bytes.
    pub bytes: u64,
}

/// Writes a consistent copy of the database at `db` to `dest` while other connections (a
/// running host) go on writing: SQLite's `VACUUM INTO` reads one snapshot, in one read
/// transaction, through the WAL. `dest` is created here, mode 0600, and never overwritten: an
/// existing file is an error. The copy is checked (`PRAGMA integrity_check`) before this
/// returns; a failed copy is removed. The database's schema is left as it is (no migration).
pub async fn backup(db: &Path, dest: &Path) -> Result<BackupInfo> {
    let (db, dest) = (db.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || copy(&db, &dest))
        .await
        .map_err(|e| StoreError::Invalid(format!("backup: {e}")))?
}

fn copy(db: &Path, dest: &Path) -> Result<BackupInfo> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !db.is_file() {
        return Err(StoreError::Invalid(format!(
            "{}: no database there; check the data directory (--data-dir or AMSBUILD_HOME)",
            db.display()
        )));
    }
    // Created empty first, which VACUUM INTO accepts: nobody else's file is ever replaced, and
    // the copy is the host user's alone from its first byte.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| {
            StoreError::Invalid(if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} already exists; a backup never overwrites a file: name a new one",
                    dest.display()
                )
            } else {
                format!("cannot create {}: {e}", dest.display())
            })
        })?;
    let made = file
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", dest.display())));
    drop(file);
    let copied = (|| {
        made?;
        let dest_text = dest.to_str().ok_or_else(|| {
            StoreError::Invalid(format!("{}: the path is not UTF-8", dest.display()))
        })?;
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.execute("VACUUM INTO ?", [dest_text])?;
        drop(conn);
        let copy = Connection::open_with_flags(dest, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut st = copy.prepare("PRAGMA integrity_check")?;
        let check = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if check != ["ok"] {
            return Err(StoreError::Invalid(format!(
                "the copy failed its integrity check: {}",
                check.join("; ")
            )));
        }
        drop(st);
        let builds: i64 = copy.query_row("SELECT count(*) FROM builds", [], |r| r.get(0))?;
        drop(copy);
        let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        Ok(BackupInfo { builds, bytes })
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    copied
}
