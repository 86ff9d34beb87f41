"""Shared machinery of the benchmarks: device and sizes, backend discovery, timing, extra_info.

Timing rule (the same for every benchmark):

* Warm-up first, untimed: the test's first call (Triton compilation, autotuning and
  ``torch.compile`` happen here, outside the numbers), on CUDA every input slot once more, one
  calibration run that sets the number of rounds, then (CUDA) two untimed rounds.
* On CUDA the inputs rotate over a pool of copies whose total size is at least twice the L2
  cache, so each call reads its inputs from HBM as it would inside the model; L2 is not flushed
  explicitly. A round runs ``calls_per_round`` calls (one per slot, more for short kernels so a
  round lasts >= ~1 ms) and then synchronises CUDA inside the timed function. pytest-benchmark's
  statistics are per round; ``extra_info["median_s"]`` is the median round / calls_per_round.
* On the CPU: one call per round, one input set (caches warm), one thread (see below).
* The reported time is the median.
* A paired group (the CPU serving benchmark, :func:`run_paired`) times its rows alternated in one
  process instead, round by round, and compares them by the per-round ratios.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import backend as _registry

from . import floors

# --------------------------------------------------------------------------------------------
# Device, dtype, sizes

DEVICE = torch.device(os.environ.get("UNIFORMER_FAST_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
DTYPE = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
         "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[
    os.environ.get("UNIFORMER_FAST_BENCH_DTYPE", "bf16" if ON_CUDA else "fp32")]
ELEM_BYTES = torch.finfo(DTYPE).bits // 8
DTYPE_NAME = str(DTYPE).replace("torch.", "")

# Real sizes on a GPU (batch 8, 224 px, 16 and 32 frames); on the CPU a small clip, so the whole
# CPU run takes a few minutes on two cores, or with $UNIFORMER_FAST_BENCH_CPU=full the CPU
# serving sizes (batch 1, 224 px; ops at 8 and 16 frames, blocks and model at 8).
CPU_PRESET = os.environ.get("UNIFORMER_FAST_BENCH_CPU", "small")
if CPU_PRESET not in ("small", "full"):
    raise ValueError(f"UNIFORMER_FAST_BENCH_CPU must be 'small' or 'full'; got {CPU_PRESET!r}")
if ON_CUDA:
    BATCH, SIZE, OP_FRAMES, BLOCK_FRAMES, MODEL_FRAMES = 8, 224, (16, 32), (16,), (16,)
    MODEL_VARIANTS = ("uniformer_small", "uniformer_base")
elif CPU_PRESET == "full":
    BATCH, SIZE, OP_FRAMES, BLOCK_FRAMES, MODEL_FRAMES = 1, 224, (8, 16), (8,), (8,)
    MODEL_VARIANTS = ("uniformer_small",)
else:  # UniFormer-B's training step alone would take a minute of a shared 2-core machine
    BATCH, SIZE, OP_FRAMES, BLOCK_FRAMES, MODEL_FRAMES = 1, 64, (8,), (8,), (8,)
    MODEL_VARIANTS = ("uniformer_small",)
HEAD_DIM = 64
EMBED_DIM = (64, 128, 320, 512)  # UniFormer-S and -B share their stage widths; they differ in depth

# Stochastic depth as the official runs train: drop_path_rate 0.1 for UniFormer-S, 0.3 for -B, rising
# linearly from 0 at the first block to the rate at the last (as create_model(drop_path_rate=...)).
# Training rows run at these rates and at 0 (inference rows: drop path is inactive in eval).
OFFICIAL_DROP_PATH = {"uniformer_small": 0.1, "uniformer_base": 0.3}


def block_drop_path(variant: str, kind: str) -> float:
    """The drop-path rate of the last ``kind`` block ("CBlock": stages 1-2, "SABlock": 3-4) of
    ``variant`` trained at its official drop_path_rate: a representative block in training."""
    depth = floors.VARIANTS[variant]["depth"]
    last = (depth[0] + depth[1] if kind == "CBlock" else sum(depth)) - 1
    return OFFICIAL_DROP_PATH[variant] * last / (sum(depth) - 1)


def dp_id(rate: float) -> str:
    """The drop-path part of a row id: ``dp0``, ``dp0.035``, ``dp0.1``."""
    return f"dp{round(rate, 3):g}"

# CPU threads: 1 unless $UNIFORMER_FAST_BENCH_THREADS says otherwise. On a shared machine a
# parallel region waits for any descheduled thread, which puts whole scheduler ticks (~8 ms) into
# the numbers; one thread measures the kernels, not the neighbours.
if not ON_CUDA:
    torch.set_num_threads(int(os.environ.get("UNIFORMER_FAST_BENCH_THREADS", "1")))

# Seconds of timed rounds per benchmark (after warm-up).
TARGET_S = float(os.environ.get("UNIFORMER_FAST_BENCH_TIME", "0.25" if ON_CUDA else "0.15"))


def stage_shape(stage: int, frames: int):
    """(B, C, T, H, W) of a UniFormer-S/B stage-``stage`` activation (stages 1-4)."""
    return floors.stage_shapes(BATCH, frames, SIZE, EMBED_DIM)[stage - 1]


def shape_str(shape) -> str:
    return "x".join(map(str, shape))


def compile_enabled(level: str) -> Optional[str]:
    """None if torch.compile rows run at this level, else the reason they are skipped.

    ``$UNIFORMER_FAST_BENCH_COMPILE``: ``1`` everywhere, ``0`` nowhere, unset: everywhere on CUDA,
    op level only on the CPU (inductor's C++ codegen takes tens of seconds per block or model).
    """
    flag = os.environ.get("UNIFORMER_FAST_BENCH_COMPILE", "auto")
    if flag == "0":
        return "torch.compile rows disabled by UNIFORMER_FAST_BENCH_COMPILE=0"
    if flag == "auto" and not ON_CUDA and level != "op":
        return ("torch.compile of a block or model takes tens of seconds per shape on the CPU; "
                "set UNIFORMER_FAST_BENCH_COMPILE=1 to include it")
    return None


def compile_fresh(fn):
    """``torch.compile(fn, dynamic=False)`` after clearing dynamo's caches: each shape gets its own
    static-shape graph, and no earlier row's recompilations count toward dynamo's recompile limit
    (past it, dynamo would fall back to eager without saying so)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def sync():
    if ON_CUDA:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Backends


def op_backend_or_skip(op: str, backend: str) -> None:
    """Skip (with the reason) when ``op`` has no ``backend`` here or it cannot be measured."""
    if backend not in ops.available_backends(op):
        pytest.skip(f"{op}: backend {backend!r} is not registered in this build "
                    f"(available: {', '.join(ops.available_backends(op))})")
    if backend == "triton" and not ON_CUDA:
        pytest.skip("triton on the CPU runs only under the interpreter, which measures nothing")


def call_or_skip(fn: Callable, compiled: bool = False):
    """Run ``fn`` once; BackendUnavailableError (or, for ``compiled`` rows, any failure of
    torch.compile) becomes a skip with the reason."""
    try:
        out = fn()
        sync()
        return out
    except ops.BackendUnavailableError as err:
        pytest.skip(str(err))
    except Exception as err:  # noqa: BLE001 - torch.compile raises many kinds
        if not compiled:
            raise
        pytest.skip(f"torch.compile failed here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")


def per_op_choice(backend: str, op_names) -> dict:
    """Block/model rows: backend ``X`` runs every op of the block that registers ``X`` with ``X``
    and the others with ``"reference"``; the choice is recorded in extra_info."""
    choice = {op: (backend if backend in ops.available_backends(op) else "reference") for op in op_names}
    if backend not in ("reference", "auto") and backend not in choice.values():
        pytest.skip(f"no op of this block ({', '.join(op_names)}) has backend {backend!r} in this build")
    if backend == "triton" and not ON_CUDA:
        pytest.skip("triton on the CPU runs only under the interpreter, which measures nothing")
    return choice


@contextlib.contextmanager
def backend_scope(choice: dict):
    """Enter ``ops.use_backend`` for each op's chosen backend."""
    names = set(choice.values())
    with contextlib.ExitStack() as stack:
        if len(names) == 1:
            stack.enter_context(ops.use_backend(names.pop()))
        else:
            for op, name in choice.items():
                try:
                    stack.enter_context(ops.use_backend(name, op=op))
                except TypeError:
                    pytest.skip("ops.use_backend(name, op=...) (per-op choice) is not in this build")
        yield


@contextlib.contextmanager
def record_resolved():
    """Record which backend each op call resolved to: yields a dict op -> set of names."""
    seen: dict = {}
    original = _registry.resolve

    def spy(op, *args, **kwargs):
        name, fn = original(op, *args, **kwargs)
        seen.setdefault(op, set()).add(name)
        return name, fn

    _registry.resolve = spy
    try:
        yield seen
    finally:
        _registry.resolve = original


def profile_kernels(fn: Callable, top: int = 4) -> list:
    """Names of the ATen SDPA ops and the top device kernels (by time) of one call of ``fn``."""
    import warnings

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_CUDA else [])

    def device_time(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=acts) as prof:
                fn()
                sync()
            events = prof.key_averages()
            names = [e.key for e in events if "scaled_dot_product" in e.key or "_attention" in e.key]
            if ON_CUDA:  # device kernels: device time of their own, not an ATen op or a runtime call
                dev = [e for e in events if device_time(e) > 0
                       and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))]
                dev.sort(key=lambda e: -device_time(e))
                names += [e.key[:120] for e in dev[:top]]
    except Exception as err:  # noqa: BLE001 - the profiler is a nice-to-have here
        return [f"profiler failed: {type(err).__name__}: {str(err)[:100]}"]
    return sorted(set(names), key=names.index)


def sdpa_flags() -> dict:
    """The SDPA backends PyTorch may pick on CUDA (which one ran is in ``kernels``)."""
    if not ON_CUDA:
        return {}
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
             "math": b.math_sdp_enabled()}
    if hasattr(b, "cudnn_sdp_enabled"):
        flags["cudnn"] = b.cudnn_sdp_enabled()
    return flags


# --------------------------------------------------------------------------------------------
# Input pools and timing


def pool_size(bytes_per_slot: float, cap: int = 32) -> int:
    """Input copies so the pool is >= 2x L2 on CUDA (inputs come from HBM); 1 on the CPU."""
    if not ON_CUDA:
        return 1
    props = torch.cuda.get_device_properties(DEVICE)
    l2 = getattr(props, "L2_cache_size", 0) or 60e6
    free = torch.cuda.mem_get_info(DEVICE)[0]
    want = math.ceil(2 * l2 / max(bytes_per_slot, 1))
    return max(1, min(cap, want, int(0.25 * free // max(bytes_per_slot, 1))))


def l2_note(n_slots: int, bytes_per_slot: float) -> str:
    if not ON_CUDA:
        return "cpu: one input set, caches warm"
    return (f"L2 not flushed; inputs rotate over {n_slots} copies "
            f"({n_slots * bytes_per_slot / 1e6:.0f} MB) so they are read from HBM")


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if ON_CUDA else "cpu"


def run(benchmark, calls: list, *, work: floors.Work, info: dict, bytes_per_slot: float = 0.0,
        max_calls_per_round: int = 200) -> None:
    """Time ``calls`` (one zero-argument callable per input slot) and fill ``extra_info``.

    ``info`` holds the descriptive fields (level, op, pass, stage, shape, backend, ...); the
    derived ones (time per call, GB/s, TFLOP/s, fraction of the floor, peak memory) are added.
    """
    n = len(calls)
    disabled = getattr(benchmark, "disabled", False)
    # Warm-up: compile, autotune, allocator caches: each slot once, then time one slot (on the CPU
    # the test's first call and the timed one are the warm-up; with timing disabled, pedantic's
    # single call follows the test's first).
    if not disabled and ON_CUDA:
        for c in calls:
            c()
        sync()
    calls_per_round = 1
    warmup_rounds = 0
    rounds = 1
    if not disabled:
        t0 = time.perf_counter()
        reps = max(n, 3) if ON_CUDA else 1
        for j in range(reps):
            calls[j % n]()
        sync()
        per_call = (time.perf_counter() - t0) / reps
        if ON_CUDA:
            calls_per_round = max(n, min(max_calls_per_round, math.ceil(1e-3 / max(per_call, 1e-7))))
        round_s = per_call * calls_per_round
        rounds = int(min(200, max(5, TARGET_S / max(round_s, 1e-9))))
        warmup_rounds = 2 if ON_CUDA else 0

    peak = None
    if ON_CUDA:  # one call, untimed: peak memory (the working set: extra over what was allocated)
        sync()
        before = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        calls[0]()
        sync()
        peak = {"peak_mem_bytes": torch.cuda.max_memory_allocated(DEVICE),
                "peak_mem_extra_bytes": torch.cuda.max_memory_allocated(DEVICE) - before}

    state = {"i": 0}

    def timed():
        i = state["i"]
        for j in range(calls_per_round):
            calls[(i + j) % n]()
        state["i"] = (i + calls_per_round) % n
        sync()  # inside the timed function: the round ends when the device is done

    benchmark.extra_info.update(info)
    benchmark.extra_info.update({
        "device": _device_name(), "dtype": DTYPE_NAME, "calls_per_round": calls_per_round,
        "l2": l2_note(n, bytes_per_slot), "torch": torch.__version__,
        "cpu_threads": None if ON_CUDA else torch.get_num_threads(),
    })
    if peak:
        benchmark.extra_info.update(peak)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)

    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = stats.median / calls_per_round if stats is not None else None
    ceil = floors.ceilings_for(_device_name())
    benchmark.extra_info["median_s"] = median
    benchmark.extra_info["ceilings_source"] = ceil.get("source") if ceil else None
    benchmark.extra_info.update(floors.achieved(work, median, ceil))
    _append_jsonl(benchmark, stats)


# ---------------------------------------------------------------------------------------------
# CPU serving: the models both serving tools run


SERVING_VARIANT = "uniformer_small"


def serving_models():
    """(ours, official): UniFormer-S with seed-0 weights in eval mode, and the official model
    holding the same weights (loaded strictly), so every engine computes the same logits."""
    from uniformer_fast import create_model
    from uniformer_fast.official import OfficialUniFormer

    torch.manual_seed(0)
    ours = create_model(SERVING_VARIANT, num_classes=400).eval()
    cfg = floors.VARIANTS[SERVING_VARIANT]
    official = OfficialUniFormer(depth=cfg["depth"], embed_dim=cfg["embed_dim"], head_dim=cfg["head_dim"],
                                 num_classes=400).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours, official


def export_official_onnx(official, shape, path: str) -> str:
    """The official model as its users export it: ``torch.onnx.export`` (dynamo) at the static clip
    ``shape`` (B, 3, T, H, W), input ``video``, output ``logits``, opset 18. Returns ``path``."""
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad():
        torch.onnx.export(official, (torch.randn(*shape),), path, dynamo=True, input_names=["video"],
                          output_names=["logits"], opset_version=18, verbose=False)
    return path


# Rounds of a paired group ($UNIFORMER_FAST_BENCH_ROUNDS): each round times every row once.
PAIRED_ROUNDS = int(os.environ.get("UNIFORMER_FAST_BENCH_ROUNDS", "7"))


def _spread(values) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}


def run_paired(benchmark, rows: dict, *, baseline: str, rivals: Sequence[str], info: dict, work_by_row: dict,
               info_by_row: dict, skipped: dict, rounds: Optional[int] = None, warm: int = 1,
               ceilings: Optional[dict] = None) -> None:
    """Time the rows of one group (name -> zero-argument callable, each already called once)
    alternated in this process, and fill ``extra_info["paired_rows"]`` (benchmarks/report.py
    makes one table row of each).

    A round runs every row once, in an order rotated by one row each round, so that no row
    always follows the same neighbour; each timed call follows ``warm`` untimed calls of the same
    row, so it meets the caches and thread pools as a server calling that engine does, not as the
    other engine left them (back to back, the first call after the other engine's ran 2-4% slower,
    UniFormer-S 1x8 on a 2-core EPYC: its weights and buffers evicted by the other's).
    ``rivals``: the rows of the engine to beat (its configurations); the one with the lowest
    median, chosen after the rounds, is the group's rival. Each row gets its time's median and
    range over the rounds, and against ``baseline`` and the rival the median and range of the
    per-round ratios (their time / this row's, the same round), which machine noise moves far
    less than it moves either time. ``skipped``: row ->
    reason, for rows that could not run here (shown as such). ``ceilings``: the floors' ceilings
    (default: the device's, as ``run``; benchmarks/ceilings.py: measure_cpu for a CPU). The rounds also feed
    pytest-benchmark as one timed function, so ``--benchmark-*`` options keep working."""
    names = list(rows)
    disabled = getattr(benchmark, "disabled", False)
    n_rounds = 1 if disabled else (rounds or PAIRED_ROUNDS)
    times = {k: [] for k in names}
    state = {"round": 0}

    def one_round():
        r = state["round"]
        state["round"] += 1
        for k in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(0 if disabled else warm):
                rows[k]()
            t0 = time.perf_counter()
            rows[k]()
            sync()
            times[k].append(time.perf_counter() - t0)

    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"device": _device_name(), "dtype": DTYPE_NAME, "torch": torch.__version__,
                                 "cpu_threads": None if ON_CUDA else torch.get_num_threads(),
                                 "l2": f"{n_rounds} rounds, {warm} untimed call(s) of a row before each timed one",
                                 "baseline_row": baseline})
    benchmark.pedantic(one_round, rounds=n_rounds, warmup_rounds=0, iterations=1)
    ran = [k for k in rivals if times.get(k)]
    rival = min(ran, key=lambda k: statistics.median(times[k])) if ran else None
    benchmark.extra_info["rival_row"] = rival

    ceil = ceilings or floors.ceilings_for(_device_name())
    if ceilings:
        benchmark.extra_info["ceilings"] = ceilings
    out = []
    for k in names:
        row = {**info_by_row.get(k, {}), "backend": k, "baseline": k == baseline, "rounds": n_rounds,
               "times_s": times[k], "time": _spread(times[k])}
        row["median_s"] = row["time"]["median"]
        for ref, key in ((baseline, "vs_baseline"), (rival, "vs_rival")):
            if ref in times and ref != k:
                row[key] = _spread([a / b for a, b in zip(times[ref], times[k])])
        row.update(floors.achieved(work_by_row[k], row["median_s"], ceil))
        out.append(row)
    for k, reason in skipped.items():
        out.append({**info_by_row.get(k, {}), "backend": k, "baseline": k == baseline, "skipped": reason})
    benchmark.extra_info["paired_rows"] = out
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    _append_jsonl(benchmark, stats)


def _append_jsonl(benchmark, stats) -> None:
    """Append this result to ``$UNIFORMER_FAST_BENCH_JSONL`` at once, so a run cut off by a time
    limit keeps every finished benchmark (pytest-benchmark writes its JSON only at the end)."""
    path = os.environ.get("UNIFORMER_FAST_BENCH_JSONL")
    if not path or stats is None:
        return
    rec = {"group": benchmark.group, "name": benchmark.name, "fullname": benchmark.fullname,
           "params": {k: str(v) for k, v in (benchmark.params or {}).items()},
           "stats": {k: getattr(stats, k) for k in ("min", "max", "mean", "median", "stddev", "rounds")},
           "extra_info": dict(benchmark.extra_info)}
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# Generated videos for the data-path benchmarks (evaluate, training clips).

def camera_picture(i: int, h: int, w: int) -> torch.Tensor:
    """uint8 (h, w, 3) frame ``i`` with moving edges and texture: what a camera gives a codec to
    do, roughly."""
    y = torch.arange(h).view(h, 1, 1)
    x = torch.arange(w).view(1, w, 1)
    c = torch.tensor([1, 2, 3]).view(1, 1, 3)
    noise = torch.randint(0, 24, (h, w, 1), generator=torch.Generator().manual_seed(i))
    return ((x * c + 3 * i + (y // 16) * 7) % 256 + noise).clamp(0, 255).to(torch.uint8)


def write_camera_video(path, num_frames: int, h: int, w: int) -> str:
    """An H.264 video of :func:`camera_picture` frames at 25 fps (keyframe every second, 2
    B-frames, crf 23): what the data-path benchmarks decode."""
    import av
    path = str(path)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "25", "bf": "2", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(camera_picture(i, h, w).numpy(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
