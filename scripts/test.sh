#!/usr/bin/env bash
# The whole test suite on a fresh machine: setup (Docker engine, busybox-static, p7zip-full),
# then formatting, lints, and every test, the Docker suite included. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
