//! `HostError`: how a command to the host fails, with the HTTP status decided here, once.
//! Database and file-system detail never reaches a client: it is logged, and the client hears
//! the class of failure (unavailable, internal).

/// Why the host refused or could not carry out a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The host is stopping; the request may be sent again to the next one.
    #[error("the host is shutting down")]
    ShuttingDown,
    /// The request itself is wrong (a bad branch name, nothing to build).
    #[error("{0}")]
    Invalid(String),
    /// No such project or build (or none the caller may see).
    #[error("{0}")]
    NotFound(String),
    /// The request is fine but the build's state forbids it now.
    #[error("{0}")]
    Conflict(String),
    /// The database cannot take writes now (a full disk, a read-only file); the message says
    /// which and how to fix it.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; the detail is logged, never shown.
    #[error("internal error")]
    Internal(String),
}

impl HostError {
    /// The HTTP status this error answers with, for every edge that speaks HTTP.
    pub fn http_status(&self) -> u16 {
        match self {
            HostError::ShuttingDown | HostError::Unavailable(_) => 503,
            HostError::Invalid(_) => 400,
            HostError::NotFound(_) => 404,
            HostError::Conflict(_) => 409,
            HostError::Internal(_) => 500,
        }
    }

    /// The full text, internal detail included: for the host's operator (the control socket,
    /// the host's own log), never for web clients.
    pub fn detail(&self) -> String {
        match self {
            HostError::Internal(d) => format!("internal error: {d}"),
            e => e.to_string(),
        }
    }

    /// A store error: unavailable when the database cannot take writes, internal otherwise
    /// (logged here with its detail).
    pub fn store(e: ams_store::StoreError) -> HostError {
        if e.is_unavailable() {
            HostError::Unavailable(e.to_string())
        } else {
            tracing::error!("database error: {e}");
            HostError::Internal(e.to_string())
        }
    }
}

impl From<ams_store::StoreError> for HostError {
    fn from(e: ams_store::StoreError) -> Self {
        HostError::store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_is_never_shown() {
        let e = HostError::Internal("UNIQUE constraint failed: builds.name".into());
        assert_eq!(e.to_string(), "internal error");
        assert_eq!(e.http_status(), 500);
        assert_eq!(HostError::ShuttingDown.http_status(), 503);
        assert_eq!(HostError::Conflict("x".into()).http_status(), 409);
    }
}
