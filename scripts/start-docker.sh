#!/usr/bin/env bash
# Make sure a Docker engine answers on the default socket: install Debian's docker.io if dockerd
# is missing, then start it in the background (no systemd here). Idempotent.
# The engine gets no bridge and no iptables rules: APSV's containers run with --network none.
set -euo pipefail
if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "start-docker: installing docker.io" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q docker.io >/dev/null
fi
root=${APSV_DOCKER_ROOT:-/var/lib/apsv-docker}
mkdir -p "$root"
nohup dockerd --data-root "$root" --iptables=false --ip6tables=false --bridge=none \
    --pidfile /run/apsv-dockerd.pid >/tmp/apsv-dockerd.log 2>&1 &
for _ in $(seq 1 120); do
    if docker info >/dev/null 2>&1; then
        echo "start-docker: engine ready" >&2
        exit 0
    fi
    sleep 0.5
done
echo "start-docker: dockerd did not come up; log:" >&2
tail -20 /tmp/apsv-dockerd.log >&2
exit 1
