"""Training data: labelled videos to augmented clips, as the official UniFormer models were trained.

Per video and epoch (:class:`TrainClips`), in the official order (Sense-X/UniFormer
``slowfast/datasets/kinetics.py`` and ``sth.py`` with ``AUG.ENABLE``):

1. frames: a random dense clip (Kinetics) or a random frame per segment (Something-Something),
   :func:`~uniformer_fast.data.video.train_indices`, decoded from the nearest keyframe;
2. RandAugment (``rand-m7-n4-mstd0.5-inc1``) on the uint8 frames, the same ops on every frame;
3. normalised, then a random resized crop (area 8-100%, aspect 3/4-4/3; ``crop="resized"``, the
   official recipe) or a short side jittered in [256, 320] x ``size / 224`` and a random crop
   (``crop="jitter"``, the official recipe without ``AUG``);
4. a horizontal flip with probability 0.5, off for Something-Something, whose labels say left
   or right;
5. random erasing (probability 0.25), the same rectangle on every frame.

Each video is decoded once for ``num_sample`` differently augmented clips (the official
``AUG.NUM_SAMPLE``, 2). Every random choice comes from a ``random.Random`` seeded with
``(seed, epoch, index)``, so a clip does not depend on the worker that made it, on the
number of workers or on a resumed run: the same epoch gives the same clips.

A video that cannot be read is replaced by another one drawn at random; the sample carries the
failure so the training loop can report it (workers cannot print through a progress bar).

:func:`load_clip` and :func:`preprocess` are the one-clip helpers of :mod:`uniformer_fast.data.video`
with a training mode (``train=True``) that goes through the same recipe.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from . import video
from .augment import RandAugment, RandomErasing, horizontal_flip, random_resized_crop, short_side_jitter_crop
from .lists import VIDEO_ERRORS, VideoItem, read_video_list
from .video import (MEAN, PROTOCOLS, STD, VIDEO_EXTENSIONS, VideoReader, check_count, random_dense_indices,
                    train_indices)

__all__ = ["TrainRecipe", "ClipAugmenter", "TrainClips", "EpochSampler", "collate_clips", "find_training_videos",
           "check_labels", "augment_clip", "load_clip", "preprocess"]


@dataclass(frozen=True)
class TrainRecipe:
    """What :func:`augment_clip` does to a clip; the defaults are the official recipe.

    ``flip=None`` means on for Kinetics, off for Something-Something. ``rand_augment=None`` and
    ``erase_prob=0`` turn those off."""

    num_frames: int = 16
    sample_rate: int = 4
    size: int = 224
    protocol: str = "kinetics"
    crop: str = "resized"
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    jitter: Tuple[int, int] = (256, 320)
    flip: Optional[bool] = None
    rand_augment: Optional[str] = "rand-m7-n4-mstd0.5-inc1"
    erase_prob: float = 0.25
    num_sample: int = 1

    def __post_init__(self):
        for name in ("num_frames", "sample_rate", "size", "num_sample"):
            check_count(name, getattr(self, name))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if self.crop not in ("resized", "jitter"):
            raise ValueError(f"crop: expected 'resized' or 'jitter'; got {self.crop!r}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob: expected a number in [0, 1]; got {self.erase_prob!r}")

    @property
    def flips(self) -> bool:
        return self.protocol == "kinetics" if self.flip is None else self.flip


class ClipAugmenter:
    """A :class:`TrainRecipe` made callable: ``augmenter(frames, rng)`` turns uint8 ``(T, H, W, 3)``
    frames into a normalised float32 clip ``(3, T, size, size)``, every choice drawn from ``rng``.
    Built once per dataset and worker, since building parses the RandAugment spec."""

    def __init__(self, recipe: TrainRecipe):
        self.recipe = recipe
        self.rand_augment = RandAugment.from_string(recipe.rand_augment) if recipe.rand_augment else None
        self.erase = RandomErasing(recipe.erase_prob) if recipe.erase_prob > 0 else None
        self.mean = torch.tensor(MEAN).view(3, 1, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1, 1)

    def __call__(self, frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
        r = self.recipe
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, rng)
        x = frames.permute(3, 0, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)  # (3, T, H, W)
        if r.crop == "resized":
            x = random_resized_crop(x, r.size, rng, r.scale, r.ratio)
        else:
            # The official scales are for 224-pixel crops; other sizes scale them alike.
            low, high = (round(s * r.size / 224) for s in r.jitter)
            x = short_side_jitter_crop(x, r.size, rng, (low, high))
        if r.flips:
            x = horizontal_flip(x, rng)
        if self.erase is not None:
            x = self.erase(x, rng)
        return x.contiguous()


def augment_clip(frames: torch.Tensor, rng: random.Random, recipe: TrainRecipe = TrainRecipe()) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` frames -> one augmented, normalised float32 clip ``(3, T, size, size)``."""
    return ClipAugmenter(recipe)(frames, rng)


class TrainClips(Dataset):
    """Labelled videos as training samples: item ``i`` is ``(clips, labels, failures)``, ``clips``
    float32 ``(num_sample, 3, T, size, size)``, ``labels`` int64 ``(num_sample,)``, ``failures``
    the ``(key, reason)`` of each unreadable video replaced on the way. Call :meth:`set_epoch`
    at each epoch (the random choices depend on it)."""

    def __init__(self, items: Sequence[VideoItem], recipe: TrainRecipe = TrainRecipe(), *, seed: int = 0,
                 max_replacements: int = 10):
        if not items:
            raise ValueError("items: no videos")
        unlabelled = next((i for i in items if i.label is None), None)
        if unlabelled is not None:
            raise ValueError(f"{unlabelled.key}: no label (training needs one per video)")
        self.items, self.recipe, self.seed, self.max_replacements = list(items), recipe, seed, max_replacements
        self.epoch = 0
        self._augment = None

    def __len__(self):
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int, epoch: Optional[int] = None) -> random.Random:
        """The random stream of video ``index`` in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        # A string seed goes through SHA-512: the same stream on every platform and process.
        return random.Random(f"uniformer_fast.train:{self.seed}:{epoch}:{index}")

    def __getitem__(self, key):
        """``key``: an index, or ``(epoch, index)`` as :class:`EpochSampler` gives them (persistent
        DataLoader workers hold a copy of the dataset made at the first epoch, so the epoch
        travels with the index)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if self._augment is None:  # built in the worker that uses it
            self._augment = ClipAugmenter(self.recipe)
        rng = self.rng(index, epoch)
        failures: List[Tuple[str, str]] = []
        for _ in range(self.max_replacements + 1):
            item = self.items[index]
            try:
                frames = self._read(item, rng)
            except VIDEO_ERRORS as e:
                failures.append((item.key, " ".join(str(e).split()) or type(e).__name__))
                index = rng.randrange(len(self.items))
                continue
            clips = torch.stack([self._augment(frames, rng) for _ in range(self.recipe.num_sample)])
            return clips, torch.full((self.recipe.num_sample,), item.label, dtype=torch.long), failures
        raise ValueError(f"{len(failures)} videos in a row could not be read (the data is probably "
                           f"unreachable); the last: {failures[-1][0]}: {failures[-1][1]}")

    def _read(self, item: VideoItem, rng: random.Random) -> torch.Tensor:
        r = self.recipe
        with VideoReader(item.path) as reader:
            total = len(reader) if item.num_frames is None else min(item.num_frames, len(reader))
            return reader.get_frames(train_indices(total, r.num_frames, r.sample_rate, rng, r.protocol))


def collate_clips(batch):
    """``[(clips, labels, failures)]`` -> ``(clips (B * num_sample, 3, T, S, S), labels, failures)``."""
    clips = torch.cat([b[0] for b in batch])
    labels = torch.cat([b[1] for b in batch])
    return clips, labels, [f for b in batch for f in b[2]]


class EpochSampler(Sampler[Tuple[int, int]]):
    """A shuffled order per epoch, the same in every process, split between ``world`` processes
    (padded by repeating its start so that every process gets as many, as DistributedSampler),
    starting ``start`` indices into this process's share (to resume within an epoch). Yields
    ``(epoch, index)``: the dataset's random choices depend on the epoch."""

    def __init__(self, length: int, *, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.length, self.world, self.rank, self.seed, self.shuffle = length, world, rank, seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(length / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / self.length))[:total]
        return iter([(self.epoch, i) for i in order[self.rank::self.world][self.start:]])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def find_training_videos(source, root: Optional[str] = None,
                         class_names: Optional[Sequence[str]] = None) -> Tuple[List[VideoItem], Optional[List[str]]]:
    """The labelled videos of ``source`` and the class names where known.

    A directory is ``source/<class name>/<video>`` (the classes are ``class_names``' order when
    given, every folder having to be one of them; otherwise the sorted folder names); a file is an
    official list (:func:`~uniformer_fast.data.lists.read_video_list`, ``root`` in front of
    relative paths, by default the list's folder).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        folders = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
        if class_names is None:
            names, index = folders, {c: i for i, c in enumerate(folders)}
        else:
            names, index = list(class_names), {c: i for i, c in enumerate(class_names)}
            unknown = [d for d in folders if d not in index]
            if unknown:
                raise ValueError(f"{source}: folder {unknown[0]!r} is not a class of the label map")
        items = []
        for folder in folders:
            for dirpath, dirnames, filenames in os.walk(os.path.join(source, folder)):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.lower().endswith(VIDEO_EXTENSIONS):
                        full = os.path.join(dirpath, name)
                        items.append(VideoItem(os.path.relpath(full, source), full, index[folder]))
        if not items:
            raise ValueError(f"{source}: no videos ({', '.join(VIDEO_EXTENSIONS)}) under <class>/ folders")
        return items, names
    if not os.path.isfile(source):
        raise FileNotFoundError(f"not found: {source!r}")
    root = root if root is not None else os.path.dirname(os.path.abspath(source))
    return read_video_list(source, root), (None if class_names is None else list(class_names))


def check_labels(items: Sequence[VideoItem], num_classes: int, where: str) -> None:
    """A ValueError naming the first video whose label is outside ``[0, num_classes)``."""
    for item in items:
        if item.label is None or not 0 <= item.label < num_classes:
            raise ValueError(f"{where}: {item.key} has label {item.label}, outside the {num_classes} classes "
                             f"[0, {num_classes - 1}] (set --num-classes or --label-map)")


def load_clip(path, num_frames: int = 16, sample_rate: int = 4, size: int = 224, *,
              train: bool = False, rng: Optional[random.Random] = None) -> torch.Tensor:
    """A model-ready clip ``(3, num_frames, size, size)``.

    Evaluation: the official single-view test clip (:func:`uniformer_fast.data.video.load_clip`).
    Training: the official training clip (:func:`~uniformer_fast.data.video.random_dense_indices`,
    then :func:`augment_clip` with the default recipe: RandAugment, a random resized crop, a flip,
    random erasing), drawn from ``rng``.
    """
    if not train:
        return video.load_clip(path, num_frames, sample_rate, size)
    rng = rng if rng is not None else random.Random()
    with VideoReader(path) as reader:
        frames = reader.get_frames(random_dense_indices(len(reader), num_frames, sample_rate, rng))
    return augment_clip(frames, rng, TrainRecipe(num_frames, sample_rate, size))


def preprocess(frames: torch.Tensor, size: int = 224, *, train: bool = False,
               scale_range=(256, 320), rng: Optional[random.Random] = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float32 (3, T, size, size).

    Evaluation: the official test transform (:func:`uniformer_fast.data.video.preprocess`, one
    centre crop). Training: the official recipe without ``AUG``: the short side to a random length
    in ``scale_range`` scaled by ``size / 224`` (no antialiasing), a random crop and a random
    horizontal flip, drawn from ``rng`` (:func:`augment_clip` with ``crop="jitter"``).
    """
    if not train:
        return video.preprocess(frames, size)
    recipe = TrainRecipe(frames.shape[0], 1, size, crop="jitter", jitter=tuple(scale_range), rand_augment=None,
                         erase_prob=0.0)
    return augment_clip(frames, rng if rng is not None else random.Random(), recipe)
