"""Joint spatiotemporal attention (Global MHRA) on packed qkv (B, N, 3C) -> (B, N, C): stages 3-4,
forward and forward+backward (dqkv).

Each group is one pass at one stage shape; its rows are the backends. Baseline: ``reference``,
the official model's explicit attention (permute q/k/v out of the packed tensor, materialise the
N x N probabilities, softmax, matmul, permute back) - what the official UniFormer runs.
``sdpa`` counts the layout copies it needs; which SDPA kernel ran is in ``kernels``.
``sdpa_unchecked`` is PyTorch's SDPA without the backend's NaN check: the row beside ``sdpa``
shows what keeping NaN costs. ``cpp`` is the C++ CPU kernel (csrc/attention.cpp; inference only,
so its fwd+bwd rows skip).
"""
from __future__ import annotations

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import attention_reference
from uniformer_fast.ops.self_attention import sdpa_unchecked

from . import floors
from .harness import (DEVICE, DTYPE, DTYPE_NAME, ELEM_BYTES, HEAD_DIM, OP_FRAMES, call_or_skip,
                      compile_enabled, compile_fresh, op_backend_or_skip, pool_size, profile_kernels,
                      run, sdpa_flags, stage_shape)

BASELINE = "reference"
ROWS = [BASELINE, "sdpa", "sdpa_unchecked", "cpp", "triton"]
CASES = [(stage, frames) for stage in (3, 4) for frames in OP_FRAMES]
PARAMS = ([(c, p, b) for p in ("fwd", "fwd+bwd") for c in CASES for b in ROWS]
          + [(c, p, "compile") for p in ("fwd", "fwd+bwd") for c in CASES])


def _id(param):
    (stage, frames), pass_, backend = param
    return f"stage{stage}-f{frames}-{pass_}-{backend}"


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_attention(benchmark, param):
    (stage, frames), pass_, backend = param
    B, C, T, H, W = stage_shape(stage, frames)
    N, heads = T * H * W, C // HEAD_DIM
    scale = HEAD_DIM ** -0.5
    backward = pass_ == "fwd+bwd"
    benchmark.group = (f"attention {pass_} | stage {stage}, f{frames}: B={B} N={N} heads={heads} "
                       f"d={HEAD_DIM} {DTYPE_NAME}")
    if backend == "compile":
        reason = compile_enabled("op")
        if reason:
            pytest.skip(reason)
        compiled = compile_fresh(attention_reference)

        def fn(qkv):
            return compiled(qkv, heads, scale, 0.0)
    elif backend == "sdpa_unchecked":
        op_backend_or_skip("attention", "sdpa")

        def fn(qkv):
            return sdpa_unchecked(qkv, heads, scale).flatten(2)
    else:
        op_backend_or_skip("attention", backend)

        def fn(qkv):
            return ops.attention(qkv, heads, scale=scale, backend=backend)

    qkv_bytes = B * N * 3 * C * ELEM_BYTES
    n = pool_size(qkv_bytes * (2 if backward else 1))
    qkvs = [torch.randn(B, N, 3 * C, device=DEVICE, dtype=DTYPE) for _ in range(n)]
    if backward:
        qkvs = [q.requires_grad_(True) for q in qkvs]
        dos = [torch.randn(B, N, C, device=DEVICE, dtype=DTYPE) for _ in range(n)]
        calls = [lambda q=q, do=do: torch.autograd.grad(fn(q), (q,), do) for q, do in zip(qkvs, dos)]
    else:
        calls = [lambda q=q: _no_grad(fn, q) for q in qkvs]
    call_or_skip(calls[0], compiled=backend == "compile")

    info = {"level": "op", "op": "attention", "pass": pass_, "stage": stage, "frames": frames,
            "shape": [B, N, 3 * C], "heads": heads, "head_dim": HEAD_DIM, "backend": backend,
            "baseline": backend == BASELINE,
            "backend_used": "torch.compile(attention_reference)" if backend == "compile" else backend,
            "kernels": profile_kernels(calls[0])}
    if backend.startswith("sdpa"):
        info["sdpa_enabled"] = sdpa_flags()
    work = floors.attention(B, N, heads, HEAD_DIM, e=ELEM_BYTES, backward=backward)
    run(benchmark, calls, work=work, info=info, bytes_per_slot=qkv_bytes * (2 if backward else 1))


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)
