#!/usr/bin/env bash
# Start Roomcast's image on this machine with podman, as Kubernetes would run it: non-root (the
# image's user), read-only root filesystem with a tmpfs on /tmp, no capabilities, no new
# privileges. Arguments go to `podman run` (options, then the image, then roomcast's flags):
#
#   deploy/image/run.sh --name rc -e ROOMCAST_JWT_SECRET=... -e ROOMCAST_API_KEY=... \
#     -e ROOMCAST_ALLOWED_ORIGINS=https://app.example -e ROOMCAST_PORT=8000 localhost/roomcast
#
# It uses the host's network (the server listens on the host's ROOMCAST_PORT; no bridge, no
# port mapping), and works around what this sandbox refuses:
# - crun fails with "cgroups in hybrid mode not supported" (cgroup v1 with a v2 mount beside),
#   so runc runs the container when it is installed (OCI_RUNTIME overrides);
# - podman asks for RLIMIT_NOFILE 1048576 and RLIMIT_NPROC above the process's hard limit,
#   which needs CAP_SYS_RESOURCE ("setrlimit RLIMIT_NPROC: Operation not permitted"), so both
#   limits are set to what this shell already has;
# - without systemd, podman cannot schedule the image's HEALTHCHECK (it logs errors), so its
#   timer is off; `podman healthcheck run NAME` still runs the check.
set -euo pipefail

command -v podman >/dev/null || { echo "run.sh needs podman (apt-get install podman runc)" >&2; exit 1; }
runtime="${OCI_RUNTIME:-}"
if [ -z "$runtime" ] && command -v runc >/dev/null; then
  runtime="$(command -v runc)"
fi
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
[ "$nofile" = unlimited ] && nofile=1048576
# podman itself runs under an RLIMIT_NPROC of 32768 (its containers.conf default).
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi

health=()
[ -S /run/systemd/private ] || health=(--health-interval=disable)

exec podman ${runtime:+--runtime "$runtime"} run --rm "${health[@]}" \
  --network host \
  --read-only \
  --cap-drop ALL \
  --security-opt no-new-privileges \
  --ulimit "nofile=$nofile:$nofile" \
  --ulimit "nproc=$nproc:$nproc" \
  "$@"
