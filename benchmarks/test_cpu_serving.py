"""CPU serving: UniFormer-S inference, batch of clips in, logits out, against the engines a user
would otherwise serve it with (CPU runs only; skipped on a GPU).

One group per clip shape and precision; its rows:

- ``official``: :class:`uniformer_fast.official.OfficialUniFormer` eager (the baseline).
- ``reference``: :class:`uniformer_fast.UniFormer` with every op on "reference".
- ``auto``: the documented default: ``model.eval()`` under ``torch.inference_mode()``.
- ``auto+fused``: the same after the one documented preparation call, ``fuse_for_inference()``.
- ``compile``: ``torch.compile`` of the reference model (only with $UNIFORMER_FAST_BENCH_COMPILE=1).
- ``onnxruntime``, ``openvino``: the model exported by :func:`uniformer_fast.export_onnx`
  (dynamic batch) run by ONNX Runtime and OpenVINO on the same number of threads
  (``pip install -e ".[bench]"`` brings both; a missing one skips its row with the reason).

Precisions: ``float32``; ``bf16``, torch rows under ``torch.autocast("cpu", torch.bfloat16)`` and
OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` (on a CPU without bf16 instructions it runs
float32 and says so: ``backend_used`` records the precision it took). ONNX Runtime has no bf16 CPU
path: its bf16 row skips.

Allocator: ``fuse_for_inference()`` sets glibc's malloc thresholds for the whole process
(:mod:`uniformer_fast.cpu_memory`), which would speed up every torch row measured after the first
fused one; so this module sets them once at import and every row runs with them (OpenVINO and ONNX
Runtime keep their own memory pools either way).

Sizes: 8 frames at 64 px (the default small preset, a smoke test); with
$UNIFORMER_FAST_BENCH_CPU=full the serving sizes, batch 1 at 8 and 16 frames and batch 4 at 8,
224 px. Threads: $UNIFORMER_FAST_BENCH_THREADS (default 1), the same for every engine.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from uniformer_fast import cpu_memory, create_model, export_onnx, ops
from uniformer_fast.official import OfficialUniFormer

from . import floors
from .harness import CPU_PRESET, ON_CUDA, call_or_skip, compile_enabled, compile_fresh, run

pytestmark = pytest.mark.skipif(ON_CUDA, reason="CPU serving benchmarks run on a CPU machine")

VARIANT = "uniformer_small"
BASELINE = "official"
ROWS = [BASELINE, "reference", "auto", "auto+fused", "compile", "onnxruntime", "openvino"]
PRECISIONS = ("float32", "bf16")
SHAPES = ([(1, 8, 224), (1, 16, 224), (4, 8, 224)] if CPU_PRESET == "full" else [(1, 8, 64)])
PARAMS = [(s, p, r) for s in SHAPES for p in PRECISIONS for r in ROWS]

cpu_memory.keep_freed_memory()


def _id(param):
    (batch, frames, size), precision, row = param
    return f"b{batch}-f{frames}-{size}px-{precision}-{row}"


_exported: dict = {}


def _onnx_file(frames: int, size: int, tmp_dir) -> str:
    """The UniFormer-S (seed 0 weights) exported once per clip size, dynamic batch."""
    key = (frames, size)
    if key not in _exported:
        torch.manual_seed(0)
        model = create_model(VARIANT, num_classes=400).eval()
        _exported[key] = export_onnx(model, str(tmp_dir / f"{VARIANT}-f{frames}-{size}.onnx"), frames=frames,
                                     size=size, dynamic_batch=True)
    return _exported[key]


def _engine_or_skip(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[bench]')")
    return importlib.import_module(module)


def _onnxruntime_call(path, x, threads, precision):
    ort = _engine_or_skip("onnxruntime")
    if precision != "float32":
        pytest.skip("ONNX Runtime has no bfloat16 CPU execution path")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return (lambda: session.run(None, feed)), f"onnxruntime {ort.__version__} CPUExecutionProvider"


def _openvino_call(path, x, threads, precision):
    ov = _engine_or_skip("openvino")
    compiled = ov.Core().compile_model(path, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32" if precision == "float32" else "bf16"})
    request = compiled.create_infer_request()
    feed = {0: x.numpy()}
    took = compiled.get_property("INFERENCE_PRECISION_HINT")
    return (lambda: request.infer(feed)), f"openvino {ov.__version__} CPU, inference precision {took}"


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_cpu_serving(benchmark, param, tmp_path_factory):
    (batch, frames, size), precision, row = param
    threads = torch.get_num_threads()
    benchmark.group = f"cpu serving {VARIANT} | {batch}x3x{frames}x{size}x{size} {precision} {threads} thread(s)"
    x = torch.randn(batch, 3, frames, size, size)

    if row in ("onnxruntime", "openvino"):
        path = _onnx_file(frames, size, tmp_path_factory.getbasetemp())
        call, used = (_onnxruntime_call if row == "onnxruntime" else _openvino_call)(path, x, threads, precision)
        call_or_skip(call)
    else:
        if row == "compile":
            reason = compile_enabled("model")
            if reason:
                pytest.skip(reason)
        torch.manual_seed(0)
        if row == BASELINE:
            cfg = floors.VARIANTS[VARIANT]
            net = OfficialUniFormer(depth=cfg["depth"], embed_dim=cfg["embed_dim"], head_dim=cfg["head_dim"],
                                    num_classes=400).eval()
        else:
            net = create_model(VARIANT, num_classes=400).eval()
        if row == "auto+fused":
            net.fuse_for_inference()
        model = compile_fresh(net) if row == "compile" else net
        backend = "reference" if row in ("reference", "compile") else "auto"
        bf16 = precision == "bf16"

        def call():
            with ops.use_backend(backend), torch.autocast("cpu", torch.bfloat16, enabled=bf16), \
                    torch.inference_mode():
                return model(x)

        call_or_skip(call, compiled=row == "compile")
        used = {BASELINE: "official eager", "compile": "torch.compile(reference)"}.get(row, row)
        if precision == "bf16":
            used += " under torch.autocast('cpu', bfloat16)"

    info = {"level": "serving", "op": VARIANT, "pass": "infer", "stage": "all", "frames": frames,
            "shape": [batch, 3, frames, size, size], "backend": row, "baseline": row == BASELINE,
            "backend_used": used, "precision": precision, "clips": batch}
    work = floors.model(VARIANT, batch, frames, size, e=4 if precision == "float32" else 2)
    run(benchmark, [call], work=work, info=info)
