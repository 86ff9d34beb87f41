"""Loading official (and our own) checkpoints: unwrapping, prefixes, 2-D -> 3-D inflation.

Files are read with ``torch.load(weights_only=True)`` (tensors and plain containers only, never
code) or with safetensors; nothing in a checkpoint is ever executed.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Optional, Union

import torch
import torch.nn as nn

from .data.classes import class_names, dataset_of

__all__ = ["load_checkpoint", "read_state_dict", "inflate_weight", "resolve_pretrained", "HUB_REPO"]

HUB_REPO = "Sense-X/uniformer_video"
_WRAPPER_KEYS = ("model", "model_state", "state_dict")
_PREFIXES = ("module.", "backbone.")
_DATASET_CLASSES = {"k400": 400, "k600": 600, "sthv1": 174, "sthv2": 174, "ssv1": 174, "ssv2": 174}
_PRETRAINED_NAME = re.compile(r"^(uniformer_(?:small|base))_([a-z0-9]+)_(\d+x\d+)$")


def read_checkpoint_file(path: str):
    """What the file holds (any object ``torch.load(weights_only=True)`` allows); every error names it."""
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes), not a checkpoint")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs the safetensors package: pip install safetensors") from e
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise ValueError(f"{path!r} is not a readable safetensors file: {_reason(e)}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # code, or an object of a class that is not allowed, or garbage
        raise ValueError(
            f"{path!r} is not a checkpoint that can be loaded safely: torch.load(weights_only=True) "
            f"refused it ({_reason(e)}). Only tensors and plain containers are accepted; convert other "
            f"files to a plain state dict or to .safetensors") from e
    except Exception as e:  # a cut zip archive is an OSError or a RuntimeError, a cut pickle an EOFError
        raise ValueError(f"{path!r} is not a checkpoint, or a truncated or corrupt one: torch.load failed "
                         f"({type(e).__name__}: {_reason(e)})") from e


# Paragraphs torch wraps around the reason a weights-only load failed; one of them advises loading
# with weights_only=False, which runs any code in the file: not advice to pass on.
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(e: Exception) -> str:
    """The reason in ``e``'s message, as one line, without torch's advice."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = " ".join(line for line in lines if not line.startswith(_TORCH_ADVICE))
    return reason or type(e).__name__


def read_state_dict(source: Union[str, os.PathLike, Mapping]) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a path or a (possibly wrapped) state dict.

    Unwraps ``{"model": ...}``, ``{"model_state": ...}`` and ``{"state_dict": ...}`` and strips the
    ``module.`` (DDP) and ``backbone.`` prefixes.
    """
    where = ""  # "<path> is " before each error about a file's content
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        sd, where = read_checkpoint_file(path), f"{path!r} is "
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path!r} holds a {type(sd).__name__}, not a state dict (a mapping of parameter "
                             f"names to tensors)")
    elif isinstance(source, Mapping):
        sd = source
    else:
        raise TypeError(f"source must be a path or a state dict (a Mapping of tensors); "
                        f"got {type(source).__name__}")
    for _ in range(3):  # a training checkpoint may nest e.g. {"state_dict": {"model": ...}}
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}not a state dict: key {key!r} is a {type(key).__name__}, not a "
                             f"parameter name")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor "
                             f"(expected a mapping of parameter names to tensors, optionally wrapped "
                             f"under one of {_WRAPPER_KEYS})")
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    if not out:
        raise ValueError(f"{where}not a state dict: it holds no tensors")
    return out


def inflate_weight(weight_2d: torch.Tensor, time_dim: int, mode: str = "average") -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, time_dim, kh, kw).

    ``"average"`` repeats the kernel over time and divides by ``time_dim`` (the official rule: a
    static clip gives the 2-D response); ``"center"`` puts it on the middle frame, zeros elsewhere.
    """
    if mode == "average":
        return weight_2d.unsqueeze(2).repeat(1, 1, time_dim, 1, 1) / time_dim
    if mode == "center":
        out = weight_2d.new_zeros(weight_2d.shape[:2] + (time_dim,) + weight_2d.shape[2:])
        out[:, :, time_dim // 2] = weight_2d
        return out
    raise ValueError(f"inflate must be 'average', 'center' or None; got {mode!r}")


def load_checkpoint(model: nn.Module, source, *, inflate: Optional[str] = "average",
                    strict: bool = True):
    """Load a checkpoint into ``model``.

    Args:
        model: a :class:`uniformer_fast.UniFormer` (or any module with the same names).
        source: a path (``.pth``/``.pt``/``.safetensors``) or a state dict, wrapped or not.
        inflate: how 2-D (image) kernels become 3-D: ``"average"`` (official), ``"center"``, or
            None to reject them.
        strict: raise on missing or unexpected keys (a head of another class count is always
            dropped with a warning and left freshly initialised).

    A checkpoint file named after a dataset whose class count its kept head has
    (``uniformer_small_k400_16x8.pth``, see :func:`~uniformer_fast.data.classes.dataset_of`) also
    sets ``model.class_names`` to that dataset's names in the official order; a load that drops
    the head clears them (the head they named is gone); any other leaves them as they were.

    Returns:
        ``(missing_keys, unexpected_keys)``, both empty when ``strict``.
    """
    if inflate not in ("average", "center", None):
        raise ValueError(f"inflate must be 'average', 'center' or None; got {inflate!r}")
    sd = read_state_dict(source)
    own = model.state_dict()
    dropped_head = []
    for key in list(sd):
        if key not in own or sd[key].shape == own[key].shape:
            continue
        src, dst = sd[key], own[key]
        if key.startswith("head."):
            dropped_head.append(f"{key} {tuple(src.shape)}")
            del sd[key]
        elif inflate is not None and src.dim() == 4 and dst.dim() == 5 and \
                src.shape[:2] + src.shape[2:] == dst.shape[:2] + dst.shape[3:]:
            sd[key] = inflate_weight(src, dst.shape[2], inflate)
        else:
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(src.shape)} but the model expects "
                             f"{tuple(dst.shape)}" + (" (2-D kernels need inflate='average' or 'center')"
                                                      if src.dim() == 4 and dst.dim() == 5 else ""))
    if dropped_head:
        warnings.warn(f"checkpoint head does not match the model's {getattr(model, 'num_classes', '?')} "
                      f"classes; dropped {', '.join(dropped_head)} and kept the new head", stacklevel=2)
    missing = [k for k in own if k not in sd and not (dropped_head and k.startswith("head."))]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise ValueError("checkpoint does not match the model: "
                         + "; ".join(part for part in (
                             f"missing keys: {', '.join(missing)}" if missing else "",
                             f"unexpected keys: {', '.join(unexpected)}" if unexpected else "") if part))
    model.load_state_dict(sd, strict=False)
    if hasattr(model, "class_names"):
        head = sd.get("head.weight")
        dataset = dataset_of(source, head.shape[0]) if head is not None else None
        if dropped_head:
            model.class_names = None
        elif dataset is not None:
            model.class_names = class_names(dataset)
    return missing, unexpected


def resolve_pretrained(pretrained: str, model_name: str):
    """``(path, num_classes or None)`` for a local file or an official checkpoint name.

    Official names look like ``uniformer_small_k400_16x8`` and resolve to
    ``<name>.pth`` in the Hugging Face repo ``Sense-X/uniformer_video``.
    """
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a checkpoint path or an official name such as "
                        f"'{model_name}_k400_16x8'; got {type(pretrained).__name__}")
    pretrained = os.fspath(pretrained)
    if os.path.isfile(pretrained):
        return pretrained, None
    match = _PRETRAINED_NAME.match(pretrained)
    if match is None:
        raise ValueError(f"pretrained={pretrained!r} is neither an existing file nor an official name "
                         f"like '{model_name}_k400_16x8'")
    arch, dataset, _ = match.groups()
    if arch != model_name:
        raise ValueError(f"pretrained={pretrained!r} holds {arch} weights; it does not fit {model_name}")
    filename = pretrained + ".pth"
    manual = (f"download {filename} from https://huggingface.co/{HUB_REPO} and pass its local path "
              f"as pretrained='/path/to/{filename}'")
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants as hub_constants  # a submodule, not an attribute
    except ImportError as e:
        raise RuntimeError(f"pretrained={pretrained!r} needs huggingface_hub (pip install huggingface_hub); "
                           f"or {manual}") from e
    manual += "; or copy a Hugging Face cache that holds it into HF_HOME and set HF_HUB_OFFLINE=1"
    if not hub_constants.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable(hub, filename)
        if unreachable is not None:
            try:  # as the hub itself does when offline: a copy in the cache
                path = hub.hf_hub_download(repo_id=HUB_REPO, filename=filename, local_files_only=True)
            except Exception:
                raise RuntimeError(f"cannot reach the Hugging Face Hub at {hub_constants.ENDPOINT} ({unreachable}) "
                                   f"and {filename} is not in its local cache; without network access, "
                                   f"{manual}") from None
            return path, _DATASET_CLASSES.get(dataset)
    try:
        path = hub.hf_hub_download(repo_id=HUB_REPO, filename=filename)
    except Exception as e:  # the hub raises many types: offline, not found, HTTP errors
        raise RuntimeError(f"could not fetch {filename} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                           f"without network access, {manual}") from e
    return path, _DATASET_CLASSES.get(dataset)


# hf_hub_download (huggingface_hub 2.4) retries a failed metadata request 5 times with back-off
# (1 + 2 + 4 + 8 + 8 s) on network errors, 408, 429 and 5xx when the file is not cached, and has
# no argument to turn that off: without network a name took 23 s to fail. So one metadata request
# first, which get_hf_file_metadata makes without retrying.
_HUB_PROBE_TIMEOUT = 5.0  # seconds: a HEAD to the Hub takes well under one where it is reachable


def _hub_unreachable(hub, filename: str) -> Optional[str]:
    """Why one quick metadata request for ``filename`` got no usable answer from the Hub, or None if
    it answered (a 404 or 401 included: hf_hub_download reports those at once, without retrying)."""
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(HUB_REPO, filename), timeout=_HUB_PROBE_TIMEOUT)
    except Exception as e:  # httpx/requests connection errors, timeouts, HfHubHTTPError
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status < 500 and status not in (408, 429):  # those are retried
            return None
        return f"{type(e).__name__}: {' '.join(str(e).split()) or 'no answer'}"
    return None
