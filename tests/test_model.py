import json
from pathlib import Path

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.official import OfficialUniFormer

from helpers import TINY_STAGE3_X2, matrix

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec"
TINY = dict(TINY_STAGE3_X2, num_classes=7)


def spec(name):
    path = SPEC / f"{name}_k400_state_dict.json"
    if not path.exists():
        pytest.skip(f"{path} not found (the shared spec sits beside the repository)")
    return json.loads(path.read_text())


def randomize(model):
    """Non-trivial values everywhere, BN running statistics included, so parity means something."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.uniform_(0.5, 1.5)
                else:
                    t.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("name", ["uniformer_small", "uniformer_base"])
def test_state_dict_equals_official_spec(name):
    expected = spec(name)
    sd = uf.create_model(name).state_dict()
    assert list(sd) == list(expected)
    assert {k: list(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("name,count", [("uniformer_small", 21_400_400), ("uniformer_base", 49_813_200)])
def test_parameter_counts(name, count):
    assert sum(p.numel() for p in uf.create_model(name).parameters()) == count


def test_official_spec_loads_strictly():
    sd = {k: torch.zeros(v) for k, v in spec("uniformer_small").items()}
    model = uf.uniformer_small()
    assert uf.load_checkpoint(model, sd) == ([], [])
    model.load_state_dict(sd, strict=True)


def test_registry():
    assert uf.list_models() == ["uniformer_base", "uniformer_small"]
    m = uf.create_model("uniformer_small", num_classes=10, depth=(1, 1, 1, 1))
    assert m.depth == (1, 1, 1, 1) and m.head.out_features == 10
    assert isinstance(uf.uniformer_base(num_classes=0).head, torch.nn.Identity)
    with pytest.raises(ValueError, match="unknown model 'uniformer_huge'"):
        uf.create_model("uniformer_huge")
    with pytest.raises(TypeError):
        uf.create_model("uniformer_small", not_an_arg=1)


@pytest.mark.parametrize("T,H,W,std,out_thw", [
    (1, 32, 32, False, (1, 1, 1)),
    (8, 64, 64, False, (4, 2, 2)),
    (5, 37, 45, False, (3, 1, 1)),
    (16, 96, 64, True, (8, 3, 2)),
    (3, 70, 33, True, (2, 2, 1)),
])
def test_shapes(T, H, W, std, out_thw):
    model = uf.UniFormer(**TINY, std=std).eval()
    x = torch.randn(2, 3, T, H, W)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64) + out_thw
        assert model(x).shape == (2, 7)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("std", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_matches_official_computation(split, std, train, assert_close):
    torch.manual_seed(1)
    cfg = dict(TINY, split=split, std=std)
    ours = randomize(uf.UniFormer(**cfg).double()).train(train)
    official = OfficialUniFormer(**cfg).double().train(train)
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 5, 64, 96, dtype=torch.float64, requires_grad=True)
    y_ours, y_off = ours(x), official(x)
    assert_close(y_ours, y_off, name="logits")
    g = torch.randn_like(y_ours)
    grads_ours = torch.autograd.grad(y_ours, [x, *ours.parameters()], g)
    grads_off = torch.autograd.grad(y_off, [x, *official.parameters()], g)
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_ours, grads_off):
        assert_close(a, b, name=name)
    if train:  # BatchNorm running statistics move the same way
        for (name, a), b in zip(ours.named_buffers(), official.buffers()):
            assert_close(a.double(), b.double(), name=name)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("std", [False, True])
def test_batch_of_one_gradients(split, std, assert_close):
    """A batch of one: ATen's CPU batch-norm backward reads the stride of the size-1 batch dim,
    and the official model's divided attention leaves one there that made its own gradients wrong.
    So the reference is the official model on a batch of two in eval mode (samples independent),
    the loss on the first sample only."""
    torch.manual_seed(2)
    cfg = dict(TINY, split=split, std=std)
    ours = randomize(uf.UniFormer(**cfg).double()).eval()
    official = OfficialUniFormer(**cfg).double().eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 5, 64, 96, dtype=torch.float64, requires_grad=True)
    pair = torch.cat([x.detach(), torch.randn_like(x)]).requires_grad_()
    y_ours, y_pair = ours(x), official(pair)
    assert_close(y_ours, y_pair[:1], name="logits")
    g = torch.randn_like(y_ours)
    grads_ours = torch.autograd.grad(y_ours, [x, *ours.parameters()], g)
    grads_off = torch.autograd.grad(y_pair[:1], [pair, *official.parameters()], g)
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_ours, grads_off):
        assert_close(a, b[:1] if name == "x" else b, name=name)


def test_activations_stay_channels_last():
    model = uf.UniFormer(**TINY).eval()
    seen = []
    for blocks in (model.blocks1, model.blocks2, model.blocks3, model.blocks4):
        for blk in blocks:
            blk.register_forward_hook(lambda m, i, o: seen.append(
                o.is_contiguous(memory_format=torch.channels_last_3d)))
    with torch.no_grad():
        model(torch.randn(1, 3, 4, 64, 64))
    assert seen and all(seen)


def test_official_initialisation():
    model = uf.UniFormer(**TINY, split=True)
    blk = model.blocks3[0]
    assert torch.all(blk.t_attn.qkv.weight == 0) and torch.all(blk.t_attn.qkv.bias == 0)
    assert torch.all(blk.t_attn.proj.weight == 1) and torch.all(blk.t_attn.proj.bias == 0)
    assert blk.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert blk.attn.qkv.weight.abs().max().item() <= 2.0  # truncated normal
    assert torch.all(blk.attn.proj.bias == 0)
    assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)
    assert torch.all(model.patch_embed1.norm.weight == 1)
    assert model.patch_embed1.norm.eps == 1e-5 and blk.norm1.eps == 1e-6


def test_drop_path_rises_linearly():
    model = uf.UniFormer(**TINY, drop_path_rate=0.25)
    rates = [blk.drop_path.p for blocks in (model.blocks1, model.blocks2, model.blocks3, model.blocks4)
             for blk in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.25, 5).tolist())


def test_dropouts_act_in_training_only():
    model = uf.UniFormer(**TINY, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3)
    x = torch.randn(2, 3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("split", [False, True])
def test_gradient_checkpointing_same_gradients(split, assert_close):
    cfg = dict(TINY, split=split, drop_path_rate=0.2, drop_rate=0.1)
    plain = randomize(uf.UniFormer(**cfg))
    ckpt = uf.UniFormer(**cfg, checkpoint_num=(1, 1, 2, 1))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, 64, 64)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks; checkpointing replays the RNG state
        model.train()
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for (name, _), a, b in zip(plain.named_parameters(), *grads):
        assert_close(b, a, rtol=1e-5, name=name)


def test_reset_classifier():
    model = uf.UniFormer(**TINY).eval()
    model.reset_classifier(3)
    assert model.head.out_features == 3 and model.num_classes == 3
    assert torch.all(model.head.bias == 0)
    assert model(torch.randn(1, 3, 2, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 2, 32, 32)).shape == (1, 64)
    assert model.get_classifier() is model.head
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("x,err,match", [
    (torch.randn(3, 8, 64, 64), ValueError, r"5-D tensor of shape \(B, 3, T, H, W\)"),
    (torch.randn(1, 4, 8, 64, 64), ValueError, r"shape \(B, 3, T, H, W\) with H, W >= 32; got \(1, 4"),
    (torch.zeros(1, 3, 8, 64, 64, dtype=torch.uint8), TypeError, r"floating-point .*\(B, 3, T, H, W\)"),
    (torch.randn(1, 3, 8, 16, 64), ValueError, r"H, W >= 32; got \(1, 3, 8, 16, 64\)"),
    (torch.randn(1, 3, 0, 64, 64), ValueError, r"\(B, 3, T, H, W\)"),
    ([torch.randn(1, 3, 8, 64, 64)], TypeError, r"torch.Tensor of shape \(B, 3, T, H, W\)"),
])
def test_bad_input(x, err, match):
    with pytest.raises(err, match=match):
        uf.UniFormer(**TINY)(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=(1, 1, 1)), "depth must be 4 positive ints"),
    (dict(embed_dim=(16, 32, 64, 60)), "head_dim must be a positive int dividing"),
    (dict(checkpoint_num=(2, 0, 0, 0)), "checkpoint_num must be 4 ints"),
    (dict(drop_path_rate=1.0), "drop_path_rate must be a float in"),
    (dict(num_classes=-1), "num_classes must be an int >= 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        uf.UniFormer(**{**TINY, **kwargs})


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fuse_for_inference_keeps_outputs(dtype, rtol, assert_close):
    model = randomize(uf.UniFormer(**TINY)).to(dtype).eval()
    x = torch.randn(2, 3, 4, 64, 64, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        fused = model.fuse_for_inference()
        assert fused is model
        got = model(x)
    assert_close(got, expected, rtol=rtol)
    assert all(isinstance(b.norm1, torch.nn.Identity) and isinstance(b.norm2, torch.nn.Identity)
               for b in (*model.blocks1, *model.blocks2))
    assert not any(k.startswith("blocks1.0.norm1") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="fused for inference"):
        model.train()


@matrix(cover="pairs", fuse=(False, True), std=(False, True),
        **{"dtype,cpu_has_it": [pytest.param(d, has, id=f"{str(d)[6:]}-{'native' if has else 'emulated'}")
                                for d, has in [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
                                               (torch.float16, True), (torch.float16, False)]]})
def test_cpu_inference_path_matches_official(dtype, cpu_has_it, std, fuse, cpu_native_dtypes, assert_close):
    # The CPU serving path: "auto" (oneDNN matmuls, C++ depthwise convolutions and attention, the
    # chunked MLP), the patch embeddings on oneDNN (its convolution, or matmuls over gathered
    # patches), in float32 or under CPU autocast: in the autocast dtype where the CPU has
    # instructions for it, else computed in float32. ATen's slow direct 3-D convolution never runs.
    cpu_native_dtypes(*([dtype] if cpu_has_it else []))
    torch.manual_seed(2)
    cfg = dict(TINY, std=std)
    model = randomize(uf.UniFormer(**cfg)).eval()
    official = OfficialUniFormer(**cfg).double().eval()
    official.load_state_dict(model.state_dict(), strict=True)
    if fuse:
        model.fuse_for_inference()
    conv_calls, block_dtypes = [], set()
    for embed, blocks in model.stages():
        embed.proj.register_forward_hook(lambda *args: conv_calls.append(args[0]))
        for blk in blocks:
            blk.register_forward_hook(lambda m, i, out: block_dtypes.add(out.dtype))
    x = torch.randn(2, 3, 5, 64, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
            torch.profiler.profile() as prof:
        y = model(x)
        model(x[:1])  # batch 1: where ATen's heuristics pick its slow direct convolution
    ran = {e.key for e in prof.key_averages()}
    assert y.dtype == dtype and not any(k.startswith("aten::slow_conv3d") for k in ran), ran
    assert len(conv_calls) in (0, 2)  # the stem on oneDNN's convolution (both calls), or all matmuls
    conv_calls.clear()
    assert block_dtypes == {dtype if cpu_has_it else torch.float32}
    with torch.no_grad():
        expected = official(x.double())
    assert_close(y, expected, dtype=dtype, name="logits")
    with torch.no_grad(), uf.ops.use_backend("reference"):  # the official computation: Conv3d
        model(x)
    assert len(conv_calls) == 4


def test_fuse_for_inference_needs_eval_mode():
    with pytest.raises(RuntimeError, match="needs eval mode"):
        uf.UniFormer(**TINY).fuse_for_inference()


# forward_intermediates: the stage outputs for detection / localisation heads.

def official_stages(official, x):
    """The official model's four stage outputs, by a loop over its modules (it exposes no stages)."""
    outs = []
    for i in range(4):
        x = getattr(official, f"patch_embed{i + 1}")(x)
        if i == 0:
            x = official.pos_drop(x)
        for blk in getattr(official, f"blocks{i + 1}"):
            x = blk(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("std", [False, True])
def test_forward_intermediates_shapes_and_order(std):
    model = randomize(uf.UniFormer(**TINY, std=std)).eval()
    outputs = []
    for blocks in (model.blocks1, model.blocks2, model.blocks3, model.blocks4):
        blocks[-1].register_forward_hook(lambda m, i, out: outputs.append(out))
    x = torch.randn(2, 3, 5, 64, 96)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        assert all(f is out for f, out in zip(feats, outputs))  # each stage's own output, no copy
        assert [tuple(f.shape) for f in feats] == [(2, 16, 3, 16, 24), (2, 32, 3, 8, 12), (2, 64, 3, 4, 6),
                                                    (2, 64, 3, 2, 3)]
        assert all(f.is_contiguous(memory_format=torch.channels_last_3d) for f in feats)
        picked = model.forward_intermediates(x, [2, 0, 3])
        negative = model.forward_intermediates(x, (-2, -4, -1))
    assert len(picked) == 3 and len(negative) == 3
    for a, b, i in zip(picked, negative, (2, 0, 3)):
        assert torch.equal(a, feats[i]) and torch.equal(b, feats[i])


@pytest.mark.parametrize("mode", ["inference", "no_grad_reference", "eval_grad", "train", "bf16_native",
                                  "bf16_emulated"])
def test_forward_intermediates_last_stage_is_forward_features(mode, cpu_native_dtypes):
    """Stage 3 with norm=True is forward_features(x), bitwise, on every path forward_features takes."""
    cfg = dict(TINY, drop_path_rate=0.2, checkpoint_num=(1, 0, 1, 1)) if mode == "train" else TINY
    model = randomize(uf.UniFormer(**cfg)).train(mode == "train")
    x = torch.randn(2, 3, 4, 64, 64)
    if mode.startswith("bf16"):
        cpu_native_dtypes(*([torch.bfloat16] if mode == "bf16_native" else []))
    ctx = {"inference": torch.inference_mode, "no_grad_reference": torch.no_grad,
           "bf16_native": torch.inference_mode, "bf16_emulated": torch.inference_mode}.get(mode, torch.enable_grad)
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    backend = "reference" if mode == "no_grad_reference" else "auto"
    results = []
    for fn in (model.forward_features, lambda x: model.forward_intermediates(x, (3,), norm=True)[0]):
        torch.manual_seed(5)  # the same drop-path masks in training mode
        with ctx(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), uf.ops.use_backend(backend):
            results.append(fn(x))
    expected, got = results
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)
    assert got.requires_grad == (mode in ("eval_grad", "train"))
    if mode.startswith("bf16"):  # every stage in the autocast dtype, computed in it only where native
        seen = set()
        for blocks in (model.blocks1, model.blocks2, model.blocks3, model.blocks4):
            blocks[0].register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
            assert [f.dtype for f in model.forward_intermediates(x)] == [dtype] * 4
        assert seen == {dtype if mode == "bf16_native" else torch.float32}
    with torch.no_grad():  # norm=False: the same map without the final BatchNorm
        raw = model.eval().forward_intermediates(x, (-1,))[0]
        assert torch.equal(model.norm(raw), model.forward_features(x))


@pytest.mark.parametrize("std,split,train", [(False, False, False), (True, False, False), (True, True, True)])
def test_forward_intermediates_match_official(std, split, train, assert_close):
    torch.manual_seed(3)
    cfg = dict(TINY, std=std, split=split)
    ours = randomize(uf.UniFormer(**cfg)).double().train(train)
    official = OfficialUniFormer(**cfg).double().train(train)
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 5, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = official_stages(official, x)
        assert_close(official.norm(expected[3]), official.forward_features(x), name="official loop")
    # Without autograd our patch embeddings run as matmuls (the CPU inference path), with it as Conv3d.
    with torch.enable_grad() if train else torch.no_grad():
        got = ours.forward_intermediates(x, (0, 1, 2, 3), norm=True)
    assert all(f.requires_grad == train for f in got)
    for i, (a, e) in enumerate(zip(got[:3], expected)):
        assert_close(a, e, name=f"stage {i}")
    assert_close(got[3], official.norm(expected[3]), name="stage 3 + norm")


def test_forward_intermediates_gradients_and_early_stop():
    model = randomize(uf.UniFormer(**TINY, checkpoint_num=(1, 0, 1, 0))).train()
    ran = []
    for name in ("patch_embed4", "blocks4", "norm", "head"):
        getattr(model, name).register_forward_pre_hook(lambda m, args, name=name: ran.append(name))
    x = torch.randn(2, 3, 4, 64, 64, requires_grad=True)
    feats = model.forward_intermediates(x, (2, 0), norm=True)  # norm: no effect without stage 3
    assert not ran, f"stages after the last requested one ran: {ran}"
    sum(f.sum() for f in feats).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        reached = name.startswith(("patch_embed1.", "patch_embed2.", "patch_embed3.", "blocks1.", "blocks2.",
                                   "blocks3."))
        if reached:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert model.blocks3[0].mlp.fc2.weight.grad.abs().sum() > 0  # through the checkpointed block


@pytest.mark.parametrize("stages,err", [
    ((), ValueError), ([], ValueError), ((4,), ValueError), ((0, -5), ValueError), ((1, 1), ValueError),
    ((3, -1), ValueError), (3, TypeError), ("0", TypeError), (None, TypeError), ((1.0,), TypeError),
    ((True,), TypeError), (("0",), TypeError), (torch.tensor([0, 1]), TypeError), ({0, 1}, TypeError),
])
def test_forward_intermediates_bad_stages(stages, err):
    model = uf.UniFormer(**TINY)
    with pytest.raises(err, match=r"stages must be a non-empty sequence of distinct stage indices in 0\.\.3"):
        model.forward_intermediates(torch.randn(1, 3, 2, 32, 32), stages)


def test_forward_intermediates_bad_arguments():
    model = uf.UniFormer(**TINY)
    with pytest.raises(TypeError, match="norm must be a bool"):
        model.forward_intermediates(torch.randn(1, 3, 2, 32, 32), norm=1)
    with pytest.raises(ValueError, match=r"shape \(B, 3, T, H, W\) with H, W >= 32; got \(1, 3, 2, 16, 32\)"):
        model.forward_intermediates(torch.randn(1, 3, 2, 16, 32))
    with pytest.raises(TypeError, match=r"torch.Tensor of shape"):
        model.forward_intermediates([torch.randn(1, 3, 2, 32, 32)])
