"""The tail of a Local MHRA (CBlock): ``residual + scale * conv2(dwconv(u) + attn_bias)``: validation
and dispatch.

``scale`` is the per-sample ``branch_scale`` of stochastic depth (DropPath: 0 for a dropped sample,
``1 / keep`` for a kept one), applied to the branch before the residual add, or 1.

``"reference"`` is the unfused composition through the public ops (:func:`ops.dwconv3d` with the
backend in force, then the 1x1x1 projection as a matmul, the scale, then the add); ``"triton"`` is
one fused kernel for the forward (kernels/local_mhra.py) and, for the backward, a recomputation of
the depthwise output with the dwconv3d kernels, matmuls for the projection (batched per sample
when there is a scale, so the scale costs no pass over the activations) and the dwconv3d gradient
kernels.

``local_mhra_tail_bn_stats`` is the same tail returning also the per-channel batch mean and biased
variance of its output, for the BatchNorm (``norm2``) a training CBlock applies next: on "triton"
the same kernel writes them from its registers (kernels/bn_stats.py), on "reference"
:func:`.batchnorm.batch_stats` of the composed tail.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from ..kernels.tiles import why_not_inputs
from .checks import check_like, check_optional_vector, check_tensor
from .batchnorm import add_stats_grad, batch_stats
from .depthwise_conv import MAX_KERNEL, dwconv3d, dwconv3d_triton_backward, dwconv3d_triton_fwd
from .fully_connected import linear
from .layout import channels_last, empty_channels_last, token_rows, weight_taps

CL = torch.channels_last_3d


def _validate(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
    check_tensor("u", u, ndim=5, form="(B, C, T, H, W)")
    C = u.shape[1]
    form = f"({C}, 1, kt, kh, kw) with odd kt, kh, kw <= {MAX_KERNEL}"
    check_tensor("attn_weight", attn_weight, ndim=5, form=form)
    if attn_weight.shape[:2] != (C, 1) or any(k % 2 == 0 or k > MAX_KERNEL for k in attn_weight.shape[2:]):
        raise ValueError(f"attn_weight must have shape {form} for u with C={C}; got {tuple(attn_weight.shape)}")
    check_like("attn_weight", attn_weight, "u", u)
    check_tensor("conv2_weight", conv2_weight, ndim=5, form=f"({C}, {C}, 1, 1, 1)")
    if conv2_weight.shape != (C, C, 1, 1, 1):
        raise ValueError(f"conv2_weight must have shape ({C}, {C}, 1, 1, 1) for u with C={C}; "
                         f"got {tuple(conv2_weight.shape)}")
    check_like("conv2_weight", conv2_weight, "u", u)
    check_optional_vector("attn_bias", attn_bias, C, "u", u)
    check_optional_vector("conv2_bias", conv2_bias, C, "u", u)
    if residual is not None:
        check_tensor("residual", residual, ndim=5, form=f"{tuple(u.shape)} (the shape of u)")
        if residual.shape != u.shape:
            raise ValueError(f"residual must have the shape of u {tuple(u.shape)}; got {tuple(residual.shape)}")
        check_like("residual", residual, "u", u)
    if branch_scale is not None:
        B = u.shape[0]
        check_tensor("branch_scale", branch_scale, ndim=1, form=f"({B},), one scale per sample")
        if branch_scale.shape[0] != B:
            raise ValueError(f"branch_scale must have shape ({B},), one scale per sample of u; "
                             f"got {tuple(branch_scale.shape)}")
        check_like("branch_scale", branch_scale, "u", u)
        if branch_scale.requires_grad and torch.is_grad_enabled():
            raise ValueError("branch_scale must not require grad: it is a stochastic-depth scale, a "
                             "constant of the step (draw it under torch.no_grad() or detach it)")
    if u.numel() == 0:
        raise ValueError(f"u must not be empty; got shape {tuple(u.shape)}")


def _prepare(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual=None, branch_scale=None):
    args = _backend.autocast_inputs(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale)
    _validate(*args)
    return args


_backend.define_op("local_mhra_tail", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                   prepare=_prepare)
_backend.define_op("local_mhra_tail_bn_stats", auto={"cuda": ("triton", "reference"), "cpu": ("reference",)},
                   prepare=_prepare)


def local_mhra_tail(u: torch.Tensor, attn_weight: torch.Tensor, attn_bias: Optional[torch.Tensor],
                    conv2_weight: torch.Tensor, conv2_bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor] = None, *, branch_scale: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``residual + branch_scale * conv2(dwconv(u) + attn_bias)``, the depthwise affinity and
    projection of a Local MHRA and, in training, its stochastic depth.

    Args:
        u: (B, C, T, H, W), the output of conv1 (``channels_last_3d`` is the fast layout).
        attn_weight: (C, 1, kt, kh, kw), odd sizes up to 7 (UniFormer: 5x5x5), depthwise.
        attn_bias: (C,) or None.
        conv2_weight: (C, C, 1, 1, 1), the 1x1x1 projection; conv2_bias: (C,) or None.
        residual: (B, C, T, H, W) added to the result (the block's input), or None.
        branch_scale: (B,) in u's dtype, each sample's scale of the branch before the residual
            add (DropPath's ``mask / keep``, see ``uniformer_fast.model.drop_path_scale``), or
            None for 1. A constant: it must not require grad.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``; ``None`` takes the one set by
            :func:`use_backend` / :func:`set_backend`.

    Returns:
        (B, C, T, H, W) (dense ``channels_last_3d`` on "triton"). Under autocast, in the autocast dtype.
    """
    return _backend.dispatch("local_mhra_tail", backend, u, attn_weight, attn_bias, conv2_weight, conv2_bias,
                             residual, branch_scale)


def local_mhra_tail_bn_stats(u: torch.Tensor, attn_weight: torch.Tensor, attn_bias: Optional[torch.Tensor],
                             conv2_weight: torch.Tensor, conv2_bias: Optional[torch.Tensor],
                             residual: Optional[torch.Tensor] = None, *,
                             branch_scale: Optional[torch.Tensor] = None,
                             backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`local_mhra_tail` and the batch statistics a training BatchNorm takes of its output.

    Args: as :func:`local_mhra_tail`.

    Returns:
        ``(y, mean, var)``: y (B, C, T, H, W) as :func:`local_mhra_tail`; mean and var (C,), the
        mean and the biased variance (divided by N = B*T*H*W) of y per channel, of y as stored
        (rounded to its dtype), in float32 (float64 for float64 inputs). All three are
        differentiable. Under autocast, y in the autocast dtype.
    """
    return _backend.dispatch("local_mhra_tail_bn_stats", backend, u, attn_weight, attn_bias, conv2_weight,
                             conv2_bias, residual, branch_scale)


# --- "reference": the unfused composition of the public ops -------------------------------------

@_backend.register("local_mhra_tail", "reference")
def local_mhra_tail_composed(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
    """dwconv3d and the projection through the public ops (whatever backend is in force for each;
    the projection is a matmul over the channels-last view, which keeps the layout), then the
    scale (as DropPath multiplies) and the residual add."""
    a = dwconv3d(u, attn_weight, attn_bias)
    y = linear(a.permute(0, 2, 3, 4, 1), conv2_weight.flatten(1), conv2_bias).permute(0, 4, 1, 2, 3)
    if branch_scale is not None:
        y = y * branch_scale.view(-1, 1, 1, 1, 1)
    if residual is None:
        return y
    # Without autograd, into y (just written, still in cache) rather than a fresh tensor: 0.06
    # against 0.28 ms at stage 1 of UniFormer-S, 1x8 (float32, 2 threads, Zen 5).
    return residual + y if torch.is_grad_enabled() else y.add_(residual)


@_backend.register("local_mhra_tail_bn_stats", "reference")
def local_mhra_tail_bn_stats_composed(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
    """``ops.local_mhra_tail`` (its own backend choice), then :func:`.batchnorm.batch_stats`."""
    y = local_mhra_tail(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale=branch_scale)
    return (y, *batch_stats(y))


# --- "triton": the fused forward kernel in kernels/local_mhra.py ---------------------------------

def _triton_why_not(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
    return why_not_inputs("local_mhra", "u", u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual,
                          branch_scale)


@torch.library.custom_op("uniformer_fast::local_mhra_tail_triton_fwd", mutates_args=())
def local_mhra_tail_triton_fwd(u: torch.Tensor, attn_taps: torch.Tensor, attn_bias: Optional[torch.Tensor],
                               conv2_wt: torch.Tensor, conv2_bias: Optional[torch.Tensor],
                               branch_scale: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                               kernel_size: list[int]) -> torch.Tensor:
    """u, residual (B, C, T, H, W) with unit channel stride, attn_taps (kt*kh*kw, C), conv2_wt
    (C_in, C_out) contiguous, branch_scale (B,) -> (B, C, T, H, W) in dense channels_last_3d memory."""
    from ..kernels.local_mhra import local_mhra_tail_fwd
    return local_mhra_tail_fwd(u, attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale, residual,
                               tuple(kernel_size))


@local_mhra_tail_triton_fwd.register_fake
def _(u, attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale, residual, kernel_size):
    return empty_channels_last(u)


@torch.library.custom_op("uniformer_fast::local_mhra_tail_bn_stats_triton_fwd", mutates_args=())
def local_mhra_tail_bn_stats_triton_fwd(
        u: torch.Tensor, attn_taps: torch.Tensor, attn_bias: Optional[torch.Tensor], conv2_wt: torch.Tensor,
        conv2_bias: Optional[torch.Tensor], branch_scale: Optional[torch.Tensor], residual: Optional[torch.Tensor],
        kernel_size: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As local_mhra_tail_triton_fwd -> y (B, C, T, H, W) dense channels_last_3d, and the float32
    batch mean and biased variance of y per channel (C,)."""
    from ..kernels.local_mhra import local_mhra_tail_fwd
    return local_mhra_tail_fwd(u, attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale, residual,
                               tuple(kernel_size), stats=True)


@local_mhra_tail_bn_stats_triton_fwd.register_fake
def _(u, attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale, residual, kernel_size):
    C = u.shape[1]
    return empty_channels_last(u), u.new_empty(C, dtype=torch.float32), u.new_empty(C, dtype=torch.float32)


def _tail_triton_backward(u, attn_weight, attn_bias, conv2_weight, branch_scale, grad_y, needs_input_grad,
                          has_conv2_bias, has_residual):
    """The gradients of (u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual) from y's
    gradient: ``a = dwconv(u) + attn_bias`` recomputed with the dwconv3d kernels, the projection's
    gradients as matmuls, the depthwise gradients with the dwconv3d kernels.

    With a branch scale s (per sample b), the branch's gradient is ``s_b dy_b``: the scale goes
    into the small operands instead of a pass over dy: ``d_a_b = dy_b (s_b W2)`` and
    ``dW2 = sum_b s_b (dy_b^T a_b)`` as batched matmuls, ``db2 = sum_b s_b sum dy_b``."""
    need_u, need_aw, need_ab, need_w2, need_b2, need_r = needs_input_grad
    need_ab = need_ab and attn_bias is not None
    # Dense channels-last, so that (N, C) views feed the projection matmuls (this also makes
    # the stride-0 gradient of y.sum().backward() real).
    gy = grad_y.contiguous(memory_format=CL)
    B, C, T, H, W = gy.shape
    dy = token_rows(gy)
    s = None if branch_scale is None else branch_scale.to(torch.float32)
    kernel = list(attn_weight.shape[2:])
    grad_u = grad_aw = grad_ab = grad_w2 = grad_b2 = grad_r = None
    if need_w2:  # dW2 = dy^T a, with a recomputed as the forward had it (rounded to u's dtype)
        ab = None if attn_bias is None else attn_bias.detach()
        a = token_rows(dwconv3d_triton_fwd(u, weight_taps(attn_weight), ab, False, kernel))
        if s is None:
            grad_w2 = dy.t() @ a
        else:  # float32 sum over the samples, as the 2-D matmul accumulates
            per_sample = dy.view(B, -1, C).transpose(1, 2) @ a.view(B, -1, C)
            grad_w2 = (per_sample.float() * s.view(B, 1, 1)).sum(0).to(dy.dtype)
        grad_w2 = grad_w2.reshape(conv2_weight.shape)
    if need_b2 and has_conv2_bias:
        if s is None:
            grad_b2 = dy.sum(0, dtype=torch.float32)
        else:
            grad_b2 = (dy.view(B, -1, C).sum(1, dtype=torch.float32) * s.view(B, 1)).sum(0)
        grad_b2 = grad_b2.to(conv2_weight.dtype)
    if need_u or need_aw or need_ab:
        # d_a = dy @ W2 (y = a @ W2^T), (N, C) contiguous: a dense channels-last (B, C, T, H, W).
        w2 = conv2_weight.detach().flatten(1)
        if s is None:
            d_a = dy @ w2
        else:
            d_a = dy.view(B, -1, C) @ (s.view(B, 1, 1).to(w2.dtype) * w2)
        d_a = d_a.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        # The depthwise convolution's gradients from d_a: dwconv3d's own backward (no residual).
        grad_u, grad_aw, grad_ab = dwconv3d_triton_backward(u, d_a, attn_weight, False, need_u, need_aw, need_ab)
    if need_r and has_residual:
        grad_r = grad_y
    return grad_u, grad_aw, grad_ab, grad_w2, grad_b2, grad_r


class _LocalMHRATailTriton(torch.autograd.Function):
    """The fused forward (with the statistics epilogue when ``stats``); the backward adds the
    statistics' gradients (:func:`.batchnorm.add_stats_grad`), then recomputes
    ``a = dwconv(u) + attn_bias`` instead of having stored it. Activations and gradients are
    (B, C, T, H, W) with unit channel stride; the output and the gradient of u come in dense
    ``channels_last_3d`` memory."""

    @staticmethod
    def forward(ctx, stats, u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
        u = channels_last(u)
        ab = None if attn_bias is None else attn_bias.detach()
        b2 = None if conv2_bias is None else conv2_bias.detach()
        r = None if residual is None else channels_last(residual)
        w2t = conv2_weight.detach().flatten(1).t().contiguous()
        fwd = local_mhra_tail_bn_stats_triton_fwd if stats else local_mhra_tail_triton_fwd
        out = fwd(u, weight_taps(attn_weight), ab, w2t, b2, branch_scale, r, list(attn_weight.shape[2:]))
        # With stats, y is the op's output (kept alive by its consumers anyway): saving it costs no memory.
        ctx.save_for_backward(u, attn_weight, attn_bias, conv2_weight, branch_scale,
                              *((out[0], out[1]) if stats else ()))
        ctx.stats = stats
        ctx.has_conv2_bias, ctx.has_residual = conv2_bias is not None, residual is not None
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_y, *grad_stats):
        u, attn_weight, attn_bias, conv2_weight, branch_scale, *y_mean = ctx.saved_tensors
        gy = add_stats_grad(*y_mean, grad_y, *grad_stats) if ctx.stats else grad_y
        if gy is None:
            return (None,) * 8
        grads = _tail_triton_backward(u, attn_weight, attn_bias, conv2_weight, branch_scale, gy,
                                      ctx.needs_input_grad[1:7], ctx.has_conv2_bias, ctx.has_residual)
        return (None, *grads, None)


@_backend.register("local_mhra_tail", "triton", why_not=_triton_why_not)
def local_mhra_tail_triton(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
    """The "triton" backend: float16/bfloat16/float32 tensors on a CUDA device (or on the CPU under
    ``TRITON_INTERPRET=1``), C <= 128; u and residual in any memory format (read in place with unit
    channel stride, else converted to ``channels_last_3d`` once). Returns (B, C, T, H, W) in dense
    ``channels_last_3d`` memory; weight gradients are float32-accumulated and deterministic."""
    return _LocalMHRATailTriton.apply(False, u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual,
                                      branch_scale)


@_backend.register("local_mhra_tail_bn_stats", "triton", why_not=_triton_why_not)
def local_mhra_tail_bn_stats_triton(u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual, branch_scale):
    """The "triton" backend: as local_mhra_tail's, plus float32 statistics of y written by the same
    kernel (deterministic merge). Backward: one elementwise kernel adds the statistics' gradients
    to y's, then the tail's Triton backward."""
    return _LocalMHRATailTriton.apply(True, u, attn_weight, attn_bias, conv2_weight, conv2_bias, residual,
                                      branch_scale)
