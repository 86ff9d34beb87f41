"""Inference over whole datasets: the official multi-view evaluation and sliding-window feature
extraction, with decoding in worker processes overlapped with the model.

    from uniformer_fast import create_model, load_checkpoint
    from uniformer_fast.evaluation import evaluate, extract
    model = create_model("uniformer_small", num_classes=400)
    load_checkpoint(model, "uniformer_small_k400_16x4.pth")
    result = evaluate(model, "k400_val.csv", root="/data/k400", views=4, crops=1, workers=8, out_dir="eval")
    print(result.top1, result.top5, result.mean_class_accuracy)
    extract(model, "videos/", "features/", window=16, stride=16, sample_rate=4)

Both are what ``uniformer-fast evaluate`` and ``uniformer-fast extract`` run, so a notebook gets the
CLI's numbers. A video that cannot be read (missing, damaged) is reported and skipped; the rest
go on. With ``out_dir``, finished videos are written as they finish and a second run with the same
settings skips them (resume after an interruption).

How work flows: a :class:`torch.utils.data.DataLoader` over an iterable dataset hands the videos
out to ``workers`` processes (0: decode in this process); each opens a
:class:`~uniformer_fast.video.VideoReader`, decodes only the frames its clips use and yields them
in chunks of at most ``batch_size`` clips; this process runs the model on batches of
``batch_size`` clips (across videos) and gathers each video's results when its last chunk is done.
On CUDA the chunks come in pinned memory and are copied without blocking, and the model runs
under bf16 autocast unless ``precision`` says otherwise.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .files import atomic_write
from .video import PROTOCOLS, VIDEO_EXTENSIONS, VideoDecodeError, VideoReader, load_views, to_views, window_indices

__all__ = ["VideoItem", "read_video_list", "find_videos", "evaluate", "extract", "default_workers",
           "EvaluationResult", "ExtractionResult", "PRECISIONS"]

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
LIST_EXTENSIONS = (".csv", ".txt", ".lst", ".list")
# What makes one video unreadable; anything else is a bug and stops the run.
VIDEO_ERRORS = (VideoDecodeError, OSError)


@dataclass(frozen=True)
class VideoItem:
    """One video of a dataset: ``key`` as the list writes it (the id in every output), ``path``
    where it is read from, ``label`` its class index (None when unlabelled), ``num_frames`` the
    frame count a Something-Something list gives (None otherwise)."""

    key: str
    path: str
    label: Optional[int] = None
    num_frames: Optional[int] = None


def read_video_list(path, root: Optional[str] = None, *, labelled: bool = True) -> List[VideoItem]:
    """The videos of an official list file.

    Lines are ``path label`` (Kinetics; separated by a comma or by white space, the official
    ``PATH_LABEL_SEPARATOR``), ``path num_frames label`` (the Something-Something lists) or, with
    ``labelled=False``, just ``path``. ``root`` is joined in front of relative paths (the official
    ``PATH_PREFIX``). Blank lines are skipped; anything else that does not parse is a ValueError
    naming the file and line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video list not found: {path!r}")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")] if "," in line else line.split()
            label = frames = None
            if len(parts) >= 3 and _is_int(parts[-1]) and _is_int(parts[-2]):
                key, frames, label = (" " if "," not in line else ",").join(parts[:-2]), int(parts[-2]), int(parts[-1])
            elif len(parts) >= 2 and _is_int(parts[-1]):
                key, label = (" " if "," not in line else ",").join(parts[:-1]), int(parts[-1])
            elif not labelled:
                key = line
            else:
                raise ValueError(f"{path}:{lineno}: expected 'path label' or 'path num_frames label' "
                                 f"(a comma or spaces between); got {line!r}")
            if label is not None and label < 0:
                raise ValueError(f"{path}:{lineno}: a label must be >= 0; got {label}")
            if labelled and label is None:
                raise ValueError(f"{path}:{lineno}: no label in {line!r}")
            full = key if root is None or os.path.isabs(key) else os.path.join(root, key)
            items.append(VideoItem(key, full, label, frames))
    if not items:
        raise ValueError(f"{path}: no videos listed")
    return items


def _is_int(text: str) -> bool:
    return text.isdigit() or (text[:1] == "-" and text[1:].isdigit())


def find_videos(source) -> List[VideoItem]:
    """The videos ``source`` names: one video file, a directory (its video files, recursively,
    keyed by the path below it) or a list file (:func:`read_video_list`, labels optional)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        items = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(VIDEO_EXTENSIONS):
                    full = os.path.join(dirpath, name)
                    items.append(VideoItem(os.path.relpath(full, source), full))
        if not items:
            raise ValueError(f"{source!r}: no videos ({', '.join(VIDEO_EXTENSIONS)}) in this directory")
        return items
    if not os.path.exists(source):
        raise FileNotFoundError(f"not found: {source!r}")
    if source.lower().endswith(LIST_EXTENSIONS):
        return read_video_list(source, os.path.dirname(source) or None, labelled=False)
    return [VideoItem(os.path.basename(source), source)]


def _items(videos, root) -> List[VideoItem]:
    if isinstance(videos, (str, os.PathLike)):
        return read_video_list(videos, root)
    items = []
    for v in videos:
        if isinstance(v, VideoItem):
            items.append(v)
        elif isinstance(v, (tuple, list)) and len(v) == 2:
            key, label = os.fspath(v[0]), v[1]
            full = key if root is None or os.path.isabs(key) else os.path.join(root, key)
            items.append(VideoItem(key, full, None if label is None else int(label)))
        elif isinstance(v, (str, os.PathLike)):
            key = os.fspath(v)
            items.append(VideoItem(key, key if root is None or os.path.isabs(key) else os.path.join(root, key)))
        else:
            raise TypeError(f"videos: expected a list file, or (path, label) pairs, paths or VideoItems; "
                            f"got an element {v!r}")
    if not items:
        raise ValueError("videos: empty")
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"videos: {dup!r} is listed twice (each video is an id in the outputs)")
    return items


# ---------------------------------------------------------------------------------------------
# The loader: videos decoded in workers, handed over in chunks of clips.

class _ClipStream(IterableDataset):
    """Yields, per video, chunks ``{"video": i, "clips": (n, 3, T, S, S), "meta": ..., "last":
    bool, "decode_s": float}`` or one ``{"video": i, "error": message}``. ``make_chunks(reader,
    item)`` yields ``(clips, meta)``."""

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


def _loader(dataset, workers, device):
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=2 if workers else None, persistent_workers=False)


def default_workers(device) -> int:
    """Decoding processes when none are asked for: on CUDA up to 8 (one core left to feed the
    GPU), so that decoding keeps up with the model; on the CPU 0, since the model already uses
    every core (on 2 cores, 1 or 2 workers cost 3% of the videos/s, measured)."""
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _autocast(device, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" else "float32"
    if precision == "float32":
        return precision, torch.autocast(device.type, enabled=False)
    return precision, torch.autocast(device.type, dtype=getattr(torch, precision))


def _check_model(model):
    from .model import UniFormer
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a UniFormer); got {type(model).__name__}")
    if not isinstance(model, UniFormer) and not hasattr(model, "forward_features"):
        raise TypeError(f"model: expected a UniFormer (with forward_features); got {type(model).__name__}")


def _device_of(model, device):
    """The device to run on: the model's, or ``device``, where the model is then moved."""
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


class _Batcher:
    """Runs ``fn`` on batches of ``size`` clips gathered across chunks (a chunk may be split
    between two batches); reports outputs through ``done(tag, offset, outputs)``, ``offset`` being
    the position of the first output's clip in its chunk."""

    def __init__(self, fn, size, device, done):
        self.fn, self.size, self.device, self.done = fn, size, device, done
        self.parts = collections.deque()  # [tag, offset, clips] not yet run
        self.count = 0
        self.model_s = 0.0

    def add(self, tag, clips):
        self.parts.append([tag, 0, clips.to(self.device, non_blocking=True)])
        self.count += clips.shape[0]
        while self.count >= self.size:
            self._run(self.size)

    def flush(self):
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


def _progress(total, desc, enabled):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm  # a dependency
    return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True)


class _NoProgress:
    def update(self, n=1):
        pass

    @staticmethod
    def write(s, file=None):
        print(s, file=file or sys.stderr)

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


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


def _run(loader, batcher, on_item, stats, bar):
    """Feeds the loader's chunks to the batcher; ``on_item(item)`` sees each item first."""
    t_start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        stats.wait_s += time.perf_counter() - t0
        if item is None:
            break
        if on_item(item) and "clips" in item:
            stats.decode_s += item["decode_s"]
            stats.clips += item["clips"].shape[0]
            batcher.add((item["video"], item["meta"], item["last"]), item["clips"])
        bar.set_postfix_str(f"model {batcher.model_s:.0f}s, waiting {stats.wait_s:.0f}s")
    batcher.flush()
    stats.model_s = batcher.model_s
    stats.wall_s = time.perf_counter() - t_start


# ---------------------------------------------------------------------------------------------
# evaluate

@dataclass
class Prediction:
    """One video's result: its top-k classes and ensembled scores, best first."""

    video: str
    label: Optional[int]
    classes: List[int]
    scores: List[float]


@dataclass
class EvaluationResult:
    """Accuracies over the scored videos that have labels (None when none has), every
    prediction in list order, the videos that could not be read with why, and the timing."""

    top1: Optional[float]
    top5: Optional[float]
    mean_class_accuracy: Optional[float]
    predictions: List[Prediction]
    failed: List[Tuple[str, str]]
    stats: RunStats = field(default_factory=RunStats)

    @property
    def num_scored(self):
        return len(self.predictions)

    def summary(self) -> str:
        if self.top1 is None:
            acc = "no labels"
        else:
            acc = (f"top-1 {self.top1 * 100:.2f}%, top-5 {self.top5 * 100:.2f}%, "
                   f"mean class accuracy {self.mean_class_accuracy * 100:.2f}%")
        return f"{self.num_scored} videos scored, {len(self.failed)} unreadable: {acc}"


def accuracy(predictions: Sequence[Prediction]) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(top-1, top-5, mean per-class top-1) over the predictions that have a label; the mean
    per-class accuracy averages over the classes that occur as labels."""
    labelled = [p for p in predictions if p.label is not None]
    if not labelled:
        return None, None, None
    top1 = sum(p.classes[0] == p.label for p in labelled) / len(labelled)
    top5 = sum(p.label in p.classes[:5] for p in labelled) / len(labelled)
    per_class: Dict[int, List[bool]] = {}
    for p in labelled:
        per_class.setdefault(p.label, []).append(p.classes[0] == p.label)
    mean_class = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return top1, top5, mean_class


PREDICTIONS_CSV = "predictions.csv"
FAILED_CSV = "failed.csv"
METRICS_JSON = "metrics.json"
SETTINGS_JSON = "settings.json"


def evaluate(model, videos, *, root: Optional[str] = None, num_frames: int = 16, sample_rate: int = 4,
             views: int = 4, crops: int = 1, size: int = 224, protocol: str = "kinetics",
             short_side: Optional[int] = None, ensemble: str = "softmax", batch_size: int = 8,
             workers: Optional[int] = None,
             device=None, precision: str = "auto", out_dir=None, class_names: Optional[Sequence[str]] = None,
             top: int = 5, progress: bool = True) -> EvaluationResult:
    """Score a labelled list of videos with the official multi-view test protocol.

    Each video gives ``views`` temporal views (:func:`~uniformer_fast.video.dense_indices` for
    ``protocol="kinetics"``, :func:`~uniformer_fast.video.segment_indices` for ``"sth"``) of
    ``crops`` (1 or 3) spatial crops each; the model's scores over all ``views * crops`` clips are
    averaged: softmax probabilities (``ensemble="softmax"``) or logits (``"logits"``; the
    official test loop sums the raw logits, the same ranking).

    Args:
        model: a UniFormer (in eval mode while it runs; moved to ``device`` when one is given).
        videos: a list file (:func:`read_video_list`), or a sequence of ``(path, label)`` pairs,
            paths or :class:`VideoItem` s; ``root`` is joined in front of relative paths.
        batch_size: clips per model call (across videos). workers: decoding processes (0: in this
            process; None: :func:`default_workers` for the device).
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 on the CPU), ``"float32"``,
            ``"bfloat16"`` or ``"float16"`` (autocast).
        out_dir: write ``predictions.csv`` (per video: label and the top-``top`` classes with
            scores, also named when ``class_names`` are given), ``failed.csv`` (videos that could
            not be read and why), ``metrics.json`` and ``settings.json``; a later call with the
            same settings and ``out_dir`` skips the videos already in ``predictions.csv``.

    Returns:
        :class:`EvaluationResult` with top-1, top-5 and mean per-class accuracy.
    """
    _check_model(model)
    items = _items(videos, root)
    device = _device_of(model, device)
    workers = default_workers(device) if workers is None else workers
    for name, value, low in (("num_frames", num_frames, 1), ("sample_rate", sample_rate, 1), ("views", views, 1),
                             ("size", size, 1), ("batch_size", batch_size, 1), ("workers", workers, 0),
                             ("top", top, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}; got {value!r}")
    if crops not in (1, 3):
        raise ValueError(f"crops: expected 1 or 3; got {crops!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if ensemble not in ("softmax", "logits"):
        raise ValueError(f"ensemble: expected 'softmax' or 'logits'; got {ensemble!r}")
    if short_side is not None and (not isinstance(short_side, int) or short_side < size):
        raise ValueError(f"short_side: expected an integer >= size ({size}); got {short_side!r}")
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        raise ValueError("model: has no classifier head (num_classes 0): use extract() for features")
    bad = [i for i in items if i.label is not None and not 0 <= i.label < num_classes]
    if bad:
        raise ValueError(f"{bad[0].key}: label {bad[0].label} outside the model's {num_classes} classes")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for a model of {num_classes} classes")
    precision, autocast = _autocast(device, precision)
    top = min(top, num_classes)

    settings = {"kind": "evaluate", "num_frames": num_frames, "sample_rate": sample_rate, "views": views,
                "crops": crops, "size": size, "protocol": protocol, "short_side": short_side or size,
                "ensemble": ensemble, "num_classes": num_classes, "top": top}
    done: Dict[str, Prediction] = {}
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        done = _resume_evaluation(out_dir, settings, {i.key for i in items})
    todo = [k for k, item in enumerate(items) if item.key not in done]
    writer = _PredictionWriter(out_dir, top, class_names) if out_dir is not None else None

    def make_chunks(reader, item):
        # A Something-Something list gives the frame count (load_views clamps it to the video's).
        yield load_views(None, num_frames, sample_rate, views, crops, size, protocol=protocol,
                         short_side=short_side, reader=reader, total=item.num_frames or None), None

    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {}
    last_seen = set()
    failed: List[Tuple[str, str]] = []
    per_video = views * crops
    bar = _progress(len(todo), "evaluate", progress)

    def finish(i):
        item = items[i]
        scores = sums.pop(i) / per_video
        counts.pop(i)
        values, classes = scores.topk(top)
        pred = Prediction(item.key, item.label, classes.tolist(), values.tolist())
        done[item.key] = pred
        if writer is not None:
            writer.add(pred)
        bar.update(1)

    def on_output(tag, offset, out):
        i = tag[0]
        out = out.float()
        out = out.softmax(-1) if ensemble == "softmax" else out
        sums[i] = sums.get(i, 0) + out.sum(0).cpu()
        counts[i] = counts.get(i, 0) + out.shape[0]
        if i in last_seen and counts[i] == per_video:
            finish(i)

    def on_item(item):
        i = item["video"]
        if "error" in item:
            failed.append((items[i].key, item["error"]))
            if writer is not None:
                writer.fail(items[i].key, item["error"])
            bar.write(f"evaluate: skipped {items[i].key}: {item['error']}", file=sys.stderr)
            bar.update(1)
            return False
        if item["last"]:
            last_seen.add(i)
        return True

    was_training = model.training
    model.eval()
    stats = RunStats()

    def forward(x):
        with autocast:
            return model(x)

    try:
        with torch.inference_mode():
            loader = _loader(_ClipStream(items, todo, make_chunks), workers, device)
            _run(loader, _Batcher(forward, batch_size, device, on_output), on_item, stats, bar)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        model.train(was_training)
    stats.videos = len(todo) - len(failed)
    predictions = [done[i.key] for i in items if i.key in done]
    top1, top5, mean_class = accuracy(predictions)
    result = EvaluationResult(top1, top5, mean_class, predictions, failed, stats)
    if out_dir is not None:
        _write_evaluation(out_dir, result, items, settings, top, class_names, precision)
    return result


class _PredictionWriter:
    """Appends each finished video to predictions.csv (and each unreadable one to failed.csv) at
    once, so that an interrupted run keeps them."""

    def __init__(self, out_dir, top, class_names):
        self.out_dir, self.top, self.names = out_dir, top, class_names
        self.f = open(os.path.join(out_dir, PREDICTIONS_CSV), "a", newline="", encoding="utf-8")
        self.csv = csv.writer(self.f)
        if self.f.tell() == 0:
            self.csv.writerow(_prediction_header(top, class_names))
        self.failed = open(os.path.join(out_dir, FAILED_CSV), "w", newline="", encoding="utf-8")
        self.failed_csv = csv.writer(self.failed)
        self.failed_csv.writerow(["video", "error"])

    def add(self, pred):
        self.csv.writerow(_prediction_row(pred, self.names))
        self.f.flush()

    def fail(self, key, error):
        self.failed_csv.writerow([key, error])
        self.failed.flush()

    def close(self):
        self.f.close()
        self.failed.close()


def _prediction_header(top, class_names):
    head = ["video", "label"]
    for k in range(1, top + 1):
        head += [f"class{k}", f"score{k}"] + ([f"name{k}"] if class_names else [])
    return head


def _prediction_row(pred, class_names):
    row = [pred.video, "" if pred.label is None else pred.label]
    for c, s in zip(pred.classes, pred.scores):
        row += [c, repr(float(s))] + ([class_names[c]] if class_names else [])
    return row


def _resume_evaluation(out_dir, settings, keys) -> Dict[str, Prediction]:
    """The predictions a previous run with these settings left in ``out_dir``; the file is
    rewritten without a torn last line, so that appending goes on cleanly."""
    os.makedirs(out_dir, exist_ok=True)
    settings_path = os.path.join(out_dir, SETTINGS_JSON)
    pred_path = os.path.join(out_dir, PREDICTIONS_CSV)
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            before = json.load(f)
        if before != settings:
            changed = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}"
                                for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
            raise ValueError(f"out_dir {out_dir!r} holds results of other settings ({changed}): "
                             f"use another directory or remove it")
    elif os.path.exists(pred_path):
        raise ValueError(f"out_dir {out_dir!r} has {PREDICTIONS_CSV} but no {SETTINGS_JSON}: "
                         f"not a directory this package wrote; use another one")
    atomic_write(settings_path, lambda f: json.dump(settings, f, indent=1), text=True)
    done: Dict[str, Prediction] = {}
    if not os.path.exists(pred_path):
        return done
    top = settings["top"]
    with open(pred_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, rows = (rows[0], rows[1:]) if rows else (None, [])
    width = len(header) if header else 0
    per = (width - 2) // top if width > 2 else 0
    good = []
    for row in rows:
        if len(row) != width or row[0] not in keys:
            continue  # a torn last line, or a video no longer listed
        try:
            classes = [int(row[2 + k * per]) for k in range(top)]
            scores = [float(row[3 + k * per]) for k in range(top)]
            label = int(row[1]) if row[1] != "" else None
        except ValueError:
            continue
        done[row[0]] = Prediction(row[0], label, classes, scores)
        good.append(row)

    def rewrite(f):
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(good)
    if header is not None:
        atomic_write(pred_path, rewrite, text=True)
    return done


def _write_evaluation(out_dir, result, items, settings, top, class_names, precision):
    # predictions.csv in list order, replacing the one written in completion order.
    def write_predictions(f):
        w = csv.writer(f)
        w.writerow(_prediction_header(top, class_names))
        for p in result.predictions:
            w.writerow(_prediction_row(p, class_names))
    atomic_write(os.path.join(out_dir, PREDICTIONS_CSV), write_predictions, text=True)
    metrics = {"videos": len(items), "scored": result.num_scored, "failed": len(result.failed),
               "top1": result.top1, "top5": result.top5, "mean_class_accuracy": result.mean_class_accuracy,
               "precision": precision, **{f"run_{k}": v for k, v in asdict(result.stats).items()},
               "run_videos_per_s": result.stats.videos_per_s, "settings": settings}
    atomic_write(os.path.join(out_dir, METRICS_JSON), lambda f: json.dump(metrics, f, indent=1), text=True)


# ---------------------------------------------------------------------------------------------
# extract

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
    (:func:`~uniformer_fast.video.window_indices`: whole windows only; a video shorter than one
    window gives one window, its last frame repeated), the short side resized to ``size`` and the
    centre crop taken (the single-view test transform). Per video ``out_dir/<name>.npy`` holds the
    pooled features float32 ``(num_windows, C)`` (``model.forward_features`` averaged over time
    and space, what the classifier sees), ``<name>.json`` the window start frames and times in
    seconds, and with ``feature_map`` ``<name>.map.npy`` the final maps ``(num_windows, C, T', H',
    W')``; ``<name>`` is the video's path below its directory or list without the extension
    (:func:`feature_name`). Files are written atomically, the ``.json`` last: a video whose
    ``.json`` exists is skipped (resume).

    ``videos``: a video file, a directory (searched recursively), a list file, or a sequence of
    paths / :class:`VideoItem` s. The other arguments are as :func:`evaluate`'s.
    """
    _check_model(model)
    if isinstance(videos, (str, os.PathLike)) and root is None:
        items = find_videos(videos)
    else:
        items = _items(videos, root)
    device = _device_of(model, device)
    workers = default_workers(device) if workers is None else workers
    for name, value, low in (("window", window, 1), ("stride", stride, 1), ("sample_rate", sample_rate, 1),
                             ("size", size, 1), ("batch_size", batch_size, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}; got {value!r}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not a directory")
    names = [feature_name(i.key) for i in items]
    if len(set(names)) != len(names):  # a.mp4 and a.avi side by side: keep their extensions
        names = [i.key for i in items]
    precision, autocast = _autocast(device, precision)

    skipped, todo = [], []
    for k, name in enumerate(names):
        (skipped if os.path.exists(os.path.join(out_dir, name + ".json")) else todo).append(k)
    skipped = [items[k].key for k in skipped]

    def make_chunks(reader, item):
        windows = window_indices(len(reader), window, stride, sample_rate)
        n = windows.shape[0]
        for lo in range(0, n, batch_size):
            part = windows[lo:lo + batch_size]
            frames = reader.get_frames(part.flatten())
            clips = torch.stack([to_views(f, size, 1)[0] for f in frames.split(window)])
            meta = {"num_windows": n, "first": lo}
            if lo == 0:
                times = reader.frame_times
                meta.update(start_frames=windows[:, 0].tolist(), fps=reader.fps, num_frames=len(reader),
                            start_times=None if times is None else [times[s] for s in windows[:, 0].tolist()])
            yield clips, meta

    state: Dict[int, dict] = {}
    written: Dict[str, str] = {}
    failed: List[Tuple[str, str]] = []
    bar = _progress(len(todo), "extract", progress)

    def on_item(item):
        i = item["video"]
        if "error" in item:
            st = state.pop(i, None)
            if st is not None and st["map_file"] is not None:
                st["map_file"].discard()
            failed.append((items[i].key, item["error"]))
            bar.write(f"extract: skipped {items[i].key}: {item['error']}", file=sys.stderr)
            bar.update(1)
            return False
        meta = item["meta"]
        if meta["first"] == 0:
            state[i] = {"meta": meta, "pooled": [None] * meta["num_windows"], "left": meta["num_windows"],
                        "last": False, "map_file": None}
        if item["last"]:
            state[i]["last"] = True
        return True

    def on_output(tag, offset, out):
        i, meta, _last = tag
        first = meta["first"] + offset
        st = state.get(i)
        if st is None:  # the video failed after this chunk was queued: its results are dropped
            return
        fmap, pooled = out
        for k in range(pooled.shape[0]):
            st["pooled"][first + k] = pooled[k].float().cpu().numpy()
        if feature_map:
            if st["map_file"] is None:
                st["map_file"] = _ArrayFile(os.path.join(out_dir, names[i] + ".map.npy"),
                                            (st["meta"]["num_windows"], *fmap.shape[1:]))
            st["map_file"].array[first:first + fmap.shape[0]] = fmap.float().cpu().numpy()
        st["left"] -= pooled.shape[0]
        if st["last"] and st["left"] == 0:
            finish(i)

    def finish(i):
        st = state.pop(i)
        meta = st["meta"]
        base = os.path.join(out_dir, names[i])
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        pooled = np.stack(st["pooled"]).astype(np.float32)
        atomic_write(base + ".npy", lambda f: np.save(f, pooled))
        if st["map_file"] is not None:
            st["map_file"].commit()
        info = {"video": items[i].key, "path": items[i].path, "num_frames": meta["num_frames"], "fps": meta["fps"],
                "window": window, "stride": stride, "sample_rate": sample_rate, "size": size,
                "num_windows": meta["num_windows"], "feature_dim": int(pooled.shape[1]),
                "start_frames": meta["start_frames"], "start_times": meta["start_times"],
                "feature_map": feature_map, "precision": precision}
        atomic_write(base + ".json", lambda f: json.dump(info, f, indent=1), text=True)
        written[items[i].key] = base + ".npy"
        bar.update(1)

    was_training = model.training
    model.eval()
    stats = RunStats()

    def forward(x):
        with autocast:
            fmap = model.forward_features(x)
            return _Pair(fmap if feature_map else None, model.forward_head(fmap, pre_logits=True))

    os.makedirs(out_dir, exist_ok=True)
    batcher = _Batcher(forward, batch_size, device, on_output)
    try:
        with torch.inference_mode():
            loader = _loader(_ClipStream(items, todo, make_chunks), workers, device)
            _run(loader, batcher, on_item, stats, bar)
    finally:
        bar.close()
        for st in state.values():  # interrupted: no half-written maps left behind
            if st["map_file"] is not None:
                st["map_file"].discard()
        model.train(was_training)
    stats.videos = len(written)
    return ExtractionResult(written, skipped, failed, stats)


class _Pair:
    """Two batch outputs (the feature map, or None, and the pooled features) that the batcher
    splits along the batch as one."""

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
