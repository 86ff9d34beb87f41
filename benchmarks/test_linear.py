"""The MLP halves of a UniFormer block: fc1 + bias + GELU (C -> 4C) and fc2 + bias (4C -> C) over
all tokens of a stage, stages 1-4, forward and forward+backward.

Each group is one half at one stage shape; its rows are the backends. Baseline: ``reference``,
cuBLAS (``F.linear``, bias in its epilogue) then a separate ``F.gelu`` - what eager PyTorch runs.
``triton`` is the fused matmul + bias + GELU kernel (kernels/linear.py; backward: the GELU
derivative fused into a recomputation of the pre-activation); ``compile`` is ``torch.compile``
of the reference composition; ``onednn`` is oneDNN's fused linear (CPU inference only).
"""
from __future__ import annotations

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import linear_reference

from . import floors
from .harness import (DEVICE, DTYPE, DTYPE_NAME, ELEM_BYTES, OP_FRAMES, call_or_skip, compile_enabled,
                      compile_fresh, op_backend_or_skip, pool_size, profile_kernels, run, stage_shape)

BASELINE = "reference"
ROWS = [BASELINE, "triton", "onednn"]
MLP_RATIO = 4
HALVES = {"fc1+gelu": "gelu", "fc2": None}
CASES = [(stage, frames, half) for stage in (1, 2, 3, 4) for frames in OP_FRAMES for half in HALVES]
PARAMS = ([(c, p, b) for p in ("fwd", "fwd+bwd") for c in CASES for b in ROWS]
          + [(c, p, "compile") for p in ("fwd", "fwd+bwd") for c in CASES])


def _id(param):
    (stage, frames, half), pass_, backend = param
    return f"stage{stage}-f{frames}-{half}-{pass_}-{backend}"


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_linear(benchmark, param):
    (stage, frames, half), pass_, backend = param
    B, C, T, H, W = stage_shape(stage, frames)
    M = B * T * H * W
    K, N = (C, MLP_RATIO * C) if half == "fc1+gelu" else (MLP_RATIO * C, C)
    activation = HALVES[half]
    backward = pass_ == "fwd+bwd"
    benchmark.group = f"linear {half} {pass_} | stage {stage}, f{frames}: M={M} K={K} N={N} {DTYPE_NAME}"
    if backend == "compile":
        reason = compile_enabled("op")
        if reason:
            pytest.skip(reason)
        compiled = compile_fresh(linear_reference)

        def fn(x, w, b):
            return compiled(x, w, b, activation)
    else:
        op_backend_or_skip("linear", backend)

        def fn(x, w, b):
            return ops.linear(x, w, b, activation=activation, backend=backend)

    # Tokens as the SABlock's Mlp sees them: (B, T*H*W, K), contiguous.
    slot_bytes = (M * K + M * N) * ELEM_BYTES * (2 if backward else 1)
    n = pool_size(slot_bytes)
    xs = [torch.randn(B, T * H * W, K, device=DEVICE, dtype=DTYPE) for _ in range(n)]
    w = (torch.randn(N, K, device=DEVICE) * K ** -0.5).to(DTYPE)
    b = torch.randn(N, device=DEVICE, dtype=DTYPE)
    if backward:
        xs = [x.requires_grad_(True) for x in xs]
        w, b = w.requires_grad_(True), b.requires_grad_(True)
        dys = [torch.randn(B, T * H * W, N, device=DEVICE, dtype=DTYPE) for _ in range(n)]
        calls = [lambda x=x, dy=dy: torch.autograd.grad(fn(x, w, b), (x, w, b), dy) for x, dy in zip(xs, dys)]
    else:
        calls = [lambda x=x: _no_grad(fn, x, w, b) for x in xs]
    call_or_skip(calls[0], compiled=backend == "compile")

    info = {"level": "op", "op": "linear", "half": half, "activation": activation or "none",
            "pass": pass_, "stage": stage, "frames": frames, "shape": [M, K, N], "backend": backend,
            "baseline": backend == BASELINE,
            "backend_used": "torch.compile(linear_reference)" if backend == "compile" else backend,
            "kernels": profile_kernels(calls[0])}
    work = floors.linear(M, K, N, e=ELEM_BYTES, backward=backward)
    run(benchmark, calls, work=work, info=info, bytes_per_slot=slot_bytes)


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)
