"""The "triton" linear backend (kernels/linear.py): matmul + bias + exact GELU in one kernel,
forward and backward, against a float64 reference; ahead-of-time compiles of its configs for
sm_80 and sm_90 (registers, spills) on the CPU. Its custom ops' contract (opcheck, torch.compile,
y.sum() gradients, determinism) is checked with the other ops' in tests/test_op_contracts.py."""
import re

import pytest
import torch
import torch.nn.functional as F

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError

from helpers import assert_no_spills, matrix

pytestmark = pytest.mark.triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from uniformer_fast.kernels import linear as kernels  # imports triton: only where a test needs it
    return kernels


def _inputs(x_shape, out_features, dtype, device, bias=True):
    x = torch.randn(x_shape, device=device).to(dtype).requires_grad_()
    w = (torch.randn(out_features, x_shape[-1], device=device) / x_shape[-1] ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(out_features, device=device).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _reference64(x, w, b, activation, dy):
    """Output and gradients (x, w, b) in float64 from the same inputs."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = F.linear(x64, w64, b64)
    y = F.gelu(y) if activation == "gelu" else y
    leaves = [x64, w64] + ([b64] if b is not None else [])
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


def _check(x, w, b, activation, assert_close, dy=None, backend="triton"):
    y = ops.linear(x, w, b, activation=activation, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (w.shape[0],)
    if dy is None:
        dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    leaves = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, leaves, dy)
    y64, grads64 = _reference64(x, w, b, activation, dy)
    assert_close(y, y64, dtype=x.dtype, name="y")
    for name, g, e in zip(("dx", "dweight", "dbias"), grads, grads64):
        assert_close(g, e, dtype=x.dtype, name=name)


# --- parity ---------------------------------------------------------------------------------------

# Odd sizes that are not multiples of the interpreter's tiles in M, N or K (16 below 128, 128
# from there: the last shape), 2-D to 5-D.
SHAPES = [((37, 40), 33), ((2, 9, 24), 50), ((1, 2, 3, 5, 17), 31), ((1, 16), 16), ((150, 130), 140)]


def _shape_id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else f"N{v}"


@matrix(cover="pairs", bias=[pytest.param(True, id="bias"), pytest.param(False, id="no_bias")],
        activation=[pytest.param(None, id="none"), pytest.param("gelu", id="gelu")],
        dtype=[pytest.param(d, id=str(d)) for d in DTYPES],
        **{"x_shape,out_features": [pytest.param(s, n, id=f"{_shape_id(s)}-{_shape_id(n)}") for s, n in SHAPES]})
def test_parity(x_shape, out_features, dtype, activation, bias, device, assert_close):
    _check(*_inputs(x_shape, out_features, dtype, device, bias), activation, assert_close)


@pytest.mark.parametrize("layout", ("row_strided", "channels_last_view", "sliced", "last_dim_strided"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_strided_x(layout, dtype, device, assert_close):
    """x views made by slicing: read in place where the leading dims flatten to rows."""
    if layout == "row_strided":  # rows of 24 features inside rows of 40: one view, row stride 40
        x = torch.randn(19, 40, device=device).to(dtype)[:, 3:27]
    elif layout == "channels_last_view":  # _pointwise's (B, T, H, W, C) view of a channels-last tensor
        x = torch.randn(2, 24, 3, 4, 5, device=device).to(dtype).to(memory_format=torch.channels_last_3d)
        x = x.permute(0, 2, 3, 4, 1)
        assert x.reshape(-1, 24).data_ptr() == x.data_ptr()  # flattens without a copy
    elif layout == "sliced":  # leading dims that do not flatten: one copy
        x = torch.randn(2, 7, 9, 24, device=device).to(dtype)[:, 1:, ::2]
    else:  # last dim not unit-stride: copied once
        x = torch.randn(11, 48, device=device).to(dtype)[:, ::2]
    x = x.detach().requires_grad_()
    w = (torch.randn(21, 24, device=device) / 5).to(dtype).requires_grad_()
    b = torch.randn(21, device=device).to(dtype).requires_grad_()
    _check(x, w, b, "gelu", assert_close)


@matrix(cover="pairs", M=(101, 300), activation=[pytest.param(None, id="none"), pytest.param("gelu", id="gelu")],
        split=(1, 2, 3, 7))
def test_weight_grad_split_reduction(M, split, activation, device, assert_close):
    """dW and db reduced over M in `split` parts (float32 partials summed in a fixed order); at
    M = 300 the interpreter's reduction tile is 128, so fewer splits than asked."""
    K = _kernels()
    x, w, b = _inputs((M, 20), 35, torch.float32, device)
    dy = torch.randn(M, 35, device=device)
    dx, dw, db = K.linear_bwd(dy, x.detach(), w.detach(), b.detach(), activation or "none", split=split)
    _, (dx64, dw64, db64) = _reference64(x, w, b, activation, dy)
    assert_close(dx, dx64, name="dx")
    assert_close(dw, dw64, name="dweight")
    assert_close(db, db64, name="dbias")
    # Deterministic: the same bits again.
    again = K.linear_bwd(dy, x.detach(), w.detach(), b.detach(), activation or "none", split=split)
    assert all(torch.equal(a, e) for a, e in zip((dx, dw, db), again))


def test_64bit_offsets(monkeypatch, device, assert_close):
    """The INT64 variant (taken when an operand spans >= 2**31 elements), forced on small shapes."""
    monkeypatch.setattr(_kernels(), "INT32_LIMIT", 1)
    _check(*_inputs((3, 13, 20), 18, torch.float32, device), "gelu", assert_close)


def test_grads_only_where_asked(device, assert_close):
    x = torch.randn(9, 20, device=device)  # an input that needs no gradient
    w = torch.randn(17, 20, device=device, requires_grad=True)
    y = ops.linear(x, w, None, activation="gelu", backend="triton")
    (gw,) = torch.autograd.grad(y, (w,), torch.ones_like(y))
    _, (_, gw64) = _reference64(x, w, None, "gelu", torch.ones_like(y))
    assert_close(gw, gw64, name="dweight")
    x.requires_grad_()
    w.requires_grad_(False)
    y = ops.linear(x, w, None, backend="triton")
    (gx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    assert_close(gx, torch.ones(9, 17, dtype=torch.float64) @ w.double(), name="dx")


def test_empty_rows(device):
    x, w, b = _inputs((0, 3, 20), 18, torch.float32, device)
    y = ops.linear(x, w, b, activation="gelu", backend="triton")
    assert y.shape == (0, 3, 18)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_autocast(device, assert_close):
    x, w, b = (t.detach() for t in _inputs((4, 6, 20), 18, torch.float32, device))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ops.linear(x, w, b, activation="gelu", backend="triton")
    assert y.dtype == torch.bfloat16
    assert_close(y, F.gelu(F.linear(x.double(), w.double(), b.double())), dtype=torch.bfloat16)


# --- backend choice, bad input -----------------------------------------------------------------

def test_use_backend_triton_applies_to_linear(monkeypatch):
    calls = []
    impl = ops.backend._OPS["linear"].impls["triton"]
    monkeypatch.setitem(ops.backend._OPS["linear"].impls, "triton",
                        ops.backend._Impl(lambda *a: calls.append(1) or impl.fn(*a), impl.why_not))
    with ops.use_backend("triton"):
        assert ops.get_backend("linear") == "triton"
        ops.linear(torch.randn(3, 16), torch.randn(16, 16), activation="gelu")
    assert calls == [1]
    # Not an "auto" choice on CUDA until a GPU measurement says the fused kernel pays.
    assert "triton" not in ops.backend._OPS["linear"].auto["cuda"]
    assert "triton" in ops.available_backends("linear")


def test_triton_rejects_float64():
    with pytest.raises(BackendUnavailableError, match="linear: backend 'triton'.*float16, bfloat16 or float32"):
        ops.linear(torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), backend="triton")


def test_triton_rejects_zero_features():
    with pytest.raises(BackendUnavailableError, match="out_features >= 1 and in_features >= 1"):
        ops.linear(torch.randn(3, 0), torch.randn(4, 0), backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import uniformer_fast.kernels as kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(BackendUnavailableError, match="linear: backend 'triton'.*TRITON_INTERPRET"):
        ops.linear(torch.randn(3, 8), torch.randn(4, 8), backend="triton")


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(3, 8), torch.randn(4, 7)), {}, ValueError, "in_features 7"),
    ((torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)), {}, ValueError, r"bias must have shape \(4,\)"),
    ((torch.randn(3, 8), torch.randn(4, 8).half()), {}, TypeError, "weight must have the dtype of x"),
    ((torch.randn(3, 8), torch.randn(4, 8)), {"activation": "relu"}, ValueError, "activation must be None or 'gelu'"),
], ids=("in_features", "bias_shape", "dtype", "activation"))
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.linear(*args, backend="triton", **kwargs)


# --- ahead-of-time compiles for the GPUs ---------------------------------------------------------

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
PRECISION = {"16bit": "ieee", "tf32": "tf32", "ieee": "ieee"}  # "ieee" is ignored for 16-bit dots
KIND_DTYPE = {"16bit": torch.bfloat16, "tf32": torch.float32, "ieee": torch.float32}
# The four launches of a training step, as the launchers make them (kernels/linear.py): the flags,
# and the optional pointers passed as None (the kernel's heuristics derive HAS_BIAS and ROWSUM).
DIRECTIONS = {
    "fwd_gelu": (dict(A_K_CONTIG=True, B_K_CONTIG=True, ACT=1), ("dy_ptr", "rowsum_ptr")),
    "bwd_dpre": (dict(A_K_CONTIG=True, B_K_CONTIG=True, ACT=2), ("rowsum_ptr",)),
    "bwd_dx": (dict(A_K_CONTIG=True, B_K_CONTIG=False, ACT=0), ("bias_ptr", "dy_ptr", "rowsum_ptr")),
    "bwd_dw_split": (dict(A_K_CONTIG=False, B_K_CONTIG=False, ACT=0), ("bias_ptr", "dy_ptr")),
}


def _gpu_configs():
    # The GPU table, also under the interpreter (kernels/linear.py swaps it out only at launch).
    tiles = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}-w{num_warps}"
    return [pytest.param(kind, i, cfg, id=f"{kind}-{tiles.format(**cfg)}")
            for kind, cfgs in _kernels().GPU_CONFIGS.items() for i, cfg in enumerate(cfgs)]


def compile_direction(compile_for_gpu, kind, cfg, direction, arch):
    K = _kernels()
    dtype = KIND_DTYPE[kind]
    elem = PTR[dtype]
    out = "*fp32" if direction == "bwd_dw_split" else elem
    sig = {"a_ptr": elem, "b_ptr": elem, "bias_ptr": elem, "dy_ptr": elem, "c_ptr": out,
           "rowsum_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32",
           "stride_a": "i32", "stride_b": "i32", "stride_dy": "i32", "stride_cm": "i32", "stride_cs": "i32"}
    flags, nones = DIRECTIONS[direction]
    sig = {k: v for k, v in sig.items() if k not in nones}
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(flags, **dict.fromkeys(nones), INT64=False, PRECISION=PRECISION[kind], UPCAST=False, **cfg)
    # UniFormer-S's MLP shapes (C = 64..512, hidden 4C, M a multiple of 16): every pointer,
    # stride and size is a multiple of 16, which Triton specialises on at launch.
    aligned = [k for k in sig if k != "k_per_split"]
    return compile_for_gpu(K.matmul_kernel, sig, constexprs, arch, num_warps=warps, num_stages=stages,
                           aligned=aligned)


@matrix(cover="one", **{"kind,index,cfg": _gpu_configs()}, arch=(80, 90),
        prefer=lambda kind, index, cfg, arch: arch == 90 and kind == "16bit")
def test_configs_compile_without_spills(kind, index, cfg, arch, compile_for_gpu):
    """Every GPU config compiles for sm_80 and sm_90 in each launch direction without register
    spills; 16-bit and tf32 matmuls run on tensor cores (wgmma on sm_90 where the tile allows)."""
    for direction in DIRECTIONS:
        r = compile_direction(compile_for_gpu, kind, cfg, direction, arch)
        assert_no_spills(r, f"sm_{arch} {kind} {cfg} {direction}")
        if kind != "ieee":
            assert ("wgmma" in r["ptx"]) or ("mma.sync" in r["ptx"]), f"{direction}: no tensor-core matmul"
        if kind == "tf32":
            assert "tf32" in r["ptx"], f"{direction}: float32 matmul not on tf32 tensor cores"
        if kind == "ieee":
            assert "mma" not in r["ptx"], f"{direction}: exact float32 must not use tensor cores"
        # Operands reach shared memory by 16-byte asynchronous copies (pipelined, vectorised);
        # except tf32 on sm_90 with both operands N-major (the weight gradient): wgmma takes
        # 32-bit operands K-major only, so they pass through registers, still by 16-byte loads.
        if kind == "tf32" and arch == 90 and direction == "bwd_dw_split":
            assert "ld.global.v4" in r["ptx"], f"{direction}: no 16-byte loads"
        else:
            assert re.search(r"cp\.async\.c[ag]\.shared\.global [^;]*, 0x10", r["ptx"]), \
                f"{direction}: no 16-byte cp.async"
