#!/usr/bin/env bash
# `make image-test`: builds the seqserve image and runs it for real (tests/deploy, marker `docker`), then cleans up.
#   1. installs docker.io + debootstrap when missing (.ci/install-sysdeps),
#   2. uses the Docker daemon at $DOCKER_HOST (or the default socket) if one answers; otherwise starts a private
#      dockerd (data-root, exec-root and socket in a scratch dir under /var/tmp, no default bridge network),
#   3. runs the docker tests with SEQSERVE_STRICT_DEPLOY=1 (a missing daemon fails them instead of skipping),
#   4. stops its private daemon and deletes its scratch dir (images, containers, volumes with it). The stand-in
#      base image's root filesystem stays cached in $SEQSERVE_CACHE (default /var/cache/seqserve).
# Fails loudly when Docker cannot work here (no root to start a daemon, dockerd refusing to start).
# Measurements (image size, seconds to healthy, drain) are printed at the end and kept in build/image-test.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export SEQSERVE_CACHE=${SEQSERVE_CACHE:-/var/cache/seqserve}
export SEQSERVE_STRICT_DEPLOY=1
export SEQSERVE_IMAGE_REPORT=${SEQSERVE_IMAGE_REPORT:-$PWD/build/image-test.json}

say() { echo "image-test: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  bash .ci/install-sysdeps || die "could not install docker.io and debootstrap (.ci/install-sysdeps)"
fi
command -v docker >/dev/null || die "no docker client on PATH"

scratch=""
dockerd_pid=""
stop_daemon() {
  [ -n "$dockerd_pid" ] || return 0
  say "stopping the private dockerd (pid $dockerd_pid)"
  kill -TERM "$dockerd_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$dockerd_pid" 2>/dev/null; then
    say "dockerd did not stop in 30 s: SIGKILL"
    kill -KILL "$dockerd_pid" 2>/dev/null || true
    sleep 1
  fi
  # Never delete through a live mount: unmount whatever is still mounted under the scratch dir first.
  grep -o " $scratch/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf "$scratch"
}
trap stop_daemon EXIT

if docker info >/dev/null 2>&1; then
  say "using the Docker daemon at ${DOCKER_HOST:-the default socket}"
else
  [ "$(id -u)" -eq 0 ] || die "no Docker daemon answers and we are not root to start one (make image-test needs Docker)"
  scratch=$(mktemp -d /var/tmp/seqserve-docker.XXXXXX)
  say "starting a private dockerd in $scratch"
  dockerd --data-root "$scratch/data" --exec-root "$scratch/exec" --pidfile "$scratch/dockerd.pid" \
    --host "unix://$scratch/docker.sock" --bridge=none --iptables=false --ip-masq=false \
    >"$scratch/dockerd.log" 2>&1 &
  dockerd_pid=$!
  export DOCKER_HOST="unix://$scratch/docker.sock"
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -30 "$scratch/dockerd.log" >&2; die "dockerd exited at start"; }
    sleep 0.25
  done
  docker info >/dev/null 2>&1 || { tail -30 "$scratch/dockerd.log" >&2; die "dockerd did not answer in 30 s"; }
fi

mkdir -p "$(dirname "$SEQSERVE_IMAGE_REPORT")"
rm -f "$SEQSERVE_IMAGE_REPORT"
start=$(date +%s)
status=0
"$PY" -m pytest -q -p no:cacheprovider -m docker tests/deploy "$@" || status=$?
say "docker tests took $(( $(date +%s) - start )) s"
[ -s "$SEQSERVE_IMAGE_REPORT" ] && { say "measured:"; cat "$SEQSERVE_IMAGE_REPORT" >&2; }
exit "$status"
