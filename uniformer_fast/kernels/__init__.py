"""Triton kernels and their launchers (``uniformer_fast.kernels``); the op layer (:mod:`uniformer_fast.ops`) calls them.

This module is the one place that knows about Triton's availability, its versions and its CPU
interpreter (``TRITON_INTERPRET=1``, which must be set before triton is first imported). Launchers
ask it whether a call can run and take their interpreter-specific choices (block sizes, a single
autotune config, upcasts) from here. It also knows the layouts the kernels address (see
"Layouts" below): every launcher hands its kernels each input through :func:`dense`,
:func:`unit_stride` or :func:`check_channel_stride`.

What the tiled kernels share (dtypes, shape limits, the ops' pre-launch check, the decoding of
positions inside kernels, None for absent tensors) is in :mod:`.tiles`.

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


# --- Layouts ---------------------------------------------------------------------------------------
# A kernel addresses a tensor as base + index * stride through the strides it is given, with stride 1
# along the dimension it loads in 16-byte vectors, and addresses per-channel vectors and weight
# tables as base + index. A launcher that passed a sliced or expanded (stride-0) bias as it came would
# read the wrong elements, or past the end of its storage (an out-of-bounds read on a GPU), so every
# tensor a launcher reads goes through one of these.

def dense(t):
    """``t`` if its elements lie densely in row-major order (what base + index addresses), else a
    contiguous copy; None passes through. For biases, LayerNorm parameters and weight tables:
    a copy costs one small pass, a wrong read costs the result."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def unit_stride(t, dim: int = -1):
    """``t`` if dimension ``dim`` has stride 1 (or size 1: its stride is never used), else a copy in
    which it has, the other dimensions dense around it. The kernels read the other dimensions
    through their strides, so slices and flattened views are read in place."""
    if t.stride(dim) == 1 or t.shape[dim] == 1:
        return t
    return t.movedim(dim, -1).contiguous().movedim(-1, dim)


def check_channel_stride(name: str, t) -> None:
    """Raise ValueError unless activation ``t`` (B, C, T, H, W) has channel stride 1 (or one
    channel). The ops layer converts to ``channels_last_3d`` before the call, so a launcher that
    meets another layout was called wrongly: copying here would hide a slow path."""
    if t.shape[1] != 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit channel stride (channels_last_3d); got shape "
                         f"{tuple(t.shape)}, strides {t.stride()}")
