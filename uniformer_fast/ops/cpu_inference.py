"""The CPU-inference policy: when the model takes its inference-only CPU paths, which
convolutions oneDNN runs, and how CPU autocast to a dtype the CPU lacks is computed.

The model asks these questions and never looks at devices or backends itself.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import backend
from .fully_connected import ONEDNN_NATIVE_DTYPES, cpu_native_dtypes

HALF_DTYPES = (torch.bfloat16, torch.float16)
# ATen's CPU convolution takes oneDNN for float32, and for bfloat16 where the CPU has bf16
# instructions (the matmuls' probe answers that too); its float16 3-D convolution is a direct loop.
ONEDNN_CONV_DTYPES = (frozenset(ONEDNN_NATIVE_DTYPES & {torch.float32, torch.bfloat16})
                      if torch.backends.mkldnn.is_available() else frozenset())


def fast_path(x: torch.Tensor) -> bool:
    """Whether this call is CPU inference on the fast matmul path (``ops.linear`` on "auto" or
    "onednn", no autograd): the model then takes its inference-only paths (patch embeddings on
    oneDNN, the chunked MLP with its residual)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and backend.get_backend("linear") in ("auto", "onednn")


def onednn_convolution(x: torch.Tensor) -> bool:
    """Whether ATen runs a CPU convolution of x (under any autocast) on oneDNN."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype in ONEDNN_CONV_DTYPES


def in_native_precision(fn: Callable[..., list], x: torch.Tensor, *args) -> list:
    """``fn(x, *args)``, a list of tensors, under CPU autocast to a dtype this CPU has no
    instructions for (bfloat16 on AVX2, say) computed in float32 instead, as OpenVINO takes its
    bf16 hint there, and returned in the autocast dtype: emulated half-precision math is an order
    of magnitude slower than float32 and no more accurate. Elsewhere ``fn(x, *args)`` as it is."""
    if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") not in cpu_native_dtypes()):
        return fn(x, *args)
    dtype = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        ys = fn(x.float() if x.dtype in HALF_DTYPES else x, *args)
    return [y.to(dtype) if y.dtype == torch.float32 else y for y in ys]
