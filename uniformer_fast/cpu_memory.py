"""glibc's allocator tuned for repeated CPU inference: freed memory kept for the next call.

PyTorch allocates CPU tensors with ``malloc``. glibc serves large blocks from fresh ``mmap``s
(blocks above its dynamic threshold, and always above 32 MiB on 64-bit) and hands the heap's free top
back to the kernel once it exceeds twice that threshold. A UniFormer forward frees and reallocates
the same tens of MB on every call, so each call met them again as new pages: about 7,400 page
faults per UniFormer-S 1x8x224 forward (12 ms of kernel time on two threads, 6-7% of the float32
forward on a Zen 5, 3% of bf16). Fixing the thresholds (which also stops glibc adjusting them)
keeps those pages: the faults go to zero and the process keeps its peak heap resident, as an
inference engine's memory pool does.
"""
from __future__ import annotations

import ctypes
import platform

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
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _applied = ok
    return ok
