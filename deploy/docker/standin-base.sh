#!/usr/bin/env bash
# Builds (once) a local stand-in for `python:3.11-slim`, for machines that cannot pull from Docker Hub:
# Debian bookworm minbase + python3 (3.11) + python3-venv, from Debian's packages (debootstrap), imported into
# the Docker daemon at $DOCKER_HOST. Prints the image tag on stdout (everything else goes to stderr).
#
# The root filesystem is built once and kept as a tarball in $SEQSERVE_CACHE (default /var/cache/seqserve),
# named by a hash of this script: a second run (even with a fresh daemon) only imports it (seconds).
# The host's CA bundle is copied in and PIP_CERT points at it, so pip inside a `--network host` build trusts
# whatever TLS the host trusts. Needs root and debootstrap (`.ci/install-sysdeps` installs it) the first time.
set -euo pipefail
CACHE=${SEQSERVE_CACHE:-/var/cache/seqserve}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
recipe=$(sha256sum "$0" | cut -c1-12)
tag="seqserve-standin/python:3.11-bookworm-$recipe"
tarball="$CACHE/standin-base-$recipe.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || { echo "standin-base: debootstrap is not installed" >&2; exit 1; }
  mkdir -p "$CACHE"
  work=$(mktemp -d "${TMPDIR:-/var/tmp}/seqserve-standin.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  root="$work/rootfs"
  echo "standin-base: debootstrap bookworm into $root (once; cached as $tarball)" >&2
  if ! debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$MIRROR" >"$work/log" 2>&1; then
    tail -40 "$work/log" >&2
    echo "standin-base: debootstrap failed" >&2
    exit 1
  fi
  # Like Debian's -slim images: no docs, man pages or locales, now or in later apt-get installs.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/info/*
CFG
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  ln -sf python3 "$root/usr/bin/python"  # the official image has `python`; so does this one
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  find "$CACHE" -maxdepth 1 -name 'standin-base-*.tar' ! -name "${tarball##*/}" -delete  # older recipes
fi
echo "standin-base: importing $tarball as $tag" >&2
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  "$tarball" "$tag" >/dev/null
echo "$tag"
