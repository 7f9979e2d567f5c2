//! Integration tests of the real `amsbuild` binary: one test binary, a small harness, and the
//! Docker suite, which runs against a real engine and never skips itself.

mod harness;

mod access;
mod api;
mod api_errors;
mod browser;
mod buildref;
mod caches;
mod cli;
mod compat;
mod container;
mod docker;
mod edge;
mod engine;
mod engines;
mod faults;
mod install;
mod manage;
mod metrics;
mod notify;
mod rebuild;
mod reports;
mod retention;
mod schedule;
mod secrets;
mod ssh;
mod tidy;
mod tls;
mod trust;
mod web;
mod webhooks;
mod xss;
