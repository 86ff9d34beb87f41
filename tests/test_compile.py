"""The fused ops as registered custom ops: opcheck, and torch.compile(fullgraph=True) of the model."""
import importlib

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast import ops
from uniformer_fast.kernels import HAS_TRITON, INTERPRET

# The modules, not the public functions of the same names that uniformer_fast.ops exports.
attention_mod = importlib.import_module("uniformer_fast.ops.attention")
dwconv_mod = importlib.import_module("uniformer_fast.ops.dwconv3d")

needs_cpp = pytest.mark.skipif(dwconv_mod._cpp is None, reason="the C++ extension is not built")
needs_triton = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="triton interpreter not available")

# head_dim 32: a size the triton attention supports; tiny so the interpreter stays quick.
TINY = dict(depth=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), head_dim=32, num_classes=5)


def channels_last(*shape):
    return torch.randn(shape).to(memory_format=torch.channels_last_3d)


def dwconv_cases():
    x, gy = channels_last(2, 5, 3, 4, 3), channels_last(2, 5, 3, 4, 3)
    w, b = torch.randn(5, 1, 3, 3, 3), torch.randn(5)
    taps = w.reshape(5, -1).t().contiguous()
    return [
        pytest.param("dwconv3d_cpp_fwd", (x, w, b, True, False), marks=needs_cpp, id="cpp_fwd"),
        pytest.param("dwconv3d_cpp_fwd", (gy, w, None, False, True), marks=needs_cpp, id="cpp_fwd_flip"),
        pytest.param("dwconv3d_cpp_bwd", (x, gy, w, True, True), marks=needs_cpp, id="cpp_bwd"),
        pytest.param("dwconv3d_cpp_bwd", (x, gy, w, False, False), marks=needs_cpp, id="cpp_bwd_weight_only"),
        pytest.param("dwconv3d_triton_fwd", (x, taps, b, True, [3, 3, 3]), marks=needs_triton, id="triton_fwd"),
        pytest.param("dwconv3d_triton_bwd_dw", (x, gy, [3, 3, 3]), marks=needs_triton, id="triton_bwd_dw"),
    ]


def attention_cases():
    qkv = torch.randn(1, 5, 3 * 2 * 32)
    out, lse = attention_mod.attention_triton_fwd(qkv, 2, 0.2) if HAS_TRITON and INTERPRET else (None, None)
    return [
        pytest.param("attention_triton_fwd", (qkv, 2, 0.2), marks=needs_triton, id="attention_fwd"),
        pytest.param("attention_triton_bwd", (torch.randn(1, 5, 64), qkv, out, lse, 2, 0.2), marks=needs_triton,
                     id="attention_bwd"),
    ]


def linear_cases():
    linear_mod = importlib.import_module("uniformer_fast.ops.linear")
    needs_onednn = pytest.mark.skipif(linear_mod._ONEDNN_LINEAR is None, reason="no oneDNN linear")
    x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    return [pytest.param("linear_onednn", (x, w, b, "gelu"), marks=needs_onednn, id="onednn_gelu"),
            pytest.param("linear_onednn", (x, w, None, "none"), marks=needs_onednn, id="onednn")]


@pytest.mark.parametrize("name,args", dwconv_cases() + attention_cases() + linear_cases())
def test_opcheck(name, args):
    """Schema, fake (meta) implementation, and dispatch through AOT autograd all agree."""
    torch.library.opcheck(getattr(torch.ops.uniformer_fast, name).default, args)


def _compare_compiled(model, x, compile_backend, assert_close):
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    y = compiled(x)
    y.logsumexp(-1).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.logsumexp(-1).sum().backward()
    assert_close(y, expected, rtol=1e-5, name="logits")
    # Inductor reorders float32 reductions, and some gradients are sums that nearly cancel
    # (e.g. a stage-4 DPE bias: ~1e-6 against ~1e-1 elsewhere), so each gradient is held to
    # float32 noise relative to the largest gradient of the model, not to its own size.
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), g in zip(model.named_parameters(), grads):
        assert torch.isfinite(g).all(), name
        err = (g - p.grad).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max abs error {err:.2e} > 1e-5 x {scale:.2e}"


@needs_cpp
def test_compile_fullgraph_cpu_fast_path(assert_close):
    """Inductor on the CPU with what "auto" runs there (cpp depthwise conv, sdpa attention)."""
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY)
    x = torch.randn(2, 3, 4, 64, 64)
    picked = {op: ops.backend.resolve(op, "auto", x.device, *args)[0] for op, args in (
        ("dwconv3d", (x[:, :1], torch.empty(1, 1, 3, 3, 3), None, True)),
        ("attention", (torch.empty(1, 2, 96), 1, 0.1, 0.0)))}
    assert picked == {"dwconv3d": "cpp", "attention": "sdpa"}
    _compare_compiled(model, x, "inductor", assert_close)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_compile_fullgraph_triton(device, assert_close):
    """The Triton kernels as opaque ops in a full graph, forward and backward: interpreted on the
    CPU (AOT autograd only: inductor adds nothing to opaque ops), compiled by inductor on CUDA."""
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY).to(device)
    with ops.use_backend("triton"):
        _compare_compiled(model, torch.randn(2, 3, 2, 32, 32, device=device),
                          "aot_eager" if device.type == "cpu" else "inductor", assert_close)


def test_compile_recompiles_when_the_backend_changes():
    calls = []
    real = dwconv_mod.dwconv3d_reference

    def spy(*args):
        calls.append(1)
        return real(*args)

    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3)
    compiled = torch.compile(lambda x, w: ops.dwconv3d(x, w), fullgraph=True, backend="eager")
    ops.backend._OPS["dwconv3d"].impls["reference"] = ops.backend._Impl(spy, lambda *a: None)
    try:
        with ops.use_backend("reference"):
            compiled(x, w)
        n = len(calls)
        assert n > 0
        with ops.use_backend("cpp" if dwconv_mod._cpp is not None else "reference"):
            compiled(x, w)
        assert (len(calls) == n) == (dwconv_mod._cpp is not None)
    finally:
        ops.backend._OPS["dwconv3d"].impls["reference"] = ops.backend._Impl(real, lambda *a: None)


@pytest.mark.parametrize("mode", (torch.no_grad, torch.inference_mode), ids=("no_grad", "inference_mode"))
def test_compile_fullgraph_cpu_inference(mode, assert_close):
    """Inference graph on the CPU under the default compiler (inductor): cpp depthwise conv, sdpa
    and the oneDNN linear + GELU (an opaque op: inductor's own lowering of it rejects an unpacked
    weight), no break, equal to eager."""
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY).eval()
    x = torch.randn(2, 3, 4, 64, 64)
    with mode():
        assert ops.backend.resolve("linear", "auto", x.device, x[0, 0], torch.empty(3, 64), None, "gelu")[0] == "cpp"
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    assert_close(got, expected, rtol=1e-5)
