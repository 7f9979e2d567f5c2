#!/usr/bin/env bash
# Makes this machine ready to build and test AMS-Build: installs what is missing (Docker engine,
# static busybox for the local test image, p7zip to check archives independently, git, sqlite3,
# e2fsprogs for the fault tests' small file systems, Chromium
# and its WebDriver for the browser test, curl, systemd-analyze, strip and tini for the install
# tests), starts
# a Docker engine when none answers, and builds the local test image. Idempotent; run as root
# (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v 7z >/dev/null 2>&1 || need+=(p7zip-full)
command -v git >/dev/null 2>&1 || need+=(git)
# sqlite3, for the backup test to read a copy on its own.
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# mkfs.ext4 and chattr, for the fault tests' small file systems.
command -v mkfs.ext4 >/dev/null 2>&1 && command -v chattr >/dev/null 2>&1 || need+=(e2fsprogs)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium chromium-driver)
# The install tests: curl runs README's API examples, systemd-analyze checks the unit,
# strip makes the offline server image, tini (with docker.io) is its init.
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v strip >/dev/null 2>&1 || need+=(binutils)
[ -x /usr/bin/tini-static ] || need+=(tini)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd (log in /tmp/amsbuild-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/tmp/amsbuild-dockerd.log 2>&1 &'
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not come up; see /tmp/amsbuild-dockerd.log" >&2; exit 1; }
fi

bash scripts/image.sh
