"""Ahead-of-time compile of every attention kernel config for sm_80 and sm_90, on the CPU.

Fails on a compile error or on register spills; checks which tensor-core instructions the
matmuls became: Hopper ``wgmma`` for the 128-row blocks (two 64-row warpgroup tiles), ``mma.sync``
for the 32-row "short" blocks (wgmma needs 64 rows per warpgroup), none for exact float32
(``input_precision="ieee"`` runs on CUDA cores).
"""
import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from uniformer_fast.kernels import attention as A  # noqa: E402

from helpers import assert_no_spills, matrix  # noqa: E402

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
PRECISION = {"16bit": "ieee", "tf32": "tf32", "ieee": "ieee"}  # "ieee" is ignored for 16-bit dots
KIND_DTYPES = {"16bit": (torch.float16, torch.bfloat16), "tf32": (torch.float32,),
               "ieee": (torch.float32,)}
HEAD_DIMS = A.SUPPORTED_HEAD_DIMS
ARCHS = (80, 90)


def _on_gpu(kind, dtype, head_dim, arch, **_):
    """The fast tier's compile of each kernel: UniFormer's head_dim 64 in bfloat16 on sm_90."""
    return arch == 90 and kind == "16bit" and dtype == torch.bfloat16 and head_dim == 64


def _unique_configs(which):
    """(kind, lengths, dtype, head_dim, config), once per distinct config ("long" and "short", or
    head_dim 28 and 32, may share one)."""
    seen = {}
    for kind, length in (A.FWD_CONFIGS if which == "fwd" else A.BWD_CONFIGS):
        for dtype in KIND_DTYPES[kind]:
            for head_dim in HEAD_DIMS:
                cfg = A.gpu_config(which, kind, length, head_dim)
                key = (kind, dtype, head_dim, tuple(sorted(cfg.items())))
                seen.setdefault(key, (kind, [], dtype, head_dim, cfg))[1].append(length)
    return [pytest.param(kind, "+".join(lengths), dtype, head_dim, cfg,
                         id=f"{kind}-{'+'.join(lengths)}-{str(dtype)[6:]}-D{head_dim}")
            for kind, lengths, dtype, head_dim, cfg in seen.values()]


def _split(cfg):
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def _aligned(sig, head_dim):
    # Pointers from torch allocations are 16-byte aligned; token/batch strides are multiples of 16
    # elements when 3 * heads * head_dim is (head_dim 32, 64), which Triton specialises on.
    ptrs = [k for k, v in sig.items() if v.startswith("*")]
    return ptrs + ([k for k in sig if k.startswith("stride")] if head_dim % 16 == 0 else [])


def _compile(compile_for_gpu, kernel_fn, sig, kind, cfg, head_dim, arch, what):
    """Compile one config, check it does not spill; returns (result, block sizes, warps)."""
    blocks, warps, stages = _split(cfg)
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=A.head_dim_pad(head_dim), **blocks,
                      PRECISION=PRECISION[kind], UPCAST=False)
    r = compile_for_gpu(kernel_fn, sig, constexprs, arch, warps, stages, aligned=_aligned(sig, head_dim))
    assert_no_spills(r, what)
    return r, blocks, warps


@matrix(cover="one", prefer=_on_gpu, **{"kind,lengths,dtype,head_dim,cfg": _unique_configs("fwd")}, arch=ARCHS)
def test_forward_compiles(kind, lengths, dtype, cfg, head_dim, arch, compile_for_gpu):
    p = PTR[dtype]
    sig = dict(qkv_ptr=p, out_ptr=p, lse_ptr="*fp32", N="i32", H="i32", num_m_blocks="i32",
               qk_scale="fp32", stride_qkv_b="i32", stride_qkv_n="i32", stride_out_b="i32",
               stride_out_n="i32")
    what = f"fwd {kind} {lengths} {dtype} D={head_dim} sm_{arch}"
    r, blocks, warps = _compile(compile_for_gpu, A.attention_fwd_kernel, sig, kind, cfg, head_dim, arch, what)
    if kind == "ieee":
        assert "mma" not in r["ptx"], f"{what}: exact float32 must not use tensor cores"
    elif arch == 90 and blocks["BLOCK_M"] >= 64 * (warps // 4):
        assert "wgmma" in r["ptx"], f"{what}: expected Hopper wgmma"
    else:
        assert "mma.sync" in r["ptx"], f"{what}: expected mma.sync tensor-core instructions"


@matrix(cover="one", prefer=_on_gpu, **{"kind,lengths,dtype,head_dim,cfg": _unique_configs("bwd")}, arch=ARCHS)
def test_backward_compiles(kind, lengths, dtype, cfg, head_dim, arch, compile_for_gpu,
                           request):
    if kind == "ieee" and head_dim != 32:
        # Exact float32 holds the tl.dot operands in registers (no tensor cores); with head_dim 64
        # or 28 its four matmuls per step spill at every block size tried (16-64 rows, 4-8 warps).
        # Correct, not fast.
        request.applymarker(pytest.mark.xfail(strict=True, reason="exact-float32 backward spills",
                                              raises=AssertionError))
    p = PTR[dtype]
    sig = dict(qkv_ptr=p, dout_ptr=p, lse_ptr="*fp32", delta_ptr="*fp32", dqkv_ptr=p, N="i32",
               H="i32", num_blocks="i32", qk_scale="fp32", scale="fp32", stride_qkv_b="i32",
               stride_qkv_n="i32", stride_dout_b="i32", stride_dout_n="i32", stride_dqkv_b="i32",
               stride_dqkv_n="i32")
    what = f"bwd {kind} {lengths} {dtype} D={head_dim} sm_{arch}"
    r, blocks, warps = _compile(compile_for_gpu, A.attention_bwd_kernel, sig, kind, cfg, head_dim, arch, what)
    if kind != "ieee" and arch == 90 and blocks["BLOCK_N1"] >= 64 * (warps // 4):
        assert "wgmma" in r["ptx"], f"{what}: expected Hopper wgmma"


@matrix(cover="one", prefer=lambda arch, head_dim, dtype: _on_gpu("16bit", dtype, head_dim, arch),
        dtype=[pytest.param(d, id=str(d)) for d in PTR], head_dim=HEAD_DIMS, arch=ARCHS)
def test_delta_compiles(dtype, head_dim, arch, compile_for_gpu):
    p = PTR[dtype]
    sig = dict(out_ptr=p, dout_ptr=p, delta_ptr="*fp32", N="i32", H="i32", num_m_blocks="i32",
               stride_out_b="i32", stride_out_n="i32", stride_dout_b="i32", stride_dout_n="i32")
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=A.head_dim_pad(head_dim),
                      BLOCK_M=A.DELTA_BLOCK_M)
    r = compile_for_gpu(A.attention_bwd_delta_kernel, sig, constexprs, arch,
                        aligned=_aligned(sig, head_dim))
    assert_no_spills(r, f"delta {dtype} D={head_dim} sm_{arch}")
    if head_dim % 16 == 0:
        assert "LDG.E.128" in r["sass"], "expected 16-byte loads"
