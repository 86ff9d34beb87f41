"""What evaluation and feature extraction share: a model run over the clips of many videos, with
decoding in worker processes overlapped with the model.

How work flows: a :class:`torch.utils.data.DataLoader` over a :class:`ClipStream` hands the videos
out to ``workers`` processes (0: decode in this process); each opens a
:class:`~uniformer_fast.data.video.VideoReader`, decodes only the frames its clips use and yields
them in chunks of at most ``batch_size`` clips; this process runs the model on batches of
``batch_size`` clips (across videos, :class:`Batcher`) and gathers each video's results when its
last chunk is done (:class:`ClipRun`, which :func:`~uniformer_fast.apps.evaluate.evaluate` and
:func:`~uniformer_fast.apps.extract.extract` subclass). On CUDA the chunks come in pinned memory
and are copied without blocking, and the model runs under bf16 autocast unless ``precision`` says
otherwise (:func:`autocast_for`).
"""
from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.lists import VIDEO_ERRORS, VideoItem
from ..data.video import VideoReader, check_count
from ..model import UniFormer
from .progress import progress_bar

__all__ = ["PRECISIONS", "ClipStream", "make_loader", "default_workers", "autocast_for", "check_model",
           "check_counts", "model_device", "Batcher", "RunStats", "ClipRun"]

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# The loader: videos decoded in workers, handed over in chunks of clips.

class ClipStream(IterableDataset):
    """Yields, per video ``items[i]`` for ``i`` in ``todo``, chunks ``{"video": i, "clips": (n, 3,
    T, S, S), "meta": ..., "last": bool, "decode_s": float}`` or one ``{"video": i, "error":
    message}``. ``make_chunks(reader, item)`` yields ``(clips, meta)``; it runs in the worker
    processes."""

    def __init__(self, items: Sequence[VideoItem], todo: Sequence[int], make_chunks):
        self.items, self.todo, self.make_chunks = items, list(todo), make_chunks

    def __iter__(self):
        info = get_worker_info()
        todo = self.todo if info is None else self.todo[info.id::info.num_workers]
        for i in todo:
            item = self.items[i]
            t0 = time.perf_counter()
            pending = None
            try:
                # One decoding thread per worker process: the workers are the parallelism.
                with VideoReader(item.path, threads=0 if info is None else 1) as reader:
                    for clips, meta in self.make_chunks(reader, item):
                        if pending is not None:
                            yield pending
                        pending = {"video": i, "clips": clips, "meta": meta, "last": False,
                                   "decode_s": time.perf_counter() - t0}
                        t0 = time.perf_counter()
            except VIDEO_ERRORS as e:
                yield {"video": i, "error": f"{type(e).__name__}: {e}"}
                continue
            pending["last"] = True
            yield pending


def make_loader(dataset: ClipStream, workers: int, device: torch.device) -> DataLoader:
    """The chunks of ``dataset`` as they are, from ``workers`` processes, pinned on CUDA."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=2 if workers else None, persistent_workers=False)


def default_workers(device) -> int:
    """Decoding processes when none are asked for: on CUDA up to 8 (one core left to feed the
    GPU), so that decoding keeps up with the model; on the CPU 0, since the model already uses
    every core (on 2 cores, 1 or 2 workers cost 3% of the videos/s, measured)."""
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# ---------------------------------------------------------------------------------------------
# Checks and policies.

def autocast_for(device: torch.device, precision: str):
    """``(precision, context)``: ``"auto"`` resolved (bf16 autocast on CUDA, float32 elsewhere)
    and the autocast context the model runs under (disabled for float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" else "float32"
    if precision == "float32":
        return precision, torch.autocast(device.type, enabled=False)
    return precision, torch.autocast(device.type, dtype=getattr(torch, precision))


def check_model(model) -> None:
    """A TypeError unless ``model`` is a UniFormer, or a module with ``forward_features``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a UniFormer); got {type(model).__name__}")
    if not isinstance(model, UniFormer) and not hasattr(model, "forward_features"):
        raise TypeError(f"model: expected a UniFormer (with forward_features); got {type(model).__name__}")


def check_counts(*checks: Tuple[str, object, int]) -> None:
    """:func:`~uniformer_fast.data.video.check_count` on each ``(name, value, low)``."""
    for name, value, low in checks:
        check_count(name, value, low)


def model_device(model, device) -> torch.device:
    """The device to run on: the model's, or ``device``, where the model is then moved."""
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


# ---------------------------------------------------------------------------------------------
# The model side: batches across videos, and the run loop.

class Batcher:
    """Runs ``fn`` on batches of ``size`` clips gathered across chunks (a chunk may be split
    between two batches); reports outputs through ``done(tag, offset, outputs)``, ``offset`` being
    the position of the first output's clip in its chunk. ``fn``'s output has ``split(sizes)``
    along the batch, as a tensor ``(B, ...)``."""

    def __init__(self, fn, size: int, device: torch.device, done):
        self.fn, self.size, self.device, self.done = fn, size, device, done
        self.parts = collections.deque()  # [tag, offset, clips] not yet run
        self.count = 0
        self.model_s = 0.0

    def add(self, tag, clips: torch.Tensor) -> None:
        self.parts.append([tag, 0, clips.to(self.device, non_blocking=True)])
        self.count += clips.shape[0]
        while self.count >= self.size:
            self._run(self.size)

    def flush(self) -> None:
        while self.count:
            self._run(min(self.count, self.size))

    def _run(self, n):
        take, left = [], n
        while left:
            part = self.parts[0]
            tag, offset, clips = part
            k = min(left, clips.shape[0])
            take.append((tag, offset, clips[:k]))
            if k == clips.shape[0]:
                self.parts.popleft()
            else:
                part[1], part[2] = offset + k, clips[k:]
            left -= k
        self.count -= n
        t0 = time.perf_counter()
        out = self.fn(torch.cat([c for _, _, c in take]) if len(take) > 1 else take[0][2])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.model_s += time.perf_counter() - t0
        for (tag, offset, clips), o in zip(take, out.split([c.shape[0] for _, _, c in take])):
            self.done(tag, offset, o)


@dataclass
class RunStats:
    """Where the time of a run went. ``decode_s``: decoding and preprocessing, summed over the
    workers (they run in parallel with the model); ``model_s``: the model; ``wait_s``: this
    process waiting for decoded clips (the share of the run decoding bounds); ``wall_s``."""

    videos: int = 0
    clips: int = 0
    wall_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0
    wait_s: float = 0.0

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.videos} videos in {self.wall_s:.1f} s ({self.videos_per_s:.2f} videos/s, "
                f"{self.clips} clips): model {self.model_s:.1f} s, decoding {self.decode_s:.1f} s "
                f"(in workers), waiting for decoded clips {self.wait_s:.1f} s")


class ClipRun:
    """One pass of a model over the clips of ``items[i]`` for ``i`` in ``todo``.

    ``make_chunks(reader, item)`` yields ``(clips, meta)`` per video (see :class:`ClipStream`; it
    runs in the decoding workers). :meth:`run` puts the model in eval mode (and back), batches the
    clips across videos, calls :meth:`forward` under inference mode and ``autocast``, shows a bar
    per video named :attr:`name`, and reports each unreadable video (``"<name>: skipped <key>:
    <error>"`` on stderr, then in :attr:`failed`). A subclass says what becomes of the rest:

    - :meth:`forward`: clips ``(B, 3, T, S, S)`` -> outputs with ``split(sizes)`` along the batch;
    - :meth:`on_chunk`: a chunk of :class:`ClipStream`, before its clips are batched;
    - :meth:`on_output`: ``(tag, offset, out)``, ``tag`` the chunk's ``(video, meta, last)``,
      ``out`` the outputs of its clips from ``offset`` on (a chunk may span two batches);
    - :meth:`on_failure`: video ``i`` could not be read, after earlier chunks of it may have been
      batched;
    - :meth:`close`: the run is over, finished or interrupted.
    """

    name = "run"

    def __init__(self, model, items: Sequence[VideoItem], todo: Sequence[int], make_chunks, *, batch_size: int,
                 workers: int, device: torch.device, autocast, progress: bool):
        self.model, self.items, self.todo, self.make_chunks = model, items, list(todo), make_chunks
        self.batch_size, self.workers, self.device, self.autocast = batch_size, workers, device, autocast
        self.failed: List[Tuple[str, str]] = []  # (key, why) of each unreadable video
        self.stats = RunStats()
        self.bar = progress_bar(len(self.todo), self.name, enabled=progress, unit="video")

    def forward(self, clips: torch.Tensor):
        raise NotImplementedError

    def on_chunk(self, chunk: dict) -> None:
        pass

    def on_output(self, tag, offset: int, out) -> None:
        raise NotImplementedError

    def on_failure(self, i: int, error: str) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self) -> RunStats:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                loader = make_loader(ClipStream(self.items, self.todo, self.make_chunks), self.workers, self.device)
                self._feed(loader, Batcher(self._forward, self.batch_size, self.device, self.on_output))
        finally:
            self.bar.close()
            self.close()
            self.model.train(was_training)
        return self.stats

    def _forward(self, clips):
        with self.autocast:
            return self.forward(clips)

    def _feed(self, loader, batcher):
        stats = self.stats
        t_start = time.perf_counter()
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            chunk = next(it, None)
            stats.wait_s += time.perf_counter() - t0
            if chunk is None:
                break
            if "error" in chunk:
                self._fail(chunk["video"], chunk["error"])
            else:
                self.on_chunk(chunk)
                stats.decode_s += chunk["decode_s"]
                stats.clips += chunk["clips"].shape[0]
                batcher.add((chunk["video"], chunk["meta"], chunk["last"]), chunk["clips"])
            self.bar.set_postfix_str(f"model {batcher.model_s:.0f}s, waiting {stats.wait_s:.0f}s")
        batcher.flush()
        stats.model_s = batcher.model_s
        stats.wall_s = time.perf_counter() - t_start

    def _fail(self, i, error):
        key = self.items[i].key
        self.failed.append((key, error))
        self.on_failure(i, error)
        self.bar.write(f"{self.name}: skipped {key}: {error}", file=sys.stderr)
        self.bar.update(1)
