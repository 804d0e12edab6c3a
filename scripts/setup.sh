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
# An editable install rebuilds the mypyc modules (a minute or two): skipped while nothing it reads
# has changed (scripts/install_inputs.py) and the package imports.
stamp=.venv/.apsv-installed
want=$(.venv/bin/python scripts/install_inputs.py)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && .venv/bin/python -c 'import apsv' 2>/dev/null; then
    echo "setup: .venv is up to date" >&2
    exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build (torch==2.13.*) in pyproject.toml.
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
