#!/usr/bin/env bash
# The main job end to end on the embedded default, from a fresh machine.
# Usage: scripts/demo.sh [apsv demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/apsv demo "$@"
