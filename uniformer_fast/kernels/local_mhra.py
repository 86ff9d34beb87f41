"""The tail of a Local MHRA (CBlock): ``residual + scale[b] * conv2(dwconv(u) + attn_bias)`` in one
Triton kernel.

``dwconv`` is the depthwise 5x5x5 affinity (any odd kernel up to 7) and ``conv2`` the 1x1x1
projection, a C x C matmul plus bias. A program holds a tile of BLOCK_P positions x all C channels
(padded to BLOCK_C, the next power of two >= 16), so the depthwise result ``a`` lives only in
registers: it is accumulated in float32 over the taps, rounded to the input dtype (what the
unfused path stores) and multiplied by the projection with ``tl.dot`` on tensor cores, then the
projection bias is added, the branch is multiplied by its sample's ``scale`` (stochastic depth:
0 for a dropped sample, ``1 / keep`` for a kept one; optional), the residual is added and the
result is stored channels-last. Per position
the kernel reads u's halo, the residual and writes y, against the unfused path's extra write and
read of ``a`` and of the projection output.

Layouts (channels-last, unit channel stride; other strides free):

- ``u``, ``residual``: (B, T, H, W, C) read through ``(stride_b, stride_t, stride_h, stride_w)``,
  i.e. (B, C, T, H, W) tensors in ``channels_last_3d`` memory or B/T/H/W slices of one.
- ``attn_taps``: (KT * KH * KW, C) contiguous, tap-major (as kernels/dwconv3d.py).
- ``conv2_wt``: (C_in, C_out) = (C, C) contiguous, the transposed projection weight, so that
  ``y = a @ conv2_wt``.
- ``branch_scale``: (B,) contiguous, any float dtype (read as float32).
- ``y``: (B, T, H, W, C) contiguous (dense ``channels_last_3d``), written here.

With ``STATS`` the kernel also writes the BatchNorm partial statistics of the y it stores
(kernels/bn_stats.py, as the DPE's forward does), so the CBlock's ``norm2`` in training needs no
statistics pass over y (``stats=True`` of :func:`local_mhra_tail_fwd`). Its backward adds the
statistics' gradients with kernels/bn_stats.py's elementwise kernel, then runs the tail's backward.

The backward recomputes ``a`` with kernels/dwconv3d.py's forward kernel and reuses its kernels for
the depthwise gradients; the projection gradients are plain matmuls (uniformer_fast/ops/local_mhra.py).

Precision: float32 accumulation everywhere; for float16/bfloat16 ``a`` is rounded to the input
dtype before the tensor-core matmul. Float32 inputs follow :func:`torch.get_float32_matmul_precision`
(``"highest"``: exact IEEE products; ``"high"``/``"medium"``: tf32), as kernels/attention.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET, tiles, check_channel_stride, dense
from .tiles import block_c, is_given, strided_offset
from .bn_stats import TilePartials, store_bn_partials
from .dwconv3d import conv_tile
from .attention import dot_precision, matmul_kind

# One program holds all channels; beyond 128 the (BLOCK_C x BLOCK_C) projection tile and the
# float32 accumulator no longer fit a program (UniFormer's CBlocks have C = 64 and 128).
MAX_CHANNELS = tiles.MAX_CHANNELS["local_mhra"]
why_not_shape = functools.partial(tiles.why_not_shape, max_channels=MAX_CHANNELS)

# GPU launch configs per matmul kind (kernels/attention.py's matmul_kind), keyed by BLOCK_C. Picked
# from ahead-of-time compiles (no GPU timing yet); each is compiled for sm_80 and sm_90 in
# tests/test_local_mhra.py, which fails on spills. BLOCK_P >= 64 where tensor cores run: a Hopper
# wgmma tile is 64 rows.
# - 16-bit: BLOCK_P * BLOCK_C = 512 * num_warps keeps the float32 depthwise accumulator at 16
#   registers per thread, as kernels/dwconv3d.py's forward (a row of five unrolled taps hoists five
#   such loads): sm_90 104-110 registers. With half the warps the same tiles took 168-180.
# - tf32: float32 operands double the loads and the projection tile; 16-warp programs are capped at
#   128 registers and spilled for C = 128, and C = 64 on 8 warps spilled with a 7x7x7 kernel on
#   sm_80 (ptxas held it to 128 registers): sm_90 128 / 157 / 164 / 190 registers.
# - ieee (exact float32, torch's default "highest" precision): tl.dot runs on CUDA cores with its
#   operands in registers; the tf32 tiles spill there (C = 64: ~650 bytes of stack, C = 128:
#   ~9.5 kB). These do not, and keep 16-byte loads along C (sm_90: 72 / 80 / 80 / 185 registers).
CONFIGS = {
    "16bit": {16: dict(BLOCK_P=128, num_warps=4), 32: dict(BLOCK_P=128, num_warps=8),
              64: dict(BLOCK_P=64, num_warps=8), 128: dict(BLOCK_P=64, num_warps=16)},
    "tf32": {16: dict(BLOCK_P=128, num_warps=4), 32: dict(BLOCK_P=128, num_warps=8),
             64: dict(BLOCK_P=64, num_warps=4), 128: dict(BLOCK_P=64, num_warps=8)},
    "ieee": {16: dict(BLOCK_P=64, num_warps=4), 32: dict(BLOCK_P=64, num_warps=8),
             64: dict(BLOCK_P=32, num_warps=8), 128: dict(BLOCK_P=32, num_warps=8)},
}
# The STATS variant (BatchNorm partials from the registers) keeps more live: in exact float32
# Triton 3.6 spilled the tiles above (C = 32 on sm_80; C = 128: 7.5 kB of stack on sm_90), and
# 3.9 spilled every other 128-channel tile tried on sm_80 without STATS. Smaller tiles for STATS.
STATS_CONFIGS = {
    "ieee": {32: dict(BLOCK_P=32, num_warps=8), 128: dict(BLOCK_P=16, num_warps=8)},
}
BLOCK_CS = (16, 32, 64, 128)
# Under the interpreter every op costs ~0.1 ms per program whatever the block size: few programs,
# but small enough that the tiny test shapes still have a partial last tile.
INTERPRET_CONFIG = dict(BLOCK_P=32, num_warps=1)


def gpu_config(C: int, kind: str, stats: bool = False) -> dict:
    """The compiled-GPU BLOCK_P, BLOCK_C and num_warps; ``kind`` is a matmul_kind ("16bit",
    "tf32" or "ieee"); ``stats``: the STATS variant."""
    bc = block_c(C)
    cfg = dict((STATS_CONFIGS.get(kind, {}) if stats else {}).get(bc) or CONFIGS[kind][bc])
    cfg["BLOCK_C"] = bc
    return cfg


def fwd_config(C: int, dtype: torch.dtype, stats: bool = False) -> dict:
    """BLOCK_P, BLOCK_C and num_warps of the forward kernel (``stats``: the STATS variant)."""
    if not INTERPRET:
        return gpu_config(C, matmul_kind(dtype), stats)
    cfg = dict(INTERPRET_CONFIG)
    cfg["BLOCK_C"] = block_c(C)
    return cfg


@triton.heuristics({"HAS_ATTN_BIAS": is_given("ab_ptr"), "HAS_CONV2_BIAS": is_given("b2_ptr"),
                    "HAS_BRANCH_SCALE": is_given("bs_ptr"), "HAS_RESIDUAL": is_given("r_ptr"),
                    "STATS": is_given("phi_ptr")})
@triton.jit
def local_mhra_tail_fwd_kernel(
    u_ptr,  # (B, T, H, W, C) strided, unit channel stride
    taps_ptr,  # (KT * KH * KW, C) contiguous
    ab_ptr,  # (C,) depthwise bias, or None
    w2_ptr,  # (C, C) contiguous: conv2's weight transposed, (C_in, C_out)
    b2_ptr,  # (C,) projection bias, or None
    bs_ptr,  # (B,) the branch's per-sample scale, or None
    r_ptr,  # (B, T, H, W, C) strided, unit channel stride, or None
    y_ptr,  # (B, T, H, W, C) contiguous
    phi_ptr,  # (B * tiles_per_batch, C) float32, each tile's per-channel mean of y: hi; or None
    psdev_ptr,  # (B * tiles_per_batch, C) float32, each tile's sum of (y - hi); or None
    pm2_ptr,  # (B * tiles_per_batch, C) float32, each tile's sum of (y - hi)^2; or None
    C, T, H, W,
    stride_ub, stride_ut, stride_uh, stride_uw,
    stride_rb, stride_rt, stride_rh, stride_rw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_ATTN_BIAS: tl.constexpr, HAS_CONV2_BIAS: tl.constexpr, HAS_BRANCH_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STATS: tl.constexpr,  # phi_ptr given: also write the BatchNorm partial statistics of y (bn_stats.py)
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    # Depthwise convolution over all channels, kept in registers for the projection.
    acc, p, p_mask, t, h, w = conv_tile(u_ptr, taps_ptr, ab_ptr, pid_p, pid_b, c, c_mask, C, T, H, W,
                                        stride_ub, stride_ut, stride_uh, stride_uw,
                                        KT, KH, KW, HAS_ATTN_BIAS, False, BLOCK_P, BLOCK_C)
    THW = T * H * W

    # The projection: a (BLOCK_P, C_in) @ conv2_wt (C_in, C_out). Padded channels of a are zero
    # (masked loads), and so are the padded rows and columns of the weight tile.
    w2 = tl.load(w2_ptr + c[:, None] * C + c[None, :], mask=c_mask[:, None] & c_mask[None, :], other=0.0)
    a = acc.to(y_ptr.dtype.element_ty)  # rounded as the unfused path stores it
    if UPCAST:  # the interpreter's bfloat16 tl.dot is wrong: multiply in float32 there
        y = tl.dot(a.to(tl.float32), w2.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(a, w2, input_precision=PRECISION)
    if HAS_CONV2_BIAS:
        y += tl.load(b2_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BRANCH_SCALE:  # stochastic depth, before the residual add as DropPath does
        y *= tl.load(bs_ptr + pid_b).to(tl.float32)
    mask = p_mask[:, None] & c_mask[None, :]
    if HAS_RESIDUAL:
        r_off = strided_offset(pid_b, t, h, w, stride_rb, stride_rt, stride_rh, stride_rw)
        y += tl.load(r_ptr + r_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y_off = (pid_b * THW + p) * C
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off[:, None] + c[None, :], y, mask=mask)
    if STATS:  # the next BatchNorm's partial statistics of the stored y
        store_bn_partials(y, mask, c, c_mask, pid_p, pid_b, C, THW, phi_ptr, psdev_ptr, pm2_ptr, BLOCK_P)


# --- launcher -------------------------------------------------------------------------------------

def local_mhra_tail_fwd(u: torch.Tensor, attn_taps: torch.Tensor, attn_bias, conv2_wt: torch.Tensor,
                        conv2_bias, branch_scale, residual, kernel_size: tuple, stats: bool = False):
    """``residual + branch_scale[b] * ((dwconv(u) + attn_bias) @ conv2_wt + conv2_bias)``, and with
    ``stats`` the batch statistics of it.

    Args:
        u: (B, C, T, H, W) with unit channel stride (``channels_last_3d`` or a B/T/H/W slice).
        attn_taps: (KT * KH * KW, C), tap-major.
        attn_bias: (C,) or None.
        conv2_wt: (C, C), conv2's weight transposed (C_in, C_out).
        conv2_bias: (C,) or None.
        branch_scale: (B,), the branch's scale per sample (stochastic depth), or None (1).
        residual: (B, C, T, H, W) with unit channel stride, or None.
        kernel_size: (KT, KH, KW), odd, each <= 7.
        stats: also return the per-channel batch mean and biased variance of y (as stored).

    Returns:
        y (B, C, T, H, W) in dense ``channels_last_3d`` memory, u's dtype; with ``stats``,
        ``(y, mean, var)``, mean and var (C,) float32 over (B, T, H, W), var divided by
        N = B*T*H*W (kernels/bn_stats.py: deterministic, no atomics).
    """
    check_channel_stride("u", u)
    if residual is not None:
        check_channel_stride("residual", residual)
    B, C, T, H, W = u.shape
    KT, KH, KW = kernel_size
    assert attn_taps.shape == (KT * KH * KW, C) and conv2_wt.shape == (C, C)
    assert branch_scale is None or branch_scale.shape == (B,)
    attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale = map(
        dense, (attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale))
    y = torch.empty((B, T, H, W, C), dtype=u.dtype, device=u.device)
    cfg = fwd_config(C, u.dtype, stats)
    BLOCK_P = cfg["BLOCK_P"]
    partials = TilePartials(B, C, T * H * W, BLOCK_P, u.device) if stats else None
    sub, _, sut, suh, suw = u.stride()
    srb, _, srt, srh, srw = residual.stride() if residual is not None else (0,) * 5
    grid = (triton.cdiv(T * H * W, BLOCK_P), B)
    local_mhra_tail_fwd_kernel[grid](
        u, attn_taps, attn_bias, conv2_wt, conv2_bias, branch_scale, residual, y,
        *((partials.phi, partials.psdev, partials.pm2) if stats else (None, None, None)),
        C, T, H, W, sub, sut, suh, suw, srb, srt, srh, srw,
        KT=KT, KH=KH, KW=KW,
        PRECISION=dot_precision(u.dtype), UPCAST=INTERPRET,
        BLOCK_P=BLOCK_P, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    y = y.permute(0, 4, 1, 2, 3)
    return (y, *partials.merge()) if stats else y
