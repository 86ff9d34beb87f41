"""What the tiled kernels share: their dtypes and limits, the checks the ops ask before launching
them, block and grid helpers, and the @triton.jit pieces that turn flat positions into (b, t, h, w)
and strided offsets.

The Python half imports without Triton (the ops read :data:`MAX_KERNEL` and ask
:func:`why_not_inputs` on any machine); the @triton.jit half exists where Triton is installed.

Optional kernel arguments: a launcher passes ``None`` for a tensor it does not have, and the kernel
derives its flag from that with ``@triton.heuristics({"HAS_BIAS": is_given("b_ptr")})``, so no
placeholder pointer is ever handed over and no flag can disagree with its argument. Triton
specialises a ``None`` argument to a constexpr (compiled and interpreted, 3.6 and 3.9 alike), so
the unused branch is not compiled.
"""
from __future__ import annotations

import functools

import torch

from . import HAS_TRITON, why_not_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Odd kernel sizes up to 7 per dimension: a row of KW taps is unrolled, and every launcher's
# configs are compiled for KW = 7 without spills.
MAX_KERNEL = 7
# The kernels whose programs hold all channels of their positions take at most this many (the
# reasons are at each module's MAX_CHANNELS); the others take any C.
MAX_CHANNELS = {"dpe": 1024, "local_mhra": 128}


def why_not_shape(shape, max_channels: "int | None" = None) -> "str | None":
    """None if the kernels can address an activation of this (B, C, T, H, W) shape, else why not:
    positions within one batch element are int32, the batch is a grid axis (at most 65535
    programs), and kernels whose programs hold all channels of their positions take at most
    ``max_channels``."""
    B, C, T, H, W = shape
    if max_channels is not None and C > max_channels:
        return f"one program holds all channels of its positions: C must be at most {max_channels}; got {C}"
    if T * H * W >= 2 ** 31:
        return f"T * H * W must be below 2**31; got {T * H * W}"
    if B > 65535:
        return f"the batch must be at most 65535; got {B}"
    return None


def why_not_dtype(name: str, t: torch.Tensor) -> "str | None":
    """None if the kernels take ``t``'s dtype, else why not (naming the argument)."""
    if t.dtype in SUPPORTED_DTYPES:
        return None
    names = [str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES]
    return f"{name} must be {', '.join(names[:-1])} or {names[-1]}; got {t.dtype}"


def why_not_inputs(kernels: str, name: str, x: torch.Tensor, *others) -> "str | None":
    """The ops' check before a tiled kernel runs: None if ``kernels/<kernels>.py`` can run on x
    (the (B, C, T, H, W) activation, called ``name`` in messages) and the other tensors here, else
    the first reason it cannot: Triton and the devices (:func:`why_not_triton`), x's dtype, then
    x's shape against that module's limits (:data:`MAX_CHANNELS`). Plain lookups, no import: this
    runs inside torch.compile's trace of every op."""
    return (why_not_triton(x, *others) or why_not_dtype(name, x)
            or why_not_shape(x.shape, MAX_CHANNELS.get(kernels)))


def block_c(n: int) -> int:
    """The block that holds n channels (or features): the next power of two >= n, at least 16
    (one 16-byte load of 16-bit data; tl.dot's smallest K)."""
    return max(16, 1 << (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors (programs that run at once scale with it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def is_given(arg: str):
    """A ``@triton.heuristics`` rule: the flag is True when argument ``arg`` is not None."""
    return lambda args: args[arg] is not None


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def split_position(p, H, W):
        """(t, h, w) of flat positions p of a (T, H, W) grid in row-major order."""
        return p // (H * W), (p // W) % H, p % W

    @triton.jit
    def split_token(tok, T, H, W):
        """(b, t, h, w) of flat tokens tok of a (B, T, H, W) grid in row-major order."""
        THW = T * H * W
        t, h, w = split_position(tok % THW, H, W)
        return tok // THW, t, h, w

    @triton.jit
    def strided_offset(b, t, h, w, stride_b, stride_t, stride_h, stride_w):
        """The int64 offset of (b, t, h, w) in a (B, T, H, W, C) tensor read through its strides
        (unit channel stride): indices are promoted before they meet a stride, so tensors past
        2**31 elements are addressed correctly."""
        return (b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h
                + w.to(tl.int64) * stride_w)
