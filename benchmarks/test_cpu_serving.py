"""CPU serving: UniFormer-S inference, a batch of clips in, logits out, against the engines a user
would otherwise serve it with, each in its best configuration (CPU runs only; skipped on a GPU).

One benchmark per clip shape and precision; its rows run alternated in one process, round by round
(:func:`benchmarks.harness.run_paired`: order rotated each round, one untimed call before each
timed one), and each row reports its median, its range, its per-round ratio to the baseline and to
the fastest OpenVINO row, the largest difference of its logits from the official model's (relative
to their largest magnitude), and its fraction of the floor at this CPU's measured matmul rate
(:func:`benchmarks.ceilings.measure_cpu`). Rows:

- ``official``: :class:`uniformer_fast.official.OfficialUniFormer` eager (the baseline).
- ``reference``: :class:`uniformer_fast.UniFormer` with every op on "reference" (float32 only).
- ``auto``: the documented default: ``model.eval()`` under ``torch.inference_mode()``.
- ``auto+fused``: the same after the one documented preparation call, ``fuse_for_inference()``.
- ``compile``: ``torch.compile`` of the reference model (only with $UNIFORMER_FAST_BENCH_COMPILE=1).
- ``openvino[EXPORT, HINT]``: OpenVINO configured as its own users serve it: the model read from
  ONNX and given the clip's static shape before compiling (``model.reshape``; a dynamic batch cost
  it 10-17% on a Zen 3), from either export (``ours``: :func:`uniformer_fast.export_onnx`;
  ``official``: the official model through ``torch.onnx.export``, dynamo, at this shape), with the
  LATENCY hint (one request, the whole batch) and, for a batch of several clips, the THROUGHPUT hint
  (its streams, one clip per request through an ``AsyncInferQueue`` of its optimal size). Every
  configuration is a row; the fastest is the one the others are compared with.
- ``onnxruntime[EXPORT]``: either export, graph optimisations at ``ORT_ENABLE_ALL``, ours with its
  batch dimension fixed (``add_free_dimension_override_by_name``).

Every engine gets the same number of threads. ``pip install -e ".[bench]"`` brings both engines; a
missing one is reported as a skipped row with the reason.

Precisions: ``float32``; ``bf16``, torch rows under ``torch.autocast("cpu", torch.bfloat16)`` and
OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` (on a CPU without bf16 instructions it runs
float32 and says so: the row records the precision it took). ONNX Runtime has no bf16 CPU path
and ``reference`` under autocast is the official model's computation again: neither is a bf16 row.

Allocator: ``fuse_for_inference()`` sets glibc's malloc thresholds for the whole process
(:mod:`uniformer_fast.cpu_memory`), which would speed up every torch row measured after the first
fused one; so this module sets them once at import and every row runs with them (OpenVINO and ONNX
Runtime keep their own memory pools either way).

Sizes: batch 1 and 2 of 8 frames at 64 px (the default small preset, a smoke test); with
$UNIFORMER_FAST_BENCH_CPU=full the serving sizes, batch 1 at 8 and 16 frames and batch 4 at 8,
224 px. Threads: $UNIFORMER_FAST_BENCH_THREADS (default 1); rounds: $UNIFORMER_FAST_BENCH_ROUNDS
(default 7).
"""
from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch

from uniformer_fast import cpu_memory, export_onnx, ops

from . import ceilings, floors
from .harness import (CPU_PRESET, ON_CUDA, SERVING_VARIANT as VARIANT, compile_enabled, compile_fresh,
                      export_official_onnx, run_paired, serving_models)

pytestmark = pytest.mark.skipif(ON_CUDA, reason="CPU serving benchmarks run on a CPU machine")

BASELINE = "official"
PRECISIONS = ("float32", "bf16")
# small: batch 2 too, so a smoke run reaches OpenVINO's THROUGHPUT rows
SHAPES = ([(1, 8, 224), (1, 16, 224), (4, 8, 224)] if CPU_PRESET == "full" else [(1, 8, 64), (2, 8, 64)])
PARAMS = [(s, p) for s in SHAPES for p in PRECISIONS]

cpu_memory.keep_freed_memory()


def _id(param):
    (batch, frames, size), precision = param
    return f"b{batch}-f{frames}-{size}px-{precision}"


class _Unavailable(Exception):
    """A row that cannot run here; the message says why."""


def _engine(module: str):
    if importlib.util.find_spec(module) is None:
        raise _Unavailable(f"{module} is not installed (pip install -e '.[bench]')")
    return importlib.import_module(module)


_exports: dict = {}


def _onnx(which: str, batch: int, frames: int, size: int, tmp_dir) -> str:
    """An ONNX file of the seed-0 UniFormer-S, made once per process: ``"ours"``, export_onnx with a
    dynamic batch (engines fix it themselves), or ``"official"``, the official model exported by
    torch.onnx.export (dynamo) at this static shape, as its users would export it."""
    key = (which, frames, size) if which == "ours" else (which, batch, frames, size)
    if key not in _exports:
        _engine("onnx")
        _engine("onnxscript")
        ours, official = serving_models()
        path = str(tmp_dir / ("-".join(map(str, key)) + ".onnx"))
        if which == "ours":
            export_onnx(ours, path, frames=frames, size=size, dynamic_batch=True)
        else:
            export_official_onnx(official, (batch, 3, frames, size, size), path)
        _exports[key] = path
    return _exports[key]


def _openvino(shape, x, threads, precision, tmp_dir) -> dict:
    """OpenVINO's configurations for this clip: row name -> (call, what ran)."""
    ov = _engine("openvino")
    batch, frames, size = shape
    core = ov.Core()
    xn = x.numpy()
    version = ov.__version__.split("-")[0]

    def compiled_for(which, n, hint):
        model = core.read_model(_onnx(which, n, frames, size, tmp_dir))
        model.reshape({model.inputs[0]: [n, 3, frames, size, size]})  # static: what a server compiles
        return core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint,
            "INFERENCE_PRECISION_HINT": "f32" if precision == "float32" else "bf16"})

    def used(c, which, hint, how):
        return (f"openvino {version} CPU, {which} export, static {'x'.join(map(str, x.shape))}, {hint}, {how}, "
                f"inference precision {c.get_property('INFERENCE_PRECISION_HINT').to_string()}")

    def latency(which):
        c = compiled_for(which, batch, "LATENCY")
        request = c.create_infer_request()
        return (lambda: request.infer({0: xn})[c.outputs[0]]), used(c, which, "LATENCY", "one request")

    def throughput(which):
        c = compiled_for(which, 1, "THROUGHPUT")
        queue = ov.AsyncInferQueue(c, c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        out = np.empty((batch, c.outputs[0].get_partial_shape()[1].get_length()), np.float32)
        clips = [np.ascontiguousarray(xn[i:i + 1]) for i in range(batch)]

        def done(request, i):
            out[i] = request.get_output_tensor(0).data[0]

        queue.set_callback(done)

        def call():
            for i, clip in enumerate(clips):
                queue.start_async({0: clip}, i)
            queue.wait_all()
            return out

        how = f"{c.get_property('NUM_STREAMS')} streams, {len(queue)} requests of one clip"
        return call, used(c, which, "THROUGHPUT", how)

    rows = {}
    for which in ("ours", "official"):
        rows[f"openvino[{which}, LATENCY]"] = latency(which)
        if batch > 1:
            rows[f"openvino[{which}, THROUGHPUT]"] = throughput(which)
    return rows


def _onnxruntime(shape, x, threads, precision, tmp_dir) -> dict:
    """ONNX Runtime on either export: row name -> (call, what ran)."""
    ort = _engine("onnxruntime")
    if precision != "float32":
        raise _Unavailable("ONNX Runtime has no bfloat16 CPU execution path")
    batch, frames, size = shape
    feed = {"video": x.numpy()}
    rows = {}
    for which in ("ours", "official"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if which == "ours":
            opts.add_free_dimension_override_by_name("batch", batch)
        session = ort.InferenceSession(_onnx(which, batch, frames, size, tmp_dir), opts,
                                       providers=["CPUExecutionProvider"])
        rows[f"onnxruntime[{which}]"] = ((lambda s=session: s.run(None, feed)[0]),
                                         f"onnxruntime {ort.__version__} CPUExecutionProvider, {which} export"
                                         f"{' (batch fixed)' if which == 'ours' else ''}, ORT_ENABLE_ALL")
    return rows


def _torch_row(row, ours, official, x, bf16):
    if row == "compile":
        reason = compile_enabled("model")
        if reason:
            raise _Unavailable(reason)
    net = official if row == BASELINE else ours
    model = compile_fresh(net) if row == "compile" else net
    backend = "reference" if row in ("reference", "compile") else "auto"

    def call():
        with ops.use_backend(backend), torch.autocast("cpu", torch.bfloat16, enabled=bf16), \
                torch.inference_mode():
            return model(x)

    used = {BASELINE: "official eager", "compile": "torch.compile(reference)"}.get(row, row)
    return call, used + (" under torch.autocast('cpu', bfloat16)" if bf16 else "")


_measured: dict = {}


def _ceilings(dtype) -> dict:
    """This CPU's ceilings for dtype, re-measured before every group and the highest kept: on a
    shared machine a busy moment lowers a measurement, never raises it, so the floor is the fastest
    the cores were seen to go in this process."""
    now = ceilings.measure_cpu(dtype)
    best = _measured.get(dtype)
    if best is not None:
        now = {k: max(now[k], best[k]) if isinstance(now[k], float) else now[k] for k in now}
    _measured[dtype] = now
    return now


def _rel_err(y, ref: torch.Tensor) -> float:
    y = y.detach().float() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y, np.float32))
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_cpu_serving(benchmark, param, tmp_path_factory):
    shape, precision = param
    batch, frames, size = shape
    threads = torch.get_num_threads()
    bf16 = precision == "bf16"
    timed = not getattr(benchmark, "disabled", False)  # else a smoke run: each row once
    benchmark.group = f"cpu serving {VARIANT} | {batch}x3x{frames}x{size}x{size} {precision} {threads} thread(s)"
    tmp_dir = tmp_path_factory.getbasetemp()
    torch.manual_seed(1)
    x = torch.randn(batch, 3, frames, size, size)
    ours, official = serving_models()
    with torch.inference_mode():
        ref = official(x).float()
    fused = serving_models()[0].fuse_for_inference()

    names = [BASELINE] + ([] if bf16 else ["reference"]) + ["auto", "auto+fused", "compile", "onnxruntime", "openvino"]
    rows, info_by_row, skipped = {}, {}, {}
    for name in names:
        try:
            if name == "openvino":
                made = _openvino(shape, x, threads, precision, tmp_dir)
            elif name == "onnxruntime":
                made = _onnxruntime(shape, x, threads, precision, tmp_dir)
            else:
                made = {name: _torch_row(name, fused if name == "auto+fused" else ours, official, x, bf16)}
            for row, (call, used) in made.items():
                try:
                    y = call()
                except Exception as err:  # noqa: BLE001 - torch.compile raises many kinds
                    if row != "compile":
                        raise
                    raise _Unavailable(f"torch.compile failed here: {type(err).__name__}: "
                                       f"{str(err).splitlines()[0][:200]}") from err
                err = _rel_err(y, ref)
                assert err == err, f"{row}: NaN in the logits"
                rows[row] = call
                info_by_row[row] = {"precision": precision, "clips": batch, "backend_used": used,
                                    "logits_rel_err": err}
        except _Unavailable as err:
            skipped[name] = str(err)
            info_by_row[name] = {"precision": precision, "clips": batch}

    info = {"level": "serving", "op": VARIANT, "pass": "infer", "stage": "all", "frames": frames,
            "shape": [batch, 3, frames, size, size], "precision": precision, "clips": batch}
    work = floors.model(VARIANT, batch, frames, size, e=2 if bf16 else 4)
    # The floor on this CPU: its measured matmul rate in the precision (bf16 only where it has
    # the instructions, else the float32 rate, which is what every engine then runs).
    native = torch.bfloat16 if bf16 and torch.bfloat16 in ops.cpu_native_dtypes() else torch.float32
    ceil = _ceilings(native) if timed else None
    run_paired(benchmark, rows, baseline=BASELINE, rivals=[k for k in rows if k.startswith("openvino")], info=info,
               work_by_row={k: work for k in rows}, info_by_row=info_by_row, skipped=skipped, ceilings=ceil)
