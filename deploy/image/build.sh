#!/usr/bin/env bash
# Build Roomcast's image without any container registry: a Debian base made by debootstrap from
# Debian's packages, committed by buildah from scratch, then the repository's Containerfile
# built on it.
#
#   deploy/image/build.sh              build (or reuse) and print "image=<ref>" last
#   deploy/image/build.sh --rebuild    build both stages again, even if cached
#
# Needs root, debootstrap, buildah and podman (apt-get install debootstrap buildah podman runc).
# Both images are cached in the containers storage, tagged by a hash of their inputs:
#   localhost/roomcast-base:<hash>  Debian bookworm minbase + python3, python3-venv, ca-certificates
#   localhost/roomcast:<hash>       the Containerfile on that base (hash of Containerfile,
#                                   .dockerignore, this script, pyproject.toml, README.md and
#                                   src/), also tagged :latest
# Earlier builds (other hashes) are removed. Environment: DEBIAN_MIRROR (debootstrap's default).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
suite=bookworm
packages=python3,python3-venv,ca-certificates
rebuild=0
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    *) echo "usage: $0 [--rebuild]" >&2; exit 2 ;;
  esac
done

for tool in debootstrap buildah podman; do
  command -v "$tool" >/dev/null || { echo "build.sh needs $tool (apt-get install $tool)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build.sh needs root (debootstrap, buildah's storage)" >&2; exit 1; }

# One build at a time on this machine (the test suite and a developer may both call it).
exec 9>"${TMPDIR:-/tmp}/roomcast-image-build.lock"
flock 9

# The base's hash covers what makes it: the suite, the packages and the part of this script
# between the BASE markers.
base_recipe="$(sed -n '/^# BASE-BEGIN/,/^# BASE-END/p' "$0")"
base_key="$(printf '%s\n%s\n%s\n' "$suite" "$packages" "$base_recipe" | sha256sum | cut -c1-16)"
base_ref="localhost/roomcast-base:$suite-$base_key"

# BASE-BEGIN
make_base() {
  local work rootfs ctr mnt
  work="$(mktemp -d "${TMPDIR:-/tmp}/roomcast-base.XXXXXX")"
  rootfs="$work/rootfs"
  trap 'rm -rf "$work"' RETURN
  echo "debootstrap $suite ($packages) ..." >&2
  # shellcheck disable=SC2086  # DEBIAN_MIRROR is one optional argument
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" ${DEBIAN_MIRROR:-} \
    >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; return 1; }
  # What no container needs: package caches and lists, documentation, translations, device
  # nodes and files the runtime provides.
  local dir
  for dir in var/cache/apt var/lib/apt/lists var/log usr/share/doc usr/share/man usr/share/info \
    usr/share/locale dev tmp var/tmp; do
    find "${rootfs:?}/$dir" -mindepth 1 -delete
  done
  rm -f "${rootfs:?}"/etc/hostname "${rootfs:?}"/etc/resolv.conf "${rootfs:?}"/etc/machine-id
  cat >"$rootfs"/etc/dpkg/dpkg.cfg.d/01-container <<'DPKG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
DPKG
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  tar -C "$rootfs" -cf - . | tar -C "$mnt" -xpf -
  buildah umount "$ctr" >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd /bin/bash \
    --label org.opencontainers.image.title="Debian $suite minbase with python3" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$base_ref" >/dev/null
}
# BASE-END

if [ "$rebuild" = 1 ] || ! podman image exists "$base_ref"; then
  started=$SECONDS
  make_base
  echo "base $base_ref built in $((SECONDS - started)) s" >&2
else
  echo "base $base_ref cached" >&2
fi

# The image's hash: the base and every file the Containerfile copies or that shapes the build.
image_key="$(
  cd "$repo"
  {
    echo "$base_ref"
    sha256sum Containerfile .dockerignore deploy/image/build.sh pyproject.toml README.md
    find src -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z \
      | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)"
image_ref="localhost/roomcast:$image_key"

if [ "$rebuild" = 1 ] || ! podman image exists "$image_ref"; then
  started=$SECONDS
  echo "building $image_ref from Containerfile ..." >&2
  # chroot isolation needs no OCI runtime (crun cannot start containers on a host with hybrid
  # cgroups, as here) and the host network reaches the package index for pip. pip inside
  # trusts what this host trusts (a proxy's CA, say): the bundle and a pip.conf naming it are
  # mounted for the RUN steps only, never committed.
  work="$(mktemp -d "${TMPDIR:-/tmp}/roomcast-build.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  printf '[global]\ncert = /run/roomcast-build/ca.crt\n' >"$work/pip.conf"
  buildah build --quiet --isolation chroot --network host --pull=never --format docker \
    --volume "$work/pip.conf:/etc/pip.conf:ro" \
    --volume "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}:/run/roomcast-build/ca.crt:ro" \
    --build-arg BASE="$base_ref" --tag "$image_ref" --tag localhost/roomcast:latest \
    --file "$repo/Containerfile" "$repo" >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; exit 1; }
  echo "image $image_ref built in $((SECONDS - started)) s" >&2
else
  podman tag "$image_ref" localhost/roomcast:latest
  echo "image $image_ref cached" >&2
fi

# Earlier builds of this script (tags that are input hashes) go, so the storage does not grow
# with every change of src/; an image still used by a container stays.
prune() {
  local ref
  podman images --noheading --format '{{.Repository}}:{{.Tag}}' --filter "reference=$1" \
    | grep -E ':([a-z]+-)?[0-9a-f]{16}$' | while read -r ref; do
      if [ "$ref" != "$2" ]; then
        podman rmi "$ref" >/dev/null 2>&1 || echo "kept $ref (in use)" >&2
      fi
    done
}
prune localhost/roomcast "$image_ref"
prune localhost/roomcast-base "$base_ref"

size="$(podman image inspect --format '{{.Size}}' "$image_ref")"
base_size="$(podman image inspect --format '{{.Size}}' "$base_ref")"
echo "size: $((size / 1024 / 1024)) MiB uncompressed (base $((base_size / 1024 / 1024)) MiB)" >&2
echo "image=$image_ref"
