#!/usr/bin/env bash
# The one-command GPU run: bash benchmarks/gpu_run.sh   (from the repository root or anywhere)
#
# On a GPU machine (torch 2.11 / Triton 3.6, no network, a 10-minute limit) it
#   1. prints the device, driver, torch and Triton versions and installs the package
#      (pip install --no-build-isolation --no-deps -e .);
#   2. measures the ceilings: copy bandwidth and bf16 matmul rate (benchmarks/ceilings.py);
#   3. runs the whole test suite on CUDA with compiled kernels (TRITON_INTERPRET=0,
#      UNIFORMER_FAST_TEST_DEVICE=cuda: tests that take the `device` fixture run on the GPU);
#   4. runs the benchmarks in parts (ops, linear, blocks, model), each time-boxed;
#   5. writes benchmarks/results/<gpu>-<date>.{json,md,png} (+ the .jsonl the parts append to and
#      tests.log), rewriting the report after every part so a run cut off keeps what it measured,
#      and copies them to $OUT when that is set;
#   6. prints a short summary table last.
# Budget: UNIFORMER_FAST_GPU_RUN_S seconds in all (default 560), each part capped.
set -uo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
BUDGET=${UNIFORMER_FAST_GPU_RUN_S:-560}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # `python -m benchmarks.report` from anywhere
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# box CAP RESERVE: seconds for a part: at most CAP, leaving RESERVE for what follows.
box() { local l; l=$(( $(left) - $2 )); (( l > $1 )) && l=$1; (( l < 0 )) && l=0; echo $l; }
say() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not found"
$PY - <<'EOF'
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "| sm", f"{p.major}{p.minor}", "| SMs", p.multi_processor_count,
          "| memory", f"{p.total_memory / 2**30:.0f} GiB", "| L2", f"{getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
try:
    import pytest_benchmark
    print("pytest-benchmark", pytest_benchmark.__version__)
except ImportError:
    print("pytest-benchmark: not installed (benchmarks/conftest.py supplies a minimal fixture)")
EOF
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_run: no CUDA device; nothing to do"; exit 1
fi

say "install"
timeout 120 pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -5
$PY -c "import uniformer_fast, uniformer_fast.ops as o; print('uniformer_fast', uniformer_fast.__version__, \
'| dwconv3d backends', o.available_backends('dwconv3d'), '| attention backends', o.available_backends('attention'))"

GPU=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")
STAMP=$(date -u +%Y%m%d-%H%M)
RES=${UNIFORMER_FAST_RESULTS:-benchmarks/results}
mkdir -p "$RES" && RES=$(cd "$RES" && pwd)
BASE="$RES/$GPU-$STAMP"
JSONL="$BASE.jsonl"
: > "$JSONL"
$PY - "$BASE.env.json" <<'EOF'
import json, subprocess, sys, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or None
except OSError:
    env["commit"] = None
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
except OSError:
    env["driver"] = None
json.dump(env, open(sys.argv[1], "w"))
EOF

say "ceilings"
timeout 60 $PY -m benchmarks.ceilings --out "$BASE.ceilings.json"
export UNIFORMER_FAST_CEILINGS="$BASE.ceilings.json"

publish() {
  $PY -m benchmarks.report "$JSONL" --md "$BASE.md" --png "$BASE.png" --ceilings "$BASE.ceilings.json" \
      --env "$BASE.env.json" --title "uniformer_fast benchmarks: $GPU, $STAMP" > /dev/null 2> "$BASE.report.err" || true
  $PY - "$JSONL" "$BASE.json" "$BASE.ceilings.json" "$BASE.env.json" <<'EOF'
import json, os, sys
from benchmarks.report import load
jsonl, out, ceil, env = sys.argv[1:]
doc = {"env": json.load(open(env)) if os.path.exists(env) else None,
       "ceilings": json.load(open(ceil)) if os.path.exists(ceil) else None,
       "benchmarks": load([jsonl]) if os.path.getsize(jsonl) else []}
json.dump(doc, open(out, "w"), indent=1, default=str)
EOF
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp -f "$BASE".* "$OUT"/ 2>/dev/null || true; fi
}

TBOX=$(box 150 300)
say "tests on CUDA (TRITON_INTERPRET=0, UNIFORMER_FAST_TEST_DEVICE=cuda; time box ${TBOX}s)"
if (( TBOX >= 10 )); then
  TRITON_INTERPRET=0 UNIFORMER_FAST_TEST_DEVICE=cuda timeout -s INT -k 10 "$TBOX" \
    $PY -m pytest -q -p no:cacheprovider --durations=5 tests/ > "$BASE.tests.log" 2>&1
  echo "tests exit code $? (124: cut at its time box); tail of $BASE.tests.log:"
  tail -15 "$BASE.tests.log"
else
  echo "skipped: no time left"
fi

BENCH_OPTS=()
if $PY -c "import pytest_benchmark" 2>/dev/null; then
  BENCH_OPTS=(--benchmark-only --benchmark-columns=median,rounds --benchmark-sort=name)
fi
export UNIFORMER_FAST_BENCH_JSONL="$JSONL" TRITON_INTERPRET=0
part() {  # part NAME CAP RESERVE FILES...
  local name=$1 cap=$2 reserve=$3; shift 3
  local t; t=$(box "$cap" "$reserve")
  say "benchmarks: $name (time box ${t}s)"
  if (( t < 20 )); then echo "skipped: no time left"; return; fi
  timeout -s INT -k 15 "$t" $PY -m pytest -q -p no:cacheprovider "${BENCH_OPTS[@]}" "$@" \
    > "$BASE.$name.log" 2>&1
  echo "exit code $? (124: cut at its time box); $(grep -c . "$JSONL") results so far"
  grep -E "passed|failed|error" "$BASE.$name.log" | tail -2
  publish
}
part dwconv3d 150 200 benchmarks/test_dwconv3d.py
part attention 70 140 benchmarks/test_attention.py
part linear 50 120 benchmarks/test_linear.py  # the fused bias+GELU matmul vs cuBLAS + GELU (#6)
part blocks 100 60 benchmarks/test_blocks.py
part model 200 20 benchmarks/test_whole_model.py

say "report: $BASE.md ($(grep -c . "$JSONL") benchmarks)"
publish
cat "$BASE.report.err" 2>/dev/null
$PY -m benchmarks.report "$JSONL" --ceilings "$BASE.ceilings.json" --summary 2>/dev/null | sed -n '/^| group | baseline/,$p'
echo "done in $(( $(date +%s) - T0 ))s"
