#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then runs the benchmark CLI (extra arguments go to it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
asag-bench "$@"
