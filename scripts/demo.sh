#!/usr/bin/env bash
# Quick start: runs the host with a demo project whose build passes offline.
# Builds amsbuild, creates ./ams-data with a "demo" project (the first time), starts the host,
# queues a build and follows it to PASS, then keeps the host running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q
AMS=./target/release/amsbuild
export AMSBUILD_HOME="${AMSBUILD_HOME:-./ams-data}"
if [ ! -d "$AMSBUILD_HOME/projects/demo" ]; then
  "$AMS" project init demo
  sed -i 's/"busybox:latest"/"ams-busybox:latest"/' "$AMSBUILD_HOME/projects/demo/master/project_source/pipeline.json"
fi
"$AMS" serve &
HOST=$!
trap 'kill -TERM $HOST 2>/dev/null; wait $HOST' EXIT INT TERM
for _ in $(seq 1 100); do
  "$AMS" status >/dev/null 2>&1 && break
  sleep 0.1
done
"$AMS" build demo --wait
echo
echo "The host is running with data directory $AMSBUILD_HOME."
echo "Web interface: http://localhost:8080/ams-build/ (user admin; its password was printed once"
echo "above at the first start; set another with: amsbuild user passwd admin)."
echo "Try, in another terminal:"
echo "  AMSBUILD_HOME=$AMSBUILD_HOME $AMS build demo --wait"
echo "  AMSBUILD_HOME=$AMSBUILD_HOME $AMS builds demo"
echo "Press Ctrl-C to stop it."
wait $HOST
