"""Input makers shared by the kernel tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch

from uniformer_fast import ops

CL = torch.channels_last_3d
LAYOUTS = ("contiguous", "channels_last", "sliced_channels_last", "sliced_contiguous")


def make_x(shape, dtype, layout, device) -> torch.Tensor:
    """x (B, C, T, H, W) in the given layout; the "sliced_*" ones are views of a larger tensor (a
    channel window, a T window and every other W column), so their strides are not dense and
    their data pointer is offset."""
    B, C, T, H, W = shape
    if layout.startswith("sliced"):
        big = torch.randn(B, C + 3, T + 1, H, 2 * W + 1, device=device).to(dtype)
        if layout == "sliced_channels_last":
            big = big.to(memory_format=CL)
        x = big[:, 1:C + 1, 1:, :, 1::2]
        assert x.shape == shape and not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
        return x
    x = torch.randn(shape, device=device).to(dtype)
    return x.to(memory_format=CL) if layout == "channels_last" else x


def run_dwconv3d(x, w, b, residual, backend, grad_y):
    """``ops.dwconv3d`` forward and backward on fresh leaves: (y, dx, dweight, dbias or None)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = ops.dwconv3d(x, w, b, residual=residual, backend=backend)
    y.backward(grad_y.to(y.dtype))
    return y, x.grad, w.grad, None if b is None else b.grad
