//! The store's errors, and how a person reads them: the cause in words, then what to do.

/// The store's error: SQLite's, or a refusal of the request (or of its data) in words.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", describe(.0))]
    Db(#[source] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if matches!(primary_code(&e), 8 | 10 | 11 | 14 | 26) {
            file_errors::seen();
        }
        StoreError::Db(e)
    }
}

impl StoreError {
    /// See [`UNAVAILABLE`].
    pub fn is_unavailable(&self) -> bool {
        is_unavailable(&self.to_string())
    }

    /// The same error again, for each of the writes of a group that one failure ended (a
    /// failed COMMIT fails every write it held). SQLite's codes and message are kept, so the
    /// copy reads and classifies as the original; it does not count as a new file error.
    pub(crate) fn copy(&self) -> StoreError {
        match self {
            StoreError::Db(rusqlite::Error::SqliteFailure(code, said)) => {
                StoreError::Db(rusqlite::Error::SqliteFailure(*code, said.clone()))
            }
            other => StoreError::Invalid(other.to_string()),
        }
    }

    /// The error a store that was closed answers: unavailable, not the request's fault.
    pub(crate) fn closed() -> StoreError {
        StoreError::Invalid(format!(
            "{UNAVAILABLE}the database was closed (the host is stopping); try again"
        ))
    }
}

/// SQLite's primary result code of an error (the low byte of the extended code), 0 if none.
pub(crate) fn primary_code(e: &rusqlite::Error) -> i32 {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => f.extended_code & 0xff,
        _ => 0,
    }
}

/// When an error about the database file itself (read-only, I/O, cannot open, damaged) was
/// last seen. A connection opened before it may hold the file in a state that no longer
/// holds (SQLite opens a file it may not write read-only, for good): it is closed when its work
/// is done, and its replacement opens the file afresh, so the host takes writes again by itself
/// once the file is writable. Per process: a host has one database.
pub(crate) mod file_errors {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    fn start() -> Instant {
        static START: OnceLock<Instant> = OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    /// Milliseconds after [`start`], plus one (0: never).
    static LAST: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn seen() {
        let ms = start().elapsed().as_millis() as u64 + 1;
        LAST.fetch_max(ms, Ordering::SeqCst);
    }

    /// Whether a connection of this age was open when the last file error was seen.
    pub(crate) fn predates_last(age: Duration) -> bool {
        match LAST.load(Ordering::SeqCst) {
            0 => false,
            ms => {
                let since = start()
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1));
                age >= since
            }
        }
    }
}

/// Every message of an error that says the database cannot be used now (a full disk, a
/// read-only or failing file, a lock held elsewhere) starts with this, whatever the caller
/// puts before it: an edge answers such an error 503 (try again later), not as a refusal.
pub const UNAVAILABLE: &str = "the database is unavailable: ";

/// Whether an error message (as [`StoreError`] displays it, perhaps with context before it)
/// says the database is unavailable rather than that the request was wrong.
pub fn is_unavailable(message: &str) -> bool {
    message.contains(UNAVAILABLE)
}

/// An error as a person can act on it: the cause in words, then what to do.
fn describe(e: &rusqlite::Error) -> String {
    let rusqlite::Error::SqliteFailure(f, message) = e else {
        return format!("database: {e}");
    };
    let said = message.clone().unwrap_or_else(|| f.to_string());
    match primary_code(e) {
        13 => format!(
            "{UNAVAILABLE}the disk holding the data directory is full ({said}); free space \
             there and try again"
        ),
        8 => format!(
            "{UNAVAILABLE}the database is read-only ({said}); make the data directory and \
             ams.db writable by the host and try again"
        ),
        10 => format!(
            "{UNAVAILABLE}the database file could not be read or written ({said}); check the \
             disk holding the data directory"
        ),
        5 | 6 => format!(
            "{UNAVAILABLE}the database is locked by another connection or process ({said}); \
             try again"
        ),
        14 => format!(
            "{UNAVAILABLE}the database file cannot be opened ({said}); check that the data \
             directory exists and is writable"
        ),
        11 | 26 => format!(
            "{UNAVAILABLE}the database file is damaged ({said}); restore ams.db from a backup"
        ),
        _ => format!("database: {said}"),
    }
}

/// A column that holds something this binary cannot read (a status it does not know).
pub(crate) fn bad_column(column: &str, why: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("column `{column}`: {why}").into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(extended: i32) -> StoreError {
        StoreError::Db(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(extended),
            Some("said".into()),
        ))
    }

    /// Each of SQLite's codes about the file or a lock reads as unavailable, with the cause
    /// and what to do; any other error does not; a copy reads the same.
    #[test]
    fn errors_say_the_cause_and_what_to_do() {
        for (code, words) in [
            (13, "disk holding the data directory is full"),
            (8, "read-only"),
            (8 | (3 << 8), "read-only"),
            (10, "could not be read or written"),
            (10 | (12 << 8), "could not be read or written"),
            (5, "locked"),
            (6, "locked"),
            (14, "cannot be opened"),
            (11, "damaged"),
            (26, "damaged"),
        ] {
            let e = failure(code);
            assert!(e.is_unavailable(), "{code}: {e}");
            assert!(e.to_string().contains(words), "{code}: {e}");
            assert!(e.to_string().contains("(said)"), "{code}: {e}");
            assert_eq!(e.copy().to_string(), e.to_string());
        }
        let e = failure(19);
        assert!(!e.is_unavailable(), "{e}");
        assert_eq!(e.to_string(), "database: said");
        assert!(StoreError::closed().is_unavailable());
        assert!(!StoreError::Invalid("no".into()).is_unavailable());
    }
}
