"""The CBlock's DPE with its BatchNorm statistics epilogue (training mode): ``y = x + dwconv(x) +
bias`` (the residual stream) and the per-channel batch mean and biased variance of y over
(B, T, H, W), as one op.

In a training CBlock the BatchNorm ``norm1`` needs those statistics before it can normalise; the
"triton" backend computes them from the convolution's registers (kernels/dwconv3d.py's forward
with ``STATS``; per-tile partials merged in a fixed order by kernels/bn_stats.py), so y is not read
again for them, and the model applies the normalisation on load into ``conv1`` by folding it into
conv1's weights (:mod:`.batchnorm`).

Backends: ``"reference"`` composes the public op ``ops.dwconv3d(..., residual=True)`` ("auto"
still runs it on its own fast backend) with :func:`.batchnorm.batch_stats`; ``"triton"`` is one fused pass
plus a tiny merge. ``mean`` and ``var`` are differentiable outputs on both.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from .batchnorm import add_stats_grad, batch_stats
from .dwconv3d import (_channels_last, _empty_channels_last, _triton_why_not as _dwconv3d_triton_why_not,
                       _validate as _validate_dwconv3d, _weight_taps, dwconv3d, dwconv3d_triton_backward)


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
    return _backend.dispatch("dpe_bn_stats", backend, x, weight, bias)


def _prepare(x, weight, bias=None):
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    _validate_dwconv3d(x, weight, bias, True)
    return x, weight, bias


_backend.define_op("dpe_bn_stats", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                   prepare=_prepare)


# --- "reference": the unfused composition through the public ops --------------------------------

@_backend.register("dpe_bn_stats", "reference")
def dpe_bn_stats_composed(x, weight, bias):
    """``ops.dwconv3d(x, weight, bias, residual=True)`` (its own backend choice), then
    :func:`.batchnorm.batch_stats`. Differentiable."""
    y = dwconv3d(x, weight, bias, residual=True)
    return (y, *batch_stats(y))


# --- "triton": kernels/dwconv3d.py's forward with its statistics epilogue, then dwconv3d's backward

@torch.library.custom_op("uniformer_fast::dpe_bn_stats_triton_fwd", mutates_args=())
def dpe_bn_stats_triton_fwd(x: torch.Tensor, weight_taps: torch.Tensor, bias: Optional[torch.Tensor],
                            kernel_size: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, T, H, W) with unit channel stride, weight_taps (kt*kh*kw, C) -> y (B, C, T, H, W)
    dense channels_last_3d, and the float32 batch mean and biased variance of y per channel (C,)."""
    from ..kernels.dwconv3d import dwconv3d_fwd
    return dwconv3d_fwd(x, weight_taps, bias, True, tuple(kernel_size), stats=True)


@dpe_bn_stats_triton_fwd.register_fake
def _(x, weight_taps, bias, kernel_size):
    C = x.shape[1]
    return _empty_channels_last(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


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
        gy = add_stats_grad(y, mean, grad_y, grad_mean, grad_var)
        if gy is None:
            return None, None, None
        return dwconv3d_triton_backward(x, _channels_last(gy), weight, True, ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])


def _triton_why_not(x, weight, bias):
    return _dwconv3d_triton_why_not(x, weight, bias, True)


@_backend.register("dpe_bn_stats", "triton", why_not=_triton_why_not)
def dpe_bn_stats_triton(x, weight, bias):
    """The "triton" backend: x (B, C, T, H, W) float16/bfloat16/float32 on a CUDA device (or on
    the CPU under ``TRITON_INTERPRET=1``), any C, any memory format (read in place if its channel
    stride is 1, else converted to ``channels_last_3d`` once). Returns y in dense
    ``channels_last_3d`` memory and float32 statistics, deterministic. Backward: one elementwise
    kernel adds the statistics' gradients to y's (:func:`.batchnorm.add_stats_grad`), then
    dwconv3d's Triton input-gradient and deterministic weight/bias-gradient kernels run on it."""
    return _DPEBNStatsTriton.apply(x, weight, bias)
