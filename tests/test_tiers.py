"""The tiers' machinery. helpers.matrix, which splits a parameter matrix between the fast tier and
the full tier: the fast cases cover what they claim (one case, each value, each pair), the rest
carry ``slow``, every case of the product is kept, and ids and marks come through. And
helpers.default_workers with conftest's hooks: plain ``pytest`` runs on xdist workers, each with
its share of the cores; everything else in one process."""
import itertools
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import helpers
from helpers import matrix, usable_cpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cases(mark):
    """(values by argname, id, is slow, other mark names) of each case of a matrix decorator."""
    assert mark.name == "parametrize"
    names, params = mark.args
    out = []
    for p in params:
        marks = [m.name for m in p.marks]
        out.append((dict(zip(names, p.values)), p.id, "slow" in marks, [m for m in marks if m != "slow"]))
    return out


AXES = dict(a=(1, 2, 3), b=("x", "y", "z", "w"), c=(torch.float32, torch.bfloat16), d=((3, 3, 3), (5, 5, 5)))


@pytest.mark.parametrize("cover,strength", (("one", 0), ("each", 1), ("pairs", 2)))
def test_fast_cases_cover_what_they_claim(cover, strength):
    cases = _cases(matrix(cover=cover, **AXES))
    assert len(cases) == 3 * 4 * 2 * 2  # the full tier keeps the whole product
    fast = [values for values, _, slow, _ in cases if not slow]
    for axes in itertools.combinations(AXES, strength):
        wanted = set(itertools.product(*(AXES[a] for a in axes)))
        got = {tuple(v[a] for a in axes) for v in fast}
        assert got == wanted, (cover, axes)
    # and no more than needed: one case; the longest axis; at most a few more than 4 x 3 pairs
    assert len(fast) <= {"one": 1, "each": 4, "pairs": 16}[cover]


def test_ids_marks_where_prefer_and_joint_axes():
    skip = pytest.mark.skipif(False, reason="example")
    cases = _cases(matrix(cover="one", dtype=[torch.float16, pytest.param(torch.bfloat16, marks=skip)],
                          **{"kernel,scale": [pytest.param((5, 5, 5), False, id="5x5x5"), pytest.param((7, 7, 7), True, id="7x7x7-scale")]},
                          arch=(80, 90), where=lambda dtype, kernel, scale, arch: not (arch == 80 and scale),
                          prefer=lambda dtype, kernel, scale, arch: arch == 90 and dtype == torch.bfloat16))
    ids = [i for _, i, _, _ in cases]
    assert ids == ["float16-5x5x5-80", "float16-5x5x5-90", "float16-7x7x7-scale-90",
                   "bfloat16-5x5x5-80", "bfloat16-5x5x5-90", "bfloat16-7x7x7-scale-90"]
    fast = [(values, i, other) for values, i, slow, other in cases if not slow]
    assert fast == [(dict(dtype=torch.bfloat16, kernel=(5, 5, 5), scale=False, arch=90), "bfloat16-5x5x5-90", ["skipif"])]



def _config(args_source="TESTPATHS", xdist=True, worker=False, **options):
    """What default_workers reads of a pytest config: the options of a plain run unless given."""
    option = dict(numprocesses=None, usepdb=False, trace=False, collectonly=False, showfixtures=False,
                  show_fixtures_per_test=False, help=False, version=False, capture="fd")
    config = SimpleNamespace(option=SimpleNamespace(**{**option, **options}),
                             pluginmanager=SimpleNamespace(hasplugin=lambda name: xdist and name == "xdist"),
                             args_source=getattr(pytest.Config.ArgsSource, args_source))
    if worker:
        config.workerinput = {}
    return config


@pytest.mark.parametrize("config,workers", [
    (_config(), 3),
    (_config(args_source="ARGS"), 0),  # named files or tests
    (_config(numprocesses=0), 0),  # -n 0
    (_config(numprocesses=2), 0),  # -n 2: xdist takes it as it is
    (_config(xdist=False), 0),  # -p no:xdist
    (_config(worker=True), 0),
    (_config(usepdb=True), 0),
    (_config(trace=True), 0),
    (_config(capture="no"), 0),  # -s
    (_config(collectonly=True), 0),
    (_config(showfixtures=True), 0),
], ids=["plain", "named", "-n0", "-n2", "no-xdist", "worker", "pdb", "trace", "-s", "collect-only", "fixtures"])
def test_default_workers(config, workers, monkeypatch):
    monkeypatch.setattr(helpers, "usable_cpus", lambda: 3)
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    assert helpers.default_workers(config) == workers


def test_default_workers_count(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    for cpus, workers in ((1, 0), (2, 2), (64, helpers.MAX_WORKERS)):
        monkeypatch.setattr(helpers, "usable_cpus", lambda: cpus)
        assert helpers.default_workers(_config()) == workers, cpus
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert helpers.default_workers(_config()) == 5
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "1")
    assert helpers.default_workers(_config()) == 0


def test_plain_pytest_runs_on_workers_each_with_its_share_of_the_cores():
    """End to end, as a user starts it: plain ``pytest`` (narrowed, still from testpaths) runs on
    two workers, and the probe below passes in a worker rather than skipping."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "OMP_NUM_THREADS"))}
    # -o python_files: still the tests testpaths names, but only this file is collected (the
    # controller and both workers would each collect the whole suite otherwise).
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-o",
                           f"python_files={pathlib.Path(__file__).name}", "-k",
                           "test_a_worker_takes_its_share_of_the_cores"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(environ, PYTEST_XDIST_AUTO_NUM_WORKERS="2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 workers [1 item]" in proc.stdout and "1 passed" in proc.stdout, proc.stdout


def test_a_worker_takes_its_share_of_the_cores():
    """Two workers on two cores, each with two OpenMP threads, spin against each other."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("not an xdist worker")
    if "OMP_NUM_THREADS" in os.environ:
        pytest.skip("OMP_NUM_THREADS is set: the worker keeps it")
    assert torch.get_num_threads() == max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
