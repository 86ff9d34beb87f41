"""Flash-attention style multi-head self-attention on the packed qkv tensor (the Global MHRA).

Layouts (feature dimension always unit-stride; batch and token strides are free, so a sliced qkv
runs without a copy):

- ``qkv``: (B, N, 3 * C), the qkv Linear's output, read as (B, N, 3, H, D) through its strides:
  q, k, v of head h are the D features at offsets h*D, C + h*D and 2*C + h*D of each token row.
- ``out``: (B, N, C) = (B, N, H, D), heads concatenated, ready for the output projection.
- ``lse``: (B, H, N) float32, the log2-sum-exp2 of each query row's scaled logits
  (``log2(sum_j 2 ** (scale * log2(e) * q.k_j))``); the only statistic the forward keeps.
- ``dqkv``: (B, N, 3 * C), the gradient of qkv, written directly in qkv's packed layout.

Precision: q.k^T and p.v run on tensor cores with float32 accumulation; softmax statistics are
float32. For float16/bfloat16 inputs p and ds are rounded to the input dtype before their matmuls
(as in FlashAttention). For float32 inputs the matmul precision follows PyTorch's own knob,
:func:`torch.get_float32_matmul_precision`: ``"highest"`` (PyTorch's default) gives exact IEEE
float32 products (``input_precision="ieee"``, CUDA cores); ``"high"``/``"medium"`` give tf32
tensor cores (about 1e-3 relative error). :func:`fp32_input_precision` says which one is in force.

head_dim 28 is padded to 32 in registers (masked loads and stores); the padding never reaches
memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, dense, unit_stride
from .tiles import block_c

SUPPORTED_HEAD_DIMS = (28, 32, 64)
LOG2E = 1.4426950408889634


def _fwd_config(block_m, block_n, num_warps, num_stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _bwd_config(block_m1, block_n1, block_m2, block_n2, num_warps, num_stages):
    return dict(BLOCK_M1=block_m1, BLOCK_N1=block_n1, BLOCK_M2=block_m2, BLOCK_N2=block_n2, num_warps=num_warps,
                num_stages=num_stages)


# Block sizes and launch parameters per matmul kind; "short" serves sequences of <= 32 tokens
# (e.g. the temporal branch of the split block, N = T), where 128-row blocks would be mostly empty.
# Forward: BLOCK_M query rows per program, BLOCK_N keys per step. Backward: a program owns BLOCK_N1
# keys (dk, dv) stepping over BLOCK_M1 queries, then BLOCK_M2 = BLOCK_N1 queries (dq) stepping over
# BLOCK_N2 keys. Picked from a small sweep of ahead-of-time compiles (no GPU timing yet): the
# largest tried that compile without register spills for sm_80 and sm_90 with Triton 3.9
# (tests/test_attention_compile.py); 128-row blocks with 8 warps are two 64-row Hopper wgmma
# tiles. Exact float32 ("ieee") runs tl.dot on CUDA cores, whose operands are held in registers:
# it needs the smallest blocks, and its backward still spills for head_dim 28 and 64 at every
# block size tried (correct, not fast). Keys: (dot precision, sequence length class).
FWD_CONFIGS = {
    ("16bit", "long"): _fwd_config(128, 64, 8, 3),
    ("16bit", "short"): _fwd_config(32, 32, 4, 2),
    ("tf32", "long"): _fwd_config(128, 32, 8, 2),
    ("tf32", "short"): _fwd_config(32, 32, 4, 2),
    ("ieee", "long"): _fwd_config(32, 16, 8, 2),
    ("ieee", "short"): _fwd_config(32, 16, 8, 2),
}
BWD_CONFIGS = {
    ("16bit", "long"): _bwd_config(32, 128, 128, 32, 8, 3),
    ("16bit", "short"): _bwd_config(32, 32, 32, 32, 4, 2),
    ("tf32", "long"): _bwd_config(16, 64, 64, 16, 8, 2),
    ("tf32", "short"): _bwd_config(16, 32, 32, 16, 8, 2),
    ("ieee", "long"): _bwd_config(16, 32, 32, 16, 8, 1),
    ("ieee", "short"): _bwd_config(16, 32, 32, 16, 8, 1),
}
# head_dim 28 (padded to 32): the feature mask and 4-byte-aligned rows cost registers; these
# replace the entries above where those spill.
PADDED_FWD_CONFIGS = {
    ("tf32", "short"): _fwd_config(32, 32, 8, 2),
}
PADDED_BWD_CONFIGS = {
    ("16bit", "long"): _bwd_config(32, 32, 32, 32, 8, 2),
    ("16bit", "short"): _bwd_config(32, 32, 32, 32, 8, 2),
    ("tf32", "long"): _bwd_config(32, 32, 32, 32, 8, 1),
    ("tf32", "short"): _bwd_config(32, 32, 32, 32, 8, 1),
}
DELTA_BLOCK_M = 64
# Under the interpreter every op costs ~0.1 ms per program whatever the block size, so fewer,
# larger programs are cheaper; the shapes keep the GPU configs' structure (BLOCK_M1 != BLOCK_N1)
# so that small test sequences still cross block edges in every loop.
INTERPRET_FWD_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
INTERPRET_BWD_CONFIG = dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=1,
                            num_stages=1)


def fp32_input_precision() -> str:
    """``"ieee"`` or ``"tf32"``: the matmul precision float32 inputs get, from PyTorch's setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def matmul_kind(dtype: torch.dtype) -> str:
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else fp32_input_precision()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: "tf32" or "ieee" for float32; 16-bit dots ignore it ("ieee")."""
    return "tf32" if matmul_kind(dtype) == "tf32" else "ieee"


def head_dim_pad(head_dim: int) -> int:
    """The head dimension as held in registers: a power of two >= 16 (28 -> 32)."""
    return block_c(head_dim)


def gpu_config(which: str, kind: str, length: str, head_dim: int) -> dict:
    """The compiled-GPU launch config: ``which`` "fwd" or "bwd", ``kind`` a matmul_kind, ``length``
    "long" or "short"."""
    table, padded = ((FWD_CONFIGS, PADDED_FWD_CONFIGS) if which == "fwd"
                     else (BWD_CONFIGS, PADDED_BWD_CONFIGS))
    if head_dim != head_dim_pad(head_dim) and (kind, length) in padded:
        return dict(padded[kind, length])
    return dict(table[kind, length])


def fwd_config(dtype: torch.dtype, N: int, head_dim: int) -> dict:
    if INTERPRET:
        return dict(INTERPRET_FWD_CONFIG)
    return gpu_config("fwd", matmul_kind(dtype), "short" if N <= 32 else "long", head_dim)


def bwd_config(dtype: torch.dtype, N: int, head_dim: int) -> dict:
    if INTERPRET:
        return dict(INTERPRET_BWD_CONFIG)
    return gpu_config("bwd", matmul_kind(dtype), "short" if N <= 32 else "long", head_dim)


# --------------------------------------------------------------------------------------------
# Helpers (inlined)
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_mask(offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    # The feature mask exists only for padded head dims, so unpadded tiles keep 16-byte loads.
    mask = offs_rows[:, None] < n_rows
    if HEAD_DIM != HEAD_DIM_PAD:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _load_tile(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # the interpreter's bfloat16 arithmetic and tl.dot are wrong; compute in float32
        x = x.to(tl.float32)
    return x


@triton.jit
def _operand(x, ELEM: tl.constexpr, UPCAST: tl.constexpr):
    # Round a float32 intermediate (p, ds) to the input dtype as the tensor cores will see it.
    x = x.to(ELEM)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_mask, offs_kn, N, qk_scale,
              MASK_KEYS: tl.constexpr, ELEM: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    k = _load_tile(k_ptrs, kv_mask, UPCAST)
    v = _load_tile(v_ptrs, kv_mask, UPCAST)
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_KEYS:
        s = tl.where(offs_kn[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(_operand(p, ELEM, UPCAST), v, PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    qkv_ptr,  # (B, N, 3, H, D): token stride stride_qkv_n, batch stride stride_qkv_b, feature stride 1
    out_ptr,  # (B, N, H, D): token stride stride_out_n, batch stride stride_out_b, feature stride 1
    lse_ptr,  # (B, H, N) float32, contiguous
    N, H, num_m_blocks,
    qk_scale,  # scale * log2(e)
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # 1-D grid, query blocks of one head adjacent (they share K and V in L2); B*H may exceed the
    # 65535 limit of the second grid axis (the split block's temporal attention has B*H*W batches).
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = bh // H
    h = bh % H
    C = H * HEAD_DIM
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    head = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    q = _load_tile(head + offs_m[:, None] * stride_qkv_n + offs_d[None, :],
                   _row_mask(offs_m, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), UPCAST)
    k_ptrs = head + C + offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    v_ptrs = head + 2 * C + offs_n[:, None] * stride_qkv_n + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        offs_kn = start_n + offs_n
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptrs, v_ptrs,
                                  _row_mask(offs_kn, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), offs_kn, N,
                                  qk_scale, False, ELEM, PRECISION, UPCAST)
        k_ptrs += BLOCK_N * stride_qkv_n
        v_ptrs += BLOCK_N * stride_qkv_n
    if n_full < N:  # the key tail: mask keys >= N out of the softmax
        offs_kn = n_full + offs_n
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptrs, v_ptrs,
                                  _row_mask(offs_kn, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), offs_kn, N,
                                  qk_scale, True, ELEM, PRECISION, UPCAST)

    acc = acc / l_i[:, None]
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)
    out_ptrs = (out_ptr + b.to(tl.int64) * stride_out_b + offs_m[:, None] * stride_out_n
                + h * HEAD_DIM + offs_d[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=_row_mask(offs_m, N, offs_d, HEAD_DIM, HEAD_DIM_PAD))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def attention_bwd_delta_kernel(
    out_ptr,  # (B, N, H, D): token stride stride_out_n, batch stride stride_out_b, feature stride 1
    dout_ptr,  # (B, N, H, D): token stride stride_dout_n, batch stride stride_dout_b, feature stride 1
    delta_ptr,  # (B, H, N) float32, contiguous: rowsum(out * dout) per head
    N, H, num_m_blocks,
    stride_out_b, stride_out_n, stride_dout_b, stride_dout_n,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = _row_mask(offs_m, N, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    o = tl.load(out_ptr + b.to(tl.int64) * stride_out_b + offs_m[:, None] * stride_out_n
                + h * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + b.to(tl.int64) * stride_dout_b + offs_m[:, None] * stride_dout_n
                 + h * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _dkdv_step(dk, dv, k, v, k_bias, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_qm, tile_mask, N,
               qk_scale, MASK_QUERIES: tl.constexpr, ELEM: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    q = _load_tile(q_ptrs, tile_mask, UPCAST)
    do = _load_tile(do_ptrs, tile_mask, UPCAST)
    if MASK_QUERIES:
        # lse = +inf makes p exactly 0 for queries >= N (their q and do rows are zero-filled).
        lse = tl.load(lse_ptrs, mask=offs_qm < N, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=offs_qm < N, other=0.0)
    else:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    # Transposed problem: keys on rows, so p^T and ds^T feed dv and dk without a transpose.
    # (BLOCK_N1, BLOCK_M1); k_bias (-inf on keys >= N) rides on the scale multiply as one FMA and
    # keeps exp2(0 - lse) of zero-filled keys from overflowing.
    s_t = _mm(k, tl.trans(q), PRECISION, UPCAST) * qk_scale + k_bias[:, None]
    p_t = tl.exp2(s_t - lse[None, :])
    dv += _mm(_operand(p_t, ELEM, UPCAST), do, PRECISION, UPCAST)
    dp_t = _mm(v, tl.trans(do), PRECISION, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _mm(_operand(ds_t, ELEM, UPCAST), q, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, tile_mask, offs_kn, N, qk_scale,
             MASK_KEYS: tl.constexpr, ELEM: tl.constexpr, PRECISION: tl.constexpr,
             UPCAST: tl.constexpr):
    k = _load_tile(k_ptrs, tile_mask, UPCAST)
    v = _load_tile(v_ptrs, tile_mask, UPCAST)
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # (BLOCK_M2, BLOCK_N2)
    if MASK_KEYS:
        # Zero-filled keys contribute ds * k = 0, but exp2(0 - lse) may overflow (inf * 0 = NaN).
        s = tl.where(offs_kn[None, :] < N, s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    dq += _mm(_operand(ds, ELEM, UPCAST), k, PRECISION, UPCAST)
    return dq


@triton.jit
def attention_bwd_kernel(
    qkv_ptr,  # (B, N, 3, H, D): token stride stride_qkv_n, batch stride stride_qkv_b, feature stride 1
    dout_ptr,  # (B, N, H, D): token stride stride_dout_n, batch stride stride_dout_b, feature stride 1
    lse_ptr,  # (B, H, N) float32, contiguous, from the forward
    delta_ptr,  # (B, H, N) float32, contiguous, from attention_bwd_delta_kernel
    dqkv_ptr,  # (B, N, 3, H, D): token stride stride_dqkv_n, batch stride stride_dqkv_b, feature stride 1
    N, H, num_blocks,
    qk_scale,  # scale * log2(e)
    scale,
    stride_qkv_b, stride_qkv_n, stride_dout_b, stride_dout_n, stride_dqkv_b, stride_dqkv_n,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Program (block i, head bh) writes dk, dv of keys block i, then dq of queries block i: every
    # element of dqkv is written exactly once, no atomics, one launch.
    tl.static_assert(BLOCK_N1 == BLOCK_M2)
    pid = tl.program_id(0)
    blk = pid % num_blocks
    bh = pid // num_blocks
    b = bh // H
    h = bh % H
    C = H * HEAD_DIM
    ELEM: tl.constexpr = qkv_ptr.dtype.element_ty
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    head = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    dhead = dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM
    ghead = dqkv_ptr + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    lse_row = lse_ptr + bh.to(tl.int64) * N
    delta_row = delta_ptr + bh.to(tl.int64) * N

    # ---- dk, dv for keys [blk * BLOCK_N1, +BLOCK_N1), stepping over all queries
    offs_kn = blk * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    kn_mask = _row_mask(offs_kn, N, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    k = _load_tile(head + C + offs_kn[:, None] * stride_qkv_n + offs_d[None, :], kn_mask, UPCAST)
    v = _load_tile(head + 2 * C + offs_kn[:, None] * stride_qkv_n + offs_d[None, :], kn_mask, UPCAST)
    k_bias = tl.where(offs_kn < N, 0.0, float("-inf"))
    dk = tl.zeros([BLOCK_N1, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM_PAD], tl.float32)
    offs_m1 = tl.arange(0, BLOCK_M1)
    q_ptrs = head + offs_m1[:, None] * stride_qkv_n + offs_d[None, :]
    do_ptrs = dhead + offs_m1[:, None] * stride_dout_n + offs_d[None, :]
    m_full = (N // BLOCK_M1) * BLOCK_M1
    for start_m in range(0, m_full, BLOCK_M1):
        offs_qm = start_m + offs_m1
        dk, dv = _dkdv_step(dk, dv, k, v, k_bias, q_ptrs, do_ptrs, lse_row + offs_qm,
                            delta_row + offs_qm, offs_qm,
                            _row_mask(offs_qm, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), N, qk_scale, False, ELEM, PRECISION, UPCAST)
        q_ptrs += BLOCK_M1 * stride_qkv_n
        do_ptrs += BLOCK_M1 * stride_dout_n
    if m_full < N:
        offs_qm = m_full + offs_m1
        dk, dv = _dkdv_step(dk, dv, k, v, k_bias, q_ptrs, do_ptrs, lse_row + offs_qm,
                            delta_row + offs_qm, offs_qm,
                            _row_mask(offs_qm, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), N, qk_scale, True, ELEM, PRECISION, UPCAST)
    g_ptrs = ghead + offs_kn[:, None] * stride_dqkv_n + offs_d[None, :]
    tl.store(g_ptrs + C, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=kn_mask)
    tl.store(g_ptrs + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=kn_mask)

    # ---- dq for queries [blk * BLOCK_M2, +BLOCK_M2), stepping over all keys
    offs_qm = blk * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    qm_mask = _row_mask(offs_qm, N, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    q = _load_tile(head + offs_qm[:, None] * stride_qkv_n + offs_d[None, :], qm_mask, UPCAST)
    do = _load_tile(dhead + offs_qm[:, None] * stride_dout_n + offs_d[None, :], qm_mask, UPCAST)
    lse = tl.load(lse_row + offs_qm, mask=offs_qm < N, other=float("inf"))
    delta = tl.load(delta_row + offs_qm, mask=offs_qm < N, other=0.0)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM_PAD], tl.float32)
    offs_n2 = tl.arange(0, BLOCK_N2)
    k_ptrs = head + C + offs_n2[:, None] * stride_qkv_n + offs_d[None, :]
    v_ptrs = head + 2 * C + offs_n2[:, None] * stride_qkv_n + offs_d[None, :]
    n_full = (N // BLOCK_N2) * BLOCK_N2
    for start_n in range(0, n_full, BLOCK_N2):
        offs_n = start_n + offs_n2
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs,
                      _row_mask(offs_n, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), offs_n, N, qk_scale,
                      False, ELEM, PRECISION, UPCAST)
        k_ptrs += BLOCK_N2 * stride_qkv_n
        v_ptrs += BLOCK_N2 * stride_qkv_n
    if n_full < N:
        offs_n = n_full + offs_n2
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs,
                      _row_mask(offs_n, N, offs_d, HEAD_DIM, HEAD_DIM_PAD), offs_n, N, qk_scale,
                      True, ELEM, PRECISION, UPCAST)
    tl.store(ghead + offs_qm[:, None] * stride_dqkv_n + offs_d[None, :],
             (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=qm_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float, *, out=None, lse=None,
                  config=None):
    """Forward. qkv: (B, N, 3 * C), feature stride 1 (else copied). Returns (out, lse):
    out (B, N, C) in qkv's dtype, lse (B, H, N) float32 (log2 units, see the module docstring).

    ``out``/``lse`` may be given (preallocated, out with feature stride 1); ``config`` overrides
    the block sizes (keys of :data:`FWD_CONFIGS` values).
    """
    qkv = unit_stride(qkv)
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    if out is None:
        out = torch.empty(B, N, C, dtype=qkv.dtype, device=qkv.device)
    if lse is None:
        lse = torch.empty(B, num_heads, N, dtype=torch.float32, device=qkv.device)
    assert out.shape == (B, N, C) and out.stride(-1) == 1 and out.dtype == qkv.dtype
    assert lse.shape == (B, num_heads, N) and lse.is_contiguous() and lse.dtype == torch.float32
    cfg = dict(config or fwd_config(qkv.dtype, N, D))
    num_m_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    grid = (num_m_blocks * B * num_heads,)
    attention_fwd_kernel[grid](
        qkv, out, lse, N, num_heads, num_m_blocks, scale * LOG2E,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad(D),
        PRECISION=dot_precision(qkv.dtype), UPCAST=INTERPRET, **cfg)
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  num_heads: int, scale: float, *, dqkv=None, config=None) -> torch.Tensor:
    """Backward: the gradient of qkv, (B, N, 3 * C) in qkv's packed layout and dtype.

    dout: (B, N, C), any strides (copied when its feature stride is not 1, e.g. an expanded
    gradient); qkv, out, lse as given to / returned by :func:`attention_fwd`.
    """
    qkv, dout, out, lse = unit_stride(qkv), unit_stride(dout), unit_stride(out), dense(lse)
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    D_PAD = head_dim_pad(D)
    if dqkv is None:
        dqkv = torch.empty(B, N, C3, dtype=qkv.dtype, device=qkv.device)
    assert dqkv.shape == qkv.shape and dqkv.stride(-1) == 1 and dqkv.dtype == qkv.dtype
    delta = torch.empty(B, num_heads, N, dtype=torch.float32, device=qkv.device)
    num_m_blocks = triton.cdiv(N, DELTA_BLOCK_M)
    attention_bwd_delta_kernel[(num_m_blocks * B * num_heads,)](
        out, dout, delta, N, num_heads, num_m_blocks,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=D, HEAD_DIM_PAD=D_PAD, BLOCK_M=DELTA_BLOCK_M)
    cfg = dict(config or bwd_config(qkv.dtype, N, D))
    num_blocks = triton.cdiv(N, cfg["BLOCK_N1"])
    attention_bwd_kernel[(num_blocks * B * num_heads,)](
        qkv, dout, lse, delta, dqkv, N, num_heads, num_blocks, scale * LOG2E, scale,
        qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1),
        dqkv.stride(0), dqkv.stride(1),
        HEAD_DIM=D, HEAD_DIM_PAD=D_PAD,
        PRECISION=dot_precision(qkv.dtype), UPCAST=INTERPRET, **cfg)
    return dqkv
