"""benchmarks/gpu_run.py without a GPU: the time boxes fit the budget, a part is cut at its box (also
one that ignores SIGINT), at most 8 files go to $OUT with every log archived, the dry run shows
the plan, and the test and benchmark selections it names exist."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_run  # noqa: E402
from benchmarks.gpu_run import Part  # noqa: E402


def _py(code):
    return (sys.executable, "-c", code)


# --- time boxes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", (120, 200, gpu_run.DEFAULT_BUDGET_S, 600))
def test_schedule_fits_the_budget(budget):
    fixed = 10
    plan = gpu_run.schedule(list(gpu_run.PARTS), budget, fixed)
    assert [p.name for p, _, _ in plan] == list(gpu_run.PART_NAMES)
    end = fixed
    for part, start, box in plan:
        assert start == end
        assert box == 0 or part.floor <= box <= part.cap, (part.name, box)
        end += box
    assert end + gpu_run.PUBLISH_RESERVE_S <= budget
    assert plan[0][2] > 0  # the first part always runs
    if budget >= fixed + gpu_run.PUBLISH_RESERVE_S + sum(p.cap for p in gpu_run.PARTS):
        assert all(box == part.cap for part, _, box in plan)


def test_the_first_command_fits_six_minutes_and_runs_every_part():
    assert gpu_run.DEFAULT_BUDGET_S + 20 <= 360  # the interpreter's start and the copy-out
    plan = gpu_run.schedule(list(gpu_run.PARTS), gpu_run.DEFAULT_BUDGET_S, 10)
    assert all(box > 0 for _, _, box in plan), "in the worst case every part still gets its floor"


def test_time_box_leaves_later_floors():
    a, b, c = Part("a", "", 100, 10, "command"), Part("b", "", 50, 20, "command"), Part("c", "", 50, 30, "command")
    reserve = gpu_run.PUBLISH_RESERVE_S
    assert gpu_run.time_box(a, [b, c], 1000) == 100
    assert gpu_run.time_box(a, [b, c], reserve + 50 + 40) == 40  # b and c keep 20 + 30
    assert gpu_run.time_box(a, [b, c], reserve + 50 + 9) == 10  # a's floor before later ones
    assert gpu_run.time_box(a, [b, c], reserve + 9) == 0  # under a's floor: skipped
    assert gpu_run.time_box(c, [], reserve + 29) == 0


def test_bench_filter():
    assert gpu_run.bench_filter(None, False) == gpu_run.FIRST_COMMAND_FILTER
    assert gpu_run.bench_filter(None, True) == "not f32"
    assert gpu_run.bench_filter("stage3 or stage4", False) == "(stage3 or stage4) and not compile"
    assert gpu_run.bench_filter("stage3", True) == "(stage3)"


# --- running and packaging ------------------------------------------------------------------------

@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(gpu_run, "KILL_GRACE_S", 1)
    monkeypatch.setattr(gpu_run, "PUBLISH_RESERVE_S", 2)


def test_run_cuts_parts_at_their_boxes_and_returns_at_most_8_files(tmp_path, quick, capsys):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    parts = [
        Part("quick", "", 20, 1, "command", _py("print('quick part ran')")),
        Part("slow", "", 3, 1, "command", _py("import time; print('slow part', flush=True); time.sleep(60)")),
        Part("deaf", "", 3, 1, "command",
             _py("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)")),
        Part("too_late", "", 50, 40, "command", _py("print('never')")),
    ]
    t0 = time.monotonic()
    rc = gpu_run.run(parts, budget=20, out_dir=str(out), results_dir=str(results), need_cuda=False,
                     install=False)
    elapsed = time.monotonic() - t0
    assert rc == 2  # two parts cut
    assert elapsed < 20, "the run outlasted its budget"

    files = sorted(os.listdir(out))
    assert 0 < len(files) <= gpu_run.MAX_OUT_FILES
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".logs.tar.gz") for f in files)
    doc = json.loads(next((out / f).read_text() for f in files if f.endswith(".json")))
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["quick"]["rc"] == 0
    assert steps["slow"]["rc"] == 124 and steps["slow"]["seconds"] <= 3 + 0.5
    assert steps["deaf"]["rc"] == 124 and steps["deaf"]["seconds"] <= 3 + 0.5  # SIGKILL at the box
    assert steps["too_late"]["rc"] is None and "skipped" in steps["too_late"]["result"]
    assert doc["env"]["commit"] and doc["env"]["python"]

    archive = next(out / f for f in files if f.endswith(".logs.tar.gz"))
    with tarfile.open(archive) as tar:
        logs = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        assert {"quick.log", "slow.log", "deaf.log", "env.json"} <= set(logs)
        slow = tar.extractfile(logs["slow.log"]).read().decode()
        quick_log = tar.extractfile(logs["quick.log"]).read().decode()
    assert "slow part" in slow and "cut at its time box" in slow
    assert "quick part ran" in quick_log

    printed = capsys.readouterr().out
    assert "=== summary" in printed and printed.rstrip().splitlines()[-1].startswith("files (")


def test_without_cuda_it_says_so(tmp_path):
    if subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]).returncode:
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(["bash", "benchmarks/gpu_run.sh", "parity", "--results", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OUT=""))
    assert proc.returncode == 1
    assert "no CUDA device" in proc.stdout


def test_parse_pytest(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("FAILED tests/a.py::t[x] - AssertionError\nERROR tests/b.py::u\n"
                   "=== 2 failed, 40 passed, 3 skipped, 1 error in 12.3s ===\n")
    counts = gpu_run.parse_pytest(str(log))
    assert counts["passed"] == 40 and counts["failed"] == 2 and counts["skipped"] == 3 and counts["error"] == 1
    assert counts["failures"] == ["tests/a.py::t[x]", "tests/b.py::u"]


# --- the dry run and the selections ---------------------------------------------------------------

def _gpu_run_sh(*args):
    return subprocess.run(["bash", "benchmarks/gpu_run.sh", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_shows_the_plan_and_the_files():
    proc = _gpu_run_sh("--dry-run")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for name in gpu_run.PART_NAMES:
        assert f"| {name} |" in text and f"\n{name}: " in text
    ends, budget = map(int, re.search(r"ends by (\d+) s of (\d+)", text).groups())
    assert budget == gpu_run.DEFAULT_BUDGET_S and ends <= budget
    files = text.split("files to $OUT (")[1]
    n = int(files.split()[0])
    assert n <= gpu_run.MAX_OUT_FILES
    assert ".logs.tar.gz" in files and ".json" in files


def test_follow_up_mode_runs_only_the_parts_named():
    proc = _gpu_run_sh("--dry-run", "model", "-k", "uniformer_base", "--budget", "200")
    assert proc.returncode == 0, proc.stderr
    assert "| model |" in proc.stdout and "| parity |" not in proc.stdout
    assert "'(uniformer_base) and not compile'" in proc.stdout
    bad = _gpu_run_sh("--dry-run", "modle")
    assert bad.returncode == 2 and "unknown part(s) modle" in bad.stderr


def _collect_command(*args):
    return [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "", *args]


_BENCH_FILES = [a for p in gpu_run.PARTS if p.kind == "bench" for a in p.args]
# The selections gpu_run.py names, each collected in a pytest of its own: (arguments, environment).
_SELECTIONS = {
    "parity": (gpu_run.PARITY_TESTS, {}),
    "benchmarks": ((*_BENCH_FILES, "-k", gpu_run.FIRST_COMMAND_FILTER), {}),
    "gpu sizes": (("benchmarks/test_whole_model.py", "benchmarks/test_blocks.py", "-k",
                   gpu_run.FIRST_COMMAND_FILTER), {"UNIFORMER_FAST_BENCH_DEVICE": "cuda"}),
}


@pytest.fixture(scope="module")
def collected():
    """name -> (returncode, output, the collected test ids) for each of ``_SELECTIONS``: the
    collections start together (each is mostly one interpreter importing torch) and are read once."""
    procs = {name: subprocess.Popen(_collect_command(*args), cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env))
             for name, (args, env) in _SELECTIONS.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = proc.returncode, out[-3000:] + err[-3000:], [line for line in out.splitlines() if "::" in line]
    return results


def test_parity_selection_exists(collected):
    code, out, ids = collected["parity"]
    assert code == 0, out
    for node in gpu_run.PARITY_TESTS:
        assert any(i == node or i.startswith(node + "[") or i.startswith(node + "::") for i in ids), node


def test_benchmark_selections_collect(collected):
    code, out, ids = collected["benchmarks"]
    assert code == 0, out
    for f in _BENCH_FILES:
        assert any(i.startswith(f + "::") for i in ids), f"{f}: nothing selected"
    assert not [i for i in ids if "compile" in i.split("::")[-1] or "-f32-" in i]


def test_first_command_trains_at_the_official_drop_path_rates(collected):
    """On the GPU's sizes (S and B; collecting needs no GPU): training rows at S 0.1 and 0, B 0.3 (not
    B at 0); block training rows with drop path and without; inference rows without."""
    code, out, ids = collected["gpu sizes"]
    assert code == 0, out
    rows = [i.split("[", 1)[1].rstrip("]") for i in ids]
    train = {tuple(r.split("-")[i] for i in (0, 3)) for r in rows if "-train-" in r}
    assert train == {("uniformer_small", "dp0.1"), ("uniformer_small", "dp0"), ("uniformer_base", "dp0.3")}
    assert not [r for r in rows if ("-infer-" in r or "-fwd-" in r) and "-dp" in r]
    block_train = {(r.split("-")[0], r.split("-")[4]) for r in rows if "-fwd+bwd-" in r}
    assert block_train == {("CBlock", "dp0.035"), ("CBlock", "dp0"), ("SABlock", "dp0.1"), ("SABlock", "dp0")}
