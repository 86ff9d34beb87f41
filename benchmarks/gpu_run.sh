#!/usr/bin/env bash
# The one-command GPU run, sized to the GPU machine as it is lent (15 minutes in all, 8 files back):
#   bash benchmarks/gpu_run.sh                      # first command: every part, <= 330 s
#   bash benchmarks/gpu_run.sh model --budget 200   # follow-up: only the parts named
#   bash benchmarks/gpu_run.sh --dry-run            # any machine: the plan, time boxes, files
# The parts, their time boxes and the files: benchmarks/gpu_run.py (or --help).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_run "$@"
