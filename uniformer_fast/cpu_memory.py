"""glibc's allocator tuned for repeated CPU inference: freed memory kept for the next call.

PyTorch allocates CPU tensors with ``malloc``. glibc serves large blocks from fresh ``mmap``s
(blocks above its dynamic threshold, and always above 32 MiB on 64-bit) and hands the heap's free top
back to the kernel once it exceeds twice that threshold. A UniFormer forward frees and reallocates
the same tens of MB on every call, so each call met them again as new pages: about 7,400 page
faults per UniFormer-S 1x8x224 forward (12 ms of kernel time on two threads, 6-7% of the float32
forward on a Zen 5, 3% of bf16). Fixing the thresholds (which also stops glibc adjusting them)
keeps those pages: the faults go to zero and the process keeps its peak heap resident, as an
inference engine's memory pool does.

:func:`heap_in_use` reads what the heap holds (``mallinfo2``), as the ``bench`` command's CPU peak
memory does.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from typing import Optional

__all__ = ["keep_freed_memory", "heap_in_use"]

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (``mallopt``: mmap threshold 32 MiB, trim threshold
    1 GiB), once per process. Returns whether the settings are in force: False where the C library
    is not glibc (musl, macOS, Windows), which are left as they are."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _applied = ok
    return ok


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33): every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def heap_in_use() -> Optional[int]:
    """Bytes malloc has handed out and not taken back: the heap's chunks in use plus the blocks
    served by ``mmap`` (glibc's ``mallinfo2``), or None where unknown (another C library, or a
    glibc before 2.33). Cheap enough to sample every millisecond."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library when it is glibc (on Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    """glibc's ``mallinfo2`` returning a :class:`_MallInfo2`, or None where there is none."""
    libc = _glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None  # glibc < 2.33: none
    if mallinfo2 is not None:
        mallinfo2.restype = _MallInfo2
    return mallinfo2
