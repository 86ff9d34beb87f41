"""``uniformer-fast bench``: the model's latency, throughput and peak memory on each backend.

    bench("uniformer_small", torch.device("cpu"), frames=16, size=224, backends=["reference", "auto"])

A row per backend, timed on one synthetic clip with random weights: ``official`` (the official
implementation, :mod:`uniformer_fast.official`, with the same weights), ``reference`` and ``auto``
(the package's ops on those backends), a fused backend (``triton``, ``cpp``, ``sdpa``: the ops
that have it run on it, the others on ``auto``) or ``compile`` (``torch.compile`` of the reference
ops). Each row's output is compared with the ``reference`` row's. The table goes to stdout, the
settings and the progress to stderr.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from typing import Optional, Sequence

import torch

from .. import ops
from ..cpu_memory import heap_in_use
from ..model import UniFormer, create_model, model_config
from ..official import OfficialUniFormer
from ..ops import backend as registry
from .progress import progress_bar

__all__ = ["bench", "ROWS", "DTYPES", "format_bytes"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The rows --backends may name.
ROWS = ("official", "reference", "auto", "triton", "cpp", "sdpa", "compile")
# The ops whose backend a row picks: the ones with fused backends.
OPS = ("dwconv3d", "attention")


def format_bytes(n: Optional[int]) -> str:
    """``"1,234 MiB"``, or ``"-"`` for an unknown size."""
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB"


def bench(model_name: str, device: torch.device, *, frames: int = 16, size: int = 224, batch: int = 1,
          dtype: Optional[str] = None, iters: Optional[int] = None, warmup: Optional[int] = None,
          backends: Sequence[str] = ("official", "reference", "auto")) -> None:
    """Time ``model_name`` on a random ``(batch, 3, frames, size, size)`` clip, a row per name in
    ``backends`` (of :data:`ROWS`), and print the table: the median latency of ``iters`` runs after
    ``warmup`` untimed ones (defaults: 20 and 3 on CUDA, 3 and 1 on the CPU), clips/s, the peak
    memory above the start and the largest difference from the ``reference`` row. ``dtype``: a
    name of :data:`DTYPES` (default bfloat16 on CUDA, float32 on the CPU). A row whose backend
    cannot run here says why instead."""
    dtype = DTYPES[dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    iters = iters if iters is not None else (20 if device.type == "cuda" else 3)
    warmup = warmup if warmup is not None else (3 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    model = create_model(model_name).to(device=device, dtype=dtype).eval()
    clip = torch.randn(batch, 3, frames, size, size, device=device, dtype=dtype)
    rows = _rows(model, model_name, backends, device, dtype)
    print(f"{model_name}, random weights, clip {batch}x3x{frames}x{size}x{size}, "
          f"{str(dtype).replace('torch.', '')}, on {_device_name(device)}; median of {iters} after {warmup} warm-up",
          file=sys.stderr)
    results, outputs = _time_rows(rows, clip, device, iters, warmup)
    ref = next((out for label, out in outputs.items() if label.startswith("reference")), None)
    width = max(len(r[0]) for r in results) + 1
    print(f"{'backend':<{width}} {'latency':>10} {'clips/s':>9} {'peak mem':>10} {'max |diff| vs reference':>25}")
    for label, median, peak, error in results:
        if error is not None:
            print(f"{label:<{width}} skipped: {error}")
            continue
        diff = "-" if ref is None else f"{(outputs[label] - ref).abs().max().item():.2e}"
        print(f"{label:<{width}} {median * 1e3:>8.1f} ms {batch / median:>9.2f} {format_bytes(peak):>10} {diff:>25}")


def _rows(model, model_name, backends, device, dtype):
    """``(label, module, context factory)`` per row; a row that cannot run has ``(label, None, why)``."""
    rows = []
    for name in backends:
        if name == "official":
            rows.append(("official", _official_twin(model, model_name), nullcontext))
        elif name == "compile":
            compiled = torch.compile(model)
            rows.append(("compile (reference)", compiled, lambda: ops.use_backend("reference")))
        elif name in ("reference", "auto"):
            rows.append((f"{name} ({_picks(name, device, dtype)})", model, lambda n=name: ops.use_backend(n)))
        else:  # a fused backend for the ops that have one; the others stay on "auto", as labelled
            has = [op for op in OPS if name in ops.available_backends(op)]
            if not has:
                rows.append((name, None, f"no op has a {name!r} backend in this build"))
                continue
            rows.append((f"{name} ({_picks(name, device, dtype, has)})", model,
                         lambda has=tuple(has), n=name: _scoped(n, has)))
    return rows


def _official_twin(model: UniFormer, name: str) -> OfficialUniFormer:
    """The official implementation of variant ``name`` with ``model``'s weights, on its device and
    dtype, in eval mode."""
    p = next(model.parameters())
    official = OfficialUniFormer(**model_config(name), num_classes=model.num_classes, in_chans=model.in_chans)
    official = official.to(device=p.device, dtype=p.dtype).eval()
    official.load_state_dict(model.state_dict())
    return official


def _time_rows(rows, clip, device, iters, warmup):
    """``([(label, median s, peak bytes, why skipped)], {label: float output})``."""
    results, outputs = [], {}
    bar = progress_bar(len(rows) * (iters + warmup), "bench", leave=False)
    try:
        for label, fn, ctx in rows:
            times, done = [], 0
            if fn is None:  # ctx holds the reason
                results.append((label, None, None, ctx))
                bar.update(iters + warmup)
                continue
            try:
                with torch.no_grad(), ctx(), _PeakMemory(device) as mem:
                    for done in range(1, warmup + iters + 1):
                        t0 = time.perf_counter()
                        out = fn(clip)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        if done > warmup:
                            times.append(time.perf_counter() - t0)
                        bar.update(1)
                outputs[label] = out.float()
                results.append((label, statistics.median(times), mem.peak, None))
            except ops.BackendUnavailableError as e:
                bar.update(iters + warmup - max(done - 1, 0))
                results.append((label, None, None, str(e)))
    finally:
        bar.close()
    return results, outputs


class _PeakMemory:
    """Peak memory over a block, above what was in use at its start: the CUDA allocator's
    high-water mark, or on the CPU the malloc heap in use sampled every millisecond (glibc;
    :func:`~uniformer_fast.cpu_memory.heap_in_use`). ``peak`` is None where unknown."""

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._top = heap_in_use()
        if self._base is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._top = max(self._top, heap_in_use())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, heap_in_use()) - self._base


@contextlib.contextmanager
def _scoped(name, op_names):
    """Backend ``name`` for the ops ``op_names`` only."""
    with contextlib.ExitStack() as stack:
        for op in op_names:
            stack.enter_context(ops.use_backend(name, op=op))
        yield


def _picks(name, device, dtype, op_names=OPS):
    """"dwconv3d: cpp, attention: sdpa": what each op runs in a row (or why it cannot)."""
    out = []
    for op in OPS:
        try:
            out.append(f"{op}: {_pick(op, name if op in op_names else 'auto', device, dtype)}")
        except ops.BackendUnavailableError:
            out.append(f"{op}: {name} unavailable")
    return ", ".join(out)


def _pick(op, name, device, dtype):
    """The backend ``name`` resolves to for this op on the benchmark's tensors."""
    if op == "dwconv3d":
        x = torch.empty(1, 4, 2, 2, 2, device=device, dtype=dtype)
        args = (x, torch.empty(4, 1, 3, 3, 3, device=device, dtype=dtype), None, True)
    else:
        args = (torch.empty(1, 2, 3 * 64, device=device, dtype=dtype), 1, 0.125, 0.0)
    return registry.resolve(op, name, device, *args)[0]


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
