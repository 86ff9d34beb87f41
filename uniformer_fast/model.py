"""UniFormer for video (Li et al., ICLR 2022), state-dict compatible with the official model.

Activations stay (B, C, T, H, W) in ``channels_last_3d`` memory from the stem on: the stem's
LayerNorm writes channels-last, and every later op either keeps that layout or reads the
(B, T*H*W, C) token view of it without a copy. Depthwise convolutions and attention go through
:mod:`uniformer_fast.ops`, whose backend decides how they run.

Stage layout (UniFormer-S, 16x224x224 input)::

    stem    Conv3d 3x4x4 /(2,4,4) + LN   ->  64 x  8 x 56 x 56   blocks1: CBlock  x depth[0]
    embed2  Conv3d 1x2x2 /(1,2,2) + LN   -> 128 x  8 x 28 x 28   blocks2: CBlock  x depth[1]
    embed3  Conv3d 1x2x2 /(1,2,2) + LN   -> 320 x  8 x 14 x 14   blocks3: SABlock x depth[2]
    embed4  Conv3d 1x2x2 /(1,2,2) + LN   -> 512 x  8 x  7 x  7   blocks4: SABlock x depth[3]
    head    BatchNorm3d, mean over T*H*W, Linear
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import ops
from .ops import cpu_inference
from .ops.checks import is_int

__all__ = ["UniFormer", "CBlock", "SABlock", "SplitSABlock", "create_model", "list_models", "model_config",
           "uniformer_small", "uniformer_base"]

# Each downsampling halves H and W after the stem's /4: H and W must be at least 4 * 2**3.
MIN_SPATIAL = 32


def drop_path_scale(x: torch.Tensor, p: float, training: bool) -> Optional[torch.Tensor]:
    """Stochastic depth's per-sample scale of a branch x (B, ...): (B,) in x's dtype, 0 for a
    dropped sample (probability ``p``) and ``1 / (1 - p)`` for a kept one; None when inactive
    (``p == 0`` or not training). The one place the mask is drawn, so the fused CBlock tail
    (which takes it as ``branch_scale``) and :func:`drop_path` drop the same samples under a seed."""
    if p == 0.0 or not training:
        return None
    keep = 1.0 - p
    return x.new_empty(x.shape[0]).bernoulli_(keep).div_(keep)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples (dim 0) with probability ``p``, rescale the rest."""
    scale = drop_path_scale(x, p, training)
    return x if scale is None else x * scale.view((-1,) + (1,) * (x.dim() - 1))


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


def _pointwise(conv: nn.Conv3d, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
    """A 1x1x1 Conv3d (then ``activation``) as a matmul over channels on the channels-last view;
    keeps the layout."""
    y = ops.linear(x.permute(0, 2, 3, 4, 1), conv.weight.flatten(1), conv.bias, activation=activation)
    return y.permute(0, 4, 1, 2, 3)


class CMlp(nn.Module):
    """1x1x1 conv, GELU, 1x1x1 conv on (B, C, T, H, W)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(_pointwise(self.fc1, x, activation="gelu"))  # self.act fused into fc1
        return self.drop(_pointwise(self.fc2, x))


class Mlp(nn.Module):
    """Linear, GELU, Linear on (..., C) tokens."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(ops.linear(x, self.fc1.weight, self.fc1.bias, activation="gelu"))  # self.act fused
        return self.drop(ops.linear(x, self.fc2.weight, self.fc2.bias))


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens; the core runs through ``ops.attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fp32: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.fp32 = fp32
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.fp32 and torch.is_autocast_enabled(qkv.device.type):
            # Under autocast, logits and probabilities stay float32 (the official light models
            # overflowed in fp16 otherwise); the projections around it keep the low precision.
            with torch.autocast(qkv.device.type, enabled=False):
                x = ops.attention(qkv.float(), self.num_heads, scale=self.scale, dropout_p=dropout_p)
        else:
            x = ops.attention(qkv, self.num_heads, scale=self.scale, dropout_p=dropout_p)
        return self.proj_drop(ops.linear(x, self.proj.weight, self.proj.bias))


def _depthwise(dim: int, k: int) -> nn.Conv3d:
    return nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)


def _dpe_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The dynamic position embedding ``x + dwconv(x)``, with the arguments of ``ops.dpe_bn_stats``."""
    return ops.dwconv3d(x, weight, bias, residual=True)


def _bn_uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` is a BatchNorm3d that normalises with the batch's statistics (as
    ``nn.BatchNorm3d.forward`` decides: training mode, or no running statistics kept)."""
    return isinstance(bn, nn.BatchNorm3d) and (bn.training or (bn.running_mean is None and bn.running_var is None))


def _op_then_bn(bn: nn.Module, op, op_with_stats, *args, **kwargs):
    """``(op(*args), stats)``: stats the batch ``(mean, var)`` of the output for ``bn``, computed by
    ``op_with_stats`` with it when bn normalises with batch statistics and a fused backend
    (anything but "reference") runs the call; else None, and bn runs as the plain module."""
    if _bn_uses_batch_statistics(bn) and ops.backend_for(op_with_stats, *args, **kwargs) != "reference":
        y, mean, var = op_with_stats(*args, **kwargs)
        return y, (mean, var)
    return op(*args, **kwargs), None


def _bn_pointwise(bn: nn.Module, conv: nn.Conv3d, y: torch.Tensor, stats, activation: Optional[str] = None):
    """``activation(conv(bn(y)))`` on y (B, C, T, H, W) -> (B, C_out, T, H, W). With the batch
    statistics ``stats = (mean, var)`` that an op emitted with y, bn is applied on load into conv
    (:func:`ops.fold_into_pointwise`, differentiable) and its running statistics updated as
    ``nn.BatchNorm3d`` does: no normalisation pass over y. Without, bn then conv."""
    if stats is None:
        return _pointwise(conv, bn(y), activation)
    mean, var = stats
    n = y.numel() // y.shape[1]
    if n <= 1:  # as F.batch_norm: a variance needs two values
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")
    ops.update_running_stats(bn, mean, var, n)
    w, b = ops.fold_into_pointwise(mean, var, bn.eps, bn.weight, bn.bias, conv.weight.flatten(1), conv.bias)
    a = ops.linear(y.permute(0, 2, 3, 4, 1), w.to(y.dtype), b.to(y.dtype), activation=activation)
    return a.permute(0, 4, 1, 2, 3)


class CBlock(nn.Module):
    """Stage 1-2 block: DPE, Local MHRA (BN, 1x1x1, depthwise 5x5x5, 1x1x1), conv MLP."""

    def __init__(self, dim: int, num_heads: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, attention_fp32: bool = False):
        super().__init__()
        self.pos_embed = _depthwise(dim, 3)
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.attn = _depthwise(dim, 5)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = CMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        # DPE: x = x + dwconv3x3x3(x), with norm1's batch statistics when a fused kernel emits them.
        x, stats = _op_then_bn(self.norm1, _dpe_op, ops.dpe_bn_stats, x, self.pos_embed.weight, self.pos_embed.bias)
        # Local MHRA: x = x + DropPath(conv2(dwconv5x5x5(conv1(norm1(x))))), the tail one fused op
        # that takes the stochastic-depth scale and emits norm2's statistics.
        u = _bn_pointwise(self.norm1, self.conv1, x, stats)
        scale = drop_path_scale(u, self.drop_path.p, self.training)
        x, stats = _op_then_bn(self.norm2, ops.local_mhra_tail, ops.local_mhra_tail_bn_stats, u, self.attn.weight,
                               self.attn.bias, self.conv2.weight, self.conv2.bias, x, branch_scale=scale)
        # MLP: x = x + DropPath(fc2(GELU(fc1(norm2(x))))).
        if stats is None and not self.training and cpu_inference.fast_path(x):
            mlp = self.mlp
            y = ops.mlp(self.norm2(x).permute(0, 2, 3, 4, 1), mlp.fc1.weight.flatten(1), mlp.fc1.bias,
                        mlp.fc2.weight.flatten(1), mlp.fc2.bias, residual=x.permute(0, 2, 3, 4, 1))
            return y.permute(0, 4, 1, 2, 3)
        h = self.mlp.drop(_bn_pointwise(self.norm2, self.mlp.fc1, x, stats, activation="gelu"))
        return x + self.drop_path(self.mlp.drop(_pointwise(self.mlp.fc2, h)))


def _packed_batch_stride(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied to packed channels-last strides when it is a batch of one whose dim-0 stride
    is not the packed one and a gradient will flow through it; else ``x`` itself.

    Indexing never reads the stride of a size-1 dim, but ATen's CPU batch-norm backward does: for
    the stride C that the stage-4 token view's transpose and reshape leave on a batch of one, every
    gradient through the final BatchNorm3d came out wrong (1.3x the official model's, torch 2.13).
    A copy (a few hundred KB there), not ``as_strided``, which the ONNX exporter traced into wrong
    values; inference needs neither."""
    if x.dim() < 2 or x.shape[0] != 1 or not (x.requires_grad and torch.is_grad_enabled()):
        return x
    packed = max(s * n for s, n in zip(x.stride()[1:], x.shape[1:]))
    return x if x.stride(0) == packed else x.clone(memory_format=torch.channels_last_3d)


class SABlock(nn.Module):
    """Stage 3-4 block: DPE, joint spatiotemporal attention over all T*H*W tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, attention_fp32: bool = False):
        super().__init__()
        self.pos_embed = _depthwise(dim, 3)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, attention_fp32)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        # The DPE and norm1 in one op: y = x + dwconv(x) + bias and z = norm1(y) (one pass on "triton").
        x, z = ops.dpe_layernorm(x, self.pos_embed.weight, self.pos_embed.bias, self.norm1.weight,
                                 self.norm1.bias, self.norm1.eps)
        B, C, T, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C): a view when x is channels-last
        t = t + self.drop_path(self.attn(z.flatten(2).transpose(1, 2)))
        if not self.training and cpu_inference.fast_path(t):
            mlp = self.mlp
            t = ops.mlp(self.norm2(t), mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, residual=t)
        else:
            t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(B, C, T, H, W)


class SplitSABlock(SABlock):
    """Divided attention: temporal (over T per position), then spatial (over H*W per frame); the
    SABlock's parts plus the temporal step's norm and attention.

    As in the official model, the spatial step's residual is the DPE output, not the temporal
    step's output; the temporal branch reaches the stream only through the spatial attention.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, attention_fp32: bool = False):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, attention_fp32)
        self.t_norm = nn.LayerNorm(dim, eps=1e-6)
        self.t_attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, attention_fp32)

    def forward(self, x):
        x = _dpe_op(x, self.pos_embed.weight, self.pos_embed.bias)
        B, C, T, H, W = x.shape
        tokens = x.permute(0, 2, 3, 4, 1)  # (B, T, H, W, C)
        t = tokens.permute(0, 2, 3, 1, 4).reshape(B * H * W, T, C)
        t = t + self.drop_path(self.t_attn(self.t_norm(t)))
        s = t.view(B, H * W, T, C).transpose(1, 2).reshape(B * T, H * W, C)
        s = tokens.reshape(B * T, H * W, C) + self.drop_path(self.attn(self.norm1(s)))
        s = s.reshape(B, T * H * W, C)
        s = s + self.drop_path(self.mlp(self.norm2(s)))
        return s.transpose(1, 2).reshape(B, C, T, H, W)


def _patches(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """x (B, C, T, H, W) -> the Conv3d's input patches (B, T', H', W', K), K = C * kt * kh * kw,
    gathered in the order that reads x in the longest contiguous runs: tap-major with channels
    innermost for a channels-last x (runs of C), else channel-major as the Conv3d weight is laid
    out (runs of kw along W; the input clip). :func:`_patch_weight` gives the weight rows in the
    same order."""
    (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = kernel, stride, padding
    channels_inner = _channels_inner(x)
    if pt or ph or pw:
        x = F.pad(x, (pw, pw, ph, ph, pt, pt))
    p = x.unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)  # (B, C, T', H', W', kt, kh, kw)
    if channels_inner:
        return p.permute(0, 2, 3, 4, 5, 6, 7, 1).flatten(4)
    return p.permute(0, 2, 3, 4, 1, 5, 6, 7).flatten(4)


def _channels_inner(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.shape[1] > 1


def _patch_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The Conv3d weight (C_out, C, kt, kh, kw) as (C_out, K) rows in :func:`_patches`' order for x."""
    if _channels_inner(x):
        return weight.permute(0, 2, 3, 4, 1).flatten(1)
    return weight.flatten(1)


class PatchEmbed(nn.Module):
    """Strided Conv3d then LayerNorm over channels; the output is channels-last in memory.

    In CPU inference (no autograd, ``ops.linear`` on "auto" or "onednn") the convolution runs on
    oneDNN. The stem, whose input is the channels-first clip, runs as ATen's convolution on a
    channels-last copy of it where oneDNN has the dtype (float32, and bfloat16 on CPUs with its
    instructions; 1.6 against 4.3 ms as gather + matmul at 1x16x224, 2 threads): its 4x4 kernel
    always takes ATen's oneDNN path. The others run as a matmul over their gathered patches (runs of
    C channels): ATen sends a batch-1 convolution with a 2x2 kernel and a small input to its slow
    direct loop (3x the matmul at 1x8x224), and its CPU half-precision 3-D convolution is one too.
    """

    def __init__(self, in_chans: int, dim: int, kernel, stride, padding):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride, padding)

    def forward(self, x):
        proj = self.proj
        # Inference only: training keeps ATen's convolution, whose backward inductor compiles
        # soundly (the gathered patches' unfold backward aborted in inductor's 2-thread CPU code).
        if cpu_inference.fast_path(x):
            if not _channels_inner(x) and cpu_inference.onednn_convolution(x):
                x = proj(x.contiguous(memory_format=torch.channels_last_3d)).permute(0, 2, 3, 4, 1)
            else:
                rows = _patches(x, proj.kernel_size, proj.stride, proj.padding)
                x = ops.linear(rows, _patch_weight(proj.weight, x), proj.bias)
        else:
            x = proj(x).permute(0, 2, 3, 4, 1)
        return self.norm(x).permute(0, 4, 1, 2, 3)


def _fold_bn_into_pointwise(bn: nn.BatchNorm3d, conv: nn.Conv3d) -> None:
    """Make ``conv(x)`` compute what ``conv(bn(x))`` did with ``bn`` in eval mode."""
    w, b = ops.fold_into_pointwise(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                                   conv.weight.flatten(1), conv.bias)
    conv.weight.copy_(w.view_as(conv.weight))
    conv.bias = nn.Parameter(b.to(conv.weight.dtype))


def _is_int_seq(v, n):
    return isinstance(v, Sequence) and len(v) == n and all(is_int(i) for i in v)


class UniFormer(nn.Module):
    """UniFormer video classifier: input (B, in_chans, T, H, W), output (B, num_classes) logits.

    Parameter names and shapes equal the official Sense-X/UniFormer video model's, so its
    checkpoints load strictly (see :func:`uniformer_fast.load_checkpoint`).
    ``checkpoint_num[i]`` recomputes the first ``checkpoint_num[i]`` blocks of stage i in the
    backward pass instead of storing their activations. ``attention_fp32`` keeps the attention
    core in float32 under autocast.

    ``class_names``: index -> name of the head's classes, or None. :func:`load_checkpoint` and
    :func:`create_model` set it from :func:`uniformer_fast.class_names` when the checkpoint is named
    after a dataset whose class count its head has (``uniformer_small_k400_16x8``); the commands and
    :func:`uniformer_fast.evaluate` name their outputs with it.
    """

    def __init__(self, depth=(3, 4, 8, 3), embed_dim=(64, 128, 320, 512), head_dim: int = 64,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 num_classes: int = 400, in_chans: int = 3, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, split: bool = False,
                 std: bool = False, checkpoint_num=(0, 0, 0, 0), attention_fp32: bool = False):
        super().__init__()
        if not _is_int_seq(depth, 4) or min(depth) < 1:
            raise ValueError(f"depth must be 4 positive ints (blocks per stage); got {depth!r}")
        if not _is_int_seq(embed_dim, 4) or min(embed_dim) < 1:
            raise ValueError(f"embed_dim must be 4 positive ints (channels per stage); got {embed_dim!r}")
        if not is_int(head_dim) or head_dim < 1 or any(d % head_dim for d in embed_dim):
            raise ValueError(f"head_dim must be a positive int dividing every embed_dim {tuple(embed_dim)}; "
                             f"got {head_dim!r}")
        if not _is_int_seq(checkpoint_num, 4) or any(not 0 <= n <= d for n, d in zip(checkpoint_num, depth)):
            raise ValueError(f"checkpoint_num must be 4 ints with 0 <= checkpoint_num[i] <= depth[i] = "
                             f"{tuple(depth)}; got {checkpoint_num!r}")
        if not is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head); got {num_classes!r}")
        if not is_int(in_chans) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int (input channels); got {in_chans!r}")
        if (isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real)
                or not math.isfinite(mlp_ratio) or int(min(embed_dim) * mlp_ratio) < 1):
            raise ValueError(f"mlp_ratio must be a positive float with int(embed_dim * mlp_ratio) >= 1 "
                             f"(the MLP's hidden width); got {mlp_ratio!r}")
        # The official model computes ``qk_scale or head_dim ** -0.5``, silently ignoring 0.
        if qk_scale is not None and (isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real)
                                     or not math.isfinite(qk_scale) or qk_scale <= 0):
            raise ValueError(f"qk_scale must be None (head_dim ** -0.5) or a positive float; got {qk_scale!r}")
        for name, p in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                        ("drop_path_rate", drop_path_rate)):
            if not (isinstance(p, numbers.Real) and 0.0 <= p < 1.0):
                raise ValueError(f"{name} must be a float in [0, 1); got {p!r}")

        self.depth = tuple(depth)
        self.embed_dim = tuple(embed_dim)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.class_names: Optional[List[str]] = None
        self.num_features = embed_dim[-1]
        self.checkpoint_num = tuple(checkpoint_num)

        down = ((3, 2, 2), (1, 2, 2), (1, 0, 0)) if std else ((1, 2, 2), (1, 2, 2), (0, 0, 0))
        self.patch_embed1 = PatchEmbed(in_chans, embed_dim[0], (3, 4, 4), (2, 4, 4), (1, 0, 0))
        self.patch_embed2 = PatchEmbed(embed_dim[0], embed_dim[1], *down)
        self.patch_embed3 = PatchEmbed(embed_dim[1], embed_dim[2], *down)
        self.patch_embed4 = PatchEmbed(embed_dim[2], embed_dim[3], *down)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()  # rises linearly over all blocks
        sa_block = SplitSABlock if split else SABlock
        block_types = (CBlock, CBlock, sa_block, sa_block)
        start = 0
        for i, (n, dim, block) in enumerate(zip(depth, embed_dim, block_types)):
            self.add_module(f"blocks{i + 1}", nn.ModuleList([
                block(dim, dim // head_dim, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      dpr[start + j], attention_fp32) for j in range(n)]))
            start += n
        self.norm = nn.BatchNorm3d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # Official init of the divided attention's temporal branch: it starts as a constant map.
            if ".t_attn." in name:
                nn.init.constant_(p, 1.0 if name.endswith("proj.weight") else 0.0)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def stages(self):
        return (self.patch_embed1, self.blocks1), (self.patch_embed2, self.blocks2), \
               (self.patch_embed3, self.blocks3), (self.patch_embed4, self.blocks4)

    def _check_input(self, x):
        form = f"(B, {self.in_chans}, T, H, W) with H, W >= {MIN_SPATIAL}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {form}; got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"x must be a 5-D tensor of shape {form}; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of shape {form}; got dtype {x.dtype}")
        B, C, T, H, W = x.shape
        if C != self.in_chans or B < 1 or T < 1 or H < MIN_SPATIAL or W < MIN_SPATIAL:
            raise ValueError(f"x must have shape {form}; got {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, T, H, W) -> the final feature map (B, embed_dim[-1], T', H/32, W/32).

        Under CPU autocast to a dtype this CPU has no instructions for (bfloat16 on AVX2, say:
        ``ops.cpu_native_dtypes()``), the features are computed in float32, as OpenVINO does with
        its bf16 hint there, and returned in the autocast dtype: emulated half-precision math is
        slower than float32, and no more exact."""
        self._check_input(x)
        return self._run_stages(x, (3,), True)[0]

    def forward_intermediates(self, x: torch.Tensor, stages: Sequence[int] = (0, 1, 2, 3), *,
                              norm: bool = False) -> list[torch.Tensor]:
        """The feature map after each stage in ``stages``, for detection and localisation heads.

        Stage ``i`` is patch embedding ``i + 1`` and then blocks ``i + 1``, computed exactly as
        :meth:`forward_features` computes them (same code: CPU inference path, autocast handling,
        gradient checkpointing), and only up to the highest stage requested: later stages do no
        work. For a (B, 3, 16, 224, 224) input, UniFormer-S and -B give (``std`` or not)::

            stage 0  (B,  64, 8, 56, 56)
            stage 1  (B, 128, 8, 28, 28)
            stage 2  (B, 320, 8, 14, 14)
            stage 3  (B, 512, 8,  7,  7)

        In general stage ``i`` is (B, embed_dim[i], T', H // 4 // 2**i, W // 4 // 2**i) with
        ``T' = (T - 1) // 2 + 1``. Each map is the stage's own output, channels-last in memory
        (``torch.channels_last_3d``), not a copy; under CPU autocast to a dtype the CPU lacks, they
        are computed in float32 and returned in the autocast dtype, as forward_features does.

        Args:
            x: (B, in_chans, T, H, W) with H, W >= 32.
            stages: distinct stage indices 0..3 (or -4..-1, counted from the last stage); the
                result lists them in this order.
            norm: apply the model's final norm (the BatchNorm3d that forward_features applies
                after the last stage) to the stage-3 output, so that ``forward_intermediates(x,
                (3,), norm=True)[0]`` equals ``forward_features(x)`` exactly. Earlier stages are
                always returned without a norm (none exists for them); with stage 3 not
                requested, ``norm`` has no effect.

        Returns:
            A list of (B, C_i, T_i, H_i, W_i) tensors, one per entry of ``stages``.
        """
        self._check_input(x)
        stages = self._check_stages(stages)
        if not isinstance(norm, bool):
            raise TypeError(f"norm must be a bool (apply the final norm to the stage-3 output); "
                            f"got {type(norm).__name__}")
        return self._run_stages(x, stages, norm)

    @staticmethod
    def _check_stages(stages) -> tuple:
        form = "a non-empty sequence of distinct stage indices in 0..3 (or -4..-1), e.g. (0, 1, 2, 3)"
        if not isinstance(stages, Sequence) or isinstance(stages, (str, bytes)):
            raise TypeError(f"stages must be {form}; got {type(stages).__name__} {stages!r}")
        if not all(is_int(i) for i in stages):
            raise TypeError(f"stages must be {form}; got {stages!r}")
        if not stages or not all(-4 <= i <= 3 for i in stages):
            raise ValueError(f"stages must be {form}; got {stages!r}")
        mapped = tuple(int(i) % 4 for i in stages)
        if len(set(mapped)) != len(mapped):
            raise ValueError(f"stages must be {form}; got {stages!r}, which names a stage twice")
        return mapped

    def _run_stages(self, x: torch.Tensor, stages: tuple, norm: bool) -> list[torch.Tensor]:
        """:meth:`_features` under the CPU autocast policy (see forward_features)."""
        return cpu_inference.in_native_precision(self._features, x, stages, norm)

    def _features(self, x: torch.Tensor, stages: tuple, norm: bool) -> list[torch.Tensor]:
        """The one loop over the stages: the outputs of ``stages`` (distinct ints in 0..3), in that
        order, the last stage's through ``self.norm`` if ``norm``; stops after the highest."""
        last = max(stages)
        outputs = {}
        for i, (embed, blocks) in enumerate(self.stages()):
            x = embed(x)
            if i == 0:
                x = self.pos_drop(x)
            n_ckpt = self.checkpoint_num[i] if torch.is_grad_enabled() else 0
            for j, blk in enumerate(blocks):
                if j < n_ckpt:
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            if i in stages:
                outputs[i] = self.norm(_packed_batch_stride(x)) if norm and i == 3 else x
            if i == last:
                break
        return [outputs[i] for i in stages]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map (B, C, T, H, W) -> logits (B, num_classes) (pooled features if pre_logits)."""
        x = x.flatten(2).mean(-1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse_for_inference(self, *, keep_freed_memory: bool = True) -> "UniFormer":
        """Prepare the model for inference: fold each CBlock's eval-mode BatchNorms into the 1x1x1
        conv that follows it, in place, and (CPU serving) let glibc keep freed memory.

        ``conv(bn(x)) = (W diag(s)) x + (W t + b)`` with ``s = gamma / sqrt(var + eps)`` and
        ``t = beta - mean * s``; the BatchNorm becomes an identity, saving one read and one write
        of the activation per fold. Outputs stay equal within float rounding. The fused model is
        for inference: it cannot be put back in training mode, and its state dict lacks the folded
        norms (fold after loading a checkpoint).

        ``keep_freed_memory`` (default on): on Linux with glibc, fix malloc's mmap and trim
        thresholds for the whole process (:func:`uniformer_fast.cpu_memory.keep_freed_memory`), so
        that the tens of MB each forward frees are reused by the next one instead of returning to
        the kernel and faulting back in: 6-7% of a float32 CPU forward. The process then keeps its
        peak heap resident. Returns ``self``.
        """
        if not isinstance(keep_freed_memory, bool):
            raise TypeError(f"keep_freed_memory must be a bool; got {type(keep_freed_memory).__name__}")
        if self.training:
            raise RuntimeError("fuse_for_inference() needs eval mode (model.eval()): BatchNorm folds use "
                               "the running statistics")
        if keep_freed_memory:
            from . import cpu_memory
            cpu_memory.keep_freed_memory()
        for blocks in (self.blocks1, self.blocks2):
            for blk in blocks:
                if isinstance(blk.norm1, nn.BatchNorm3d):
                    _fold_bn_into_pointwise(blk.norm1, blk.conv1)
                    blk.norm1 = nn.Identity()
                if isinstance(blk.norm2, nn.BatchNorm3d):
                    _fold_bn_into_pointwise(blk.norm2, blk.mlp.fc1)
                    blk.norm2 = nn.Identity()
        self.fused_for_inference = True
        return self

    def train(self, mode: bool = True):
        if mode and getattr(self, "fused_for_inference", False):
            raise RuntimeError("this model was fused for inference (its BatchNorms are folded); "
                               "build or load an unfused model to train")
        return super().train(mode)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: no head)."""
        if not is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0; got {num_classes!r}")
        ref = self.norm.weight
        self.num_classes = num_classes
        self.class_names = None
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()


# Variants: small config dicts, any constructor argument overridable in create_model.
_CONFIGS = {
    "uniformer_small": dict(depth=(3, 4, 8, 3), embed_dim=(64, 128, 320, 512), head_dim=64,
                            mlp_ratio=4.0, qkv_bias=True),
    "uniformer_base": dict(depth=(5, 8, 20, 7), embed_dim=(64, 128, 320, 512), head_dim=64,
                           mlp_ratio=4.0, qkv_bias=True),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_CONFIGS)


def model_config(name: str) -> dict:
    """The constructor arguments of a named variant (a copy): what :func:`create_model` builds
    before its overrides, and what the official implementation takes for the same variant."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    return dict(_CONFIGS[name])


def create_model(name: str, *, pretrained: Optional[str] = None, **overrides) -> UniFormer:
    """Build a named variant; ``overrides`` replace any :class:`UniFormer` argument.

    ``pretrained`` is a local checkpoint path or an official checkpoint name such as
    ``"uniformer_small_k400_16x8"`` (fetched from the Hugging Face Hub when ``huggingface_hub`` is
    installed and the network is reachable). A name's dataset sets ``num_classes`` unless given.
    """
    kwargs = {**model_config(name), **overrides}
    path = None
    if pretrained is not None:
        from .checkpoint import resolve_pretrained
        path, num_classes = resolve_pretrained(pretrained, name)
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
    model = UniFormer(**kwargs)
    if path is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, path)
    return model


def uniformer_small(**kwargs) -> UniFormer:
    """UniFormer-S: depth (3, 4, 8, 3), 21.4 M parameters with 400 classes."""
    return create_model("uniformer_small", **kwargs)


def uniformer_base(**kwargs) -> UniFormer:
    """UniFormer-B: depth (5, 8, 20, 7), 49.8 M parameters with 400 classes."""
    return create_model("uniformer_base", **kwargs)
