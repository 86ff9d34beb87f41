"""Depthwise 3-D convolution (the DPE and the Local MHRA affinity): validation and dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from ._validate import check_like, check_tensor
from .reference import dwconv3d_reference

_backend.define_op("dwconv3d", auto={"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")})
_backend.register("dwconv3d", "reference")(dwconv3d_reference)

MAX_KERNEL = 7


def _validate(x, weight, bias, residual):
    check_tensor("x", x, ndim=5, form="(B, C, T, H, W)")
    C = x.shape[1]
    form = f"({C}, 1, kt, kh, kw) with odd kt, kh, kw <= {MAX_KERNEL}"
    check_tensor("weight", weight, ndim=5, form=form)
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight must have shape {form} for x with C={C}; got {tuple(weight.shape)}")
    if any(k % 2 == 0 or k > MAX_KERNEL for k in weight.shape[2:]):
        raise ValueError(f"weight must have shape {form}; got kernel {tuple(weight.shape[2:])}")
    check_like("weight", weight, "x", x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, form=f"({C},)")
        if bias.shape[0] != C:
            raise ValueError(f"bias must have shape ({C},); got {tuple(bias.shape)}")
        check_like("bias", bias, "x", x)
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
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    _validate(x, weight, bias, residual)
    _, fn = _backend.resolve("dwconv3d", backend, x.device, x, weight, bias, residual)
    return fn(x, weight, bias, residual)
