"""The SABlock's DPE with its LayerNorm epilogue: ``y = x + dwconv(x) + bias`` (the residual
stream) and ``z = layer_norm(y over C)`` (the tokens the attention reads), as one op.

Backends: ``"reference"`` composes the public ops (``ops.dwconv3d(..., residual=True)``, which
"auto" still runs on its own fast backend, then ``F.layer_norm`` on the channels-last token view);
``"triton"`` (kernels/dpe.py) computes both outputs in one pass, the LayerNorm from the
convolution's registers.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import backend as _backend
from ..kernels._tiles import why_not_inputs
from ._validate import check_like, check_tensor
from .dwconv3d import (_channels_last, _empty_channels_last, _validate as _validate_dwconv3d,
                       _weight_taps, dwconv3d, dwconv3d_triton_backward)



def _validate(x, weight, bias, ln_weight, ln_bias, eps):
    _validate_dwconv3d(x, weight, bias, True)
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


def _prepare(x, weight, bias, ln_weight, ln_bias, eps=1e-6):
    x, weight, bias, ln_weight, ln_bias = _backend.autocast_inputs(x, weight, bias, ln_weight, ln_bias)
    _validate(x, weight, bias, ln_weight, ln_bias, eps)
    return x, weight, bias, ln_weight, ln_bias, float(eps)


_backend.define_op("dpe_layernorm", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                   prepare=_prepare)


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

def _triton_why_not(x, weight, bias, ln_weight, ln_bias, eps):
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
    return _empty_channels_last(x), _empty_channels_last(x), stats, torch.empty_like(stats)


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
    return _empty_channels_last(y), y.new_empty(C, dtype=torch.float32), y.new_empty(C, dtype=torch.float32)


class _DPELayerNormTriton(torch.autograd.Function):
    """dpe_layernorm on the Triton kernels. Activations and gradients are (B, C, T, H, W) with
    unit channel stride; outputs and the input gradient come in dense ``channels_last_3d``."""

    @staticmethod
    def forward(ctx, x, weight, bias, ln_weight, ln_bias, eps):
        x = _channels_last(x)
        b = None if bias is None else bias.detach()
        kernel = list(weight.shape[2:])
        y, z, mean, rstd = dpe_layernorm_triton_fwd(x, _weight_taps(weight), b, ln_weight.detach(),
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
                y, _channels_last(grad_z), None if grad_y is None else _channels_last(grad_y),
                ln_weight.detach(), mean, rstd)
            grad_lnw = dlnw.to(ln_weight.dtype) if ctx.needs_input_grad[3] else None
            grad_lnb = dlnb.to(ln_weight.dtype) if ctx.needs_input_grad[4] else None
        elif grad_y is not None:
            gy = _channels_last(grad_y)
        else:
            return None, None, None, None, None, None
        # dx = conv(dy_total, point-reflected kernel) + dy_total; dw, db from dy_total.
        grad_x, grad_w, grad_b = dwconv3d_triton_backward(
            x, gy, weight, True, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b, grad_lnw, grad_lnb, None


@_backend.register("dpe_layernorm", "triton", why_not=_triton_why_not)
def dpe_layernorm_triton(x, weight, bias, ln_weight, ln_bias, eps):
    """The "triton" backend: x (B, C, T, H, W) float16/bfloat16/float32, C <= 1024, on a CUDA
    device (or on the CPU under ``TRITON_INTERPRET=1``), any memory format (read in place if its
    channel stride is 1, else converted to ``channels_last_3d`` once). Returns (y, z) in dense
    ``channels_last_3d`` memory. Backward: the LayerNorm-backward kernel (statistics saved by the
    forward, x_hat recomputed from y) writes ``dy + d(layer_norm)``, then dwconv3d's Triton
    input-gradient and deterministic weight/bias-gradient kernels run on it."""
    return _DPELayerNormTriton.apply(x, weight, bias, ln_weight, ln_bias, eps)
