"""Training clips: what one DataLoader worker spends per clip of the official recipe.

Rows of one group (the same videos and clip keys, one process, the CPU):

- ``decode``: the training sampler's frames decoded, nothing else: the floor of every other row.
- ``plain``: :class:`~uniformer_fast.data.training.TrainClips` without RandAugment and erasing
  (decode, normalise, random resized crop, flip).
- ``recipe-pil``: the baseline, the official way to RandAugment a clip: every frame turned into a
  PIL image, the clip's ops applied to each with PIL, back to a tensor; then the same crop, flip
  and erasing as ``recipe``.
- ``recipe``: :class:`~uniformer_fast.data.training.TrainClips` with the whole recipe (RandAugment
  ``rand-m7-n4-mstd0.5-inc1`` on all frames at once, random erasing 0.25).

A call makes ``CLIPS`` clips (a fixed list of (epoch, video) keys, so every row draws the same
ops and boxes); ``extra_info["clips_per_s"]`` is per worker. The work counted is the decoded
frames read and the float clip written.

Sizes: 2 videos of 48 frames at 340x256, 4x2 clips at 64 px (the small preset); with
$UNIFORMER_FAST_BENCH_CPU=full 4 videos of 300 frames at 340x256 (Kinetics' usual short side),
16x4 clips at 224 px.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from uniformer_fast.data.augment import RandAugment
from uniformer_fast.data.lists import VideoItem
from uniformer_fast.data.training import ClipAugmenter, TrainClips, TrainRecipe
from uniformer_fast.data.video import VideoReader, train_indices

from . import floors
from .harness import CPU_PRESET, run, write_camera_video

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")
ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
ImageOps = pytest.importorskip("PIL.ImageOps")

FULL = CPU_PRESET == "full"
NUM_VIDEOS, VIDEO_FRAMES, HEIGHT, WIDTH = (4, 300, 256, 340) if FULL else (2, 48, 256, 340)
FRAMES, SAMPLE_RATE, SIZE = (16, 4, 224) if FULL else (4, 2, 64)
CLIPS = 8 if FULL else 4
ROWS = ["decode", "plain", "recipe-pil", "recipe"]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-videos")
    return [VideoItem(f"v{k}.mp4", write_camera_video(root / f"v{k}.mp4", VIDEO_FRAMES, HEIGHT, WIDTH), k)
            for k in range(NUM_VIDEOS)]


def _pil_affine(data):
    def op(img, arg):
        return img.transform(img.size, Image.AFFINE, data(arg, *img.size), resample=Image.BICUBIC,
                             fillcolor=(128, 128, 128))
    return op


# The official RandAugment's PIL calls, by op name (its arguments are RandAugment.sample()'s).
PIL_OPS = {
    "AutoContrast": lambda img: ImageOps.autocontrast(img),
    "Equalize": lambda img: ImageOps.equalize(img),
    "Invert": lambda img: ImageOps.invert(img),
    "Rotate": lambda img, deg: img.rotate(deg, resample=Image.BICUBIC, fillcolor=(128, 128, 128)),
    "ShearX": _pil_affine(lambda f, w, h: (1, f, 0, 0, 1, 0)),
    "ShearY": _pil_affine(lambda f, w, h: (1, 0, 0, f, 1, 0)),
    "TranslateXRel": _pil_affine(lambda p, w, h: (1, 0, p * w, 0, 1, 0)),
    "TranslateYRel": _pil_affine(lambda p, w, h: (1, 0, 0, 0, 1, p * h)),
    "SolarizeAdd": lambda img, add: img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3),
}
for _name in ("Posterize", "PosterizeIncreasing"):
    # Pillow >= 10 refuses 0 bits; the official runs' Pillow made the frame black.
    PIL_OPS[_name] = lambda img, bits: (img if bits >= 8 else ImageOps.posterize(img, bits) if bits > 0
                                        else Image.new("RGB", img.size))
for _name in ("Solarize", "SolarizeIncreasing"):
    PIL_OPS[_name] = lambda img, thresh: ImageOps.solarize(img, thresh)
for _enhance in ("Color", "Contrast", "Brightness", "Sharpness"):
    for _name in (_enhance, _enhance + "Increasing"):
        PIL_OPS[_name] = (lambda cls: lambda img, f: cls(img).enhance(f))(getattr(ImageEnhance, _enhance))


class _PilAugmenter(ClipAugmenter):
    """The recipe with RandAugment done the official way: per frame, through PIL images."""

    def __call__(self, frames, rng):
        ops = self.rand_augment.sample(rng)
        out = []
        for f in frames.numpy():
            img = Image.fromarray(f)
            for name, args in ops:
                img = PIL_OPS[name](img, *args)
            out.append(torch.from_numpy(np.array(img)))  # a copy, as ToTensor makes
        self_ra, self.rand_augment = self.rand_augment, None  # the rest of the recipe, unchanged
        try:
            return super().__call__(torch.stack(out), rng)
        finally:
            self.rand_augment = self_ra


@pytest.mark.parametrize("row", ROWS)
def test_train_clip_throughput(benchmark, row, items):
    benchmark.group = (f"train clips | {NUM_VIDEOS} videos {WIDTH}x{HEIGHT}, {FRAMES}x{SAMPLE_RATE} clips at {SIZE}px, "
                       f"{CLIPS} per call, {torch.get_num_threads()} thread(s)")
    full = TrainRecipe(FRAMES, SAMPLE_RATE, SIZE)
    recipe = TrainRecipe(FRAMES, SAMPLE_RATE, SIZE, rand_augment=None, erase_prob=0.0) if row == "plain" else full
    dataset = TrainClips(items, recipe, seed=0)
    keys = [(e, k % NUM_VIDEOS) for e in range(CLIPS // NUM_VIDEOS + 1) for k in range(NUM_VIDEOS)][:CLIPS]
    if row == "recipe-pil":
        dataset._augment = _PilAugmenter(full)

    if row == "decode":
        def call():
            for epoch, k in keys:
                rng = dataset.rng(k, epoch)
                with VideoReader(items[k].path) as reader:
                    reader.get_frames(train_indices(len(reader), FRAMES, SAMPLE_RATE, rng))
    else:
        def call():
            for key in keys:
                clips, _, failures = dataset[key]
                assert clips.shape == (1, 3, FRAMES, SIZE, SIZE) and not failures

    decoded = CLIPS * FRAMES * HEIGHT * WIDTH * 3  # uint8 frames
    written = 0 if row == "decode" else CLIPS * 3 * FRAMES * SIZE * SIZE * 4
    work = floors.Work([floors.Pass("train-clips", decoded + written)])
    info = {"level": "pipeline", "op": "train_clips", "pass": "data", "stage": "all", "frames": FRAMES,
            "shape": [CLIPS, 3, FRAMES, SIZE, SIZE], "backend": row, "baseline": row == "recipe-pil",
            "backend_used": row, "videos": NUM_VIDEOS, "video_frames": VIDEO_FRAMES, "video_size": [HEIGHT, WIDTH],
            "rand_augment": str(RandAugment.from_string(full.rand_augment)) if row.startswith("recipe") else None}
    run(benchmark, [call], work=work, info=info)
    median = benchmark.extra_info.get("median_s")
    if median:
        benchmark.extra_info["clips_per_s"] = CLIPS / median


def test_pil_baseline_makes_the_same_ops(items):
    """The baseline row runs the same ops as the package: its clips equal ours but for the
    geometric ops' kernel differences (a few grey levels, normalised: well under 0.2)."""
    full = TrainRecipe(FRAMES, SAMPLE_RATE, SIZE, erase_prob=0.0)
    ours, base = TrainClips(items, full), TrainClips(items, full)
    base._augment = _PilAugmenter(full)
    for key in [(0, 0), (1, 1), (2, 0)]:
        a, b = ours[key][0], base[key][0]
        assert (a - b).abs().mean() < 0.2, key
