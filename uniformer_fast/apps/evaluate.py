"""The official multi-view evaluation over a whole dataset.

    from uniformer_fast import create_model, evaluate, load_checkpoint
    model = create_model("uniformer_small", num_classes=400)
    load_checkpoint(model, "uniformer_small_k400_16x4.pth")
    result = evaluate(model, "k400_val.csv", root="/data/k400", views=4, crops=1, workers=8, out_dir="eval")
    print(result.top1, result.top5, result.mean_class_accuracy)

This is what ``uniformer-fast evaluate`` runs, so a notebook gets the CLI's numbers. A video that
cannot be read (missing, damaged) is reported and skipped; the rest go on. With ``out_dir``,
finished videos are written as they finish and a second run with the same settings skips them
(resume after an interruption). Decoding runs in worker processes beside the model
(:mod:`uniformer_fast.apps.inference`).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data.lists import VideoItem, as_video_items
from ..data.video import PROTOCOLS, VideoReader, load_views
from ..files import atomic_write
from .inference import ClipRun, RunStats, autocast_for, check_counts, check_model, default_workers, model_device

__all__ = ["evaluate", "EvaluationResult", "Prediction", "accuracy", "PREDICTIONS_CSV", "FAILED_CSV", "METRICS_JSON",
           "SETTINGS_JSON"]


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


# The files of out_dir.
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

    Each video gives ``views`` temporal views (:func:`~uniformer_fast.data.video.dense_indices`
    for ``protocol="kinetics"``, :func:`~uniformer_fast.data.video.segment_indices` for ``"sth"``)
    of ``crops`` (1 or 3) spatial crops each; the model's scores over all ``views * crops`` clips
    are averaged: softmax probabilities (``ensemble="softmax"``) or logits (``"logits"``; the
    official test loop sums the raw logits, the same ranking).

    Args:
        model: a UniFormer (in eval mode while it runs; moved to ``device`` when one is given).
        videos: a list file (:func:`~uniformer_fast.data.lists.read_video_list`), or a sequence of
            ``(path, label)`` pairs, paths or :class:`~uniformer_fast.data.lists.VideoItem` s;
            ``root`` is joined in front of relative paths.
        batch_size: clips per model call (across videos). workers: decoding processes (0: in this
            process; None: :func:`~uniformer_fast.apps.inference.default_workers` for the device).
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 on the CPU), ``"float32"``,
            ``"bfloat16"`` or ``"float16"`` (autocast).
        out_dir: write ``predictions.csv`` (per video: label and the top-``top`` classes with
            scores, also named when ``class_names`` are given, by default ``model.class_names``), ``failed.csv`` (videos that could
            not be read and why), ``metrics.json`` and ``settings.json``; a later call with the
            same settings and ``out_dir`` skips the videos already in ``predictions.csv``.

    Returns:
        :class:`EvaluationResult` with top-1, top-5 and mean per-class accuracy.
    """
    check_model(model)
    items = as_video_items(videos, root)
    device = model_device(model, device)
    workers = default_workers(device) if workers is None else workers
    check_counts(("num_frames", num_frames, 1), ("sample_rate", sample_rate, 1), ("views", views, 1),
                 ("size", size, 1), ("batch_size", batch_size, 1), ("workers", workers, 0), ("top", top, 1))
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
    if class_names is None and len(getattr(model, "class_names", None) or ()) == num_classes:
        class_names = model.class_names  # set from the checkpoint's dataset (load_checkpoint)
    precision, autocast = autocast_for(device, precision)
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
    test_views = _TestViews(num_frames, sample_rate, views, crops, size, protocol, short_side)
    run = _Evaluation(model, items, todo, test_views, batch_size=batch_size, workers=workers, device=device,
                      autocast=autocast, progress=progress, clips_per_video=views * crops, ensemble=ensemble,
                      top=top, done=done, writer=writer)
    stats = run.run()
    stats.videos = len(todo) - len(run.failed)
    predictions = [done[i.key] for i in items if i.key in done]
    top1, top5, mean_class = accuracy(predictions)
    result = EvaluationResult(top1, top5, mean_class, predictions, run.failed, stats)
    if out_dir is not None:
        _write_evaluation(out_dir, result, items, settings, top, class_names, precision)
    return result


@dataclass(frozen=True)
class _TestViews:
    """A video's chunk for :func:`evaluate`: its ``views * crops`` test clips at once, float32
    ``(views * crops, 3, num_frames, size, size)`` (run in the decoding workers)."""

    num_frames: int
    sample_rate: int
    views: int
    crops: int
    size: int
    protocol: str
    short_side: Optional[int]

    def __call__(self, reader: VideoReader, item: VideoItem):
        # A Something-Something list gives the frame count (load_views clamps it to the video's).
        yield load_views(None, self.num_frames, self.sample_rate, self.views, self.crops, self.size,
                         protocol=self.protocol, short_side=self.short_side, reader=reader,
                         total=item.num_frames or None), None


class _Evaluation(ClipRun):
    """The model's scores per video, ensembled over its clips into a :class:`Prediction` in
    ``done`` (and ``writer``) once all ``clips_per_video`` are in."""

    name = "evaluate"

    def __init__(self, model, items, todo, make_chunks, *, clips_per_video, ensemble, top, done, writer, **kwargs):
        super().__init__(model, items, todo, make_chunks, **kwargs)
        self.clips_per_video, self.ensemble, self.top = clips_per_video, ensemble, top
        self.done, self.writer = done, writer
        self.sums: Dict[int, torch.Tensor] = {}  # video -> its clips' scores summed so far, (num_classes,)
        self.counts: Dict[int, int] = {}  # video -> how many clips were summed
        self.decoded = set()  # the videos whose last chunk has come

    def forward(self, clips):
        return self.model(clips)

    def on_chunk(self, chunk):
        if chunk["last"]:
            self.decoded.add(chunk["video"])

    def on_output(self, tag, offset, out):
        i = tag[0]
        out = out.float()
        out = out.softmax(-1) if self.ensemble == "softmax" else out
        self.sums[i] = self.sums.get(i, 0) + out.sum(0).cpu()
        self.counts[i] = self.counts.get(i, 0) + out.shape[0]
        if i in self.decoded and self.counts[i] == self.clips_per_video:
            self._finish(i)

    def on_failure(self, i, error):
        if self.writer is not None:
            self.writer.fail(self.items[i].key, error)

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def _finish(self, i):
        item = self.items[i]
        scores = self.sums.pop(i) / self.clips_per_video
        self.counts.pop(i)
        values, classes = scores.topk(self.top)
        pred = Prediction(item.key, item.label, classes.tolist(), values.tolist())
        self.done[item.key] = pred
        if self.writer is not None:
            self.writer.add(pred)
        self.bar.update(1)


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
