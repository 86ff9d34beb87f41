"""The "triton" backend of ops.dwconv3d (kernels/dwconv3d.py): parity with the float64 reference
for the output, dx, dweight and dbias over edge shapes, every kernel-size form, residual and bias
on/off, every dtype and input layout; errors. (Its custom ops' contract: opcheck, torch.compile,
y.sum() gradients and bitwise determinism, in tests/test_op_contracts.py.)

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which costs ~0.1 ms per operation per program: the shapes are tiny but cross every edge (channels
not a multiple of the 16-channel interpreter block, position tiles that straddle batch elements,
weight-gradient groups with a tile past the end, T=1, H=W=1, kernels larger than the input).
"""

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError
from uniformer_fast.ops import depthwise_conv as dwconv3d_module

from helpers import LAYOUTS, assert_all_close, assert_untouched, clones, make_x, matrix, run_dwconv3d

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

CL = torch.channels_last_3d


def _check(shape, kernel, dtype, residual, with_bias, layout, device, assert_close):
    C = shape[1]
    x = make_x(shape, dtype, layout, device)
    w = torch.randn((C, 1) + tuple(kernel), device=device).to(dtype)
    b = torch.randn(C, device=device).to(dtype) if with_bias else None
    gy = torch.randn(shape, device=device).to(dtype)
    before = clones([x])
    out = run_dwconv3d(x, w, b, residual, "triton", gy)
    # The reference sees the very values the kernel saw, in float64.
    ref = run_dwconv3d(x.double(), w.double(), None if b is None else b.double(), residual, "reference",
                       gy.double())
    assert_untouched([x], before)
    y = out[0]
    assert y.shape == shape and y.dtype == dtype and y.device == x.device
    assert y.is_contiguous(memory_format=CL), "the output must be dense channels_last_3d"
    assert_all_close(("y", "dx", "dweight", "dbias"), out, ref, dtype, assert_close,
                     f"{shape} {kernel} {dtype} {layout}")
    return out


@pytest.mark.parametrize("shape,kernel", [
    ((2, 20, 3, 4, 5), (3, 3, 3)),  # C = 16 + 4: a partial channel block
    ((3, 5, 2, 3, 4), (3, 3, 3)),  # 3 tiles: the last weight-gradient group has a tile past the end
    pytest.param((2, 4, 3, 6, 5), (3, 3, 3), marks=pytest.mark.slow),  # 90 positions: two tiles per batch element, the second partial
    ((1, 16, 1, 4, 4), (3, 3, 3)),  # T = 1
    ((2, 5, 3, 1, 1), (3, 3, 3)),  # H = W = 1
    ((1, 1, 2, 3, 3), (3, 3, 3)),  # C = 1
    ((1, 7, 4, 3, 6), (5, 5, 5)),  # non-square, the kernel wider than H
    ((1, 6, 2, 5, 4), (1, 3, 3)),  # the 2-D case
    ((1, 6, 5, 2, 3), (3, 1, 1)),  # the temporal case
    ((1, 6, 3, 4, 2), (1, 1, 1)),
    ((1, 4, 3, 5, 3), (3, 5, 7)),
    pytest.param((1, 3, 3, 4, 5), (7, 7, 7), marks=pytest.mark.slow),  # the largest kernel, larger than every dimension
], ids=lambda v: "x".join(map(str, v)))
def test_dwconv3d_triton_shapes_and_kernels(shape, kernel, device, assert_close):
    _check(shape, kernel, torch.float32, True, True, "channels_last", device, assert_close)


@matrix(cover="each", residual=[pytest.param(True, id="residual"), pytest.param(False, id="plain")],
        with_bias=[pytest.param(True, id="bias"), pytest.param(False, id="no_bias")], layout=LAYOUTS)
def test_dwconv3d_triton_options_and_layouts(residual, with_bias, layout, device, assert_close):
    _check((2, 20, 3, 4, 5), (3, 3, 3), torch.float32, residual, with_bias, layout, device,
           assert_close)


# The fast tier: each dtype, with and without the residual, at 3x3x3 (the kernel size is a constexpr
# of the same code; 5x5x5 runs in float32 above).
@matrix(cover="each", dtype=[pytest.param(d, id=str(d)) for d in (torch.float16, torch.bfloat16)],
        residual=[pytest.param(True, id="residual"), pytest.param(False, id="plain")], kernel=((3, 3, 3), (5, 5, 5)),
        fast=lambda dtype, residual, kernel: kernel == (3, 3, 3))
def test_dwconv3d_triton_half_dtypes(dtype, residual, kernel, device, assert_close):
    # bf16 stores truncate under the interpreter (1 ulp from the GPU's rounding): within 2e-2.
    _check((2, 20, 3, 4, 5), kernel, dtype, residual, True, "channels_last", device, assert_close)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_dwconv3d_triton_half_dtypes_sliced(dtype, device, assert_close):
    _check((1, 12, 3, 4, 3), (3, 3, 3), dtype, False, False, "sliced_channels_last", device,
           assert_close)


def test_dwconv3d_triton_grads_only_where_asked(device, assert_close):
    x = make_x((1, 5, 2, 3, 3), torch.float32, "channels_last", device)
    w = torch.randn(5, 1, 3, 3, 3, device=device)
    b = torch.randn(5, device=device)
    wg = w.clone().requires_grad_()
    ops.dwconv3d(x, wg, b, backend="triton").sum().backward()
    w64 = w.double().requires_grad_()
    ops.dwconv3d(x.double(), w64, b.double(), backend="reference").sum().backward()
    assert_close(wg.grad, w64.grad, name="dweight")
    xg = x.clone().requires_grad_()
    y = ops.dwconv3d(xg, w, b, backend="triton")
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    y = ops.dwconv3d(x, w, b, backend="triton")  # no grad anywhere: no graph
    assert not y.requires_grad


def test_dwconv3d_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import uniformer_fast.kernels as kernels
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3)
    with pytest.raises(BackendUnavailableError, match="dwconv3d: backend 'triton'.*TRITON_INTERPRET"):
        ops.dwconv3d(x, w, backend="triton")
    # "auto" never picks it for CPU tensors.
    assert ops.dwconv3d(x, w).shape == x.shape


def test_dwconv3d_triton_rejects_float64(device):
    x, w = torch.randn(1, 2, 3, 3, 3, device=device, dtype=torch.float64), \
        torch.randn(2, 1, 3, 3, 3, device=device, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 or float32; got torch.float64"):
        ops.dwconv3d(x, w, backend="triton")


@pytest.mark.parametrize("x,w,b,err,match", [
    (torch.randn(4, 3, 3, 3), torch.randn(4, 1, 3, 3, 3), None, ValueError, r"x must be 5-D"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 3, 3), None, ValueError, r"weight must be 5-D"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 3, 4, 3), None, ValueError, "odd kt, kh, kw"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 9, 3, 3), None, ValueError, "<= 7"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(5, 1, 3, 3, 3), None, ValueError, r"weight must have shape \(4, 1"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 3, 3, 3), torch.randn(3), ValueError, r"bias must have shape \(4,\)"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 3, 3, 3).half(), None, TypeError, "weight must have the dtype of x"),
    (torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 3, 3, 3), torch.randn(4).half(), TypeError, "bias must have the dtype"),
])
def test_dwconv3d_triton_bad_input(x, w, b, err, match):
    with pytest.raises(err, match=match):
        ops.dwconv3d(x, w, b, backend="triton")


def test_launcher_requires_unit_channel_stride(device):
    from uniformer_fast.kernels.dwconv3d import dwconv3d_bwd_dw, dwconv3d_fwd
    x = torch.randn(1, 4, 2, 3, 3, device=device)  # contiguous: channel stride T*H*W
    taps = torch.randn(27, 4, device=device)
    with pytest.raises(ValueError, match="x must have unit channel stride"):
        dwconv3d_fwd(x, taps, None, False, (3, 3, 3))
    with pytest.raises(ValueError, match="dy must have unit channel stride"):
        dwconv3d_bwd_dw(x.to(memory_format=CL), x, (3, 3, 3), True)


def test_dwconv3d_triton_registered():
    assert "triton" in ops.available_backends("dwconv3d")
    assert dwconv3d_module.dwconv3d_triton.__doc__


def test_dwconv3d_triton_shape_limits():
    from uniformer_fast.kernels.dwconv3d import why_not_shape
    assert why_not_shape((8, 64, 16, 56, 56)) is None
    assert "T * H * W must be below 2**31" in why_not_shape((1, 1, 2 ** 11, 2 ** 10, 2 ** 10))
    assert "at most 65535" in why_not_shape((65536, 1, 1, 1, 1))
