"""The official UniFormer video model's computation, restated in plain PyTorch.

A structural twin of Sense-X/UniFormer ``video_classification/slowfast/models/uniformer.py``
(same modules, same parameter names, same order of operations): contiguous (B, C, T, H, W)
activations, ``nn.Conv3d`` everywhere, attention with an explicit float softmax over the N x N
matrix. It shares no code with :mod:`uniformer_fast.model`, so it serves as the independent
oracle in parity tests and as the "official eager" baseline in benchmarks. Not for production.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint


class _DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep
        return x * mask


class _Mlp(nn.Module):
    def __init__(self, dim, hidden, drop, conv):
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1) if conv else nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1) if conv else nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


class _CBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path):
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.attn = nn.Conv3d(dim, dim, 5, 1, 2, groups=dim)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop, conv=True)

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _SABlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path):
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop, conv=False)

    def forward(self, x):
        x = x + self.pos_embed(x)
        B, C, T, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, T, H, W)


class _SplitSABlock(_SABlock):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path)
        self.t_norm = nn.LayerNorm(dim, eps=1e-6)
        self.t_attn = _Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)

    def forward(self, x):
        x = x + self.pos_embed(x)
        B, C, T, H, W = x.shape
        a = x.view(B, C, T, H * W).permute(0, 3, 2, 1).contiguous().view(B * H * W, T, C)
        a = a + self.drop_path(self.t_attn(self.t_norm(a)))
        a = a.view(B, H * W, T, C).permute(0, 2, 1, 3).contiguous().view(B * T, H * W, C)
        res = x.view(B, C, T, H * W).permute(0, 2, 3, 1).contiguous().view(B * T, H * W, C)
        a = (res + self.drop_path(self.attn(self.norm1(a)))).view(B, T * H * W, C)
        out = a + self.drop_path(self.mlp(self.norm2(a)))
        return out.transpose(1, 2).reshape(B, C, T, H, W)


class _PatchEmbed(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding):
        super().__init__()
        self.norm = nn.LayerNorm(cout)
        self.proj = nn.Conv3d(cin, cout, kernel, stride, padding)

    def forward(self, x):
        x = self.proj(x)
        B, C, T, H, W = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.reshape(B, T, H, W, -1).permute(0, 4, 1, 2, 3).contiguous()


class OfficialUniFormer(nn.Module):
    """Same constructor arguments as :class:`uniformer_fast.UniFormer`; input (B, 3, T, H, W)."""

    def __init__(self, depth=(3, 4, 8, 3), embed_dim=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, num_classes=400, in_chans=3, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, split=False, std=False,
                 checkpoint_num=(0, 0, 0, 0)):
        super().__init__()
        self.checkpoint_num = checkpoint_num
        down = ((3, 2, 2), (1, 2, 2), (1, 0, 0)) if std else ((1, 2, 2), (1, 2, 2), (0, 0, 0))
        self.patch_embed1 = _PatchEmbed(in_chans, embed_dim[0], (3, 4, 4), (2, 4, 4), (1, 0, 0))
        self.patch_embed2 = _PatchEmbed(embed_dim[0], embed_dim[1], *down)
        self.patch_embed3 = _PatchEmbed(embed_dim[1], embed_dim[2], *down)
        self.patch_embed4 = _PatchEmbed(embed_dim[2], embed_dim[3], *down)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depth))]
        heads = [d // head_dim for d in embed_dim]
        kinds = [_CBlock, _CBlock] + [_SplitSABlock if split else _SABlock] * 2
        offset = 0
        for i in range(4):
            blocks = [kinds[i](embed_dim[i], heads[i], mlp_ratio, qkv_bias, qk_scale, drop_rate,
                               attn_drop_rate, dpr[offset + j]) for j in range(depth[i])]
            setattr(self, f"blocks{i + 1}", nn.ModuleList(blocks))
            offset += depth[i]
        self.norm = nn.BatchNorm3d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.pos_drop(self.patch_embed1(x))
        for i in range(4):
            if i > 0:
                x = getattr(self, f"patch_embed{i + 1}")(x)
            for j, blk in enumerate(getattr(self, f"blocks{i + 1}")):
                if j < self.checkpoint_num[i]:
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x).flatten(2).mean(-1))
