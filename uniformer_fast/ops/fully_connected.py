"""The model's linear maps (qkv, proj, the MLP halves, the 1x1x1 convs as matmuls over channels),
optionally with GELU fused into the matmul's epilogue: validation and dispatch.

Backends: ``"reference"`` (``F.linear``, then ``F.gelu``) and ``"onednn"``, the CPU fast path:
PyTorch's bundled oneDNN matmul with the bias and the exact (erf) GELU applied in its epilogue
(below AVX-512, our C++ GELU in place right after it: see :func:`_gelu_in_epilogue`),
for inference (float32; bfloat16/float16 natively where the CPU has those instructions, else
computed in float32). On this project's CPUs it ran 2-3x faster than ``F.linear`` (MKL) and
6x faster than ``F.linear`` + ``F.gelu`` for the MLP's first half, with bitwise-equal results
where measured. It has no autograd formula, so training keeps the reference.

``"triton"`` (kernels/linear.py): one tiled matmul with the bias and GELU in its epilogue, forward
and backward (the GELU derivative fused into a recomputation of the pre-activation), float16,
bfloat16 and float32. Selectable by name or ``use_backend("triton")``; not in CUDA's ``"auto"``
list: cuBLAS + a separate GELU stays the default until a GPU measurement shows the fused kernel
pays (benchmarks/test_linear.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backend as _backend
from . import extension
from .checks import check_like, check_optional_vector, check_tensor
from ..kernels import dense, why_not_triton
from ..kernels.tiles import why_not_dtype
from .reference import linear_reference

ACTIVATIONS = (None, "gelu")



def _validate(x, weight, bias, activation):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., in_features); got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension, shape (..., in_features); got a 0-D tensor")
    check_tensor("weight", weight, ndim=2, form="(out_features, in_features)")
    check_tensor("x", x, ndim=x.dim(), form="(..., in_features)")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal weight's in_features {weight.shape[1]} "
                         f"(weight (out_features, in_features)); got x {tuple(x.shape)}")
    check_like("weight", weight, "x", x)
    check_optional_vector("bias", bias, weight.shape[0], "x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu'; got {activation!r}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features); bias: (out_features,) or None.
        activation: None, or ``"gelu"`` (exact, erf-based, as ``nn.GELU()``).
        backend: ``"reference"``, ``"onednn"``, ``"triton"`` or ``"auto"``; ``None`` takes the one in
            force.

    Returns:
        (..., out_features). Under autocast, in the autocast dtype.
    """
    return _backend.dispatch("linear", backend, x, weight, bias, activation)


def _prepare(x, weight, bias=None, activation=None):
    if isinstance(x, torch.Tensor) and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        weight, bias = cast_once(weight, dtype), cast_once(bias, dtype)
    x, weight, bias = _backend.autocast_inputs(x, weight, bias)
    _validate(x, weight, bias, activation)
    return x, weight, bias, activation


# Parameter -> {(data_ptr, shape, strides, dtype): (version, cast)}: under autocast with no
# gradient wanted, each weight (views included) is cast once, not at every call (10% of a bf16
# forward of UniFormer-S was these casts), and again after a write to the parameter. The casts live
# as long as their parameter. _CAST_SOURCE marks them, so the oneDNN path also packs them once.
_CASTS = torch.utils.weak.WeakIdKeyDictionary()
_CAST_SOURCE = torch.utils.weak.WeakIdKeyDictionary()


def cast_once(t, dtype):
    """t (a Parameter or a view of one) in ``dtype``: a cached copy while the parameter is unchanged
    and no gradient is wanted; anything else as it is (autocast_inputs casts it)."""
    if not isinstance(t, torch.Tensor) or t.dtype == dtype or not t.is_floating_point():
        return t
    base = t if t._base is None else t._base
    if not isinstance(base, torch.nn.Parameter) or (torch.is_grad_enabled() and t.requires_grad):
        return t

    def cast():
        # Outside inference mode, so the cast is a normal tensor with a version counter of its own.
        with torch.inference_mode(False), torch.no_grad():
            out = t.detach().to(dtype)
        _CAST_SOURCE[out] = True
        return out

    cached = _per_view(_CASTS, base, t, dtype, cast)
    return t if cached is None else cached


def _per_view(cache, base: torch.Tensor, t: torch.Tensor, tag, make):
    """``make()`` for the view t of ``base``, computed once per (view, tag) and again after a write to
    base (t's version); kept in ``cache`` (weak in base). None when t keeps no version counter (an
    inference tensor: a change would go unseen)."""
    try:
        version = t._version
    except RuntimeError:
        return None
    entries = cache.get(base)
    if entries is None:
        entries = cache[base] = {}
    key = (t.data_ptr(), tuple(t.shape), t.stride(), tag)
    hit = entries.get(key)
    if hit is None or hit[0] != version:
        hit = entries[key] = (version, make())
    return hit[1]


_backend.define_op("linear", auto={"cpu": ("onednn", "reference"), "cuda": ("reference",)}, prepare=_prepare)
_backend.register("linear", "reference")(linear_reference)


# --- "onednn": oneDNN's fused matmul + bias + GELU (inference, float32, CPU) -----------------------

def _onednn_linear_op():
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:  # the op is internal to PyTorch: check it computes what we rely on before using it
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        if not torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5):
            return None
    except (RuntimeError, TypeError):
        return None
    return op


ONEDNN_LINEAR = _onednn_linear_op()


def _onednn_native_dtypes() -> frozenset:
    """Dtypes oneDNN's matmul runs natively on this CPU: float32, plus bfloat16 where the CPU has
    bf16 instructions (AVX512-BF16, AMX) and float16 where it has fp16 ones."""
    native = {torch.float32}
    mkldnn = getattr(torch.ops, "mkldnn", None)
    for dtype, probe in ((torch.bfloat16, "_is_mkldnn_bf16_supported"), (torch.float16, "_is_mkldnn_fp16_supported")):
        try:
            if getattr(mkldnn, probe)():
                native.add(dtype)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(native)


# Elsewhere (e.g. AVX2) a half-precision matmul is emulated, an order of magnitude slower than
# float32 here: such inputs are computed in float32 and the result rounded to their dtype.
ONEDNN_NATIVE_DTYPES = _onednn_native_dtypes()


def cpu_native_dtypes() -> frozenset:
    """The floating dtypes this CPU's matmuls run natively: float32, plus bfloat16 / float16 where
    it has instructions for them (AVX512-BF16, AMX, AVX512-FP16); elsewhere those are emulated."""
    return ONEDNN_NATIVE_DTYPES


def onednn_why_not(x, weight, bias, activation):
    if ONEDNN_LINEAR is None:
        return "this PyTorch build has no usable oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    if x.device.type != "cpu":
        return f"needs CPU tensors; got {x.device.type}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"supports float32, bfloat16 and float16; got {x.dtype}"
    if weight.shape[1] == 0:
        return "in_features must be >= 1 (oneDNN has no empty reduction)"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return "inference only (oneDNN's fused linear has no backward); run under torch.no_grad()"
    return None


_REORDER = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
# Parameter -> {(data_ptr, shape, strides, dtype): (version, packed weight)}: each weight laid out
# once in oneDNN's blocked format for this CPU instead of inside every call (4-8% of a stage-3/4
# matmul here); entries go with their parameter, and a write to it (its version) repacks.
_PACKED = torch.utils.weak.WeakIdKeyDictionary()


def _prepacked(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight (N, K), a Parameter or a view of one (or a cached autocast copy of one), in oneDNN's
    packed layout (blocked for ``rows`` rows when first packed; any row count reads it); anything
    else as it is."""
    base = weight if weight._base is None else weight._base
    if _REORDER is None or not (isinstance(base, torch.nn.Parameter) or base in _CAST_SOURCE) or rows == 0:
        return weight
    packed = _per_view(_PACKED, base, weight, weight.dtype, lambda: _REORDER(weight.detach(), rows))
    return weight if packed is None else packed


def _gelu_in_epilogue() -> bool:
    """Whether GELU goes into oneDNN's matmul epilogue (ATen's vector code at AVX-512 or above) or
    runs in place after it (below: AVX2 and older; :func:`_gelu_inplace`). Measured (float32, 2
    threads, Zen 5, ms per UniFormer-S MLP fc1, stages 1-4; epilogue / matmul then ATen's in-place
    GELU): AVX-512 1.12 / 1.39, 1.04 / 1.29, 1.38 / 1.38, 0.85 / 0.87; AVX2 (ATen and oneDNN capped)
    2.73 / 2.49, 2.39 / 2.06, 3.25 / 2.81, 1.99 / 1.74. oneDNN's erf polynomial on 8-wide vectors
    costs more than the matmul's stores and reloads it saves; the C++ GELU in place then takes half
    of ATen's time (7 against 12-15 ms per UniFormer-S forward at 1x8, 2 threads, Zen 3)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# Known at import (ATEN_CPU_CAPABILITY and the CPU): torch.compile cannot trace the query.
_GELU_IN_EPILOGUE = _gelu_in_epilogue()


def _onednn_rows(rows, weight, bias, activation):
    weight = _prepacked(weight, rows.shape[0])
    if activation != "gelu":
        return ONEDNN_LINEAR(rows, weight, bias, "none", [], "")
    if _GELU_IN_EPILOGUE:
        return ONEDNN_LINEAR(rows, weight, bias, "gelu", [], "none")
    return _gelu_inplace(ONEDNN_LINEAR(rows, weight, bias, "none", [], ""))


def _gelu_inplace(y: torch.Tensor) -> torch.Tensor:
    """y = gelu(y) in place, y a fresh dense matmul output: the C++ kernel (csrc/gelu_impl.h, a
    rational erf, a third of ATen's cycles per element on AVX2) in float32, else ATen's."""
    if extension.C is None or y.dtype != torch.float32 or not y.is_contiguous():
        return torch.ops.aten.gelu_(y)
    extension.C.gelu_inplace(y.data_ptr(), y.numel(), torch.get_num_threads())  # the extension's ISA
    return y


# Opaque to torch.compile: inductor has a lowering of mkldnn._linear_pointwise of its own, which
# expects the weight packed by its freezing pass and rejects a plain one (LoweringException).
@torch.library.custom_op("uniformer_fast::linear_onednn", mutates_args=())
def linear_onednn_rows(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str) -> torch.Tensor:
    """rows (M, K), weight (N, K), bias (N,) dense or None, float32 on the CPU -> (M, N)."""
    return _onednn_rows(rows, weight, bias, activation)


def _matmul_rows_fake(rows, weight, bias, activation):
    """The shapes of a forward matmul of both backends: rows (M, K), weight (N, K) -> (M, N)."""
    return rows.new_empty(rows.shape[0], weight.shape[0])


linear_onednn_rows.register_fake(_matmul_rows_fake)


@_backend.register("linear", "onednn", why_not=onednn_why_not)
def linear_onednn(x, weight, bias=None, activation=None):
    """The "onednn" backend: x (..., K), weight (N, K) and bias (N,) or None, float32, bfloat16 or
    float16 (one dtype), any strides. Returns (..., N) contiguous in x's dtype: computed in that
    dtype with float32 accumulation where the CPU runs it natively (ONEDNN_NATIVE_DTYPES), else in
    float32 and rounded once."""
    # oneDNN reads the bias as a dense vector whatever its strides (uniformer_fast.kernels.dense).
    bias = dense(bias)
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype not in ONEDNN_NATIVE_DTYPES:
        rows, weight = rows.float(), weight.float()
        bias = None if bias is None else bias.float()
    # Eager calls skip the custom op's dispatch (tens of microseconds per call).
    run = linear_onednn_rows if torch.compiler.is_compiling() else _onednn_rows
    y = run(rows, weight, bias, activation or "none").to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# --- "triton": matmul + bias + GELU in one kernel, forward and backward (kernels/linear.py) ----

def _triton_why_not(x, weight, bias, activation):
    reason = why_not_triton(x, weight, bias) or why_not_dtype("x", x)
    if reason is not None:
        return reason
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        return f"weight must have out_features >= 1 and in_features >= 1; got {tuple(weight.shape)}"
    return None


# One opaque op per direction, each with a fake (shapes only) so torch.compile traces through
# them without a graph break; _LinearTriton strings them together for autograd. activation is
# "none" or "gelu" here.

@torch.library.custom_op("uniformer_fast::linear_triton_fwd", mutates_args=())
def linear_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: str) -> torch.Tensor:
    """x (M, K), weight (N, K), bias (N,) or None -> act(x weight^T + bias), (M, N) in x's dtype."""
    from ..kernels.linear import linear_fwd
    return linear_fwd(x, weight, bias, activation)


linear_triton_fwd.register_fake(_matmul_rows_fake)


@torch.library.custom_op("uniformer_fast::linear_triton_bwd", mutates_args=())
def linear_triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: str, need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx (M, K), dW (N, K), db (N,)); a gradient not asked for (need_dx, need_dw; db
    when bias is None) comes back as an empty (0,) tensor."""
    from ..kernels.linear import linear_bwd
    dx, dw, db = linear_bwd(dy, x, weight, bias, activation, need_dx, need_dw)
    none = x.new_empty(0)
    return (none if dx is None else dx, weight.new_empty(0) if dw is None else dw,
            weight.new_empty(0) if db is None else db)


@linear_triton_bwd.register_fake
def _(dy, x, weight, bias, activation, need_dx, need_dw):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_dw and bias is not None else weight.new_empty(0))


class _LinearTriton(torch.autograd.Function):
    """Saves x, weight and bias only: the backward recomputes the pre-activation (see
    kernels/linear.py for the byte count)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        ctx.save_for_backward(x, weight, bias)
        ctx.activation = activation
        return linear_triton_fwd(x, weight, bias, activation)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        dx, dw, db = linear_triton_bwd(dy, x, weight, bias, ctx.activation, need_dx, need_dw)
        return (dx if need_dx else None, dw if ctx.needs_input_grad[1] else None,
                db if bias is not None and ctx.needs_input_grad[2] else None, None)


@_backend.register("linear", "triton", why_not=_triton_why_not)
def linear_triton(x, weight, bias=None, activation=None):
    """The "triton" backend: x (..., K) with its leading dimensions flattened to rows (a view when
    they flatten, else one copy; the last dimension copied unless unit-stride), weight (N, K),
    bias (N,) or None; float16, bfloat16 or float32. Returns (..., N) contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    y = _LinearTriton.apply(rows, weight, bias, activation or "none")
    return y.reshape(*x.shape[:-1], weight.shape[0])
