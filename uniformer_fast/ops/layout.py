"""Memory layouts the kernels read and write, shared by every op that feeds them.

The C++ and Triton kernels take activations (B, C, T, H, W) with unit channel stride and read any
B/T/H/W strides, so ``channels_last_3d`` tensors and slices of them pass without a copy; depthwise
weights go to the Triton kernels tap-major.
"""
from __future__ import annotations

import torch


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """t (B, C, T, H, W) as a tensor whose channel stride is 1: unchanged if it has one, else
    copied once into ``channels_last_3d`` memory."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last_3d)


def empty_channels_last(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised (B, C, T, H, W) tensor like x in dense channels_last_3d memory."""
    B, C, T, H, W = x.shape
    return x.new_empty((B, T, H, W, C), dtype=dtype or x.dtype).permute(0, 4, 1, 2, 3)


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) dense channels_last_3d -> its (B*T*H*W, C) view, one row per token."""
    return t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])


def weight_taps(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """weight (C, 1, kt, kh, kw) -> (kt * kh * kw, C) contiguous, tap-major (the Triton kernels'
    layout); ``flip`` point-reflects the kernel (the input gradient's convolution)."""
    w = weight.detach()
    if flip:
        w = w.flip((2, 3, 4))
    return w.reshape(w.shape[0], -1).t().contiguous()
