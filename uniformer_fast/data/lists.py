"""Which videos a dataset holds: the official list files, folders of videos, class-name files.

    items = read_video_list("k400_val.csv", root="/data/k400")   # [VideoItem(key, path, label, num_frames)]
    items = find_videos("videos/")                               # every video below a folder, unlabelled
    names = read_class_names("k400_classes.txt")                 # index -> class name

A :class:`VideoItem` is what the loaders read: its ``key`` names the video in every output,
``path`` is where it is decoded from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

from .video import VIDEO_EXTENSIONS, VideoDecodeError

__all__ = ["VideoItem", "read_video_list", "find_videos", "as_video_items", "read_class_names", "VIDEO_ERRORS",
           "LIST_EXTENSIONS"]

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


def _under_root(key: str, root: Optional[str]) -> str:
    """Where the video ``key`` lies: ``root/key``, or ``key`` itself when absolute or without a root."""
    return key if root is None or os.path.isabs(key) else os.path.join(root, key)


def _is_integer_text(text: str) -> bool:
    """Whether a list file's field reads as an integer (a label or a frame count), sign included."""
    return text.isdigit() or (text[:1] == "-" and text[1:].isdigit())


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
            if len(parts) >= 3 and _is_integer_text(parts[-1]) and _is_integer_text(parts[-2]):
                key, frames, label = (" " if "," not in line else ",").join(parts[:-2]), int(parts[-2]), int(parts[-1])
            elif len(parts) >= 2 and _is_integer_text(parts[-1]):
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
            items.append(VideoItem(key, _under_root(key, root), label, frames))
    if not items:
        raise ValueError(f"{path}: no videos listed")
    return items


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


def as_video_items(videos, root: Optional[str] = None) -> List[VideoItem]:
    """``videos`` as :class:`VideoItem` s: a list file (:func:`read_video_list`, labelled), or a
    sequence of ``(path, label)`` pairs, paths or VideoItems, ``root`` joined in front of relative
    paths. A ValueError when it is empty or names a video twice (each key is an id in the outputs)."""
    if isinstance(videos, (str, os.PathLike)):
        return read_video_list(videos, root)
    items = []
    for v in videos:
        if isinstance(v, VideoItem):
            items.append(v)
        elif isinstance(v, (tuple, list)) and len(v) == 2:
            key, label = os.fspath(v[0]), v[1]
            items.append(VideoItem(key, _under_root(key, root), None if label is None else int(label)))
        elif isinstance(v, (str, os.PathLike)):
            key = os.fspath(v)
            items.append(VideoItem(key, _under_root(key, root)))
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


def read_class_names(path) -> List[str]:
    """Class names, index -> name, from a text file (one per line, blank lines skipped) or a
    ``.json`` file: a list of names or a ``{name: index}`` map (the Kinetics label-map form).
    A FileNotFoundError or ValueError naming the file when it cannot be read as one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
        if isinstance(data, dict):  # {"class name": index}, the Kinetics label-map form
            names = [None] * len(data)
            for name, idx in data.items():
                if type(idx) is not int or not 0 <= idx < len(data) or names[idx] is not None:  # not bool
                    raise ValueError(f"{path}: a JSON label map must map each class name to a distinct index "
                                     f"0..{len(data) - 1}")
                names[idx] = name
        elif isinstance(data, list) and all(isinstance(n, str) for n in data):
            names = data
        else:
            raise ValueError(f"{path}: expected a JSON list of class names or a {{name: index}} map")
        if not names:
            raise ValueError(f"{path}: no class names (an empty JSON {type(data).__name__})")
        return names
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names (expected one per line)")
    return names
