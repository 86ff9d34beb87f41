"""Triton kernels and their launchers, installed as ``uniformer_fast.kernels``.

This module is the one place that knows about Triton's availability, its versions and its CPU
interpreter (``TRITON_INTERPRET=1``, which must be set before triton is first imported). Launchers
ask it whether a call can run and take their interpreter-specific choices (block sizes, a single
autotune config, upcasts) from here.

Tested Triton versions: 3.6 (the GPU machine's, with torch 2.11) and 3.9 (torch 2.13). Every GPU
config compiles without spills under both, so no launcher chooses by version; the one
version-specific piece is the fix below for 3.6's interpreter.
"""
from __future__ import annotations

import os
import re

try:
    import triton
    HAS_TRITON = True
except ImportError:  # e.g. macOS or Windows: the "triton" backends are then unavailable
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _version_tuple(version: str) -> tuple:
    """"3.6.0" -> (3, 6); "3.7.0+git1234" -> (3, 7)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


TRITON_VERSION = _version_tuple(triton.__version__) if HAS_TRITON else (0, 0)


def _interpreter_index_squeezes_scalars() -> None:
    """Triton < 3.7's interpreter turns a scalar into a Python int with ``int(array)``; its scalars
    are 1-element 1-D arrays, which NumPy >= 2.4 refuses to convert, so every ``range()`` with a
    runtime bound fails ("only 0-dimensional arrays can be converted to Python scalars";
    triton-lang/triton#9171, fixed in 3.7 by squeezing first). Wrap its tensor patching so that
    ``__index__`` squeezes, as 3.7 does."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_uniformer_fast_squeezes", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._uniformer_fast_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET and HAS_TRITON and TRITON_VERSION < (3, 7):
    _interpreter_index_squeezes_scalars()


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
