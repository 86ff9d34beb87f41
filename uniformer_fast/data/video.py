"""Reading clips from videos as the official UniFormer models were evaluated on them.

Decoding streams: :class:`VideoReader` decodes only the frames asked for (it seeks to the nearest
keyframe before each run of wanted frames and decodes forward), so memory follows the clip, not
the video. Frame ``i`` is the ``i``-th frame in presentation order, as in decord (the official
decoding backend), also for variable-frame-rate videos; rotated videos (a display matrix in the
container) come out upright. A directory of images (``00001.jpg``...) reads as a video too, the
form the official Something-Something lists use.

Sampling follows the official test code (Sense-X/UniFormer ``slowfast/datasets``):

- **Kinetics** (:func:`dense_indices`, ``DECODING_BACKEND: decord``, ``USE_OFFSET_SAMPLING:
  True``): temporal view ``i`` of ``views`` spans ``clip = sample_rate * num_frames`` frames from
  ``start = floor(delta / 2)`` for one view, else ``i * floor(delta / (views - 1))``, with
  ``delta = max(total - clip, 0)``; the frames are ``linspace(start, start + clip - 1,
  num_frames)`` clamped to the video and truncated (16x4: 63/15 apart, not 4).
- **Something-Something** (:func:`segment_indices`): with ``seg = (total - 1) / num_frames``,
  frame ``round(seg * i) + int(seg / (views + 1) * (view + 1))`` of segment ``i``.
- **Training** (:func:`random_dense_indices`, :func:`random_segment_indices`): a random start
  instead of the view's for Kinetics, a random frame per segment for Something-Something; the
  augmentations are in :mod:`uniformer_fast.data.augment` and :mod:`uniformer_fast.data.training`
  (which also has the training variants of :func:`load_clip` and :func:`preprocess`).
- **Space** (:func:`resize_short_side`, :func:`uniform_crop`): the short side is resized to
  ``short_side`` (the crop size unless given) with bilinear interpolation, ``align_corners=False``
  and no antialiasing, the long side to ``floor(long / short * short_side)``; then one crop (the
  centre) or three (the two ends and the centre of the long side, centre offset
  ``ceil((long - crop) / 2)``). Pixels ``/ 255``, mean 0.45, std 0.225.

Views come view-major: clip ``v * crops + c`` is temporal view ``v``, crop ``c``, the order of the
official test loader.
"""
from __future__ import annotations

import bisect
import math
import os
import random
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PROTOCOLS = ("kinetics", "sth")

__all__ = ["MEAN", "STD", "PROTOCOLS", "VIDEO_EXTENSIONS", "VideoDecodeError", "VideoReader", "write_video", "dense_indices",
           "segment_indices", "view_indices", "random_dense_indices",
           "random_segment_indices", "train_indices", "window_indices", "resize_short_side", "uniform_crop",
           "crop_positions", "normalize", "to_views", "load_views", "load_clip", "read_frames", "sample_indices",
           "preprocess", "check_count"]


class VideoDecodeError(ValueError):
    """The file exists but cannot be read as a video (no video stream, undecodable data, or a frame
    its index promises that the decoder does not deliver); the message names the file."""


def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding videos needs PyAV: pip install av (or pip install 'uniformer_fast[video]')") from e
    return av


class VideoReader:
    """The frames of one video, decoded on demand.

    ``len(reader)`` frames in presentation order; :meth:`get_frames` returns the ones asked for as
    uint8 ``(N, H, W, 3)`` RGB, upright. ``fps`` is the stream's average rate, ``duration`` in
    seconds, ``frame_times`` each frame's presentation time in seconds from the first frame.
    ``frames_decoded`` counts the frames the decoder has produced so far (what a read costs).

    Opening demuxes the stream once, without decoding, to index each frame's timestamp and the
    keyframes (decord does the same); reading then seeks to the last keyframe at or before each
    wanted frame and decodes forward, only as far as the last wanted frame. ``threads``: the
    decoder's threads (0: FFmpeg chooses). A directory is read as a video of its image files in
    name order; its ``fps`` is ``None`` unless given.
    """

    def __init__(self, path, *, threads: int = 0, fps: Optional[float] = None):
        self.path = os.fspath(path)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
            raise ValueError(f"threads: expected an integer >= 0; got {threads!r}")
        self.frames_decoded = 0
        self._container = None
        if os.path.isdir(self.path):
            self._images = sorted(f for f in os.listdir(self.path) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not self._images:
                raise VideoDecodeError(f"{self.path!r}: a directory without image files "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
            self.fps = fps
            n = len(self._images)
            self.frame_times = [i / fps for i in range(n)] if fps else None
            self.duration = n / fps if fps else None
            return
        self._images = None
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"video file not found: {self.path!r}")
        av = _av()
        try:
            self._container = av.open(self.path)
            if not self._container.streams.video:
                raise VideoDecodeError(f"{self.path!r} has no video stream")
            self._stream = self._container.streams.video[0]
            if threads != 1:
                self._stream.thread_type = "AUTO"
            self._stream.thread_count = threads
            self._build_index()
        except VideoDecodeError:
            self.close()
            raise
        except Exception as e:  # PyAV raises its own error types for unreadable containers
            self.close()
            raise VideoDecodeError(f"cannot decode {self.path!r}: {e}") from e
        rate = self._stream.average_rate
        n = len(self._pts)
        span = self.frame_times[-1] if n > 1 else 0.0
        self.fps = fps or (float(rate) if rate else ((n - 1) / span if span > 0 else None))
        # The last frame lasts one average frame period.
        self.duration = span + 1 / self.fps if self.fps else span
        self._decoder = None  # the running decode iterator after the last seek
        self._last = -1  # the index of the last frame it produced

    def _build_index(self):
        pts = []
        keyframes = []
        for packet in self._container.demux(self._stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                raise VideoDecodeError(f"cannot index {self.path!r}: a packet without timestamps")
            pts.append(ts)
            if packet.is_keyframe:
                keyframes.append(ts)
        if not pts:
            raise VideoDecodeError(f"{self.path!r} holds no video frames")
        pts.sort()
        self._pts = pts
        self._index_of = {p: i for i, p in enumerate(pts)}
        # A stream that marks no keyframe still decodes from its start.
        self._keyframes = sorted({self._index_of[p] for p in keyframes} | {0})
        tb = float(self._stream.time_base)
        self.frame_times = [(p - pts[0]) * tb for p in pts]

    def __len__(self):
        return len(self._images) if self._images is not None else len(self._pts)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._container is not None:
            self._container.close()
            self._container = None

    def __repr__(self):
        return f"VideoReader({self.path!r}, frames={len(self)}, fps={self.fps})"

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 ``(len(indices), H, W, 3)`` RGB: frame ``indices[k]`` at ``k`` (repeats allowed)."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if not idx:
            raise ValueError("indices: expected at least one frame index")
        n = len(self)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"frame {bad[0]} out of range for {self.path!r} ({n} frames)")
        got = self._read_images(set(idx)) if self._images is not None else self._decode(sorted(set(idx)))
        frames = [got[i] for i in idx]
        if any(f.shape != frames[0].shape for f in frames):
            raise VideoDecodeError(f"{self.path!r}: frames of different sizes "
                                   f"{tuple(frames[0].shape)} and {next(tuple(f.shape) for f in frames if f.shape != frames[0].shape)}")
        return torch.stack(frames)

    def _read_images(self, wanted):
        av = _av()
        out = {}
        for i in sorted(wanted):
            path = os.path.join(self.path, self._images[i])
            try:
                with av.open(path) as c:
                    out[i] = _to_tensor(next(c.decode(video=0)))
            except Exception as e:
                raise VideoDecodeError(f"cannot decode {path!r}: {e}") from e
            self.frames_decoded += 1
        return out

    def _decode(self, wanted: List[int]):
        if self._container is None:
            raise ValueError(f"{self.path!r}: the reader is closed")
        want = set(wanted)
        out = {}
        try:
            for target in wanted:
                if target in out:
                    continue
                key = self._keyframes[bisect.bisect_right(self._keyframes, target) - 1]
                # Decode on from where the last read stopped unless a keyframe at or before the
                # target lies beyond it (seeking skips the frames between) or the target is behind.
                if self._decoder is None or target <= self._last or key > self._last + 1:
                    self._seek(key, target)
                while target not in out:
                    frame = next(self._decoder, None)
                    if frame is None:
                        self._decoder = None
                        raise VideoDecodeError(f"{self.path!r}: frame {target} of {len(self)} could not be "
                                               f"decoded (the stream ends or is damaged)")
                    self.frames_decoded += 1
                    i = self._index_of.get(frame.pts)
                    if i is None:
                        continue
                    self._last = i
                    if i in want and i not in out:
                        out[i] = _to_tensor(frame)
                    if i > target:  # the decoder skipped the target: damaged data
                        raise VideoDecodeError(f"{self.path!r}: frame {target} of {len(self)} could not be decoded")
        except VideoDecodeError:
            raise
        except Exception as e:  # damaged packets surface as PyAV errors while decoding
            self._decoder = None
            raise VideoDecodeError(f"cannot decode {self.path!r}: {e}") from e
        return out

    def _seek(self, key: int, target: int):
        """Position the decoder at or before frame ``target``: seek to keyframe ``key``; if the
        demuxer lands past the target (an imprecise index), seek to earlier keyframes, and at last
        to the start."""
        k = self._keyframes.index(key)
        while True:
            self._container.seek(self._pts[self._keyframes[k]], stream=self._stream, backward=True, any_frame=False)
            self._decoder = self._container.decode(self._stream)
            # Peek at the first frame the seek gives; keep it for the caller if it is early enough.
            first = next(self._decoder, None)
            i = None if first is None else self._index_of.get(first.pts)
            if first is not None and (i is None or i <= target):
                self._decoder = _prepend(first, self._decoder)
                self._last = -1  # nothing taken yet since the seek
                return
            if first is not None:
                self.frames_decoded += 1
            if k == 0:
                raise VideoDecodeError(f"{self.path!r}: cannot seek to frame {target} of {len(self)}")
            k -= 1


def _prepend(first, rest):
    yield first
    yield from rest


def _to_tensor(frame) -> torch.Tensor:
    """A decoded frame as uint8 (H, W, 3) RGB, turned upright by its display rotation."""
    img = torch.from_numpy(frame.to_ndarray(format="rgb24"))
    k = round(getattr(frame, "rotation", 0) or 0) // 90 % 4
    # ``rotation`` is the counter-clockwise angle the display matrix turns the picture by.
    return torch.rot90(img, k, dims=(0, 1)).contiguous() if k else img


# ---------------------------------------------------------------------------------------------
# Which frames: the official test samplers and the sliding window of feature extraction.

def check_count(name: str, value, low: int = 1) -> None:
    """A ValueError naming the argument ``name`` unless ``value`` is an integer (not a bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}; got {value!r}")


def _check_view(view, views):
    check_count("views", views)
    if not isinstance(view, int) or isinstance(view, bool) or not 0 <= view < views:
        raise ValueError(f"view: expected an integer in [0, {views - 1}]; got {view!r}")


def dense_indices(total: int, num_frames: int, sample_rate: int, view: int = 0, views: int = 1) -> torch.Tensor:
    """The official Kinetics test sampler (decord backend, offset sampling): the frame indices of
    temporal view ``view`` of ``views``, int64 ``(num_frames,)``."""
    check_count("total", total)
    check_count("num_frames", num_frames)
    check_count("sample_rate", sample_rate)
    _check_view(view, views)
    clip = sample_rate * num_frames
    delta = max(total - clip, 0)
    start = math.floor(delta / 2) if views == 1 else view * math.floor(delta / (views - 1))
    # float32 as torch.linspace's default, so that truncation matches the official indices.
    idx = torch.linspace(start, start + clip - 1, num_frames, dtype=torch.float32)
    return idx.clamp(0, total - 1).long()


def segment_indices(total: int, num_frames: int, view: int = 0, views: int = 1) -> torch.Tensor:
    """The official Something-Something test sampler: one frame per segment, shifted by the view,
    int64 ``(num_frames,)`` (0-based; the official frame folders number files from 1)."""
    check_count("total", total)
    check_count("num_frames", num_frames)
    _check_view(view, views)
    seg = float(total - 1) / num_frames
    shift = int(seg / (views + 1) * (view + 1))
    # Python's round() rounds halves to even, as np.round in the official code.
    idx = torch.tensor([int(round(seg * i)) + shift for i in range(num_frames)], dtype=torch.long)
    return idx.clamp_(0, total - 1)


def view_indices(total: int, num_frames: int, sample_rate: int, view: int, views: int,
                 protocol: str = "kinetics") -> torch.Tensor:
    """:func:`dense_indices` (``"kinetics"``) or :func:`segment_indices` (``"sth"``, which has no
    sample rate)."""
    if protocol == "kinetics":
        return dense_indices(total, num_frames, sample_rate, view, views)
    if protocol == "sth":
        return segment_indices(total, num_frames, view, views)
    raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def random_dense_indices(total: int, num_frames: int, sample_rate: int, rng: random.Random) -> torch.Tensor:
    """The official Kinetics training sampler: a clip of ``sample_rate * num_frames`` frames from a
    start drawn uniformly (a float) in ``[0, max(total - clip, 0)]``, its frames
    ``linspace(start, start + clip - 1, num_frames)`` clamped and truncated, int64 ``(num_frames,)``."""
    check_count("total", total)
    check_count("num_frames", num_frames)
    check_count("sample_rate", sample_rate)
    clip = sample_rate * num_frames
    start = rng.uniform(0, max(total - clip, 0))
    idx = torch.linspace(start, start + clip - 1, num_frames, dtype=torch.float32)
    return idx.clamp(0, total - 1).long()


def random_segment_indices(total: int, num_frames: int, rng: random.Random) -> torch.Tensor:
    """The official Something-Something training sampler: ``num_frames`` segments of
    ``seg = (total - 1) / num_frames`` frames, one frame drawn uniformly from each (both ends
    included), int64 ``(num_frames,)``."""
    check_count("total", total)
    check_count("num_frames", num_frames)
    seg = float(total - 1) / num_frames
    idx = [rng.randint(int(round(seg * i)), int(round(seg * (i + 1)))) for i in range(num_frames)]
    return torch.tensor(idx, dtype=torch.long).clamp_(0, total - 1)


def train_indices(total: int, num_frames: int, sample_rate: int, rng: random.Random,
                  protocol: str = "kinetics") -> torch.Tensor:
    """:func:`random_dense_indices` (``"kinetics"``) or :func:`random_segment_indices` (``"sth"``)."""
    if protocol == "kinetics":
        return random_dense_indices(total, num_frames, sample_rate, rng)
    if protocol == "sth":
        return random_segment_indices(total, num_frames, rng)
    raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def window_indices(total: int, window: int, stride: int, sample_rate: int) -> torch.Tensor:
    """Sliding windows over a whole video: ``(num_windows, window)`` int64 frame indices.

    Window ``k`` starts at frame ``k * stride * sample_rate`` and takes ``window`` frames
    ``sample_rate`` apart; windows run while they fit in the video. A video shorter than one
    window gives one window from frame 0, its last frame repeated (clamped, as the samplers do).
    """
    check_count("total", total)
    check_count("window", window)
    check_count("stride", stride)
    check_count("sample_rate", sample_rate)
    span = (window - 1) * sample_rate + 1
    starts = torch.arange(0, max(total - span, 0) + 1, stride * sample_rate)
    idx = starts[:, None] + torch.arange(window) * sample_rate
    return idx.clamp_(0, total - 1)


# ---------------------------------------------------------------------------------------------
# Space: the official test transform.

def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``(..., C, H, W)`` with the short side resized to ``size`` and the long side to
    ``floor(long / short * size)``: bilinear, ``align_corners=False``, no antialiasing (the official
    ``random_short_side_scale_jitter`` at test time). Unchanged when the short side is ``size``."""
    check_count("size", size)
    h, w = x.shape[-2:]
    if (w <= h and w == size) or (h <= w and h == size):
        return x
    if w < h:
        new_h, new_w = int(math.floor(float(h) / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(float(w) / h * size))
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(new_h, new_w), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *y.shape[-3:])


def uniform_crop(x: torch.Tensor, size: int, position: int) -> torch.Tensor:
    """A ``size x size`` crop of ``(..., H, W)``: ``position`` 0, 1, 2 is the start, the centre and
    the end of the long side (the centre of the short one; offsets ``ceil((side - size) / 2)``)."""
    if position not in (0, 1, 2):
        raise ValueError(f"position: expected 0, 1 or 2; got {position!r}")
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {h}x{w}")
    top, left = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if h > w:
        top = {0: 0, 1: top, 2: h - size}[position]
    else:
        left = {0: 0, 1: left, 2: w - size}[position]
    return x[..., top:top + size, left:left + size]


def crop_positions(crops: int, protocol: str = "kinetics") -> List[int]:
    """The :func:`uniform_crop` positions of ``crops`` spatial views: three crops are the two ends
    and the centre; one crop is the centre for Kinetics and the start for Something-Something,
    whose official loader takes crop ``view % crops`` (0 for one crop)."""
    if crops == 3:
        return [0, 1, 2]
    if crops == 1:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")
        return [1] if protocol == "kinetics" else [0]
    raise ValueError(f"crops: expected 1 or 3; got {crops!r}")


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, H, W)``, ``(x / 255 - 0.45) / 0.225``."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def to_views(frames: torch.Tensor, size: int = 224, crops: int = 1, *, short_side: Optional[int] = None,
             protocol: str = "kinetics") -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` frames of one temporal view -> float32 ``(crops, 3, T, size, size)``.

    The official order is normalise, resize, crop; resizing first and normalising the (smaller)
    result is the same up to float rounding, since both steps are affine, and much cheaper.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3); got {frames.dtype} {tuple(frames.shape)}")
    check_count("size", size)
    short_side = size if short_side is None else short_side
    if short_side < size:
        raise ValueError(f"short_side: expected >= size ({size}); got {short_side}")
    positions = crop_positions(crops, protocol)
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = resize_short_side(x, short_side).div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)
    return torch.stack([uniform_crop(x, size, p).transpose(0, 1) for p in positions])


def load_views(path, num_frames: int = 16, sample_rate: int = 4, views: int = 1, crops: int = 1,
               size: int = 224, *, protocol: str = "kinetics", short_side: Optional[int] = None,
               reader: Optional[VideoReader] = None, total: Optional[int] = None) -> torch.Tensor:
    """All test views of one video: float32 ``(views * crops, 3, num_frames, size, size)``,
    view-major (clip ``v * crops + c``), decoding only the frames the views use.

    ``reader``: an open :class:`VideoReader` to read from instead of opening ``path``; ``total``:
    the frame count to sample over (default: all the video's frames; the Something-Something
    lists give one)."""
    own = reader is None
    reader = VideoReader(path) if own else reader
    try:
        total = len(reader) if total is None else min(total, len(reader))
        per_view = [view_indices(total, num_frames, sample_rate, v, views, protocol) for v in range(views)]
        frames = reader.get_frames(torch.cat(per_view))
    finally:
        if own:
            reader.close()
    return torch.cat([to_views(f, size, crops, short_side=short_side, protocol=protocol)
                      for f in frames.split(num_frames)])


def load_clip(path, num_frames: int = 16, sample_rate: int = 4, size: int = 224) -> torch.Tensor:
    """The official single-view test clip, model-ready: float32 ``(3, num_frames, size, size)``
    (:func:`dense_indices` with one view, the centre crop after resizing the short side to
    ``size``). :func:`uniformer_fast.data.training.load_clip` also makes training clips."""
    return load_views(path, num_frames, sample_rate, 1, 1, size)[0]


def write_video(path, frames, fps: float = 30.0) -> str:
    """Write uint8 RGB ``frames`` (T, H, W, 3), a tensor or an array, as an MP4 through PyAV:
    H.264 (libx264, yuv420p; MPEG-4 Part 2 where PyAV has no x264) at ``fps``. yuv420p needs even
    sides, so an odd one is padded with its edge pixels. Returns ``path``."""
    import numpy as np
    from fractions import Fraction
    av = _av()
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames: expected uint8 (T, H, W, 3) with T >= 1; got {frames.dtype} {frames.shape}")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps: expected a positive number; got {fps!r}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.fspath(path)


def read_frames(path) -> torch.Tensor:
    """Every frame of the first video stream of ``path`` as uint8 (T, H, W, 3) RGB. Memory grows
    with the video (a 10-minute 720p video is about 50 GB): prefer :class:`VideoReader`."""
    with VideoReader(path) as reader:
        return reader.get_frames(range(len(reader)))


def sample_indices(total: int, num_frames: int, sample_rate: int, start: Optional[int] = None) -> torch.Tensor:
    """``num_frames`` indices ``sample_rate`` apart from ``start`` (centred in the video when not
    given), clamped to [0, total - 1]: the training sampler."""
    span = (num_frames - 1) * sample_rate + 1
    if start is None:
        start = max(0, (total - span) // 2)
    idx = start + torch.arange(num_frames) * sample_rate
    return idx.clamp_(0, total - 1)


def preprocess(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> normalised float32 ``(3, T, size, size)``: the official test
    transform (:func:`to_views`, one centre crop). :func:`uniformer_fast.data.training.preprocess`
    also applies the training transform."""
    return to_views(frames, size, 1)[0]
