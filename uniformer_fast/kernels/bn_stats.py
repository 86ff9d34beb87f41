"""BatchNorm batch statistics from a kernel's registers: the one mechanism every fused forward that
feeds a training BatchNorm uses (kernels/dwconv3d.py's forward for the CBlock's DPE,
kernels/local_mhra.py's tail), with its merge and its backward.

A forward kernel with ``STATS`` calls :func:`store_bn_partials` once its tile of y sits in registers;
:func:`merge_tile_partials` turns the partials into the per-channel batch mean and biased variance of y
over (B, T, H, W), float32; :func:`bn_stats_bwd` adds the statistics' gradients to y's own.

Statistics scheme (numerically sound for any mean, no atomics, deterministic):

1. :func:`store_bn_partials`: a program owns BLOCK_P positions of one batch element x some channels.
   Per channel it writes the tile's float32 mean ``hi``, the sum of ``y - hi`` (what rounding ``hi``
   lost: the exact tile mean is ``hi + sdev / n``) and ``M2`` about ``hi``, ``sum (y - hi)^2`` (two
   passes over the registers, never ``sum y^2 - n mean^2``, which cancels catastrophically in
   float32 when |mean| >> std). The tile's count is implied by its place in the grid.
2. :func:`bn_partials_merge_kernel`: merges rows of ``(count, mean, M2)`` in a fixed order, with
   means held as deviations from a shift ``K`` (the first tile's mean: near the data, known to
   every program), so float32 partial means keep the precision of the spread rather than of
   |mean|: a chunk of BLOCK_G rows at once by the parallel formula
   ``M2 = sum M2_g + sum n_g (mean_g - mean)^2``, then chunk after chunk by Chan's pairwise
   update. Run once over groups of rows (many programs), then once over the group results (one
   program per channel block), which writes ``mean = K + mean(y - K)`` and ``var = M2 / N``.

The statistics are those of y as stored (rounded to the output dtype), as the unfused
``batch_norm(y)`` sees it, so the backward's ``y - mean`` uses the same values.

Backward: :func:`bn_stats_bwd_kernel` adds the statistics' gradients to y's own,
``dy_total = dy + g_mean / N + 2 g_var (y - mean) / N`` (one read of y and dy, one write); the
forward op's own backward then runs on ``dy_total``.

Layouts: tile partials ``hi``, ``sdev``, ``M2`` (G, C) float32 with ``G = B * tiles_per_batch``, row
``b * tiles_per_batch + tile``; merged groups: ``count`` (S,), ``mean - K`` and ``M2`` (S, C)
float32; y and dy (B, T, H, W, C) channels-last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, check_channel_stride, dense
from .tiles import is_given, split_token, strided_offset

# Merge kernel: chunks of BLOCK_G rows x BLOCK_C channels (2048 float32 elements per array: 16
# registers per thread at 4 warps), ROWS_PER_GROUP rows per first-level program: stage 1 of
# UniFormer-S at batch 8 has 3136 tile rows -> 49 first-level programs of two chunks each, then
# one second-level program per channel block over their 49 results. The partials (3 float32 per
# channel per 64-position tile) are written once and read once: ~9% on top of the bytes the DPE
# pass moves for bf16 activations.
MERGE_BLOCK_G = 32
MERGE_BLOCK_C = 64
MERGE_ROWS_PER_GROUP = 64
MERGE_NUM_WARPS = 4
# Backward elementwise kernel: a (BLOCK_P, BLOCK_C) tile of 2048 elements per program (4096
# took 128 registers for float32 at 4 warps on sm_80 and sm_90: y and dy, 32 elements each).
BWD_BLOCK_P = 32
BWD_BLOCK_C = 64
BWD_NUM_WARPS = 4
# Under the interpreter: tiny merge chunks and groups so that test shapes run both merge levels,
# several chunks per program and a last chunk that ends part-way.
INTERPRET_MERGE = dict(BLOCK_G=2, BLOCK_C=16, ROWS_PER_GROUP=4)
INTERPRET_BWD = dict(BLOCK_P=64, BLOCK_C=16)


def merge_config() -> dict:
    """BLOCK_G, BLOCK_C and ROWS_PER_GROUP of the merge kernel."""
    if INTERPRET:
        return dict(INTERPRET_MERGE)
    return dict(BLOCK_G=MERGE_BLOCK_G, BLOCK_C=MERGE_BLOCK_C, ROWS_PER_GROUP=MERGE_ROWS_PER_GROUP)


def bwd_config() -> dict:
    """BLOCK_P, BLOCK_C and num_warps of the backward kernel."""
    if INTERPRET:
        return dict(INTERPRET_BWD, num_warps=1)
    return dict(BLOCK_P=BWD_BLOCK_P, BLOCK_C=BWD_BLOCK_C, num_warps=BWD_NUM_WARPS)


@triton.jit
def store_bn_partials(y, mask, c, c_mask, pid_p, pid_b, C, THW, phi_ptr, psdev_ptr, pm2_ptr,
                      BLOCK_P: tl.constexpr):
    """A BatchNorm's partial statistics of the stored tile y (BLOCK_P, BLOCK_C) over its valid
    positions (mask), about the tile's float32 mean hi: the sum of deviations from hi keeps what
    rounding hi lost (the exact tile mean is hi + sdev / n), and M2 about hi (two passes over the
    registers, never sum y^2 - n mean^2). Row b * tiles_per_batch + tile of each (G, C) array, the
    layout merge_tile_partials reads; every kernel that emits BN statistics writes them here."""
    n = tl.minimum(THW - pid_p * BLOCK_P, BLOCK_P).to(tl.float32)
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    hi = tl.sum(yf, axis=0) / n
    dev = tl.where(mask, yf - hi[None, :], 0.0)
    row = (pid_b * tl.num_programs(0) + pid_p) * C
    tl.store(phi_ptr + row + c, hi, mask=c_mask)
    tl.store(psdev_ptr + row + c, tl.sum(dev, axis=0), mask=c_mask)
    tl.store(pm2_ptr + row + c, tl.sum(dev * dev, axis=0), mask=c_mask)


@triton.heuristics({"FROM_TILES": lambda args: args["count_ptr"] is None})
@triton.jit
def bn_partials_merge_kernel(
    shift_ptr,  # (G0, C) float32: the forward's tile means hi; row 0 is the shift K of every level
    count_ptr,  # (G,) float32: positions behind each row; None when the rows are the forward's tiles
    mean_ptr,  # (G, C) float32: FROM_TILES: the tiles' hi; else the groups' means of y - K
    sdev_ptr,  # (G, C) float32: FROM_TILES: the tiles' sums of (y - hi); else None
    m2_ptr,  # (G, C) float32: FROM_TILES: the tiles' sums of (y - hi)^2; else the groups' M2
    out_count_ptr,  # (S,) float32, or None when FINAL
    out_mean_ptr,  # (S, C) float32: the groups' means of y - K; when FINAL, (C,) the mean of y
    out_m2_ptr,  # (S, C) float32: the groups' M2; when FINAL, (C,) the biased variance M2 / N
    C, G, rows_per_prog, THW, tiles_per_batch,
    TILE_P: tl.constexpr,  # the forward's BLOCK_P: rows' counts when FROM_TILES
    FROM_TILES: tl.constexpr,  # count_ptr is None: the rows are the forward's tile partials
    FINAL: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # Means are merged as deviations from a shift K near the data (the first tile's mean, the
    # same for every program and level): partial means of y - K are small, so float32 holds them
    # to the precision of the spread, not of |mean| (which alone would cost ~eps |mean| / std
    # of relative variance error).
    K = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    start = pid_s * rows_per_prog
    end = tl.minimum(start + rows_per_prog, G)
    # Count, mean and M2 of the rows merged so far; the count is the same for every channel
    # (kept as a vector so the loop carries tensors of one type).
    run_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g0 in range(start, end, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_mask = g < end
        mask = g_mask[:, None] & c_mask[None, :]
        off = g.to(tl.int64)[:, None] * C + c[None, :]
        if FROM_TILES:
            first = (g % tiles_per_batch) * TILE_P
            n_g = tl.where(g_mask, tl.minimum(THW - first, TILE_P), 0).to(tl.float32)
            n_safe = tl.maximum(n_g, 1.0)[:, None]
            hi = tl.load(mean_ptr + off, mask=mask, other=0.0)
            sdev = tl.load(sdev_ptr + off, mask=mask, other=0.0)
            m2_hi = tl.load(m2_ptr + off, mask=mask, other=0.0)
            # hi - K is exact for hi within a factor 2 of K (Sterbenz); sdev / n restores the
            # tile mean's rounding; M2 about the exact tile mean from M2 about hi.
            m_g = tl.where(mask, (hi - K[None, :]) + sdev / n_safe, 0.0)
            m2_g = m2_hi - sdev * sdev / n_safe
        else:
            n_g = tl.load(count_ptr + g, mask=g_mask, other=0.0)
            m_g = tl.load(mean_ptr + off, mask=mask, other=0.0)
            m2_g = tl.load(m2_ptr + off, mask=mask, other=0.0)
        # The chunk: the parallel formula over its rows (deviations of partial means from the
        # chunk mean: no cancellation).
        n_chunk = tl.sum(n_g, axis=0)
        mean_chunk = tl.sum(n_g[:, None] * m_g, axis=0) / n_chunk
        dev = tl.where(mask, m_g - mean_chunk[None, :], 0.0)
        m2_chunk = tl.sum(m2_g, axis=0) + tl.sum(n_g[:, None] * dev * dev, axis=0)
        # Chan's update: the running result and the chunk.
        n_new = run_n + n_chunk
        delta = mean_chunk - run_mean
        frac = n_chunk / n_new
        run_mean = run_mean + delta * frac
        run_m2 = run_m2 + m2_chunk + delta * delta * (run_n * frac)
        run_n = n_new
    out = pid_s.to(tl.int64) * C + c
    if FINAL:
        tl.store(out_mean_ptr + out, K + run_mean, mask=c_mask)
        # Clamp rounding's tiny negatives; fmax (the default) would also turn NaN into 0.
        m2 = tl.maximum(run_m2, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_m2_ptr + out, m2 / run_n, mask=c_mask)
    else:
        tl.store(out_mean_ptr + out, run_mean, mask=c_mask)
        tl.store(out_m2_ptr + out, run_m2, mask=c_mask)
        # One lane writes the group's count (every channel block holds the same one): c == 0 is
        # lane 0 of channel block 0.
        tl.store(out_count_ptr + pid_s + c * 0, run_n, mask=c == 0)


@triton.heuristics({"HAS_DY": is_given("dy_ptr")})
@triton.jit
def bn_stats_bwd_kernel(
    y_ptr,  # (B, T, H, W, C) contiguous: the forward's y
    dy_ptr,  # (B, T, H, W, C) strided, unit channel stride: y's gradient, or None
    mean_ptr,  # (C,) float32: the batch mean
    k_mean_ptr,  # (C,) float32: g_mean / N
    k_var_ptr,  # (C,) float32: 2 g_var / N
    dyt_ptr,  # (B, T, H, W, C) contiguous: dy + k_mean + k_var (y - mean), written here
    C, T, H, W, num_tokens,
    stride_dyb, stride_dyt, stride_dyh, stride_dyw,
    HAS_DY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    tok = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = tok < num_tokens
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = p_mask[:, None] & c_mask[None, :]
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    k_mean = tl.load(k_mean_ptr + c, mask=c_mask, other=0.0)
    k_var = tl.load(k_var_ptr + c, mask=c_mask, other=0.0)
    off = (tok * C)[:, None] + c[None, :]
    yv = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    d = k_mean[None, :] + k_var[None, :] * (yv - mean[None, :])
    if HAS_DY:
        b, t, h, w = split_token(tok, T, H, W)
        dy_off = strided_offset(b, t, h, w, stride_dyb, stride_dyt, stride_dyh, stride_dyw)
        d += tl.load(dy_ptr + dy_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dyt_ptr + off, d.to(dyt_ptr.dtype.element_ty), mask=mask)


# --- launchers ------------------------------------------------------------------------------------

def _merge(phi, count, mean, sdev, m2, C, G, THW, tiles_per_batch, tile_p, final, cfg, device):
    """One level of merging G partial rows (the forward's tiles when ``count`` is None) into
    groups of ``ROWS_PER_GROUP``: returns the groups' ``(count, mean - K, M2)``; or, when
    ``final``, into one group: returns ``(mean, var)``."""
    rows = G if final else cfg["ROWS_PER_GROUP"]
    S = triton.cdiv(G, rows)
    out_mean = torch.empty((S, C), dtype=torch.float32, device=device)
    out_m2 = torch.empty_like(out_mean)
    out_count = torch.empty(S, dtype=torch.float32, device=device) if not final else None
    bn_partials_merge_kernel[(S, triton.cdiv(C, cfg["BLOCK_C"]))](
        phi, count, mean, sdev, m2, out_count, out_mean, out_m2,
        C, G, rows, THW, tiles_per_batch,
        TILE_P=tile_p, FINAL=final,
        BLOCK_G=cfg["BLOCK_G"], BLOCK_C=cfg["BLOCK_C"], num_warps=1 if INTERPRET else MERGE_NUM_WARPS,
    )
    if final:
        return out_mean[0], out_m2[0]
    return out_count, out_mean, out_m2


class TilePartials:
    """The partial statistics a forward with ``STATS`` writes: ``phi``, ``psdev``, ``pm2``, each
    (B * tiles_per_batch, C) float32, for B batch elements of THW positions in tiles of ``tile_p``
    (the forward's BLOCK_P). Pass the three to the kernel, then :meth:`merge`."""

    def __init__(self, B: int, C: int, THW: int, tile_p: int, device):
        self.THW, self.tile_p = THW, tile_p
        self.tiles_per_batch = triton.cdiv(THW, tile_p)
        self.phi = torch.empty((B * self.tiles_per_batch, C), dtype=torch.float32, device=device)
        self.psdev = torch.empty_like(self.phi)
        self.pm2 = torch.empty_like(self.phi)

    def merge(self):
        """``(mean, var)`` (C,) float32 over the B * THW positions: :func:`merge_tile_partials`."""
        return merge_tile_partials(self.phi, self.psdev, self.pm2, self.THW, self.tiles_per_batch, self.tile_p)


def merge_tile_partials(phi: torch.Tensor, psdev: torch.Tensor, pm2: torch.Tensor, THW: int,
                        tiles_per_batch: int, tile_p: int):
    """The per-channel batch mean and biased variance from a forward kernel's tile partials.

    Args:
        phi, psdev, pm2: (G, C) float32 contiguous, ``G = B * tiles_per_batch``: row
            ``b * tiles_per_batch + tile`` holds the tile's mean ``hi`` of y, its sum of
            ``y - hi`` and its ``sum (y - hi)^2``, as :func:`store_bn_partials` writes them.
        THW: positions per batch element; tile_p: positions per tile (the forward's BLOCK_P),
            the last tile of each batch element holding the rest.

    Returns:
        ``(mean, var)``, (C,) float32; var biased (divided by ``B * THW``). One or two levels of
        the fixed-order merge (deterministic).
    """
    G, C = phi.shape
    mcfg = merge_config()
    geometry = (THW, tiles_per_batch, tile_p)
    if G <= mcfg["ROWS_PER_GROUP"]:
        return _merge(phi, None, phi, psdev, pm2, C, G, *geometry, True, mcfg, phi.device)
    count, gmean, gm2 = _merge(phi, None, phi, psdev, pm2, C, G, *geometry, False, mcfg, phi.device)
    return _merge(phi, count, gmean, None, gm2, C, count.shape[0], *geometry, True, mcfg, phi.device)


def bn_stats_bwd(y: torch.Tensor, grad_y, mean: torch.Tensor, k_mean: torch.Tensor, k_var: torch.Tensor):
    """``dy_total = grad_y + k_mean + k_var * (y - mean)``, per channel vectors broadcast over
    (B, T, H, W): the statistics' gradients (``k_mean = g_mean / N``, ``k_var = 2 g_var / N``)
    added to y's own.

    Args:
        y: (B, C, T, H, W), the forward's y, dense ``channels_last_3d``.
        grad_y: like y with unit channel stride (other strides read as they are), or None.
        mean, k_mean, k_var: (C,) float32.

    Returns:
        dy_total (B, C, T, H, W) dense ``channels_last_3d`` in y's dtype.
    """
    B, C, T, H, W = y.shape
    assert y.permute(0, 2, 3, 4, 1).is_contiguous()
    if grad_y is not None:
        check_channel_stride("grad_y", grad_y)
    mean, k_mean, k_var = dense(mean), dense(k_mean), dense(k_var)
    sdy = [s for i, s in enumerate(grad_y.stride()) if i != 1] if grad_y is not None else [0] * 4
    num_tokens = B * T * H * W
    cfg = bwd_config()
    dyt = torch.empty((B, T, H, W, C), dtype=y.dtype, device=y.device)
    bn_stats_bwd_kernel[(triton.cdiv(num_tokens, cfg["BLOCK_P"]), triton.cdiv(C, cfg["BLOCK_C"]))](
        y, grad_y, mean, k_mean, k_var, dyt,
        C, T, H, W, num_tokens, *sdy,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return dyt.permute(0, 4, 1, 2, 3)
