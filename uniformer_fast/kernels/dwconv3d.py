"""Depthwise 3-D convolution (stride 1, zero "same" padding, odd kernels up to 7): Triton kernels.

Layouts (channels-last inside, so a program's BLOCK_C channels are contiguous in memory and each
thread loads 16 bytes along C):

- ``x``: (B, T, H, W, C) read through its strides ``(stride_b, stride_t, stride_h, stride_w)``
  with unit channel stride, i.e. a (B, C, T, H, W) tensor in ``channels_last_3d`` memory or any
  slice of one along B/T/H/W. Nothing else about its strides is assumed.
- ``weight_taps``: (KT * KH * KW, C) contiguous, tap-major: row ``(kt * KH + kh) * KW + kw`` holds
  that tap's weight for every channel, so a program loads its BLOCK_C weights of a tap with one
  contiguous load, once.
- ``y`` / ``dx``: (B, T, H, W, C) contiguous (dense ``channels_last_3d``), written here.
- ``dw_partial``: (G, KT * KH * KW, C) float32, ``db_partial``: (G, C) float32: one row per
  position group of the weight-gradient kernel; summed over G afterwards.

Kernels:

- :func:`dwconv3d_fwd_kernel`: ``y = conv(x) (+ bias) (+ x)``; with ``STATS`` it also writes the
  BatchNorm partial statistics of y (kernels/bn_stats.py), for the CBlock's DPE in training. A program owns BLOCK_P positions
  (a run of the flattened T*H*W positions of one batch element) x BLOCK_C channels and
  accumulates in float32 over the taps: a runtime loop over the KT*KH rows of taps, unrolled
  along KW; each tap's BLOCK_C weights are loaded once per program. The input gradient is the same kernel
  on ``dy`` with the point-reflected kernel, ``+ dy`` when the forward had the residual.
- :func:`dwconv3d_bwd_dw_kernel`: the weight and bias gradient. A program owns a group of
  ``tiles_per_prog`` position tiles x BLOCK_C channels; for each tap it accumulates
  ``dy * x_shifted`` over its tiles in a float32 (BLOCK_P, BLOCK_C) register block and stores the
  column sums as its row of ``dw_partial``. The launcher then sums the G rows with ``torch.sum``
  (a fixed-order reduction): no float atomics, so two runs give bitwise-equal gradients.

Offsets are 64-bit: batch and position offsets are promoted to int64 before they meet a stride,
so tensors past 2**31 elements are addressed correctly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, tiles, check_channel_stride, dense
from .tiles import is_given, num_sms, split_position, strided_offset
from .bn_stats import TilePartials, store_bn_partials

# The shape check the ops ask of this module (kernels/tiles.py's why_not_inputs): any channel count.
why_not_shape = tiles.why_not_shape

# Block sizes, keyed by the channel block: BLOCK_C channels of 16-bit data are 8 threads x 16
# bytes (64 channels) or 4 threads x 16 bytes (32 channels); BLOCK_P * BLOCK_C = 4096 elements per
# program. Every config the launchers can choose is compiled for sm_80 and sm_90 in
# tests/test_dwconv3d_compile.py, which fails on any register spill.
GPU_BLOCKS = {
    64: dict(BLOCK_P=64, BLOCK_C=64),
    32: dict(BLOCK_P=128, BLOCK_C=32),
}
# Forward warps: 8 keep the float32 accumulator at 16 registers per thread (sm_90: 73 registers
# for 3x3x3, 113 for 5x5x5, against 123 / 168 with 4 warps). A row of 7 unrolled taps (KW = 7)
# with 16-bit data spilled at 8 warps on sm_80, where ptxas holds 256-thread programs to 80
# registers; it takes 4.
FWD_NUM_WARPS = 8
FWD_NUM_WARPS_KW7 = 4
# Weight gradient: 4 warps (8 spilled on sm_80 for float32 at its 80-register cap). float32 takes
# a quarter of the tile: at 4096 elements it spilled on sm_80 under Triton 3.6 ((3, 1, 1), 128
# registers), at 2048 under 3.9 (every kernel size but (3, 1, 1)); 32 x 32 compiles clean under both.
DW_NUM_WARPS = 4
DW_FP32_BLOCKS = dict(BLOCK_P=32, BLOCK_C=32)
# Weight-gradient programs per SM: as many as fit at once (4 warps at <= 128 registers: 4), few
# enough that the float32 partials (G x taps x C) stay small next to the activations.
DW_PROGRAMS_PER_SM = 4
# Under the interpreter every op costs ~0.1 ms per program whatever the block size: few, large
# position tiles; a channel block of 16 so that small test channel counts (C = 20) still cross a
# block edge; two tiles per weight-gradient program so its tile loop and the second reduction
# over G both run.
INTERPRET_CONFIG = dict(BLOCK_P=64, BLOCK_C=16, num_warps=1)
INTERPRET_DW_TILES_PER_PROG = 2


def fwd_config(C: int, kernel_size: tuple) -> dict:
    """BLOCK_P, BLOCK_C and num_warps of the forward (and input-gradient) kernel."""
    if INTERPRET:
        return dict(INTERPRET_CONFIG)
    warps = FWD_NUM_WARPS_KW7 if kernel_size[2] == 7 else FWD_NUM_WARPS
    return dict(GPU_BLOCKS[64 if C > 32 else 32], num_warps=warps)


def dw_config(C: int, dtype: torch.dtype) -> dict:
    """BLOCK_P, BLOCK_C and num_warps of the weight-gradient kernel for C channels of dtype."""
    if INTERPRET:
        return dict(INTERPRET_CONFIG)
    if dtype == torch.float32:
        return dict(DW_FP32_BLOCKS, num_warps=DW_NUM_WARPS)
    return dict(GPU_BLOCKS[64 if C > 32 else 32], num_warps=DW_NUM_WARPS)


@triton.jit
def depthwise_tile(x_base, x_off, w_ptr, t, h, w, p_mask, c, c_mask, C, T, H, W,
                   stride_xt, stride_xh, stride_xw,
                   KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """float32 (BLOCK_P, BLOCK_C): the depthwise convolution, without bias, of the positions
    (t, h, w) and channels c of one batch element (x_base; x_off the positions' offsets),
    weights tap-major (KT*KH*KW, C) at w_ptr. Shared by every kernel that convolves a tile."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # A runtime loop over the (kt, kh) rows of taps, unrolled only along kw: fully unrolled, the
    # compiler hoists every tap's load ahead of the FMAs and runs out of registers (5x5x5).
    for k in range(KT * KH):
        dt = k // KH - KT // 2
        dh = k % KH - KH // 2
        ti = t + dt
        hi = h + dh
        m_th = p_mask & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H)
        row_off = x_off + (dt * stride_xt + dh * stride_xh)
        for kw in tl.static_range(KW):
            wi = w + (kw - KW // 2)
            m = m_th & (wi >= 0) & (wi < W)
            xv = tl.load(x_base + (row_off + (kw - KW // 2) * stride_xw)[:, None] + c[None, :],
                         mask=m[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + (k * KW + kw) * C + c, mask=c_mask, other=0.0)
            acc += xv * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_tile(x_ptr, w_ptr, b_ptr, pid_p, pid_b, c, c_mask, C, T, H, W,
              stride_xb, stride_xt, stride_xh, stride_xw,
              KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
              HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile pid_p (BLOCK_P positions in (T, H, W) order) of batch element pid_b (int64), channels
    c of x (B, T, H, W, C) strided: returns ``(acc, p, p_mask, t, h, w)``, acc float32 (BLOCK_P,
    BLOCK_C) = the depthwise convolution + bias (if HAS_BIAS) + x (if RESIDUAL), p the flat
    positions. The start of every kernel that convolves a tile."""
    # Positions within one batch element fit in int32 (T*H*W < 2**31); offsets do not.
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < T * H * W
    t, h, w = split_position(p, H, W)
    x_base = x_ptr + pid_b * stride_xb
    x_off = t.to(tl.int64) * stride_xt + h.to(tl.int64) * stride_xh + w.to(tl.int64) * stride_xw
    acc = depthwise_tile(x_base, x_off, w_ptr, t, h, w, p_mask, c, c_mask, C, T, H, W,
                         stride_xt, stride_xh, stride_xw, KT, KH, KW, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        acc += tl.load(x_base + x_off[:, None] + c[None, :], mask=p_mask[:, None] & c_mask[None, :],
                       other=0.0).to(tl.float32)
    return acc, p, p_mask, t, h, w


@triton.heuristics({"HAS_BIAS": is_given("b_ptr"), "STATS": is_given("phi_ptr")})
@triton.jit
def dwconv3d_fwd_kernel(
    x_ptr,  # (B, T, H, W, C) strided, unit channel stride
    w_ptr,  # (KT * KH * KW, C) contiguous
    b_ptr,  # (C,) or None
    y_ptr,  # (B, T, H, W, C) contiguous
    phi_ptr, psdev_ptr, pm2_ptr,  # (B * tiles_per_batch, C) float32 partials (bn_stats.py), or None
    C, T, H, W,
    stride_xb, stride_xt, stride_xh, stride_xw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
    STATS: tl.constexpr,  # phi_ptr given: also write the BatchNorm partial statistics of the stored y
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc, p, p_mask, t, h, w = conv_tile(x_ptr, w_ptr, b_ptr, pid_p, pid_b, c, c_mask, C, T, H, W,
                                        stride_xb, stride_xt, stride_xh, stride_xw,
                                        KT, KH, KW, HAS_BIAS, RESIDUAL, BLOCK_P, BLOCK_C)
    mask = p_mask[:, None] & c_mask[None, :]
    THW = T * H * W
    y_off = (pid_b * THW + p) * C
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off[:, None] + c[None, :], y, mask=mask)
    if STATS:
        store_bn_partials(y, mask, c, c_mask, pid_p, pid_b, C, THW, phi_ptr, psdev_ptr, pm2_ptr, BLOCK_P)


@triton.jit
def group_tile(tile, tiles_per_batch, num_tiles, T, H, W, BLOCK_P: tl.constexpr):
    """Position tile ``tile`` of the flattened (batch, tile) order of the weight-gradient kernel:
    ``(b, p_mask, t, h, w)``, b int64. A tile past the last one reads nothing (b would be out of
    range); the scalar condition goes into the bound, not the vector mask (interpreter)."""
    b = (tile // tiles_per_batch).to(tl.int64)
    p = (tile % tiles_per_batch) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < tl.where(tile < num_tiles, T * H * W, 0)
    t, h, w = split_position(p, H, W)
    return b, p_mask, t, h, w


@triton.heuristics({"HAS_BIAS": is_given("db_partial_ptr")})
@triton.jit
def dwconv3d_bwd_dw_kernel(
    x_ptr,  # (B, T, H, W, C) strided, unit channel stride
    dy_ptr,  # (B, T, H, W, C) strided, unit channel stride
    dw_partial_ptr,  # (G, KT * KH * KW, C) float32
    db_partial_ptr,  # (G, C) float32, or None
    C, T, H, W,
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_dyb, stride_dyt, stride_dyh, stride_dyw,
    tiles_per_batch, num_tiles, tiles_per_prog,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    row = pid_g.to(tl.int64) * (KT * KH * KW) * C

    # Runtime loops (taps outside, the program's tiles inside) keep one float32 accumulator
    # block live; unrolled, the compiler would hoist every tap's loads and run out of registers.
    for tap in range(KT * KH * KW):
        dt = tap // (KH * KW) - KT // 2
        dh = (tap // KW) % KH - KH // 2
        dw = tap % KW - KW // 2
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for i in range(tiles_per_prog):
            b, p_mask, t, h, w = group_tile(pid_g * tiles_per_prog + i, tiles_per_batch, num_tiles,
                                            T, H, W, BLOCK_P)
            ti = t + dt
            hi = h + dh
            wi = w + dw
            m = p_mask & (ti >= 0) & (ti < T) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            m2 = m[:, None] & c_mask[None, :]
            dy_off = strided_offset(b, t, h, w, stride_dyb, stride_dyt, stride_dyh, stride_dyw)
            x_off = strided_offset(b, ti, hi, wi, stride_xb, stride_xt, stride_xh, stride_xw)
            dyv = tl.load(dy_ptr + dy_off[:, None] + c[None, :], mask=m2, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + x_off[:, None] + c[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += dyv * xv
        tl.store(dw_partial_ptr + row + tap * C + c, tl.sum(acc, axis=0), mask=c_mask)

    if HAS_BIAS:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for i in range(tiles_per_prog):
            b, p_mask, t, h, w = group_tile(pid_g * tiles_per_prog + i, tiles_per_batch, num_tiles,
                                            T, H, W, BLOCK_P)
            dy_off = strided_offset(b, t, h, w, stride_dyb, stride_dyt, stride_dyh, stride_dyw)
            acc += tl.load(dy_ptr + dy_off[:, None] + c[None, :],
                           mask=p_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        tl.store(db_partial_ptr + pid_g.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=c_mask)


# --- launchers ------------------------------------------------------------------------------------

def dwconv3d_fwd(x: torch.Tensor, weight_taps: torch.Tensor, bias, residual: bool,
                 kernel_size: tuple, stats: bool = False):
    """``conv(x) (+ bias) (+ x)``, and with ``stats`` the batch statistics of it.

    Args:
        x: (B, C, T, H, W) with unit channel stride (a ``channels_last_3d`` tensor or a B/T/H/W
            slice of one); other strides are read as they are.
        weight_taps: (KT * KH * KW, C), tap-major (see the module docstring).
        bias: (C,) or None.
        residual: add ``x`` to the result.
        kernel_size: (KT, KH, KW), odd, each <= 7.
        stats: also return the per-channel batch mean and biased variance of y (as stored).

    Returns:
        y (B, C, T, H, W) in dense ``channels_last_3d`` memory, x's dtype; with ``stats``,
        ``(y, mean, var)``, mean and var (C,) float32 over (B, T, H, W), var divided by
        N = B*T*H*W (kernels/bn_stats.py: deterministic, no atomics).
    """
    check_channel_stride("x", x)
    B, C, T, H, W = x.shape
    KT, KH, KW = kernel_size
    assert weight_taps.shape == (KT * KH * KW, C)
    weight_taps, bias = dense(weight_taps), dense(bias)
    y = torch.empty((B, T, H, W, C), dtype=x.dtype, device=x.device)
    cfg = fwd_config(C, kernel_size)
    BLOCK_P, BLOCK_C, num_warps = cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["num_warps"]
    sb, _, st, sh, sw = x.stride()
    partials = TilePartials(B, C, T * H * W, BLOCK_P, x.device) if stats else None
    grid = (triton.cdiv(T * H * W, BLOCK_P), triton.cdiv(C, BLOCK_C), B)
    dwconv3d_fwd_kernel[grid](
        x, weight_taps, bias, y,
        *((partials.phi, partials.psdev, partials.pm2) if stats else (None, None, None)),
        C, T, H, W, sb, st, sh, sw,
        KT=KT, KH=KH, KW=KW, RESIDUAL=residual,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    y = y.permute(0, 4, 1, 2, 3)
    return (y, *partials.merge()) if stats else y


def dwconv3d_bwd_dw(x: torch.Tensor, dy: torch.Tensor, kernel_size: tuple, with_bias: bool):
    """Weight and bias gradients, float32, deterministic.

    Args:
        x, dy: (B, C, T, H, W), each with unit channel stride (other strides free).
        kernel_size: (KT, KH, KW).
        with_bias: also return the bias gradient.

    Returns:
        ``(dw_taps, db)``: (KT * KH * KW, C) float32 and (C,) float32 or None.
    """
    check_channel_stride("x", x)
    check_channel_stride("dy", dy)
    B, C, T, H, W = x.shape
    KT, KH, KW = kernel_size
    taps = KT * KH * KW
    cfg = dw_config(C, x.dtype)
    BLOCK_P, BLOCK_C, num_warps = cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["num_warps"]
    tiles_per_batch = triton.cdiv(T * H * W, BLOCK_P)
    num_tiles = B * tiles_per_batch
    c_blocks = triton.cdiv(C, BLOCK_C)
    if INTERPRET or x.device.type != "cuda":
        tiles_per_prog = INTERPRET_DW_TILES_PER_PROG
    else:
        # The grouping depends only on the shape and the GPU, so results are reproducible.
        groups = max(1, DW_PROGRAMS_PER_SM * num_sms(x.device) // c_blocks)
        tiles_per_prog = triton.cdiv(num_tiles, groups)
    G = triton.cdiv(num_tiles, tiles_per_prog)
    dw_partial = torch.empty((G, taps, C), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((G, C), dtype=torch.float32, device=x.device) if with_bias else None
    sxb, _, sxt, sxh, sxw = x.stride()
    sdb, _, sdt, sdh, sdw = dy.stride()
    dwconv3d_bwd_dw_kernel[(G, c_blocks)](
        x, dy, dw_partial, db_partial,
        C, T, H, W, sxb, sxt, sxh, sxw, sdb, sdt, sdh, sdw,
        tiles_per_batch, num_tiles, tiles_per_prog,
        KT=KT, KH=KH, KW=KW,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    # The second, small reduction: a fixed-order sum over the G groups.
    dw = dw_partial.sum(0)
    db = db_partial.sum(0) if with_bias else None
    return dw, db
