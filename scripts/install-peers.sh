#!/usr/bin/env bash
# The real routing daemons the interop tests peer with: FRR (bgpd, bfdd), BIRD 2 and GoBGP from
# Debian, ExaBGP from PyPI (into .venv); bgpdump to check the MRT files APSV writes; Prometheus
# to scrape a live deployment. Nothing is started here: each test starts and stops its
# own daemons. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
[ -x /usr/lib/frr/bgpd ] && [ -x /usr/lib/frr/bfdd ] || missing+=(frr)
command -v bird >/dev/null 2>&1 || missing+=(bird2)
command -v gobgpd >/dev/null 2>&1 || missing+=(gobgpd)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v bgpdump >/dev/null 2>&1 || missing+=(bgpdump)  # reads the MRT files rib_dump writes
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)  # scrapes a live deployment (test_prometheus.py)
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-peers: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# the `peers` extra's requirements only: installing the package again would rebuild its mypyc modules
.venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["peers"]))' \
    | .venv/bin/python -m pip install --quiet -r /dev/stdin
