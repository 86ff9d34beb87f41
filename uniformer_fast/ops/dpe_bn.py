"""The CBlock's DPE with its BatchNorm statistics epilogue (training mode): ``y = x + dwconv(x) +
bias`` (the residual stream) and the per-channel batch mean and biased variance of y over
(B, T, H, W), as one op.

In a training CBlock the BatchNorm ``norm1`` needs those statistics before it can normalise; the
"triton" backend (kernels/dpe_bn.py) computes them from the convolution's registers (per-tile
``(mean, M2)`` partials merged in a fixed order), so y is not read again for them, and the model
applies the normalisation on load into ``conv1`` by folding it into conv1's weights.

Backends: ``"reference"`` composes the public op ``ops.dwconv3d(..., residual=True)`` ("auto"
still runs it on its own fast backend) with ``torch.var_mean``; ``"triton"`` is one fused pass
plus a tiny merge. ``mean`` and ``var`` are differentiable outputs on both.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from .dwconv3d import (_channels_last, _empty_channels_last, _validate as _validate_dwconv3d,
                       _weight_taps, dwconv3d, dwconv3d_triton_backward)

_backend.define_op("dpe_bn_stats", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)})


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dpe_bn_stats(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dynamic position embedding and the batch statistics a training BatchNorm takes of it.

    Args:
        x: (B, C, T, H, W), any memory format (``channels_last_3d`` is the fast layout).
        weight: (C, 1, kt, kh, kw), odd kt, kh, kw up to 7; bias: (C,) or None.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``; ``None`` takes the one in force.

    Returns:
        ``(y, mean, var)``: y (B, C, T, H, W) ``= x + dwconv(x) + bias`` (dense
        ``channels_last_3d`` on "triton"); mean and var (C,), the mean and the biased variance
        (divided by N = B*T*H*W) of y per channel, of y as stored (rounded to its dtype), in
        float32 (float64 for float64 inputs). All three are differentiable. Under autocast, y
        in the autocast dtype.
    """
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    _validate_dwconv3d(x, weight, bias, True)
    _, fn = _backend.resolve("dpe_bn_stats", backend, x.device, x, weight, bias)
    return fn(x, weight, bias)


def dpe_bn_stats_backend(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                         backend: Optional[str] = None) -> str:
    """The backend name :func:`dpe_bn_stats` would run these arguments on (raises as it would).

    The model takes its fused BatchNorm route only when this is not ``"reference"``, so that the
    reference backend stays the plain, unfused ``nn.BatchNorm3d``.
    """
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    _validate_dwconv3d(x, weight, bias, True)
    return _backend.resolve("dpe_bn_stats", backend, x.device, x, weight, bias)[0]


# --- "reference": the unfused composition through the public ops --------------------------------

@_backend.register("dpe_bn_stats", "reference")
def dpe_bn_stats_composed(x, weight, bias):
    """``ops.dwconv3d(x, weight, bias, residual=True)`` (its own backend choice), then
    ``torch.var_mean`` over (B, T, H, W) in float32 (float64 for float64). Differentiable."""
    y = dwconv3d(x, weight, bias, residual=True)
    var, mean = torch.var_mean(y.to(_stats_dtype(y.dtype)), dim=(0, 2, 3, 4), correction=0)
    return y, mean, var


# --- "triton": kernels/dpe_bn.py (forward + statistics, statistics backward) + dwconv3d's -------

def _triton_why_not(x, weight, bias):
    from ..kernels import why_not_triton
    reason = why_not_triton(x, weight, bias)
    if reason is not None:
        return reason
    from ..kernels.dpe_bn import SUPPORTED_DTYPES, why_not_shape
    if x.dtype not in SUPPORTED_DTYPES:
        return f"x must be float16, bfloat16 or float32; got {x.dtype}"
    return why_not_shape(x.shape)


@torch.library.custom_op("uniformer_fast::dpe_bn_stats_triton_fwd", mutates_args=())
def dpe_bn_stats_triton_fwd(x: torch.Tensor, weight_taps: torch.Tensor, bias: Optional[torch.Tensor],
                            kernel_size: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, T, H, W) with unit channel stride, weight_taps (kt*kh*kw, C) -> y (B, C, T, H, W)
    dense channels_last_3d, and the float32 batch mean and biased variance of y per channel (C,)."""
    from ..kernels.dpe_bn import dpe_bn_stats_fwd
    return dpe_bn_stats_fwd(x, weight_taps, bias, tuple(kernel_size))


@dpe_bn_stats_triton_fwd.register_fake
def _(x, weight_taps, bias, kernel_size):
    C = x.shape[1]
    return _empty_channels_last(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


@torch.library.custom_op("uniformer_fast::dpe_bn_stats_triton_bwd", mutates_args=())
def dpe_bn_stats_triton_bwd(y: torch.Tensor, grad_y: Optional[torch.Tensor], mean: torch.Tensor,
                            k_mean: torch.Tensor, k_var: torch.Tensor) -> torch.Tensor:
    """``grad_y + k_mean + k_var (y - mean)`` (B, C, T, H, W) dense channels_last_3d in y's dtype;
    y dense channels_last_3d, grad_y with unit channel stride or None, the rest (C,) float32."""
    from ..kernels.dpe_bn import bn_stats_bwd
    return bn_stats_bwd(y, grad_y, mean, k_mean, k_var)


@dpe_bn_stats_triton_bwd.register_fake
def _(y, grad_y, mean, k_mean, k_var):
    return _empty_channels_last(y)


class _DPEBNStatsTriton(torch.autograd.Function):
    """dpe_bn_stats on the Triton kernels. Activations and gradients are (B, C, T, H, W) with
    unit channel stride; y and the input gradient come in dense ``channels_last_3d``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = _channels_last(x)
        b = None if bias is None else bias.detach()
        y, mean, var = dpe_bn_stats_triton_fwd(x, _weight_taps(weight), b, list(weight.shape[2:]))
        # y is the op's output (kept alive by its consumers anyway): saving it costs no memory.
        ctx.save_for_backward(x, weight, y, mean)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        x, weight, y, mean = ctx.saved_tensors
        if grad_mean is None and grad_var is None:
            if grad_y is None:
                return None, None, None
            gy = _channels_last(grad_y)
        else:
            # d mean / dy = 1 / N and d var / dy = 2 (y - mean) / N, per channel: one elementwise
            # pass adds both to y's own gradient.
            n = y.numel() // y.shape[1]
            zeros = torch.zeros_like(mean)
            k_mean = zeros if grad_mean is None else (grad_mean.float() / n).contiguous()
            k_var = zeros if grad_var is None else (grad_var.float() * (2.0 / n)).contiguous()
            gy = dpe_bn_stats_triton_bwd(y, None if grad_y is None else _channels_last(grad_y), mean,
                                         k_mean, k_var)
        return dwconv3d_triton_backward(x, gy, weight, True, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                        ctx.has_bias and ctx.needs_input_grad[2])


@_backend.register("dpe_bn_stats", "triton", why_not=_triton_why_not)
def dpe_bn_stats_triton(x, weight, bias):
    """The "triton" backend: x (B, C, T, H, W) float16/bfloat16/float32 on a CUDA device (or on
    the CPU under ``TRITON_INTERPRET=1``), any C, any memory format (read in place if its channel
    stride is 1, else converted to ``channels_last_3d`` once). Returns y in dense
    ``channels_last_3d`` memory and float32 statistics, deterministic. Backward: one elementwise
    kernel adds the statistics' gradients to y's (y read back, ``y - mean`` recomputed), then
    dwconv3d's Triton input-gradient and deterministic weight/bias-gradient kernels run on it."""
    return _DPEBNStatsTriton.apply(x, weight, bias)
