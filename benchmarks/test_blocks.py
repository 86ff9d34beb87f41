"""Whole blocks of uniformer_fast.model: CBlock (stages 1-2) and SABlock (stages 3-4), forward
(eval mode, no autograd) and forward+backward (train mode: dx and every parameter gradient).

Each group is one block kind, pass and stage shape; its rows are the backends. Baseline:
``reference``, the block with every op on its plain-PyTorch backend (eager). A row named after a
backend runs each op of the block that registers it with it and the others with ``reference``
(``backend_used`` records the choice per op); ``compile`` is ``torch.compile`` of the reference
block. Input in ``channels_last_3d``, the model's layout.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from uniformer_fast.model import CBlock, SABlock

from . import floors
from .harness import (BLOCK_FRAMES, DEVICE, DTYPE, DTYPE_NAME, ELEM_BYTES, HEAD_DIM, backend_scope,
                      call_or_skip, compile_enabled, compile_fresh, per_op_choice, pool_size,
                      record_resolved, run, shape_str, stage_shape)

BASELINE = "reference"
ROWS = [BASELINE, "sdpa", "cpp", "triton"]
CASES = [("CBlock", 1), ("CBlock", 2), ("SABlock", 3), ("SABlock", 4)]
OPS_OF = {"CBlock": ("dwconv3d",), "SABlock": ("dwconv3d", "attention")}
PARAMS = ([(c, f, p, b) for p in ("fwd", "fwd+bwd") for c in CASES for f in BLOCK_FRAMES for b in ROWS]
          + [(c, f, p, "compile") for p in ("fwd", "fwd+bwd") for c in CASES for f in BLOCK_FRAMES])


def _id(param):
    (kind, stage), frames, pass_, backend = param
    return f"{kind}-stage{stage}-f{frames}-{pass_}-{backend}"


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_block(benchmark, param):
    (kind, stage), frames, pass_, backend = param
    shape = stage_shape(stage, frames)
    B, C, T, H, W = shape
    heads = C // HEAD_DIM
    backward = pass_ == "fwd+bwd"
    benchmark.group = f"block {kind} {pass_} | stage {stage}, f{frames}: {shape_str(shape)} {DTYPE_NAME}"

    if backend == "compile":
        reason = compile_enabled("block")
        if reason:
            pytest.skip(reason)
        choice = {op: "reference" for op in OPS_OF[kind]}
    else:
        choice = per_op_choice(backend, OPS_OF[kind])
    block = (CBlock if kind == "CBlock" else SABlock)(C, heads).to(DEVICE, DTYPE)
    block.train(backward)
    params = [p for p in block.parameters() if p.requires_grad]
    model = compile_fresh(block) if backend == "compile" else block

    act_bytes = B * C * T * H * W * ELEM_BYTES
    n = pool_size(act_bytes * (2 if backward else 1))
    xs = [torch.randn(shape, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last_3d)
          for _ in range(n)]

    def scoped(fn):
        def call():
            with backend_scope(choice):
                return fn()
        return call

    if backward:
        xs = [x.requires_grad_(True) for x in xs]
        dys = [torch.randn_like(x) for x in xs]
        calls = [scoped(lambda x=x, dy=dy: torch.autograd.grad(model(x), [x] + params, dy))
                 for x, dy in zip(xs, dys)]
    else:
        calls = [scoped(lambda x=x: _no_grad(model, x)) for x in xs]

    # The spy is left out of the compiled row: dynamo would trace it and recompile without it.
    with (contextlib.nullcontext({}) if backend == "compile" else record_resolved()) as seen:
        call_or_skip(calls[0], compiled=backend == "compile")
    used = {op: sorted(v) for op, v in seen.items()}
    info = {"level": "block", "op": kind, "pass": pass_, "stage": stage, "frames": frames,
            "shape": list(shape), "heads": heads, "backend": backend, "baseline": backend == BASELINE,
            "backend_choice": choice,
            "backend_used": "torch.compile(reference block)" if backend == "compile" else used}
    work = floors.block(kind, B, C, T, H, W, heads, e=ELEM_BYTES, backward=backward)
    run(benchmark, calls, work=work, info=info, bytes_per_slot=act_bytes * (2 if backward else 1))


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)
