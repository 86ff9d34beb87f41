"""Joint multi-head self-attention over packed qkv (the Global MHRA): validation and dispatch."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import backend as _backend
from . import extension
from ..kernels.tiles import why_not_dtype
from .checks import check_tensor
from .reference import attention_reference



def _validate(qkv, num_heads, scale, dropout_p):
    check_tensor("qkv", qkv, ndim=3, form="(B, N, 3 * num_heads * head_dim)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    if qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(f"qkv's last dimension must be a positive multiple of 3 * num_heads = {3 * num_heads} "
                         f"(shape (B, N, 3 * num_heads * head_dim)); got {tuple(qkv.shape)}")
    if qkv.shape[0] == 0 or qkv.shape[1] == 0:
        raise ValueError(f"qkv must have B >= 1 and N >= 1; got shape {tuple(qkv.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    if not (isinstance(dropout_p, numbers.Real) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")


def attention(qkv: torch.Tensor, num_heads: int, *, scale: Optional[float] = None,
              dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax attention of every token over every token, per head.

    Args:
        qkv: (B, N, 3 * C), the output of the qkv Linear, read as (B, N, 3, num_heads, head_dim).
        num_heads: number of heads; head_dim = C // num_heads.
        scale: logit scale; defaults to head_dim ** -0.5.
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        backend: ``"reference"``, ``"sdpa"``, ``"cpp"``, ``"triton"`` or ``"auto"``; ``None`` takes the one set
            by :func:`use_backend` / :func:`set_backend`.

    Returns:
        (B, N, C), heads concatenated, ready for the output projection. Under autocast, in the
        autocast dtype (softmax statistics stay float32).
    """
    return _backend.dispatch("attention", backend, qkv, num_heads, scale, dropout_p)


def _prepare(qkv, num_heads, scale=None, dropout_p=0.0):
    (qkv,) = _backend.autocast_inputs(qkv)
    _validate(qkv, num_heads, scale, dropout_p)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv, num_heads, head_dim ** -0.5 if scale is None else float(scale), float(dropout_p)


_backend.define_op("attention", auto={"cuda": ("triton", "sdpa", "reference"), "cpu": ("cpp", "sdpa", "reference")},
                   prepare=_prepare)
_backend.register("attention", "reference")(attention_reference)


# --- "sdpa": torch.nn.functional.scaled_dot_product_attention (CPU and CUDA) -------------------

def _nonfinite_marks(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, heads, head_dim): NaN at every output element that reads a non-finite input, else 0.

    With NaN inputs, the explicit softmax's output is NaN exactly there: query i's row for a
    non-finite element of q_i, the whole head for one of any key, column d of the head for one of
    v's column d. With +-inf inputs it may be NaN, +-inf or (a key scored -inf) finite there; the
    marks make it NaN, never hiding it. ``x * 0`` is 0 for finite x, NaN otherwise, and sums of it
    cannot overflow."""
    B, N, C3 = qkv.shape
    z = (qkv.detach() * 0).view(B, N, 3, num_heads, C3 // (3 * num_heads))
    q_rows = z[:, :, 0].sum(-1, keepdim=True)
    k_heads = z[:, :, 1].sum((1, 3), keepdim=True)
    v_columns = z[:, :, 2].sum(1, keepdim=True)
    return q_rows + k_heads + v_columns


@_backend.register("attention", "sdpa")
def attention_sdpa(qkv: torch.Tensor, num_heads: int, scale: float,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """The "sdpa" backend: PyTorch's fused attention (flash / memory-efficient / math, PyTorch's
    choice) on (B, heads, N, head_dim) views of qkv; supports dropout. Returns (B, N, C).

    Non-finite values propagate as on the other backends: PyTorch's CPU flash kernel turns a NaN
    query row, and a row whose scores are all -inf, into zeros, so NaN is put back (see
    :func:`_nonfinite_marks`). Eager CPU calls check first with one sum of qkv (~0.1 ms at
    stage-3 sizes, against 65 ms of attention), compiled graphs and CUDA (where the check would
    synchronise) always add the marks.
    """
    if not math.isfinite(scale):
        return attention_reference(qkv, num_heads, scale, dropout_p)
    return _with_nonfinite_marks(sdpa_unchecked(qkv, num_heads, scale, dropout_p), qkv, num_heads).flatten(2)


def _with_nonfinite_marks(out: torch.Tensor, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """out (B, N, heads, head_dim) with NaN put where the explicit softmax gives NaN (see
    :func:`_nonfinite_marks`): checked first by one sum of qkv on eager CPU calls; compiled graphs
    and CUDA (where the check would synchronise) always add the marks."""
    # A finite sum proves every element finite; an overflowing one only costs the marks.
    if (torch.compiler.is_compiling() or qkv.device.type != "cpu"
            or not math.isfinite(qkv.detach().sum().item())):
        out = out + _nonfinite_marks(qkv, num_heads)
    return out


def sdpa_unchecked(qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's SDPA on qkv (B, N, 3 * C) as it is, NaN-hiding included: (B, N, heads, head_dim).
    The benchmarks' measure of what the NaN check costs."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


# --- "cpp": the C++ CPU kernel (csrc/attention.cpp), inference -----------------------------------

# A constant to torch.compile (which cannot trace into the extension); the ISA switch happens
# outside compiled regions.
@torch.compiler.assume_constant_result
def _cpp_isa_why_not(bf16: bool) -> str:
    """An empty string where the C++ kernel runs (bfloat16 if bf16) on the kernels' instruction set
    (AVX-512; float32 also AVX2), else why not."""
    if extension.C.attention_supported(bf16):  # for the extension's current instruction set
        return ""
    isa = extension.isa()
    if bf16:
        return f"bfloat16 needs a CPU with AVX512-BF16 (kernels' instruction set here: {isa})"
    return f"needs a CPU with AVX-512 or AVX2 (kernels' instruction set here: {isa})"


def _cpp_why_not(qkv, num_heads, scale, dropout_p):
    if extension.C is None:
        return extension.IMPORT_ERROR
    if qkv.device.type != "cpu":
        return f"needs CPU tensors; got {qkv.device.type}"
    if qkv.dtype not in (torch.float32, torch.bfloat16):
        return f"supports float32 and bfloat16; got {qkv.dtype}"
    reason = _cpp_isa_why_not(qkv.dtype == torch.bfloat16)
    if reason:
        return reason
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim % 32 or head_dim > 256:
        return f"head_dim = qkv.shape[-1] // (3 * num_heads) must be a multiple of 32 up to 256; got {head_dim}"
    if dropout_p > 0.0:
        return (f"dropout on the attention probabilities is not supported (dropout_p={dropout_p}); "
                "use backend='sdpa' or 'reference', or dropout_p=0")
    if not math.isfinite(scale):
        return f"scale must be finite; got {scale}"
    if torch.is_grad_enabled() and qkv.requires_grad:
        return "inference only (no backward); run under torch.no_grad(), or use backend='sdpa'"
    return None


def _attention_cpp(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    B, N, C3 = qkv.shape
    out = qkv.new_empty(B, N, C3 // 3)
    # The kernels of the extension's instruction set: AVX-512, or AVX2 (float32).
    extension.C.attention_fwd(qkv.data_ptr(), out.data_ptr(), B, N, num_heads, C3 // (3 * num_heads),
                              qkv.stride(0), qkv.stride(1), qkv.dtype == torch.bfloat16, scale,
                              torch.get_num_threads())
    return out


# Opaque to torch.compile, with a fake for its shapes.
@torch.library.custom_op("uniformer_fast::attention_cpp", mutates_args=())
def attention_cpp_op(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """qkv (B, N, 3C) float32 or bfloat16 on the CPU -> (B, N, C) in its dtype."""
    return _attention_cpp(qkv, num_heads, scale)


@attention_cpp_op.register_fake
def _(qkv, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3)


@_backend.register("attention", "cpp", why_not=_cpp_why_not)
def attention_cpp(qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The "cpp" backend (CPU inference): q, k and v read in place from qkv (B, N, 3 * C) through its
    batch and token strides (feature stride 1, else copied once), one pass per block of 6 queries
    over all keys with an exact softmax; float32 with AVX-512 or AVX2 + FMA (the kernels'
    instruction set, ``uniformer_fast._C.isa()``), bfloat16 with AVX512-BF16 (float32 scores,
    softmax and accumulation; probabilities rounded to bfloat16 for P V); head_dim a
    multiple of 32; no dropout, no backward. Non-finite inputs give NaN where the explicit softmax
    does (:func:`_nonfinite_marks`). Returns (B, N, C) contiguous."""
    # Eager calls skip the custom op's dispatch (tens of microseconds per call).
    run = attention_cpp_op if torch.compiler.is_compiling() else _attention_cpp
    out = run(qkv, num_heads, scale)
    B, N, C = out.shape
    return _with_nonfinite_marks(out.view(B, N, num_heads, C // num_heads), qkv, num_heads).flatten(2)


# --- "triton": the fused kernels in kernels/attention.py ----------------------------------------

def _triton_why_not(qkv, num_heads, scale, dropout_p):
    from ..kernels import why_not_triton
    reason = why_not_triton(qkv)
    if reason is not None:
        return reason
    from ..kernels.attention import SUPPORTED_HEAD_DIMS
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return (f"head_dim = qkv.shape[-1] // (3 * num_heads) must be one of "
                f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}; got {head_dim}")
    reason = why_not_dtype("qkv", qkv)
    if reason is not None:
        return reason
    if dropout_p > 0.0:
        return (f"dropout on the attention probabilities is not supported (dropout_p={dropout_p}); "
                "use backend='sdpa' or 'reference', or dropout_p=0")
    return None


# One opaque op per kernel direction, each with a fake (shapes only) so torch.compile traces
# through them without a graph break; _AttentionTriton strings them together for autograd.

@torch.library.custom_op("uniformer_fast::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3C) -> out (B, N, C) in qkv's dtype, lse (B, heads, N) float32."""
    from ..kernels.attention import attention_fwd
    return attention_fwd(qkv, num_heads, scale)


@attention_triton_fwd.register_fake
def _(qkv, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("uniformer_fast::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         num_heads: int, scale: float) -> torch.Tensor:
    """The gradient of the packed qkv, (B, N, 3C) in qkv's dtype."""
    from ..kernels.attention import attention_bwd
    return attention_bwd(dout, qkv, out, lse, num_heads, scale)


@attention_triton_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale):
    return qkv.new_empty(qkv.shape)


class _AttentionTriton(torch.autograd.Function):
    """Fused attention; saves qkv, the output and the (B, heads, N) float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        out, lse = attention_triton_fwd(qkv, num_heads, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        return attention_triton_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


@_backend.register("attention", "triton", why_not=_triton_why_not)
def attention_triton(qkv: torch.Tensor, num_heads: int, scale: float,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """The "triton" backend: qkv (B, N, 3 * C) read in place through its strides (feature stride 1,
    else copied once); head_dim 28, 32 or 64; float16, bfloat16 or float32 (matmul precision: see
    kernels/attention.py); no dropout. Returns (B, N, C) contiguous."""
    return _AttentionTriton.apply(qkv, num_heads, scale)
