//! SQLite state: projects' info, build records and the persistent queue (the builds whose
//! status is pending or running), deliveries, notifications, users, sessions, tokens,
//! messages and secrets. This is the only crate that contains SQL.
//!
//! One module per table or area, each with its row types (read from a row by column name, in
//! one place per type), its SQL as plain functions over a [`rusqlite::Connection`] (so that
//! several compose inside one transaction) and the async methods of [`Store`] that run them:
//! reads on a small pool of reader connections on blocking threads, writes on the one writer
//! thread ([`conn`]).

mod backup;
mod builds;
mod conn;
mod deliveries;
mod error;
mod messages;
mod notifications;
mod schedules;
mod secrets;
mod users;

pub use backup::{backup, BackupInfo};
pub use builds::{
    BuildRecord, BuildRow, Expired, Finish, NewBuild, ProjectInfo, RawBuild, StageResult,
    BUILD_FILTER_COLUMNS,
};
pub use conn::Store;
pub use deliveries::{Delivery, DeliveryBatchItem, DeliveryOutcome, NewDelivery};
pub use error::{is_unavailable, Result, StoreError, UNAVAILABLE};
pub use messages::{Message, MESSAGES_KEPT};
pub use notifications::{Attempt, Notification};
pub use secrets::{SealedSecret, SecretInfo, SecretLimits};
pub use users::{ApiToken, User};

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
