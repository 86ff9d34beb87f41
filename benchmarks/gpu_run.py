"""The GPU run, sized to the GPU machine as it is lent (``bash benchmarks/gpu_run.sh`` calls this).

    bash benchmarks/gpu_run.sh                     # the first command: every part, <= --budget s
    bash benchmarks/gpu_run.sh model --budget 200  # a follow-up: only the parts named
    bash benchmarks/gpu_run.sh attention -k "stage3 and fwd" --compile
    bash benchmarks/gpu_run.sh --dry-run           # on any machine: the plan, its time boxes, the files

The machine is lent for 15 minutes in all, its starts (1-2 minutes each) included; it goes back 30 s
after a command ends, and only 8 files come back from ``$OUT``. So the first command runs every
part in at most ``--budget`` seconds (default 330: under 6 minutes with the interpreter's start),
Triton's cold compiles included, the most decisive evidence first:

1. ``machine``: device, driver, torch, CUDA, Triton, Python versions; ``install``: the package,
   editable, without the C++ CPU kernels (``UNIFORMER_FAST_CPP=0``: nothing here uses them);
2. ``parity``: every Triton kernel direction against the reference on CUDA, compiled
   (``TRITON_INTERPRET=0``), on small shapes that hit the edges (:data:`PARITY_TESTS`);
3. ``ceilings``: copy bandwidth and bf16 matmul rate (benchmarks/ceilings.py);
4. the op benchmarks (DPE 3x3x3 and the 5x5x5 depthwise conv, attention, the MLP linears) at the
   UniFormer-S/B stage shapes, batch 8, 16 frames, bf16, beside their baselines;
5. ``blocks`` and ``model`` (UniFormer-S and -B, inference and a training step) as time allows; the
   training rows at the official drop-path rates (S 0.1, B 0.3) first, S also at 0 (B at 0 only in
   a follow-up: ``model -k "uniformer_base and dp0-"``).

Each part runs in its own process inside a time box (``SIGINT`` a few seconds before its end,
``SIGKILL`` at it): its floor first, then up to its cap what the later parts' floors leave; a part
with less than its floor left is skipped. After every benchmark part the results are
published again, so a command cut off keeps what it measured. ``torch.compile`` rows and 32-frame
shapes are left to a follow-up (``--compile``, ``-k``).

Files (``benchmarks/results/<gpu>-<UTC stamp>.*``, copied to ``$OUT`` when it is set; at most 8):
``.json`` (environment, ceilings, parity, every benchmark record, the steps and their times),
``.md`` (the report), ``.png`` (the speedup plot), ``.logs.tar.gz`` (every log, the JSON lines,
the ceilings). The last thing printed is a compact summary (the device tool returns only the last
12,000 characters of a command's output).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 330
MAX_OUT_FILES = 8  # what the GPU machine returns from $OUT
PUBLISH_RESERVE_S = 15  # the last report, the archive and the summary
KILL_GRACE_S = 8  # SIGINT this long before a box ends (pytest then writes its summary), then SIGKILL
MACHINE_TIMEOUT_S = 60
INSTALL_TIMEOUT_S = 120
PARITY_WORKERS = 8  # pytest-xdist processes for the parity tests (Triton compiles in parallel)

# The parity selection: each Triton kernel direction (forward, input gradient, weight/bias
# gradient, the fused epilogues and statistics) in every dtype, on the odd, tile-crossing shapes of
# the CPU suite. Node ids, checked to exist by tests/test_gpu_run.py.
PARITY_TESTS = (
    "tests/test_dwconv3d.py::test_dwconv3d_triton_shapes_and_kernels",
    "tests/test_dwconv3d.py::test_dwconv3d_triton_half_dtypes",
    # The contract checks of every op (the stride-0 y.sum() gradient among them) and the fused
    # tail's stochastic depth, op and CBlock.
    "tests/test_op_contracts.py::test_sum_gradients_and_inputs_untouched",
    "tests/test_cblock_training.py::test_branch_scale_matches_reference",
    "tests/test_cblock_training.py::test_cblock_training_with_drop_path",
    "tests/test_dpe.py::test_dpe_layernorm_triton_shapes",
    "tests/test_dpe.py::test_dpe_layernorm_triton_half_dtypes",
    "tests/test_dpe_bn.py::test_dpe_bn_stats_triton_shapes",
    "tests/test_dpe_bn.py::test_dpe_bn_stats_triton_half_dtypes",
    "tests/test_local_mhra.py::test_triton_shapes",
    "tests/test_local_mhra.py::test_triton_half_dtypes",
    "tests/test_local_mhra_bn.py::test_triton_shapes",
    "tests/test_local_mhra_bn.py::test_triton_half_dtypes",
    "tests/test_attention.py::test_triton_kernels_match_reference",
    "tests/test_attention.py::test_triton_gpu_block_sizes_match_reference",
    "tests/test_attention.py::test_triton_masked_keys_with_very_negative_logits",
    # Linear: autotuned on a GPU (every config of each new shape is timed), so a few shapes only.
    "tests/test_linear_triton.py::test_parity[bias-gelu-torch.float32-150x130-N140]",
    "tests/test_linear_triton.py::test_parity[bias-gelu-torch.bfloat16-150x130-N140]",
    "tests/test_linear_triton.py::test_parity[bias-gelu-torch.float16-37x40-N33]",
    "tests/test_linear_triton.py::test_parity[no_bias-none-torch.bfloat16-1x2x3x5x17-N31]",
    "tests/test_linear_triton.py::test_weight_grad_split_reduction[300-gelu-3]",
    "tests/test_model_triton.py",
)

# Benchmarks of the first command: 16 frames (the op files also have 32), no torch.compile rows, and
# training steps at the official drop-path rates (S 0.1, B 0.3) and S at 0 for comparison, but not
# UniFormer-B at 0 (nobody trains it so; its infer rows carry no dp, so "dp0-" matches only it).
FIRST_COMMAND_FILTER = "not f32 and not compile and not (uniformer_base and dp0-)"


@dataclasses.dataclass(frozen=True)
class Part:
    """One time-boxed step: ``cap`` seconds at most, not started with fewer than ``floor``."""
    name: str
    what: str
    cap: int
    floor: int
    kind: str  # "tests", "ceilings", "bench" or "command" (argv as given)
    args: tuple = ()


PARTS = (
    Part("parity", "every Triton kernel direction vs the reference, compiled on CUDA", 100, 30,
         "tests", PARITY_TESTS),
    Part("ceilings", "copy bandwidth and bf16 matmul rate", 40, 10, "ceilings"),
    Part("dwconv3d", "DPE 3x3x3 (stages 1-4) and depthwise 5x5x5 (stages 1-2), fwd and fwd+bwd", 80, 20,
         "bench", ("benchmarks/test_dwconv3d.py",)),
    Part("attention", "attention on packed qkv (stages 3-4), fwd and fwd+bwd", 50, 15,
         "bench", ("benchmarks/test_attention.py",)),
    Part("linear", "MLP linears + GELU vs cuBLAS + GELU (stages 1-4)", 40, 10,
         "bench", ("benchmarks/test_linear.py",)),
    Part("blocks", "CBlock (stages 1-2) and SABlock (3-4), eval fwd and train fwd+bwd (drop path, 0)", 50, 15,
         "bench", ("benchmarks/test_blocks.py",)),
    Part("model", "UniFormer-S and -B, inference and a training step (AdamW; drop path S 0.1 and 0, B 0.3)",
         180, 30,
         "bench", ("benchmarks/test_whole_model.py",)),
)
PART_NAMES = tuple(p.name for p in PARTS)


# --------------------------------------------------------------------------------------------
# Time boxes

def time_box(part: Part, later: "list[Part]", left: float) -> int:
    """Seconds ``part`` may run with ``left`` seconds of the budget to go (the publishing reserve
    kept): its floor first (an earlier part is the more decisive one), then up to its cap what the
    later parts' floors leave; 0 (skip) when not even its floor is left."""
    free = left - PUBLISH_RESERVE_S
    if free < part.floor:
        return 0
    return int(min(part.cap, max(part.floor, free - sum(p.floor for p in later))))


def schedule(parts: "list[Part]", budget: float, start: float) -> "list[tuple[Part, int, int]]":
    """The worst case: every part runs to the end of its box. ``(part, start_s, box_s)`` per part,
    box 0 for a part that would be skipped; ``start`` is the time the fixed steps take."""
    out, t = [], start
    for i, part in enumerate(parts):
        box = time_box(part, parts[i + 1:], budget - t)
        out.append((part, int(t), box))
        t += box
    return out


# --------------------------------------------------------------------------------------------
# Commands

def python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def command(part: Part, paths: "Paths", k: Optional[str], with_compile: bool) -> "list[str]":
    """argv of a part."""
    py = python()
    if part.kind == "command":
        return list(part.args)
    if part.kind == "ceilings":
        return [py, "-m", "benchmarks.ceilings", "--out", paths.ceilings]
    if part.kind == "tests":
        # -m "": every test named, whatever its tier (the fast/slow split is about the CPU's
        # interpreter; on the GPU the compiled kernels run them in seconds).
        argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--durations=5", "-m", ""]
        if _has_module("xdist"):  # pytest-xdist: the cold Triton compiles in parallel
            argv += ["-n", str(PARITY_WORKERS)]
        return argv + list(part.args)
    if part.kind == "bench":
        expr = bench_filter(k, with_compile)
        argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
        if _has_module("pytest_benchmark"):
            argv += ["--benchmark-only", "--benchmark-columns=median,rounds", "--benchmark-sort=name"]
        return argv + list(part.args) + (["-k", expr] if expr else [])
    raise ValueError(f"unknown part kind {part.kind!r}")


def bench_filter(k: Optional[str], with_compile: bool) -> str:
    """The benchmarks' ``-k``: the first command's filter, or the user's (compile rows stay out
    unless ``--compile``)."""
    if k is None:
        return "not f32" if with_compile else FIRST_COMMAND_FILTER
    return f"({k})" if with_compile else f"({k}) and not compile"


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


@dataclasses.dataclass
class Paths:
    base: str  # results/<gpu>-<stamp>, without suffix
    logs: str  # folder of every log, archived into base.logs.tar.gz

    @property
    def jsonl(self):
        return os.path.join(self.logs, "benchmarks.jsonl")

    @property
    def ceilings(self):
        return os.path.join(self.logs, "ceilings.json")

    @property
    def env(self):
        return os.path.join(self.logs, "env.json")

    def outputs(self) -> "list[str]":
        """The files that go to $OUT, at most MAX_OUT_FILES."""
        return [self.base + s for s in (".json", ".md", ".png", ".logs.tar.gz")]


def make_paths(results_dir: str, gpu: str, stamp: str) -> Paths:
    base = os.path.join(os.path.abspath(results_dir), f"{gpu}-{stamp}")
    return Paths(base, base + ".logs")


def run_boxed(argv, box: float, log_path: str, env: dict, cwd: str = ROOT) -> "tuple[int, float]":
    """Run argv with output to log_path; SIGINT to its process group KILL_GRACE_S before ``box``
    ends, SIGKILL at the end. Returns (exit code, 124 when cut at its box; seconds)."""
    t0 = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(box - KILL_GRACE_S, 1))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            rc = 124
            log.write(f"\n[gpu_run] cut at its time box of {box:.0f} s\n")
    return rc, time.monotonic() - t0


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# The machine

ENV_SCRIPT = r"""
import json, platform, subprocess, sys
env = {"python": platform.python_version()}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), sm=f"{p.major}{p.minor}",
                   sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20))
except ImportError:
    env["torch"] = None
for mod in ("triton", "numpy", "pytest_benchmark", "xdist"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception:
        env[mod] = None
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    env["driver"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
"""


def commit() -> str:
    """$UNIFORMER_FAST_COMMIT, else git's (+ "-dirty"), else "unknown"."""
    if os.environ.get("UNIFORMER_FAST_COMMIT"):
        return os.environ["UNIFORMER_FAST_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_slug(device: Optional[str]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device or "no-gpu").strip("-")


def installed_here() -> bool:
    """True if uniformer_fast (with its kernels) already imports from this checkout."""
    code = ("import os, sys, uniformer_fast.kernels as k; "
            f"sys.exit(0 if os.path.realpath(k.__file__).startswith(os.path.realpath({ROOT!r})) else 1)")
    try:
        return subprocess.run([python(), "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# --------------------------------------------------------------------------------------------
# Publishing

def publish(paths: Paths, state: dict, out_dir: Optional[str]) -> "list[str]":
    """Write the report, plot, results JSON and logs archive; copy them to out_dir. Returns the
    files written. Never raises: a broken report is logged, the rest still goes out."""
    from . import report

    records = []
    if os.path.exists(paths.jsonl) and os.path.getsize(paths.jsonl):
        records = report.load([paths.jsonl])
    env = _read_json(paths.env)
    ceilings = _read_json(paths.ceilings)
    doc = {"env": env, "ceilings": ceilings, "steps": state["steps"], "parity": state.get("parity"),
           "benchmarks": records}
    written = []
    with open(paths.base + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    written.append(paths.base + ".json")
    try:
        title = f"uniformer_fast benchmarks: {os.path.basename(paths.base)}"
        text = report.markdown(records, ceilings=ceilings, title=title, env=env) if records else \
            f"# {title}\n\nNo benchmark finished.\n"
        if records and report.plot(records, paths.base + ".png"):
            text += f"\n![speedups per stage]({os.path.basename(paths.base)}.png)\n"
            written.append(paths.base + ".png")
        with open(paths.base + ".md", "w") as f:
            f.write(text + "\n")
        written.append(paths.base + ".md")
    except Exception as err:  # noqa: BLE001 - the JSON and the logs must still go out
        with open(os.path.join(paths.logs, "report.err"), "a") as f:
            f.write(f"{type(err).__name__}: {err}\n")
    with tarfile.open(paths.base + ".logs.tar.gz", "w:gz") as tar:
        tar.add(paths.logs, arcname=os.path.basename(paths.logs))
    written.append(paths.base + ".logs.tar.gz")
    assert len(written) <= MAX_OUT_FILES
    if out_dir and os.path.isdir(out_dir):
        import shutil
        for path in written:
            shutil.copy2(path, out_dir)
    return written


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def parse_pytest(log_path: str) -> dict:
    """Counts and failing node ids from a pytest log."""
    try:
        text = open(log_path, errors="replace").read()
    except OSError:
        return {}
    counts = {}
    tail = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if tail:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|deselected)", tail[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    counts["failures"] = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    return counts


# --------------------------------------------------------------------------------------------
# The run

def run(parts: "list[Part]", *, budget: float, out_dir: Optional[str], results_dir: str, k=None,
        with_compile=False, need_cuda=True, install=True) -> int:
    t0 = time.monotonic()
    state = {"steps": []}

    def left():
        return budget - (time.monotonic() - t0)

    def step(name, rc, seconds, box, result=""):
        state["steps"].append({"name": name, "rc": rc, "seconds": round(seconds, 1), "box": box,
                               "result": result})
        print(f"[{time.monotonic() - t0:5.0f}s] {name}: exit {rc} in {seconds:.0f}s (box {box}s) {result}",
              flush=True)

    # 1. The machine: versions; results named after the device.
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    fd, tmp_env = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    t = time.monotonic()
    try:
        subprocess.run([python(), "-c", ENV_SCRIPT, tmp_env], timeout=MACHINE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pass
    env_facts = _read_json(tmp_env) or {}
    if os.path.exists(tmp_env):
        os.remove(tmp_env)
    env_facts["commit"] = commit()
    env_facts["budget_s"] = budget
    print("versions: " + versions_line(env_facts), flush=True)
    step("machine", 0, time.monotonic() - t, MACHINE_TIMEOUT_S)
    if need_cuda and not env_facts.get("cuda_available"):
        print("gpu_run: no CUDA device here; nothing to run (--dry-run shows the plan)")
        return 1
    paths = make_paths(results_dir, gpu_slug(env_facts.get("device")), stamp)
    os.makedirs(paths.logs, exist_ok=True)
    with open(paths.env, "w") as f:
        json.dump(env_facts, f, indent=1)

    child_env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0",
                     UNIFORMER_FAST_TEST_DEVICE="cuda", UNIFORMER_FAST_BENCH_JSONL=paths.jsonl)
    child_env["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

    # 2. The package, editable, without the C++ CPU kernels (nothing on the GPU uses them).
    if install:
        if installed_here():
            step("install", 0, 0, INSTALL_TIMEOUT_S, "already installed from this checkout")
        else:
            argv = [python(), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
            rc, s = run_boxed(argv, min(INSTALL_TIMEOUT_S, left()), os.path.join(paths.logs, "install.log"),
                              dict(child_env, UNIFORMER_FAST_CPP="0"))
            step("install", rc, s, INSTALL_TIMEOUT_S)

    # 3. The parts, each in its box.
    for i, part in enumerate(parts):
        box = time_box(part, parts[i + 1:], left())
        if box == 0:
            step(part.name, None, 0, 0, "skipped: no time left for its floor")
            continue
        if part.kind == "bench" and os.path.exists(paths.ceilings):
            child_env["UNIFORMER_FAST_CEILINGS"] = paths.ceilings
        log = os.path.join(paths.logs, f"{part.name}.log")
        rc, s = run_boxed(command(part, paths, k, with_compile), box, log, child_env)
        result = ""
        if part.kind in ("tests", "bench"):
            counts = parse_pytest(log)
            result = ", ".join(f"{n} {w}" for w, n in counts.items() if w != "failures")
            if part.kind == "tests":
                state["parity"] = counts
        elif part.kind == "ceilings":
            c = _read_json(paths.ceilings) or {}
            if c.get("copy_bw"):
                result = f"copy {c['copy_bw'] / 1e12:.2f} TB/s, bf16 matmul {c['matmul_bf16'] / 1e12:.0f} TFLOP/s"
        step(part.name, rc, s, box, result)
        if part.kind in ("bench", "tests"):
            publish(paths, state, out_dir)

    written = publish(paths, state, out_dir)
    print_summary(paths, state, env_facts, written, out_dir, time.monotonic() - t0, budget)
    return 0 if all(s["rc"] in (0, None) for s in state["steps"]) else 2


def versions_line(env: dict) -> str:
    return " | ".join(f"{k} {env.get(k)}" for k in ("device", "driver", "torch", "cuda", "triton", "python",
                                                     "numpy", "commit"))


def print_summary(paths, state, env, written, out_dir, elapsed, budget):
    from . import report

    print(f"\n=== summary: {elapsed:.0f} s of a {budget:.0f} s budget")
    print("versions: " + versions_line(env))
    print("| step | exit | s | box | result |\n|---|---|---|---|---|")
    for s in state["steps"]:
        print(f"| {s['name']} | {s['rc']} | {s['seconds']:.0f} | {s['box']} | {s['result']} |")
    failures = (state.get("parity") or {}).get("failures") or []
    if failures:
        print(f"parity failures ({len(failures)}): " + " ".join(failures[:30]))
    where = f"$OUT ({out_dir})" if out_dir else "results"
    print(f"files ({len(written)}, in {where}): " + " ".join(os.path.basename(p) for p in written))
    records = report.load([paths.jsonl]) if os.path.exists(paths.jsonl) and os.path.getsize(paths.jsonl) else []
    if records:
        table = report.summary(records)
        if len(table) > 9000:  # keep the end of the output, which is all that comes back, readable
            table = table[:9000] + "\n... (the rest in the .md)"
        print(table)


def dry_run(parts: "list[Part]", budget: float, k, with_compile) -> int:
    paths = make_paths(os.path.join(ROOT, "benchmarks", "results"), "<gpu>", "<stamp>")
    fixed = 10  # machine facts and an editable install without the C++ kernels, seconds
    print(f"gpu_run --dry-run: budget {budget:.0f} s; machine + install ~{fixed} s (install boxed at "
          f"{INSTALL_TIMEOUT_S} s); publishing reserve {PUBLISH_RESERVE_S} s")
    print("worst case (every part runs to the end of its box):")
    print("| part | start s | box s | cap | floor | what |\n|---|---|---|---|---|---|")
    end = fixed
    for part, start, box in schedule(parts, budget, fixed):
        print(f"| {part.name} | {start} | {box or 'skipped'} | {part.cap} | {part.floor} | {part.what} |")
        end = start + box
    print(f"ends by {end + PUBLISH_RESERVE_S} s of {budget:.0f}")
    for part in parts:
        print(f"{part.name}: {shlex.join(command(part, paths, k, with_compile))}")
    outs = paths.outputs()
    print(f"files to $OUT ({len(outs)} of at most {MAX_OUT_FILES}): "
          + " ".join(os.path.relpath(p, ROOT) for p in outs))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the GPU run, sized to the GPU machine's lease",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="parts: " + ", ".join(f"{p.name} ({p.what})" for p in PARTS))
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help="run only these parts, in the default order (default: all)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("UNIFORMER_FAST_GPU_RUN_S", DEFAULT_BUDGET_S)),
                    help=f"seconds for the whole command (default {DEFAULT_BUDGET_S}, or $UNIFORMER_FAST_GPU_RUN_S)")
    ap.add_argument("-k", dest="k", help="pytest -k expression for the benchmark parts (replaces the "
                    f"first command's {FIRST_COMMAND_FILTER!r}; compile rows stay out without --compile)")
    ap.add_argument("--compile", action="store_true", help="include the torch.compile rows")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, its time boxes and files; run nothing")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="copy the files here (default: $OUT)")
    ap.add_argument("--results", default=os.environ.get("UNIFORMER_FAST_RESULTS",
                                                        os.path.join(ROOT, "benchmarks", "results")))
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts if p not in PART_NAMES]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; parts are {', '.join(PART_NAMES)}")
    if args.budget <= PUBLISH_RESERVE_S:
        ap.error(f"--budget must exceed {PUBLISH_RESERVE_S} s")
    parts = [p for p in PARTS if not args.parts or p.name in args.parts]
    if args.dry_run:
        return dry_run(parts, args.budget, args.k, args.compile)
    return run(parts, budget=args.budget, out_dir=args.out, results_dir=args.results, k=args.k,
               with_compile=args.compile)


if __name__ == "__main__":
    sys.exit(main())
