"""Attention backends ("triton" fused kernels, "cpp" CPU kernel, "sdpa") against a float64 reference.

On the CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set in conftest.py);
with UNIFORMER_FAST_TEST_DEVICE=cuda the compiled kernels run. Shapes are small: the interpreter
costs ~0.1 ms per op per program.
"""
import copy

import math

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError
from uniformer_fast.ops import backend as registry
from uniformer_fast.ops.reference import attention_reference

from helpers import attention_rtol, cpp_attention_why_not, needs_triton


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_fwd_bwd(qkv, num_heads, scale, dout):
    """Output and dqkv in float64 from the same (rounded) inputs."""
    x = qkv.detach().double().requires_grad_()
    out = attention_reference(x, num_heads, scale)
    out.backward(dout.double())
    return out.detach(), x.grad


# (B, N, heads, head_dim): N = 1; prime N; N just over the interpreter's blocks (32 rows, 16 keys)
# for every loop of both kernels; several heads; head_dim 28 (padded to 32), 32, 64.
SHAPES = [(1, 1, 1, 32), (2, 37, 2, 28), (1, 33, 3, 64), (2, 17, 2, 32)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,heads,head_dim", SHAPES)
def test_triton_kernels_match_reference(B, N, heads, head_dim, dtype, device, assert_close, empty):
    from uniformer_fast.kernels.attention import attention_bwd, attention_fwd
    C = heads * head_dim
    qkv = torch.randn(B, N, 3 * C, device=device).to(dtype)
    dout = torch.randn(B, N, C, device=device).to(dtype)
    scale = head_dim ** -0.5
    # NaN-filled outputs: an element a kernel fails to write fails the comparison.
    out, lse = attention_fwd(qkv, heads, scale, out=empty(B, N, C, dtype=dtype, device=device),
                             lse=empty(B, heads, N, dtype=torch.float32, device=device))
    dqkv = attention_bwd(dout, qkv, out, lse, heads, scale,
                         dqkv=empty(B, N, 3 * C, dtype=dtype, device=device))
    ref_out, ref_dqkv = reference_fwd_bwd(qkv, heads, scale, dout)
    rtol = attention_rtol(dtype)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert_close(out, ref_out, rtol=rtol, name="out")
    assert_close(dqkv, ref_dqkv, rtol=rtol, name="dqkv")
    if N > 1:  # with one key, dq and dk are exactly 0 and only rounding remains
        for i, name in enumerate(("dq", "dk", "dv")):
            assert_close(dqkv[..., i * C:(i + 1) * C], ref_dqkv[..., i * C:(i + 1) * C], rtol=rtol,
                         name=name)
    # lse is log2 of the softmax denominator of the scaled logits
    q, k = qkv.double().view(B, N, 3, heads, head_dim).unbind(2)[:2]
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    assert_close(lse, torch.logsumexp(logits, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64)),
                 rtol=1e-5 if dtype == torch.float32 else 1e-2, name="lse")


@needs_triton
@pytest.mark.parametrize("kind,dtype", [("16bit", torch.bfloat16), ("tf32", torch.float32),
                                        ("ieee", torch.float32)])
def test_triton_gpu_block_sizes_match_reference(kind, dtype, device, assert_close):
    """The GPU configs' block shapes, run here too: N = 130 crosses every 128-row block edge."""
    from uniformer_fast.kernels.attention import (BWD_CONFIGS, FWD_CONFIGS, attention_bwd,
                                                  attention_fwd)
    B, N, heads, head_dim = 1, 130, 1, 64
    qkv = torch.randn(B, N, 3 * heads * head_dim, device=device).to(dtype)
    dout = torch.randn(B, N, heads * head_dim, device=device).to(dtype)
    scale = head_dim ** -0.5
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if kind == "tf32" else "highest")
    try:
        out, lse = attention_fwd(qkv, heads, scale, config=FWD_CONFIGS[kind, "long"])
        dqkv = attention_bwd(dout, qkv, out, lse, heads, scale, config=BWD_CONFIGS[kind, "long"])
    finally:
        torch.set_float32_matmul_precision(saved)
    ref_out, ref_dqkv = reference_fwd_bwd(qkv, heads, scale, dout)
    # Under the interpreter tf32 is exact float32; on a GPU the tf32 config needs tf32's tolerance.
    rtol = 2e-3 if kind == "tf32" and device.type == "cuda" else attention_rtol(dtype)
    assert_close(out, ref_out, rtol=rtol, name="out")
    assert_close(dqkv, ref_dqkv, rtol=rtol, name="dqkv")


@needs_triton
def test_float32_matmul_precision_follows_torch_setting():
    from uniformer_fast.kernels.attention import dot_precision, fp32_input_precision
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fp32_input_precision() == "ieee" and dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert fp32_input_precision() == "tf32" and dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "ieee"  # ignored by 16-bit dots; one compile
    finally:
        torch.set_float32_matmul_precision(saved)


@needs_triton
def test_triton_masked_keys_with_very_negative_logits(device, assert_close):
    """All logits near -400: exp(s - lse) of a zero-filled tail key would overflow to inf (and
    inf * 0 = NaN) unless the tail keys are masked in the backward too."""
    N, heads, head_dim = 17, 1, 32
    u = torch.nn.functional.normalize(torch.randn(head_dim), dim=0) * 20
    q = u.expand(N, head_dim) + 0.1 * torch.randn(N, head_dim)
    k = -u.expand(N, head_dim) + 0.1 * torch.randn(N, head_dim)
    v = torch.randn(N, head_dim)
    qkv = torch.cat([q, k, v], -1)[None].to(device).requires_grad_()
    out = ops.attention(qkv, heads, scale=1.0, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out, ref_dqkv = reference_fwd_bwd(qkv, heads, 1.0, dout)
    # 1e-4: float32 logits of size 400 carry ~3e-5 absolute rounding into the exponent.
    assert_close(out, ref_out, rtol=1e-4, name="out")
    assert_close(qkv.grad, ref_dqkv, rtol=1e-4, name="dqkv")


# triton with float32: tests/test_op_contracts.py (the same check, with the other ops' contract).
@pytest.mark.parametrize("backend,dtype", [pytest.param("sdpa", torch.float32, id="float32-sdpa"),
                                           pytest.param("sdpa", torch.bfloat16, id="bfloat16-sdpa"),
                                           pytest.param("triton", torch.bfloat16, marks=needs_triton,
                                                        id="bfloat16-triton")])
def test_public_op_autograd_matches_reference(backend, dtype, device, assert_close):
    B, N, heads, head_dim = 2, 19, 2, 32
    qkv = torch.randn(B, N, 3 * heads * head_dim, device=device).to(dtype).requires_grad_()
    out = ops.attention(qkv, heads, scale=0.2, backend=backend)
    out.sum().backward()  # a stride-0 gradient reaches the backward
    ref_out, ref_dqkv = reference_fwd_bwd(qkv, heads, 0.2, torch.ones_like(out))
    rtol = attention_rtol(dtype) if backend == "triton" else {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}[dtype]
    assert out.shape == (B, N, heads * head_dim) and out.dtype == dtype
    assert_close(out, ref_out, rtol=rtol, name="out")
    assert_close(qkv.grad, ref_dqkv, rtol=rtol, name="dqkv")


@pytest.mark.parametrize("B,N,heads,head_dim", [(1, 1, 1, 8), (2, 37, 3, 28), (1, 33, 2, 64)])
def test_sdpa_matches_reference_float64(B, N, heads, head_dim, assert_close):
    qkv = torch.randn(B, N, 3 * heads * head_dim, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, N, heads * head_dim, dtype=torch.float64)
    out = ops.attention(qkv, heads, backend="sdpa")
    out.backward(dout)
    ref_out, ref_dqkv = reference_fwd_bwd(qkv, heads, head_dim ** -0.5, dout)
    assert_close(out, ref_out)
    assert_close(qkv.grad, ref_dqkv)


def test_sdpa_dropout_runs_and_drops():
    qkv = torch.randn(2, 16, 3 * 2 * 32)
    plain = ops.attention(qkv, 2, backend="sdpa")
    dropped = ops.attention(qkv, 2, dropout_p=0.5, backend="sdpa")
    assert dropped.shape == plain.shape and torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, plain)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "sdpa"])
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_strided_qkv(backend, layout, device, assert_close):
    """A slice of a larger buffer is read in place; a feature-strided view is copied first."""
    B, N, heads, head_dim = 2, 21, 2, 32
    C3 = 3 * heads * head_dim
    if layout == "sliced":
        base = torch.randn(B, 2 * N, C3 + 16, device=device, requires_grad=True)
        qkv = base[:, 1::2, 8:8 + C3]
    else:
        base = torch.randn(B, C3, N, device=device, requires_grad=True)
        qkv = base.transpose(1, 2)
    assert not qkv.is_contiguous()
    dout = torch.randn(B, N, C3 // 3, device=device)
    out = ops.attention(qkv, heads, backend=backend)
    out.backward(dout)
    ref_out, ref_dqkv = reference_fwd_bwd(qkv, heads, head_dim ** -0.5, dout)
    assert_close(out, ref_out, rtol=attention_rtol(torch.float32))
    grad = base.grad[:, 1::2, 8:8 + C3] if layout == "sliced" else base.grad.transpose(1, 2)
    assert_close(grad, ref_dqkv, rtol=attention_rtol(torch.float32))
    if layout == "sliced":  # the rest of the buffer gets no gradient
        assert base.grad[:, 0::2].abs().sum() == 0 and base.grad[..., :8].abs().sum() == 0


@pytest.mark.parametrize("shape,dtype,heads,kw,err,match", [
    ((2, 3 * 32), torch.float32, 1, {}, ValueError,
     r"qkv must be 3-D of shape \(B, N, 3 \* num_heads \* head_dim\)"),
    ((1, 2, 4, 96), torch.float32, 1, {}, ValueError, "qkv must be 3-D"),
    ((1, 4, 96), torch.float32, 5, {}, ValueError, r"a positive multiple of 3 \* num_heads = 15"),
    ((1, 4, 100), torch.float32, 2, {}, ValueError, r"a positive multiple of 3 \* num_heads = 6"),
    ((1, 4, 96), torch.int64, 1, {}, TypeError, "qkv must be float"),
    ((1, 4, 3 * 48), torch.float32, 1, {"backend": "triton"}, BackendUnavailableError,
     r"head_dim = qkv.shape\[-1\] // \(3 \* num_heads\) must be one of 28, 32, 64; got 48"),
    ((1, 4, 3 * 2 * 16), torch.float32, 2, {"backend": "triton"}, BackendUnavailableError, "got 16"),
    ((1, 4, 96), torch.float64, 1, {"backend": "triton"}, BackendUnavailableError,
     "qkv must be float16, bfloat16 or float32; got torch.float64"),
    ((1, 4, 96), torch.float32, 1, {"backend": "triton", "dropout_p": 0.1}, BackendUnavailableError,
     r"backend 'triton' cannot run this call: dropout .* not supported"),
])
@needs_triton
def test_attention_bad_input(shape, dtype, heads, kw, err, match, device):
    qkv = torch.ones(shape, dtype=dtype, device=device)
    with pytest.raises(err, match=match):
        ops.attention(qkv, heads, **kw)


@needs_triton
def test_triton_rejects_other_devices():
    qkv = torch.randn(1, 4, 96, device="meta")
    with pytest.raises(BackendUnavailableError, match="need CUDA tensors; got a tensor on meta"):
        registry.resolve("attention", "triton", qkv.device, qkv, 1, 0.2, 0.0)


@needs_triton
def test_auto_prefers_triton_on_cuda_and_takes_sdpa_for_dropout(device):
    qkv = torch.randn(1, 4, 96, device=device)
    cuda = torch.device("cuda")  # only the preference order is taken from the device
    assert registry.resolve("attention", "auto", cuda, qkv, 1, 0.2, 0.0)[0] == "triton"
    assert registry.resolve("attention", "auto", cuda, qkv, 1, 0.2, 0.1)[0] == "sdpa"
    assert registry.resolve("attention", "auto", cuda, qkv.double(), 1, 0.2, 0.0)[0] == "sdpa"
    cpu = qkv.cpu().requires_grad_()  # training: the CPU kernel is inference-only
    assert registry.resolve("attention", "auto", cpu.device, cpu, 1, 0.2, 0.0)[0] == "sdpa"


# ---- the model's blocks on each backend ----------------------------------------------------------

def _block_grads(block, x, backend):
    x = x.detach().clone().requires_grad_()
    with ops.use_backend(backend, op="attention"):
        y = block(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y))
    grads = {name: p.grad for name, p in block.named_parameters() if "attn" in name}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "sdpa"])
@pytest.mark.parametrize("block_cls", ["SABlock", "SplitSABlock"])
def test_blocks_match_reference(block_cls, backend, device, assert_close):
    from uniformer_fast import model
    dim, heads = 64, 2  # head_dim 32
    block = getattr(model, block_cls)(dim, heads).to(device).train()
    x = torch.randn(2, dim, 3, 3, 2, device=device).contiguous(memory_format=torch.channels_last_3d)
    ref_block = copy.deepcopy(block).double()
    y, dx, grads = _block_grads(block, x, backend)
    ref_y, ref_dx, ref_grads = _block_grads(ref_block, x.double(), "reference")
    assert_close(y, ref_y, rtol=1e-5, name="y")
    assert_close(dx, ref_dx, rtol=1e-5, name="dx")
    assert set(grads) == set(ref_grads) and grads
    for name in grads:
        assert_close(grads[name], ref_grads[name], rtol=1e-5, name=f"grad {name}")


@needs_triton
def test_block_with_attention_dropout_rejects_triton_by_name(device):
    from uniformer_fast import model
    block = model.SABlock(64, 2, attn_drop=0.1).to(device).train()
    x = torch.randn(1, 64, 2, 2, 2, device=device).contiguous(memory_format=torch.channels_last_3d)
    with ops.use_backend("triton", op="attention"), pytest.raises(BackendUnavailableError, match="dropout"):
        block(x)
    block.eval()  # no dropout in eval mode: the fused kernel runs
    with ops.use_backend("triton", op="attention"):
        assert torch.isfinite(block(x)).all()


# ---- "cpp": the CPU inference kernel (csrc/attention.cpp) ----------------------------------------

def _needs_cpp_attention(dtype):
    reason = cpp_attention_why_not(dtype)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def _cpp_isa_case(dtype, isa):
    """A (dtype, kernel instruction set) case, skipped where this CPU or build cannot run it."""
    from uniformer_fast.ops import extension
    if isa not in extension.supported_isas():  # empty without the extension
        reason = f"needs the C++ extension on a CPU with {isa}"
    else:
        with extension.use_isa(isa):
            reason = cpp_attention_why_not(dtype)
    name = str(dtype).removeprefix("torch.")
    return pytest.param(dtype, isa, marks=pytest.mark.skipif(reason is not None, reason=str(reason)),
                        id=f"{name}-{isa}")


# Every kernel: float32 and bfloat16 on AVX-512, float32 on AVX2 (the kernels' instruction set, as
# UNIFORMER_FAST_ISA sets it).
CPP_CASES = [_cpp_isa_case(torch.float32, "avx512"), _cpp_isa_case(torch.bfloat16, "avx512"),
             _cpp_isa_case(torch.float32, "avx2")]
CPP_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def cpp_isa(request):
    """Runs the test with the C++ kernels' instruction set ``isa`` (from the dtype,isa parameters)."""
    from uniformer_fast.ops import extension
    with extension.use_isa(request.getfixturevalue("isa")):
        yield


# (B, N, heads, head_dim): one token; N below, at and past the 6-query blocks and the 16-, 32- and
# 64-key panels, odd N (a bfloat16 key pair half padding); head_dim 32, 64 (the model's), 96 and 256.
CPP_SHAPES = [(1, 1, 1, 32), (2, 7, 2, 64), (1, 8, 1, 32), (1, 33, 3, 64), (2, 32, 1, 96), (1, 65, 2, 256),
              (3, 100, 2, 64)]


@pytest.mark.parametrize("dtype,isa", CPP_CASES)
@pytest.mark.parametrize("B,N,heads,head_dim", CPP_SHAPES)
def test_cpp_matches_reference_float64(B, N, heads, head_dim, dtype, isa, cpp_isa, assert_close):
    qkv = torch.randn(B, N, 3 * heads * head_dim).to(dtype)
    scale = head_dim ** -0.5
    with torch.no_grad():
        out = ops.attention(qkv, heads, backend="cpp")
    expected = attention_reference(qkv.double(), heads, scale)
    assert out.shape == (B, N, heads * head_dim) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expected, rtol=CPP_RTOL[dtype])


@pytest.mark.parametrize("dtype,isa", CPP_CASES)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_cpp_strided_qkv(layout, dtype, isa, cpp_isa, assert_close):
    """Batch and token strides are read in place; a feature-strided view is copied first."""
    B, N, heads, head_dim = 2, 21, 2, 32
    C3 = 3 * heads * head_dim
    if layout == "sliced":
        qkv = torch.randn(B, 2 * N, C3 + 16).to(dtype)[:, 1::2, 8:8 + C3]
    else:
        qkv = torch.randn(B, C3, N).to(dtype).transpose(1, 2)
    assert not qkv.is_contiguous()
    with torch.no_grad():
        out = ops.attention(qkv, heads, backend="cpp")
    assert_close(out, attention_reference(qkv.double(), heads, head_dim ** -0.5), rtol=CPP_RTOL[dtype])


@pytest.mark.parametrize("dtype,isa", CPP_CASES)
def test_cpp_extreme_logits(dtype, isa, cpp_isa, assert_close):
    """Logits spread over +-400 (softmax rows of one dominant key and keys far below float32's
    exp range) and a row of exactly equal logits."""
    B, N, heads, head_dim = 1, 40, 1, 32
    qkv = torch.randn(B, N, 3 * head_dim)
    qkv[..., :head_dim] *= 20
    qkv[0, 3, :head_dim] = 0  # every logit 0: uniform weights
    qkv = qkv.to(dtype)
    with torch.no_grad():
        out = ops.attention(qkv, heads, scale=1.0, backend="cpp")
    expected = attention_reference(qkv.double(), heads, 1.0)
    assert_close(out, expected, rtol=1e-4 if dtype == torch.float32 else CPP_RTOL[dtype])
    assert_close(out[0, 3], qkv[0, :, 2 * head_dim:].double().mean(0), rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype,isa", CPP_CASES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e15], ids=["nan", "inf", "-inf", "1e15"])
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_cpp_nonfinite_and_huge_inputs(dtype, isa, cpp_isa, value, where):
    """One element NaN, +-inf or 1e15 (in a query, a key or a value of batch 1): non-finite
    wherever the float64 reference is (the marks may add NaN with +-inf, as for "sdpa"), never
    hiding one; with 1e15, the reference's values (a one-hot softmax row)."""
    B, N, heads, head_dim = 2, 30, 2, 32
    qkv = torch.randn(B, N, 3 * heads * head_dim)
    qkv[1, 7, {"query": 3, "key": 64 + 3, "value": 128 + 3}[where]] = value
    qkv = qkv.to(dtype)
    with torch.no_grad():
        out = ops.attention(qkv, heads, backend="cpp").double()
    expected = attention_reference(qkv.double(), heads, head_dim ** -0.5)
    bad = ~torch.isfinite(expected)
    assert (~torch.isfinite(out))[bad].all(), "the kernel hides a non-finite value"
    if math.isfinite(value) or math.isnan(value):
        assert torch.equal(torch.isfinite(out), ~bad), "the kernel invents non-finite values"
    ok = torch.isfinite(out) & ~bad
    torch.testing.assert_close(out[ok], expected[ok], rtol=CPP_RTOL[dtype] * 10, atol=CPP_RTOL[dtype])


@pytest.mark.parametrize("dtype,isa", CPP_CASES)
def test_cpp_same_bits_for_any_thread_count(dtype, isa, cpp_isa):
    qkv = torch.randn(2, 50, 3 * 2 * 64).to(dtype)
    saved = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(ops.attention(qkv, 2, backend="cpp"))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("dtype,isa", CPP_CASES)
def test_cpp_under_compile_matches_eager(dtype, isa, cpp_isa):
    qkv = torch.randn(2, 19, 3 * 2 * 32).to(dtype)
    compiled = torch.compile(lambda t: ops.attention(t, 2, backend="cpp"), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(qkv), ops.attention(qkv, 2, backend="cpp"))


@pytest.mark.parametrize("qkv,heads,kw,match", [
    (torch.randn(1, 4, 3 * 48), 1, {}, r"head_dim .* must be a multiple of 32 up to 256; got 48"),
    (torch.randn(1, 4, 96).half(), 1, {}, "supports float32 and bfloat16; got torch.float16"),
    (torch.randn(1, 4, 96), 1, {"dropout_p": 0.1}, "dropout"),
    (torch.randn(1, 4, 96, requires_grad=True), 1, {}, r"inference only .*torch.no_grad\(\)"),
    (torch.randn(1, 4, 96, device="meta"), 1, {}, "needs CPU tensors; got meta"),
])
def test_cpp_refuses_by_name_what_it_cannot_run(qkv, heads, kw, match):
    with pytest.raises(BackendUnavailableError, match=r"backend 'cpp' cannot run this call: " + match):
        ops.attention(qkv, heads, backend="cpp", **kw)


def test_cpp_follows_the_kernels_instruction_set():
    """UNIFORMER_FAST_ISA / extension.use_isa: on AVX2 float32 runs the AVX2 kernel (the same results as
    the AVX-512 one within rounding) and bfloat16 is refused, by name and in "auto"; on "generic"
    nothing runs."""
    from uniformer_fast.ops import extension
    if "avx2" not in extension.supported_isas():  # empty without the extension
        pytest.skip("needs the C++ extension on an AVX2 CPU")
    qkv = torch.randn(1, 20, 3 * 64)
    with extension.use_isa("avx2"):
        with torch.no_grad():
            assert ops.backend_for(ops.attention, qkv, 1) == "cpp"
            assert ops.backend_for(ops.attention, qkv.bfloat16(), 1) == "sdpa"
            on_avx2 = ops.attention(qkv, 1, backend="cpp")
        with pytest.raises(BackendUnavailableError,
                           match=r"bfloat16 needs a CPU with AVX512-BF16 \(kernels' instruction set here: avx2\)"):
            ops.attention(qkv.bfloat16(), 1, backend="cpp")
    with extension.use_isa("generic"):
        with pytest.raises(BackendUnavailableError,
                           match=r"needs a CPU with AVX-512 or AVX2 \(kernels' instruction set here: generic\)"):
            ops.attention(qkv, 1, backend="cpp")
        with torch.no_grad():
            assert ops.backend_for(ops.attention, qkv, 1) == "sdpa"
    if "avx512" in extension.supported_isas():
        with extension.use_isa("avx512"), torch.no_grad():
            torch.testing.assert_close(on_avx2, ops.attention(qkv, 1, backend="cpp"), rtol=1e-5, atol=1e-6)


@_needs_cpp_attention(torch.float32)
def test_auto_takes_cpp_for_cpu_inference_and_sdpa_for_training():
    qkv = torch.randn(1, 4, 96)
    with torch.no_grad():
        assert ops.backend_for(ops.attention, qkv, 1) == "cpp"
        assert ops.backend_for(ops.attention, qkv, 1, dropout_p=0.1) == "sdpa"
    assert ops.backend_for(ops.attention, qkv.requires_grad_(), 1) == "sdpa"
