"""Training-time augmentations for video clips, as the official UniFormer recipe uses them.

The official training (Sense-X/UniFormer ``video_classification/slowfast/datasets``:
``rand_augment.py``, ``transform.py``, ``random_erasing.py``, ``mixup.py``, themselves after timm)
augments a clip with RandAugment ``rand-m7-n4-mstd0.5-inc1``, a random resized crop or a
short-side jitter and crop, a horizontal flip, random erasing and, per batch, Mixup/CutMix with
label smoothing. This module restates that behaviour on torch tensors for whole clips. timm
itself is not used: it needs torchvision (which does not import beside the CPU builds of torch
this project is tested with), its RandAugment decides per image and its Mixup indexes the wrong
dims of a 5-D video batch.

**One decision per clip.** Every random choice (which ops, their magnitudes and signs, the crop
box, the flip, the erased rectangle and its noise, the Mixup box) is made once per clip and
applied identically to every frame, so a clip stays a consistent video: an object does not jump
between frames and an occluder is static.

**Explicit randomness.** Every function takes ``rng``, a :class:`random.Random`; tensors of
noise come from a :class:`torch.Generator` seeded with ``rng.getrandbits(63)``. The global
``random``, ``numpy.random`` and torch generators are never used, so the same seed gives the
same output on any device and a training run can save and restore ``rng.getstate()``.

**Layouts.**

- :class:`RandAugment` works where the official one does, on the decoded frames before
  normalisation: ``uint8 (T, H, W, 3)``. Pixel ops reproduce PIL's (``ImageOps``,
  ``ImageEnhance``) exactly, per frame and channel where PIL computes statistics; geometric ops
  run on all frames at once with :func:`torch.nn.functional.grid_sample` (see :meth:`RandAugment.apply`
  for how they differ from PIL's).
- :func:`random_resized_crop`, :func:`short_side_jitter_crop`, :func:`horizontal_flip`: float
  ``(..., H, W)``, e.g. ``(3, T, H, W)``; every leading index is cropped/flipped the same way.
- :class:`RandomErasing`: float ``(C, T, H, W)`` after normalisation (the noise is standard
  normal, i.e. of the normalised pixel scale).
- :class:`Mixup`: a batch ``(B, C, T, H, W)`` float with labels ``(B,)`` int64; it returns soft
  targets ``(B, num_classes)`` for :func:`soft_target_cross_entropy`.
"""
from __future__ import annotations

import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RandAugment", "RandomErasing", "Mixup", "random_resized_crop", "short_side_jitter_crop",
           "horizontal_flip", "soft_target_cross_entropy"]

_MAX_LEVEL = 10.0


# ---------------------------------------------------------------------------------------------
# Argument checks.

def _check_rng(rng):
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")


def _check_prob(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_range(value, name, positive=True):
    """A (low, high) pair of numbers with low <= high (and low > 0 if positive)."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and value[0] <= value[1] and (value[0] > 0 or not positive))
    if not ok:
        raise ValueError(f"{name} must be a pair (low, high) of {'positive ' if positive else ''}numbers "
                         f"with low <= high, got {value!r}")


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_frames(frames):
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        got = frames.dtype if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise TypeError(f"frames must be a uint8 torch.Tensor (T, H, W, 3), got {got}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.numel() == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T, H, W >= 1, got shape {tuple(frames.shape)}")


def _check_float(x, name, layout, ndim=None):
    """A floating-point tensor of ``ndim`` dims (at least 2 if None), non-empty in its last two."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor {layout}, got {got}")
    if (x.ndim != ndim if ndim else x.ndim < 2) or 0 in x.shape[-2:]:
        raise ValueError(f"{name} must be {layout} with H, W >= 1, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# RandAugment ops on uint8 (T, H, W, 3): each returns a new uint8 tensor of the same shape.

def _channel_index(frames):
    """int32 (T, H, W, 3): each value offset into its own frame's and channel's 256 bins, so one
    flat table or histogram serves all T * 3 of them (int32: index_select and bincount run
    about twice as fast as with int64)."""
    T = frames.shape[0]
    offset = torch.arange(T * 3, dtype=torch.int32, device=frames.device).view(T, 1, 1, 3) * 256
    return frames.int() + offset


def _point(frames, lut):
    """Map every value through ``lut``: (256,) for all pixels, or (T, 3, 256) per frame and channel."""
    if frames.device.type == "cpu":
        # NumPy's take indexes with the uint8 values as they are: 2.5x faster than index_select,
        # which needs them widened (16x256x340 frames, one thread: 9 ms against 22).
        table = lut.to(torch.uint8).numpy()
        values = frames.numpy()
        if lut.numel() == 256:
            return torch.from_numpy(np.take(table.reshape(-1), values))
        out = np.empty_like(values)
        for t in range(values.shape[0]):
            for c in range(3):
                np.take(table[t, c], values[t, ..., c], out=out[t, ..., c])
        return torch.from_numpy(out)
    lut = lut.to(device=frames.device, dtype=torch.uint8).reshape(-1)
    index = frames.int() if lut.numel() == 256 else _channel_index(frames)
    return lut.index_select(0, index.reshape(-1)).view(frames.shape)


def _histograms(frames):
    """(T, 3, 256) int64: the histogram of every channel of every frame."""
    T = frames.shape[0]
    if frames.device.type == "cpu":
        # One bincount per channel of the uint8 values beats one over offset int32 indices by 2x.
        rows = frames.permute(0, 3, 1, 2).reshape(T * 3, -1)
        return torch.stack([torch.bincount(r, minlength=256) for r in rows]).view(T, 3, 256)
    return torch.bincount(_channel_index(frames).reshape(-1), minlength=T * 3 * 256).view(T, 3, 256)


def _levels(frames):
    return torch.arange(256, device=frames.device)


def _auto_contrast(frames):
    """PIL ``ImageOps.autocontrast``: stretch each channel's [min, max] to [0, 255]; flat: unchanged."""
    hist, levels = _histograms(frames), _levels(frames)
    lo = torch.where(hist > 0, levels, 256).amin(-1, keepdim=True)
    hi = torch.where(hist > 0, levels, -1).amax(-1, keepdim=True)
    # PIL's float arithmetic (Python floats, float64), truncated: lut[i] = int(i * scale - lo * scale).
    # (Not `255.0 / tensor`: torch computes that as 255 * (1 / tensor), off in the last bit.)
    span = (hi - lo).clamp(min=1).double()
    scale = torch.full_like(span, 255.0) / span
    lut = (levels.double() * scale + (-lo.double() * scale)).trunc().clamp(0, 255).long()
    return _point(frames, torch.where(hi > lo, lut, levels))


def _equalize(frames):
    """PIL ``ImageOps.equalize`` on each channel of each frame, from that channel's histogram."""
    hist, levels = _histograms(frames), _levels(frames)
    last = torch.where(hist > 0, levels, -1).amax(-1, keepdim=True)  # the last non-empty bin
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    return _point(frames, torch.where(step > 0, lut, levels))  # step 0 (e.g. one level): unchanged


def _invert(frames):
    return 255 - frames


def _posterize(frames, bits):
    """Keep the top ``bits`` bits (0: black; 8 or more: unchanged)."""
    if bits >= 8:
        return frames.clone()
    return _point(frames, _levels(frames) & (0xFF << (8 - bits)) & 0xFF)


def _solarize(frames, thresh):
    """Invert the values >= ``thresh`` (256: unchanged)."""
    levels = _levels(frames)
    return _point(frames, torch.where(levels >= thresh, 255 - levels, levels))


def _solarize_add(frames, add, thresh=128):
    """Add ``add`` to the values < ``thresh``, saturating at 255."""
    levels = _levels(frames)
    return _point(frames, torch.where(levels < thresh, (levels + add).clamp(max=255), levels))


_LUMA = (19595.0, 38470.0, 7471.0)  # PIL's fixed-point ITU-R 601-2 weights, x 65536


def _grey(frames):
    """PIL's RGB -> "L" (ITU-R 601-2 luma, its fixed-point form), int32 (T, H, W).

    ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` as one float32 matmul: every partial sum is an
    integer below 2^24 (at most 255 * 65536 + 0x8000), so float32 holds it exactly, and the shift
    is an exact scaling by 2^-16 then a floor (three times faster than int32 arithmetic)."""
    weights = torch.tensor(_LUMA, dtype=torch.float32, device=frames.device)
    total = frames.float() @ weights
    return total.add_(0x8000).mul_(2.0 ** -16).floor_().to(torch.int32)


def _blend(degenerate, frames, factor):
    """PIL ``Image.blend(degenerate, frames, factor)``: ``degenerate + factor * (frames -
    degenerate)`` in float32 (PIL's C code takes the factor as a float), clipped and truncated to
    uint8 as PIL does, so the result is PIL's to the last grey level."""
    d = degenerate.float()
    # In place, in PIL's order ((x - d) * f + d is d + f * (x - d) to the bit): one buffer, not four.
    out = frames.float().sub_(d).mul_(torch.tensor(factor, dtype=torch.float32, device=frames.device)).add_(d)
    return out.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates, as PIL's (UINT8) cast


def _color(frames, factor):
    """PIL ``ImageEnhance.Color``: blend with the greyscale frame."""
    return _blend(_grey(frames).unsqueeze(-1), frames, factor)


def _contrast(frames, factor):
    """PIL ``ImageEnhance.Contrast``: blend with the frame's mean grey level, int(mean + 0.5)."""
    grey = _grey(frames)
    mean = grey.sum((1, 2), dtype=torch.int64).double() / (grey.shape[1] * grey.shape[2])
    return _blend((mean + 0.5).floor().view(-1, 1, 1, 1), frames, factor)


def _brightness(frames, factor):
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return _blend(torch.zeros((), device=frames.device), frames, factor)


def _sharpness(frames, factor):
    """PIL ``ImageEnhance.Sharpness``: blend with the frame smoothed by PIL's SMOOTH filter (3x3
    kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; the 1-pixel border kept as it is)."""
    smooth = frames.clone()
    if frames.shape[1] >= 3 and frames.shape[2] >= 3:
        # Integer sums (at most 13 * 255, int16) of the 3x3 box plus 4x the centre, on all frames
        # and channels at once; two passes of three shifted adds.
        x = frames.to(torch.int16)
        rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
        total = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * x[:, 1:-1, 1:-1]
        smooth[:, 1:-1, 1:-1] = ((2 * total + 13) // 26).to(torch.uint8)  # round(total / 13), never a tie
    return _blend(smooth, frames, factor)


def _affine(frames, data, interpolation, fill):
    """PIL ``Image.transform(size, AFFINE, data, resample, fillcolor=fill)`` on every frame at once.

    ``data = (a, b, c, d, e, f)`` maps an OUTPUT pixel's centre ``(x, y)`` (pixel centres at
    +0.5) to the INPUT point ``(a x + b y + c, d x + e y + f)`` it is sampled from, as PIL's data
    does. As in PIL, a point outside the frame gets ``fill`` and one inside is interpolated with
    the neighbouring pixels clamped to the frame ("border" padding plus an explicit mask, not
    zero padding, which would darken the edges).
    """
    T, H, W, _ = frames.shape
    a, b, c, d, e, f = data
    if (a, d, e, f) == (1, 0, 1, 0) and frames.device.type == "cpu":
        return _shift_rows(frames, b, c, interpolation, fill)  # ShearX, TranslateX
    if (a, b, c, e) == (1, 0, 0, 1) and frames.device.type == "cpu":  # ShearY, TranslateY: the same on columns
        return _shift_rows(frames.transpose(1, 2), d, f, interpolation, fill).transpose(1, 2).contiguous()
    # The grid in float64 on the CPU (shared by all frames), so the inside test is PIL's.
    ys = torch.arange(H, dtype=torch.float64).add_(0.5).view(H, 1)
    xs = torch.arange(W, dtype=torch.float64).add_(0.5).view(1, W)
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = ((x_in >= 0) & (x_in < W) & (y_in >= 0) & (y_in < H)).to(frames.device)
    # align_corners=False: normalised -1 and 1 are the frame's outer edges, pixel centres at +0.5.
    grid = torch.stack((x_in * (2 / W) - 1, y_in * (2 / H) - 1), -1)
    grid = grid.to(device=frames.device, dtype=torch.float32).expand(T, H, W, 2)
    out = F.grid_sample(frames.permute(0, 3, 1, 2).float(), grid, mode=interpolation,
                        padding_mode="border", align_corners=False)
    out = torch.where(inside, out.round_().clamp_(0, 255), float(fill))  # bicubic overshoots
    return out.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _cubic_weights(t):
    """torch's bicubic convolution weights (A = -0.75, as grid_sample) of the taps at -1, 0, 1, 2
    for a fraction ``t``."""
    A = -0.75

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _shift_rows(frames, slope, offset, interpolation, fill):
    """:func:`_affine` for data ``(1, slope, offset, 0, 1, 0)``: row ``y`` shifted along x by
    ``slope * (y + 0.5) + offset``. The source points of an output row lie on that same row, a
    whole number of pixels plus the same fraction apart from its pixels, so this interpolates in
    x only, with one weight per row and tap: 4 taps (2 bilinear) instead of grid_sample's 16, the
    same points, kernel, border rule and fill (16x256x340 frames, one thread: 60 ms against 125)."""
    T, H, W, _ = frames.shape
    shift = torch.arange(H, dtype=torch.float64).add_(0.5).mul_(slope).add_(offset)  # (H,)
    whole = shift.floor()
    t = (shift - whole).float().view(1, H, 1, 1)
    u = torch.arange(W, dtype=torch.float64).view(1, W) + shift.view(H, 1)  # source pixel coordinates
    outside = ((u + 0.5 < 0) | (u + 0.5 >= W)).view(1, H, W, 1)
    if interpolation == "bicubic":
        taps, weights = (-1, 0, 1, 2), _cubic_weights(t)
    else:
        taps, weights = (0, 1), (1 - t, t)
    base = torch.arange(W).view(1, W) + whole.long().view(H, 1)
    rows = torch.arange(H).view(H, 1) * W
    flat = frames.reshape(T, H * W, 3)
    out = torch.zeros(T, H, W, 3)
    for k, w in zip(taps, weights):
        index = (base + k).clamp_(0, W - 1).add_(rows).view(-1)  # border: clamped to the row
        out.add_(flat.index_select(1, index).view(T, H, W, 3).float().mul_(w))
    out.round_().clamp_(0, 255).masked_fill_(outside, float(fill))
    return out.to(torch.uint8)


def _rotate_data(degrees, W, H):
    """PIL ``Image.rotate(degrees)``'s AFFINE data: about the frame's centre, counter-clockwise."""
    angle = -math.radians(degrees)
    a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    cx, cy = W / 2, H / 2
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


_PIXEL_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _color, "ColorIncreasing": _color, "Contrast": _contrast, "ContrastIncreasing": _contrast,
    "Brightness": _brightness, "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness, "SharpnessIncreasing": _sharpness,
}
# Geometric ops: their argument -> PIL AFFINE data for a W x H frame (as timm's calls give it).
_AFFINE_OPS = {
    "Rotate": _rotate_data,
    "ShearX": lambda f, W, H: (1, f, 0, 0, 1, 0),
    "ShearY": lambda f, W, H: (1, 0, 0, f, 1, 0),
    "TranslateXRel": lambda pct, W, H: (1, 0, pct * W, 0, 1, 0),
    "TranslateYRel": lambda pct, W, H: (1, 0, 0, 0, 1, pct * H),
}


# Level in [0, 10] -> the op's arguments, as the official rand_augment.py. Signed ops negate
# their argument with probability 0.5 (decided with the clip's rng, once per op).
def _signed(value, rng):
    return -value if rng.random() > 0.5 else value


def _enhance(level, rng):
    return (level / _MAX_LEVEL * 1.8 + 0.1,)


def _enhance_increasing(level, rng):
    return (1.0 + _signed(level / _MAX_LEVEL * 0.9, rng),)


_LEVEL_TO_ARGS = {
    "AutoContrast": lambda level, rng: (),
    "Equalize": lambda level, rng: (),
    "Invert": lambda level, rng: (),
    "Rotate": lambda level, rng: (_signed(level / _MAX_LEVEL * 30.0, rng),),
    "Posterize": lambda level, rng: (int(level / _MAX_LEVEL * 4),),
    "PosterizeIncreasing": lambda level, rng: (4 - int(level / _MAX_LEVEL * 4),),
    "Solarize": lambda level, rng: (int(level / _MAX_LEVEL * 256),),
    "SolarizeIncreasing": lambda level, rng: (256 - int(level / _MAX_LEVEL * 256),),
    "SolarizeAdd": lambda level, rng: (int(level / _MAX_LEVEL * 110),),
    "Color": _enhance, "Contrast": _enhance, "Brightness": _enhance, "Sharpness": _enhance,
    "ColorIncreasing": _enhance_increasing, "ContrastIncreasing": _enhance_increasing,
    "BrightnessIncreasing": _enhance_increasing, "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda level, rng: (_signed(level / _MAX_LEVEL * 0.3, rng),),
    "ShearY": lambda level, rng: (_signed(level / _MAX_LEVEL * 0.3, rng),),
    "TranslateXRel": lambda level, rng: (_signed(level / _MAX_LEVEL * 0.45, rng),),
    "TranslateYRel": lambda level, rng: (_signed(level / _MAX_LEVEL * 0.45, rng),),
}

# The official op lists, in the official order.
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


class RandAugment:
    """The official video RandAugment (``"rand-m7-n4-mstd0.5-inc1"``), one decision per clip.

    Per clip: ``num_ops`` ops are drawn uniformly with replacement from the 15-op list (the
    *Increasing variants if ``increasing``); each then runs with probability ``prob``, at level
    ``gauss(magnitude, magnitude_std)`` clipped to [0, 10], its signed argument negated with
    probability 0.5. Every frame gets the same ops with the same arguments.

    ``interpolation`` (``"bicubic"`` or ``"bilinear"``) and ``fill`` (the grey level outside the
    frame) are for the geometric ops (Rotate, ShearX/Y, TranslateX/YRel).
    """

    def __init__(self, magnitude: float = 7, num_ops: int = 4, magnitude_std: float = 0.5,
                 increasing: bool = True, prob: float = 0.5, interpolation: str = "bicubic", fill: int = 128):
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= _MAX_LEVEL:
            raise ValueError(f"magnitude must be a number in [0, 10], got {magnitude!r}")
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an int >= 0, got {num_ops!r}")
        if (isinstance(magnitude_std, bool) or not isinstance(magnitude_std, (int, float))
                or not 0 <= magnitude_std < math.inf):
            raise ValueError(f"magnitude_std must be a finite number >= 0, got {magnitude_std!r}")
        _check_prob(prob, "prob")
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
            raise ValueError(f"fill must be an int grey level in [0, 255], got {fill!r}")
        self.magnitude, self.num_ops, self.magnitude_std = magnitude, num_ops, magnitude_std
        self.increasing, self.prob, self.interpolation, self.fill = bool(increasing), prob, interpolation, fill
        self.op_names = INCREASING_OPS if self.increasing else OPS

    @classmethod
    def from_string(cls, spec: str, **kwargs) -> RandAugment:
        """Parse timm's spec: ``"rand"`` then ``-``-separated ``m<magnitude>``, ``n<num_ops>``,
        ``mstd<magnitude_std>``, ``inc<0|1>``, e.g. ``"rand-m7-n4-mstd0.5-inc1"``.

        A key left out takes timm's default (m10, n2, mstd0, inc0), so a spec means what it
        means to timm; ``inc0`` means not increasing (timm reads any ``inc`` as increasing).
        ``kwargs`` (``prob``, ``interpolation``, ``fill``) go to the constructor. timm's op
        weights (``w``) are not supported.
        """
        if not isinstance(spec, str):
            raise TypeError(f"RandAugment spec must be a str like 'rand-m7-n4-mstd0.5-inc1', "
                            f"got {type(spec).__name__}")
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec {spec!r} must start with 'rand', e.g. 'rand-m7-n4-mstd0.5-inc1'")
        args = {"magnitude": 10, "num_ops": 2, "magnitude_std": 0.0, "increasing": False}
        parse = {"m": ("magnitude", float), "n": ("num_ops", int), "mstd": ("magnitude_std", float),
                 "inc": ("increasing", lambda v: {"0": False, "1": True}[v])}
        for part in parts[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", part)
            if match and match[1] == "w":
                raise ValueError(f"RandAugment spec {spec!r}: weighted op choice ({part!r}) is not supported")
            if not match or match[1] not in parse:
                raise ValueError(f"RandAugment spec {spec!r}: unknown section {part!r}; "
                                 "expected m<magnitude>, n<num_ops>, mstd<std> or inc<0|1>")
            name, convert = parse[match[1]]
            try:
                args[name] = convert(match[2])
            except (ValueError, KeyError):
                raise ValueError(f"RandAugment spec {spec!r}: bad value in section {part!r}") from None
        try:
            return cls(**args, **kwargs)
        except ValueError as error:
            raise ValueError(f"RandAugment spec {spec!r}: {error}") from None

    def sample(self, rng: random.Random) -> list[tuple[str, tuple]]:
        """The ops one clip gets, in order: ``[(name, args), ...]`` (those that passed ``prob``)."""
        _check_rng(rng)
        # All draws first, as the official numpy choice(replace=True), then each op's own.
        names = [rng.choice(self.op_names) for _ in range(self.num_ops)]
        ops = []
        for name in names:
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = rng.gauss(level, self.magnitude_std)
            level = min(_MAX_LEVEL, max(0.0, level))
            ops.append((name, _LEVEL_TO_ARGS[name](level, rng)))
        return ops

    def apply(self, frames: torch.Tensor, ops: list[tuple[str, tuple]]) -> torch.Tensor:
        """Apply ``ops`` (a :meth:`sample` result) to every frame: uint8 (T, H, W, 3) -> the same.

        Pixel ops equal PIL's exactly. Geometric ops sample PIL's points with PIL's fill and edge
        rule, but with torch's bicubic (a = -0.75; PIL's transform uses a = -1) or bilinear
        kernel, rounded to the nearest level where PIL truncates: on smooth content they differ
        from PIL by a few grey levels at most (bilinear: one), well under one on average.
        """
        _check_frames(frames)
        if not ops:
            return frames.clone()  # a new tensor either way (every op makes one)
        W, H = frames.shape[2], frames.shape[1]
        for name, args in ops:
            if name in _AFFINE_OPS:
                frames = _affine(frames, _AFFINE_OPS[name](*args, W, H), self.interpolation, self.fill)
            elif name in _PIXEL_OPS:
                frames = _PIXEL_OPS[name](frames, *args)
            else:
                raise ValueError(f"unknown RandAugment op {name!r}; expected one of {sorted(_LEVEL_TO_ARGS)}")
        return frames

    def __call__(self, frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Augment one clip: uint8 (T, H, W, 3) -> uint8 (T, H, W, 3), a new tensor."""
        _check_frames(frames)
        return self.apply(frames, self.sample(rng))

    def __repr__(self):
        return (f"RandAugment(magnitude={self.magnitude}, num_ops={self.num_ops}, magnitude_std={self.magnitude_std}, "
                f"increasing={self.increasing}, prob={self.prob}, interpolation={self.interpolation!r}, "
                f"fill={self.fill})")


# ---------------------------------------------------------------------------------------------
# Spatial crops and flip on float (..., H, W).

def _resize(x, size):
    """Bilinear resize of the last two dims to ``size`` (h, w), align_corners=False, no antialias."""
    if x.ndim == 4:  # as the official code calls it, to the last bit (the layout changes the rounding)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = F.interpolate(x.reshape(1, -1, *x.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return out.reshape(*x.shape[:-2], *size)


def _resized_crop_box(H, W, scale, ratio, rng):
    """The official ``_get_param_spatial_crop``: (top, left, h, w)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = rng.uniform(*scale) * H * W
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    # Ten misses: the centred crop of the frame's aspect clamped to the ratio range.
    if W / H < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif W / H > ratio[1]:
        w, h = int(round(H * ratio[1])), H
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def random_resized_crop(x: torch.Tensor, size: int, rng: random.Random, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """The official ``random_resized_crop``: float (..., H, W) -> (..., size, size).

    A box of ``scale`` of the area and aspect (w / h) in ``ratio`` (log-uniform), up to 10 tries,
    else the centre crop clamped to ``ratio``; the same box for every leading index (channel,
    frame). Resized bilinearly, align_corners=False, without antialiasing.
    """
    _check_float(x, "x", "(..., H, W)")
    _check_size(size, "size")
    _check_range(scale, "scale")
    _check_range(ratio, "ratio")
    _check_rng(rng)
    top, left, h, w = _resized_crop_box(x.shape[-2], x.shape[-1], scale, ratio, rng)
    return _resize(x[..., top:top + h, left:left + w], (size, size))


def short_side_jitter_crop(x: torch.Tensor, size: int, rng: random.Random, scale_range=(256, 320)) -> torch.Tensor:
    """The official ``random_short_side_scale_jitter`` then ``random_crop``: float (..., H, W) ->
    (..., size, size), a new tensor.

    The short side is resized to ``int(round(uniform(*scale_range)))`` (left as it is if it is
    that already), the long one to ``floor(long / short * new_short)``, bilinearly without
    antialiasing; then a ``size`` square at offsets drawn uniformly from every possible one (the
    official numpy ``randint(0, H - size)`` never draws the last).
    """
    _check_float(x, "x", "(..., H, W)")
    _check_size(size, "size")
    _check_range(scale_range, "scale_range")
    _check_rng(rng)
    H, W = x.shape[-2:]
    short = int(round(rng.uniform(*scale_range)))
    if min(H, W) != short:
        x = _resize(x, (math.floor(H / W * short), short) if W < H else (short, math.floor(W / H * short)))
    H, W = x.shape[-2:]
    if H < size or W < size:
        raise ValueError(f"short_side_jitter_crop: the frame resized to {H}x{W} (short side {short} from "
                         f"scale_range {tuple(scale_range)}) is smaller than the crop size {size}")
    top, left = rng.randint(0, H - size), rng.randint(0, W - size)
    return x[..., top:top + size, left:left + size].clone()


def horizontal_flip(x: torch.Tensor, rng: random.Random, p: float = 0.5) -> torch.Tensor:
    """Flip the last dim (width) of ``x`` (..., W) with probability ``p``; else return ``x`` itself."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (..., W), got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dim (..., W) to flip, got a 0-d tensor")
    _check_prob(p, "p")
    _check_rng(rng)
    return x.flip(-1) if rng.random() < p else x


# ---------------------------------------------------------------------------------------------
# Random erasing and Mixup/CutMix.

class RandomErasing:
    """timm's random erasing as a static occluder: float (C, T, H, W), normalised -> a new tensor.

    With probability ``prob``, ``count`` rectangles (1, or ``randint(1, max_count)``) each of area
    ``uniform(min_area, max_area) * H * W / count`` and aspect log-uniform in ``[min_aspect,
    1 / min_aspect]`` (10 tries each, strictly smaller than the frame) are filled with standard
    normal noise (``mode="pixel"``, one value per channel and pixel), one normal value per
    channel (``"rand"``) or zeros (``"const"``). Each rectangle and its fill are the same on every
    frame. The input is not modified.
    """

    def __init__(self, prob: float = 0.25, mode: str = "pixel", min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_count: int = 1):
        _check_prob(prob, "prob")
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        _check_range((min_area, max_area), "(min_area, max_area)")
        if max_area > 1:
            raise ValueError(f"max_area must be a fraction of the frame, <= 1, got {max_area!r}")
        if isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float)) or not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1] (the aspect range is [min_aspect, 1 / min_aspect]), "
                             f"got {min_aspect!r}")
        _check_size(max_count, "max_count")
        self.prob, self.mode, self.min_area, self.max_area = prob, mode, min_area, max_area
        self.min_aspect, self.max_count = min_aspect, max_count
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        _check_float(x, "x", "(C, T, H, W)", ndim=4)
        _check_rng(rng)
        out = x.clone()
        if rng.random() > self.prob:
            return out
        C, _, H, W = x.shape
        count = 1 if self.max_count == 1 else rng.randint(1, self.max_count)
        for _ in range(count):
            for _ in range(10):
                area = rng.uniform(self.min_area, self.max_area) * H * W / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < W and h < H:
                    top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                    # (C, 1, h, w): one fill broadcast over the frames, a static occluder.
                    out[:, :, top:top + h, left:left + w] = self._fill(C, h, w, rng).to(x.device, x.dtype)
                    break
        return out

    def _fill(self, C, h, w, rng):
        if self.mode == "const":
            return torch.zeros(C, 1, 1, 1)
        # Drawn on the CPU, so the noise is the same whatever device the clip is on.
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        shape = (C, 1, h, w) if self.mode == "pixel" else (C, 1, 1, 1)
        return torch.randn(shape, generator=generator)

    def __repr__(self):
        return (f"RandomErasing(prob={self.prob}, mode={self.mode!r}, min_area={self.min_area}, "
                f"max_area={self.max_area}, min_aspect={self.min_aspect}, max_count={self.max_count})")


def _smooth_one_hot(labels, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, dtype=torch.float32,
                      device=labels.device).scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


class Mixup:
    """The official video MixUp/CutMix, per batch: (B, C, T, H, W) float clips and (B,) int64
    labels -> (mixed clips, a new tensor; soft targets (B, num_classes) float32 on the labels'
    device), every clip mixed with the batch's mirror ``clips.flip(0)``.

    With probability ``prob``: CutMix with probability ``switch_prob`` if both alphas are > 0
    (else the active one), ``lam ~ Beta(alpha, alpha)`` of the chosen. Mixup blends
    ``lam * x + (1 - lam) * x.flip(0)``; CutMix pastes a box of ``flip(0)`` over (H, W), the same
    box on every frame and channel, and (``correct_lam``) sets ``lam`` to the kept area fraction.
    Targets are the label-smoothed one-hots mixed with the same ``lam``; every row sums to 1.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, correct_lam: bool = True):
        _check_size(num_classes, "num_classes")
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0 (0 turns it off), got {alpha!r}")
        _check_prob(prob, "prob")
        _check_prob(switch_prob, "switch_prob")
        _check_prob(label_smoothing, "label_smoothing")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.correct_lam = bool(correct_lam)

    def _params(self, rng):
        """(lam, use_cutmix); lam 1.0 means no mixing."""
        if rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = rng.random() < self.switch_prob
        elif self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            cutmix = self.cutmix_alpha > 0
        else:
            return 1.0, False
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        return rng.betavariate(alpha, alpha), cutmix

    def _box(self, H, W, lam, rng):
        """The official ``rand_bbox``: a box of side ``sqrt(1 - lam)`` of the frame's, centred
        anywhere, clipped to the frame: (y0, y1, x0, x1)."""
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.randint(0, H - 1), rng.randint(0, W - 1)
        return (min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H),
                min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W))

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        _check_float(clips, "clips", "(B, C, T, H, W)", ndim=5)
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or labels.dtype == torch.bool:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer torch.Tensor (B,) of class indices, got {got}")
        B = clips.shape[0]
        if labels.shape != (B,):
            raise ValueError(f"labels must be (B,) = ({B},) for clips of shape {tuple(clips.shape)}, "
                             f"got shape {tuple(labels.shape)}")
        if B < 2:
            raise ValueError(f"Mixup mixes each clip with another of the batch: B must be >= 2, got {B}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be class indices in [0, {self.num_classes}), got values in "
                             f"[{labels.min().item()}, {labels.max().item()}]")
        _check_rng(rng)
        lam, cutmix = self._params(rng)
        if lam < 1.0 and not cutmix:
            mixed = clips * lam + clips.flip(0) * (1.0 - lam)
        else:
            mixed = clips.clone()
            if lam < 1.0:
                y0, y1, x0, x1 = self._box(clips.shape[-2], clips.shape[-1], lam, rng)
                mixed[..., y0:y1, x0:x1] = clips[..., y0:y1, x0:x1].flip(0)
                if self.correct_lam:  # the share actually pasted
                    lam = 1.0 - (y1 - y0) * (x1 - x0) / (clips.shape[-2] * clips.shape[-1])
        targets = _smooth_one_hot(labels.long(), self.num_classes, self.label_smoothing)
        return mixed, targets * lam + targets.flip(0) * (1.0 - lam)

    def __repr__(self):
        return (f"Mixup(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"label_smoothing={self.label_smoothing}, correct_lam={self.correct_lam})")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets: ``mean_b sum_k -targets[b, k] * log_softmax(logits)[b, k]``.

    ``logits`` and ``targets`` (B, num_classes), as :class:`Mixup` returns; a scalar.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensors (B, num_classes)")
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (B, num_classes), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
