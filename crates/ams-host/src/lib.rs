//! The host: the loop that owns the queue, the build workers that prepare, run and clean up
//! builds, git, build logs with live subscribers, retention, and the local control socket the
//! CLI uses.

pub mod cache;
pub mod control;
pub mod copy;
pub mod deliveries;
pub mod error;
pub mod git;
pub mod group;
pub mod host;
pub mod log;
pub mod metrics;
pub mod paths;
pub mod project;
pub mod reports;
pub mod retention;
pub mod schedule;
pub mod secrets;
pub mod settings;
pub mod source;
pub mod timefmt;
pub mod worker;

pub use host::{Host, HostConfig, HostHandle};
pub use paths::DataDir;
