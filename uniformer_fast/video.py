"""Reading clips as the official models were trained and evaluated on them.

Frames are decoded with PyAV (``pip install av``), ``num_frames`` are sampled every
``sample_rate`` frames around the middle of the video (indices clamped to the video), the short
side is resized to ``size`` and the centre ``size x size`` crop is taken (random crop, scale and
flip when training), then pixels are scaled to [0, 1] and normalised with the Kinetics mean
0.45 and std 0.225 of the official configs.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import torch
import torch.nn.functional as F

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class VideoDecodeError(ValueError):
    """The file exists but holds no decodable video stream."""


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding videos needs PyAV: pip install av (or pip install 'uniformer_fast[video]')") from e
    return av


def read_frames(path: str) -> torch.Tensor:
    """All frames of the first video stream of ``path`` as uint8 (T, H, W, 3) RGB."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path!r} has no video stream")
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV raises its own error types for unreadable containers
        raise VideoDecodeError(f"cannot decode {path!r}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"{path!r} holds no decodable frames")
    return torch.stack(frames)


def sample_indices(total: int, num_frames: int, sample_rate: int, start: Optional[int] = None) -> torch.Tensor:
    """``num_frames`` indices ``sample_rate`` apart, centred in the video unless ``start`` is given,
    clamped to [0, total - 1] (short videos repeat their ends)."""
    span = (num_frames - 1) * sample_rate + 1
    if start is None:
        start = max(0, (total - span) // 2)
    idx = start + torch.arange(num_frames) * sample_rate
    return idx.clamp_(0, total - 1)


def preprocess(frames: torch.Tensor, size: int = 224, *, train: bool = False,
               scale_range=(256, 320), rng: Optional[random.Random] = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float32 (3, T, size, size).

    Evaluation: short side to ``size``, centre crop. Training: short side to a random length in
    ``scale_range`` scaled by ``size / 224``, random crop, random horizontal flip.
    """
    rng = rng or random
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H, W)
    H, W = x.shape[-2:]
    short = size if not train else int(rng.uniform(*scale_range) * size / 224)
    scale = short / min(H, W)
    new_h, new_w = max(size, round(H * scale)), max(size, round(W * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    if train:
        top, left = rng.randint(0, new_h - size), rng.randint(0, new_w - size)
    else:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size]
    if train and rng.random() < 0.5:
        x = x.flip(-1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


def load_clip(path: str, num_frames: int = 16, sample_rate: int = 4, size: int = 224, *,
              train: bool = False, rng: Optional[random.Random] = None) -> torch.Tensor:
    """A model-ready clip (3, num_frames, size, size) from a video file."""
    frames = read_frames(path)
    start = None
    if train:
        span = (num_frames - 1) * sample_rate + 1
        start = (rng or random).randint(0, max(0, frames.shape[0] - span))
    return preprocess(frames[sample_indices(frames.shape[0], num_frames, sample_rate, start)], size,
                      train=train, rng=rng)
