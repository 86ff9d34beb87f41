"""ops.dpe_bn_stats, the CBlock's DPE with its BatchNorm statistics epilogue (kernels/dwconv3d.py's
forward with STATS, kernels/bn_stats.py):
parity of the "triton" backend with the float64 reference for the three outputs (y, mean, var)
and every gradient (x, weight, bias) with all three outputs receiving gradients; a large-mean
input where float32 sum / sum-of-squares statistics would fail; the CBlock's training path (BN
statistics from the ops, norm1 folded into conv1, norm2 into fc1) against the plain block, running statistics
included; errors; and the ahead-of-time compile of the kernels for sm_80 and sm_90, failing on
register spills. The custom ops' contract (opcheck, torch.compile, y.sum() gradients,
determinism) is checked with the other ops' in tests/test_op_contracts.py.

On the CPU the kernels run under Triton's interpreter (~0.1 ms per operation per program): tiny
shapes that still cross every edge (C not a power of two and wider than the interpreter's
16-channel block, position tiles that end part-way, T = 1, W = 1, both merge levels).
"""
import contextlib
import copy
import functools

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.kernels import HAS_TRITON, INTERPRET
from uniformer_fast.ops import BackendUnavailableError

from helpers import (assert_all_close, assert_no_spills, assert_stats_of_stored_y, assert_untouched, clones, make_x,
                     matrix, needs_triton)

CL = torch.channels_last_3d


def _params(C, kernel, dtype, with_bias, device):
    w = (torch.randn((C, 1) + tuple(kernel), device=device) * 0.3).to(dtype)
    b = torch.randn(C, device=device).to(dtype) if with_bias else None
    return w, b


def _run(x, w, b, backend, grads):
    """Forward on ``backend``, then backward with the given upstream gradients (None: that output
    unused). Returns [y, mean, var, dx, dweight, dbias]."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    outs = ops.dpe_bn_stats(*leaves, backend=backend)
    used = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return list(outs) + [None if t is None else t.grad for t in leaves]


NAMES = ("y", "mean", "var", "dx", "dweight", "dbias")


def _check(shape, kernel, dtype, with_bias, layout, device, assert_close, outputs=("y", "mean", "var")):
    C = shape[1]
    x = make_x(shape, dtype, layout, device)
    w, b = _params(C, kernel, dtype, with_bias, device)
    grads = [torch.randn(shape, device=device).to(dtype) if "y" in outputs else None,
             torch.randn(C, device=device) if "mean" in outputs else None,
             torch.randn(C, device=device) if "var" in outputs else None]
    before = clones([x])
    out = _run(x, w, b, "triton", grads)
    ref = _run(x.double(), w.double(), None if b is None else b.double(), "reference",
               [None if g is None else g.double() for g in grads])
    assert_untouched([x], before)
    y, mean, var = out[:3]
    assert y.shape == shape and y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert mean.shape == var.shape == (C,) and mean.dtype == var.dtype == torch.float32
    # The statistics are float32 whatever the activation dtype; they are those of y as stored,
    # so in 16-bit dtypes they carry y's rounding.
    assert_all_close(NAMES, out, ref, dtype, assert_close, f"{shape} {kernel} {dtype} {layout}")
    return out


@needs_triton
@pytest.mark.parametrize("shape,kernel", [
    ((2, 20, 3, 4, 5), (3, 3, 3)),  # C = 20: two 16-channel blocks, the second partial
    pytest.param((3, 20, 3, 5, 10), (3, 3, 3), marks=pytest.mark.slow),  # 150 positions: 3 tiles per batch element, 9 rows: two merge levels
    ((2, 33, 2, 3, 3), (3, 3, 3)),  # three channel blocks
    ((1, 16, 1, 4, 4), (3, 3, 3)),  # T = 1
    ((2, 7, 3, 5, 1), (3, 3, 3)),  # W = 1
    ((1, 6, 2, 3, 4), (5, 5, 5)),  # the kernel larger than the input
], ids=lambda v: "x".join(map(str, v)))
def test_dpe_bn_stats_triton_shapes(shape, kernel, device, assert_close):
    _check(shape, kernel, torch.float32, True, "channels_last", device, assert_close)


@needs_triton
@pytest.mark.parametrize("layout,with_bias", [
    ("contiguous", True), ("sliced_channels_last", False), ("sliced_contiguous", True)])
def test_dpe_bn_stats_triton_layouts_and_bias(layout, with_bias, device, assert_close):
    _check((2, 20, 2, 3, 3), (3, 3, 3), torch.float32, with_bias, layout, device, assert_close)


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_dpe_bn_stats_triton_half_dtypes(dtype, device, assert_close):
    # bf16 stores truncate under the interpreter (1 ulp from the GPU's rounding): within 2e-2.
    _check((2, 20, 2, 3, 4), (3, 3, 3), dtype, True, "channels_last", device, assert_close)


@needs_triton
@pytest.mark.parametrize("outputs", (("y",), ("mean", "var"), ("y", "var")), ids="+".join)
def test_dpe_bn_stats_triton_some_outputs_used(outputs, device, assert_close):
    _check((1, 20, 2, 3, 3), (3, 3, 3), torch.float32, True, "channels_last", device, assert_close,
           outputs=outputs)


@needs_triton
def test_dpe_bn_stats_large_mean(device, assert_close):
    """|mean| / std ~ 1e4: float32 sum and sum of squares would lose the variance entirely
    (E[y^2] ~ 1e8 carries an absolute error ~ 10 against a variance ~ 3). The per-tile (mean, M2)
    partials and their merge keep it to float32 rounding of the values themselves."""
    shape = (5, 20, 2, 3, 3)  # 5 tile rows: both merge levels
    x = make_x(shape, torch.float32, "channels_last", device)
    w, _ = _params(20, (3, 3, 3), torch.float32, True, device)
    b = torch.full((20,), 1.0e4, device=device) + torch.randn(20, device=device)
    # Against the exact statistics of the y the kernel stored (y's own float32 rounding at 1e4
    # would otherwise dominate the comparison).
    assert_stats_of_stored_y(*ops.dpe_bn_stats(x, w, b, backend="triton"), assert_close)
    # And the gradient path, y - mean recomputed against the float64 reference.
    grads = [torch.randn(shape, device=device), torch.randn(20, device=device), torch.randn(20, device=device)]
    got = _run(x, w, b, "triton", grads)
    ref = _run(x.double(), w.double(), b.double(), "reference", [g.double() for g in grads])
    for name, a, e in zip(NAMES[3:], got[3:], ref[3:]):
        # float32 holds a mean near 1e4 to ~5e-4, which (y - mean) carries against O(1)
        # deviations (the float32 reference BatchNorm does too): held at 1e-3 here, not 1e-5.
        assert_close(a, e, rtol=1e-3, name=name)


@needs_triton
@pytest.mark.parametrize("backend", ("triton", "reference"))
def test_dpe_bn_stats_autocast(backend, device):
    """Custom ops ignore autocast: the op casts its inputs itself; y comes in the autocast dtype,
    the statistics in float32."""
    if device.type == "cpu" and backend == "triton" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    x = make_x((1, 20, 2, 3, 3), torch.float32, "channels_last", device)
    w, b = _params(20, (3, 3, 3), torch.float32, True, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, mean, var = ops.dpe_bn_stats(x, w, b, backend=backend)
    expected = ops.dpe_bn_stats(x.bfloat16(), w.bfloat16(), b.bfloat16(), backend=backend)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    for a, e in zip((y, mean, var), expected):
        assert torch.equal(a, e)


def test_dpe_bn_stats_auto_on_cpu_float64():
    """float64 and CPU tensors: "auto" runs the reference (float64 statistics); "triton" by name
    raises saying why."""
    x = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    w, b = _params(4, (3, 3, 3), torch.float64, True, "cpu")
    assert ops.backend_for(ops.dpe_bn_stats, x, w, b) == "reference"
    y, mean, var = ops.dpe_bn_stats(x, w, b)
    assert y.dtype == mean.dtype == var.dtype == torch.float64
    if HAS_TRITON:
        with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32; got torch.float64"):
            ops.dpe_bn_stats(x, w, b, backend="triton")
        with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32; got torch.float64"):
            ops.backend_for(ops.dpe_bn_stats, x, w, b, backend="triton")


@needs_triton
def test_dpe_bn_stats_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import uniformer_fast.kernels as kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
    x = torch.randn(1, 4, 2, 3, 3)
    w, b = _params(4, (3, 3, 3), torch.float32, True, "cpu")
    with pytest.raises(BackendUnavailableError, match="dpe_bn_stats: backend 'triton'.*TRITON_INTERPRET"):
        ops.dpe_bn_stats(x, w, b, backend="triton")


_X = torch.randn(1, 4, 3, 3, 3)
_W = torch.randn(4, 1, 3, 3, 3)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(4, 3, 3, 3), _W), {}, ValueError, r"x must be 5-D"),
    (("x", _W), {}, TypeError, "x must be a torch.Tensor"),
    ((_X, torch.randn(4, 1, 3, 4, 3)), {}, ValueError, "odd kt, kh, kw"),
    ((_X, torch.randn(5, 1, 3, 3, 3)), {}, ValueError, "weight must have shape"),
    ((_X, _W.double()), {}, TypeError, "weight must have the dtype of x"),
    ((_X, _W, torch.randn(3)), {}, ValueError, r"bias must have shape \(4,\)"),
    ((_X, _W, torch.randn(4).half()), {}, TypeError, "bias must have the dtype of x"),
    ((_X.int(), _W), {}, TypeError, "x must be float16, bfloat16, float32 or float64"),
    ((torch.randn(1, 4, 0, 3, 3), _W), {}, ValueError, "x must not be empty"),
    ((_X, _W), {"backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_dpe_bn_stats_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.dpe_bn_stats(*args, **kwargs)


# --- the CBlock's training path -------------------------------------------------------------------

def _fused_bn_backends(backend):
    """Everything on "reference" but the two BatchNorm-statistics ops, on ``backend``."""
    stack = contextlib.ExitStack()
    stack.enter_context(ops.use_backend("reference"))
    for op in ("dpe_bn_stats", "local_mhra_tail_bn_stats"):
        stack.enter_context(ops.use_backend(backend, op=op))
    return stack


def _cblock_steps(blk, xs, backend, spy):
    """Two training steps of ``blk`` on ``backend`` for dpe_bn_stats and local_mhra_tail_bn_stats
    (everything else "reference"): per step the output, the input gradient, every parameter
    gradient and both BNs' buffers (running mean and variance, then num_batches_tracked)."""
    results = []
    for x in xs:
        blk.zero_grad()
        xi = x.detach().requires_grad_()
        with _fused_bn_backends(backend):
            y = blk(xi)
        y.pow(2).sum().backward()
        buffers = [getattr(bn, n).clone() for bn in (blk.norm1, blk.norm2) for n in ("running_mean", "running_var")]
        counts = [bn.num_batches_tracked.clone() for bn in (blk.norm1, blk.norm2)]
        results.append([y, xi.grad] + [p.grad.clone() for p in blk.parameters()] + buffers + [counts])
    calls = {op: len(c) for op, c in spy.items()}
    for c in spy.values():
        c.clear()
    return results, calls


@pytest.mark.slow  # a CBlock's training step under the interpreter: ~20 s each (the ops' own tests are fast)
@needs_triton
@pytest.mark.parametrize("momentum", (0.1, None), ids=("momentum", "cumulative"))
def test_cblock_train_triton_matches_reference(momentum, device, assert_close, monkeypatch):
    """A training CBlock whose DPE emits norm1's statistics (BN folded into conv1) and whose Local
    MHRA tail emits norm2's (BN folded into fc1 + GELU) against the same block with plain
    BatchNorms in float64: output, every gradient, both BNs' running statistics, two steps."""
    from uniformer_fast.model import CBlock
    torch.manual_seed(0)
    blk = CBlock(20, mlp_ratio=2.0).to(device).train()
    with torch.no_grad():  # non-trivial BN parameters and buffers
        for bn in (blk.norm1, blk.norm2):
            bn.momentum = momentum
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    ref_blk = copy.deepcopy(blk).double()
    spy = {}
    for op in ("dpe_bn_stats", "local_mhra_tail_bn_stats"):
        real = getattr(ops, op)
        calls = spy[op] = []
        # wraps: the spy keeps the op's name, by which ops.backend_for knows it.
        monkeypatch.setattr(ops, op, functools.wraps(real)(
            lambda *a, _real=real, _calls=calls, **k: _calls.append(1) or _real(*a, **k)))
    xs = [make_x((2, 20, 2, 3, 3), torch.float32, "channels_last", device) + i for i in range(2)]
    got, fused_calls = _cblock_steps(blk, xs, "triton", spy)
    expected, ref_calls = _cblock_steps(ref_blk, [x.double() for x in xs], "reference", spy)
    # The fused routes on "triton"; plain nn.BatchNorm3d (the ops never called) on "reference".
    assert fused_calls == {"dpe_bn_stats": 2, "local_mhra_tail_bn_stats": 2}
    assert ref_calls == {"dpe_bn_stats": 0, "local_mhra_tail_bn_stats": 0}
    names = (["y", "dx"] + [n for n, _ in blk.named_parameters()]
             + [f"{bn}.{n}" for bn in ("norm1", "norm2") for n in ("running_mean", "running_var")])
    for step, (g, e) in enumerate(zip(got, expected)):
        for a, r in zip(g[-1], e[-1]):
            assert torch.equal(a, r) and a.item() == step + 1, "num_batches_tracked"
        for name, a, r in zip(names, g[:-1], e[:-1]):
            assert_close(a, r, rtol=1e-5, name=f"step {step + 1} {name}")


@pytest.mark.slow  # ~12 s each under the interpreter
@needs_triton
@pytest.mark.parametrize("mode", ("bf16_model", "autocast"))
def test_cblock_train_triton_bfloat16(mode, device, assert_close):
    """The folds with 16-bit activations: float32 statistics, BN parameters and conv1 / fc1
    weights in the model's dtype (bf16 model) or float32 under autocast, within bf16 tolerance of
    float64.

    Under the interpreter float32 -> bfloat16 casts truncate (the GPU rounds to nearest), and
    norm2's fused route runs the Triton tail kernel, which casts twice (its depthwise output and
    y): measured here, dx 2.00e-2 of max |dx| with the Triton tail and plain norm2, 2.16e-2 with
    norm2 fused under autocast (1.58e-2 with the reference tail, whose casts round). So 2.5e-2
    under the interpreter, the bf16 2e-2 on a GPU."""
    from uniformer_fast.model import CBlock
    torch.manual_seed(0)
    blk = CBlock(20).to(device).train()
    ref_blk = copy.deepcopy(blk).double()
    x = make_x((2, 20, 1, 3, 3), torch.float32, "channels_last", device)
    xr = x.double().requires_grad_()
    y_ref = ref_blk(xr)
    y_ref.pow(2).sum().backward()
    if mode == "bf16_model":
        blk, x, ctx = blk.bfloat16(), x.bfloat16(), torch.autocast(device.type, enabled=False)
    else:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16)
    xi = x.detach().requires_grad_()
    # The Local MHRA's depthwise conv on "triton" too: the CPU's bf16 F.conv3d weight gradient
    # (the reference) is off by ~50% here, far outside bf16 tolerance.
    with _fused_bn_backends("triton"), ops.use_backend("triton", op="dwconv3d"), ctx:
        y = blk(xi)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    rtol = 2.5e-2 if INTERPRET else None  # see the docstring: the interpreter truncates casts
    assert_close(y, y_ref, dtype=torch.bfloat16, rtol=rtol, name="y")
    assert_close(xi.grad, xr.grad, dtype=torch.bfloat16, rtol=rtol, name="dx")
    for (name, p), (_, r) in zip(blk.named_parameters(), ref_blk.named_parameters()):
        assert_close(p.grad, r.grad, dtype=torch.bfloat16, rtol=rtol, name=name)
    for bn in ("norm1", "norm2"):
        for name in ("running_mean", "running_var"):
            assert_close(getattr(getattr(blk, bn), name), getattr(getattr(ref_blk, bn), name),
                         dtype=torch.bfloat16, rtol=rtol, name=f"{bn}.{name}")


@needs_triton
def test_cblock_eval_and_reference_paths_unchanged(device, assert_close):
    """Eval mode (running statistics) never takes the fused routes (norm1's nor norm2's), and the
    model's reference backend is plain BatchNorm: both agree with the unfused composition."""
    from uniformer_fast.model import CBlock
    blk = CBlock(20).to(device).eval()
    x = make_x((2, 20, 2, 3, 3), torch.float32, "channels_last", device)
    with _fused_bn_backends("triton"), ops.use_backend("triton", op="local_mhra_tail"):
        assert ops.get_backend("dpe_bn_stats") == ops.get_backend("local_mhra_tail_bn_stats") == "triton"
        y = blk(x)
    with ops.use_backend("reference"):
        y_ref = blk(x)
        assert ops.backend_for(ops.dpe_bn_stats, x, blk.pos_embed.weight, blk.pos_embed.bias) == "reference"
        tail = (x, blk.attn.weight, None, blk.conv2.weight, None)
        assert ops.backend_for(ops.local_mhra_tail_bn_stats, *tail) == "reference"
    assert torch.equal(blk.norm1.num_batches_tracked, torch.tensor(0))
    assert torch.equal(blk.norm2.num_batches_tracked, torch.tensor(0))
    assert_close(y, y_ref.double(), rtol=1e-5, name="eval")


@needs_triton
def test_cblock_train_single_value_per_channel_raises(device):
    from uniformer_fast.model import CBlock
    blk = CBlock(4).to(device).train()
    with ops.use_backend("triton", op="dpe_bn_stats"), \
            pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        blk(torch.randn(1, 4, 1, 1, 1, device=device))


# --- ahead-of-time compile for sm_80 / sm_90 ------------------------------------------------------
# The forward with STATS is compiled at the DPE's configs in tests/test_dwconv3d_compile.py
# (test_forward_with_stats_compiles); here the statistics' merge and backward (kernels/bn_stats.py).

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@pytest.fixture
def gpu_configs(gpu_kernels):
    return gpu_kernels("bn_stats")


@matrix(cover="one", arch=(80, 90), prefer=lambda arch: arch == 90)
def test_bn_stats_kernels_compile_without_spills(arch, compile_for_gpu, gpu_configs):
    """The merge (each level the launcher runs: the tiles in one final level, the tiles into
    groups, the groups' final level) and the statistics backward (with and without y's own
    gradient, each dtype) compile for sm_80 and sm_90 without register spills. Absent pointers
    are None, as the launchers pass them; the kernels' heuristics derive FROM_TILES and HAS_DY."""
    K = gpu_configs
    mcfg = K.merge_config()
    msig = dict(shift_ptr="*fp32", count_ptr="*fp32", mean_ptr="*fp32", sdev_ptr="*fp32", m2_ptr="*fp32",
                out_count_ptr="*fp32", out_mean_ptr="*fp32", out_m2_ptr="*fp32", C="i32", G="i32",
                rows_per_prog="i32", THW="i32", tiles_per_batch="i32")
    # (level, the pointers it passes as None, FINAL)
    levels = (("tiles, final", ("count_ptr", "out_count_ptr"), True),
              ("tiles to groups", ("count_ptr",), False),
              ("groups, final", ("sdev_ptr", "out_count_ptr"), True))
    for what, nones, final in levels:
        sig = {k: v for k, v in msig.items() if k not in nones}
        aligned = [k for k, v in sig.items() if v.startswith("*") or k == "C"]
        r = compile_for_gpu(K.bn_partials_merge_kernel, sig,
                            dict(dict.fromkeys(nones), TILE_P=64, FINAL=final,
                                 BLOCK_G=mcfg["BLOCK_G"], BLOCK_C=mcfg["BLOCK_C"]),
                            arch, K.MERGE_NUM_WARPS, aligned=aligned)
        assert_no_spills(r, f"bn_partials_merge {what} {mcfg} sm_{arch}")
    for dt, pp in PTR.items():
        for has_dy in (True, False):
            bsig = dict(y_ptr=pp, dy_ptr=pp, mean_ptr="*fp32", k_mean_ptr="*fp32", k_var_ptr="*fp32", dyt_ptr=pp,
                        C="i32", T="i32", H="i32", W="i32", num_tokens="i32",
                        stride_dyb="i32", stride_dyt="i32", stride_dyh="i32", stride_dyw="i32")
            nones = {} if has_dy else {"dy_ptr": None}
            bsig = {k: v for k, v in bsig.items() if k not in nones}
            baligned = [k for k, v in bsig.items() if v.startswith("*") or k.startswith("stride") or k == "C"]
            bcfg = K.bwd_config()
            warps = bcfg.pop("num_warps")
            r = compile_for_gpu(K.bn_stats_bwd_kernel, bsig, dict(nones, **bcfg), arch, warps, aligned=baligned)
            assert_no_spills(r, f"bn_stats_bwd {dt} dy={has_dy} {bcfg} warps {warps} sm_{arch}")
