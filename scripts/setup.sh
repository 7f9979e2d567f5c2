#!/usr/bin/env bash
# Makes this machine ready to run AMS-Build, and by default to build and test it: installs the
# Debian packages that are missing, starts a Docker engine when none answers, and builds the
# local image ams-busybox:latest. Idempotent; run as root (or with sudo available).
#
#   scripts/setup.sh          everything the tests need (what scripts/test.sh and CI run)
#   scripts/setup.sh demo     only what scripts/demo.sh needs: the Docker engine, busybox-static
#                             for the local image, and git
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-test}"
case "$MODE" in test | demo) ;; *) echo "usage: scripts/setup.sh [test|demo]" >&2; exit 2 ;; esac

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
# What running the host needs: the engine, the local image's busybox, git for projects.
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v git >/dev/null 2>&1 || need+=(git)
if [ "$MODE" = test ]; then
  # p7zip checks archives independently.
  command -v 7z >/dev/null 2>&1 || need+=(p7zip-full)
  # sqlite3, for the backup test to read a copy on its own.
  command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
  # mkfs.ext4 and chattr, for the fault tests' small file systems.
  command -v mkfs.ext4 >/dev/null 2>&1 && command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)
  # Chromium and its WebDriver, for the browser test.
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium chromium-driver)
  # The install tests: curl runs README's API examples, systemd-analyze checks the unit,
  # strip makes the offline server image, tini (with docker.io) is its init.
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  command -v strip >/dev/null 2>&1 || need+=(binutils)
  [ -x /usr/bin/tini-static ] || need+=(tini)
  # The SSH tests run the ssh client against their own sshd (openssh-server, below).
  command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (a minute or two)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "$MODE" = test ] && [ ! -x /usr/sbin/sshd ]; then
  # The SSH tests start their own sshd; the package must not start the system's on port 22:
  # a policy-rc.d that refuses every service start, for this install only.
  echo "setup: installing openssh-server (its service is not started)"
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    trap '$SUDO rm -f "$guard"' EXIT
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$guard" >/dev/null
    $SUDO chmod 755 "$guard"
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssh-server >/dev/null
  if [ -n "$guard" ]; then $SUDO rm -f "$guard"; trap - EXIT; fi
fi

if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd (log in /tmp/amsbuild-dockerd.log)"
  # Containers on the default bridge may not reach each other (--icc=false, as Docker's
  # security guide advises): builds then join that bridge, which skips the embedded DNS set-up
  # every container of a user-defined network pays (docs/containers.md).
  $SUDO sh -c 'nohup dockerd --icc=false >/tmp/amsbuild-dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not come up; see /tmp/amsbuild-dockerd.log" >&2; exit 1; }
fi

bash scripts/image.sh
