"""Triton kernels and their launchers, installed as ``uniformer_fast.kernels``.

This module is the one place that knows about Triton's availability and its CPU interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is first imported). Launchers ask it
whether a call can run and take their interpreter-specific choices (block sizes, a single
autotune config, upcasts) from here.
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # e.g. macOS or Windows: the "triton" backends are then unavailable
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def why_not_triton(*tensors) -> "str | None":
    """None if Triton kernels can run on these tensors here, else the reason they cannot."""
    if not HAS_TRITON:
        return "triton is not installed (pip install triton; Linux only)"
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET:
            return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                    "triton, or move the tensors to a CUDA device")
        if t.device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors; got a tensor on {t.device}"
    return None
