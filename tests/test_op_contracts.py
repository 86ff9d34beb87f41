"""The contract every public op with custom ops (Triton kernels, the C++ extension, oneDNN) keeps,
checked in one place over a table of op cases (one per op and backend):

- ``torch.library.opcheck`` of each custom op the case names (schema, fake implementation,
  dispatch through AOT autograd);
- ``torch.compile(fullgraph=True)`` of the public op, forward and backward, equal to eager and to
  the float64 reference;
- the gradients of ``y.sum()`` (an expanded, stride-0 upstream gradient) equal the float64
  reference's, and the inputs are left as they were;
- determinism: two runs (forward and backward) agree bit for bit, inputs untouched.

Each op's own tests (shapes, layouts, dtypes, statistics, errors, GPU compiles) stay in its file.
Sizes are tiny and odd: the Triton kernels run under the interpreter on the CPU (~0.1 ms per
operation per program).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from uniformer_fast import ops
from uniformer_fast.kernels import HAS_TRITON, INTERPRET
from uniformer_fast.ops import dpe_norm, self_attention
from uniformer_fast.ops.reference import attention_reference

from helpers import (assert_untouched, attention_rtol, clones, make_x, needs_cpp, needs_cpp_attention, needs_onednn,
                     needs_triton)

CL = torch.channels_last_3d
F32, BF16 = torch.float32, torch.bfloat16

needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="triton interpreter not available")


@dataclass(frozen=True)
class Case:
    """One public op on one backend.

    ``inputs(size, dtype, device)`` builds the op's arguments (tensors, None for absent optional
    ones, plain values); ``op(*inputs)`` runs the public op on the backend; ``reference`` is the
    float64 ground truth with the same arguments. ``grad_size``: the y.sum() check's size;
    ``compile_size``: the full-graph compile's; ``deterministic``: (size, dtype) pairs run twice.
    ``opchecks``: id -> a function returning [(custom op name, args), ...]. ``training``: False
    for inference-only backends (no backward: their checks run under no_grad, forward only).
    ``loss``: what ``.backward()`` is called on, from the outputs; ``rtol``: the float32 tolerance
    against the reference (None: conftest's). ``cpu``: the backend runs CPU tensors only.
    """
    inputs: Callable
    op: Callable
    reference: Callable
    grad_size: object
    compile_size: object
    deterministic: tuple
    opchecks: dict
    marks: tuple
    opcheck_marks: tuple
    training: bool = True
    loss: Callable = field(default=lambda outs: sum(o.sum() for o in outs))
    rtol: Callable = field(default=lambda dtype: None)
    cpu: bool = False


# --- dwconv3d ----------------------------------------------------------------------------------

def _dwconv3d_inputs(shape, dtype, device):
    C = shape[1]
    return [make_x(shape, dtype, "channels_last", device),
            torch.randn(C, 1, 3, 3, 3, device=device).to(dtype), torch.randn(C, device=device).to(dtype)]


def _dwconv3d_opchecks():
    x, gy = make_x((2, 5, 3, 4, 3), F32, "channels_last", "cpu"), make_x((2, 5, 3, 4, 3), F32, "channels_last", "cpu")
    w, b = torch.randn(5, 1, 3, 3, 3), torch.randn(5)
    return x, gy, w, b


def _dwconv3d_cpp_opcheck(case):
    def build():
        x, gy, w, b = _dwconv3d_opchecks()
        return [{"fwd": ("dwconv3d_cpp_fwd", (x, w, b, True, False)),
                 "fwd_flip": ("dwconv3d_cpp_fwd", (gy, w, None, False, True)),
                 "bwd": ("dwconv3d_cpp_bwd", (x, gy, w, True, True)),
                 "bwd_weight_only": ("dwconv3d_cpp_bwd", (x, gy, w, False, False))}[case]]
    return build


def _dwconv3d_triton_opcheck(case):
    def build():
        x, gy, w, b = _dwconv3d_opchecks()
        taps = w.reshape(5, -1).t().contiguous()
        return [{"fwd": ("dwconv3d_triton_fwd", (x, taps, b, True, [3, 3, 3])),
                 "bwd_dw": ("dwconv3d_triton_bwd_dw", (x, gy, [3, 3, 3]))}[case]]
    return build


def _dwconv3d_reference(x, w, b):
    return ops.dwconv3d(x, w, b, residual=True, backend="reference")


# --- dpe_layernorm, dpe_bn_stats ---------------------------------------------------------------

def _dpe_params(C, dtype, device, with_bias=True, layernorm=True):
    w = (torch.randn(C, 1, 3, 3, 3, device=device) * 0.3).to(dtype)
    b = torch.randn(C, device=device).to(dtype) if with_bias else None
    if not layernorm:
        return [w, b]
    return [w, b, (1.0 + 0.5 * torch.randn(C, device=device)).to(dtype), torch.randn(C, device=device).to(dtype)]


def _dpe_layernorm_inputs(shape, dtype, device):
    return [make_x(shape, dtype, "channels_last", device)] + _dpe_params(shape[1], dtype, device)


def _dpe_layernorm_opcheck(with_bias):
    def build():
        x = torch.randn(1, 5, 2, 3, 3).to(memory_format=CL)
        w, b, lnw, lnb = _dpe_params(5, F32, "cpu", with_bias)
        taps = w.reshape(5, -1).t().contiguous()
        y, _, mean, rstd = dpe_norm.dpe_layernorm_triton_fwd(x, taps, b, lnw, lnb, 1e-6, [3, 3, 3])
        gz = torch.randn(1, 5, 2, 3, 3).to(memory_format=CL)
        gy = torch.randn(1, 5, 2, 3, 3).to(memory_format=CL) if with_bias else None
        return [("dpe_layernorm_triton_fwd", (x, taps, b, lnw, lnb, 1e-6, [3, 3, 3])),
                ("dpe_layernorm_triton_bwd_ln", (y, gz, gy, lnw, mean, rstd))]
    return build


def _dpe_bn_stats_inputs(shape, dtype, device):
    return [make_x(shape, dtype, "channels_last", device)] + _dpe_params(shape[1], dtype, device, layernorm=False)


def _dpe_bn_stats_opcheck(with_bias):
    def build():
        x = torch.randn(1, 5, 2, 3, 3).to(memory_format=CL)
        w, b = _dpe_params(5, F32, "cpu", with_bias, layernorm=False)
        taps = w.reshape(5, -1).t().contiguous()
        y, mean, _ = dpe_norm.dpe_bn_stats_triton_fwd(x, taps, b, [3, 3, 3])
        gy = torch.randn(1, 5, 2, 3, 3).to(memory_format=CL) if with_bias else None
        return [("dpe_bn_stats_triton_fwd", (x, taps, b, [3, 3, 3])),
                ("bn_stats_triton_bwd", (y, gy, mean, torch.randn(5), torch.randn(5)))]
    return build


# --- local_mhra_tail, local_mhra_tail_bn_stats -----------------------------------------------------

def _local_mhra_inputs(shape, dtype, device, optional=True):
    C = shape[1]
    u = make_x(shape, dtype, "channels_last", device)
    # Scaled so that y is O(1) for every C.
    aw = torch.randn(C, 1, 3, 3, 3, device=device) / 27 ** 0.5
    w2 = torch.randn(C, C, 1, 1, 1, device=device) / C ** 0.5
    return [u, aw.to(dtype), torch.randn(C, device=device).to(dtype) if optional else None,
            w2.to(dtype), torch.randn(C, device=device).to(dtype) if optional else None,
            make_x(shape, dtype, "channels_last", device) if optional else None]


def _local_mhra_opcheck(name, with_optional):
    def build():
        u, aw, ab, w2, b2, r = _local_mhra_inputs((1, 16, 2, 3, 3), F32, "cpu", with_optional)
        taps = aw.reshape(16, -1).t().contiguous()
        w2t = w2.flatten(1).t().contiguous()
        return [(name, (u, taps, ab, w2t, b2, None, r, [3, 3, 3]))]  # no branch scale
    return build


def _local_mhra_bn_stats_reference(*args):
    """float64: the unfused tail, then the biased batch statistics of its output."""
    y = ops.local_mhra_tail_reference(*args)
    var, mean = torch.var_mean(y, dim=(0, 2, 3, 4), correction=0)
    return y, mean, var


# --- attention ---------------------------------------------------------------------------------

def _attention_inputs(size, dtype, device):
    B, N, heads, head_dim = size
    return [torch.randn(B, N, 3 * heads * head_dim, device=device).to(dtype), heads]


def _attention_opcheck(direction):
    def build():
        qkv = torch.randn(1, 5, 3 * 2 * 32)
        if direction == "fwd":
            return [("attention_triton_fwd", (qkv, 2, 0.2))]
        out, lse = self_attention.attention_triton_fwd(qkv, 2, 0.2)
        return [("attention_triton_bwd", (torch.randn(1, 5, 64), qkv, out, lse, 2, 0.2))]
    return build


# --- linear ------------------------------------------------------------------------------------

def _linear_inputs(size, dtype, device):
    x_shape, out_features = size
    return [torch.randn(x_shape, device=device).to(dtype),
            (torch.randn(out_features, x_shape[-1], device=device) / x_shape[-1] ** 0.5).to(dtype),
            torch.randn(out_features, device=device).to(dtype)]


def _linear_reference(x, w, b):
    return F.gelu(F.linear(x, w, b))


def _linear_triton_opcheck(activation, bias):
    def build():
        x, w = torch.randn(9, 20), torch.randn(17, 20)
        b = torch.randn(17) if bias else None
        dy = torch.randn(9, 17)
        return [("linear_triton_fwd", (x, w, b, activation))] + [
            ("linear_triton_bwd", (dy, x, w, b, activation, need_dx, need_dw))
            for need_dx, need_dw in ((True, True), (False, True), (True, False))]
    return build


def _linear_onednn_opcheck(activation):
    def build():
        x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
        return [("linear_onednn", (x, w, b, "gelu") if activation == "gelu" else (x, w, None, "none"))]
    return build


CASES = {
    "dwconv3d-triton": Case(
        _dwconv3d_inputs, lambda x, w, b: ops.dwconv3d(x, w, b, residual=True, backend="triton"),
        _dwconv3d_reference, grad_size=(2, 6, 3, 4, 3), compile_size=(2, 6, 3, 4, 3),
        deterministic=(((3, 20, 3, 4, 5), F32), ((3, 20, 3, 4, 5), BF16)),
        opchecks={name: _dwconv3d_triton_opcheck(name) for name in ("fwd", "bwd_dw")},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,)),
    "dwconv3d-cpp": Case(
        _dwconv3d_inputs, lambda x, w, b: ops.dwconv3d(x, w, b, residual=True, backend="cpp"),
        _dwconv3d_reference, grad_size=(2, 6, 3, 4, 3), compile_size=(2, 6, 3, 4, 3),
        deterministic=(((3, 20, 3, 4, 5), F32),),
        opchecks={name: _dwconv3d_cpp_opcheck(name) for name in ("fwd", "fwd_flip", "bwd", "bwd_weight_only")},
        marks=(needs_cpp,), opcheck_marks=(needs_cpp,), cpu=True),
    "dpe_layernorm-triton": Case(
        _dpe_layernorm_inputs,
        lambda x, w, b, lnw, lnb: ops.dpe_layernorm(x, w, b, lnw, lnb, 1e-6, backend="triton"),
        lambda x, w, b, lnw, lnb: ops.dpe_layernorm(x, w, b, lnw, lnb, 1e-6, backend="reference"),
        grad_size=(1, 20, 2, 3, 3), compile_size=(1, 20, 2, 3, 3),
        deterministic=(((3, 20, 2, 3, 3), F32), ((3, 20, 2, 3, 3), BF16)),
        opchecks={"bias": _dpe_layernorm_opcheck(True), "no_bias": _dpe_layernorm_opcheck(False)},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,),
        # z * z: d/dz = 2z, not a constant gradient, which the LayerNorm annihilates.
        loss=lambda outs: outs[0].sum() + (outs[1] * outs[1]).sum()),
    "dpe_bn_stats-triton": Case(
        _dpe_bn_stats_inputs, lambda x, w, b: ops.dpe_bn_stats(x, w, b, backend="triton"),
        lambda x, w, b: ops.dpe_bn_stats(x, w, b, backend="reference"),
        grad_size=(2, 20, 2, 3, 3), compile_size=(2, 20, 2, 3, 3),
        deterministic=(((5, 20, 2, 3, 3), F32),),  # 5 tile rows: both merge levels
        opchecks={"bias": _dpe_bn_stats_opcheck(True), "no_bias": _dpe_bn_stats_opcheck(False)},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,)),
    "local_mhra_tail-triton": Case(
        _local_mhra_inputs, lambda *a: ops.local_mhra_tail(*a, backend="triton"),
        ops.local_mhra_tail_reference, grad_size=(1, 16, 2, 3, 3), compile_size=(1, 16, 2, 3, 3),
        deterministic=(((1, 16, 2, 3, 3), F32),),
        opchecks={"all": _local_mhra_opcheck("local_mhra_tail_triton_fwd", True),
                  "no_bias_no_residual": _local_mhra_opcheck("local_mhra_tail_triton_fwd", False)},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,)),
    "local_mhra_tail_bn_stats-triton": Case(
        _local_mhra_inputs, lambda *a: ops.local_mhra_tail_bn_stats(*a, backend="triton"),
        _local_mhra_bn_stats_reference, grad_size=(1, 16, 2, 3, 3), compile_size=(1, 16, 2, 3, 3),
        deterministic=(((3, 16, 3, 4, 5), F32),),  # 6 tile rows: both merge levels
        opchecks={"all": _local_mhra_opcheck("local_mhra_tail_bn_stats_triton_fwd", True),
                  "no_bias_no_residual": _local_mhra_opcheck("local_mhra_tail_bn_stats_triton_fwd", False)},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,)),
    "attention-triton": Case(
        _attention_inputs, lambda qkv, heads: ops.attention(qkv, heads, scale=0.2, backend="triton"),
        lambda qkv, heads: attention_reference(qkv, heads, 0.2),
        grad_size=(2, 19, 2, 32), compile_size=(1, 17, 2, 32), deterministic=(((1, 17, 2, 32), F32),),
        opchecks={"fwd": _attention_opcheck("fwd"), "bwd": _attention_opcheck("bwd")},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,), rtol=attention_rtol),
    "attention-cpp": Case(
        _attention_inputs, lambda qkv, heads: ops.attention(qkv, heads, scale=0.2, backend="cpp"),
        lambda qkv, heads: attention_reference(qkv, heads, 0.2),
        grad_size=(2, 19, 2, 32), compile_size=(1, 17, 2, 32), deterministic=(((2, 40, 2, 64), F32),),
        opchecks={"fwd": lambda: [("attention_cpp", (torch.randn(1, 5, 3 * 2 * 32), 2, 0.2))]},
        marks=(needs_cpp_attention,), opcheck_marks=(needs_cpp_attention,), training=False, cpu=True),
    "linear-triton": Case(
        _linear_inputs, lambda x, w, b: ops.linear(x, w, b, activation="gelu", backend="triton"),
        _linear_reference, grad_size=((5, 7, 20), 18), compile_size=((2, 5, 20), 18),
        deterministic=((((2, 5, 20), 18), F32),),
        opchecks={f"{activation}-{bias_id}": _linear_triton_opcheck(activation, bias)
                  for activation in ("none", "gelu") for bias, bias_id in ((True, "bias"), (False, "no_bias"))},
        marks=(needs_triton,), opcheck_marks=(needs_interpreter,)),
    "linear-onednn": Case(
        _linear_inputs, lambda x, w, b: ops.linear(x, w, b, activation="gelu", backend="onednn"),
        _linear_reference, grad_size=((5, 7, 16), 8), compile_size=((2, 5, 16), 8),
        deterministic=((((5, 7, 16), 8), F32),),
        opchecks={"gelu": _linear_onednn_opcheck("gelu"), "none": _linear_onednn_opcheck("none")},
        marks=(needs_onednn,), opcheck_marks=(needs_onednn,), training=False, cpu=True),
}


def _id(v):
    if isinstance(v, tuple):
        return "x".join(map(_id, v))
    return str(v)[6:] if isinstance(v, torch.dtype) else str(v)


def _params(items):
    return [pytest.param(name, *rest, marks=marks, id="-".join(map(_id, (name, *rest))))
            for name, marks, *rest in items]


# --- running a case ----------------------------------------------------------------------------

def _device(case, device):
    if case.cpu:
        return torch.device("cpu")
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    return device


def _double(inputs):
    return [t.detach().double() if isinstance(t, torch.Tensor) else t for t in inputs]


def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _upstream(outs):
    """Random upstream gradients, one per output, contiguous: the same values on every call (a
    fixed seed) and in any dtype (drawn in float32)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]


def _run(case, fn, inputs, backward):
    """``fn`` on fresh leaves. ``backward``: None (forward only, under no_grad), "upstream" (random
    gradients for every output) or "loss" (``case.loss(outputs).backward()``, y.sum()-style
    stride-0 gradients). Returns [*outputs, *the tensor inputs' gradients]."""
    if backward is None or not case.training:
        with torch.no_grad():
            return list(_tuple(fn(*inputs)))
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    outs = _tuple(fn(*leaves))
    if backward == "loss":
        case.loss(outs).backward()
    else:
        torch.autograd.backward(outs, _upstream(outs))
    return list(outs) + [t.grad for t in leaves if isinstance(t, torch.Tensor)]


def _names(case, inputs, results):
    """Names for ``_run``'s results: out0, out1, ..., then d(input i) for each tensor input."""
    tensors = [f"d(input {i})" for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)] if case.training else []
    return [f"out{i}" for i in range(len(results) - len(tensors))] + tensors


# --- the contract checks -----------------------------------------------------------------------

@pytest.mark.parametrize("name,check", _params(
    (name, case.opcheck_marks, check) for name, case in CASES.items() for check in case.opchecks))
def test_opcheck(name, check):
    """Schema, fake (meta) implementation and dispatch through AOT autograd agree, for each custom op."""
    for op_name, args in CASES[name].opchecks[check]():
        torch.library.opcheck(getattr(torch.ops.uniformer_fast, op_name).default, args)


@pytest.mark.parametrize("name", _params((name, case.marks) for name, case in CASES.items()))
def test_compile_fullgraph(name, device, assert_close):
    """The public op, forward and backward, in one full graph (aot_eager on the CPU: opaque ops
    under the interpreter; inductor on CUDA), equal to eager and to the float64 reference."""
    case = CASES[name]
    device = _device(case, device)
    inputs = case.inputs(case.compile_size, F32, device)
    compiled = torch.compile(case.op, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    got = _run(case, compiled, inputs, "upstream")
    eager = _run(case, case.op, inputs, "upstream")
    ref = _run(case, case.reference, _double(inputs), "upstream")
    for what, a, e, r in zip(_names(case, inputs, got), got, eager, ref):
        if r is None:
            assert a is None and e is None, what
            continue
        assert_close(a, e, rtol=1e-5, name=f"{what} compiled vs eager")
        assert_close(a, r, dtype=F32, rtol=case.rtol(F32), name=f"{what} compiled vs float64")


@pytest.mark.parametrize("name", _params((name, case.marks) for name, case in CASES.items()))
def test_sum_gradients_and_inputs_untouched(name, device, assert_close):
    """``y.sum().backward()`` hands the backward an expanded (stride-0) gradient: the outputs and
    gradients equal the float64 reference's, and the op wrote none of its inputs. (Inference-only
    backends: the forward.)"""
    case = CASES[name]
    device = _device(case, device)
    inputs = case.inputs(case.grad_size, F32, device)
    before = clones(inputs)
    got = _run(case, case.op, inputs, "loss")
    ref = _run(case, case.reference, _double(inputs), "loss")
    assert_untouched(inputs, before)
    for what, a, e in zip(_names(case, inputs, got), got, ref):
        if e is None:
            assert a is None, what
            continue
        assert a.dtype == F32, f"{what}: dtype {a.dtype}"
        assert_close(a, e, dtype=F32, rtol=case.rtol(F32), name=what)


# The Triton cases in the full tier only: the interpreter runs a kernel's programs one after another,
# so on the CPU they cannot race; the GPU run (and CI's full tier) checks them.
@pytest.mark.parametrize("name,size,dtype", _params(
    (name, (*case.marks, *[pytest.mark.slow] * name.endswith("-triton")), size, dtype)
    for name, case in CASES.items() for size, dtype in case.deterministic))
def test_deterministic(name, size, dtype, device):
    """Fixed-order reductions, no atomics: two runs (forward and backward) agree bit for bit, and
    leave the inputs as they were."""
    case = CASES[name]
    device = _device(case, device)
    inputs = case.inputs(size, dtype, device)
    before = clones(inputs)
    first = _run(case, case.op, inputs, "upstream")
    second = _run(case, case.op, inputs, "upstream")
    assert_untouched(inputs, before)
    for what, a, b in zip(_names(case, inputs, first), first, second):
        assert (a is None and b is None) or torch.equal(a, b), f"{what} differs between two runs"
