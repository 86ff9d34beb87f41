"""Tiled matmul for the model's linear maps with bias and exact (erf) GELU fused into the epilogue,
forward and backward.

One kernel, :func:`matmul_kernel`, computes ``C = A @ B`` tile by tile with float32 accumulation
and a fused epilogue; the launchers point it at the operands of each direction through strides:

- forward: ``y = act(x @ W^T + b)``: A = x (M, K), B = W^T (K, N), epilogue bias (+ GELU).
- backward, GELU only: ``d_pre = dy * gelu'(x @ W^T + b)``: the forward's matmul again, with an
  epilogue that reads dy. The pre-activation is *recomputed*, not saved: storing it would cost a
  write of M x N elements in the forward and a read in the backward (2 M N e bytes, plus M N e of
  memory held from forward to backward), recomputing costs a read of x (M K e bytes) and 2 M N K
  tensor-core FLOPs. With N = 4K (fc1) that is 8 e / (2 K) bytes per FLOP saved: recomputing is
  cheaper on an H100 (~260 FLOP per byte of HBM) while K < ~500, i.e. for every UniFormer-S stage
  (K = C = 64..512, even at 512), and it never holds the hidden activation twice.
- backward, input gradient: ``dx = d_pre @ W``: A = d_pre (M, N), B = W (N, K).
- backward, weight and bias gradients: ``dW = d_pre^T @ x`` and ``db = sum_m d_pre``: A = d_pre^T
  (N, M), B = x (M, K), with db the row sums of A accumulated in the same loop (no extra pass).
  M (the reduction) is large and N x K small, so the reduction is split over ``SPLIT`` programs
  per tile, each writing float32 partial sums, then :func:`sum_splits_kernel` adds the partials
  in a fixed order: deterministic, no atomics.

Layouts: every operand has one unit stride (x, W, dy, d_pre: the last dimension) and one free
stride (rows), so a sliced or flattened x is read in place. ``A_K_CONTIG`` / ``B_K_CONTIG`` say
whether the unit stride runs along the reduction or along the output dimension.

Precision: float16/bfloat16 operands on tensor cores with float32 accumulation, output rounded
once. float32 follows PyTorch's matmul precision setting (:func:`torch.get_float32_matmul_precision`,
which ``torch.backends.cuda.matmul.allow_tf32`` sets), as kernels/attention.py: "highest" gives
exact float32 ("ieee"), "high"/"medium" tf32.

Offsets are 32-bit unless an operand spans 2**31 elements or more (``INT64``, chosen per launch).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRET, dense, unit_stride
from .tiles import is_given, num_sms
from .attention import dot_precision, matmul_kind

ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_bwd": 2}

# Candidate tiles per matmul kind, tried by @triton.autotune on a GPU (keyed on M, N, K and the
# epilogue). Every entry compiles without register spills for sm_80 and sm_90 in every direction
# under Triton 3.6 and 3.9 (tests/test_linear_triton.py::test_configs_compile_without_spills); no
# GPU timing yet. Triton 3.6 takes far more registers for the GELU epilogue (a 64x128 tile at 4
# warps: 255 and up to 464 B of stack, where 3.9 takes 168): 64-row tiles 128 wide use 8 warps.
# Exact float32 runs tl.dot on CUDA cores with operands in registers: small tiles only (a 64x64
# tile left a stack frame in the GELU forward under 3.6 at 8 warps, in the weight gradient under
# 3.9 at 4).
GPU_CONFIGS = {
    "16bit": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ],
    "tf32": [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    ],
    "ieee": [
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2),
    ],
}
# Under the interpreter every op costs ~0.1 ms per program whatever the tile, and its autotuner
# cannot benchmark: the launcher passes one config, tiles of 16 for dimensions under 128 (test
# shapes then cross tile edges in M, N and K) and large tiles for larger ones (a model run stays
# quick; its sizes are not multiples of them either, so the tails still run).
INTERPRET_SMALL_TILE, INTERPRET_LARGE_TILE, INTERPRET_LARGE_FROM = 16, 128, 128

# The split reduction (dW, db): each split owns a run of reduction rows that is a multiple of
# the reduction tile (on the GPU SPLIT_QUANTUM, the largest BLOCK_K of any config, so a split
# boundary never cuts a K tile), at least SPLIT_MIN_ROWS long; enough splits that the grid fills
# the GPU (TARGET_PROGRAMS_PER_SM).
SPLIT_QUANTUM = 128
SPLIT_MIN_ROWS = 32 if INTERPRET else 1024
TARGET_PROGRAMS_PER_SM = 2
INTERPRET_TARGET_PROGRAMS = 1  # interpreted programs run one after another: fewest is fastest
SUM_SPLITS_BLOCK = 64 if INTERPRET else 1024
INT32_LIMIT = 2 ** 31


def interpret_config(M: int, N: int, K: int) -> dict:
    """The tiles of one launch under the interpreter (see INTERPRET_SMALL_TILE)."""
    def tile(n):
        return INTERPRET_LARGE_TILE if n >= INTERPRET_LARGE_FROM else INTERPRET_SMALL_TILE
    return dict(BLOCK_M=tile(M), BLOCK_N=tile(N), BLOCK_K=tile(K), GROUP_M=2, num_warps=1, num_stages=1)


def _triton_configs(kind):
    out = []
    for cfg in GPU_CONFIGS[kind]:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        out.append(triton.Config(cfg, num_warps=warps, num_stages=stages))
    return out


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _gelu(z):
    # Exact GELU, as nn.GELU(): z * Phi(z).
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    # d/dz [z * Phi(z)] = Phi(z) + z * phi(z).
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf


@triton.jit
def _load_operand(ptrs, mask, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        t = tl.load(ptrs, mask=mask, other=0.0)
    else:
        t = tl.load(ptrs)
    if UPCAST:  # the interpreter's bfloat16 tl.dot is wrong: compute in float32 there
        t = t.to(tl.float32)
    return t


@triton.jit
def _mma(acc, a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _matmul_kernel(
    a_ptr,  # A (M, K): (m, k) at m * stride_a + k if A_K_CONTIG else at m + k * stride_a
    b_ptr,  # B (K, N): (k, n) at n * stride_b + k if B_K_CONTIG else at k * stride_b + n
    bias_ptr,  # (N,): added to every row of C, or None
    dy_ptr,  # (M, N): row stride stride_dy, column stride 1; the output gradient when ACT == 2, else None
    c_ptr,  # (SPLIT, M, N): split stride stride_cs, row stride stride_cm, column stride 1
    rowsum_ptr,  # (SPLIT, M): split stride M, unit stride; sum over k of A, written if given, or None
    M, N, K,
    k_per_split,  # reduction length of one split (a multiple of BLOCK_K unless SPLIT == 1)
    stride_a, stride_b, stride_dy, stride_cm, stride_cs,
    A_K_CONTIG: tl.constexpr, B_K_CONTIG: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # bias_ptr given
    ACT: tl.constexpr,  # 0: none; 1: GELU; 2: C = dy * gelu'(A @ B + bias) (GELU backward)
    ROWSUM: tl.constexpr,  # rowsum_ptr given
    INT64: tl.constexpr,  # 64-bit offsets (an operand spans >= 2**31 elements)
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep the column tiles together, so the B tiles they
    # share stay in L2. Axis 1 is the split of the reduction.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    # An operand whose unit stride runs along the reduction wraps its rows past the edge onto
    # valid ones (no mask in the main loop; those rows are never stored). One whose unit stride
    # runs along its rows masks them instead: the mask keeps 16-byte vector loads when the size
    # is a multiple of 16 (Triton specialises on that), a wrap would hide the contiguity.
    rm = offs_m % M if A_K_CONTIG else offs_m
    rn = offs_n % N if B_K_CONTIG else offs_n
    # pid_s * k_per_split is 0 or a multiple of the split quantum (>= 16): tell the compiler, so
    # the reduction offsets keep their alignment.
    k_start = tl.multiple_of(pid_s * k_per_split, 16)
    k_end = min(K, k_start + k_per_split)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    if INT64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    if A_K_CONTIG:
        a_ptrs = a_ptr + rm[:, None] * stride_a + offs_k[None, :]
        a_step = BLOCK_K
        a_rows = tl.full([BLOCK_M, 1], True, tl.int1)
    else:
        a_ptrs = a_ptr + rm[:, None] + offs_k[None, :] * stride_a
        a_step = BLOCK_K * stride_a
        a_rows = m_in[:, None]
    if B_K_CONTIG:
        b_ptrs = b_ptr + offs_k[:, None] + rn[None, :] * stride_b
        b_step = BLOCK_K
        b_cols = tl.full([1, BLOCK_N], True, tl.int1)
    else:
        b_ptrs = b_ptr + offs_k[:, None] * stride_b + rn[None, :]
        b_step = BLOCK_K * stride_b
        b_cols = n_in[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    rowsum = tl.zeros([BLOCK_M], tl.float32)
    k_full = k_start + ((k_end - k_start) // BLOCK_K) * BLOCK_K
    for _ in range(k_start, k_full, BLOCK_K):
        a = _load_operand(a_ptrs, a_rows, UPCAST, not A_K_CONTIG)
        b = _load_operand(b_ptrs, b_cols, UPCAST, not B_K_CONTIG)
        acc = _mma(acc, a, b, PRECISION, UPCAST)
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), 1)
        a_ptrs += a_step
        b_ptrs += b_step
    # The tail's row sums go to a value of their own, added after the branch: the loop's rowsum
    # then has a single use, which Triton 3.6's thread-locality pass asserts for a reduction
    # carried through a loop (it aborted the tf32 weight-gradient compile otherwise).
    tail_rowsum = tl.zeros([BLOCK_M], tl.float32)
    if k_full < k_end:  # the reduction's tail: mask k >= k_end
        k_in = tl.arange(0, BLOCK_K) < k_end - k_full
        a = _load_operand(a_ptrs, a_rows & k_in[None, :], UPCAST, True)
        b = _load_operand(b_ptrs, k_in[:, None] & b_cols, UPCAST, True)
        acc = _mma(acc, a, b, PRECISION, UPCAST)
        if ROWSUM:
            tail_rowsum = tl.sum(a.to(tl.float32), 1)
    rowsum += tail_rowsum

    out_mask = m_in[:, None] & n_in[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = _gelu(acc)
    elif ACT == 2:
        dy_rows = offs_m
        if INT64:
            dy_rows = dy_rows.to(tl.int64)
        dy = tl.load(dy_ptr + dy_rows[:, None] * stride_dy + offs_n[None, :], mask=out_mask, other=0.0)
        acc = dy.to(tl.float32) * _gelu_grad(acc)
    c_rows = offs_m
    if INT64:
        c_rows = c_rows.to(tl.int64)
    c_ptrs = c_ptr + pid_s.to(tl.int64) * stride_cs + c_rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
    if ROWSUM:
        # Every column tile computed the same sums; the first one writes them.
        rs_mask = tl.where(pid_n == 0, m_in, False)
        tl.store(rowsum_ptr + pid_s.to(tl.int64) * M + c_rows, rowsum.to(rowsum_ptr.dtype.element_ty),
                 mask=rs_mask)


@triton.jit
def sum_splits_kernel(
    part_ptr,  # (SPLIT, L) float32, contiguous: partial sums
    out_ptr,  # (L,), contiguous: their sum, in the output dtype
    L, SPLIT,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, SPLIT):  # a fixed order: the result does not depend on scheduling
        acc += tl.load(part_ptr + s * L + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# The flags follow from which optional pointers are None. The heuristics wrap the autotuner, so
# the flags reach it as arguments and key its choice.
_FLAGS = triton.heuristics({"HAS_BIAS": is_given("bias_ptr"), "ROWSUM": is_given("rowsum_ptr")})
_TUNE_KEY = ["M", "N", "K", "A_K_CONTIG", "B_K_CONTIG", "HAS_BIAS", "ACT", "ROWSUM"]
matmul_kernel = _FLAGS(_matmul_kernel)
matmul_kernel_tuned = {kind: _FLAGS(triton.autotune(configs=_triton_configs(kind), key=_TUNE_KEY)(_matmul_kernel))
                       for kind in GPU_CONFIGS}


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _span(t: torch.Tensor) -> int:
    # Elements between the first and one past the last addressed element (+1 for safety).
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _needs_int64(*tensors) -> bool:
    return any(t is not None and _span(t) >= INT32_LIMIT for t in tensors)


def _row_stride(t: torch.Tensor) -> int:
    # A size-1 dimension's stride is arbitrary: any value addresses its single row.
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _launch(a, b, c, M, N, K, stride_a, stride_b, *, a_k_contig, b_k_contig, bias=None, act=0,
            dy=None, rowsum=None, split=1, k_per_split=None, int64=False, config=None):
    dtype = a.dtype
    kind = matmul_kind(dtype)
    stride_cs = c.stride(0) if c.dim() == 3 else 0
    c_rows = c if c.dim() == 2 else c[0]
    args = (a, b, bias, dy, c, rowsum, M, N, K, K if k_per_split is None else k_per_split,
            stride_a, stride_b, _row_stride(dy) if dy is not None else 0, _row_stride(c_rows), stride_cs)
    flags = dict(A_K_CONTIG=a_k_contig, B_K_CONTIG=b_k_contig, ACT=act, INT64=int64, PRECISION=dot_precision(dtype), UPCAST=INTERPRET)
    if config is None and INTERPRET:
        config = interpret_config(M, N, K)
    if config is not None:  # explicit tiles (interpreter, tests): no autotuning
        cfg = dict(config)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
        matmul_kernel[grid](*args, **flags, **cfg)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)

    matmul_kernel_tuned[kind][grid](*args, **flags)


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias, activation: str, *, config=None) -> torch.Tensor:
    """y = act(x @ weight^T + bias). x: (M, K), unit last stride (else copied), any row stride;
    weight: (N, K), unit last stride (else copied); bias: (N,) or None, any stride (copied unless
    dense); activation "none" or "gelu"; M >= 0, N, K >= 1. Returns y (M, N) contiguous, in x's
    dtype."""
    x, weight, bias = unit_stride(x), unit_stride(weight), dense(bias)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    _launch(x, weight, y, M, N, K, _row_stride(x), _row_stride(weight), a_k_contig=True,
            b_k_contig=True, bias=bias, act=ACTIVATIONS[activation],
            int64=_needs_int64(x, weight, y), config=config)
    return y


def _split_count(rows: int, tiles: int, device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        target = INTERPRET_TARGET_PROGRAMS
    else:
        target = TARGET_PROGRAMS_PER_SM * num_sms(device)
    by_rows = max(1, rows // SPLIT_MIN_ROWS)
    return max(1, min(math.ceil(target / max(tiles, 1)), by_rows))


def linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias, activation: str,
               need_dx: bool = True, need_dw: bool = True, *, split=None, config=None):
    """Gradients of :func:`linear_fwd`. dy: (M, N), any strides (copied unless unit last stride,
    e.g. an expanded gradient); x, weight, bias as given to the forward.

    Returns (dx (M, K) in x's dtype or None, dW (N, K) and db (N,) in weight's dtype, each None
    when not needed). ``split`` forces the number of reduction splits of dW/db (default: enough
    to fill the GPU).
    """
    x, weight, bias = unit_stride(x), unit_stride(weight), dense(bias)
    dy = unit_stride(dy)
    M, K = x.shape
    N = weight.shape[0]
    int64 = _needs_int64(x, weight, dy)
    if activation == "gelu":  # d_pre = dy * gelu'(x W^T + b), the pre-activation recomputed
        d_pre = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M > 0:
            _launch(x, weight, d_pre, M, N, K, _row_stride(x), _row_stride(weight), a_k_contig=True,
                    b_k_contig=True, bias=bias, act=ACTIVATIONS["gelu_bwd"], dy=dy,
                    int64=int64 or _needs_int64(d_pre), config=config)
    else:
        d_pre = dy
    dx = dw = db = None
    if need_dx:
        dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
        if M > 0:
            # dx (M, K) = d_pre (M, N) @ W (N, K): A's unit stride runs along the reduction.
            _launch(d_pre, weight, dx, M, K, N, _row_stride(d_pre), _row_stride(weight),
                    a_k_contig=True, b_k_contig=False, int64=int64 or _needs_int64(dx, d_pre),
                    config=config)
    if need_dw:
        dw = torch.empty(N, K, dtype=weight.dtype, device=x.device)
        db = torch.empty(N, dtype=weight.dtype, device=x.device) if bias is not None else None
        if M == 0:
            dw.zero_()
            if db is not None:
                db.zero_()
        else:
            _weight_grad(d_pre, x, dw, db, M, N, K, split, config, int64 or _needs_int64(d_pre))
    return dx, dw, db


def _weight_grad(d_pre, x, dw, db, M, N, K, split, config, int64):
    # dW (N, K) = d_pre^T (N, M) @ x (M, K), db = row sums of d_pre^T, the reduction over M split.
    if config is None and INTERPRET:
        config = interpret_config(N, K, M)
    cfg = config or GPU_CONFIGS[matmul_kind(d_pre.dtype)][0]
    quantum = cfg["BLOCK_K"] if config is not None else SPLIT_QUANTUM
    tiles = triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
    if split is None:
        split = _split_count(M, tiles, d_pre.device)
    rows_per_split = triton.cdiv(triton.cdiv(M, split), quantum) * quantum
    split = triton.cdiv(M, rows_per_split)
    if split == 1:
        target, rowsum = dw, db
    else:
        target = torch.empty(split, N, K, dtype=torch.float32, device=x.device)
        rowsum = torch.empty(split, N, dtype=torch.float32, device=x.device) if db is not None else None
    _launch(d_pre, x, target, N, K, M, _row_stride(d_pre), _row_stride(x), a_k_contig=False,
            b_k_contig=False, rowsum=rowsum, split=split, k_per_split=rows_per_split, int64=int64,
            config=config)
    if split > 1:
        _sum_splits(target, dw)
        if db is not None:
            _sum_splits(rowsum, db)


def _sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    L = out.numel()
    sum_splits_kernel[(triton.cdiv(L, SUM_SPLITS_BLOCK),)](part, out, L, part.shape[0], BLOCK=SUM_SPLITS_BLOCK)
