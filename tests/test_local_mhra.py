"""ops.local_mhra_tail: ``residual + conv2(dwconv(u) + attn_bias)``, the fused Local MHRA tail.

The "triton" backend (kernels/local_mhra.py, under Triton's interpreter on the CPU) and the
"reference" backend (the unfused composition of the public ops) against the float64 ground truth
(ops.local_mhra_tail_reference): the output and the gradients of u, attn_weight, attn_bias,
conv2_weight, conv2_bias and residual, over channel counts (16, 32, 64, 128 and ones padded to a
power of two), edge shapes (T = 1, H = W = 1, a partial last position tile), 3x3x3 and 5x5x5
kernels, biases and residual absent, every dtype and input layout. Then errors, the CBlock's use
of the op, and an ahead-of-time compile of every launch config for sm_80 and sm_90 (no spills;
tensor-core instructions present). The custom op's contract (opcheck, torch.compile, y.sum()
gradients, determinism) is checked with the other ops' in tests/test_op_contracts.py.

The interpreter costs ~0.1 ms per operation per program: the shapes are tiny (the interpreter's
32-position tile still leaves a partial last tile in most of them).
"""

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.kernels import INTERPRET
from uniformer_fast.ops import BackendUnavailableError
from uniformer_fast.ops import local_mhra as local_mhra_mod

from helpers import assert_all_close, assert_no_spills, assert_untouched, clones, matrix

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

CL = torch.channels_last_3d
NAMES = ("u", "attn_weight", "attn_bias", "conv2_weight", "conv2_bias", "residual")


def _activation(shape, dtype, layout, device):
    """(B, C, T, H, W) in the given layout; "sliced" is a view of a larger channels-last tensor (a
    channel window, a T window and every other W column): strides not dense, pointer offset."""
    B, C, T, H, W = shape
    if layout == "sliced":
        big = torch.randn(B, C + 3, T + 1, H, 2 * W + 1, device=device).to(dtype).to(memory_format=CL)
        x = big[:, 1:C + 1, 1:, :, 1::2]
        assert x.shape == shape and x.stride(1) == 1 and not x.is_contiguous(memory_format=CL)
        return x
    x = torch.randn(shape, device=device).to(dtype)
    return x if layout == "contiguous" else x.to(memory_format=CL)


def _inputs(shape, kernel, dtype, device, layout="channels_last", attn_bias=True, conv2_bias=True,
            residual=True):
    C = shape[1]
    u = _activation(shape, dtype, layout, device)
    # Scaled so that y is O(1) for every C and kernel: bf16 tolerances are relative to max |y|.
    aw = (torch.randn((C, 1) + tuple(kernel), device=device) / (kernel[0] * kernel[1] * kernel[2]) ** 0.5)
    w2 = torch.randn(C, C, 1, 1, 1, device=device) / C ** 0.5
    return [u, aw.to(dtype), torch.randn(C, device=device).to(dtype) if attn_bias else None,
            w2.to(dtype), torch.randn(C, device=device).to(dtype) if conv2_bias else None,
            _activation(shape, dtype, layout, device) if residual else None]


def _run(fn, inputs, grad_y):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(grad_y.to(y.dtype))
    return y, [None if t is None else t.grad for t in leaves]


def _check(shape, kernel, dtype, device, assert_close, backend="triton", **opts):
    inputs = _inputs(shape, kernel, dtype, device, **opts)
    grad_y = torch.randn(shape, device=device).to(dtype)
    before = clones(inputs)
    y, grads = _run(lambda *a: ops.local_mhra_tail(*a, backend=backend), inputs, grad_y)
    # The reference sees the very values the kernel saw, in float64.
    y_ref, grads_ref = _run(ops.local_mhra_tail_reference,
                            [None if t is None else t.double() for t in inputs], grad_y.double())
    assert_untouched(inputs, before)
    assert y.shape == shape and y.dtype == dtype and y.device == inputs[0].device
    assert y.is_contiguous(memory_format=CL), "the output must be dense channels_last_3d"
    assert_all_close(("y",) + tuple(f"d{n}" for n in NAMES), [y] + grads, [y_ref] + grads_ref, dtype,
                     assert_close, f"{shape} {kernel} {dtype} {backend} {opts}")


@pytest.mark.parametrize("shape,kernel", [
    ((2, 16, 3, 4, 5), (5, 5, 5)),  # 60 positions: two tiles per batch element, the second partial
    ((1, 32, 2, 3, 5), (3, 3, 3)),
    pytest.param((1, 64, 2, 3, 3), (3, 3, 3), marks=pytest.mark.slow),
    ((1, 128, 1, 3, 3), (3, 3, 3)),  # the largest C the kernel takes; T = 1
    ((1, 20, 2, 3, 4), (3, 3, 3)),  # C padded to 32 in registers
    ((2, 3, 2, 3, 3), (3, 3, 3)),  # C = 3, padded to 16
    pytest.param((2, 16, 1, 4, 4), (5, 5, 5), marks=pytest.mark.slow),  # T = 1: the temporal taps fall outside
    pytest.param((2, 16, 3, 1, 1), (5, 5, 5), marks=pytest.mark.slow),  # H = W = 1
    ((1, 16, 2, 3, 4), (1, 3, 5)),  # a non-cubic kernel
], ids=lambda v: "x".join(map(str, v)))
def test_triton_shapes(shape, kernel, device, assert_close):
    _check(shape, kernel, torch.float32, device, assert_close)


@pytest.mark.parametrize("attn_bias,conv2_bias,residual", [
    (False, False, False), (False, True, True), (True, False, True), (True, True, False),
], ids=lambda v: "on" if v else "off")
def test_triton_optional_arguments(attn_bias, conv2_bias, residual, device, assert_close):
    _check((1, 16, 2, 3, 4), (3, 3, 3), torch.float32, device, assert_close, attn_bias=attn_bias,
           conv2_bias=conv2_bias, residual=residual)


@pytest.mark.parametrize("layout", ("contiguous", "sliced"))
def test_triton_layouts(layout, device, assert_close):
    _check((2, 16, 2, 3, 3), (3, 3, 3), torch.float32, device, assert_close, layout=layout)


@matrix(cover="each", dtype=[pytest.param(d, id=str(d)) for d in (torch.float16, torch.bfloat16)],
        kernel=((3, 3, 3), (5, 5, 5)), fast=lambda dtype, kernel: kernel == (3, 3, 3))
def test_triton_half_dtypes(dtype, kernel, device, assert_close):
    # a is rounded to the dtype before the projection, as the unfused path stores it; bf16 casts
    # truncate under the interpreter (1 ulp from the GPU's rounding): within 2e-2.
    _check((1, 32, 2, 3, 4), kernel, dtype, device, assert_close)


def test_triton_half_dtype_sliced(device, assert_close):
    _check((1, 16, 2, 3, 3), (3, 3, 3), torch.bfloat16, device, assert_close, layout="sliced")


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_reference_backend(dtype, assert_close):
    """The composed "reference" backend (on the CPU its dwconv3d is "cpp" for float32 when built)."""
    _check((2, 20, 2, 3, 4), (5, 5, 5), dtype, torch.device("cpu"), assert_close, backend="reference")


def test_triton_grads_only_where_asked(device, assert_close):
    u, aw, ab, w2, b2, r = _inputs((1, 16, 2, 3, 3), (3, 3, 3), torch.float32, device)
    w2g = w2.clone().requires_grad_()
    ops.local_mhra_tail(u, aw, ab, w2g, b2, r, backend="triton").sum().backward()
    w2_64 = w2.double().requires_grad_()
    ops.local_mhra_tail_reference(u.double(), aw.double(), ab.double(), w2_64, b2.double(), r.double()).sum().backward()
    assert_close(w2g.grad, w2_64.grad, name="dconv2_weight")
    y = ops.local_mhra_tail(u, aw, ab, w2, b2, r, backend="triton")  # no grad anywhere: no graph
    assert not y.requires_grad


def test_auto_picks(device):
    args = _inputs((1, 16, 1, 2, 2), (3, 3, 3), torch.float32, device)
    picked, _ = ops.backend.resolve("local_mhra_tail", "auto", device, *args)
    assert picked == ("triton" if device.type == "cuda" else "reference")
    # More channels than a program holds: "auto" takes the reference, "triton" says why not.
    big = _inputs((1, 160, 1, 2, 2), (3, 3, 3), torch.float32, device)
    assert ops.backend.resolve("local_mhra_tail", "auto", device, *big)[0] == "reference"
    with pytest.raises(BackendUnavailableError, match="local_mhra_tail: backend 'triton'.*at most 128; got 160"):
        ops.local_mhra_tail(*big, backend="triton")


def test_triton_rejects_float64(device):
    args = _inputs((1, 16, 1, 2, 2), (3, 3, 3), torch.float64, device)
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32; got torch.float64"):
        ops.local_mhra_tail(*args, backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import uniformer_fast.kernels as kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
    args = _inputs((1, 16, 1, 2, 2), (3, 3, 3), torch.float32, torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="local_mhra_tail: backend 'triton'.*TRITON_INTERPRET"):
        ops.local_mhra_tail(*args, backend="triton")


def _bad(**change):
    u, aw, ab, w2, b2, r = (torch.randn(1, 4, 2, 3, 3), torch.randn(4, 1, 3, 3, 3), torch.randn(4),
                            torch.randn(4, 4, 1, 1, 1), torch.randn(4), torch.randn(1, 4, 2, 3, 3))
    args = dict(u=u, attn_weight=aw, attn_bias=ab, conv2_weight=w2, conv2_bias=b2, residual=r)
    args.update(change)
    return [args[n] for n in NAMES]


@pytest.mark.parametrize("args,err,match", [
    (_bad(u=torch.randn(4, 2, 3, 3)), ValueError, r"u must be 5-D"),
    (_bad(u=torch.randn(1, 4, 2, 3, 3).int()), TypeError, r"u must be float16"),
    (_bad(attn_weight=torch.randn(4, 1, 3, 4, 3)), ValueError, r"attn_weight must have shape \(4, 1, kt.*odd"),
    (_bad(attn_weight=torch.randn(4, 1, 9, 3, 3)), ValueError, r"attn_weight must have shape.*<= 7"),
    (_bad(attn_weight=torch.randn(3, 1, 3, 3, 3)), ValueError, r"attn_weight must have shape"),
    (_bad(attn_bias=torch.randn(3)), ValueError, r"attn_bias must have shape \(4,\)"),
    (_bad(conv2_weight=torch.randn(4, 4)), ValueError, r"conv2_weight must be 5-D"),
    (_bad(conv2_weight=torch.randn(4, 4, 1, 1, 3)), ValueError, r"conv2_weight must have shape \(4, 4, 1, 1, 1\)"),
    (_bad(conv2_bias=torch.randn(4).half()), TypeError, r"conv2_bias must have the dtype of u"),
    (_bad(residual=torch.randn(1, 4, 2, 3, 2)), ValueError, r"residual must have the shape of u"),
    (_bad(conv2_weight=torch.randn(4, 4, 1, 1, 1).double()), TypeError, r"conv2_weight must have the dtype of u"),
    (_bad(u=torch.randn(0, 4, 2, 3, 3), residual=None), ValueError, r"u must not be empty"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_bad_input(args, err, match, backend):
    with pytest.raises(err, match=match):
        ops.local_mhra_tail(*args, backend=backend)


# --- the CBlock calls the op --------------------------------------------------------------------

def _spy(monkeypatch):
    calls = []
    real = local_mhra_mod.local_mhra_tail

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "local_mhra_tail", spy)
    return calls


@pytest.mark.parametrize("training,drop_path,fused", [
    (False, 0.0, True), (True, 0.0, True), (False, 0.3, True), (True, 0.3, True),
])
def test_cblock_uses_the_fused_tail(training, drop_path, fused, monkeypatch, assert_close):
    """The block calls ops.local_mhra_tail in eval and in training, with or without an active
    stochastic depth (whose scale the op applies before the add), with the result of the unfused
    composition and the same dropped samples."""
    from uniformer_fast.model import CBlock
    calls = _spy(monkeypatch)
    block = CBlock(16, drop_path=drop_path).train(training)
    x = torch.randn(2, 16, 2, 4, 4).to(memory_format=CL)
    torch.manual_seed(1)
    y = block(x)
    assert bool(calls) == fused
    # The unfused tail, as the block computed it before the op existed (same dropped samples).
    torch.manual_seed(1)
    h = ops.dwconv3d(x, block.pos_embed.weight, block.pos_embed.bias, residual=True)
    a = block.conv1(block.norm1(h) if not training else torch.nn.functional.batch_norm(
        h, None, None, block.norm1.weight, block.norm1.bias, True, 0.0, block.norm1.eps))
    h = h + block.drop_path(block.conv2(ops.dwconv3d(a, block.attn.weight, block.attn.bias)))
    expected = h + block.drop_path(block.mlp(block.norm2(h) if not training else torch.nn.functional.batch_norm(
        h, None, None, block.norm2.weight, block.norm2.bias, True, 0.0, block.norm2.eps)))
    assert_close(y, expected, rtol=1e-5, name="block output")


def test_cblock_triton_gradients(device, assert_close):
    """A CBlock in training mode on the "triton" backends against float64 "reference": the
    output and every parameter gradient."""
    from uniformer_fast.model import CBlock
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    block = CBlock(16, mlp_ratio=1.0).to(device).train()
    x = torch.randn(1, 16, 2, 3, 4, device=device).to(memory_format=CL)
    block64 = CBlock(16, mlp_ratio=1.0).to(device).double().train()
    block64.load_state_dict(block.state_dict())
    with ops.use_backend("triton", op="local_mhra_tail"), ops.use_backend("triton", op="dwconv3d"):
        y = block(x)
    y.square().sum().backward()
    with ops.use_backend("reference"):
        y64 = block64(x.double())
    y64.square().sum().backward()
    assert_close(y, y64, name="y")
    for (name, p), p64 in zip(block.named_parameters(), block64.parameters()):
        assert_close(p.grad, p64.grad, name=f"d{name}")


# --- ahead-of-time compile of every launch config, sm_80 and sm_90 -------------------------------

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
from uniformer_fast.kernels import local_mhra as K
# (dtype, matmul kind): the kinds select the config table; float16 shares bfloat16's configs.
KINDS = [(torch.bfloat16, "16bit"), (torch.float32, "tf32"), (torch.float32, "ieee")]


def _compile(compile_for_gpu, block_c, dtype, kind, kernel, arch, flags=(True, True, True), stats=False,
             branch_scale=False):
    """flags: (attn bias, conv2 bias, residual) given; branch_scale: the per-sample scale given
    (training with stochastic depth). What is not given is passed as None, as the launcher does,
    and the kernel's heuristics derive its HAS_* and STATS flags from that."""
    p = PTR[dtype]
    sig = dict(u_ptr=p, taps_ptr=p, ab_ptr=p, w2_ptr=p, b2_ptr=p, bs_ptr=p, r_ptr=p, y_ptr=p,
               phi_ptr="*fp32", psdev_ptr="*fp32", pm2_ptr="*fp32", C="i32", T="i32",
               H="i32", W="i32", stride_ub="i32", stride_ut="i32", stride_uh="i32", stride_uw="i32",
               stride_rb="i32", stride_rt="i32", stride_rh="i32", stride_rw="i32")
    given = dict(ab_ptr=flags[0], b2_ptr=flags[1], r_ptr=flags[2], bs_ptr=branch_scale,
                 phi_ptr=stats, psdev_ptr=stats, pm2_ptr=stats)
    nones = {k: None for k, v in given.items() if not v}
    sig = {k: v for k, v in sig.items() if k not in nones}
    cfg = K.gpu_config(block_c, kind, stats)
    constexprs = dict(KT=kernel[0], KH=kernel[1], KW=kernel[2], **nones,
                      PRECISION="tf32" if kind == "tf32" else "ieee", UPCAST=False,
                      BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"])
    # With C a multiple of 16 every stride is one too, and torch allocations are 16-byte aligned.
    aligned = [k for k, v in sig.items() if v.startswith("*") or k.startswith("stride") or k == "C"]
    r = compile_for_gpu(K.local_mhra_tail_fwd_kernel, sig, constexprs, arch, cfg["num_warps"], aligned=aligned)
    what = f"C{block_c} {dtype} {kind} {kernel} {flags} scale={branch_scale} stats={stats} {cfg} sm_{arch}"
    assert_no_spills(r, what)
    assert "LDG.E.128" in r["sass"], f"{what}: expected 16-byte loads along C"
    if kind != "ieee":  # the projection on tensor cores: wgmma on Hopper, mma.sync on Ampere
        assert ("wgmma" if arch == 90 else "mma.sync") in r["ptx"], f"{what}: no tensor-core matmul"
    return r


@pytest.fixture
def gpu_configs(gpu_kernels):
    return gpu_kernels("local_mhra")


def _on_gpu(dtype, kind, arch, **_):
    """The fast tier's compile of each variant: bfloat16 on sm_90."""
    return arch == 90 and dtype == torch.bfloat16


@matrix(cover="one", prefer=_on_gpu, block_c=[pytest.param(c, id=f"C{c}") for c in K.BLOCK_CS],
        **{"dtype,kind": [pytest.param(d, k, id=f"{str(d)[6:]}-{k}") for d, k in KINDS],
           "kernel,branch_scale": [pytest.param((5, 5, 5), False, id="5x5x5"), pytest.param((5, 5, 5), True, id="5x5x5-scale"),
                                   pytest.param((7, 7, 7), False, id="7x7x7")]},
        arch=(80, 90))
def test_forward_compiles(block_c, dtype, kind, kernel, branch_scale, arch, compile_for_gpu, gpu_configs):
    """UniFormer's 5x5x5, without and with the per-sample stochastic-depth scale (training with
    drop_path), and the largest kernel allowed (the most taps unrolled along kw)."""
    _compile(compile_for_gpu, block_c, dtype, kind, kernel, arch, branch_scale=branch_scale)


@matrix(cover="one", arch=(80, 90), prefer=lambda arch: arch == 90)
def test_other_variants_compile(arch, compile_for_gpu, gpu_configs):
    """float16, the 3x3x3 kernel, and no biases or residual, at the largest tile."""
    _compile(compile_for_gpu, 128, torch.float16, "16bit", (5, 5, 5), arch)
    _compile(compile_for_gpu, 128, torch.bfloat16, "16bit", (3, 3, 3), arch)
    _compile(compile_for_gpu, 128, torch.bfloat16, "16bit", (5, 5, 5), arch, flags=(False, False, False))


@matrix(cover="one", prefer=_on_gpu, block_c=[pytest.param(c, id=f"C{c}") for c in K.BLOCK_CS],
        **{"dtype,kind": [pytest.param(d, k, id=f"{str(d)[6:]}-{k}") for d, k in KINDS]}, arch=(80, 90))
def test_forward_with_bn_stats_compiles(block_c, dtype, kind, arch, compile_for_gpu, gpu_configs):
    """The STATS variant (BatchNorm partials written from the registers, ops.local_mhra_tail_bn_stats)
    at every launch config, UniFormer's 5x5x5, with the stochastic-depth scale (the training
    step the STATS variant serves; the scale adds a load and a multiply): no spills, 16-byte
    loads, tensor cores."""
    _compile(compile_for_gpu, block_c, dtype, kind, (5, 5, 5), arch, stats=True, branch_scale=True)
