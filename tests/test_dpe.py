"""ops.dpe_layernorm, the SABlock's DPE with its LayerNorm epilogue (kernels/dpe.py): parity of the
"triton" backend with the float64 reference for both outputs (y, z) and every gradient (x,
weight, bias, ln_weight, ln_bias) with both outputs receiving gradients; backend choice; errors;
and the ahead-of-time compile of every config the launcher can pick for sm_80 and sm_90, failing
on register spills. The custom ops' contract (opcheck, torch.compile, y.sum() gradients,
determinism) is checked with the other ops' in tests/test_op_contracts.py.

On the CPU the kernels run under Triton's interpreter (~0.1 ms per operation per program): the
shapes are tiny but cross every edge (C not a power of two, position tiles that end part-way,
T = 1, H = W = 1, a kernel larger than the input).
"""
import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.kernels import HAS_TRITON, INTERPRET
from uniformer_fast.ops import BackendUnavailableError

from helpers import (assert_all_close, assert_no_spills, assert_untouched, clones, make_x, matrix,
                     needs_triton)

CL = torch.channels_last_3d


def _params(C, kernel, dtype, with_bias, device):
    w = (torch.randn((C, 1) + tuple(kernel), device=device) * 0.3).to(dtype)
    b = torch.randn(C, device=device).to(dtype) if with_bias else None
    lnw = (1.0 + 0.5 * torch.randn(C, device=device)).to(dtype)
    lnb = torch.randn(C, device=device).to(dtype)
    return w, b, lnw, lnb


def _run(x, w, b, lnw, lnb, backend, grad_y, grad_z, eps=1e-6):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b, lnw, lnb)]
    y, z = ops.dpe_layernorm(*leaves, eps, backend=backend)
    outs, grads = [], []
    for o, g in ((y, grad_y), (z, grad_z)):
        if g is not None:
            outs.append(o)
            grads.append(g.to(o.dtype))
    torch.autograd.backward(outs, grads)
    return [y, z] + [None if t is None else t.grad for t in leaves]


NAMES = ("y", "z", "dx", "dweight", "dbias", "dln_weight", "dln_bias")


def _check(shape, kernel, dtype, with_bias, layout, device, assert_close, grads=("y", "z")):
    C = shape[1]
    x = make_x(shape, dtype, layout, device)
    params = _params(C, kernel, dtype, with_bias, device)
    gy = torch.randn(shape, device=device).to(dtype) if "y" in grads else None
    gz = torch.randn(shape, device=device).to(dtype) if "z" in grads else None
    before = clones([x])
    out = _run(x, *params, "triton", gy, gz)
    ref = _run(x.double(), *[None if p is None else p.double() for p in params], "reference",
               None if gy is None else gy.double(), None if gz is None else gz.double())
    assert_untouched([x], before)
    for o in out[:2]:
        assert o.shape == shape and o.dtype == dtype and o.is_contiguous(memory_format=CL)
    assert_all_close(NAMES, out, ref, dtype, assert_close, f"{shape} {kernel} {dtype} {layout}")
    return out


@needs_triton
@pytest.mark.parametrize("shape,kernel", [
    ((2, 20, 3, 4, 5), (3, 3, 3)),  # C = 20: not a power of two (BLOCK_C 32)
    pytest.param((1, 64, 2, 3, 3), (3, 3, 3), marks=pytest.mark.slow),
    pytest.param((1, 160, 2, 2, 3), (3, 3, 3), marks=pytest.mark.slow),  # BLOCK_C 256, like stage 3's 320 in 512
    ((3, 20, 2, 3, 5), (3, 3, 3)),  # 30 positions: two tiles per batch element, the second partial
    ((1, 16, 1, 4, 4), (3, 3, 3)),  # T = 1
    ((2, 5, 3, 1, 1), (3, 3, 3)),  # H = W = 1
    ((1, 6, 2, 3, 4), (5, 5, 5)),  # the kernel larger than the input
    ((1, 12, 3, 3, 5), (1, 3, 7)),
], ids=lambda v: "x".join(map(str, v)))
def test_dpe_layernorm_triton_shapes(shape, kernel, device, assert_close):
    _check(shape, kernel, torch.float32, True, "channels_last", device, assert_close)


@needs_triton
@pytest.mark.parametrize("layout", ("contiguous", "sliced_channels_last", "sliced_contiguous"))
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no_bias"))
def test_dpe_layernorm_triton_layouts_and_bias(with_bias, layout, device, assert_close):
    _check((2, 20, 2, 3, 3), (3, 3, 3), torch.float32, with_bias, layout, device, assert_close)


@needs_triton
@pytest.mark.parametrize("layout", ("channels_last", "sliced_channels_last"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_dpe_layernorm_triton_half_dtypes(dtype, layout, device, assert_close):
    # bf16 stores truncate under the interpreter (1 ulp from the GPU's rounding): within 2e-2.
    _check((2, 20, 2, 3, 4), (3, 3, 3), dtype, True, layout, device, assert_close)


@needs_triton
@pytest.mark.parametrize("grads", (("y",), ("z",)), ids=("grad_y_only", "grad_z_only"))
def test_dpe_layernorm_triton_one_output_used(grads, device, assert_close):
    _check((1, 20, 2, 3, 3), (3, 3, 3), torch.float32, True, "channels_last", device, assert_close,
           grads=grads)


@needs_triton
def test_dpe_layernorm_triton_inference_and_partial_grads(device, assert_close):
    x = make_x((1, 20, 2, 3, 3), torch.float32, "channels_last", device)
    w, b, lnw, lnb = _params(20, (3, 3, 3), torch.float32, True, device)
    y, z = ops.dpe_layernorm(x, w, b, lnw, lnb, backend="triton")  # nothing requires grad
    assert not y.requires_grad and not z.requires_grad
    y64, z64 = ops.dpe_layernorm_reference(x.double(), w.double(), b.double(), lnw.double(), lnb.double())
    assert_close(y, y64, name="y")
    assert_close(z, z64, name="z")
    lnw_g = lnw.clone().requires_grad_()
    ops.dpe_layernorm(x, w, b, lnw_g, lnb, backend="triton")[1].pow(2).sum().backward()
    lnw64 = lnw.double().requires_grad_()
    ops.dpe_layernorm(x.double(), w.double(), b.double(), lnw64, lnb.double(),
                      backend="reference")[1].pow(2).sum().backward()
    assert_close(lnw_g.grad, lnw64.grad, name="dln_weight alone")


@needs_triton
@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_dpe_layernorm_autocast(backend, device):
    """Custom ops ignore autocast: the op casts its inputs itself, and both outputs come in the
    autocast dtype (the reference's F.layer_norm would give float32)."""
    if device.type == "cpu" and backend == "triton" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    x = make_x((1, 20, 2, 3, 3), torch.float32, "channels_last", device)
    params = _params(20, (3, 3, 3), torch.float32, True, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, z = ops.dpe_layernorm(x, *params, backend=backend)
    expected = ops.dpe_layernorm(x.bfloat16(), *[p.bfloat16() for p in params], backend=backend)
    assert y.dtype == z.dtype == torch.bfloat16
    assert torch.equal(y, expected[0]) and torch.equal(z, expected[1])


def test_dpe_layernorm_reference_matches_pure_reference(assert_close):
    """The registered "reference" (public ops composed) equals ops.dpe_layernorm_reference."""
    x = torch.randn(2, 6, 3, 4, 3, dtype=torch.float64)
    w, b, lnw, lnb = _params(6, (3, 3, 3), torch.float64, True, "cpu")
    y, z = ops.dpe_layernorm(x, w, b, lnw, lnb, 1e-5, backend="reference")
    ye, ze = ops.dpe_layernorm_reference(x, w, b, lnw, lnb, 1e-5)
    assert_close(y, ye, name="y")
    assert_close(z, ze, name="z")


def test_dpe_layernorm_auto_on_cpu_float64():
    """float64 (the model parity tests) and CPU tensors without the interpreter: "auto" runs the
    reference; "triton" by name raises saying why."""
    x = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    w, b, lnw, lnb = _params(4, (3, 3, 3), torch.float64, True, "cpu")
    assert ops.backend.resolve("dpe_layernorm", "auto", x.device, x, w, b, lnw, lnb, 1e-6)[0] == "reference"
    y, z = ops.dpe_layernorm(x, w, b, lnw, lnb)
    assert y.dtype == z.dtype == torch.float64
    if HAS_TRITON:
        with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32; got torch.float64"):
            ops.dpe_layernorm(x, w, b, lnw, lnb, backend="triton")


@needs_triton
def test_dpe_layernorm_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import uniformer_fast.kernels as kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
    x = torch.randn(1, 4, 2, 3, 3)
    w, b, lnw, lnb = _params(4, (3, 3, 3), torch.float32, True, "cpu")
    with pytest.raises(BackendUnavailableError, match="dpe_layernorm: backend 'triton'.*TRITON_INTERPRET"):
        ops.dpe_layernorm(x, w, b, lnw, lnb, backend="triton")


@needs_triton
def test_dpe_layernorm_triton_channel_limit():
    from uniformer_fast.kernels.dpe import MAX_CHANNELS, why_not_shape
    assert why_not_shape((8, 512, 8, 7, 7)) is None
    assert f"at most {MAX_CHANNELS}" in why_not_shape((1, MAX_CHANNELS + 1, 1, 1, 1))
    assert "at most 65535" in why_not_shape((65536, 4, 1, 1, 1))


_X = torch.randn(1, 4, 3, 3, 3)
_W = torch.randn(4, 1, 3, 3, 3)
_V = torch.randn(4)


@pytest.mark.parametrize("args,err,match", [
    ((torch.randn(4, 3, 3, 3), _W, None, _V, _V, 1e-6), ValueError, r"x must be 5-D"),
    ((_X, torch.randn(4, 1, 3, 4, 3), None, _V, _V, 1e-6), ValueError, "odd kt, kh, kw"),
    ((_X, _W, torch.randn(3), _V, _V, 1e-6), ValueError, r"bias must have shape \(4,\)"),
    ((_X, _W, None, torch.randn(5), _V, 1e-6), ValueError, r"ln_weight must have shape \(4,\)"),
    ((_X, _W, None, _V, torch.randn(4, 1), 1e-6), ValueError, r"ln_bias must be 1-D"),
    ((_X, _W, None, _V, _V.half(), 1e-6), TypeError, "ln_bias must have the dtype of x"),
    ((_X, _W, None, None, _V, 1e-6), TypeError, "ln_weight must be a torch.Tensor"),
    ((_X, _W, None, _V, _V, -1.0), ValueError, "eps must be a non-negative float"),
    ((_X, _W, None, _V, _V, "1e-6"), ValueError, "eps must be a non-negative float"),
])
def test_dpe_layernorm_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        ops.dpe_layernorm(*args)


@needs_triton
def test_sablock_triton_matches_reference(device, assert_close):
    """An SABlock whose DPE + norm1 run on "triton" against the same block on "reference"."""
    from uniformer_fast.model import SABlock
    torch.manual_seed(0)
    blk = SABlock(20, num_heads=2).to(device)
    x = make_x((2, 20, 2, 3, 3), torch.float32, "channels_last", device)
    outs = []
    for backend in ("triton", "reference"):
        blk.zero_grad()
        xi = x.detach().requires_grad_()
        with ops.use_backend(backend, op="dpe_layernorm"):
            y = blk(xi)
        y.pow(2).sum().backward()
        outs.append([y, xi.grad] + [p.grad.clone() for p in blk.parameters()])
    names = ["y", "dx"] + [n for n, _ in blk.named_parameters()]
    for name, a, e in zip(names, *outs):
        assert_close(a, e, rtol=1e-5, name=name)


# --- ahead-of-time compile for sm_80 / sm_90 ------------------------------------------------------

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
# One channel count per channel block the launcher can pick (16 ... MAX_CHANNELS), the UniFormer
# stage 3-4 widths (320, 512) among them.
COMPILE_CHANNELS = (16, 32, 64, 128, 160, 320, 512, 1024)


@pytest.fixture
def gpu_configs(gpu_kernels):
    return gpu_kernels("dpe")


@matrix(cover="one", dtype=list(PTR), kernel=((3, 3, 3), (7, 7, 7)), arch=(80, 90),
        prefer=lambda dtype, kernel, arch: arch == 90 and dtype == torch.bfloat16)
def test_forward_compiles_without_spills(dtype, kernel, arch, compile_for_gpu, gpu_configs):
    K = gpu_configs
    p = PTR[dtype]
    sig = dict(x_ptr=p, w_ptr=p, b_ptr=p, lnw_ptr=p, lnb_ptr=p, y_ptr=p, z_ptr=p,
               mean_ptr="*fp32", rstd_ptr="*fp32", C="i32", T="i32", H="i32", W="i32",
               stride_xb="i32", stride_xt="i32", stride_xh="i32", stride_xw="i32", eps="fp32")
    # torch allocations are 16-byte aligned; C a multiple of 16 makes every stride one too.
    aligned = [k for k, v in sig.items() if v.startswith("*") or k.startswith("stride") or k == "C"]
    seen = set()
    for C in COMPILE_CHANNELS if kernel == (3, 3, 3) else (64, 512, 1024):
        cfg = dict(K.fwd_config(C, kernel, dtype))
        warps = cfg.pop("num_warps")
        key = (cfg["BLOCK_P"], cfg["BLOCK_C"], warps)
        if key in seen:
            continue
        seen.add(key)
        constexprs = dict(KT=kernel[0], KH=kernel[1], KW=kernel[2], **cfg)  # HAS_BIAS: b_ptr is given
        r = compile_for_gpu(K.dpe_layernorm_fwd_kernel, sig, constexprs, arch, warps, aligned=aligned)
        what = f"dpe_layernorm_fwd {kernel} {dtype} {cfg} warps {warps} sm_{arch}"
        assert_no_spills(r, what)


@matrix(cover="one", dtype=list(PTR), arch=(80, 90), prefer=lambda dtype, arch: arch == 90 and dtype == torch.bfloat16)
def test_layernorm_backward_compiles_without_spills(dtype, arch, compile_for_gpu, gpu_configs):
    K = gpu_configs
    p = PTR[dtype]
    sig = dict(y_ptr=p, dz_ptr=p, dy_ptr=p, lnw_ptr=p, mean_ptr="*fp32", rstd_ptr="*fp32", dyt_ptr=p,
               dlnw_partial_ptr="*fp32", dlnb_partial_ptr="*fp32", C="i32", T="i32", H="i32", W="i32",
               num_tokens="i32", tiles_per_prog="i32",
               stride_dzb="i32", stride_dzt="i32", stride_dzh="i32", stride_dzw="i32",
               stride_dyb="i32", stride_dyt="i32", stride_dyh="i32", stride_dyw="i32")
    aligned = [k for k, v in sig.items() if v.startswith("*") or k.startswith("stride") or k == "C"]
    seen = set()
    for C in COMPILE_CHANNELS:
        cfg = dict(K.bwd_ln_config(C))
        warps = cfg.pop("num_warps")
        key = (cfg["BLOCK_P"], cfg["BLOCK_C"], warps)
        if key in seen:
            continue
        seen.add(key)
        for has_dy in (True, False):  # without y's gradient the launcher passes dy_ptr=None
            nones = {} if has_dy else {"dy_ptr": None}
            r = compile_for_gpu(K.dpe_layernorm_bwd_ln_kernel, {k: v for k, v in sig.items() if k not in nones},
                                dict(nones, **cfg), arch, warps, aligned=[a for a in aligned if a not in nones])
            what = f"dpe_layernorm_bwd_ln HAS_DY={has_dy} {dtype} {cfg} warps {warps} sm_{arch}"
            assert_no_spills(r, what)
