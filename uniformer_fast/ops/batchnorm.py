"""BatchNorm, the one place: batch statistics emitted by a fused op and their backward, the fold of
a BatchNorm into the 1x1x1 convolution after it, and the running-statistics update.

A CBlock's BatchNorms (``norm1`` before conv1, ``norm2`` before the MLP's fc1) normalise the
output of a fused op. In training, the op emits the batch statistics of its output with it
(``ops.dpe_bn_stats``, ``ops.local_mhra_tail_bn_stats``: on "triton" from the kernel's registers,
kernels/bn_stats.py), and the normalisation is applied on load into the convolution by
folding it into the convolution's weights for this step:

    conv(bn(y)) = (W diag(s)) y + (W t + b),  s = gamma / sqrt(var + eps),  t = beta - mean s

The fold is differentiable, so gradients reach gamma, beta and, through mean and var, y. In eval
mode the same fold with the running statistics makes ``fuse_for_inference``. Both match
``nn.BatchNorm3d`` (momentum, ``momentum=None``'s cumulative average, the unbiased running variance,
``affine=False``, ``track_running_stats=False``), as tests/test_dpe_bn.py checks.
"""
from __future__ import annotations

from typing import Optional

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of batch statistics of a dtype tensor: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of y (B, C, T, H, W) over (B, T, H, W), in
    :func:`stats_dtype`; differentiable. The reference for every fused statistics epilogue."""
    var, mean = torch.var_mean(y.to(stats_dtype(y.dtype)), dim=(0, 2, 3, 4), correction=0)
    return mean, var


# --- the statistics' backward on the Triton kernels -----------------------------------------------

@torch.library.custom_op("uniformer_fast::bn_stats_triton_bwd", mutates_args=())
def bn_stats_triton_bwd(y: torch.Tensor, grad_y: Optional[torch.Tensor], mean: torch.Tensor,
                        k_mean: torch.Tensor, k_var: torch.Tensor) -> torch.Tensor:
    """``grad_y + k_mean + k_var (y - mean)`` (B, C, T, H, W) dense channels_last_3d in y's dtype;
    y dense channels_last_3d, grad_y with unit channel stride or None, the rest (C,) float32."""
    from ..kernels.bn_stats import bn_stats_bwd
    return bn_stats_bwd(y, grad_y, mean, k_mean, k_var)


@bn_stats_triton_bwd.register_fake
def _(y, grad_y, mean, k_mean, k_var):
    return torch.empty_like(y, memory_format=torch.channels_last_3d)


def add_stats_grad(y: torch.Tensor, mean: torch.Tensor, grad_y: Optional[torch.Tensor],
                   grad_mean: Optional[torch.Tensor], grad_var: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The total gradient of an op's output y (dense ``channels_last_3d``) that also returned
    ``mean`` and the biased ``var`` of y per channel: ``grad_y + grad_mean / N + 2 grad_var
    (y - mean) / N`` in one elementwise Triton pass (y read back), or grad_y alone when the
    statistics got no gradient; None when nothing did. The backward of every "triton" op with
    a statistics epilogue, before its own."""
    if grad_mean is None and grad_var is None:
        return grad_y
    n = y.numel() // y.shape[1]
    zeros = torch.zeros_like(mean)
    k_mean = zeros if grad_mean is None else (grad_mean.float() / n).contiguous()
    k_var = zeros if grad_var is None else (grad_var.float() * (2.0 / n)).contiguous()
    if grad_y is not None and grad_y.shape[1] != 1 and grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous(memory_format=torch.channels_last_3d)
    return bn_stats_triton_bwd(y, grad_y, mean, k_mean, k_var)


# --- the fold and the running statistics ----------------------------------------------------------

def fold_into_pointwise(mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: Optional[torch.Tensor],
                        beta: Optional[torch.Tensor], conv_weight: torch.Tensor,
                        conv_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``conv(bn(y))`` as one pointwise map: ``(W diag(s), W t + b)``.

    Args:
        mean, var: (C,), the statistics bn normalises with (biased variance).
        eps, gamma, beta: bn's epsilon and affine parameters (C,) or None (``affine=False``).
        conv_weight: (C_out, C), the 1x1x1 convolution's weight flattened; conv_bias: (C_out,) or None.

    Returns:
        ``(weight (C_out, C), bias (C_out,))`` in the statistics' dtype (float32, or float64);
        differentiable in every argument.
    """
    s = torch.rsqrt(var + eps)
    if gamma is not None:
        s = gamma.to(s.dtype) * s
    t = -mean * s
    if beta is not None:
        t = t + beta.to(s.dtype)
    w = conv_weight.to(s.dtype)
    # W t as a multiply and sum, not a matmul, so autocast keeps it in float32.
    b = (w * t).sum(1)
    if conv_bias is not None:
        b = b + conv_bias.to(s.dtype)
    return w * s, b


@torch.no_grad()
def update_running_stats(bn: torch.nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         count: int) -> None:
    """What ``nn.BatchNorm3d.forward`` does to bn's buffers in training, from the batch ``mean``
    and biased ``var`` of ``count`` values per channel: ``num_batches_tracked`` + 1, then the
    exponential (``momentum``) or, for ``momentum=None``, cumulative average of the mean and of
    the unbiased variance. Nothing when bn is in eval mode or tracks no running statistics."""
    if not (bn.training and bn.track_running_stats):
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1.0 - factor).add_((var * (count / (count - 1))).to(bn.running_var.dtype), alpha=factor)
