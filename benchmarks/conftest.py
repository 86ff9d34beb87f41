"""Benchmarks run real kernels only: Triton's interpreter is never turned on here (on the CPU the
"triton" rows skip). Seeds are fixed so every backend of a group sees the same inputs; device
memory is released after each benchmark so the next one starts clean.

Without pytest-benchmark installed (a GPU machine with no network, say) a minimal ``benchmark``
fixture stands in: it times ``pedantic`` rounds the same way, and results reach the report through
``$UNIFORMER_FAST_BENCH_JSONL`` (see harness.py); pytest-benchmark's own options are then absent.
"""
import gc
import importlib.util
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

HAVE_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None


@pytest.fixture(autouse=True)
def _seed_and_release():
    torch.manual_seed(0)
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if not HAVE_PYTEST_BENCHMARK:
    class _MinimalBenchmark:
        """The part of pytest-benchmark's fixture the suite uses: pedantic, group, extra_info."""

        def __init__(self, node):
            self.name, self.fullname = node.name, node.nodeid
            callspec = getattr(node, "callspec", None)
            self.params = dict(callspec.params) if callspec else None
            self.group, self.extra_info, self.disabled, self.stats = None, {}, False, None

        def pedantic(self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1,
                     warmup_rounds=0, iterations=1):
            kwargs = kwargs or {}
            for _ in range(warmup_rounds):
                target(*args, **kwargs)
            times, result = [], None
            for _ in range(rounds):
                if setup is not None:
                    setup()
                t0 = time.perf_counter()
                for _ in range(iterations):
                    result = target(*args, **kwargs)
                times.append((time.perf_counter() - t0) / iterations)
                if teardown is not None:
                    teardown()
            self.stats = SimpleNamespace(stats=SimpleNamespace(
                median=statistics.median(times), min=min(times), max=max(times),
                mean=statistics.fmean(times), stddev=statistics.pstdev(times), rounds=rounds))
            return result

    @pytest.fixture
    def benchmark(request):
        return _MinimalBenchmark(request.node)
