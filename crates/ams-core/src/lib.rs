//! IO-free domain model of AMS-Build: pipeline.json and the private configs, web_conf.json,
//! `{variables}`, retention, build statuses, docker argument policy, the in-container stage protocol and the
//! queue's decisions. Nothing here touches files, sockets, clocks or processes.

pub mod access;
pub mod commit_status;
pub mod compat;
#[cfg(test)]
mod doc_examples;
pub mod docker_args;
pub mod error;
pub mod junit;
pub mod mask;
pub mod names;
pub mod notify;
pub mod pipeline;
pub mod private_config;
pub mod protocol;
pub mod queue;
pub mod retention;
pub mod schedule;
pub mod secrets;
pub mod ssh;
pub mod status;
pub mod vars;
pub mod webconf;
pub mod webhooks;
mod work;

pub use error::ConfigError;
