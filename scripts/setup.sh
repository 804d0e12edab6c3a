#!/usr/bin/env bash
# Create .venv and install APSV with everything its tests need. Idempotent; safe to re-run.
# Usage: scripts/setup.sh            (run from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: APSV needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build (torch==2.13.*) in pyproject.toml.
.venv/bin/python -m pip install --quiet -e ".[dev]"
