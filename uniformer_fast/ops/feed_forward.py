"""The transformer MLP with its residual, ``residual + fc2(gelu(fc1(x)))``: validation and dispatch.

Backends: ``"reference"`` (``F.linear``, ``F.gelu``, ``F.linear``, add; differentiable) and
``"onednn"``, CPU inference on oneDNN (``ops.linear``'s "onednn" path, GELU in fc1's epilogue, or right
after it below AVX-512): where the hidden activation would be large (stage 1 at 4 x 8 x 224: 50176 x
256 floats, 51 MB) the rows go through in chunks whose hidden part stays in cache, and each chunk's
fc2 output gets the residual added straight into the result. Allocations that size are fresh mmaps
with glibc, so the unchunked MLP paid a page fault every 4 KiB on top of the DRAM round trip: 21 ms
against 8.7 ms chunked for that shape (float32, 2 threads, Zen 5).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from .checks import check_like, check_optional_vector, check_tensor
from .fully_connected import cast_once, linear_onednn, onednn_why_not
from .reference import mlp_reference


def _validate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., in_features); got {type(x).__name__}")
    check_tensor("x", x, ndim=max(x.dim(), 1), form="(..., in_features)")
    check_tensor("fc1_weight", fc1_weight, ndim=2, form="(hidden, in_features)")
    check_tensor("fc2_weight", fc2_weight, ndim=2, form="(out_features, hidden)")
    hidden, in_features = fc1_weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal fc1_weight's in_features {in_features} "
                         f"(fc1_weight (hidden, in_features)); got x {tuple(x.shape)}")
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight must have shape (out_features, {hidden}) (hidden = fc1_weight.shape[0]); "
                         f"got {tuple(fc2_weight.shape)}")
    for name, t in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        check_like(name, t, "x", x)
    check_optional_vector("fc1_bias", fc1_bias, hidden, "x", x)
    check_optional_vector("fc2_bias", fc2_bias, fc2_weight.shape[0], "x", x)
    if residual is not None:
        out_shape = (*x.shape[:-1], fc2_weight.shape[0])
        check_tensor("residual", residual, ndim=len(out_shape), form="(..., out_features), the output's shape")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {out_shape}; got {tuple(residual.shape)}")
        check_like("residual", residual, "x", x)


def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor], *, residual: Optional[torch.Tensor] = None,
        backend: Optional[str] = None) -> torch.Tensor:
    """``residual + fc2(gelu(fc1(x)))``, the GELU exact (erf), as ``nn.GELU()``.

    Args:
        x: (..., in_features), any strides.
        fc1_weight: (hidden, in_features); fc1_bias: (hidden,) or None.
        fc2_weight: (out_features, hidden); fc2_bias: (out_features,) or None.
        residual: (..., out_features) or None (no residual).
        backend: ``"reference"``, ``"onednn"`` or ``"auto"``; ``None`` takes the one in force.

    Returns:
        (..., out_features), contiguous. Under autocast, in the autocast dtype.
    """
    return _backend.dispatch("mlp", backend, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)


def _prepare(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    if isinstance(x, torch.Tensor) and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = (cast_once(t, dtype) for t in
                                                      (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = _backend.autocast_inputs(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    _validate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    return x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual


_backend.define_op("mlp", auto={"cpu": ("onednn", "reference"), "cuda": ("reference",)}, prepare=_prepare)
_backend.register("mlp", "reference")(mlp_reference)


# Chunk the rows when the hidden activation is larger than this (bytes), into chunks of about
# HIDDEN_CHUNK_BYTES. Measured (float32, 2 threads, Zen 5, stage-1 shape): unchunked and 4 MiB chunks
# tie at 25088 rows (26 MB of hidden); at 50176 rows (51 MB, above glibc's 32 MiB mmap ceiling)
# unchunked took 21 ms, 512/1024/2048/4096-row chunks 12.5/10.7/9.9/8.7 ms.
CHUNK_ABOVE_BYTES = 16 << 20
HIDDEN_CHUNK_BYTES = 4 << 20


def _onednn_why_not(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual):
    reason = (onednn_why_not(x, fc1_weight, fc1_bias, "gelu")
              or onednn_why_not(x, fc2_weight, fc2_bias, None))
    if reason is None and residual is not None and torch.is_grad_enabled() and residual.requires_grad:
        reason = "inference only (oneDNN's fused linear has no backward); run under torch.no_grad()"
    return reason


@_backend.register("mlp", "onednn", why_not=_onednn_why_not)
def mlp_onednn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    """The "onednn" backend: x (..., K) any strides, float32/bfloat16/float16 (as ops.linear's "onednn");
    returns (..., N) contiguous in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    M, hidden, N = rows.shape[0], fc1_weight.shape[0], fc2_weight.shape[0]
    res = None if residual is None else residual.reshape(-1, N)
    step = M
    if M * hidden * x.element_size() > CHUNK_ABOVE_BYTES:
        step = max(256, HIDDEN_CHUNK_BYTES // (hidden * x.element_size()))
    if step >= M:
        y = linear_onednn(linear_onednn(rows, fc1_weight, fc1_bias, "gelu"), fc2_weight, fc2_bias)
        if res is not None:
            y += res
        return y.view(*x.shape[:-1], N)
    out = x.new_empty(M, N)
    for start in range(0, M, step):
        part = slice(start, min(M, start + step))
        y = linear_onednn(linear_onednn(rows[part], fc1_weight, fc1_bias, "gelu"), fc2_weight, fc2_bias)
        if res is None:
            out[part] = y
        else:
            torch.add(y, res[part], out=out[part])
    return out.view(*x.shape[:-1], N)
