"""The one place that decides which implementation of an op runs.

Every op (``dwconv3d``, ``attention``) is defined here with a ``prepare`` function (autocast and
validation: what the public function does before any backend runs) and registers its
implementations under a backend name. A public op is :func:`dispatch`; :func:`backend_for` asks,
for the same arguments, which backend a call would take. A call resolves its backend in this order: the ``backend=`` argument, then the innermost
``use_backend`` context, then the process default set by ``set_backend`` (``"auto"`` unless
changed). ``"auto"`` walks the op's preference list for the tensors' device type and takes the
first implementation that can run them. A backend asked for by name either runs or raises
:class:`BackendUnavailableError` saying why: never a silent fallback.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "triton", "cpp", "onednn", "sdpa")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run the given call."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # Returns None when the implementation can run these arguments, else the reason it cannot.
    why_not: Callable[..., Optional[str]]


@dataclass
class _Op:
    name: str
    auto: dict  # device type -> tuple of backend names, most preferred first
    impls: dict  # backend name -> _Impl
    # The public function's arguments -> the implementations' positional arguments (autocast,
    # validated, defaults filled in); the first is a tensor on the call's device.
    prepare: Callable[..., tuple]


_OPS: dict[str, _Op] = {}
_default_backend = "auto"
# The innermost use_backend's choice per thread: {None: name for all ops, op: name for one op}.
# A threading.local rather than a ContextVar: torch.compile traces reads of it (and guards on them).
_scoped = threading.local()


def _scoped_choice() -> dict:
    return getattr(_scoped, "choice", None) or {}


def _check_name(name, argname="backend"):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argname} must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return name


def define_op(name: str, *, auto: dict, prepare: Callable[..., tuple]) -> None:
    """Declare an op, its ``"auto"`` preference per device type (``"cuda"``, ``"cpu"``, ...) and its
    ``prepare(*args, **kwargs)``: the public call's arguments (without ``backend``; the same names
    and defaults as the public function) -> the tuple
    of positional arguments every implementation and ``why_not`` takes, after autocast and
    validation (raising ValueError/TypeError for bad input)."""
    for order in auto.values():
        for backend in order:
            _check_name(backend)
    _OPS[name] = _Op(name, {k: tuple(v) for k, v in auto.items()}, {}, prepare)


def dispatch(op: str, backend: Optional[str], *args, **kwargs):
    """Run ``op`` on these public arguments: prepare them, resolve the backend, call it."""
    impl_args = _OPS[op].prepare(*args, **kwargs)
    return resolve(op, backend, impl_args[0].device, *impl_args)[1](*impl_args)


def backend_for(op, *args, backend: Optional[str] = None, **kwargs) -> str:
    """The backend a call of ``op`` (its name, or the public function) with these arguments would
    run on, raising as the call would (bad input, a named backend that cannot run it); nothing runs.

    Example: ``ops.backend_for(ops.dpe_bn_stats, x, w, b) != "reference"`` when a fused kernel would
    compute the statistics.
    """
    name = getattr(op, "__name__", op)
    if name not in _OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, _OPS))} or its function; got {op!r}")
    impl_args = _OPS[name].prepare(*args, **kwargs)
    return resolve(name, backend, impl_args[0].device, *impl_args)[0]


def register(op: str, backend: str, why_not: Optional[Callable[..., Optional[str]]] = None):
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``.

    ``why_not(*args, **kwargs)`` takes the op's arguments and returns ``None`` if the implementation
    can run them, or a short reason why not (e.g. "needs CUDA tensors").
    """
    _check_name(backend)
    if backend == "auto":
        raise ValueError("'auto' is a choice rule, not an implementation")

    def wrap(fn):
        _OPS[op].impls[backend] = _Impl(fn, why_not or (lambda *a, **k: None))
        return fn

    return wrap


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"`` initially), for every op that has it."""
    global _default_backend
    _default_backend = _check_name(name, "name")


def get_backend(op: Optional[str] = None) -> str:
    """The backend name in force here (for ``op`` if given).

    A choice made for ``op`` by name (``use_backend(name, op=op)``) always holds. A choice for the
    whole model (``use_backend(name)``, ``set_backend(name)``) holds for the ops that implement
    ``name``; an op without it (e.g. ``dwconv3d`` under ``"sdpa"``) stays on ``"auto"``.
    """
    scoped = _scoped_choice()
    if op is not None and op in scoped:
        return scoped[op]
    name = scoped.get(None, _default_backend)
    if op is not None and name not in ("auto", "reference") and name not in _OPS[op].impls:
        return "auto"
    return name


@contextlib.contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Run the enclosed ops with backend ``name``: only ``op`` if given (e.g. ``"attention"``),
    else every op that implements ``name`` (the others stay on ``"auto"``, see :func:`get_backend`).

    Contexts nest, the inner one winning, and are per thread.
    """
    _check_name(name, "name")
    if op is not None and op not in _OPS:
        raise ValueError(f"op must be one of {', '.join(map(repr, _OPS))} or None; got {op!r}")
    outer = getattr(_scoped, "choice", None)
    # A whole-model choice replaces the per-op ones made outside it.
    _scoped.choice = {None: name} if op is None else {**(outer or {}), op: name}
    try:
        yield
    finally:
        _scoped.choice = outer


def available_backends(op: str) -> tuple[str, ...]:
    """Backends registered for ``op`` in this build (whether they can run a given call or not)."""
    return tuple(_OPS[op].impls)


# Device types autocast knows; asking about others (e.g. "meta") raises.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_inputs(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    Custom ops are invisible to autocast, so each public op applies its policy itself: run in the
    low precision (kernels accumulate and keep softmax statistics in float32). Non-tensors and
    None pass through, so validation still sees what the caller gave.
    """
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
                 else t for t in tensors)


def resolve(op: str, backend: Optional[str], device: torch.device, *args, **kwargs):
    """Return ``(backend_name, fn)`` for a call of ``op`` with these arguments."""
    entry = _OPS[op]
    name = get_backend(op) if backend is None else _check_name(backend)
    if name != "auto":
        impl = entry.impls.get(name)
        if impl is None:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} is not available in this build "
                f"(available: {', '.join(entry.impls)})")
        reason = impl.why_not(*args, **kwargs)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run this call: {reason}")
        return name, impl.fn
    reasons = []
    for candidate in entry.auto.get(device.type, ("reference",)):
        impl = entry.impls.get(candidate)
        if impl is None:
            continue
        reason = impl.why_not(*args, **kwargs)
        if reason is None:
            return candidate, impl.fn
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailableError(
        f"{op}: no backend can run this call on {device.type} ({'; '.join(reasons) or 'none registered'})")
