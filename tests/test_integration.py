"""The model with the PyTorch ecosystem: autocast, activation checkpointing, torch.export."""

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast import ops

from helpers import TINY_HEAD32, TINY_STAGE3_X2

TINY = dict(TINY_STAGE3_X2, num_classes=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_low_precision(dtype, cpu_native_dtypes):
    cpu_native_dtypes(dtype)  # as on a CPU with instructions for dtype (else computed in float32)
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY).eval()
    x = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=dtype):
            got = model(x)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 5e-2, err  # a whole network in 8-bit (bf16) or 11-bit (fp16) mantissas


@pytest.mark.parametrize("fp32", [False, True])
def test_attention_fp32_option(fp32, monkeypatch, cpu_native_dtypes):
    seen = []
    real = ops.attention

    def spy(qkv, *args, **kwargs):
        seen.append(qkv.dtype)
        return real(qkv, *args, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    cpu_native_dtypes(torch.bfloat16)  # as on a CPU with bf16 instructions (else float32 throughout)
    model = uf.UniFormer(**TINY, split=True, attention_fp32=fp32).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 4, 64, 64))
    assert out.dtype == torch.bfloat16
    assert len(seen) == 2 * 2 + 1 * 2  # stage 3: 2 split blocks x (temporal + spatial); stage 4: 1 x 2
    assert set(seen) == {torch.float32 if fp32 else torch.bfloat16}


def test_checkpointing_in_training_step_matches(assert_close):
    torch.manual_seed(0)
    plain = uf.UniFormer(**TINY)
    ckpt = uf.UniFormer(**TINY, checkpoint_num=(1, 1, 2, 1))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, 64, 64)
    for model in (plain, ckpt):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(x).logsumexp(-1).sum().backward()
        opt.step()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close(b, a, rtol=1e-5, name=name)


def test_export_reference_path(assert_close):
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    with ops.use_backend("reference"):
        exported = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
    got = exported.module()(x)
    assert_close(got, expected, rtol=1e-5)
    x2 = torch.randn(1, 3, 4, 64, 64)
    assert_close(exported.module()(x2), model(x2).detach(), rtol=1e-5)


def test_export_fused_path_keeps_custom_ops(assert_close):
    """With the fused backends the exported graph calls the registered uniformer_fast ops (loading
    it needs uniformer_fast imported); under use_backend("reference") it is plain aten."""
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY_HEAD32, num_classes=5).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    from uniformer_fast.ops import available_backends, extension
    if "cpp" in available_backends("dwconv3d") and extension.C is not None:
        assert any("uniformer_fast.dwconv3d_cpp_fwd" in t for t in targets)
    with torch.no_grad():
        assert_close(exported.module()(x), model(x), rtol=1e-5)
    with ops.use_backend("reference"):
        plain = torch.export.export(model, (x,))
    assert not any("uniformer_fast" in str(n.target) for n in plain.graph.nodes)


@pytest.mark.parametrize("split", [False, True])
def test_cpu_fast_path_matches_official_in_float32(split, assert_close):
    """Inference on what "auto" runs on the CPU (C++ depthwise conv, sdpa, oneDNN linear + GELU)
    against the official computation, same weights, float32."""
    from uniformer_fast.official import OfficialUniFormer
    torch.manual_seed(0)
    cfg = dict(TINY_HEAD32, depth=TINY_STAGE3_X2["depth"], num_classes=5, split=split)
    model = uf.UniFormer(**cfg).eval()
    official = OfficialUniFormer(**cfg).eval()
    official.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        assert_close(model(x), official(x), rtol=1e-5)
        model.fuse_for_inference()
        assert_close(model(x), official(x), rtol=1e-5)
