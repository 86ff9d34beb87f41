"""ops.local_mhra_tail_bn_stats: the fused Local MHRA tail ``y = residual + conv2(dwconv(u) +
attn_bias)`` with the batch statistics of y for the CBlock's ``norm2`` (kernels/local_mhra.py's
STATS epilogue, merged by kernels/dpe_bn.py's merge kernel; backward through kernels/dpe_bn.py's
statistics-gradient kernel, then the tail's).

Parity of the "triton" backend with the float64 ground truth (ops.local_mhra_tail_reference, then
torch.var_mean) for y, mean, var and the gradients of u, attn_weight, attn_bias, conv2_weight,
conv2_bias and residual, with upstream gradients on all three outputs (or some of them); edge
shapes; a large-mean input where float32 sum / sum-of-squares statistics would fail; the
"reference" backend. (The custom op's contract: opcheck, torch.compile, y.sum() gradients and
determinism, in tests/test_op_contracts.py.) The CBlock's use of the op is tested with norm1's in
tests/test_dpe_bn.py, the kernel's ahead-of-time compile in tests/test_local_mhra.py.

Under the interpreter (~0.1 ms per operation per program) the shapes are tiny: its 32-position
tile leaves a partial last tile, and its 4-row merge groups make both merge levels run where a
shape has more than 4 tiles.
"""

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError

from helpers import assert_all_close, assert_stats_of_stored_y, assert_untouched, clones, make_x

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

CL = torch.channels_last_3d
NAMES = ("y", "mean", "var", "du", "dattn_weight", "dattn_bias", "dconv2_weight", "dconv2_bias", "dresidual")


def _inputs(shape, kernel, dtype, device, layout="channels_last", attn_bias=True, conv2_bias=True,
            residual=True, offset=0.0):
    C = shape[1]
    u = make_x(shape, dtype, layout, device)
    # Scaled so that y is O(1) (plus ``offset``, added to the residual) for every C and kernel.
    aw = torch.randn((C, 1) + tuple(kernel), device=device) / (kernel[0] * kernel[1] * kernel[2]) ** 0.5
    w2 = torch.randn(C, C, 1, 1, 1, device=device) / C ** 0.5
    r = (make_x(shape, torch.float32, layout, device) + offset).to(dtype) if residual else None
    return [u, aw.to(dtype), torch.randn(C, device=device).to(dtype) if attn_bias else None,
            w2.to(dtype), torch.randn(C, device=device).to(dtype) if conv2_bias else None, r]


def _ground_truth(*args):
    """float64: the unfused tail, then the biased batch statistics of its output."""
    y = ops.local_mhra_tail_reference(*args)
    var, mean = torch.var_mean(y, dim=(0, 2, 3, 4), correction=0)
    return y, mean, var


def _run(fn, inputs, grads):
    """Forward, then backward with upstream gradients ``grads`` for (y, mean, var) (None: that
    output unused). Returns [y, mean, var, *input grads]."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    used = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return list(outs) + [None if t is None else t.grad for t in leaves]


def _check(shape, kernel, dtype, device, assert_close, outputs=("y", "mean", "var"), backend="triton",
           rtol_loose=None, **opts):
    C = shape[1]
    inputs = _inputs(shape, kernel, dtype, device, **opts)
    grads = [torch.randn(shape, device=device).to(dtype) if "y" in outputs else None,
             torch.randn(C, device=device) if "mean" in outputs else None,
             torch.randn(C, device=device) if "var" in outputs else None]
    before = clones(inputs)
    got = _run(lambda *a: ops.local_mhra_tail_bn_stats(*a, backend=backend), inputs, grads)
    ref = _run(_ground_truth, [None if t is None else t.double() for t in inputs],
               [None if g is None else g.double() for g in grads])
    assert_untouched(inputs, before)
    y, mean, var = got[:3]
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.shape == shape and y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert mean.shape == var.shape == (C,) and mean.dtype == var.dtype == stats_dtype
    # The statistics are float32 whatever the activation dtype, of y as stored: in 16-bit dtypes
    # they carry y's rounding.
    assert_all_close(NAMES, got, ref, dtype, assert_close, f"{shape} {kernel} {dtype} {backend} {outputs} {opts}",
                     rtol=lambda name: rtol_loose if name.startswith("d") or name == "var" else None)
    return got


@pytest.mark.parametrize("shape,kernel", [
    pytest.param((2, 20, 3, 4, 5), (5, 5, 5), marks=pytest.mark.slow),  # C = 20 < BLOCK_C = 32; 60 positions: the second tile partial
    ((3, 16, 3, 4, 5), (3, 3, 3)),  # 6 tile rows: both merge levels
    ((2, 3, 2, 3, 3), (3, 3, 3)),  # C = 3, odd, padded to 16
    ((2, 16, 1, 4, 4), (3, 3, 3)),  # T = 1
    ((1, 33, 2, 3, 1), (3, 3, 3)),  # C = 33 (three merge channel blocks), W = 1
], ids=lambda v: "x".join(map(str, v)))
def test_triton_shapes(shape, kernel, device, assert_close):
    _check(shape, kernel, torch.float32, device, assert_close)


@pytest.mark.parametrize("attn_bias,conv2_bias,residual", [(False, False, False), (True, False, True)],
                         ids=("none", "no_conv2_bias"))
def test_triton_optional_arguments(attn_bias, conv2_bias, residual, device, assert_close):
    _check((1, 16, 2, 3, 4), (3, 3, 3), torch.float32, device, assert_close, attn_bias=attn_bias,
           conv2_bias=conv2_bias, residual=residual)


def test_triton_sliced_layout(device, assert_close):
    _check((2, 16, 2, 3, 3), (3, 3, 3), torch.float32, device, assert_close, layout="sliced_channels_last")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_triton_half_dtypes(dtype, device, assert_close):
    # bf16 stores truncate under the interpreter (1 ulp from the GPU's rounding): within 2e-2.
    _check((1, 32, 2, 3, 4), (3, 3, 3), dtype, device, assert_close)


@pytest.mark.parametrize("outputs", (("y",), ("mean", "var"), ("y", "var")), ids="+".join)
def test_triton_some_outputs_used(outputs, device, assert_close):
    _check((1, 20, 2, 3, 3), (3, 3, 3), torch.float32, device, assert_close, outputs=outputs)


def test_triton_large_mean(device, assert_close):
    """|mean| / std ~ 1e4 (a residual stream far from zero): float32 sum and sum of squares would
    lose the variance; the per-tile (hi, sum of deviations, M2) partials and the merge keep it."""
    shape = (3, 16, 3, 4, 5)  # 6 tile rows: both merge levels
    inputs = _inputs(shape, (3, 3, 3), torch.float32, device, offset=1.0e4)
    # Against the exact statistics of the y the kernel stored (its own float32 rounding at 1e4
    # would otherwise dominate).
    assert_stats_of_stored_y(*ops.local_mhra_tail_bn_stats(*inputs, backend="triton"), assert_close)
    # Against float64 from the inputs: float32 holds y (and the mean) near 1e4 to ~5e-4, which
    # the variance and every gradient through y - mean carry against O(1) deviations: 1e-3 for
    # those, as tests/test_dpe_bn.py.
    _check(shape, (3, 3, 3), torch.float32, device, assert_close, rtol_loose=1e-3, offset=1.0e4)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_reference_backend(dtype, assert_close):
    """The composed "reference" backend (ops.local_mhra_tail, then torch.var_mean)."""
    _check((2, 20, 2, 3, 4), (5, 5, 5), dtype, torch.device("cpu"), assert_close, backend="reference")


def test_auto_and_errors(device):
    args = _inputs((1, 16, 1, 2, 2), (3, 3, 3), torch.float32, device)
    expected = "triton" if device.type == "cuda" else "reference"
    assert ops.backend_for(ops.local_mhra_tail_bn_stats, *args) == expected
    assert ops.backend_for(ops.local_mhra_tail_bn_stats, *args, backend="triton") == "triton"
    f64 = [None if t is None else t.double() for t in args]
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32; got torch.float64"):
        ops.local_mhra_tail_bn_stats(*f64, backend="triton")
    big = _inputs((1, 160, 1, 2, 2), (3, 3, 3), torch.float32, device)
    with pytest.raises(BackendUnavailableError, match="local_mhra_tail_bn_stats: backend 'triton'.*at most 128"):
        ops.backend_for(ops.local_mhra_tail_bn_stats, *big, backend="triton")
    with pytest.raises(ValueError, match=r"conv2_weight must have shape \(16, 16, 1, 1, 1\)"):
        ops.local_mhra_tail_bn_stats(args[0], args[1], args[2], args[3][:, :8], args[4], args[5])
