"""Where a CPU serving forward goes, uniformer_fast beside OpenVINO, in one process.

    python -m benchmarks.serving_profile --clip 1x16x224 [--threads 2] [--rounds 3] [--precision bf16]

Both engines run the seed-0 UniFormer-S on the same clip and threads, alternated round by round
(one untimed call before each timed one, as benchmarks/test_cpu_serving.py). uniformer_fast: the
fused model (``fuse_for_inference()``) under ``torch.inference_mode()``, each ``uniformer_fast.ops``
call the model makes timed by op and input width (the width names the stage: 64, 128, 320, 512
channels; qkv 3x), the rest (norms, adds, reshapes, Python) as what the wall time leaves.
OpenVINO: the official model's ONNX export at the clip's static shape, LATENCY hint (the fastest
configuration at batch 1 in the serving benchmark), its own per-node counters (``PERF_COUNT``)
summed by node type and implementation. Printed as markdown, per-call milliseconds (the median
over the rounds), with each engine's wall time and its fraction of the floor at this CPU's measured
matmul rate (benchmarks/ceilings.py: measure_cpu). PERF_COUNT adds a little to OpenVINO's wall
time; the serving benchmark, not this, gives the comparison.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time

import torch

from uniformer_fast import cpu_memory, ops
from uniformer_fast import model as model_module

from . import ceilings, floors
from .harness import SERVING_VARIANT as VARIANT, export_official_onnx, serving_models

TIMED_OPS = ("linear", "mlp", "attention", "dwconv3d", "dpe_layernorm", "local_mhra_tail")


def _parse_clip(text: str):
    try:
        batch, frames, size = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip must be BATCHxFRAMESxSIZE, e.g. 1x16x224; got {text!r}") from None
    if batch < 1 or frames < 1 or size < 32:
        raise argparse.ArgumentTypeError(f"--clip needs batch >= 1, frames >= 1, size >= 32; got {text!r}")
    return batch, frames, size


class _OpTimer:
    """Times every ``uniformer_fast.ops`` function the model module calls, by (op, input width)."""

    def __init__(self):
        self.totals = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in TIMED_OPS:
            fn = getattr(model_module.ops, name)
            self._saved[name] = fn

            def timed(*args, _fn=fn, _name=name, **kwargs):
                t0 = time.perf_counter()
                out = _fn(*args, **kwargs)
                width = args[0].shape[-1] if _name in ("linear", "mlp", "attention") else args[0].shape[1]
                self.totals[f"{_name} ({width})"] += time.perf_counter() - t0
                return out

            setattr(model_module.ops, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(model_module.ops, name, fn)


def profile(batch: int, frames: int, size: int, threads: int, rounds: int, precision: str) -> str:
    import openvino as ov

    torch.set_num_threads(threads)
    cpu_memory.keep_freed_memory()
    ours, official = serving_models()
    ours.fuse_for_inference()
    x = torch.randn(batch, 3, frames, size, size)
    bf16 = precision == "bf16"

    with tempfile.TemporaryDirectory() as tmp:
        path = export_official_onnx(official, tuple(x.shape), f"{tmp}/official.onnx")
        core = ov.Core()
        net = core.read_model(path)
        net.reshape({net.inputs[0]: list(x.shape)})
        compiled = core.compile_model(net, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
    request = compiled.create_infer_request()
    xn = x.numpy()

    def ours_call():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16), torch.inference_mode():
            return ours(x)

    walls = {"uniformer_fast": [], "openvino": []}
    ours_parts, ov_parts = [], []
    for _ in range(rounds):
        ours_call()
        with _OpTimer() as timer:
            t0 = time.perf_counter()
            ours_call()
            walls["uniformer_fast"].append(time.perf_counter() - t0)
        ours_parts.append(timer.totals)
        request.infer({0: xn})
        t0 = time.perf_counter()
        request.infer({0: xn})
        walls["openvino"].append(time.perf_counter() - t0)
        nodes = collections.Counter()
        for p in request.profiling_info:
            nodes[f"{p.node_type} ({p.exec_type})"] += p.real_time.total_seconds()
        ov_parts.append(nodes)

    # bf16 only where this CPU has its instructions; elsewhere both engines run float32.
    ceil = ceilings.measure_cpu(torch.bfloat16 if bf16 and torch.bfloat16 in ops.cpu_native_dtypes()
                                else torch.float32)
    floor = floors.model(VARIANT, batch, frames, size, e=2 if bf16 else 4).floor(ceil)

    def table(title, parts, wall, timed_in_wall: bool):
        """timed_in_wall: the parts are stretches of the wall time (ours), so what is left is the
        rest; else they are an engine's own counters, which need not add up to its wall time
        (OpenVINO's overlap: at 1x16 they summed to ~1.3x it), so shares are of their sum."""
        keys = sorted({k for p in parts for k in p}, key=lambda k: -statistics.median(p[k] for p in parts))
        med = {k: statistics.median(p[k] for p in parts) for k in keys}
        wall_med, total = statistics.median(wall), sum(med.values())
        whole = wall_med if timed_in_wall else total
        lines = [f"**{title}**: {wall_med * 1e3:.1f} ms per call (range {min(wall) * 1e3:.1f}-{max(wall) * 1e3:.1f}), "
                 f"{100 * floor / wall_med:.0f}% of the floor ({floor * 1e3:.1f} ms)"
                 + ("" if timed_in_wall else f"; its counters sum to {total * 1e3:.1f} ms, shares are of that"), "",
                 "| part | ms | share |", "|---|---|---|"]
        for k in keys:
            if med[k] * 1e3 >= 0.05:
                lines.append(f"| {k} | {med[k] * 1e3:.1f} | {100 * med[k] / whole:.0f}% |")
        if timed_in_wall:
            lines.append(f"| the rest (norms, adds, layout, Python) | {(wall_med - total) * 1e3:.1f} | "
                         f"{100 * (wall_med - total) / wall_med:.0f}% |")
        return lines + [""]

    head = [f"### {VARIANT} {batch}x3x{frames}x{size}x{size} {precision}, {threads} thread(s), {rounds} rounds "
            f"alternated", "", f"Floor: the model's matmul and depthwise FLOPs at this CPU's oneDNN matmul rate "
            f"measured here on {threads} thread(s), {ceil['matmul_bf16'] / 1e9:.0f} GFLOP/s.", ""]
    return "\n".join(head + table("uniformer_fast auto+fused", ours_parts, walls["uniformer_fast"], True)
                     + table("OpenVINO, official export, static, LATENCY, PERF_COUNT", ov_parts, walls["openvino"], False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=_parse_clip, default=(1, 16, 224), help="BATCHxFRAMESxSIZE (default 1x16x224)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=("float32", "bf16"), default="float32")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be >= 1")
    print(profile(*args.clip, args.threads, args.rounds, args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
