"""Measure this GPU's ceilings: copy bandwidth and dense bf16 matmul rate (and a CPU's, for the CPU
serving benchmark: :func:`measure_cpu`).

    python -m benchmarks.ceilings [--out ceilings.json]

Copy bandwidth: ``dst.copy_(src)`` of a 1 GiB buffer (far beyond L2), read + write counted, the
median of 20 runs timed with CUDA events. Matmul: 8192^3 bf16 ``torch.mm``, 2 n^3 FLOPs, median of
20. The FP32 CUDA-core rate is not measured (the spec figure is used: 66.9 TFLOP/s on H100/H200).
Writes JSON with the keys of ``floors.CEILINGS``; point ``$UNIFORMER_FAST_CEILINGS`` at it and the
benchmarks take their floors from these measured figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from . import floors


def _time_cuda(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_time(n_bytes, dev):
    """Seconds to copy n_bytes of bfloat16 from one buffer into another (both freed on return)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    return _time_cuda(lambda: dst.copy_(src))


def _matmul_time(n, dev):
    """Seconds for one n x n x n bfloat16 matmul."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return _time_cuda(lambda: torch.mm(a, b))


def measure() -> dict:
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    name = torch.cuda.get_device_name(dev)
    n_bytes, n = 1 << 30, 8192
    t_copy = _copy_time(n_bytes, dev)
    t_mm = _matmul_time(n, dev)
    table = next((v for k, v in floors.CEILINGS.items() if k in name), {})
    return {
        "device": name,
        "copy_bw": 2 * n_bytes / t_copy,
        "matmul_bf16": 2 * n ** 3 / t_mm,
        "fp32": table.get("fp32"),
        "l2_bytes": getattr(props, "L2_cache_size", None) or table.get("l2_bytes"),
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "copy_bw_spec": table.get("copy_bw_spec"),
        "matmul_bf16_spec": table.get("matmul_bf16_spec"),
        "floors_md": {k: table.get(k) for k in ("copy_bw", "matmul_bf16")} if table else None,
    }


def _best_cpu_time(fn, reps=5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(dtype=torch.float32) -> dict:
    """This CPU's ceilings on torch's current thread count, in the keys of ``floors.CEILINGS``:
    ``matmul_bf16`` holds the dense matmul rate *in dtype* (float32 or bfloat16: a 3072^3 matmul
    on oneDNN with a packed weight, the path the CPU benchmarks' linears take, best of 5),
    ``fp32`` the float32 one (the depthwise convolutions' FMAs), ``copy_bw`` a 256 MiB copy (read +
    write, best of 5). Best rather than median: on a shared machine the ceiling is what the cores
    do when nobody else runs, about two seconds in all."""
    from uniformer_fast.ops.fully_connected import linear_onednn

    def rate(dt):
        n = 3072
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        with torch.inference_mode():
            return 2 * n ** 3 / _best_cpu_time(lambda: linear_onednn(a, b, None, None))

    src = torch.randn(1 << 26)
    dst = torch.empty_like(src)
    fp32 = rate(torch.float32)
    return {"device": "cpu", "copy_bw": 2 * src.numel() * 4 / _best_cpu_time(lambda: dst.copy_(src)),
            "matmul_bf16": fp32 if dtype == torch.float32 else rate(dtype), "fp32": fp32,
            "source": f"measured on {torch.get_num_threads()} thread(s): oneDNN {str(dtype)[6:]} matmul, copy"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure copy bandwidth and bf16 matmul rate")
    ap.add_argument("--out", help="write JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ceilings: no CUDA device", file=sys.stderr)
        return 1
    c = measure()
    print(f"ceilings: {c['device']}: copy {c['copy_bw'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 matmul {c['matmul_bf16'] / 1e12:.0f} TFLOP/s, L2 {c['l2_bytes'] / 1e6 if c['l2_bytes'] else 0:.0f} MB, "
          f"FP32 (spec) {c['fp32'] / 1e12 if c['fp32'] else float('nan'):.1f} TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(c, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
