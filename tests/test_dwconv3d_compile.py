"""Ahead-of-time compile of every dwconv3d kernel at every config its launcher can choose, for
sm_80 and sm_90, on the CPU (no GPU needed).

Fails on a compile error or a register spill; prints registers and shared memory per kernel and
checks that the channel loads became 16-byte vector loads (``LDG.E.128``) when the launcher's
tensors are 16-byte aligned (channels a multiple of 8 for 16-bit data, 4 for float32).
"""
import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from uniformer_fast.kernels import dwconv3d as K  # noqa: E402

from helpers import assert_no_spills, matrix  # noqa: E402

PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
ARCHS = (80, 90)
# The kernel sizes UniFormer uses (DPE 3x3x3, Local MHRA 5x5x5), the 2-D and 1-D temporal cases,
# and the largest one allowed.
KERNELS = ((3, 3, 3), (5, 5, 5), (1, 3, 3), (3, 1, 1), (7, 7, 7))
# A channel count that selects each channel block (the launchers key their blocks on C).
CHANNELS = [pytest.param(block_c, id=f"C{block_c}") for block_c in K.GPU_BLOCKS]


@pytest.fixture
def gpu_configs(gpu_kernels):
    return gpu_kernels("dwconv3d")


def _split(cfg):
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps")


def _aligned(sig):
    # torch allocations are 16-byte aligned; with C a multiple of 16 every stride and C itself
    # are multiples of 16 elements, which Triton specialises on at run time.
    return [k for k, v in sig.items() if v.startswith("*") or k.startswith("stride") or k == "C"]


def _without(sig, absent):
    """The signature and the None constexprs of a launch that passes None for ``absent``; the
    kernels' heuristics derive their flags (HAS_BIAS, STATS) from which pointers are None."""
    return {k: v for k, v in sig.items() if k not in absent}, dict.fromkeys(absent)


def _fwd_sig(dtype, bias=True, stats=False):
    p = PTR[dtype]
    sig = dict(x_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p, phi_ptr="*fp32", psdev_ptr="*fp32", pm2_ptr="*fp32",
               C="i32", T="i32", H="i32", W="i32",
               stride_xb="i32", stride_xt="i32", stride_xh="i32", stride_xw="i32")
    return _without(sig, ("b_ptr",) * (not bias) + ("phi_ptr", "psdev_ptr", "pm2_ptr") * (not stats))


def _dw_sig(dtype, bias=True):
    p = PTR[dtype]
    sig = dict(x_ptr=p, dy_ptr=p, dw_partial_ptr="*fp32", db_partial_ptr="*fp32", C="i32",
               T="i32", H="i32", W="i32", stride_xb="i32", stride_xt="i32", stride_xh="i32",
               stride_xw="i32", stride_dyb="i32", stride_dyt="i32", stride_dyh="i32",
               stride_dyw="i32", tiles_per_batch="i32", num_tiles="i32", tiles_per_prog="i32")
    return _without(sig, ("db_partial_ptr",) * (not bias))


def _compile(compile_for_gpu, kernel_fn, sig_nones, config, kernel, arch, what, **flags):
    sig, nones = sig_nones
    blocks, warps = _split(config)
    constexprs = dict(KT=kernel[0], KH=kernel[1], KW=kernel[2], **nones, **flags, **blocks)
    r = compile_for_gpu(kernel_fn, sig, constexprs, arch, warps, aligned=_aligned(sig))
    assert_no_spills(r, f"{what} {kernel} {blocks} warps {warps} sm_{arch}")
    return r


# Each channel block, dtype, kernel size and architecture (the fast tier compiles one: sm_90,
# bfloat16, UniFormer's 5x5x5).
_every_config = matrix(cover="one", arch=ARCHS, kernel=KERNELS, dtype=list(PTR), C=CHANNELS,
                       prefer=lambda arch, kernel, dtype, C: arch == 90 and kernel == (5, 5, 5) and dtype == torch.bfloat16)


@_every_config
def test_forward_compiles(C, dtype, kernel, arch, compile_for_gpu, gpu_configs):
    r = _compile(compile_for_gpu, K.dwconv3d_fwd_kernel, _fwd_sig(dtype), K.fwd_config(C, kernel), kernel, arch,
                 f"fwd {dtype}", RESIDUAL=True)
    assert "LDG.E.128" in r["sass"], "expected 16-byte loads along C"


@_every_config
def test_weight_grad_compiles(C, dtype, kernel, arch, compile_for_gpu, gpu_configs):
    r = _compile(compile_for_gpu, K.dwconv3d_bwd_dw_kernel, _dw_sig(dtype), K.dw_config(C, dtype), kernel, arch,
                 f"dw {dtype}")
    assert "LDG.E.128" in r["sass"], "expected 16-byte loads along C"


@matrix(cover="one", kernel=((3, 3, 3), (7, 7, 7)), arch=ARCHS, prefer=lambda kernel, arch: arch == 90)
def test_other_variants_compile(kernel, arch, compile_for_gpu, gpu_configs):
    """The variants the backward launches: the input gradient (no bias, with and without the
    residual) and the weight gradient without a bias."""
    for residual in (False, True):
        _compile(compile_for_gpu, K.dwconv3d_fwd_kernel, _fwd_sig(torch.bfloat16, bias=False),
                 K.fwd_config(64, kernel), kernel, arch, f"dx residual={residual}", RESIDUAL=residual)
    _compile(compile_for_gpu, K.dwconv3d_bwd_dw_kernel, _dw_sig(torch.bfloat16, bias=False),
             K.dw_config(64, torch.bfloat16), kernel, arch, "dw no bias")


@matrix(cover="one", C=[pytest.param(c, id=f"C{c}") for c in (32, 64)], dtype=(torch.bfloat16, torch.float32),
        arch=ARCHS, prefer=lambda C, dtype, arch: arch == 90 and dtype == torch.bfloat16)
def test_forward_with_stats_compiles(C, dtype, arch, compile_for_gpu, gpu_configs):
    """The STATS variant (BatchNorm partials from the registers) as ops.dpe_bn_stats launches it for
    the CBlock's DPE: 3x3x3 with bias and residual, each channel block (C <= 32: 32, else 64)."""
    r = _compile(compile_for_gpu, K.dwconv3d_fwd_kernel, _fwd_sig(dtype, stats=True), K.fwd_config(C, (3, 3, 3)),
                 (3, 3, 3), arch, f"fwd STATS {dtype}", RESIDUAL=True)
    assert "LDG.E.128" in r["sass"], "expected 16-byte loads along C"
