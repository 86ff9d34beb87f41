"""The one handle on the C++ extension ``uniformer_fast._C`` (csrc/, built by ``pip install .``).

Every "cpp" backend reads :data:`C` here at call time, so there is one place that knows whether
the extension loaded and why not. The kernels' instruction set (AVX-512, AVX2 or generic) is the
extension's one choice, made at import from the CPU (override: ``UNIFORMER_FAST_ISA``, or
:func:`use_isa`); every kernel of the extension runs with it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

try:
    from .. import _C as C
    IMPORT_ERROR: Optional[str] = None
except ImportError as err:  # not built (e.g. no compiler at install time) or not loadable
    C = None
    IMPORT_ERROR = f"the C++ extension uniformer_fast._C failed to import ({type(err).__name__}: {err})"

_warned: set = set()


def why_unavailable(op: str) -> Optional[str]:
    """None when the extension is loaded; else why not, warned once per process and op (an "auto"
    call then falls back to the next backend, and says so once)."""
    if C is not None:
        return None
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"{op}: {IMPORT_ERROR}; CPU calls use the 'reference' backend", RuntimeWarning,
                      stacklevel=5)
    return IMPORT_ERROR


def isa() -> Optional[str]:
    """The instruction set the extension's kernels run with (``"avx512"``, ``"avx2"`` or
    ``"generic"``), or None without the extension."""
    return None if C is None else C.isa()


def supported_isas() -> tuple:
    """The instruction sets this build and CPU run, best first (empty without the extension)."""
    return () if C is None else tuple(C.supported_isas())


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the extension's kernels with instruction set ``name`` inside the block (process-wide,
    not per thread: the choice is the extension's)."""
    if C is None:
        raise RuntimeError(IMPORT_ERROR)
    previous = C.set_isa(name)
    try:
        yield
    finally:
        C.set_isa(previous)
