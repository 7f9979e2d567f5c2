#!/usr/bin/env bash
# Quick start: runs the host with a demo project whose build passes offline.
# Installs what the demo needs (scripts/setup.sh demo), builds amsbuild, creates ./ams-data with
# a "demo" project (the first time), starts the host, queues a build and follows its log, then
# keeps the host running until Ctrl-C, whether the build passed or not.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "checking the Docker engine, busybox-static and git; installing what is missing (a minute or two, the first time)"
bash scripts/setup.sh demo

step "building amsbuild (release; about 4 min on 2 cores the first time, seconds after)"
cargo build --release -q -p amsbuild
AMS=./target/release/amsbuild
export AMSBUILD_HOME="${AMSBUILD_HOME:-./ams-data}"

if [ ! -d "$AMSBUILD_HOME/projects/demo" ]; then
  step "creating the project demo in $AMSBUILD_HOME (instant)"
  "$AMS" project init demo
  sed -i 's/"busybox:latest"/"ams-busybox:latest"/' "$AMSBUILD_HOME/projects/demo/master/project_source/pipeline.json"
fi

PORT=$(sed -n 's/.*"web_interface_port": *\([0-9]*\).*/\1/p' "$AMSBUILD_HOME/web_conf.json" 2>/dev/null || true)
URL="http://localhost:${PORT:-8080}/ams-build/"

step "starting the host (a few seconds; on the first start it prints the admin password once)"
# Stopping: the host lets a running build finish (shutdown_grace_secs in web_conf.json, 30 s by
# default); a second Ctrl-C (or TERM, or a hang-up) is passed on and stops it at once. The
# script waits for the host either way. The traps come first, so no signal leaves it running.
HOST=
stop_host() {
  trap 'kill -TERM $HOST 2>/dev/null' INT TERM HUP
  [ -n "$HOST" ] || return 0
  if kill -TERM "$HOST" 2>/dev/null; then
    echo "demo: stopping the host (a running build gets shutdown_grace_secs to finish; Ctrl-C again stops it now)" >&2 || true
  fi
  while kill -0 "$HOST" 2>/dev/null; do wait "$HOST" 2>/dev/null || true; done
}
trap stop_host EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# In a session of its own, so that Ctrl-C reaches only this script, which stops the host as
# above. Without job control setsid does not fork, so $! is the host itself.
set +m
setsid "$AMS" serve &
HOST=$!
for _ in $(seq 1 300); do
  "$AMS" status >/dev/null 2>&1 && break
  kill -0 "$HOST" 2>/dev/null || { echo "demo: the host stopped at start; its reason is above" >&2; trap - EXIT; exit 1; }
  sleep 0.1
done
"$AMS" status >/dev/null || { echo "demo: the host did not answer within 30 s" >&2; exit 1; }

step "queueing a build of demo and following its log (seconds)"
if ! BUILD=$("$AMS" build demo); then
  step "the host did not queue the build (the reason is above); it keeps running"
elif "$AMS" log "$BUILD"; then
  step "the build passed"
else
  step "the build did not pass; the host keeps running so you can look"
  echo "Its log:   AMSBUILD_HOME=$AMSBUILD_HOME $AMS log $BUILD"
  echo "Its page:  ${URL}build/demo/$BUILD"
fi
echo
echo "The host is running with data directory $AMSBUILD_HOME."
echo "Web interface: $URL (user admin; its password was printed once"
echo "above at the first start; set another with: AMSBUILD_HOME=$AMSBUILD_HOME $AMS user passwd admin)."
echo "Try, in another terminal:"
echo "  AMSBUILD_HOME=$AMSBUILD_HOME $AMS build demo --wait"
echo "  AMSBUILD_HOME=$AMSBUILD_HOME $AMS builds demo"
echo "  AMSBUILD_HOME=$AMSBUILD_HOME $AMS log demo 1"
echo "Press Ctrl-C to stop it."
if wait "$HOST"; then
  trap - EXIT
else
  code=$?
  trap - EXIT
  # The host ended by itself (a Ctrl-C or a TERM of this script leaves through its traps).
  echo "demo: the host stopped (exit $code); its reason is above" >&2
  exit "$code"
fi
