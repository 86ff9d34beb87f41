"""Plain-PyTorch implementations: the ground truth every other backend is tested against.

They compute exactly what the official UniFormer computes, in the input's dtype, and are
differentiable through ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def dwconv3d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       residual: bool = False) -> torch.Tensor:
    """Depthwise 3-D convolution, stride 1, zero "same" padding.

    x: (B, C, T, H, W), any memory format; weight: (C, 1, kt, kh, kw), odd sizes; bias: (C,) or None.
    Returns ``conv(x) + bias`` (``+ x`` if ``residual``) in x's shape and memory format.
    """
    kt, kh, kw = weight.shape[2:]
    y = F.conv3d(x, weight, bias, padding=(kt // 2, kh // 2, kw // 2), groups=x.shape[1])
    return x + y if residual else y


def attention_reference(qkv: torch.Tensor, num_heads: int, scale: float,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention with an explicit softmax, as the official model computes it.

    qkv: (B, N, 3 * C), the qkv Linear's output, laid out as (B, N, 3, heads, head_dim).
    Returns (B, N, C), heads concatenated along the last dimension.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None) -> torch.Tensor:
    """``F.linear`` then, if ``activation == "gelu"``, the exact (erf) GELU. x: (..., in)."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def mlp_reference(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                  fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + fc2(gelu(fc1(x)))`` over the last dimension (exact GELU); no residual if None."""
    y = F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return y if residual is None else residual + y


def local_mhra_tail_reference(u: torch.Tensor, attn_weight: torch.Tensor, attn_bias: Optional[torch.Tensor],
                              conv2_weight: torch.Tensor, conv2_bias: Optional[torch.Tensor],
                              residual: Optional[torch.Tensor],
                              branch_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tail of a Local MHRA: ``residual + branch_scale * conv2(dwconv(u) + attn_bias)``.

    u, residual: (B, C, T, H, W); attn_weight: (C, 1, kt, kh, kw), odd sizes; conv2_weight:
    (C, C, 1, 1, 1), the 1x1x1 projection; biases (C,) or None; residual None adds nothing;
    branch_scale (B,), each sample's stochastic-depth scale (as DropPath multiplies), or None.
    """
    a = dwconv3d_reference(u, attn_weight, attn_bias)
    y = F.conv3d(a, conv2_weight, conv2_bias)
    if branch_scale is not None:
        y = y * branch_scale.view(-1, 1, 1, 1, 1)
    return y if residual is None else residual + y


def dpe_layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                            eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The SABlock's DPE and the LayerNorm after it: ``y = x + dwconv(x) + bias`` and
    ``z = layer_norm(y over C) * ln_weight + ln_bias``, each (B, C, T, H, W) like x."""
    y = dwconv3d_reference(x, weight, bias, residual=True)
    z = F.layer_norm(y.permute(0, 2, 3, 4, 1), (y.shape[1],), ln_weight, ln_bias, eps)
    return y, z.permute(0, 4, 1, 2, 3)
