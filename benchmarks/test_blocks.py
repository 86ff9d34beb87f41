"""Whole blocks of uniformer_fast.model: CBlock (stages 1-2) and SABlock (stages 3-4), forward
(eval mode, no autograd) and forward+backward (train mode: dx and every parameter gradient).

Training rows run with stochastic depth as the official runs train (``dp0.035``: a CBlock at the
rate of UniFormer-S's last CBlock at drop_path_rate 0.1; ``dp0.1``: an SABlock at that of its last
block) and without it (``dp0``): drop path draws a per-sample mask and scales both residual
branches (in a CBlock's fused Local MHRA tail where it runs). Any rate above 0 costs the same, and
the floor is the same (the scale folds into the residual add). Forward rows run in eval mode, where drop path is inactive.

Each group is one block kind, pass (and drop path) and stage shape; its rows are the backends. Baseline:
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
from .harness import (BLOCK_FRAMES, DEVICE, DTYPE, DTYPE_NAME, ELEM_BYTES, HEAD_DIM, OFFICIAL_DROP_PATH,
                      backend_scope, block_drop_path, call_or_skip, compile_enabled, compile_fresh, dp_id,
                      per_op_choice, pool_size, record_resolved, run, shape_str, stage_shape)

BASELINE = "reference"
ROWS = [BASELINE, "sdpa", "cpp", "triton"]
CASES = [("CBlock", 1), ("CBlock", 2), ("SABlock", 3), ("SABlock", 4)]
OPS_OF = {"CBlock": ("dwconv3d",), "SABlock": ("dwconv3d", "attention")}
DP_VARIANT = "uniformer_small"  # the training rows' drop path: its official schedule (0.1)
# Pass and drop path: eval forward (none), training at the representative rate, then at 0 (the
# official-rate rows first: the GPU run's time box cuts from the end).
PASSES = [("fwd", None), ("fwd+bwd", "train"), ("fwd+bwd", 0.0)]
PARAMS = ([(c, f, p, dp, b) for p, dp in PASSES for c in CASES for f in BLOCK_FRAMES for b in ROWS]
          + [(c, f, p, dp, "compile") for p, dp in PASSES for c in CASES for f in BLOCK_FRAMES])


def _drop_path(kind, dp):
    """The block's drop-path rate: None (eval), "train" (the representative rate) or a number."""
    if dp is None:
        return 0.0
    return block_drop_path(DP_VARIANT, kind) if dp == "train" else dp


def _id(param):
    (kind, stage), frames, pass_, dp, backend = param
    dp_part = "" if dp is None else f"-{dp_id(_drop_path(kind, dp))}"
    return f"{kind}-stage{stage}-f{frames}-{pass_}{dp_part}-{backend}"


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_block(benchmark, param):
    (kind, stage), frames, pass_, dp, backend = param
    drop_path = _drop_path(kind, dp)
    shape = stage_shape(stage, frames)
    B, C, T, H, W = shape
    heads = C // HEAD_DIM
    backward = pass_ == "fwd+bwd"
    dp_part = "" if dp is None else f" {dp_id(drop_path)}"
    benchmark.group = f"block {kind} {pass_}{dp_part} | stage {stage}, f{frames}: {shape_str(shape)} {DTYPE_NAME}"

    if backend == "compile":
        reason = compile_enabled("block")
        if reason:
            pytest.skip(reason)
        choice = {op: "reference" for op in OPS_OF[kind]}
    else:
        choice = per_op_choice(backend, OPS_OF[kind])
    block = (CBlock if kind == "CBlock" else SABlock)(C, heads, drop_path=drop_path).to(DEVICE, DTYPE)
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
            "drop_path": drop_path,
            "drop_path_of": (None if dp != "train" else
                             f"last {kind} of {DP_VARIANT} at drop_path_rate {OFFICIAL_DROP_PATH[DP_VARIANT]}"),
            "backend_choice": choice,
            "backend_used": "torch.compile(reference block)" if backend == "compile" else used}
    work = floors.block(kind, B, C, T, H, W, heads, e=ELEM_BYTES, backward=backward)
    run(benchmark, calls, work=work, info=info, bytes_per_slot=act_bytes * (2 if backward else 1))


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)
