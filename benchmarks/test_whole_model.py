"""The whole model, UniFormer-S and -B: inference (eval, no autograd) and one training step
(forward, cross-entropy, backward, AdamW step, zero_grad) on a batch of clips.

Training steps run with stochastic depth as the official runs train (``dp0.1`` for UniFormer-S,
``dp0.3`` for -B: ``drop_path_rate``, rising linearly over the blocks) and at 0 (``dp0``: what
stochastic depth costs). Order: S at 0.1 and at 0, B at 0.3, B at 0 last (the GPU run's first
command leaves it out). Inference rows have no drop path (it is inactive in eval).

Each group is one variant and pass (and drop path) at one clip size; its rows are the backends. Baseline:
``official``, :class:`uniformer_fast.official.OfficialUniFormer` eager (the official model's
computation: contiguous layout, explicit softmax). ``compile`` is ``torch.compile`` of it.
``reference``, ``sdpa``, ``cpp``, ``triton`` run :class:`uniformer_fast.UniFormer` with each op
on that backend where the op has it (else ``reference``); ``auto`` with the default choice (skipped
when it picks the same backends as another row). Parameters, gradients and optimizer state are
in the benchmark dtype (bf16 on a GPU: a throughput benchmark, not a recipe). Peak memory of the
training step is in ``peak_mem_bytes`` (CUDA).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniformer_fast import create_model, ops
from uniformer_fast.official import OfficialUniFormer

from . import floors
from .harness import (BATCH, DEVICE, DTYPE, DTYPE_NAME, ELEM_BYTES, MODEL_FRAMES, MODEL_VARIANTS,
                      OFFICIAL_DROP_PATH, SIZE, backend_scope, call_or_skip, compile_enabled, compile_fresh,
                      dp_id, per_op_choice, record_resolved, run)

BASELINE = "official"
ROWS = [BASELINE, "reference", "auto", "sdpa", "cpp", "triton"]
VARIANTS = MODEL_VARIANTS  # S and B on a GPU, S on the CPU
OP_NAMES = ("dwconv3d", "attention")
# Variant, pass, drop_path_rate: inference (none); training, S at 0.1 then at 0 (the comparison),
# B at 0.3, B at 0 last (the GPU run's time box cuts from the end; its first command leaves B at 0
# out).
PASSES = ([(v, "infer", None) for v in VARIANTS]
          + [(v, "train", dp) for v in VARIANTS for dp in (OFFICIAL_DROP_PATH[v], 0.0)
             if (v, dp) != ("uniformer_base", 0.0)]
          + [(v, "train", 0.0) for v in VARIANTS if v == "uniformer_base"])
PARAMS = ([(v, f, p, dp, b) for v, p, dp in PASSES for f in MODEL_FRAMES for b in ROWS]
          + [(v, f, p, dp, "compile") for v, p, dp in PASSES for f in MODEL_FRAMES])


def _id(param):
    variant, frames, pass_, dp, backend = param
    dp_part = "" if dp is None else f"-{dp_id(dp)}"
    return f"{variant}-f{frames}-{pass_}{dp_part}-{backend}"


def _build(variant, backend, drop_path_rate):
    if backend in (BASELINE, "compile"):
        cfg = floors.VARIANTS[variant]
        return OfficialUniFormer(depth=cfg["depth"], embed_dim=cfg["embed_dim"], head_dim=cfg["head_dim"],
                                 num_classes=400, drop_path_rate=drop_path_rate)
    return create_model(variant, num_classes=400, drop_path_rate=drop_path_rate)


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_model(benchmark, param):
    variant, frames, pass_, dp, backend = param
    train = pass_ == "train"
    drop_path_rate = dp or 0.0
    shape = (BATCH, 3, frames, SIZE, SIZE)
    dp_part = "" if dp is None else f" {dp_id(dp)}"
    benchmark.group = (f"model {variant} {pass_}{dp_part} | {BATCH}x3x{frames}x{SIZE}x{SIZE} {DTYPE_NAME}")
    if backend == "compile":
        reason = compile_enabled("model")
        if reason:
            pytest.skip(reason)
    if backend in (BASELINE, "compile", "auto"):
        choice = None
    else:
        choice = per_op_choice(backend, OP_NAMES)

    net = _build(variant, backend, drop_path_rate).to(DEVICE, DTYPE).train(train)
    model = compile_fresh(net) if backend == "compile" else net
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    labels = torch.randint(0, 400, (BATCH,), device=DEVICE)
    if train:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def step():
            with torch.no_grad():
                return model(x)

    if choice is None:
        call = step
    else:
        def call():
            with backend_scope(choice):
                return step()

    if backend in (BASELINE, "compile"):
        call_or_skip(call, compiled=backend == "compile")
        used = "official eager" if backend == BASELINE else "torch.compile(official)"
    else:
        with record_resolved() as seen:
            call_or_skip(call)
        used = {op: sorted(v) for op, v in seen.items()}
        if backend == "auto":
            for other in ROWS[1:]:
                if other == "auto":
                    continue
                same = {op: [(other if other in ops.available_backends(op) else "reference")]
                        for op in seen}
                if same == used:
                    pytest.skip(f"auto picks the same backends as row {other!r}: {used}")

    info = {"level": "model", "op": variant, "pass": pass_, "stage": "all", "frames": frames,
            "shape": list(shape), "backend": backend, "baseline": backend == BASELINE,
            "backend_used": used, "optimizer": "AdamW" if train else None,
            "drop_path_rate": drop_path_rate}
    work = floors.model(variant, BATCH, frames, SIZE, e=ELEM_BYTES, train=train)
    run(benchmark, [call], work=work, info=info)
