"""Depthwise 3-D convolution: the DPE (3x3x3 + bias + residual, every stage) and the Local MHRA
affinity (5x5x5 + bias, stages 1-2), forward and forward+backward (dx, dweight, dbias).

Each group is one kernel size, pass and stage shape; its rows are the backends. Baseline: what a
user would otherwise run, ``nn.Conv3d(C, C, k, groups=C)`` on a contiguous input (PyTorch's own
depthwise kernel); ``nn.Conv3d`` on ``channels_last_3d`` runs cuDNN; ``reference`` is the op's
plain-PyTorch backend on the model's channels-last layout.
"""
from __future__ import annotations

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import dwconv3d_reference

from . import floors
from .harness import (DEVICE, DTYPE, DTYPE_NAME, ELEM_BYTES, OP_FRAMES, call_or_skip, compile_enabled,
                      compile_fresh, op_backend_or_skip, pool_size, profile_kernels, run, shape_str,
                      stage_shape)

BASELINE = "nn.Conv3d-contiguous"
ROWS = [BASELINE, "nn.Conv3d-channels_last", "reference", "cpp", "triton"]
CASES = [(k, stage, frames) for k in (3, 5) for stage in ((1, 2, 3, 4) if k == 3 else (1, 2))
         for frames in OP_FRAMES]
# compile rows last: on a GPU run cut off by its time limit, they are the ones lost.
PARAMS = ([(c, p, b) for p in ("fwd", "fwd+bwd") for c in CASES for b in ROWS]
          + [(c, p, "compile") for p in ("fwd", "fwd+bwd") for c in CASES])


def _id(param):
    (k, stage, frames), pass_, backend = param
    return f"k{k}-stage{stage}-f{frames}-{pass_}-{backend}"


def _make_fn(backend, k, C, residual):
    """fn(x, w, b) -> y for the row; x arrives in the layout the row runs on."""
    if backend.startswith("nn.Conv3d"):
        # What nn.Conv3d(C, C, k, padding=k // 2, groups=C) runs, on the row's memory format.
        def fn(x, w, b):
            y = torch.nn.functional.conv3d(x, w, b, padding=k // 2, groups=C)
            return x + y if residual else y
        return fn
    if backend == "compile":
        reason = compile_enabled("op")
        if reason:
            pytest.skip(reason)
        compiled = compile_fresh(dwconv3d_reference)
        return lambda x, w, b: compiled(x, w, b, residual)
    op_backend_or_skip("dwconv3d", backend)
    return lambda x, w, b: ops.dwconv3d(x, w, b, residual=residual, backend=backend)


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_dwconv3d(benchmark, param):
    (k, stage, frames), pass_, backend = param
    shape = stage_shape(stage, frames)
    B, C, T, H, W = shape
    residual = k == 3  # the DPE adds its input; the Local MHRA conv does not
    backward = pass_ == "fwd+bwd"
    label = "DPE 3x3x3+bias+residual" if k == 3 else "dwconv 5x5x5+bias"
    benchmark.group = f"dwconv3d {label} {pass_} | stage {stage}, f{frames}: {shape_str(shape)} {DTYPE_NAME}"
    fn = _make_fn(backend, k, C, residual)

    memory_format = torch.contiguous_format if backend == BASELINE else torch.channels_last_3d
    act_bytes = B * C * T * H * W * ELEM_BYTES
    n = pool_size(act_bytes * (2 if backward else 1))
    w = torch.randn(C, 1, k, k, k, device=DEVICE, dtype=DTYPE) / k ** 1.5
    b = torch.randn(C, device=DEVICE, dtype=DTYPE)
    xs = [torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=memory_format) for _ in range(n)]
    if backward:
        w.requires_grad_(True)
        b.requires_grad_(True)
        xs = [x.requires_grad_(True) for x in xs]
        dys = [torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=memory_format)
               for _ in range(n)]
        calls = [lambda x=x, dy=dy: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
                 for x, dy in zip(xs, dys)]
    else:
        calls = [lambda x=x: _no_grad(fn, x, w, b) for x in xs]
    call_or_skip(calls[0], compiled=backend == "compile")

    info = {"level": "op", "op": "dwconv3d", "kernel": f"{k}x{k}x{k}", "pass": pass_, "stage": stage,
            "frames": frames, "shape": list(shape), "layout": "contiguous" if backend == BASELINE
            else "channels_last_3d", "backend": backend, "baseline": backend == BASELINE,
            "residual": residual}
    if backend in ops.available_backends("dwconv3d"):
        info["backend_used"] = backend
    elif backend == "compile":
        info["backend_used"] = "torch.compile(dwconv3d_reference)"
    else:
        info["backend_used"] = f"F.conv3d(groups=C) on {info['layout']}"
    info["kernels"] = profile_kernels(calls[0])
    work = floors.dwconv3d(B, C, T, H, W, k, e=ELEM_BYTES, backward=backward)
    run(benchmark, calls, work=work, info=info, bytes_per_slot=act_bytes * (2 if backward else 1))


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)
