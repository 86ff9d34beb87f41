"""Class names in the order the official checkpoints' heads use, shipped with the package.

    names = class_names("k400")          # 400 names; names[i] is what logit i means
    dataset_of("uniformer_small_k400_16x8.pth")   # "k400"

Where each order comes from (each file in ``classes/`` holds one name per line, index order, so it
can also be passed to ``--labels``):

- ``k400``: the official repo's ``data_list/k400/kinetics_400_categroies.txt``, which is *not*
  alphabetical (0 is "riding a bike"). An A-Z list scores near chance with the official weights, the
  trap the official repo's issues #38, #66 and #72 report.
- ``k600``: the indices of the official ``data_list/k600/k600_{common,special}_category.list``
  (0 is "feeding fish"; its ``val.csv`` folders agree at every index), spelled as the Kinetics
  annotations spell them ("petting animal (not cat)", not the lists' "petting_animal_not_cat").
- ``sthv2``: ``something-something-v2-labels.json``'s index order (its keys A-Z, brackets removed),
  which the official split files' labels follow: validation video 74225 ("Spinning [something] that
  quickly stops spinning") has label 140 there, 116154 ("Showing [something] on top of
  [something]") 127. The official ``data_list/sthv2/category.txt`` sorts the bracketed templates
  instead and disagrees at 89 of the 174 indices; it is not used.
"""
from __future__ import annotations

import functools
import os
import re
from typing import List, Optional

__all__ = ["class_names", "dataset_of", "DATASETS"]

_DIR = os.path.join(os.path.dirname(__file__), "classes")
# Name -> (file, class count). "ssv2" is the same dataset under the name some checkpoints use.
DATASETS = {"k400": ("k400", 400), "k600": ("k600", 600), "sthv2": ("sthv2", 174), "ssv2": ("sthv2", 174)}


@functools.lru_cache(maxsize=None)
def _read(stem: str) -> tuple:
    with open(os.path.join(_DIR, stem + ".txt"), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


def class_names(dataset: str) -> List[str]:
    """The class names of ``dataset`` ("k400", "k600" or "sthv2"; "ssv2" is "sthv2"), index ->
    name in the official checkpoints' order (a new list each call). A ValueError listing the known
    datasets for any other name."""
    if not isinstance(dataset, str):
        raise TypeError(f"dataset: expected a dataset name ({', '.join(DATASETS)}); got {type(dataset).__name__}")
    key = dataset.strip().lower()
    if key not in DATASETS:
        raise ValueError(f"dataset: unknown {dataset!r}; known: {', '.join(DATASETS)}")
    stem, count = DATASETS[key]
    names = _read(stem)
    if len(names) != count:  # a damaged install, not a user error
        raise RuntimeError(f"{os.path.join(_DIR, stem + '.txt')}: {len(names)} names, expected {count}")
    return list(names)


# A dataset named in a checkpoint's file name between separators, as the official files are named
# (uniformer_small_k400_16x8.pth, uniformer_base_sthv2_prek600.pth).
_DATASET_IN_NAME = re.compile(r"(?:^|[_\-.])(" + "|".join(DATASETS) + r")(?=$|[_\-.])")


def dataset_of(checkpoint, num_classes: Optional[int] = None) -> Optional[str]:
    """The dataset a checkpoint's file name (or official name) says it was trained on, provided
    ``num_classes`` (its head's class count, when known) is that dataset's; else None. Only the
    file's name is read: "k400" in "uniformer_small_k400_16x8.pth" with a 400-class head."""
    if checkpoint is None or not isinstance(checkpoint, (str, os.PathLike)):
        return None
    stem = os.path.splitext(os.path.basename(os.fspath(checkpoint)))[0].lower()
    match = _DATASET_IN_NAME.search(stem)
    if match is None:
        return None
    dataset = match.group(1)
    if num_classes is not None and num_classes != DATASETS[dataset][1]:
        return None
    return dataset
