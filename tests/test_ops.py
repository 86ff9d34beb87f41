import itertools

import pytest
import torch
import torch.nn.functional as F

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError


def naive_dwconv3d(x, w, b):
    """Depthwise conv by explicit shifted sums: independent of F.conv3d."""
    B, C, T, H, W = x.shape
    kt, kh, kw = w.shape[2:]
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt // 2, kt // 2))
    out = torch.zeros_like(x) if b is None else b.view(1, C, 1, 1, 1).expand_as(x).clone()
    for dt, dh, dw in itertools.product(range(kt), range(kh), range(kw)):
        out += w[:, 0, dt, dh, dw].view(1, C, 1, 1, 1) * xp[:, :, dt:dt + T, dh:dh + H, dw:dw + W]
    return out


def naive_attention(qkv, heads, scale):
    B, N, C3 = qkv.shape
    d = C3 // 3 // heads
    out = []
    for h in range(heads):
        q = qkv[..., 0 * heads * d + h * d: 0 * heads * d + (h + 1) * d]
        k = qkv[..., 1 * heads * d + h * d: 1 * heads * d + (h + 1) * d]
        v = qkv[..., 2 * heads * d + h * d: 2 * heads * d + (h + 1) * d]
        logits = torch.einsum("bnd,bmd->bnm", q, k) * scale
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        out.append(torch.einsum("bnm,bmd->bnd", p / p.sum(-1, keepdim=True), v))
    return torch.cat(out, -1)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 4, 5, 6), (1, 5, 1, 7, 3)])
@pytest.mark.parametrize("kernel", [(3, 3, 3), (5, 5, 5), (1, 3, 3), (3, 1, 1), (7, 5, 1)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dwconv3d_reference_matches_naive(shape, kernel, residual, with_bias, assert_close):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn((shape[1], 1) + kernel, dtype=torch.float64)
    b = torch.randn(shape[1], dtype=torch.float64) if with_bias else None
    expected = naive_dwconv3d(x, w, b) + (x if residual else 0)
    assert_close(ops.dwconv3d(x, w, b, residual=residual, backend="reference"), expected)


def test_dwconv3d_keeps_channels_last(assert_close):
    x = torch.randn(2, 8, 3, 5, 4, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 1, 3, 3, 3, dtype=torch.float64)
    y = ops.dwconv3d(x, w, None, residual=True)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(y, naive_dwconv3d(x, w, None) + x)


@pytest.mark.parametrize("B,N,heads,head_dim", [(1, 1, 1, 8), (2, 13, 3, 4), (1, 37, 2, 16)])
def test_attention_reference_matches_naive(B, N, heads, head_dim, assert_close):
    qkv = torch.randn(B, N, 3 * heads * head_dim, dtype=torch.float64)
    out = ops.attention(qkv, heads, backend="reference")
    assert out.shape == (B, N, heads * head_dim)
    assert_close(out, naive_attention(qkv, heads, head_dim ** -0.5))
    assert_close(ops.attention(qkv, heads, scale=0.3), naive_attention(qkv, heads, 0.3))


def test_attention_dropout_only_when_asked():
    qkv = torch.randn(2, 9, 24)
    assert torch.equal(ops.attention(qkv, 2), ops.attention(qkv, 2, dropout_p=0.0))
    assert not torch.equal(ops.attention(qkv, 2), ops.attention(qkv, 2, dropout_p=0.5))


def test_backend_selection_scopes():
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"
    ops.set_backend("reference")
    try:
        assert ops.get_backend() == "reference"
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
    finally:
        ops.set_backend("auto")


@pytest.mark.parametrize("bad", ["fast", "", None, 3])
def test_unknown_backend_names_are_rejected(bad):
    with pytest.raises(ValueError, match="must be one of"):
        ops.set_backend(bad)
    with pytest.raises(ValueError, match="must be one of"):
        with ops.use_backend(bad):
            pass
    if bad is not None:  # None means "the backend in force"
        with pytest.raises(ValueError, match="must be one of"):
            ops.dwconv3d(torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3), backend=bad)


def test_backend_asked_by_name_never_falls_back():
    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3)
    qkv = torch.randn(1, 4, 12)
    for op, call in (("dwconv3d", lambda **kw: ops.dwconv3d(x, w, **kw)),
                     ("attention", lambda **kw: ops.attention(qkv, 1, **kw))):
        for backend in ops.BACKENDS:
            if backend == "auto" or backend in ops.available_backends(op):
                continue
            with pytest.raises(BackendUnavailableError, match=f"{op}: backend '{backend}'"):
                call(backend=backend)
            with ops.use_backend(backend, op=op), pytest.raises(BackendUnavailableError, match=backend):
                call()


def test_whole_model_choice_applies_to_ops_that_have_it():
    with ops.use_backend("sdpa"):
        assert ops.get_backend("attention") == "sdpa"
        assert ops.get_backend("dwconv3d") == "auto"  # no sdpa depthwise conv: its default holds
        assert ops.get_backend() == "sdpa"
    with ops.use_backend("reference"):
        assert {ops.get_backend(op) for op in ("attention", "dwconv3d", "linear")} == {"reference"}
    ops.set_backend("cpp")
    try:
        assert ops.get_backend("dwconv3d") == "cpp" and ops.get_backend("attention") == "cpp"
        assert ops.get_backend("dpe_layernorm") == "auto"  # no cpp implementation: its default holds
    finally:
        ops.set_backend("auto")


def test_named_backend_that_cannot_run_says_why():
    from uniformer_fast.ops import backend as registry
    registry.define_op("_probe", auto={"cpu": ("cpp", "reference")}, prepare=lambda x: (x,))
    registry.register("_probe", "reference")(lambda x: x + 1)
    registry.register("_probe", "cpp", why_not=lambda x: "needs an even size" if x.numel() % 2 else None)(
        lambda x: x + 2)
    odd, even = torch.zeros(3), torch.zeros(2)
    with pytest.raises(BackendUnavailableError, match="cannot run this call: needs an even size"):
        registry.resolve("_probe", "cpp", odd.device, odd)
    # "auto" takes the first capable backend in the op's order for the device.
    assert registry.resolve("_probe", "auto", odd.device, odd)[0] == "reference"
    assert registry.resolve("_probe", "auto", even.device, even)[0] == "cpp"
    # dispatch runs what backend_for names, for any op, without the op's own probe.
    assert registry.backend_for("_probe", odd) == "reference" and registry.backend_for("_probe", even) == "cpp"
    assert torch.equal(registry.dispatch("_probe", None, odd), odd + 1)
    assert torch.equal(registry.dispatch("_probe", None, even), even + 2)
    with pytest.raises(BackendUnavailableError, match="cannot run this call: needs an even size"):
        registry.backend_for("_probe", odd, backend="cpp")


def test_backend_for_names_the_backend_a_call_takes():
    """ops.backend_for takes the op's function or name, validates as the call would, runs nothing."""
    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3)
    with ops.use_backend("reference"):
        assert ops.backend_for(ops.dwconv3d, x, w) == ops.backend_for("dwconv3d", x, w) == "reference"
    assert ops.backend_for(ops.attention, torch.randn(1, 4, 12), 1, backend="sdpa") == "sdpa"
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.backend_for(ops.dwconv3d, x, w[:1])
    with pytest.raises(ValueError, match="op must be one of"):
        ops.backend_for("conv", x, w)


def test_triton_availability_reason():
    from uniformer_fast.kernels import HAS_TRITON, INTERPRET, why_not_triton
    x = torch.zeros(1)
    reason = why_not_triton(x)
    if not HAS_TRITON:
        assert "not installed" in reason
    elif INTERPRET:
        assert reason is None
    else:
        assert "TRITON_INTERPRET" in reason


C = 4
GOOD_X = dict(x=torch.randn(1, C, 3, 3, 3))


@pytest.mark.parametrize("x,w,b,err,match", [
    (torch.randn(C, 3, 3, 3), torch.randn(C, 1, 3, 3, 3), None, ValueError, r"x must be 5-D .*\(B, C, T, H, W\)"),
    ([1.0], torch.randn(C, 1, 3, 3, 3), None, TypeError, "x must be a torch.Tensor"),
    (torch.ones(1, C, 3, 3, 3, dtype=torch.int64), torch.randn(C, 1, 3, 3, 3), None, TypeError, "x must be float"),
    (GOOD_X["x"], torch.randn(C, 1, 3, 3), None, ValueError, r"weight must be 5-D .*\(4, 1, kt, kh, kw\)"),
    (GOOD_X["x"], torch.randn(C + 1, 1, 3, 3, 3), None, ValueError, r"weight must have shape \(4, 1, kt, kh, kw\)"),
    (GOOD_X["x"], torch.randn(C, 1, 3, 2, 3), None, ValueError, "odd kt, kh, kw"),
    (GOOD_X["x"], torch.randn(C, 1, 9, 3, 3), None, ValueError, "odd kt, kh, kw <= 7"),
    (GOOD_X["x"], torch.randn(C, 1, 3, 3, 3, dtype=torch.float64), None, TypeError, "weight must have the dtype of x"),
    (GOOD_X["x"], torch.randn(C, 1, 3, 3, 3), torch.randn(C + 1), ValueError, r"bias must have shape \(4,\)"),
    (GOOD_X["x"], torch.randn(C, 1, 3, 3, 3), torch.randn(C).half(), TypeError, "bias must have the dtype of x"),
    (torch.randn(0, C, 3, 3, 3), torch.randn(C, 1, 3, 3, 3), None, ValueError, "x must not be empty"),
])
def test_dwconv3d_bad_input(x, w, b, err, match):
    with pytest.raises(err, match=match):
        ops.dwconv3d(x, w, b)


def test_dwconv3d_bad_residual_and_device():
    x, w = torch.randn(1, C, 3, 3, 3), torch.randn(C, 1, 3, 3, 3)
    with pytest.raises(TypeError, match="residual must be a bool"):
        ops.dwconv3d(x, w, residual=1)
    with pytest.raises(ValueError, match="weight must be on the device of x"):
        ops.dwconv3d(x, w.to("meta"))


@pytest.mark.parametrize("qkv,heads,kw,err,match", [
    (torch.randn(2, 12), 1, {}, ValueError, r"qkv must be 3-D of shape \(B, N, 3 \* num_heads \* head_dim\)"),
    (torch.randn(1, 4, 12), 5, {}, ValueError, "a positive multiple of 3 \\* num_heads = 15"),
    (torch.randn(1, 4, 12), 0, {}, ValueError, "num_heads must be a positive int"),
    (torch.randn(1, 4, 12), 2.0, {}, ValueError, "num_heads must be a positive int"),
    (torch.ones(1, 4, 12, dtype=torch.int32), 1, {}, TypeError, "qkv must be float"),
    (torch.randn(1, 0, 12), 1, {}, ValueError, "N >= 1"),
    (torch.randn(1, 4, 12), 1, {"scale": "x"}, TypeError, "scale must be a float"),
    (torch.randn(1, 4, 12), 1, {"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\)"),
])
def test_attention_bad_input(qkv, heads, kw, err, match):
    with pytest.raises(err, match=match):
        ops.attention(qkv, heads, **kw)


def test_backend_per_op_scopes():
    with ops.use_backend("reference", op="attention"):
        assert ops.get_backend("attention") == "reference"
        assert ops.get_backend("dwconv3d") == "auto"
        with ops.use_backend("auto"):  # a whole-model choice overrides per-op ones outside it
            assert ops.get_backend("attention") == "auto"
        with ops.use_backend("sdpa", op="dwconv3d"):
            assert ops.get_backend("attention") == "reference"
            assert ops.get_backend("dwconv3d") == "sdpa"
    assert ops.get_backend("attention") == "auto"
    with pytest.raises(ValueError, match="op must be one of"):
        with ops.use_backend("reference", op="conv"):
            pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_follow_autocast(dtype, assert_close):
    x, w, b = torch.randn(1, 4, 3, 5, 5), torch.randn(4, 1, 3, 3, 3), torch.randn(4)
    qkv = torch.randn(2, 7, 24)
    with torch.autocast("cpu", dtype=dtype):
        y = ops.dwconv3d(x.to(dtype), w, b, residual=True)  # low-precision activations, fp32 params
        o = ops.attention(qkv, 2)
    assert y.dtype == dtype and o.dtype == dtype
    assert_close(y, naive_dwconv3d(x.double(), w.double(), b.double()) + x.double(), dtype=dtype)
    assert_close(o, naive_attention(qkv.double(), 2, 4 ** -0.5), dtype=dtype)
