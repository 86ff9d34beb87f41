"""The SABlock's DPE with its LayerNorm epilogue: one Triton kernel writes the residual stream and
the normalised tokens.

``y = x + dwconv(x) + bias`` (the dynamic position embedding, depthwise, stride 1, zero "same"
padding) and ``z = layer_norm(y over C) * ln_weight + ln_bias``. A program owns BLOCK_P positions
x all C channels (BLOCK_C = the next power of two >= C, masked), so once the convolution has
accumulated a tile of y in registers, the LayerNorm's statistics are a row reduction over that
same tile: y is never read back.

Layouts (channels-last inside):

- ``x``: (B, T, H, W, C) read through its strides ``(stride_b, stride_t, stride_h, stride_w)``
  with unit channel stride (a (B, C, T, H, W) tensor in ``channels_last_3d`` memory or a B/T/H/W
  slice of one).
- ``weight_taps``: (KT * KH * KW, C) contiguous, tap-major, as in :mod:`.dwconv3d`.
- ``y``, ``z``: (B, T, H, W, C) contiguous (dense ``channels_last_3d``), written here.
- ``mean``, ``rstd``: (B * T * H * W,) float32, the LayerNorm statistics of each token, written
  for the backward.

The LayerNorm normalises y as stored (rounded to the output dtype), as the unfused composition
``layer_norm(dwconv(x))`` does, so the backward can recompute ``x_hat`` from the stored y and the
saved statistics exactly. Statistics are float32, the variance is the mean of squared deviations
(two passes over the registers, not ``E[y^2] - E[y]^2``).

Backward: :func:`dpe_layernorm_bwd_ln_kernel` recomputes ``x_hat`` from the stored y and the
saved statistics, writes ``dy_total = dy + d layer_norm / dy`` (one read of y, dz, dy; one write)
and accumulates the ln_weight / ln_bias gradients as per-program float32 partials (summed in a
fixed order afterwards: deterministic, no atomics). Then :mod:`.dwconv3d`'s kernels (the input
gradient with the residual, the deterministic weight/bias gradient) run on ``dy_total``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET, tiles, check_channel_stride, dense
from .tiles import block_c, is_given, num_sms
from .dwconv3d import conv_tile

# One program holds all channels of its positions; the block configs are compiled (without
# spills, tests/test_dpe.py) up to 1024 channels. Wider C is refused (why_not_shape), so "auto"
# takes the reference.
MAX_CHANNELS = tiles.MAX_CHANNELS["dpe"]
why_not_shape = functools.partial(tiles.why_not_shape, max_channels=MAX_CHANNELS)
# BLOCK_P * BLOCK_C elements per program: 4096, i.e. 16 float32 accumulator registers per thread
# at 8 warps (the dwconv3d forward's budget), at most 64 positions for narrow channel blocks.
TILE_ELEMENTS = 4096
MAX_BLOCK_P = 64
NUM_WARPS = 8
# As in kernels/dwconv3d.py, where a row of 7 unrolled taps (KW = 7) spilled at 8 warps on sm_80:
# 4 warps for KW = 7.
NUM_WARPS_KW7 = 4
# float32 at the widest channel blocks (512, 1024) holds half the tile at 8 warps: Triton 3.6
# spilled the full one (3x3x3 at C = 512 on sm_80; 7x7x7 at C = 1024: 7 KB of stack), and the
# 16-bit tiles, whose loads take half the registers, do not.
WIDE_FP32_FROM = 512
WIDE_FP32_TILE_ELEMENTS = 2048
# Under the interpreter every op costs ~0.1 ms per program whatever the block size: few programs,
# but small enough that test shapes still have several position tiles, the last one partial.
INTERPRET_BLOCK_P = 16
# LayerNorm backward: each program loops over a group of tiles, accumulating the ln_weight/ln_bias
# gradients in registers, and writes one float32 row of partials; as many programs as fit on the
# GPU at once (8 warps at 64-80 registers: 3-4 per SM) keep those partials small. Under the
# interpreter, two tiles per program so the loop and the final sum both run.
BWD_PROGRAMS_PER_SM = 4
# Half the forward's tile: y, dz and the two parameter-gradient accumulators are live at once
# (4096-element tiles took 162 registers for float32 at C = 512 on sm_90: one program per SM).
BWD_TILE_ELEMENTS = 2048
INTERPRET_BWD_TILES_PER_PROG = 2


def fwd_config(C: int, kernel_size: tuple, dtype: torch.dtype) -> dict:
    """BLOCK_P, BLOCK_C and num_warps of :func:`dpe_layernorm_fwd_kernel` for C channels of dtype."""
    bc = block_c(C)
    if INTERPRET:
        return dict(BLOCK_P=INTERPRET_BLOCK_P, BLOCK_C=bc, num_warps=1)
    if dtype == torch.float32 and bc >= WIDE_FP32_FROM:
        return dict(BLOCK_P=WIDE_FP32_TILE_ELEMENTS // bc, BLOCK_C=bc, num_warps=NUM_WARPS)
    warps = NUM_WARPS_KW7 if kernel_size[2] == 7 else NUM_WARPS
    return dict(BLOCK_P=min(MAX_BLOCK_P, TILE_ELEMENTS // bc), BLOCK_C=bc, num_warps=warps)


def bwd_ln_config(C: int) -> dict:
    """BLOCK_P, BLOCK_C and num_warps of :func:`dpe_layernorm_bwd_ln_kernel` for C channels."""
    bc = block_c(C)
    if INTERPRET:
        return dict(BLOCK_P=INTERPRET_BLOCK_P, BLOCK_C=bc, num_warps=1)
    return dict(BLOCK_P=min(MAX_BLOCK_P, BWD_TILE_ELEMENTS // bc), BLOCK_C=bc, num_warps=NUM_WARPS)


@triton.heuristics({"HAS_BIAS": is_given("b_ptr")})
@triton.jit
def dpe_layernorm_fwd_kernel(
    x_ptr,  # (B, T, H, W, C) strided, unit channel stride
    w_ptr,  # (KT * KH * KW, C) contiguous
    b_ptr,  # (C,) or None
    lnw_ptr,  # (C,)
    lnb_ptr,  # (C,)
    y_ptr,  # (B, T, H, W, C) contiguous: x + dwconv(x) + bias
    z_ptr,  # (B, T, H, W, C) contiguous: layer_norm(y) * lnw + lnb
    mean_ptr,  # (B * T * H * W,) float32
    rstd_ptr,  # (B * T * H * W,) float32
    C, T, H, W,
    stride_xb, stride_xt, stride_xh, stride_xw,
    eps,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc, p, p_mask, t, h, w = conv_tile(x_ptr, w_ptr, b_ptr, pid_p, pid_b, c, c_mask, C, T, H, W,
                                        stride_xb, stride_xt, stride_xh, stride_xw,
                                        KT, KH, KW, HAS_BIAS, True, BLOCK_P, BLOCK_C)
    mask = p_mask[:, None] & c_mask[None, :]
    THW = T * H * W
    y = acc.to(y_ptr.dtype.element_ty)
    tok = pid_b * THW + p
    y_off = tok * C
    tl.store(y_ptr + y_off[:, None] + c[None, :], y, mask=mask)

    # The LayerNorm of the stored y; masked channels hold 0 and are kept out of the variance.
    yf = y.to(tl.float32)
    mean = tl.sum(yf, axis=1) / C
    diff = tl.where(c_mask[None, :], yf - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    lnw = tl.load(lnw_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    z = diff * rstd[:, None] * lnw[None, :] + lnb[None, :]
    tl.store(z_ptr + y_off[:, None] + c[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + tok, mean, mask=p_mask)
    tl.store(rstd_ptr + tok, rstd, mask=p_mask)


@triton.heuristics({"HAS_DY": is_given("dy_ptr")})
@triton.jit
def dpe_layernorm_bwd_ln_kernel(
    y_ptr,  # (B, T, H, W, C) contiguous: the forward's y
    dz_ptr,  # (B, T, H, W, C) strided, unit channel stride: the gradient of z
    dy_ptr,  # (B, T, H, W, C) strided, unit channel stride: y's gradient, or None
    lnw_ptr,  # (C,)
    mean_ptr,  # (B * T * H * W,) float32
    rstd_ptr,  # (B * T * H * W,) float32
    dyt_ptr,  # (B, T, H, W, C) contiguous: dy + d(layer_norm)/dy, written here
    dlnw_partial_ptr,  # (G, C) float32
    dlnb_partial_ptr,  # (G, C) float32
    C, T, H, W, num_tokens, tiles_per_prog,
    stride_dzb, stride_dzt, stride_dzh, stride_dzw,
    stride_dyb, stride_dyt, stride_dyh, stride_dyw,
    HAS_DY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_g = tl.program_id(0)
    HW = H * W
    THW = T * HW
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    lnw = tl.load(lnw_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for i in range(tiles_per_prog):
        # Tiles run over the flattened (b, t, h, w) tokens; a tile may span two batch elements.
        tok = (pid_g * tiles_per_prog + i).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = tok < num_tokens
        mask = p_mask[:, None] & c_mask[None, :]
        # Decoded inline, not with tiles.split_token: with it, Triton 3.9 spilled 8 bytes on
        # sm_90 (float32, BLOCK_C 32, no dy); this form compiles clean (tests/test_dpe.py).
        b = tok // THW
        p = tok % THW
        t = p // HW
        h = (p // W) % H
        w = p % W
        mean = tl.load(mean_ptr + tok, mask=p_mask, other=0.0)
        rstd = tl.load(rstd_ptr + tok, mask=p_mask, other=0.0)
        yv = tl.load(y_ptr + (tok * C)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        x_hat = tl.where(mask, (yv - mean[:, None]) * rstd[:, None], 0.0)
        dz_off = b * stride_dzb + t * stride_dzt + h * stride_dzh + w * stride_dzw  # tok is int64
        dz = tl.load(dz_ptr + dz_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dz * lnw[None, :]
        c1 = tl.sum(g * x_hat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        d = rstd[:, None] * (g - c2[:, None] - x_hat * c1[:, None])
        if HAS_DY:
            dy_off = b * stride_dyb + t * stride_dyt + h * stride_dyh + w * stride_dyw
            d += tl.load(dy_ptr + dy_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dyt_ptr + (tok * C)[:, None] + c[None, :], d.to(dyt_ptr.dtype.element_ty), mask=mask)
        acc_w += dz * x_hat
        acc_b += dz
    row = pid_g.to(tl.int64) * C
    tl.store(dlnw_partial_ptr + row + c, tl.sum(acc_w, axis=0), mask=c_mask)
    tl.store(dlnb_partial_ptr + row + c, tl.sum(acc_b, axis=0), mask=c_mask)


# --- launchers ------------------------------------------------------------------------------------

def dpe_layernorm_fwd(x: torch.Tensor, weight_taps: torch.Tensor, bias, ln_weight: torch.Tensor,
                      ln_bias: torch.Tensor, eps: float, kernel_size: tuple):
    """``y = x + conv(x) (+ bias)`` and ``z = layer_norm(y over C) * ln_weight + ln_bias``.

    Args:
        x: (B, C, T, H, W) with unit channel stride (``channels_last_3d`` or a B/T/H/W slice of
            it); other strides are read as they are. C <= :data:`MAX_CHANNELS`.
        weight_taps: (KT * KH * KW, C), tap-major.
        bias: (C,) or None.
        ln_weight, ln_bias: (C,).
        eps: the LayerNorm's epsilon.
        kernel_size: (KT, KH, KW), odd, each <= 7.

    Returns:
        ``(y, z, mean, rstd)``: y and z (B, C, T, H, W) in dense ``channels_last_3d`` memory, x's
        dtype; mean and rstd (B * T * H * W,) float32, token order (b, t, h, w).
    """
    check_channel_stride("x", x)
    B, C, T, H, W = x.shape
    KT, KH, KW = kernel_size
    assert weight_taps.shape == (KT * KH * KW, C)
    weight_taps, bias, ln_weight, ln_bias = map(dense, (weight_taps, bias, ln_weight, ln_bias))
    y = torch.empty((B, T, H, W, C), dtype=x.dtype, device=x.device)
    z = torch.empty_like(y)
    mean = torch.empty(B * T * H * W, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    cfg = fwd_config(C, kernel_size, x.dtype)
    sb, _, st, sh, sw = x.stride()
    grid = (triton.cdiv(T * H * W, cfg["BLOCK_P"]), B)
    dpe_layernorm_fwd_kernel[grid](
        x, weight_taps, bias, ln_weight, ln_bias,
        y, z, mean, rstd,
        C, T, H, W, sb, st, sh, sw, float(eps),
        KT=KT, KH=KH, KW=KW,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return y.permute(0, 4, 1, 2, 3), z.permute(0, 4, 1, 2, 3), mean, rstd


def dpe_layernorm_bwd_ln(y: torch.Tensor, grad_z: torch.Tensor, grad_y, ln_weight: torch.Tensor,
                         mean: torch.Tensor, rstd: torch.Tensor):
    """The LayerNorm's backward, fused with the sum of the two gradients of y.

    Args:
        y: (B, C, T, H, W), the forward's y, dense ``channels_last_3d``.
        grad_z: (B, C, T, H, W) with unit channel stride; other strides are read as they are.
        grad_y: like grad_z, or None.
        ln_weight: (C,). mean, rstd: (B * T * H * W,) float32 from the forward.

    Returns:
        ``(dy_total, dln_weight, dln_bias)``: dy_total (B, C, T, H, W) dense channels_last_3d in
        y's dtype (``grad_y + d layer_norm``); the LayerNorm parameter gradients (C,) float32,
        deterministic (per-program float32 partials summed in a fixed order).
    """
    B, C, T, H, W = y.shape
    assert y.permute(0, 2, 3, 4, 1).is_contiguous()
    check_channel_stride("grad_z", grad_z)
    if grad_y is not None:
        check_channel_stride("grad_y", grad_y)
    ln_weight, mean, rstd = dense(ln_weight), dense(mean), dense(rstd)
    sdz = [s for i, s in enumerate(grad_z.stride()) if i != 1]
    sdy = [s for i, s in enumerate(grad_y.stride()) if i != 1] if grad_y is not None else [0] * 4
    num_tokens = B * T * H * W
    cfg = bwd_ln_config(C)
    num_tiles = triton.cdiv(num_tokens, cfg["BLOCK_P"])
    if INTERPRET or y.device.type != "cuda":
        tiles_per_prog = INTERPRET_BWD_TILES_PER_PROG
    else:
        # The grouping depends only on the shape and the GPU, so results are reproducible.
        tiles_per_prog = triton.cdiv(num_tiles, BWD_PROGRAMS_PER_SM * num_sms(y.device))
    G = triton.cdiv(num_tiles, tiles_per_prog)
    dyt = torch.empty((B, T, H, W, C), dtype=y.dtype, device=y.device)
    dlnw_partial = torch.empty((G, C), dtype=torch.float32, device=y.device)
    dlnb_partial = torch.empty_like(dlnw_partial)
    dpe_layernorm_bwd_ln_kernel[(G,)](
        y, grad_z, grad_y, ln_weight, mean, rstd,
        dyt, dlnw_partial, dlnb_partial,
        C, T, H, W, num_tokens, tiles_per_prog, *sdz, *sdy,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return dyt.permute(0, 4, 1, 2, 3), dlnw_partial.sum(0), dlnb_partial.sum(0)
