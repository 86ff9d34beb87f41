"""Where the model looks: Grad-CAM on the last stage and the Global MHRA attention rollout.

    result = explain(model, "clip.mp4")              # one centre view, as ``classify`` sees it
    result.top                                       # [(index, name, probability)] * 5
    result.gradcam, result.rollout                   # float32 (T, S, S) in [0, 1], per input frame
    result.save("out/", video_format="mp4")          # heatmap videos, PNG frames, a montage, JSON

Both maps come from one forward pass, on whatever backend ``uniformer_fast.ops`` runs (Triton,
C++, oneDNN, reference):

- **Grad-CAM** (Selvaraju et al.) on the last stage's output ``A`` (B, C, T', H', W'): the gradient
  of the target logit with respect to ``A``, averaged over positions, weighs the channels;
  ``relu(sum_c w_c A_c)``. Only the head (final norm, pooling, linear) is differentiated, so the
  backbone runs without autograd. UniFormer pools globally, which makes this CAM (Zhou et al.).
- **Attention rollout** (Abnar and Zuidema) over the Global MHRA blocks of stages 3 and 4: each
  block's head-averaged attention ``P``, with the residual as ``0.5 P + 0.5 I``, multiplied through
  the stage; stage 4's importance for the pooled output (the mean over its rows) is carried to
  stage 3 through the patch embedding between them (each stage-3 token to the stage-4 token that
  covers it) and through stage 3's product. The depthwise DPE and the convolution stages mix tokens
  too; rollout, as defined, leaves them out.

The fused attention kernels never form ``P``. So each block's probabilities are computed, for this
pass only, by the reference formula ``softmax(q k^T * scale)`` from the block's own input and
``qkv`` weights (a forward pre-hook); the prediction and every other output still come from the
backend that ran. :attr:`Explanation.notes` says so.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import ops
from ..data.video import (VideoReader, check_count, dense_indices, resize_short_side, to_views, uniform_crop,
                          write_video)
from ..model import SABlock, SplitSABlock, UniFormer
from .inference import autocast_for, model_device

__all__ = ["explain", "Explanation", "METHODS", "VIDEO_FORMATS", "heat_colors", "overlay"]

METHODS = ("gradcam", "rollout")
VIDEO_FORMATS = ("mp4", "gif")


@dataclass
class Explanation:
    """What :func:`explain` found for one clip.

    ``frames``: the clip as the model saw it, uint8 (T, S, S, 3) RGB (resized and centre-cropped,
    not normalised); ``frame_indices``: where in the video they are (None for frames passed in).
    ``maps``: method -> float32 (T, S, S) in [0, 1] (each map rescaled from its minimum to its
    maximum), one per input frame. ``target``: the class explained (its ``target_name`` when names are known); ``top``: the
    ``(index, name or None, probability)`` of the most likely classes. ``model_s``: the forward
    pass's seconds. ``notes``: how the maps were computed where that differs from the forward pass.
    """

    frames: torch.Tensor
    frame_indices: Optional[List[int]]
    maps: Dict[str, torch.Tensor]
    target: int
    target_name: Optional[str]
    top: List[Tuple[int, Optional[str], float]]
    model_s: float
    fps: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def gradcam(self) -> Optional[torch.Tensor]:
        return self.maps.get("gradcam")

    @property
    def rollout(self) -> Optional[torch.Tensor]:
        return self.maps.get("rollout")

    def overlay(self, method: str, alpha: float = 0.5) -> torch.Tensor:
        """uint8 (T, S, S, 3): the frames with ``method``'s map blended in (:func:`overlay`)."""
        return overlay(self.frames, self._map(method), alpha)

    def montage(self, methods: Optional[Sequence[str]] = None, max_frames: int = 8, alpha: float = 0.5):
        """uint8 (H, W, 3): one row per method (the frames with its map), up to ``max_frames``
        frames evenly spaced along the clip; a 2-pixel gap between tiles."""
        methods = list(self.maps) if methods is None else [m for m in methods]
        check_count("max_frames", max_frames)
        t = self.frames.shape[0]
        pick = sorted({round(i * (t - 1) / max(1, min(max_frames, t) - 1)) for i in range(min(max_frames, t))})
        rows = [self.overlay(m, alpha)[pick] for m in methods]
        gap = 2
        n, s = len(pick), self.frames.shape[1]
        out = torch.full((len(rows) * (s + gap) - gap, n * (s + gap) - gap, 3), 255, dtype=torch.uint8)
        for r, row in enumerate(rows):
            for c in range(n):
                out[r * (s + gap):r * (s + gap) + s, c * (s + gap):c * (s + gap) + s] = row[c]
        return out

    def save(self, out_dir, *, video_format: str = "mp4", fps: Optional[float] = None,
             alpha: float = 0.5) -> Dict[str, str]:
        """Write, under ``out_dir`` (created): per method ``<method>.<video_format>`` (the overlaid
        clip; ``"mp4"`` H.264 via PyAV, ``"gif"`` via Pillow) and ``<method>/frame_NNN.png``;
        ``montage.png`` (:meth:`montage`) and ``explanation.json`` (target, top classes, frame
        indices, notes). ``fps``: the heatmap video's rate (default: the video's rate divided by the
        sample stride, else 8). Returns name -> path of everything written."""
        if video_format not in VIDEO_FORMATS:
            raise ValueError(f"video_format: expected one of {', '.join(VIDEO_FORMATS)}; got {video_format!r}")
        if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps: expected a positive number; got {fps!r}")
        out_dir = _prepare_out_dir(out_dir)
        image = _pillow()
        rate = fps or self.fps or 8.0
        written = {}
        for method in self.maps:
            frames = self.overlay(method, alpha).numpy()
            frame_dir = os.path.join(out_dir, method)
            os.makedirs(frame_dir, exist_ok=True)
            for i, frame in enumerate(frames):
                path = os.path.join(frame_dir, f"frame_{i:03d}.png")
                image.fromarray(frame).save(path)
            written[f"{method}/frames"] = frame_dir
            path = os.path.join(out_dir, f"{method}.{video_format}")
            (write_video if video_format == "mp4" else _write_gif)(path, frames, rate)
            written[method] = path
        path = os.path.join(out_dir, "montage.png")
        image.fromarray(self.montage(alpha=alpha).numpy()).save(path)
        written["montage"] = path
        path = os.path.join(out_dir, "explanation.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"target": self.target, "target_name": self.target_name,
                       "top": [{"class": i, "name": n, "probability": p} for i, n, p in self.top],
                       "methods": list(self.maps), "frame_indices": self.frame_indices,
                       "model_s": self.model_s, "notes": self.notes}, f, indent=2)
        written["json"] = path
        return written

    def _map(self, method):
        if method not in self.maps:
            raise ValueError(f"method: this explanation has {', '.join(self.maps)}; got {method!r}")
        return self.maps[method]


def explain(model, video, *, num_frames: int = 16, sample_rate: int = 4, size: int = 224,
            target: Union[int, str, None] = None, methods: Sequence[str] = METHODS,
            class_names: Optional[Sequence[str]] = None, top: int = 5, device=None,
            precision: str = "float32") -> Explanation:
    """Grad-CAM and attention rollout maps for one clip of ``video`` (see the module docstring).

    Args:
        model: a :class:`~uniformer_fast.UniFormer` with a classifier head; put in eval mode while
            this runs (and back), moved to ``device`` when one is given.
        video: a video file (the official single-view test clip: ``num_frames`` frames every
            ``sample_rate``, centred, the short side resized to ``size`` and centre-cropped), or
            decoded uint8 frames (T, H, W, 3) used as they are, T = ``num_frames``.
        target: the class to explain, an index or a name in ``class_names``; default the top-1.
        methods: a non-empty subset of ``("gradcam", "rollout")``.
        class_names: index -> name (default ``model.class_names``), used for ``top`` and ``target``.
        precision: the forward pass's, as in :func:`~uniformer_fast.evaluate` (``"auto"``: bf16
            autocast on CUDA); the maps are computed in float32.

    Returns:
        :class:`Explanation`.
    """
    if not isinstance(model, UniFormer):
        raise TypeError(f"model: expected a uniformer_fast.UniFormer; got {type(model).__name__}")
    if not model.num_classes:
        raise ValueError("model: has no classifier head (num_classes 0); there is no class to explain")
    check_count("num_frames", num_frames)
    check_count("sample_rate", sample_rate)
    check_count("size", size)
    check_count("top", top)
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods \
            or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected a non-empty sequence of distinct names from {', '.join(METHODS)}; "
                         f"got {methods!r}")
    names = list(class_names) if class_names is not None else getattr(model, "class_names", None)
    if names is not None and len(names) != model.num_classes:
        raise ValueError(f"class_names: {len(names)} names for a model of {model.num_classes} classes")
    target = _check_target(target, names, model.num_classes)
    device = model_device(model, device)
    precision, autocast = autocast_for(device, precision)

    frames, indices, fps = _read_clip(video, num_frames, sample_rate, size)
    display = _display_frames(frames, size)
    clip = to_views(frames, size, 1)[0].unsqueeze(0).to(device)  # (1, 3, T, S, S)

    was_training = model.training
    model.eval()
    recorder = _RolloutRecorder(model) if "rollout" in methods else None
    try:
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            features = model.forward_intermediates(clip, (3,), norm=False)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_s = time.perf_counter() - t0
    finally:
        if recorder is not None:
            recorder.remove()
        model.train(was_training)

    # The head, differentiated in float32: final norm, global pooling, linear.
    # A packed copy: ATen's CPU batch-norm backward misreads the stride a batch of one has here
    # (see model._packed_batch_stride).
    a = features.detach().float().contiguous().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        bias = model.head.bias.float() if model.head.bias is not None else None
        logits = F.linear(model.forward_head(_final_norm(model, a), pre_logits=True), model.head.weight.float(), bias)
        probs = logits.detach().softmax(-1)[0].cpu()
        target = int(probs.argmax()) if target is None else target
        maps = {}
        if "gradcam" in methods:
            (grad,) = torch.autograd.grad(logits[0, target], a)
            weights = grad.mean(dim=(2, 3, 4), keepdim=True)
            maps["gradcam"] = (weights * a.detach()).sum(1)[0].clamp_min(0)  # (T', H', W')
    if recorder is not None:
        maps["rollout"] = recorder.importance()
    t_in = clip.shape[2]
    maps = {m: _normalise(_upsample(maps[m], (t_in, size, size))).cpu() for m in methods}

    k = min(top, model.num_classes)
    values, idx = probs.topk(k)
    best = [(int(i), names[int(i)] if names else None, float(p)) for p, i in zip(values, idx)]
    notes = []
    if recorder is not None:
        notes.append(f"attention probabilities for the rollout were computed with the reference attention "
                     f"(softmax(q k^T * scale) from each block's input) in float32, for this pass only; "
                     f"the forward pass ran on backend {ops.get_backend()!r} ({precision})")
    return Explanation(display, indices, maps, target, names[target] if names else None, best, model_s,
                       fps=fps / sample_rate if fps and indices is not None else None, notes=notes)


# ---------------------------------------------------------------------------------------------
# Rollout: each Global MHRA block's attention, recorded by a forward pre-hook.

class _RolloutRecorder:
    """Hooks every attention of stages 3 and 4 and keeps its input tokens; :meth:`importance`
    then recomputes each block's probabilities and rolls a row vector back through the blocks.

    The rollout of stage s is ``R = M_L ... M_1`` with ``M = 0.5 P + 0.5 I``, and all that is
    needed is ``u R`` for one row vector ``u`` (stage 4: the mean over its output tokens; stage 3:
    what stage 4's answer covers), so ``u`` goes through ``M_L`` first down to ``M_1``, each a
    vector-matrix product: no N x N x N products, and only each block's (N, C) input is kept
    while the model runs."""

    def __init__(self, model: UniFormer):
        self.layers: Dict[int, list] = {2: [], 3: []}  # stage -> [(kind, modules, inputs)] in run order
        self.grids: Dict[int, Tuple[int, int, int]] = {}
        self.handles = []
        self._temporal = None
        for stage, blocks in ((2, model.blocks3), (3, model.blocks4)):
            for blk in blocks:
                if not isinstance(blk, SABlock):
                    raise TypeError(f"model: stage {stage + 1} has a {type(blk).__name__}, not a Global MHRA "
                                    f"block: no attention to roll out")
                self.handles.append(blk.register_forward_pre_hook(self._block_hook(stage)))
                if isinstance(blk, SplitSABlock):
                    self.handles.append(blk.t_attn.register_forward_pre_hook(self._temporal_hook()))
                    self.handles.append(blk.attn.register_forward_pre_hook(self._spatial_hook(stage, blk)))
                else:
                    self.handles.append(blk.attn.register_forward_pre_hook(self._joint_hook(stage)))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _block_hook(self, stage):
        def hook(module, args):
            if args[0].shape[0] != 1:
                raise ValueError("explain: one clip at a time")
            self.grids[stage] = tuple(args[0].shape[2:])
        return hook

    def _joint_hook(self, stage):
        def hook(attn, args):
            self.layers[stage].append(("joint", (attn,), (args[0].detach().clone(),)))
        return hook

    def _temporal_hook(self):
        def hook(attn, args):  # runs first in a divided-attention block
            self._temporal = args[0].detach().clone()
        return hook

    def _spatial_hook(self, stage, blk):
        def hook(attn, args):
            self.layers[stage].append(("split", (blk.t_attn, attn), (self._temporal, args[0].detach().clone())))
            self._temporal = None
        return hook

    def importance(self) -> torch.Tensor:
        """Stage 3's input tokens' importance for the pooled output: (T3, H3, W3), float32."""
        if not self.layers[2] or not self.layers[3]:
            raise RuntimeError("explain: the rollout saw no attention (did the forward pass run?)")
        t4, h4, w4 = self.grids[3]
        t3, h3, w3 = self.grids[2]
        dev = self.layers[3][0][2][0].device
        v4 = self._roll(3, torch.full((t4 * h4 * w4,), 1.0 / (t4 * h4 * w4), device=dev)).view(t4, h4, w4)
        # Each stage-3 output token feeds the stage-4 token whose patch covers it.
        ti = torch.arange(t3, device=dev) * t4 // t3
        hi = torch.arange(h3, device=dev) * h4 // h3
        wi = torch.arange(w3, device=dev) * w4 // w3
        v3 = v4[ti[:, None, None], hi[None, :, None], wi[None, None, :]].reshape(-1)
        return self._roll(2, v3).view(t3, h3, w3)

    def _roll(self, stage: int, u: torch.Tensor) -> torch.Tensor:
        """``u M_L ... M_1`` over the stage's blocks (u: (N,) float32)."""
        t, h, w = self.grids[stage]
        for kind, modules, inputs in reversed(self.layers[stage]):
            if kind == "joint":
                p = _probabilities(modules[0], inputs[0])[0]  # (N, N)
                u = 0.5 * u + 0.5 * (u @ p)
            else:
                # s = x + S(norm(x + T(x))): M = 0.5 I + 0.5 S (0.5 I + 0.5 T), S per frame (T, HW, HW),
                # T per position (HW, T, T); token n = frame * HW + position.
                temporal = _probabilities(modules[0], inputs[0])
                spatial = _probabilities(modules[1], inputs[1])
                rows = u.view(t, h * w)
                us = torch.einsum("tp,tpq->tq", rows, spatial)
                ust = torch.einsum("iq,qij->jq", us, temporal)
                u = (0.5 * rows + 0.25 * us + 0.25 * ust).reshape(-1)
        return u


def _probabilities(attn, tokens: torch.Tensor) -> torch.Tensor:
    """The head-averaged attention probabilities ``attn`` computes on ``tokens`` (B, N, C):
    (B, N, N) float32, by the reference formula."""
    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
        x = tokens.float()
        bias = attn.qkv.bias.float() if attn.qkv.bias is not None else None
        qkv = F.linear(x, attn.qkv.weight.float(), bias)
        B, N, _ = qkv.shape
        qkv = qkv.view(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        q, k = qkv[0], qkv[1]
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)


# ---------------------------------------------------------------------------------------------
# Clip, maps and images.

def _check_target(target, names, num_classes) -> Optional[int]:
    if target is None:
        return None
    if isinstance(target, str):
        if names is None:
            raise ValueError(f"target: {target!r} is a class name, but the model has no class names "
                             f"(pass class_names or an index)")
        if target not in names:
            raise ValueError(f"target: {target!r} is not one of the model's {num_classes} class names")
        return list(names).index(target)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < num_classes:
        raise ValueError(f"target: expected a class index in [0, {num_classes - 1}] or a class name; got {target!r}")
    return int(target)


def _read_clip(video, num_frames, sample_rate, size):
    """``(frames uint8 (T, H, W, 3), indices or None, fps or None)``."""
    if isinstance(video, torch.Tensor):
        if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video: expected a file or uint8 frames (T, H, W, 3); got {video.dtype} "
                             f"{tuple(video.shape)}")
        if video.shape[0] != num_frames:
            raise ValueError(f"video: {video.shape[0]} frames given for num_frames={num_frames}")
        return video, None, None
    if not isinstance(video, (str, os.PathLike)):
        raise TypeError(f"video: expected a video file path or uint8 frames (T, H, W, 3); got {type(video).__name__}")
    with VideoReader(video) as reader:
        idx = dense_indices(len(reader), num_frames, sample_rate)
        return reader.get_frames(idx), idx.tolist(), reader.fps


def _display_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """The frames as the model sees them (resized, centre-cropped), uint8 (T, S, S, 3)."""
    x = resize_short_side(frames.permute(0, 3, 1, 2).float(), size)
    x = uniform_crop(x, size, 1)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _final_norm(model, a: torch.Tensor) -> torch.Tensor:
    """``model.norm`` as in eval mode (its running statistics; the model is explained as it
    predicts) on float32 ``a``, whatever dtype the model is in."""
    bn = model.norm
    f = (lambda t: None if t is None else t.float())
    use_batch = bn.running_mean is None  # a BatchNorm that keeps no statistics always uses the batch's
    return F.batch_norm(a, f(bn.running_mean), f(bn.running_var), f(bn.weight), f(bn.bias),
                        training=use_batch, momentum=0.0, eps=bn.eps)


def _upsample(m: torch.Tensor, shape) -> torch.Tensor:
    return F.interpolate(m.float()[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]


def _normalise(m: torch.Tensor) -> torch.Tensor:
    """Rescaled from [min, max] to [0, 1]: 1 where the model looks most, 0 where least (a rollout
    of nearly uniform attention spans a few percent, which a division by the maximum would paint
    one colour); a constant map is all zeros."""
    low, high = m.min(), m.max()
    return (m - low) / (high - low) if high > low else torch.zeros_like(m)


def heat_colors(m: torch.Tensor) -> torch.Tensor:
    """Float map in [0, 1] (any shape) -> uint8 RGB (..., 3): the 'jet' ramp, blue (0) through
    green to red (1)."""
    x = m.clamp(0, 1).unsqueeze(-1)
    centres = torch.tensor([3.0, 2.0, 1.0], device=m.device)  # red, green, blue peaks at x = 3/4, 1/2, 1/4
    rgb = (1.5 - (4 * x - centres).abs()).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8)


def overlay(frames: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 frames (T, S, S, 3) blended with :func:`heat_colors` of ``heat`` (T, S, S):
    ``(1 - alpha) * frame + alpha * color``."""
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha: expected a number in [0, 1]; got {alpha!r}")
    if heat.shape != frames.shape[:-1]:
        raise ValueError(f"heat: expected shape {tuple(frames.shape[:-1])}; got {tuple(heat.shape)}")
    mixed = (1 - alpha) * frames.float() + alpha * heat_colors(heat).float()
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def _prepare_out_dir(out_dir) -> str:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a directory path; got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def _pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise RuntimeError("writing heatmap images needs Pillow: pip install 'uniformer_fast[explain]'") from e
    return Image


def _write_gif(path, frames, fps):
    image = _pillow()
    images = [image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
