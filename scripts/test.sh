#!/usr/bin/env bash
# The whole test suite on a fresh machine: setup (scripts/setup.sh: the Docker engine, the
# packages the tests use — busybox-static, p7zip-full, Chromium, OpenSSH, …), then formatting,
# lints, and every test, the Docker suite included. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
