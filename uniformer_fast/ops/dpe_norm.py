"""The DPE fused with the norm that follows it: ``y = x + dwconv(x) + bias`` (the residual stream)
and, from the same pass over y,

- ``dpe_layernorm`` (SABlock): ``z = layer_norm(y over C)``, the tokens the attention reads;
- ``dpe_bn_stats`` (CBlock, training): the per-channel batch mean and biased variance of y over
  (B, T, H, W), which the BatchNorm ``norm1`` needs before it can normalise; the model then applies
  the normalisation on load into ``conv1`` by folding it into conv1's weights (:mod:`.batchnorm`).

Backends: ``"reference"`` composes the public ops (``ops.dwconv3d(..., residual=True)``, which
"auto" still runs on its own fast backend, then ``F.layer_norm`` on the channels-last token view
or :func:`.batchnorm.batch_stats`); ``"triton"`` computes both outputs in one pass from the
convolution's registers: kernels/dpe.py for the LayerNorm, kernels/dwconv3d.py's forward with
``STATS`` for the statistics (per-tile partials merged in a fixed order by kernels/bn_stats.py), so
y is not read again. Every output is differentiable on both.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import backend as _backend
from ..kernels.tiles import why_not_inputs
from .checks import check_like, check_tensor
from .batchnorm import add_stats_grad, batch_stats
from .depthwise_conv import check_dwconv3d_args, dwconv3d, dwconv3d_triton_backward, dwconv3d_triton_why_not
from .layout import channels_last, empty_channels_last, weight_taps


# === dpe_layernorm: the SABlock's DPE and LayerNorm ==============================================

def _validate_layernorm(x, weight, bias, ln_weight, ln_bias, eps):
    check_dwconv3d_args(x, weight, bias, True)
    C = x.shape[1]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, ndim=1, form=f"({C},)")
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},); got {tuple(t.shape)}")
        check_like(name, t, "x", x)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float; got {eps!r}")


def dpe_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6, *,
                  backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic position embedding and the LayerNorm that follows it in an SABlock.

    Args:
        x: (B, C, T, H, W), any memory format (``channels_last_3d`` is the fast layout).
        weight: (C, 1, kt, kh, kw), odd kt, kh, kw up to 7; bias: (C,) or None.
        ln_weight, ln_bias: (C,), the LayerNorm's affine parameters.
        eps: the LayerNorm's epsilon.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``; ``None`` takes the one in force.

    Returns:
        ``(y, z)``, each (B, C, T, H, W): ``y = x + dwconv(x) + bias`` and
        ``z = layer_norm(y over C) * ln_weight + ln_bias``. On the "triton" backend both are
        dense ``channels_last_3d``, so ``z.flatten(2).transpose(1, 2)`` is a contiguous (B, N, C)
        token view. Under autocast, in the autocast dtype.
    """
    return _backend.dispatch("dpe_layernorm", backend, x, weight, bias, ln_weight, ln_bias, eps)


def _prepare_layernorm(x, weight, bias, ln_weight, ln_bias, eps=1e-6):
    x, weight, bias, ln_weight, ln_bias = _backend.autocast_inputs(x, weight, bias, ln_weight, ln_bias)
    _validate_layernorm(x, weight, bias, ln_weight, ln_bias, eps)
    return x, weight, bias, ln_weight, ln_bias, float(eps)


_backend.define_op("dpe_layernorm", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                   prepare=_prepare_layernorm)


# --- "reference": the unfused composition through the public ops --------------------------------

@_backend.register("dpe_layernorm", "reference")
def dpe_layernorm_composed(x, weight, bias, ln_weight, ln_bias, eps):
    """``ops.dwconv3d(x, weight, bias, residual=True)`` (its own backend choice), then
    ``F.layer_norm`` over C on the channels-last view. Differentiable through autograd."""
    y = dwconv3d(x, weight, bias, residual=True)
    z = F.layer_norm(y.permute(0, 2, 3, 4, 1), (y.shape[1],), ln_weight, ln_bias, eps)
    # Under autocast F.layer_norm returns float32; the op's outputs share y's dtype.
    return y, z.to(y.dtype).permute(0, 4, 1, 2, 3)


# --- "triton": kernels/dpe.py (forward, LayerNorm backward) + the dwconv3d backward kernels -----

def _layernorm_triton_why_not(x, weight, bias, ln_weight, ln_bias, eps):
    return why_not_inputs("dpe", "x", x, weight, bias, ln_weight, ln_bias)


@torch.library.custom_op("uniformer_fast::dpe_layernorm_triton_fwd", mutates_args=())
def dpe_layernorm_triton_fwd(x: torch.Tensor, weight_taps: torch.Tensor, bias: Optional[torch.Tensor],
                             ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                             kernel_size: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """x (B, C, T, H, W) with unit channel stride, weight_taps (kt*kh*kw, C) -> y, z (B, C, T, H, W)
    dense channels_last_3d, and the float32 LayerNorm mean and rstd per token (B*T*H*W,)."""
    from ..kernels.dpe import dpe_layernorm_fwd
    return dpe_layernorm_fwd(x, weight_taps, bias, ln_weight, ln_bias, eps, tuple(kernel_size))


@dpe_layernorm_triton_fwd.register_fake
def _(x, weight_taps, bias, ln_weight, ln_bias, eps, kernel_size):
    B, _, T, H, W = x.shape
    stats = x.new_empty(B * T * H * W, dtype=torch.float32)
    return empty_channels_last(x), empty_channels_last(x), stats, torch.empty_like(stats)


@torch.library.custom_op("uniformer_fast::dpe_layernorm_triton_bwd_ln", mutates_args=())
def dpe_layernorm_triton_bwd_ln(y: torch.Tensor, grad_z: torch.Tensor, grad_y: Optional[torch.Tensor],
                                ln_weight: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LayerNorm backward plus y's own gradient: (dy_total (B, C, T, H, W) dense channels_last_3d
    in y's dtype, dln_weight (C,) float32, dln_bias (C,) float32); grads with unit channel stride."""
    from ..kernels.dpe import dpe_layernorm_bwd_ln
    return dpe_layernorm_bwd_ln(y, grad_z, grad_y, ln_weight, mean, rstd)


@dpe_layernorm_triton_bwd_ln.register_fake
def _(y, grad_z, grad_y, ln_weight, mean, rstd):
    C = y.shape[1]
    return empty_channels_last(y), y.new_empty(C, dtype=torch.float32), y.new_empty(C, dtype=torch.float32)


class _DPELayerNormTriton(torch.autograd.Function):
    """dpe_layernorm on the Triton kernels. Activations and gradients are (B, C, T, H, W) with
    unit channel stride; outputs and the input gradient come in dense ``channels_last_3d``."""

    @staticmethod
    def forward(ctx, x, weight, bias, ln_weight, ln_bias, eps):
        x = channels_last(x)
        b = None if bias is None else bias.detach()
        kernel = list(weight.shape[2:])
        y, z, mean, rstd = dpe_layernorm_triton_fwd(x, weight_taps(weight), b, ln_weight.detach(),
                                                    ln_bias.detach(), eps, kernel)
        ctx.save_for_backward(x, weight, ln_weight, y, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return y, z

    @staticmethod
    def backward(ctx, grad_y, grad_z):
        x, weight, ln_weight, y, mean, rstd = ctx.saved_tensors
        grad_lnw = grad_lnb = None
        # dy_total = dy + d(layer_norm) (one kernel, rounded to the activation dtype as the unfused
        # composition's autograd would sum it), then the dwconv3d backward kernels on it.
        if grad_z is not None:
            gy, dlnw, dlnb = dpe_layernorm_triton_bwd_ln(
                y, channels_last(grad_z), None if grad_y is None else channels_last(grad_y),
                ln_weight.detach(), mean, rstd)
            grad_lnw = dlnw.to(ln_weight.dtype) if ctx.needs_input_grad[3] else None
            grad_lnb = dlnb.to(ln_weight.dtype) if ctx.needs_input_grad[4] else None
        elif grad_y is not None:
            gy = channels_last(grad_y)
        else:
            return None, None, None, None, None, None
        # dx = conv(dy_total, point-reflected kernel) + dy_total; dw, db from dy_total.
        grad_x, grad_w, grad_b = dwconv3d_triton_backward(
            x, gy, weight, True, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b, grad_lnw, grad_lnb, None


@_backend.register("dpe_layernorm", "triton", why_not=_layernorm_triton_why_not)
def dpe_layernorm_triton(x, weight, bias, ln_weight, ln_bias, eps):
    """The "triton" backend: x (B, C, T, H, W) float16/bfloat16/float32, C <= 1024, on a CUDA
    device (or on the CPU under ``TRITON_INTERPRET=1``), any memory format (read in place if its
    channel stride is 1, else converted to ``channels_last_3d`` once). Returns (y, z) in dense
    ``channels_last_3d`` memory. Backward: the LayerNorm-backward kernel (statistics saved by the
    forward, x_hat recomputed from y) writes ``dy + d(layer_norm)``, then dwconv3d's Triton
    input-gradient and deterministic weight/bias-gradient kernels run on it."""
    return _DPELayerNormTriton.apply(x, weight, bias, ln_weight, ln_bias, eps)


# === dpe_bn_stats: the CBlock's DPE and its training BatchNorm's statistics ======================

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


def _prepare_bn_stats(x, weight, bias=None):
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    check_dwconv3d_args(x, weight, bias, True)
    return x, weight, bias


_backend.define_op("dpe_bn_stats", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                   prepare=_prepare_bn_stats)


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
    return empty_channels_last(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


class _DPEBNStatsTriton(torch.autograd.Function):
    """dpe_bn_stats on the Triton kernels. Activations and gradients are (B, C, T, H, W) with
    unit channel stride; y and the input gradient come in dense ``channels_last_3d``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = channels_last(x)
        b = None if bias is None else bias.detach()
        y, mean, var = dpe_bn_stats_triton_fwd(x, weight_taps(weight), b, list(weight.shape[2:]))
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
        return dwconv3d_triton_backward(x, channels_last(gy), weight, True, ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])


def _bn_stats_triton_why_not(x, weight, bias):
    return dwconv3d_triton_why_not(x, weight, bias, True)


@_backend.register("dpe_bn_stats", "triton", why_not=_bn_stats_triton_why_not)
def dpe_bn_stats_triton(x, weight, bias):
    """The "triton" backend: x (B, C, T, H, W) float16/bfloat16/float32 on a CUDA device (or on
    the CPU under ``TRITON_INTERPRET=1``), any C, any memory format (read in place if its channel
    stride is 1, else converted to ``channels_last_3d`` once). Returns y in dense
    ``channels_last_3d`` memory and float32 statistics, deterministic. Backward: one elementwise
    kernel adds the statistics' gradients to y's (:func:`.batchnorm.add_stats_grad`), then
    dwconv3d's Triton input-gradient and deterministic weight/bias-gradient kernels run on it."""
    return _DPEBNStatsTriton.apply(x, weight, bias)
