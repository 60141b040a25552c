#!/usr/bin/env bash
# The main job: sets up ./.venv if needed (each step printed with its time), then runs the benchmark CLI
# (extra arguments go to it), which ends with the verdict against the SPEC goals.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
asag_step "running asag-bench${*:+ $*} (a progress bar per shape on stderr; the table and the verdict follow)"
asag-bench "$@"
asag_step_done
