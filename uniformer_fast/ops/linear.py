"""The model's linear maps (qkv, proj, the MLP halves, the 1x1x1 convs as matmuls over channels),
optionally with GELU fused into the matmul's epilogue: validation and dispatch.

Backends: ``"reference"`` (``F.linear``, then ``F.gelu``) and ``"cpp"``, the CPU fast path:
PyTorch's bundled oneDNN matmul with the bias and the exact (erf) GELU applied in its epilogue,
for inference in float32. On this project's CPUs it ran 2-3x faster than ``F.linear`` (MKL) and
6x faster than ``F.linear`` + ``F.gelu`` for the MLP's first half, with bitwise-equal results
where measured. It has no autograd formula, so training keeps the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backend as _backend
from ._validate import check_like, check_tensor
from .reference import linear_reference

ACTIVATIONS = (None, "gelu")

_backend.define_op("linear", auto={"cpu": ("cpp", "reference"), "cuda": ("reference",)})
_backend.register("linear", "reference")(linear_reference)


def _validate(x, weight, bias, activation):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a torch.Tensor of shape (..., in_features); got {type(x).__name__}")
    check_tensor("weight", weight, ndim=2, form="(out_features, in_features)")
    check_tensor("x", x, ndim=x.dim(), form="(..., in_features)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal weight's in_features {weight.shape[1]} "
                         f"(weight (out_features, in_features)); got x {tuple(x.shape)}")
    check_like("weight", weight, "x", x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, form=f"({weight.shape[0]},)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
        check_like("bias", bias, "x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu'; got {activation!r}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features); bias: (out_features,) or None.
        activation: None, or ``"gelu"`` (exact, erf-based, as ``nn.GELU()``).
        backend: ``"reference"``, ``"cpp"`` or ``"auto"``; ``None`` takes the one in force.

    Returns:
        (..., out_features). Under autocast, in the autocast dtype.
    """
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    _validate(x, weight, bias, activation)
    _, fn = _backend.resolve("linear", backend, x.device, x, weight, bias, activation)
    return fn(x, weight, bias, activation)


# --- "cpp": oneDNN's fused matmul + bias + GELU (inference, float32, CPU) --------------------------

def _onednn_linear_op():
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:  # the op is internal to PyTorch: check it computes what we rely on before using it
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        if not torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5):
            return None
    except (RuntimeError, TypeError):
        return None
    return op


_ONEDNN_LINEAR = _onednn_linear_op()


def _cpp_why_not(x, weight, bias, activation):
    if _ONEDNN_LINEAR is None:
        return "this PyTorch build has no usable oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    if x.device.type != "cpu":
        return f"needs CPU tensors; got {x.device.type}"
    if x.dtype != torch.float32:
        return f"supports float32 only; got {x.dtype}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return "inference only (oneDNN's fused linear has no backward); run under torch.no_grad()"
    return None


@_backend.register("linear", "cpp", why_not=_cpp_why_not)
def linear_onednn(x, weight, bias=None, activation=None):
    rows = x.reshape(-1, x.shape[-1])
    if activation == "gelu":
        y = _ONEDNN_LINEAR(rows, weight, bias, "gelu", [], "none")
    else:
        y = _ONEDNN_LINEAR(rows, weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])
