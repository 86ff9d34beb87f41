"""Depthwise 3-D convolution (the DPE and the Local MHRA affinity): validation and dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from . import extension
from ..kernels.tiles import MAX_KERNEL, why_not_inputs
from .checks import check_like, check_optional_vector, check_tensor
from .layout import channels_last, empty_channels_last, weight_taps
from .reference import dwconv3d_reference


def check_dwconv3d_args(x, weight, bias, residual):
    """Raise ValueError/TypeError, naming the argument, unless these are dwconv3d's arguments (also
    the DPE ops', whose convolution this is)."""
    check_tensor("x", x, ndim=5, form="(B, C, T, H, W)")
    C = x.shape[1]
    form = f"({C}, 1, kt, kh, kw) with odd kt, kh, kw <= {MAX_KERNEL}"
    check_tensor("weight", weight, ndim=5, form=form)
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight must have shape {form} for x with C={C}; got {tuple(weight.shape)}")
    if any(k % 2 == 0 or k > MAX_KERNEL for k in weight.shape[2:]):
        raise ValueError(f"weight must have shape {form}; got kernel {tuple(weight.shape[2:])}")
    check_like("weight", weight, "x", x)
    check_optional_vector("bias", bias, C, "x", x)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool; got {type(residual).__name__}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty; got shape {tuple(x.shape)}")


def dwconv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
             residual: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise 3-D convolution with stride 1 and zero "same" padding.

    Args:
        x: (B, C, T, H, W), any memory format (``channels_last_3d`` is the fast layout).
        weight: (C, 1, kt, kh, kw) with odd kt, kh, kw up to 7.
        bias: (C,) or None.
        residual: also add ``x`` to the result (the DPE's ``x + pos_embed(x)``).
        backend: ``"reference"``, ``"triton"``, ``"cpp"`` or ``"auto"``; ``None`` takes the one set
            by :func:`use_backend` / :func:`set_backend`.

    Returns:
        ``conv(x) + bias (+ x)``, shape (B, C, T, H, W). Under autocast, in the autocast dtype.
    """
    return _backend.dispatch("dwconv3d", backend, x, weight, bias, residual)


def _prepare(x, weight, bias=None, residual=False):
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    check_dwconv3d_args(x, weight, bias, residual)
    return x, weight, bias, residual


_backend.define_op("dwconv3d", auto={"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")},
                   prepare=_prepare)
_backend.register("dwconv3d", "reference")(dwconv3d_reference)


# --- "cpp": the C++ CPU kernels (csrc/, built into uniformer_fast._C by `pip install .`) ---------

def _cpp_why_not(x, weight, bias, residual):
    reason = extension.why_unavailable("dwconv3d")
    if reason is not None:
        return reason
    if x.device.type != "cpu":
        return f"needs CPU tensors; got {x.device.type}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"supports float32, bfloat16 and float16; got {x.dtype}"
    return None


# One opaque op per kernel direction, each with a fake (shapes only) so torch.compile traces
# through them without a graph break; the autograd.Functions string them together.

@torch.library.custom_op("uniformer_fast::dwconv3d_cpp_fwd", mutates_args=())
def dwconv3d_cpp_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                     flip: bool) -> torch.Tensor:
    """x (B, C, T, H, W) with unit channel stride -> (B, C, T, H, W) in channels_last_3d memory.
    weight (C, 1, kt, kh, kw) and bias (C,) are read through their strides (point-reflected weight
    if ``flip``), so no weight copies are made here."""
    B, C, T, H, W = x.shape
    y = empty_channels_last(x)
    sb, _, st, sh, sw = x.stride()
    wc, _, wt, wh, ww = weight.stride()
    extension.C.dwconv3d_fwd(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                      B, C, T, H, W, *weight.shape[2:], sb, st, sh, sw, wc, wt, wh, ww,
                      1 if bias is None else bias.stride(0), flip, residual, torch.get_num_threads())
    return y


@dwconv3d_cpp_fwd.register_fake
def _(x, weight, bias, residual, flip):
    return empty_channels_last(x)


@torch.library.custom_op("uniformer_fast::dwconv3d_cpp_bwd", mutates_args=())
def dwconv3d_cpp_bwd(x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, residual: bool,
                     need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight (C, 1, kt, kh, kw), dbias (C,)) in one call; x with unit channel stride, grad_y
    dense channels_last_3d, weight read through its strides. dx (dense channels_last_3d,
    ``+ grad_y`` if ``residual``) only if ``need_x``, else an empty (0,) tensor. Reduced in a fixed
    order: the same bits for any thread count."""
    B, C, T, H, W = x.shape
    kernel_size = weight.shape[2:]
    dx = empty_channels_last(x) if need_x else x.new_empty(0)
    dw = x.new_empty((C, 1, *kernel_size))
    db = x.new_empty(C)
    sb, _, st, sh, sw = x.stride()
    wc, _, wt, wh, ww = weight.stride()
    extension.C.dwconv3d_bwd(x.data_ptr(), grad_y.data_ptr(), weight.data_ptr(), dx.data_ptr() if need_x else 0,
                      dw.data_ptr(), db.data_ptr(), B, C, T, H, W, *kernel_size, sb, st, sh, sw,
                      wc, wt, wh, ww, residual, torch.get_num_threads())
    return dx, dw, db


@dwconv3d_cpp_bwd.register_fake
def _(x, grad_y, weight, residual, need_x):
    C = x.shape[1]
    dx = empty_channels_last(x) if need_x else x.new_empty(0)
    return dx, x.new_empty((C, 1, *weight.shape[2:])), x.new_empty(C)


class _DWConv3dCpp(torch.autograd.Function):
    """dwconv3d on the C++ kernels; activations and gradients (B, C, T, H, W) channels_last_3d."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        x = channels_last(x)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.residual = bias is not None, residual
        return dwconv3d_cpp_fwd(x, weight.detach(), None if bias is None else bias.detach(), residual, False)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        gy = grad_y.contiguous(memory_format=torch.channels_last_3d)
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = grad_w = grad_b = None
        if need_w or need_b:  # dx (if wanted), dw and db in one call
            dx, dw, db = dwconv3d_cpp_bwd(x, gy, weight, ctx.residual, need_x)
            grad_x = dx if need_x else None
            grad_w = dw if need_w else None
            grad_b = db if need_b else None
        elif need_x:  # dx alone: conv(gy, reflected weight) (+ gy)
            grad_x = dwconv3d_cpp_fwd(gy, weight, None, ctx.residual, True)
        return grad_x, grad_w, grad_b, None


@_backend.register("dwconv3d", "cpp", why_not=_cpp_why_not)
def dwconv3d_cpp(x, weight, bias=None, residual=False):
    """The "cpp" backend: x (B, C, T, H, W) on the CPU, any memory format (read in place if its
    channel stride is 1, else converted once); returns (B, C, T, H, W) channels_last_3d.

    The kernels compute in float32; bfloat16 and float16 inputs (autocast) are converted on the
    way in and the result rounded once on the way out, differentiably. ATen's own half-precision
    3-D convolution on the CPU is a direct loop tens of times slower than these passes."""
    if x.dtype != torch.float32:
        y = dwconv3d_cpp(channels_last(x).float(), weight.float(), None if bias is None else bias.float(), residual)
        return y.to(x.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _DWConv3dCpp.apply(x, weight, bias, residual)
    return dwconv3d_cpp_fwd(channels_last(x), weight, bias, residual, False)  # inference: no autograd bookkeeping


# --- "triton": the fused kernels in kernels/dwconv3d.py -------------------------------------------

def dwconv3d_triton_why_not(x, weight, bias, residual):
    return why_not_inputs("dwconv3d", "x", x, weight, bias)


@torch.library.custom_op("uniformer_fast::dwconv3d_triton_fwd", mutates_args=())
def dwconv3d_triton_fwd(x: torch.Tensor, weight_taps: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                        kernel_size: list[int]) -> torch.Tensor:
    """x (B, C, T, H, W) with unit channel stride, weight_taps (kt*kh*kw, C) -> (B, C, T, H, W) in
    dense channels_last_3d memory."""
    from ..kernels.dwconv3d import dwconv3d_fwd
    return dwconv3d_fwd(x, weight_taps, bias, residual, tuple(kernel_size))


@dwconv3d_triton_fwd.register_fake
def _(x, weight_taps, bias, residual, kernel_size):
    return empty_channels_last(x)


@torch.library.custom_op("uniformer_fast::dwconv3d_triton_bwd_dw", mutates_args=())
def dwconv3d_triton_bwd_dw(x: torch.Tensor, grad_y: torch.Tensor,
                           kernel_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight taps (kt*kh*kw, C), dbias (C,)), float32, deterministic."""
    from ..kernels.dwconv3d import dwconv3d_bwd_dw
    return dwconv3d_bwd_dw(x, grad_y, tuple(kernel_size), with_bias=True)


@dwconv3d_triton_bwd_dw.register_fake
def _(x, grad_y, kernel_size):
    C = x.shape[1]
    taps = kernel_size[0] * kernel_size[1] * kernel_size[2]
    return x.new_empty((taps, C), dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


class _DWConv3dTriton(torch.autograd.Function):
    """dwconv3d on the Triton kernels. Activations and gradients are (B, C, T, H, W) with unit
    channel stride; outputs and input gradients come in dense ``channels_last_3d`` memory."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        x = channels_last(x)
        b = None if bias is None else bias.detach()
        kernel = list(weight.shape[2:])
        y = dwconv3d_triton_fwd(x, weight_taps(weight), b, residual, kernel)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.residual = bias is not None, residual
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        # Any B/T/H/W strides are read in place; a gradient without unit channel stride (e.g. the
        # stride-0 one of y.sum().backward()) is made channels-last once.
        gy = channels_last(grad_y)
        return (*dwconv3d_triton_backward(x, gy, weight, ctx.residual, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]),
                None)


def dwconv3d_triton_backward(x, gy, weight, residual, need_x, need_w, need_b):
    """(dx, dweight, dbias) of ``conv(x) + bias (+ x)`` on the Triton kernels, None where not
    needed. x and gy with unit channel stride; dweight and dbias deterministic."""
    kernel = list(weight.shape[2:])
    grad_x = grad_w = grad_b = None
    if need_x:
        # dx = conv(dy, point-reflected kernel) (+ dy for the residual), the forward kernel.
        grad_x = dwconv3d_triton_fwd(gy, weight_taps(weight, flip=True), None, residual, kernel)
    if need_w or need_b:
        dw_taps, db = dwconv3d_triton_bwd_dw(x, gy, kernel)
        if need_w:
            grad_w = dw_taps.t().reshape(weight.shape).to(weight.dtype)
        if need_b:
            grad_b = db.to(weight.dtype)
    return grad_x, grad_w, grad_b


@_backend.register("dwconv3d", "triton", why_not=dwconv3d_triton_why_not)
def dwconv3d_triton(x, weight, bias=None, residual=False):
    """The "triton" backend: x (B, C, T, H, W) float16/bfloat16/float32 on a CUDA device (or on
    the CPU under ``TRITON_INTERPRET=1``), any memory format: read in place if its channel stride
    is 1 (``channels_last_3d`` or a B/T/H/W slice of it), else converted to ``channels_last_3d``
    once. Returns (B, C, T, H, W) in dense ``channels_last_3d`` memory; gradients likewise for x,
    float32-accumulated and deterministic for weight and bias."""
    return _DWConv3dTriton.apply(x, weight, bias, residual)
