"""ONNX export: the model's reference path (plain PyTorch ops) as a plain ONNX graph.

    uniformer_fast.export_onnx(model, "uniformer_small.onnx")           # (B, 3, 16, 224, 224) -> (B, 400)
    uniformer-fast export --weights uniformer_small_k400_16x4.pth --out uniformer_small.onnx

The graph is traced with every op on the ``"reference"`` backend, so it holds standard ONNX
operators only (Conv, MatMul, Softmax, LayerNormalization, ...), never a ``uniformer_fast::*``
custom op, and runs on ONNX Runtime, OpenVINO or any other ONNX consumer. It is exported with
``torch.onnx.export(..., dynamo=True)`` (torch.export, then onnxscript's translation):
the legacy TorchScript exporter (``dynamo=False``) is deprecated since torch 2.9 and cannot export
a dynamic batch of this model (the SABlock LayerNorm's ``normalized_shape`` is read from the
traced tensor's shape, which that exporter requires to be a constant).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Union

import torch

from . import ops
from .ops.checks import is_int
from .files import atomic_write
from .model import MIN_SPATIAL, UniFormer

__all__ = ["export_onnx", "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET"]

# The dynamo exporter implements opset 18 and up; asked for less, it tries a version conversion that
# fails on this model and silently keeps 18. ONNX Runtime runs opset 18 from 1.14 on.
MIN_OPSET = 18
MAX_OPSET = 23  # the highest torch 2.11 and 2.13 export (torch.onnx._constants.ONNX_MAX_OPSET)
DEFAULT_OPSET = 18

INPUT_NAME = "video"
OUTPUT_NAME = "logits"

_INSTALL_HINT = 'pip install "uniformer_fast[export]" (or: pip install onnx onnxscript)'


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming the .onnx file to write; "
                        f"got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):  # an os.PathLike whose __fspath__ gives bytes
        raise TypeError(f"path must be a str or os.PathLike naming the .onnx file to write; "
                        f"got a bytes path {path!r}")
    if not path:
        raise ValueError("path must name the .onnx file to write; got ''")
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; pass the .onnx file to write in it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"path {path!r}: its directory {parent!r} does not exist (create it first)")
    return path


def _check_model(model) -> None:
    if not isinstance(model, UniFormer):
        raise TypeError(f"model must be a uniformer_fast.UniFormer (e.g. uniformer_fast.create_model("
                        f"'uniformer_small')); got {type(model).__name__}")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in (*model.parameters(), *model.buffers())
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        raise TypeError(f"model must be float32 to export (the ONNX graph takes and gives float32); it has "
                        f"{', '.join(dtypes)} tensors: export copy.deepcopy(model).float() instead")


def _require_exporter() -> None:
    """torch's ONNX exporter (dynamo=True) imports onnx and onnxscript; say how to get them."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"export_onnx needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)} "
                          f"(torch's ONNX exporter uses them): {_INSTALL_HINT}")


@contextlib.contextmanager
def _quiet_exporter():
    """Hide what torch's exporter says on every export of this model whatever goes right or wrong:
    that torchvision's ops are not registered (they are not used) and a FutureWarning torch's own
    pytree code raises. Errors and any other warning pass."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: UniFormer, path: Union[str, os.PathLike], frames: int = 16, size: int = 224,
                dynamic_batch: bool = True, *, opset: int = DEFAULT_OPSET) -> str:
    """Write ``model`` as an ONNX file at ``path`` and return the path written.

    Args:
        model: a float32 :class:`uniformer_fast.UniFormer`, optionally
            :meth:`~uniformer_fast.UniFormer.fuse_for_inference`'d. Traced in eval mode under
            ``torch.no_grad()`` on its own device; each submodule's training mode is restored
            afterwards. A bfloat16 or float16 model is refused rather than silently copied: export
            ``copy.deepcopy(model).float()``.
        path: the ``.onnx`` file (str or os.PathLike) in an existing directory. Written
            atomically: an interrupted export leaves any previous file as it was.
        frames, size: the clip the graph takes, ``(B, in_chans, frames, size, size)``; frames >= 1,
            size >= 32. Only the batch dimension can vary; a graph for another clip shape needs
            another export.
        dynamic_batch: True: the batch dimension is dynamic (named ``batch``); False: it is 1.
        opset: the ONNX opset, 18 (default) to 23.

    The graph's input is ``video`` (B, C, T, H, W) float32, its output ``logits``
    (B, num_classes) float32 (pooled features (B, embed_dim[-1]) for a model without a head).
    It holds standard ONNX operators only: the model's "reference" ops are traced.

    Raises:
        TypeError: model is not a float32 UniFormer; path is not a str or os.PathLike;
            dynamic_batch is not a bool.
        ValueError: frames, size or opset out of range; path is empty or a directory.
        FileNotFoundError: path's directory does not exist.
        ImportError: onnx or onnxscript is not installed (``pip install "uniformer_fast[export]"``).
    """
    _check_model(model)
    path = _check_path(path)
    if not is_int(frames) or frames < 1:
        raise ValueError(f"frames must be a positive int (the clip's frame count T); got {frames!r}")
    if not is_int(size) or size < MIN_SPATIAL:
        raise ValueError(f"size must be an int >= {MIN_SPATIAL} (the clip's height and width); got {size!r}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be True or False; got {dynamic_batch!r}")
    if not is_int(opset) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {MAX_OPSET}; got {opset!r}")
    _require_exporter()

    ref = next(model.parameters())
    # Batch 2 when dynamic: torch.export specialises a dimension whose example size is 1.
    video = torch.randn(2 if dynamic_batch else 1, model.in_chans, frames, size, size,
                        device=ref.device, dtype=torch.float32)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), ops.use_backend("reference"), _quiet_exporter():
            program = torch.onnx.export(model, (video,), None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
    finally:  # as it was, module by module (model.train(mode) would set them all alike)
        for m, training in modes:
            m.training = training
    proto = program.model_proto
    standard = {"", "ai.onnx"} | {f.domain for f in proto.functions}  # local functions are plain ONNX too
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in standard})
    if foreign:  # a backend other than "reference" leaked into the trace: a bug, never a file
        raise RuntimeError(f"the exported graph holds non-standard ops {', '.join(foreign)}; nothing written")
    # The exporter notes each node's Python stack, absolute paths of this machine included: not
    # for a file that is handed on.
    for graph_nodes in (proto.graph.node, *(f.node for f in proto.functions)):
        for node in graph_nodes:
            del node.metadata_props[:]
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return path
