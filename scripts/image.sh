#!/usr/bin/env bash
# Builds the small local image used by the demo and the tests: busybox (static, from Debian's
# busybox-static) on an empty base. No registry is needed. Usage: scripts/image.sh [--force]
set -euo pipefail
IMAGE="${AMSBUILD_TEST_IMAGE:-ams-busybox:latest}"
if [ "${1:-}" != "--force" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
# Debian's busybox-static puts a statically linked busybox here.
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || { echo "scripts/image.sh: $BUSYBOX is missing: apt-get install busybox-static" >&2; exit 1; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$BUSYBOX" "$ctx/busybox"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "mkdir", "-p", "/usr/bin", "/sbin", "/usr/sbin", "/tmp", "/root", "/etc"]
RUN ["/bin/busybox", "--install", "-s"]
RUN ["/bin/busybox", "sh", "-c", "echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd && echo 'root:x:0:' > /etc/group && chmod 1777 /tmp"]
ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin
CMD ["/bin/sh"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" "$ctx" >/dev/null
echo "built image $IMAGE"
