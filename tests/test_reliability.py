"""The bad-input matrix: every public op on every backend that runs here, fed what a careless or
hostile caller might pass. Each bad argument gets a named error; every odd-but-valid input
(non-dense and stride-0 views, NaN, Inf, huge values) gets the reference's result.

Shapes are tiny and odd (C = 6, 3 x 4 x 5 positions) so the Triton interpreter stays quick.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.kernels import HAS_TRITON, INTERPRET

from helpers import TINY_HEAD32, cpp_attention_why_not


@dataclass(frozen=True)
class OpCase:
    """One public op: its tensor arguments (name -> shape, in call order), the other arguments,
    and the backends registered for it. ``grad``: backends with a backward."""
    name: str
    fn: Callable
    tensors: dict
    kwargs: dict = field(default_factory=dict)
    backends: tuple = ("reference", "triton")
    no_grad_backends: tuple = ()

    def call(self, tensors: dict, backend: str):
        out = self.fn(*tensors.values(), **self.kwargs, backend=backend)
        return out if isinstance(out, tuple) else (out,)


C, X5 = 6, (2, 6, 3, 4, 5)
CASES = [
    OpCase("dwconv3d", ops.dwconv3d, dict(x=X5, weight=(C, 1, 3, 3, 3), bias=(C,)), dict(residual=True),
           backends=("reference", "cpp", "triton")),
    OpCase("linear", ops.linear, dict(x=(3, 5, 16), weight=(8, 16), bias=(8,)), dict(activation="gelu"),
           backends=("reference", "onednn", "triton"), no_grad_backends=("onednn",)),
    OpCase("mlp", lambda x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, backend: ops.mlp(
               x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=residual, backend=backend),
           dict(x=(3, 5, 16), fc1_weight=(32, 16), fc1_bias=(32,), fc2_weight=(16, 32), fc2_bias=(16,),
                residual=(3, 5, 16)),
           backends=("reference", "onednn"), no_grad_backends=("onednn",)),
    # head_dim 32: one the Triton kernels support.
    OpCase("attention", ops.attention, dict(qkv=(2, 5, 3 * 2 * 32)), dict(num_heads=2),
           backends=("reference", "sdpa", "cpp", "triton"), no_grad_backends=("cpp",)),
    OpCase("dpe_layernorm", ops.dpe_layernorm,
           dict(x=X5, weight=(C, 1, 3, 3, 3), bias=(C,), ln_weight=(C,), ln_bias=(C,))),
    OpCase("dpe_bn_stats", ops.dpe_bn_stats, dict(x=X5, weight=(C, 1, 3, 3, 3), bias=(C,))),
    OpCase("local_mhra_tail", ops.local_mhra_tail,
           dict(u=X5, attn_weight=(C, 1, 3, 3, 3), attn_bias=(C,), conv2_weight=(C, C, 1, 1, 1),
                conv2_bias=(C,), residual=X5)),
    OpCase("local_mhra_tail_bn_stats", ops.local_mhra_tail_bn_stats,
           dict(u=X5, attn_weight=(C, 1, 3, 3, 3), attn_bias=(C,), conv2_weight=(C, C, 1, 1, 1),
                conv2_bias=(C,), residual=X5)),
]
CASE_IDS = [c.name for c in CASES]


def _why_not_runnable(backend: str, op: str = "attention"):
    if backend == "triton" and not (HAS_TRITON and INTERPRET):
        return "triton kernels need TRITON_INTERPRET=1 on the CPU"
    if backend == "cpp" and op == "attention":
        return cpp_attention_why_not(torch.float32)
    return None


def _runnable(backend: str) -> bool:
    return _why_not_runnable(backend) is None


def _backend_params(cases=CASES):
    params = []
    for c in cases:
        for b in c.backends:
            reason = _why_not_runnable(b, c.name)
            params.append(pytest.param(c, b, id=f"{c.name}-{b}", marks=pytest.mark.skip(reason=reason) if reason else ()))
    return params


def _random(case: OpCase, dtype=torch.float32) -> dict:
    return {name: torch.randn(shape, dtype=dtype) for name, shape in case.tensors.items()}


# --- Bad arguments: a named error, on every backend, before any kernel runs ----------------------

@pytest.mark.parametrize("case,backend", _backend_params())
def test_wrong_type_rank_dtype_device_named(case, backend):
    tensors = _random(case)
    for name, t in tensors.items():
        bad = [(t.tolist(), TypeError, "type"), (t.to(torch.int32), TypeError, "dtype")]
        if not (case.name in ("linear", "mlp") and name == "x"):  # x (..., in_features) takes any rank
            bad.append((t[None], ValueError, "rank"))
        if len(tensors) > 1:
            bad += [(t.double(), TypeError, "dtype of another"),
                    (t.to("meta"), ValueError, "device of another")]
        for value, error, what in bad:
            if what.endswith("of another") and name == next(iter(tensors)):
                continue  # the first tensor sets the dtype and device: the second is named
            with pytest.raises(error, match=name):
                case.call({**tensors, name: value}, backend)


@pytest.mark.parametrize("case,backend", _backend_params())
def test_empty_input_named_or_reference(case, backend):
    """A batch of 0: a ValueError naming the input where the reference refuses it, else the
    reference's (empty) result."""
    tensors = _random(case)
    for name in ("x", "u", "qkv", "residual"):
        if name in tensors:
            tensors[name] = torch.randn(0, *tensors[name].shape[1:])
    first = next(iter(tensors))
    try:
        expected = case.call(tensors, "reference")
    except ValueError as e:
        assert first in str(e)
        with pytest.raises(ValueError, match=first):
            case.call(tensors, backend)
        return
    try:
        with torch.no_grad():
            outs = case.call(tensors, backend)
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))
    for a, e in zip(outs, expected):
        torch.testing.assert_close(a, e)


def test_linear_edge_shapes_match_the_reference():
    x, w, b = torch.randn(4, 0), torch.randn(8, 0), torch.randn(8)
    with torch.no_grad():  # "auto" on the CPU: the oneDNN path declines K = 0, the reference runs
        torch.testing.assert_close(ops.linear(x, w, b), b.expand(4, 8))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        ops.linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="qkv's last dimension"):
        ops.attention(torch.randn(1, 2, 0), 1)


# --- Strides: non-dense and stride-0 views give the reference's result ------------------------------

def _sliced(shape):
    """A view of a larger tensor with an offset and stride 2 in the last dimension: (leaf, view)."""
    leaf = torch.randn(*shape[:-1], 2 * shape[-1] + 1)
    return leaf, lambda t: t[..., 1::2]


def _expanded(shape):
    """One slice broadcast along dimension 0 (stride 0): (leaf, view)."""
    leaf = torch.randn(1, *shape[1:])
    return leaf, lambda t: t.expand(shape)


LAYOUT_MAKERS = {"sliced": _sliced, "expanded": _expanded}


def _views(case: OpCase, layout: str, which: str):
    """Tensor argument ``which`` (or every one: "all") as a ``layout`` view, the others dense:
    (leaves, view functions)."""
    leaves, views = {}, {}
    for name, shape in case.tensors.items():
        if which in ("all", name):
            leaves[name], views[name] = LAYOUT_MAKERS[layout](shape)
        else:
            leaves[name], views[name] = torch.randn(shape), lambda t: t
    return leaves, views


def _strided_params():
    # One argument at a time as well as all together: a kernel may take a path for one
    # non-dense operand that it does not take when all are (oneDNN did, for the bias alone).
    # The fast tier: all at once on every backend, one at a time where no interpreter runs.
    return [pytest.param(*p.values, which, id=f"{p.id}-{which}",
                         marks=[*p.marks, *[pytest.mark.slow] * (which != "all" and p.values[1] == "triton")])
            for p in _backend_params() for which in ("all", *p.values[0].tensors)]


def _forward_backward(case, backend, leaves, views, dtype, grad: bool):
    leaves = {k: v.detach().to(dtype).requires_grad_(grad) for k, v in leaves.items()}
    outs = case.call({k: views[k](v) for k, v in leaves.items()}, backend)
    if not grad:
        return outs, {}
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.dtype)).sum() for o in outs)
    loss.backward()
    return outs, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("layout", LAYOUT_MAKERS)
@pytest.mark.parametrize("case,backend,which", _strided_params())
def test_strided_arguments_give_the_reference(case, backend, which, layout, assert_close):
    """Each tensor argument, and all at once, as a non-dense view: the audit of every pointer a
    kernel reads."""
    leaves, views = _views(case, layout, which)
    grad = backend not in case.no_grad_backends
    with torch.set_grad_enabled(grad):
        outs, grads = _forward_backward(case, backend, leaves, views, torch.float32, grad)
        ref_outs, ref_grads = _forward_backward(case, "reference", leaves, views, torch.float64, grad)
    for i, (a, e) in enumerate(zip(outs, ref_outs)):
        assert_close(a, e, dtype=torch.float32, name=f"output {i}")
    for name in grads:
        assert_close(grads[name], ref_grads[name], dtype=torch.float32, name=f"grad of {name}")


# --- Non-finite and huge values: never hidden, never invented ----------------------------------------

def _nonfinite_input(case: OpCase, value: float) -> dict:
    tensors = _random(case)
    first = next(iter(tensors))
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[tensors[first].numel() // 2] = value
    return tensors


# NumPy, under the interpreter, warns at each invalid operation the test means to make.
QUIET_NAN = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@QUIET_NAN
@pytest.mark.parametrize("value", (math.nan, math.inf, -math.inf), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("case,backend", _backend_params())
def test_nonfinite_inputs_propagate(case, backend, value):
    """Each output is non-finite wherever the reference's is, and finite wherever the reference's
    is (the attention's marks excepted: with +-inf they may turn a finite element NaN)."""
    tensors = _nonfinite_input(case, value)
    with torch.no_grad():
        outs = case.call(tensors, backend)
        expected = case.call({k: v.double() for k, v in tensors.items()}, "reference")
    for i, (a, e) in enumerate(zip(outs, expected)):
        bad_ref = ~torch.isfinite(e)
        assert bad_ref.any(), f"output {i}: the reference hides the non-finite input"
        assert (~torch.isfinite(a))[bad_ref].all(), f"output {i}: {backend} hides a non-finite value"
        if not (case.name == "attention" and backend in ("sdpa", "cpp") and math.isinf(value)):
            assert torch.equal(torch.isfinite(a), ~bad_ref), f"output {i}: {backend} invents non-finite values"
        ok = ~bad_ref
        torch.testing.assert_close(a[ok].double(), e[ok], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,backend", _backend_params())
def test_huge_values_give_the_reference(case, backend, assert_close):
    """Inputs near 1e15 (squares near 1e30: fine in float32, overflowing float16) are no cause for
    an overflow the reference does not have."""
    tensors = _random(case)
    first = next(iter(tensors))
    tensors[first] = tensors[first] * 1e15
    with torch.no_grad():
        outs = case.call(tensors, backend)
        expected = case.call({k: v.double() for k, v in tensors.items()}, "reference")
    for i, (a, e) in enumerate(zip(outs, expected)):
        assert_close(a, e, rtol=1e-4, name=f"output {i}")


ATTENTION_NAN_CASES = {
    "query_row": lambda qkv: qkv[0, 1, 0].fill_(math.nan),
    "key": lambda qkv: qkv[0, 2, 64].fill_(math.nan),
    "value_column": lambda qkv: qkv[1, 3, 128 + 5].fill_(math.nan),
    # Keys scoring -inf against every query: the softmax is 0/0.
    "all_keys_minus_inf": lambda qkv: (qkv[0, :, :32].fill_(1.0), qkv[0, :, 64:96].fill_(-math.inf)),
}


@QUIET_NAN
@pytest.mark.parametrize("how", ATTENTION_NAN_CASES)
@pytest.mark.parametrize("backend", [b for b in ("sdpa", "cpp", "triton", "auto") if _runnable(b)])
def test_attention_nan_matches_the_reference_exactly(backend, how):
    qkv = torch.randn(2, 5, 3 * 2 * 32)
    ATTENTION_NAN_CASES[how](qkv)
    expected = ops.attention(qkv.double(), 2, backend="reference")
    with torch.no_grad():
        got = ops.attention(qkv, 2, backend=backend)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    ok = torch.isfinite(expected)
    torch.testing.assert_close(got[ok].double(), expected[ok], rtol=1e-4, atol=1e-5)


@QUIET_NAN
@pytest.mark.parametrize("backend", [b for b in ("reference", "sdpa", "triton") if _runnable(b)])
def test_attention_nan_scale_gives_nan(backend):
    assert torch.isnan(ops.attention(torch.randn(1, 3, 3 * 32), 1, scale=math.nan, backend=backend)).all()


def test_sdpa_marks_under_compile_match_eager():
    """The compiled graph takes the branch-free marks; same NaN pattern as eager."""
    qkv = torch.randn(2, 5, 3 * 2 * 32)
    qkv[0, 1, 0] = math.nan
    compiled = torch.compile(lambda t: ops.attention(t, 2, backend="sdpa"), fullgraph=True, backend="aot_eager")
    got, expected = compiled(qkv), ops.attention(qkv, 2, backend="sdpa")
    assert torch.equal(torch.isnan(got), torch.isnan(expected)) and torch.isnan(got).any()


# --- The model ----------------------------------------------------------------------------------------

TINY = dict(TINY_HEAD32, num_classes=5)


@pytest.mark.parametrize("override,name", [
    (dict(head_dim=True), "head_dim"), (dict(num_classes=True), "num_classes"),
    (dict(mlp_ratio=0), "mlp_ratio"), (dict(mlp_ratio=math.nan), "mlp_ratio"),
    (dict(in_chans=0), "in_chans"), (dict(qk_scale=0), "qk_scale"), (dict(qk_scale=-1.0), "qk_scale"),
])
def test_model_config_errors_named(override, name):
    import uniformer_fast as uf
    with pytest.raises(ValueError, match=name):
        uf.UniFormer(**{**TINY, **override})


@pytest.mark.parametrize("bad", (True, -1, 2.0, "5"))
def test_reset_classifier_bad_value_leaves_the_model_intact(bad):
    import uniformer_fast as uf
    model = uf.UniFormer(**TINY)
    head = model.head
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(bad)
    assert model.num_classes == 5 and model.head is head


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_model_nan_input_gives_nan_logits_on_the_default_path(train):
    """One NaN pixel reaches every logit through the attention: on "auto" (cpp convs, sdpa,
    oneDNN linear in eval) as on the reference."""
    import uniformer_fast as uf
    model = uf.UniFormer(**TINY).train(train)
    x = torch.randn(2, 3, 4, 64, 64)
    x[0, 1, 2, 30, 30] = math.nan
    with torch.no_grad():
        got = model(x)
        with ops.use_backend("reference"):
            expected = model(x)
    assert torch.isnan(expected[0]).all()
    if train:  # batch statistics mix the clips: the NaN reaches every clip
        assert torch.isnan(got).all() and torch.isnan(expected).all()
    else:
        assert torch.equal(torch.isnan(got), torch.isnan(expected))
