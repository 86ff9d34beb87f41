"""Clip features of whole videos, from a window slid over each.

    from uniformer_fast import create_model, extract, load_checkpoint
    model = create_model("uniformer_small", num_classes=400)
    load_checkpoint(model, "uniformer_small_k400_16x4.pth")
    extract(model, "videos/", "features/", window=16, stride=16, sample_rate=4)

This is what ``uniformer-fast extract`` runs. A video that cannot be read is reported and
skipped; the rest go on. Every file is written atomically, a video's ``.json`` last, so a second
run skips the videos done (resume after an interruption). Decoding runs in worker processes beside
the model (:mod:`uniformer_fast.apps.inference`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.lists import VideoItem, as_video_items, find_videos
from ..data.video import VIDEO_EXTENSIONS, VideoReader, to_views, window_indices
from ..files import atomic_write
from .inference import ClipRun, RunStats, autocast_for, check_counts, check_model, default_workers, model_device

__all__ = ["extract", "ExtractionResult", "Extractor", "feature_name"]


@dataclass
class ExtractionResult:
    """The feature files written (video key -> path of its ``.npy``), the videos skipped because
    a previous run had done them, the unreadable ones with why, and the timing."""

    written: Dict[str, str]
    skipped: List[str]
    failed: List[Tuple[str, str]]
    stats: RunStats = field(default_factory=RunStats)


def feature_name(key: str) -> str:
    """``a/b.mp4`` -> ``a/b``: where a video's features go below the output directory."""
    stem, ext = os.path.splitext(key)
    return stem if ext.lower() in VIDEO_EXTENSIONS else key


def extract(model, videos, out_dir, *, root: Optional[str] = None, window: int = 16, stride: int = 16,
            sample_rate: int = 4, size: int = 224, batch_size: int = 8, workers: Optional[int] = None, device=None,
            precision: str = "auto", feature_map: bool = False, progress: bool = True) -> ExtractionResult:
    """Clip features of whole videos, from a window slid over each.

    Window ``k`` is ``window`` frames ``sample_rate`` apart from frame ``k * stride * sample_rate``
    (:func:`~uniformer_fast.data.video.window_indices`: whole windows only; a video shorter than
    one window gives one window, its last frame repeated), the short side resized to ``size`` and
    the centre crop taken (the single-view test transform). Per video ``out_dir/<name>.npy`` holds
    the pooled features float32 ``(num_windows, C)`` (``model.forward_features`` averaged over time
    and space, what the classifier sees), ``<name>.json`` the window start frames and times in
    seconds, and with ``feature_map`` ``<name>.map.npy`` the final maps ``(num_windows, C, T', H',
    W')``; ``<name>`` is the video's path below its directory or list without the extension
    (:func:`feature_name`). Files are written atomically, the ``.json`` last: a video whose
    ``.json`` exists is skipped (resume).

    ``videos``: a video file, a directory (searched recursively), a list file, or a sequence of
    paths / :class:`~uniformer_fast.data.lists.VideoItem` s. The other arguments are as
    :func:`~uniformer_fast.apps.evaluate.evaluate`'s.
    """
    check_model(model)
    if isinstance(videos, (str, os.PathLike)) and root is None:
        items = find_videos(videos)
    else:
        items = as_video_items(videos, root)
    device = model_device(model, device)
    workers = default_workers(device) if workers is None else workers
    check_counts(("window", window, 1), ("stride", stride, 1), ("sample_rate", sample_rate, 1), ("size", size, 1),
                 ("batch_size", batch_size, 1), ("workers", workers, 0))
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not a directory")
    names = [feature_name(i.key) for i in items]
    if len(set(names)) != len(names):  # a.mp4 and a.avi side by side: keep their extensions
        names = [i.key for i in items]
    precision, autocast = autocast_for(device, precision)

    skipped, todo = [], []
    for k, name in enumerate(names):
        (skipped if os.path.exists(os.path.join(out_dir, name + ".json")) else todo).append(k)
    skipped = [items[k].key for k in skipped]
    os.makedirs(out_dir, exist_ok=True)
    windows = _Windows(window, stride, sample_rate, size, batch_size)
    run = Extractor(model, items, todo, windows, out_dir=out_dir, names=names, feature_map=feature_map,
                    precision=precision, batch_size=batch_size, workers=workers, device=device, autocast=autocast,
                    progress=progress)
    stats = run.run()
    stats.videos = len(run.written)
    return ExtractionResult(run.written, skipped, run.failed, stats)


@dataclass(frozen=True)
class _Windows:
    """A video's chunks for :func:`extract`: its sliding windows, at most ``batch_size`` a chunk,
    as float32 clips ``(n, 3, window, size, size)`` (run in the decoding workers). The meta of a
    chunk says where its windows start among the video's; the first chunk's also holds the
    video's frame count, rate and window start frames and times."""

    window: int
    stride: int
    sample_rate: int
    size: int
    batch_size: int

    def __call__(self, reader: VideoReader, item: VideoItem):
        windows = window_indices(len(reader), self.window, self.stride, self.sample_rate)
        n = windows.shape[0]
        for lo in range(0, n, self.batch_size):
            part = windows[lo:lo + self.batch_size]
            frames = reader.get_frames(part.flatten())
            clips = torch.stack([to_views(f, self.size, 1)[0] for f in frames.split(self.window)])
            meta = {"num_windows": n, "first": lo}
            if lo == 0:
                times = reader.frame_times
                starts = windows[:, 0].tolist()
                meta.update(start_frames=starts, fps=reader.fps, num_frames=len(reader),
                            start_times=None if times is None else [times[s] for s in starts])
            yield clips, meta


@dataclass
class _VideoFeatures:
    """One video's features while its windows come in: ``pooled[k]`` the ``(C,)`` features of
    window ``k`` (None until it has run), ``left`` the windows not yet run, ``decoded`` whether
    its last chunk has come, ``maps`` its ``.map.npy`` being filled (with ``feature_map``)."""

    meta: dict
    pooled: List[Optional[np.ndarray]]
    left: int
    decoded: bool = False
    maps: Optional["_ArrayFile"] = None


class Extractor(ClipRun):
    """The run behind :func:`extract`: the clips of ``windows`` through the model, pooled features
    (and maps) gathered per video and written under ``out_dir`` as ``names[i]`` once all its
    windows are in. :attr:`written`: video key -> its ``.npy``."""

    name = "extract"

    def __init__(self, model, items: Sequence[VideoItem], todo: Sequence[int], windows: "_Windows", *, out_dir: str,
                 names: Sequence[str], feature_map: bool, precision: str, **kwargs):
        super().__init__(model, items, todo, windows, **kwargs)
        self.windows = windows
        self.out_dir, self.names, self.feature_map, self.precision = out_dir, names, feature_map, precision
        self.videos: Dict[int, _VideoFeatures] = {}  # the videos under way
        self.written: Dict[str, str] = {}

    def forward(self, clips):
        fmap = self.model.forward_features(clips)
        return _Outputs(fmap if self.feature_map else None, self.model.forward_head(fmap, pre_logits=True))

    def on_chunk(self, chunk):
        i, meta = chunk["video"], chunk["meta"]
        if meta["first"] == 0:
            self.videos[i] = _VideoFeatures(meta, [None] * meta["num_windows"], meta["num_windows"])
        if chunk["last"]:
            self.videos[i].decoded = True

    def on_output(self, tag, offset, out):
        i, meta, _last = tag
        video = self.videos.get(i)
        if video is None:  # the video failed after this chunk was queued: its results are dropped
            return
        first = meta["first"] + offset
        fmap, pooled = out
        for k in range(pooled.shape[0]):
            video.pooled[first + k] = pooled[k].float().cpu().numpy()
        if self.feature_map:
            if video.maps is None:
                video.maps = _ArrayFile(os.path.join(self.out_dir, self.names[i] + ".map.npy"),
                                        (video.meta["num_windows"], *fmap.shape[1:]))
            video.maps.array[first:first + fmap.shape[0]] = fmap.float().cpu().numpy()
        video.left -= pooled.shape[0]
        if video.decoded and video.left == 0:
            self._write(i)

    def on_failure(self, i, error):
        video = self.videos.pop(i, None)
        if video is not None and video.maps is not None:
            video.maps.discard()

    def close(self):
        for video in self.videos.values():  # interrupted: no half-written maps left behind
            if video.maps is not None:
                video.maps.discard()

    def _write(self, i):
        video = self.videos.pop(i)
        item, meta = self.items[i], video.meta
        base = os.path.join(self.out_dir, self.names[i])
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        pooled = np.stack(video.pooled).astype(np.float32)
        atomic_write(base + ".npy", lambda f: np.save(f, pooled))
        if video.maps is not None:
            video.maps.commit()
        windows = self.windows
        info = {"video": item.key, "path": item.path, "num_frames": meta["num_frames"], "fps": meta["fps"],
                "window": windows.window, "stride": windows.stride, "sample_rate": windows.sample_rate,
                "size": windows.size, "num_windows": meta["num_windows"], "feature_dim": int(pooled.shape[1]),
                "start_frames": meta["start_frames"], "start_times": meta["start_times"],
                "feature_map": self.feature_map, "precision": self.precision}
        atomic_write(base + ".json", lambda f: json.dump(info, f, indent=1), text=True)
        self.written[item.key] = base + ".npy"
        self.bar.update(1)


class _Outputs:
    """A batch's two outputs, the feature maps ``(B, C, T', H', W')`` (or None) and the pooled
    features ``(B, C)``, which the batcher splits along the batch as one."""

    def __init__(self, fmap, pooled):
        self.fmap, self.pooled = fmap, pooled

    def split(self, sizes):
        maps = self.fmap.split(sizes) if self.fmap is not None else [None] * len(sizes)
        return list(zip(maps, self.pooled.split(sizes)))


class _ArrayFile:
    """A ``.npy`` array filled in place on disk (``np.lib.format.open_memmap``) under a temporary
    name, renamed onto its path when complete: a long video's feature maps never sit in memory."""

    def __init__(self, path, shape):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tmp = f"{path}.{os.getpid()}.tmp"
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=shape)

    def commit(self):
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)

    def discard(self):
        self.array = None
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
