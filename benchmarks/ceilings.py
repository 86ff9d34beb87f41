"""Measure this GPU's ceilings: copy bandwidth and dense bf16 matmul rate.

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
