"""uniformer_fast.explain and `uniformer-fast explain`: Grad-CAM and attention rollout, checked
against closed forms and an independent rollout, on every backend here, and their files."""
import json

import pytest
import torch
import torch.nn.functional as F

import uniformer_fast as uf
from uniformer_fast import ops
from uniformer_fast.apps.explain import heat_colors, overlay
from uniformer_fast.data.video import VideoDecodeError, VideoReader
from uniformer_fast.model import SplitSABlock

from helpers import needs_cpp, needs_triton, run_cli
from test_cli import write_video

T, SIZE = 8, 64


def tiny(split=False, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = uf.create_model("uniformer_small", depth=(1, 1, 2, 2), num_classes=num_classes, split=split).eval()
    # Spread the attention logits, so the rollout is far from uniform and its errors would show.
    with torch.no_grad():
        for blk in (*model.blocks3, *model.blocks4):
            if hasattr(blk, "t_attn"):  # initialised to a constant map: uniform, symmetric attention
                blk.t_attn.qkv.weight.normal_(0.0, 0.05)
            for attn in (blk.attn, getattr(blk, "t_attn", None)):
                if attn is not None:
                    attn.qkv.weight.mul_(8.0)
        # Running statistics away from (0, 1), so Grad-CAM's use of the final norm is exercised.
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model


def frames(seed=1, t=T, h=72, w=88):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


def _resize01(m, shape):
    m = F.interpolate(m.double()[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    return (m - m.min()) / (m.max() - m.min())


def _clip(x):
    from uniformer_fast.data.video import to_views
    return to_views(x, SIZE, 1)[0][None]


def test_maps_shapes_ranges_and_prediction():
    model, x = tiny(), frames()
    e = uf.explain(model, x, num_frames=T, size=SIZE)
    assert set(e.maps) == {"gradcam", "rollout"}
    for m in e.maps.values():
        assert m.shape == (T, SIZE, SIZE) and m.dtype == torch.float32
        assert torch.isfinite(m).all() and m.min() == 0 and m.max() == 1
    assert e.frames.shape == (T, SIZE, SIZE, 3) and e.frames.dtype == torch.uint8
    with torch.no_grad():
        probs = model(_clip(x)).softmax(-1)[0]
    assert e.target == int(probs.argmax()) and e.target_name is None
    assert [i for i, _, _ in e.top] == probs.topk(5).indices.tolist()
    assert [p for _, _, p in e.top] == pytest.approx(probs.topk(5).values.tolist(), rel=1e-5)
    assert any("reference attention" in n for n in e.notes)
    assert not model.training


def test_a_training_model_is_explained_as_it_predicts_and_stays_in_training():
    model, x = tiny(), frames(6)
    ref = uf.explain(model, x, num_frames=T, size=SIZE)
    model.train()
    got = uf.explain(model, x, num_frames=T, size=SIZE)
    assert model.training and got.target == ref.target and got.top == ref.top
    for m in ref.maps:
        assert torch.equal(got.maps[m], ref.maps[m])


def test_gradcam_is_the_closed_form_cam():
    """With global pooling, d logit_k / d A is W[k, c] * gamma_c / sigma_c / N at every position,
    so Grad-CAM is relu(sum_c W[k, c] gamma_c / sigma_c A_c)."""
    model, x = tiny(), frames(2)
    with torch.no_grad():
        a = model.forward_intermediates(_clip(x), (3,))[0][0].double()
        bn = model.norm
        w = model.head.weight.double() * bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        cams = torch.einsum("kc,cthw->kthw", w, a).clamp_min(0)
    # A class whose map has contrast (with random weights some are all negative, hence all zero).
    target = int((cams.flatten(1).max(1).values - cams.flatten(1).min(1).values).argmax())
    e = uf.explain(model, x, num_frames=T, size=SIZE, target=target, methods=("gradcam",))
    assert e.target == target and set(e.maps) == {"gradcam"} and e.notes == []
    torch.testing.assert_close(e.gradcam.double(), _resize01(cams[target], (T, SIZE, SIZE)), rtol=0, atol=2e-5)


def _independent_rollout(model, x):
    """Attention rollout from the qkv each attention call receives (ops.attention, wrapped), in
    float64, composed with explicit loops over the tokens."""
    captured = []
    original = ops.attention

    def recording(qkv, num_heads, **kw):
        captured.append((qkv.detach().double(), num_heads, kw["scale"]))
        return original(qkv, num_heads, **kw)

    ops.attention = recording
    try:
        with torch.no_grad():
            grids = [tuple(f.shape[2:]) for f in model.forward_intermediates(_clip(x), (2, 3))]
    finally:
        ops.attention = original

    def probs(qkv, heads, scale):
        b, n, _ = qkv.shape
        q, k, _ = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        return ((q * scale) @ k.transpose(-1, -2)).softmax(-1).mean(1)  # (b, n, n)

    per_stage = [len(model.blocks3), len(model.blocks4)]
    products = []
    for stage, count in enumerate(per_stage):
        t, h, w = grids[stage]
        n, hw = t * h * w, h * w
        eye = torch.eye(n, dtype=torch.float64)
        r = eye
        for _ in range(count):
            if not isinstance(model.blocks3[0], SplitSABlock):
                m = 0.5 * probs(*captured.pop(0))[0] + 0.5 * eye
            else:  # temporal per position, then spatial per frame, as dense (N, N) over t * HW + p
                temporal, spatial = probs(*captured.pop(0)), probs(*captured.pop(0))
                t_full, s_full = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
                for p in range(hw):
                    for i in range(t):
                        for j in range(t):
                            t_full[i * hw + p, j * hw + p] = temporal[p, i, j]
                for f in range(t):
                    s_full[f * hw:(f + 1) * hw, f * hw:(f + 1) * hw] = spatial[f]
                m = 0.5 * eye + 0.5 * s_full @ (0.5 * eye + 0.5 * t_full)
            r = m @ r
        products.append(r)
    (t3, h3, w3), (t4, h4, w4) = grids
    v4 = products[1].mean(0)
    v3 = torch.empty(t3 * h3 * w3, dtype=torch.float64)
    for t in range(t3):
        for h in range(h3):
            for w in range(w3):
                covering = (t * t4 // t3) * h4 * w4 + (h * h4 // h3) * w4 + (w * w4 // w3)
                v3[(t * h3 + h) * w3 + w] = v4[covering]
    return (v3 @ products[0]).view(t3, h3, w3)


@pytest.mark.parametrize("backend, split", [("reference", False), pytest.param("cpp", False, marks=needs_cpp),
                                            ("auto", False), ("auto", True)])
def test_rollout_matches_an_independent_rollout_on_every_backend(backend, split):
    model, x = tiny(split=split), frames(3)
    with ops.use_backend(backend):
        e = uf.explain(model, x, num_frames=T, size=SIZE, methods=("rollout",))
        expected = _independent_rollout(model, x)
    assert expected.std() / expected.mean() > 1e-3  # not a flat map: the comparison means something
    torch.testing.assert_close(e.rollout.double(), _resize01(expected, (T, SIZE, SIZE)), rtol=0, atol=1e-4)
    assert f"backend {backend!r}" in e.notes[0]


@pytest.mark.slow
@needs_triton
def test_triton_backend_gives_the_reference_maps():
    model, x = tiny(), frames(4)
    with ops.use_backend("reference"):
        ref = uf.explain(model, x, num_frames=T, size=SIZE)
    with ops.use_backend("triton"):
        got = uf.explain(model, x, num_frames=T, size=SIZE)
    assert got.target == ref.target
    for m in ref.maps:
        torch.testing.assert_close(got.maps[m], ref.maps[m], rtol=0, atol=1e-3)


def test_split_attention_rollout():
    """Divided attention: a block is 0.5 I + 0.5 S (0.5 I + 0.5 T); with the temporal step made
    exactly uniform per position the map must still be a proper, finite distribution."""
    model, x = tiny(split=True), frames(5)
    e = uf.explain(model, x, num_frames=T, size=SIZE)
    assert e.rollout.shape == (T, SIZE, SIZE) and torch.isfinite(e.rollout).all()
    # Identity attention everywhere (q = k = 0 gives uniform P; uniform over the same tokens for
    # every query makes every token equally important): a constant map, all zeros once rescaled.
    with torch.no_grad():
        for blk in (*model.blocks3, *model.blocks4):
            for attn in (blk.attn, blk.t_attn):
                attn.qkv.weight.zero_()
                attn.qkv.bias.zero_()
    flat = uf.explain(model, x, num_frames=T, size=SIZE, methods=("rollout",))
    assert flat.rollout.abs().max() == 0


def test_a_video_file_and_the_clip_the_model_saw(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, frames=20, h=48, w=64)
    model = tiny()
    e = uf.explain(model, str(path), num_frames=4, sample_rate=3, size=32)
    with VideoReader(str(path)) as r:
        from uniformer_fast.data.video import dense_indices
        assert e.frame_indices == dense_indices(len(r), 4, 3).tolist()
        assert e.fps == pytest.approx(r.fps / 3)
    assert e.frames.shape == (4, 32, 32, 3)
    with torch.no_grad():
        from uniformer_fast.data.video import load_clip
        probs = model(load_clip(str(path), 4, 3, 32)[None]).softmax(-1)[0]
    assert e.target == int(probs.argmax())


def test_names_and_targets_by_name():
    model = tiny(num_classes=174)
    model.class_names = uf.class_names("sthv2")
    e = uf.explain(model, frames(), num_frames=T, size=SIZE, target="Closing something", methods=("gradcam",))
    assert e.target == uf.class_names("sthv2").index("Closing something") and e.target_name == "Closing something"
    assert all(name == model.class_names[i] for i, name, _ in e.top)


def test_save_writes_videos_frames_montage_and_json(tmp_path):
    e = uf.explain(tiny(), frames(), num_frames=T, size=SIZE)
    out = tmp_path / "out"
    written = e.save(out, video_format="mp4", fps=5)
    from PIL import Image
    for method in ("gradcam", "rollout"):
        with VideoReader(written[method]) as r:
            assert len(r) == T and r.get_frames([0]).shape == (1, SIZE, SIZE, 3)
            assert r.fps == pytest.approx(5)
        pngs = sorted((out / method).glob("frame_*.png"))
        assert len(pngs) == T and Image.open(pngs[0]).size == (SIZE, SIZE)
        # The PNG is the overlay itself, exactly.
        assert torch.equal(torch.from_numpy(__import__("numpy").array(Image.open(pngs[2]))), e.overlay(method)[2])
    montage = Image.open(written["montage"])
    assert montage.size == (8 * SIZE + 7 * 2, 2 * SIZE + 2)
    meta = json.loads((out / "explanation.json").read_text())
    assert meta["target"] == e.target and len(meta["top"]) == 5 and meta["methods"] == ["gradcam", "rollout"]
    gif = e.save(tmp_path / "gif", video_format="gif")["rollout"]
    with Image.open(gif) as im:
        assert im.n_frames == T


def test_heat_colors_and_overlay():
    ramp = heat_colors(torch.tensor([0.0, 0.5, 1.0]))
    assert ramp[0, 2] > 100 and ramp[0, 0] == 0  # blue at 0
    assert ramp[1, 1] == 255  # green at the middle
    assert ramp[2, 0] > 100 and ramp[2, 2] == 0  # red at 1
    f = torch.full((1, 2, 2, 3), 100, dtype=torch.uint8)
    assert torch.equal(overlay(f, torch.zeros(1, 2, 2), alpha=0.0), f)
    with pytest.raises(ValueError, match="alpha"):
        overlay(f, torch.zeros(1, 2, 2), alpha=2)
    with pytest.raises(ValueError, match="heat: expected shape"):
        overlay(f, torch.zeros(2, 2))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target=10), ValueError, r"target: expected a class index in \[0, 9\]"),
    (dict(target=-1), ValueError, "target"),
    (dict(target=True), ValueError, "target"),
    (dict(target="dancing"), ValueError, "has no class names"),
    (dict(methods=("gradcam", "saliency")), ValueError, "methods: expected"),
    (dict(methods=()), ValueError, "methods"),
    (dict(methods="gradcam"), ValueError, "methods"),
    (dict(num_frames=0), ValueError, "num_frames"),
    (dict(class_names=["a"]), ValueError, "class_names: 1 names for a model of 10"),
    (dict(precision="fp8"), ValueError, "precision"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(num_frames=T, size=SIZE)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        uf.explain(tiny(), frames(), **args)


def test_bad_models_and_videos(tmp_path):
    with pytest.raises(TypeError, match="model: expected a uniformer_fast.UniFormer"):
        uf.explain(torch.nn.Linear(2, 2), frames())
    with pytest.raises(ValueError, match="no classifier head"):
        uf.explain(tiny(num_classes=0), frames(), num_frames=T, size=SIZE)
    with pytest.raises(ValueError, match="uint8 frames"):
        uf.explain(tiny(), frames().float(), num_frames=T, size=SIZE)
    with pytest.raises(ValueError, match="3 frames given for num_frames=8"):
        uf.explain(tiny(), frames(t=3), num_frames=T, size=SIZE)
    with pytest.raises(TypeError, match="video: expected a video file path"):
        uf.explain(tiny(), 42)
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoDecodeError, match="cannot decode"):
        uf.explain(tiny(), str(bad), num_frames=T, size=SIZE)
    with pytest.raises(FileNotFoundError):
        uf.explain(tiny(), str(tmp_path / "missing.mp4"))
    e = uf.explain(tiny(), frames(), num_frames=T, size=SIZE, methods=("gradcam",))
    with pytest.raises(ValueError, match="exists and is not a directory"):
        e.save(bad)
    with pytest.raises(ValueError, match="video_format"):
        e.save(tmp_path / "x", video_format="avi")
    with pytest.raises(ValueError, match="this explanation has gradcam"):
        e.overlay("rollout")


@pytest.fixture
def k400_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "uniformer_small_k400_8x8.pth"
    torch.save({"model": uf.uniformer_small().state_dict()}, path)
    return path


def test_cli_explain(tmp_path, k400_weights, capsys):
    video = tmp_path / "clip.mp4"
    write_video(video, frames=16)
    out = tmp_path / "heat"
    code, stdout, err = run_cli(["explain", str(video), "--weights", str(k400_weights), "--out", str(out),
                                 "--frames", "4", "--sample-rate", "2", "--size", "64", "--device", "cpu",
                                 "--format", "gif", "--target", "zumba"], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    k400 = set(uf.class_names("k400"))
    assert len(lines) == 6 and all(line.split(None, 1)[1] in k400 for line in lines[:5])
    assert lines[5].startswith("explained zumba (gradcam, rollout)") and "reference attention" in err
    assert (out / "gradcam.gif").is_file() and (out / "rollout.gif").is_file() and (out / "montage.png").is_file()
    assert len(list((out / "rollout").glob("*.png"))) == 4
    assert json.loads((out / "explanation.json").read_text())["target_name"] == "zumba"


def test_cli_explain_errors(tmp_path, k400_weights, capsys):
    video = tmp_path / "clip.mp4"
    write_video(video, frames=8)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    base = ["--frames", "4", "--size", "32", "--device", "cpu"]
    cases = [
        ([str(video), "--out", str(tmp_path / "o")], 2, "one of the arguments --weights --pretrained is required"),
        ([str(video), "--weights", str(k400_weights)], 2, "required: --out"),
        ([str(video), "--weights", str(k400_weights), "--out", "o", "--methods", "cam"], 2, "--methods: expected"),
        ([str(video), "--weights", str(k400_weights), "--out", "o", "--format", "avi"], 2, "invalid choice"),
        ([str(tmp_path / "none.mp4"), "--weights", str(k400_weights), "--out", str(tmp_path / "o")], 1,
         "video file not found"),
        ([str(junk), "--weights", str(k400_weights), "--out", str(tmp_path / "o")], 1, "cannot decode"),
        ([str(video), "--weights", str(k400_weights), "--out", str(junk)], 1, "exists and is not a directory"),
        ([str(video), "--weights", str(k400_weights), "--out", str(tmp_path / "o"), "--target", "flying"], 1,
         "'flying' is not one of the model's 400 class names"),
        ([str(video), "--weights", str(k400_weights), "--out", str(tmp_path / "o"), "--target", "400"], 1,
         r"target: expected a class index in [0, 399]"),
    ]
    for args, code, match in cases:
        got, _, err = run_cli(["explain", *args, *base], capsys)
        assert got == code and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, \
            (args, err)
