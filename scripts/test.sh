#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs pytest.
# Usage: scripts/test.sh [pytest args]     e.g. scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Docker backend's tests run against a real engine: install and start one if none answers.
scripts/start-docker.sh
# Real routing daemons (FRR, BIRD, GoBGP, ExaBGP) for the interop tests.
scripts/install-peers.sh
export APSV_SHARED_DATA=${APSV_SHARED_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/ruff check apsv tests benchmarks jobs tune
.venv/bin/mypy
exec .venv/bin/pytest "$@"
