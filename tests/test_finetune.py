"""Fine-tuning with the official recipe (``python -m uniformer_fast.train``) on generated labelled
videos: the data lists, the training samplers and clips, overfitting a tiny model, validation,
resuming bit for bit, bad videos and labels."""
import csv
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.data.lists import VideoItem
from uniformer_fast.apps.train import main as train_main, param_groups, warmup_cosine
from uniformer_fast.data.training import EpochSampler, TrainClips, TrainRecipe, find_training_videos
from uniformer_fast.data.video import random_dense_indices, random_segment_indices

av = pytest.importorskip("av")
from helpers import TINY, free_port, write_id_video  # noqa: E402
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))  # one class each


def _picture(colour, seed):
    """A frame maker: a tinted background with a square moving across, different per video."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(colour, dtype=torch.float32) * (0.7 + 0.3 * torch.rand((), generator=g))
    speed = 1 + int(torch.randint(3, (), generator=g))

    def picture(i, h, w):
        img = base.expand(h, w, 3).clone()
        x = (i * speed) % (w - 8)
        img[h // 3:h // 3 + 8, x:x + 8] = 255 - base
        return img.round().clamp(0, 255).to(torch.uint8)
    return picture


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 classes x 4 videos (24 frames, 40x56) as a folder tree, plus train.csv / val.txt lists."""
    root = tmp_path_factory.mktemp("videos")
    rows = []
    for c, colour in enumerate(COLOURS):
        (root / f"class{c}").mkdir()
        for v in range(4):
            rel = f"class{c}/v{v}.mp4"
            write_id_video(root / rel, 24, 40, 56, gop=6, picture=_picture(colour, 10 * c + v))
            rows.append((rel, c))
    (root / "train.csv").write_text("".join(f"{p},{c}\n" for p, c in rows))
    (root / "val.txt").write_text("".join(f"{p} {c}\n" for p, c in rows[::2]))
    return root


@pytest.fixture
def tiny_small(monkeypatch):
    """--model uniformer_small builds the TINY configuration."""
    monkeypatch.setattr(uf.model, "_CONFIGS", {**uf.model._CONFIGS, "uniformer_small": TINY})


BASE = ["--frames", "4", "--sample-rate", "2", "--size", "32", "--no-progress", "--device", "cpu", "--workers", "0"]
PLAIN = ["--rand-augment", "none", "--erase-prob", "0", "--mixup", "0", "--cutmix", "0", "--label-smoothing", "0",
         "--drop-path", "0"]


def _metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Samplers, data and schedule

@pytest.mark.parametrize("total", [1, 7, 31, 32, 33, 300])
@pytest.mark.parametrize("num_frames,sample_rate", [(8, 4), (16, 4), (4, 1), (3, 5)])
def test_random_dense_indices_are_the_official_random_clip(total, num_frames, sample_rate):
    clip = num_frames * sample_rate
    for seed in range(5):
        rng = random.Random(seed)
        idx = random_dense_indices(total, num_frames, sample_rate, random.Random(seed))
        start = rng.uniform(0, max(total - clip, 0))  # the official get_start_end_idx(clip_idx=-1)
        ref = torch.linspace(start, start + clip - 1, num_frames).clamp(0, total - 1).long()
        assert torch.equal(idx, ref) and idx.dtype == torch.long
        assert idx.min() >= 0 and idx.max() <= total - 1 and (idx.diff() >= 0).all()
    starts = {int(random_dense_indices(300, 8, 4, random.Random(s))[0]) for s in range(50)}
    assert len(starts) > 20  # the start is random across the video


@pytest.mark.parametrize("total,num_frames", [(1, 4), (5, 8), (16, 16), (47, 8), (300, 16)])
def test_random_segment_indices_draw_one_frame_per_segment(total, num_frames):
    seg = (total - 1) / num_frames
    seen = set()
    for seed in range(20):
        idx = random_segment_indices(total, num_frames, random.Random(seed))
        assert idx.shape == (num_frames,) and idx.min() >= 0 and idx.max() <= total - 1
        for i, f in enumerate(idx.tolist()):
            assert round(seg * i) <= f <= round(seg * (i + 1))
        seen.add(tuple(idx.tolist()))
    assert len(seen) > 1 or total <= num_frames // 2 + 1


@pytest.mark.parametrize("length,world,batch", [(10, 1, 3), (10, 3, 2), (7, 2, 1), (4, 4, 1)])
def test_epoch_sampler_shards_cover_the_data_and_resume(length, world, batch):
    shards = [EpochSampler(length, world=world, rank=r, seed=3) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    got = [list(s) for s in shards]
    assert all(len(g) == len(shards[0]) == -(-length // world) for g in got)
    assert {i for g in got for _, i in g} == set(range(length)) and all(e == 2 for g in got for e, _ in g)
    assert got == [list(s) for s in shards]  # deterministic
    shards[0].set_epoch(3)
    assert list(shards[0]) != got[0] or length <= world  # a new order each epoch
    shards[0].set_epoch(2, start=batch)
    assert list(shards[0]) == got[0][batch:] and len(shards[0]) == len(got[0]) - batch


def test_train_clips_are_deterministic_and_the_same_on_every_frame(tmp_path):
    """The full recipe on a video whose frames are all alike gives a clip whose frames are all
    alike (every augmentation the same on each frame); the same (seed, epoch, index) gives the
    same clip, another epoch another one."""
    still = lambda i, h, w: _picture((200, 120, 40), 1)(0, h, w)  # noqa: E731
    path = write_id_video(tmp_path / "still.mp4", 20, 48, 64, codec="mpeg4", picture=still)
    items = [VideoItem("still.mp4", path, 0)]
    recipe = TrainRecipe(num_frames=6, sample_rate=2, size=32, erase_prob=1.0, num_sample=3)
    ds = TrainClips(items, recipe, seed=5)
    clips, labels, failures = ds[(0, 0)]
    assert clips.shape == (3, 3, 6, 32, 32) and clips.dtype == torch.float32 and labels.tolist() == [0, 0, 0]
    assert failures == [] and torch.isfinite(clips).all()
    for clip in clips:
        assert (clip - clip[:, :1]).abs().max() < 0.1, "frames of one clip were augmented differently"
    assert not torch.equal(clips[0], clips[1])  # num_sample draws different augmentations
    again, _, _ = TrainClips(items, recipe, seed=5)[(0, 0)]
    assert torch.equal(again, clips)
    assert not torch.equal(ds[(1, 0)][0], clips)


def test_load_clip_and_preprocess_train_through_the_recipe(videos):
    """The public one-clip helpers train with the same recipe as TrainClips: seeded, they give
    the clip TrainClips' augmentation gives for the same frames and draws."""
    from uniformer_fast.data.training import augment_clip, load_clip, preprocess
    from uniformer_fast.data.video import VideoReader
    path = str(videos / "class1" / "v2.mp4")
    a = load_clip(path, 4, 2, 32, train=True, rng=random.Random(3))
    assert a.shape == (3, 4, 32, 32) and torch.equal(a, load_clip(path, 4, 2, 32, train=True, rng=random.Random(3)))
    rng = random.Random(3)
    with VideoReader(path) as reader:
        frames = reader.get_frames(random_dense_indices(len(reader), 4, 2, rng))
    assert torch.equal(a, augment_clip(frames, rng, TrainRecipe(4, 2, 32)))
    b = preprocess(frames, 32, train=True, rng=random.Random(1))
    assert b.shape == (3, 4, 32, 32) and torch.equal(b, preprocess(frames, 32, train=True, rng=random.Random(1)))
    recipe = TrainRecipe(4, 1, 32, crop="jitter", rand_augment=None, erase_prob=0.0)
    assert torch.equal(b, augment_clip(frames, random.Random(1), recipe))


def test_training_lists_and_folders(videos, tmp_path):
    items, names = find_training_videos(videos / "train.csv")
    assert len(items) == 12 and names is None and items[0] == VideoItem("class0/v0.mp4", str(videos / "class0/v0.mp4"), 0)
    folder = tmp_path / "tree"
    shutil.copytree(videos, folder, ignore=shutil.ignore_patterns("*.csv", "*.txt"))
    items, names = find_training_videos(folder)
    assert names == ["class0", "class1", "class2"] and sorted({i.label for i in items}) == [0, 1, 2]
    items, names = find_training_videos(folder, class_names=["class2", "class1", "class0", "other"])
    assert names[0] == "class2" and {i.label for i in items if i.key.startswith("class0")} == {2}
    with pytest.raises(ValueError, match="folder 'class2' is not a class of the label map"):
        find_training_videos(folder, class_names=["class0", "class1"])


def test_warmup_cosine_and_param_groups():
    f = warmup_cosine(total_steps=10, warmup_steps=2, base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-5)
    lrs = [f(s) * 1e-3 for s in range(11)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx((1e-5 + 1e-3) / 2)
    assert lrs[2] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-5)
    assert lrs[6] == pytest.approx((1e-3 + 1e-5) / 2) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    model = uf.UniFormer(**TINY, num_classes=3)
    model.no_weight_decay = lambda: {"patch_embed1.proj.weight"}
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and "head.weight" in {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"patch_embed1.proj.weight", "head.bias", "norm.weight", "blocks1.0.norm1.weight"} <= skipped


# ---------------------------------------------------------------------------------------------
# Whole runs

def test_tiny_model_overfits_and_is_validated(videos, tmp_path, tiny_small, capsys):
    """Training accuracy reaches 100% on the generated classes; the evaluator scores the
    validation list every epoch; best.pth holds the best weights and loads as a model."""
    out = tmp_path / "run"
    code = train_main(BASE + PLAIN + ["--data", str(videos / "train.csv"), "--val", str(videos / "val.txt"),
                                      "--epochs", "12", "--batch-size", "4", "--lr", "3e-3", "--warmup-epochs", "1",
                                      "--weight-decay", "0", "--output", str(out), "--eval-every", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = _metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert float(rows[-1]["train_top1"]) == 1.0, [r["train_top1"] for r in rows]
    validated = [r for r in rows if r["val_top1"]]
    assert [int(r["epoch"]) for r in validated] == [4, 8, 12] and all(r["val_videos"] == "6" for r in validated)
    assert float(validated[-1]["val_top1"]) == 1.0
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["metrics"]["val_top1"] == max(float(r["val_top1"]) for r in validated)
    model = uf.UniFormer(**TINY, num_classes=3)
    uf.load_checkpoint(model, out / "best.pth")
    result = uf.evaluate(model, str(videos / "val.txt"), root=str(videos), num_frames=4, sample_rate=2, views=1, size=32,
                         workers=0, progress=False)
    assert result.top1 == best["metrics"]["val_top1"]
    assert "best val top-1" in err
    if importlib.util.find_spec("tensorboard") is not None:  # the [train] and [test] extras bring it
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert {"train/loss", "train/lr", "epoch/train_top1", "val/val_top1"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("val/val_top1")] == [12, 24, 36]  # 3 steps per epoch
        assert events.Scalars("val/val_top1")[-1].value == float(validated[-1]["val_top1"])


FULL = ["--eval-every", "1", "--accum-steps", "2", "--clip-grad", "1.0", "--ema-decay", "0.9", "--num-sample", "2",
        "--batch-size", "2", "--epochs", "2", "--save-every", "1", "--warmup-steps", "1", "--lr", "1e-3"]


def test_resume_mid_epoch_is_bitwise(videos, tmp_path, tiny_small, monkeypatch):
    """The whole recipe (RandAugment, erasing, mixup/cutmix, drop path, accumulation, clipping,
    EMA, a decoding worker) stopped by Ctrl-C in the middle of an epoch and resumed ends with the
    parameters, EMA and optimizer state of an uninterrupted run, bit for bit."""
    args = BASE + FULL + ["--data", str(videos / "train.csv"), "--workers", "1", "--drop-path", "0.2",
                          "--freeze-stages", "1"]
    assert train_main(args + ["--output", str(tmp_path / "whole")]) == 0
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    assert whole["steps_per_epoch"] == 3 and whole["step"] == 3 and whole["epoch"] == 1

    real_step, calls = torch.optim.AdamW.step, []

    def interrupted_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:  # in the second epoch, after step 4's checkpoint
            raise KeyboardInterrupt
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
    assert train_main(args + ["--output", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    cut = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert (cut["epoch"], cut["step"], cut["global_step"]) == (1, 1, 4)
    assert train_main(args + ["--output", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "last.pth")]) == 0
    resumed = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    for part in ("model", "ema"):
        for k, v in whole[part].items():
            assert torch.equal(resumed[part][k], v), f"{part} {k} differs after resuming"
    for k, v in whole["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][k][n], t) for n, t in v.items())
    rows, whole_rows = _metrics(tmp_path / "cut" / "metrics.csv"), _metrics(tmp_path / "whole" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # each epoch once
    for key in ("train_loss", "train_top1"):  # the resumed epoch's totals include its first part
        assert [r[key] for r in rows] == [r[key] for r in whole_rows]
    assert [r["val_top1"] for r in rows] == [""] * 2  # no --val
    # The frozen first stage kept its initial weights and BatchNorm statistics.
    torch.manual_seed(0)  # --seed 0: the run's initial weights
    init = uf.create_model("uniformer_small", num_classes=3, drop_path_rate=0.2)
    for k, v in init.state_dict().items():
        if k.startswith(("patch_embed1.", "blocks1.")):
            assert torch.equal(whole["model"][k], v), k


def _torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "uniformer_fast.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow  # two torchrun processes training and validating: ~20 s each (test_train.py has a quick one)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_validate_and_resume_within_tolerance(videos, tmp_path, assert_close, mode):
    """Two gloo processes (DDP, or FSDP2, which validates with a gathered copy), each reading its
    share: validation reduced over both (all 6 videos scored once); under DDP, a run resumed from
    its epoch-1 checkpoint ends where the whole run ends."""
    # The children build the real UniFormer-S (a monkeypatch does not reach them): at 4x32x32 a
    # step is still short.
    args = ["--model", "uniformer_small", *BASE, "--data", str(videos / "train.csv"), "--val", str(videos / "val.txt"),
            "--batch-size", "2", "--epochs", "2", "--drop-path", "0.1"] + (["--fsdp"] if mode == "fsdp" else [])
    err = _torchrun(args + ["--output", str(tmp_path / "whole"), "--keep-every", "1"])
    assert "val top-1" in err
    rows = _metrics(tmp_path / "whole" / "metrics.csv")
    assert [r["val_videos"] for r in rows] == ["6", "6"]
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    assert len(whole["rng"]) == 2
    if mode == "fsdp":  # resuming is the same code for both; once is enough for the suite's time
        return
    _torchrun(args + ["--output", str(tmp_path / "resumed"), "--resume",
                                 str(tmp_path / "whole" / "epoch001.pth")])
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    for k, v in whole["model"].items():
        if v.is_floating_point():
            assert_close(resumed["model"][k], v, rtol=1e-5, name=k)
        else:
            assert torch.equal(resumed["model"][k], v), k


def test_bad_videos_are_replaced_counted_and_reported(videos, tmp_path, tiny_small, capsys):
    lst = tmp_path / "list.csv"
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    lines = (videos / "train.csv").read_text().splitlines()[:5]
    lst.write_text("\n".join([f"{videos}/{line}" for line in lines] + [f"{tmp_path}/broken.mp4,1",
                                                                        f"{tmp_path}/missing.mp4,2"]) + "\n")
    code = train_main(BASE + PLAIN + ["--data", str(lst), "--batch-size", "7", "--epochs", "2",
                                      "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("unreadable video replaced by another: " + str(tmp_path / "broken.mp4")) == 1, err
    assert err.count("unreadable video replaced by another: " + str(tmp_path / "missing.mp4")) == 1, err
    # Each epoch meets both; a replacement drawn at random can be a bad video again.
    replaced = re.search(r"2 unreadable video\(s\) replaced (\d+) time\(s\)", err)
    assert replaced and int(replaced.group(1)) >= 4, err
    assert [r["unreadable"] for r in _metrics(tmp_path / "run" / "metrics.csv")] == ["2", "2"]


@pytest.mark.parametrize("extra,match", [
    (["--num-classes", "2"], "class2/v0.mp4 has label 2, outside the 2 classes [0, 1]"),
    (["--label-map", "{tmp}/two.txt"], "class2/v0.mp4 has label 2, outside the 2 classes [0, 1]"),
    (["--rand-augment", "rand-x"], "--rand-augment: "),
    (["--mixup", "0.8", "--batch-size", "1"], "--batch-size x --num-sample must be >= 2"),
    (["--val", "{tmp}/nowhere.txt"], "--val: no such list file or folder"),
    (["--pretrained", "{tmp}/missing.pth"], "--pretrained: file not found"),
    (["--ema-decay", "0.9", "--fsdp"], "--ema-decay with --fsdp"),
])
def test_mistakes_are_one_line_before_training(videos, tmp_path, tiny_small, capsys, extra, match):
    (tmp_path / "two.txt").write_text("a\nb\n")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code = train_main(BASE + ["--data", str(videos / "train.csv"), "--output", str(tmp_path / "run")] + extra)
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "run").exists()


def test_pretrained_checkpoint_gets_a_new_head(videos, tmp_path, tiny_small, capsys):
    """Fine-tuning from a checkpoint of another class count: its body is loaded, its head replaced
    by one for the user's classes; frozen stages stay as loaded."""
    torch.manual_seed(7)
    source = uf.UniFormer(**TINY, num_classes=5)
    torch.save({"model": source.state_dict()}, tmp_path / "pre.pth")
    code = train_main(BASE + PLAIN + ["--data", str(videos / "train.csv"), "--pretrained", str(tmp_path / "pre.pth"),
                                      "--freeze-stages", "2", "--batch-size", "4", "--output", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    got = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    assert got["head.weight"].shape == (3, 64)
    for k, v in source.state_dict().items():
        if k.startswith(("patch_embed1.", "blocks1.", "patch_embed2.", "blocks2.")):
            assert torch.equal(got[k], v), k
    assert not torch.equal(got["blocks3.0.attn.qkv.weight"], source.state_dict()["blocks3.0.attn.qkv.weight"])
