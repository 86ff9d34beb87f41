"""uniformer_fast.data.augment against the official UniFormer training augmentations and PIL.

The official rules (Sense-X/UniFormer ``video_classification/slowfast/datasets``: rand_augment.py,
transform.py, random_erasing.py, mixup.py, after timm) are restated below as plain reference
functions (``ref_*``), written from the official code and not from the implementation. The
RandAugment ops are checked frame by frame against PIL itself, the library the official ops
call: LUT ops exactly, enhance ops to a grey level, geometric ops on smooth content to a
tolerance (the bicubic kernels differ) and by where they move a bright blob.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from uniformer_fast.data import augment
from uniformer_fast.data.augment import (INCREASING_OPS, OPS, Mixup, RandAugment, RandomErasing, horizontal_flip,
                                    random_resized_crop, short_side_jitter_crop, soft_target_cross_entropy)

ALL_OPS = sorted(set(INCREASING_OPS) | set(OPS))
LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
           "SolarizeIncreasing", "SolarizeAdd")
ENHANCE_OPS = ("Color", "Contrast", "Brightness", "Sharpness", "ColorIncreasing", "ContrastIncreasing",
               "BrightnessIncreasing", "SharpnessIncreasing")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED = set(GEOMETRIC_OPS) | {n for n in ENHANCE_OPS if n.endswith("Increasing")}
LEVELS = (0, 3.3, 7, 10)
FILL = (128, 128, 128)


# ---------------------------------------------------------------------------------------------
# The official rules, restated.

def ref_args(name, level, negate=False):
    """rand_augment.py's level -> argument functions (level in [0, 10])."""
    sign = -1 if negate else 1
    table = {
        "Rotate": lambda: (sign * (level / 10 * 30),),
        "ShearX": lambda: (sign * (level / 10 * 0.3),),
        "ShearY": lambda: (sign * (level / 10 * 0.3),),
        "TranslateXRel": lambda: (sign * (level / 10 * 0.45),),
        "TranslateYRel": lambda: (sign * (level / 10 * 0.45),),
        "Posterize": lambda: (int(level / 10 * 4),),
        "PosterizeIncreasing": lambda: (4 - int(level / 10 * 4),),
        "Solarize": lambda: (int(level / 10 * 256),),
        "SolarizeIncreasing": lambda: (256 - int(level / 10 * 256),),
        "SolarizeAdd": lambda: (int(level / 10 * 110),),
    }
    if name in table:
        return table[name]()
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level / 10 * 1.8 + 0.1,)
    if name.endswith("Increasing"):
        return (1.0 + sign * (level / 10 * 0.9),)
    return ()


def ref_pil(name, img, args, fill=FILL, resample=Image.BICUBIC):
    """The official op on one PIL image (rand_augment.py's functions; the official runs use
    bicubic and fill 128)."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name.startswith("Posterize"):
        if args[0] == 0:  # Pillow >= 10 refuses 0 bits; the Pillow of the official runs made it black
            return img.point([i & ~(2 ** 8 - 1) for i in range(256)] * 3)
        return img if args[0] >= 8 else ImageOps.posterize(img, args[0])
    if name == "SolarizeAdd":
        return img.point([min(255, i + args[0]) if i < 128 else i for i in range(256)] * 3)
    if name.startswith("Solarize"):
        return ImageOps.solarize(img, args[0])
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if name.removesuffix("Increasing") in enhance:
        return enhance[name.removesuffix("Increasing")](img).enhance(args[0])
    kwargs = dict(resample=resample, fillcolor=fill)
    if name == "Rotate":
        return img.rotate(args[0], **kwargs)
    W, H = img.size
    data = {"ShearX": (1, args[0], 0, 0, 1, 0), "ShearY": (1, 0, 0, args[0], 1, 0),
            "TranslateXRel": (1, 0, args[0] * W, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, args[0] * H)}[name]
    return img.transform(img.size, Image.AFFINE, data, **kwargs)


def ref_pil_clip(name, frames, args, fill=FILL, resample=Image.BICUBIC):
    return torch.stack([torch.from_numpy(np.array(ref_pil(name, Image.fromarray(f.numpy()), args, fill, resample)))
                        for f in frames])


def ref_crop_box(H, W, scale, ratio, rng):
    """transform.py's _get_param_spatial_crop (log-scale aspect): (top, left, h, w)."""
    for _ in range(10):
        target_area = rng.uniform(*scale) * H * W
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    in_ratio = float(W) / float(H)
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def ref_jitter_crop(x, size, rng, lo, hi):
    """transform.py's random_short_side_scale_jitter then a crop at offsets in [0, H - size]."""
    short = int(round(rng.uniform(lo, hi)))
    H, W = x.shape[-2:]
    if not ((W <= H and W == short) or (H <= W and H == short)):
        new_h, new_w = (int(math.floor(float(H) / W * short)), short) if W < H else \
            (short, int(math.floor(float(W) / H * short)))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    H, W = x.shape[-2:]
    top, left = rng.randint(0, H - size), rng.randint(0, W - size)
    return x[..., top:top + size, left:left + size]


def ref_erase_boxes(H, W, rng, prob, min_area, max_area, min_aspect, max_count):
    """timm's RandomErasing._erase (random_erasing.py): the (top, left, h, w) it fills."""
    if rng.random() > prob:
        return []
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 1 if max_count == 1 else rng.randint(1, max_count)
    boxes = []
    for _ in range(count):
        for _ in range(10):
            target_area = rng.uniform(min_area, max_area) * H * W / count
            aspect_ratio = math.exp(rng.uniform(*log_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                boxes.append((rng.randint(0, H - h), rng.randint(0, W - w), h, w))
                break
    return boxes


def ref_mixup(x, target, rng, num_classes, mixup_alpha, cutmix_alpha, mix_prob=1.0, switch_prob=0.5,
              correct_lam=True, smoothing=0.1):
    """mixup.py's MixUp, its numpy draws taken from ``rng`` in the same order."""
    x = x.clone()
    lam, use_cutmix = 1.0, False
    if rng.random() < mix_prob:
        if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
            use_cutmix = rng.random() < switch_prob
            lam_mix = rng.betavariate(cutmix_alpha, cutmix_alpha) if use_cutmix else \
                rng.betavariate(mixup_alpha, mixup_alpha)
        elif mixup_alpha > 0.0:
            lam_mix = rng.betavariate(mixup_alpha, mixup_alpha)
        else:
            use_cutmix, lam_mix = True, rng.betavariate(cutmix_alpha, cutmix_alpha)
        lam = float(lam_mix)
    if lam != 1.0:
        if use_cutmix:  # rand_bbox + get_cutmix_bbox
            ratio = np.sqrt(1 - lam)
            img_h, img_w = x.shape[-2:]
            cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
            cy, cx = rng.randint(0, img_h - 1), rng.randint(0, img_w - 1)
            yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
            xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
            if correct_lam:
                lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
            x[..., yl:yh, xl:xh] = x.flip(0)[..., yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
    off, on = smoothing / num_classes, 1.0 - smoothing + smoothing / num_classes
    one_hot = [torch.full((len(t), num_classes), off).scatter_(1, t.long().view(-1, 1), on)
               for t in (target, target.flip(0))]
    return x, one_hot[0] * lam + one_hot[1] * (1.0 - lam)


# ---------------------------------------------------------------------------------------------
# Test clips.

def varied_clip(T=3, H=17, W=23, seed=0):
    """uint8 (T, H, W, 3): every frame and channel with its own skewed value range, so
    AutoContrast and Equalize are not the identity and per-frame statistics matter."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for t in range(T):
        lo = torch.randint(0, 80, (3,), generator=g)
        hi = torch.randint(150, 256, (3,), generator=g)
        u = torch.rand(H, W, 3, generator=g) ** (1 + t)
        frames.append((lo + u * (hi - lo)).to(torch.uint8))
    return torch.stack(frames)


def smooth_clip(T=2, H=48, W=64, blob=None, background=True):
    """Smooth uint8 frames: colour gradients plus a Gaussian blob (at ``blob``, (x, y))."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    bx, by = blob if blob is not None else (0.6 * W, 0.4 * H)
    spot = torch.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * 3.0 ** 2))
    if background:
        img = torch.stack((40 + 150 * x / W + 60 * spot, 40 + 150 * y / H + 60 * spot, 60 + 150 * spot), -1)
    else:
        img = 250 * spot.unsqueeze(-1).expand(H, W, 3)
    frames = torch.stack([img + 4 * t for t in range(T)])
    return frames.round().clamp(0, 255).to(torch.uint8)


def op_cases(names):
    """(name, level, negate) for every op, level and (for signed ops) sign."""
    return [pytest.param(n, lv, neg, id=f"{n}-{lv}{'-neg' if neg else ''}")
            for n in names for lv in LEVELS for neg in ((False, True) if n in SIGNED else (False,))]


AUG = RandAugment()


# ---------------------------------------------------------------------------------------------
# RandAugment ops.

@pytest.mark.parametrize("name, level, negate", op_cases(ALL_OPS))
def test_op_keeps_shape_and_is_the_same_on_every_frame(name, level, negate):
    frame = varied_clip(T=1)[0]
    clip = frame.expand(3, *frame.shape).clone()
    out = AUG.apply(clip, [(name, ref_args(name, level, negate))])
    assert out.dtype == torch.uint8 and out.shape == clip.shape == (3, 17, 23, 3)
    assert torch.equal(out, out[:1].expand_as(out)), f"{name}: frames of one image came out different"
    assert torch.equal(clip, frame.expand_as(clip)), f"{name} modified its input"


@pytest.mark.parametrize("name, level, negate", op_cases(LUT_OPS))
@pytest.mark.parametrize("size", [(17, 23), (41, 37)], ids=["17x23", "41x37"])  # equalize's step 1 and > 1
def test_lut_ops_equal_pil(name, level, negate, size):
    clip = varied_clip(H=size[0], W=size[1])
    args = ref_args(name, level, negate)
    assert torch.equal(AUG.apply(clip, [(name, args)]), ref_pil_clip(name, clip, args))


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize"])
@pytest.mark.parametrize("kind", ["flat", "two_levels", "full_range"])
def test_histogram_ops_edge_cases_equal_pil(name, kind):
    g = torch.Generator().manual_seed(1)
    if kind == "flat":  # one level per channel: both leave it alone
        clip = torch.tensor([7, 99, 255], dtype=torch.uint8).expand(2, 5, 6, 3).clone()
    elif kind == "two_levels":
        clip = torch.where(torch.rand(2, 5, 6, 3, generator=g) < 0.9, 30, 200).to(torch.uint8)
    else:
        clip = torch.randint(0, 256, (2, 45, 51, 3), generator=g, dtype=torch.uint8)
    assert torch.equal(AUG.apply(clip, [(name, ())]), ref_pil_clip(name, clip, ()))


@pytest.mark.parametrize("name, level, negate", op_cases(ENHANCE_OPS))
@pytest.mark.parametrize("size", [(17, 23), (2, 5)], ids=["17x23", "2x5"])
def test_enhance_ops_match_pil(name, level, negate, size):
    clip = varied_clip(H=size[0], W=size[1])
    args = ref_args(name, level, negate)
    out, ref = AUG.apply(clip, [(name, args)]), ref_pil_clip(name, clip, args)
    # PIL's float32 blend, truncated, is reproduced exactly (the brief asked for one grey level).
    assert torch.equal(out, ref), f"{name}{args}: up to {(out.int() - ref.int()).abs().max()} levels from PIL"


@pytest.mark.parametrize("name, level, negate", op_cases(GEOMETRIC_OPS))
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_geometric_ops_match_pil(name, level, negate, interpolation):
    clip = smooth_clip()
    args = ref_args(name, level, negate)
    out = RandAugment(interpolation=interpolation).apply(clip, [(name, args)])
    ref = ref_pil_clip(name, clip, args, resample=getattr(Image, interpolation.upper()))
    diff = (out.int() - ref.int()).abs()
    if level == 0:  # the identity: exact
        assert torch.equal(out, clip) and torch.equal(ref, clip)
    # The fill region must agree exactly (else a difference of ~128 shows). Inside, PIL truncates
    # where we round (up to 1 level), and its bicubic kernel (a = -1) is not torch's (a = -0.75).
    max_diff, mean_diff = (3, 0.5) if interpolation == "bicubic" else (1, 0.5)
    assert diff.max() <= max_diff and diff.float().mean() <= mean_diff, \
        f"max |difference| {diff.max()}, mean {diff.float().mean():.2f}"


@pytest.mark.parametrize("name, negate", [(n, s) for n in GEOMETRIC_OPS for s in (False, True)])
def test_geometric_ops_move_content_as_pil(name, negate):
    H, W = 48, 64
    clip = smooth_clip(T=1, H=H, W=W, blob=(0.5 * W + 9, 0.5 * H - 8), background=False)
    args = ref_args(name, 6, negate)
    out = RandAugment(fill=0).apply(clip, [(name, args)])[0, ..., 0].double()
    ref = ref_pil_clip(name, clip, args, fill=(0, 0, 0))[0, ..., 0].double()

    def centroid(img):
        y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
        return torch.stack(((img * x).sum(), (img * y).sum())) / img.sum()

    before, c_out, c_ref = centroid(clip[0, ..., 0].double()), centroid(out), centroid(ref)
    assert (c_ref - before).abs().max() > 2, "the test should move the blob"
    assert (c_out - c_ref).abs().max() < 0.3, f"blob at {c_out.tolist()}, PIL puts it at {c_ref.tolist()}"


def test_apply_checks_its_input():
    with pytest.raises(TypeError, match="uint8"):
        AUG.apply(torch.zeros(2, 8, 8, 3), [("Invert", ())])
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        AUG.apply(torch.zeros(8, 8, 3, dtype=torch.uint8), [("Invert", ())])
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        AUG(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), random.Random(0))
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        AUG.apply(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), [("Blur", ())])
    with pytest.raises(TypeError, match="random.Random"):
        AUG(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# RandAugment: configuration and sampling.

def test_from_string():
    aug = RandAugment.from_string("rand-m7-n4-mstd0.5-inc1")
    assert (aug.magnitude, aug.num_ops, aug.magnitude_std, aug.increasing) == (7, 4, 0.5, True)
    assert aug.op_names == INCREASING_OPS and len(INCREASING_OPS) == len(OPS) == 15
    assert (aug.prob, aug.interpolation, aug.fill) == (0.5, "bicubic", 128)
    default = RandAugment()
    assert (default.magnitude, default.num_ops, default.magnitude_std, default.increasing) == (7, 4, 0.5, True)
    plain = RandAugment.from_string("rand-m9-inc0", prob=1.0)
    assert (plain.magnitude, plain.num_ops, plain.magnitude_std, plain.op_names, plain.prob) == (9, 2, 0.0, OPS, 1.0)


@pytest.mark.parametrize("spec, match", [
    ("rnd-m7", "must start with 'rand'"), ("", "must start with 'rand'"), ("rand-m7-w0", "weighted"),
    ("rand-m7-x3", "unknown section 'x3'"), ("rand-m", "unknown section 'm'"), ("rand-n4.5", "bad value"),
    ("rand-inc2", "bad value"), ("rand-m12", "magnitude must be"), ("rand--m7", "unknown section ''")])
def test_from_string_refuses_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        RandAugment.from_string(spec)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prob=1.5), "prob"), (dict(magnitude=-1), "magnitude"), (dict(num_ops=-1), "num_ops"),
    (dict(magnitude_std=-0.5), "magnitude_std"), (dict(interpolation="nearest"), "interpolation"),
    (dict(fill=300), "fill")])
def test_randaugment_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandAugment(**kwargs)


@pytest.mark.parametrize("increasing", [True, False])
def test_sample_args_follow_the_official_levels(increasing):
    for level in (0, 7, 10):
        aug = RandAugment(magnitude=level, magnitude_std=0, prob=1.0, num_ops=600, increasing=increasing)
        ops = aug.sample(random.Random(level))
        assert {n for n, _ in ops} == set(aug.op_names)
        signs = {}
        for name, args in ops:
            assert args in (ref_args(name, level), ref_args(name, level, negate=True)), (name, args)
            signs.setdefault(name, set()).add(args == ref_args(name, level))
        if level > 0:
            assert all(len(signs[n]) == 2 for n in SIGNED & set(aug.op_names)), "signed ops take both signs"


def test_sample_statistics():
    rng, n = random.Random(0), 4000
    samples = [RandAugment(prob=1.0).sample(rng) for _ in range(n)]
    names = [name for ops in samples for name, _ in ops]
    counts = np.array([names.count(op) for op in INCREASING_OPS])
    assert len(names) == 4 * n and np.abs(counts / (4 * n) * 15 - 1).max() < 0.15, counts  # uniform
    repeats = np.mean([len({name for name, _ in ops}) < 4 for ops in samples])
    assert abs(repeats - (1 - 15 * 14 * 13 * 12 / 15 ** 4)) < 0.03, repeats  # with replacement
    applied = sum(len(RandAugment(prob=0.3).sample(rng)) for _ in range(n)) / (4 * n)
    assert abs(applied - 0.3) < 0.02, applied
    # Magnitudes are clipped to [0, 10]: with a wide spread both ends are reached, never passed.
    wide = [op for _ in range(n) for op in RandAugment(magnitude_std=8, prob=1.0).sample(rng)]
    rotate = [abs(args[0]) for name, args in wide if name == "Rotate"]
    assert max(rotate) == 30.0 and min(rotate) == 0.0
    add = [args[0] for name, args in wide if name == "SolarizeAdd"]
    assert max(add) == 110 and min(add) == 0
    factors = [args[0] for name, args in wide if name == "ColorIncreasing"]
    assert 0.1 - 1e-12 <= min(factors) and max(factors) <= 1.9 + 1e-12


def test_randaugment_is_deterministic_and_leaves_global_rngs_alone():
    clip = varied_clip(T=2, H=20, W=24)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    outs = [AUG(clip, random.Random(seed)) for seed in range(6)]
    assert all(torch.equal(AUG(clip, random.Random(seed)), outs[seed]) for seed in range(6))
    assert len({o.numpy().tobytes() for o in outs}) == 6, "different seeds should give different clips"
    # The rng's state after a call is what restoring it replays.
    rng = random.Random(3)
    AUG(clip, rng)
    state = rng.getstate()
    first = AUG(clip, rng)
    rng.setstate(state)
    assert torch.equal(AUG(clip, rng), first)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


# ---------------------------------------------------------------------------------------------
# Crops and flip.

def coord_clip(C=3, T=4, H=30, W=40):
    """float (C, T, H, W) with distinct smooth content per channel and frame."""
    c, t, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (C, T, H, W)), indexing="ij")
    return torch.sin(x / 5 + c) + torch.cos(y / 7 + t) + 0.01 * x * y


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape, size", [((3, 4, 30, 40), 16), ((2, 5, 17, 23), 7), ((30, 40), 9)])
def test_random_resized_crop_is_the_official_box_resized(seed, shape, size):
    x = coord_clip(*((1, 1) if len(shape) == 2 else shape[:2]), *shape[-2:]).reshape(shape)
    out = random_resized_crop(x, size, random.Random(seed))
    top, left, h, w = ref_crop_box(*shape[-2:], (0.08, 1.0), (3 / 4, 4 / 3), random.Random(seed))
    assert 0 <= top and top + h <= shape[-2] and 0 <= left and left + w <= shape[-1]
    region = x[..., top:top + h, left:left + w]  # the official interpolates its 4-D clip as it is
    region = region if region.ndim == 4 else region.reshape(1, 1, h, w)
    ref = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)
    ref = ref.reshape(*shape[:-2], size, size)
    assert out.shape == (*shape[:-2], size, size) and torch.equal(out, ref)
    assert torch.equal(random_resized_crop(x, size, random.Random(seed)), out)


def test_random_resized_crop_box_stays_in_bounds():
    rng = random.Random(0)
    for _ in range(2000):
        H, W = rng.randint(1, 60), rng.randint(1, 60)
        scale = sorted((rng.uniform(0.01, 1.0), rng.uniform(0.01, 1.0)))
        top, left, h, w = augment._resized_crop_box(H, W, scale, (3 / 4, 4 / 3), rng)
        assert 0 < h and 0 < w and 0 <= top and top + h <= H and 0 <= left and left + w <= W, (H, W, top, left, h, w)


@pytest.mark.parametrize("H, W, box", [(4, 200, (0, 97, 4, 5)), (200, 4, (97, 0, 5, 4))])
def test_random_resized_crop_fallback_is_the_clamped_centre(H, W, box):
    # No box of 8-100% of the area with an aspect in [3/4, 4/3] fits: the centre crop, clamped.
    x = coord_clip(1, 2, H, W)
    assert augment._resized_crop_box(H, W, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(0)) == box
    top, left, h, w = box
    ref = F.interpolate(x[..., top:top + h, left:left + w], size=(6, 6), mode="bilinear", align_corners=False)
    assert torch.equal(random_resized_crop(x, 6, random.Random(0)), ref)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape, size, scale_range", [
    ((3, 4, 30, 40), 16, (20, 28)), ((2, 3, 41, 25), 12, (13, 30)), ((3, 2, 24, 32), 24, (24, 24))])
def test_short_side_jitter_crop_is_official(seed, shape, size, scale_range):
    x = coord_clip(*shape)
    out = short_side_jitter_crop(x, size, random.Random(seed), scale_range)
    ref = ref_jitter_crop(x, size, random.Random(seed), *scale_range)
    assert out.shape == (*shape[:2], size, size) and torch.equal(out, ref)
    assert torch.equal(short_side_jitter_crop(x, size, random.Random(seed), scale_range), out)


def test_short_side_jitter_crop_offsets_cover_every_position():
    x = coord_clip(1, 1, 10, 10)
    seen = {short_side_jitter_crop(x, 8, random.Random(s), (10, 10))[0, 0, 0, 0].item() for s in range(200)}
    assert len(seen) == 9  # offsets 0, 1, 2 in each direction


def test_short_side_jitter_crop_too_small_raises():
    with pytest.raises(ValueError, match="smaller than the crop size 16"):
        short_side_jitter_crop(coord_clip(1, 1, 12, 12), 16, random.Random(0), (10, 12))


def test_horizontal_flip():
    x = coord_clip(2, 3, 5, 7)
    assert torch.equal(horizontal_flip(x, random.Random(0), p=1.0), x.flip(-1))
    assert horizontal_flip(x, random.Random(0), p=0.0) is x
    rng = random.Random(1)
    flips = [torch.equal(horizontal_flip(x, rng), x.flip(-1)) for _ in range(2000)]
    assert abs(np.mean(flips) - 0.5) < 0.05
    assert all(torch.equal(horizontal_flip(x, random.Random(s)), horizontal_flip(x, random.Random(s)))
               for s in range(5))


def test_crops_check_their_input():
    with pytest.raises(TypeError, match="floating-point"):
        random_resized_crop(torch.zeros(3, 8, 8, dtype=torch.uint8), 4, random.Random(0))
    with pytest.raises(ValueError, match="size"):
        random_resized_crop(torch.zeros(3, 8, 8), 0, random.Random(0))
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(torch.zeros(3, 8, 8), 4, random.Random(0), scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="scale_range"):
        short_side_jitter_crop(torch.zeros(3, 8, 8), 4, random.Random(0), scale_range=(0, 8))
    with pytest.raises(ValueError, match=r"p must be a probability"):
        horizontal_flip(torch.zeros(3, 8, 8), random.Random(0), p=2)


# ---------------------------------------------------------------------------------------------
# Random erasing.

@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("seed", range(5))
def test_random_erasing_is_one_static_rectangle(mode, seed):
    C, T, H, W = 3, 4, 40, 48
    x = torch.full((C, T, H, W), 5.0)
    eraser = RandomErasing(prob=1.0, mode=mode)
    out = eraser(x, random.Random(seed))
    assert torch.equal(x, torch.full_like(x, 5.0)), "the input was modified"
    changed = (out != x).any(0)  # (T, H, W)
    assert torch.equal(changed, changed[:1].expand_as(changed)), "the erased region differs between frames"
    assert torch.equal(out, out[:, :1].expand_as(out)), "the fill differs between frames"
    rows, cols = changed[0].any(1).nonzero().flatten(), changed[0].any(0).nonzero().flatten()
    h, w = len(rows), len(cols)
    assert h > 0 and changed[0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and changed[0].sum() == h * w
    # h and w are rounded from sqrt(area * aspect) and sqrt(area / aspect).
    assert (h - 0.5) * (w - 0.5) <= eraser.max_area * H * W and (h + 0.5) * (w + 0.5) >= eraser.min_area * H * W
    region = out[:, 0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if mode == "const":
        assert (region == 0).all()
    elif mode == "rand":
        assert torch.equal(region, region[:, :1, :1].expand_as(region))
    else:
        assert region.std() > 0.5 and abs(region.mean()) < 0.5
    assert torch.equal(eraser(x, random.Random(seed)), out)


@pytest.mark.parametrize("max_count", [1, 3])
@pytest.mark.parametrize("seed", range(10))
def test_random_erasing_boxes_are_timms(seed, max_count):
    C, T, H, W = 2, 3, 37, 29
    x = torch.full((C, T, H, W), 5.0)
    out = RandomErasing(prob=0.5, mode="const", max_count=max_count)(x, random.Random(seed))
    expected = torch.zeros(H, W, dtype=torch.bool)
    for top, left, h, w in ref_erase_boxes(H, W, random.Random(seed), 0.5, 0.02, 1 / 3, 0.3, max_count):
        expected[top:top + h, left:left + w] = True
    assert torch.equal(out == 0, expected.expand(C, T, H, W))


def test_random_erasing_probability_and_count():
    x = torch.zeros(2, 3, 32, 32)
    out = RandomErasing(prob=0.0)(x, random.Random(0))
    assert torch.equal(out, x) and out is not x
    rng = random.Random(0)
    erased = [bool((RandomErasing(prob=0.25, mode="rand")(x, rng) != 0).any()) for _ in range(2000)]
    assert abs(np.mean(erased) - 0.25) < 0.04
    many = RandomErasing(prob=1.0, max_count=4, mode="rand")
    out = many(x, random.Random(5))
    assert torch.equal(out, out[:, :1].expand_as(out))
    with pytest.raises(ValueError, match="mode"):
        RandomErasing(mode="noise")
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        many(torch.zeros(3, 32, 32), random.Random(0))


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix.

def ref_smooth_one_hot(labels, num_classes, smoothing):
    """mixup.py's label smoothing: off = smoothing / num_classes, on = 1 - smoothing + off."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def batch(B=4, C=2, T=3, H=16, W=20):
    """Clips of constant value b + 1, and distinct labels (so a clip's share reads off its targets)."""
    clips = (torch.arange(B, dtype=torch.float32) + 1).view(B, 1, 1, 1, 1).expand(B, C, T, H, W).clone()
    return clips, torch.tensor([3, 0, 7, 5, 1, 9, 2, 8][:B])


def lam_from_targets(targets, labels, smoothing, num_classes):
    off = smoothing / num_classes
    return ((targets[0, labels[0]] - off) / (1 - smoothing)).item()


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)], ids=["mixup", "cutmix", "both"])
@pytest.mark.parametrize("seed", range(8))
def test_mixup_targets_and_clips(alphas, seed):
    clips, labels = batch()
    mix = Mixup(10, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
    mixed, targets = mix(clips, labels, random.Random(seed))
    assert mixed.shape == clips.shape and targets.shape == (4, 10) and targets.dtype == torch.float32
    assert torch.equal(clips, batch()[0]), "the input was modified"
    assert torch.allclose(targets.sum(1), torch.ones(4), atol=1e-6)
    lam = lam_from_targets(targets, labels, 0.1, 10)
    assert 0 <= lam <= 1
    ref = ref_smooth_one_hot(labels, 10, 0.1) * lam + ref_smooth_one_hot(labels.flip(0), 10, 0.1) * (1 - lam)
    assert torch.allclose(targets, ref, atol=1e-6)
    kept = (mixed == clips)
    if torch.allclose(mixed, clips * lam + clips.flip(0) * (1 - lam)) and not kept.all():
        assert alphas[0] > 0  # a mixup
        return
    # A cutmix: one box over (H, W), the same on every clip, channel and frame, pasted from
    # flip(0); lam is the kept fraction.
    assert alphas[1] > 0
    box = ~kept[0, 0, 0]
    assert torch.equal(~kept, box.expand_as(kept))
    assert torch.equal(mixed[..., box], clips.flip(0)[..., box])
    if box.any():
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box.sum() == len(rows) * len(cols)
    assert lam == pytest.approx(1 - box.float().mean().item(), abs=1e-6)


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)], ids=["mixup", "cutmix", "both"])
@pytest.mark.parametrize("correct_lam", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_mixup_equals_the_official(alphas, correct_lam, seed):
    g = torch.Generator().manual_seed(seed)
    clips, labels = torch.randn(3, 2, 2, 11, 13, generator=g), torch.tensor([4, 1, 6])
    mixed, targets = Mixup(7, *alphas, correct_lam=correct_lam)(clips, labels, random.Random(seed))
    ref_mixed, ref_targets = ref_mixup(clips, labels, random.Random(seed), 7, *alphas, correct_lam=correct_lam)
    assert torch.equal(mixed, ref_mixed) and torch.allclose(targets, ref_targets, atol=1e-7)


def test_mixup_takes_both_paths_and_label_smoothing():
    clips, labels = batch()
    kinds = set()
    for seed in range(40):
        mixed, _ = Mixup(10)(clips, labels, random.Random(seed))
        kinds.add("cutmix" if ((mixed == clips) | (mixed == clips.flip(0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}
    mixed, targets = Mixup(10, prob=0.0, label_smoothing=0.2)(clips, labels, random.Random(0))
    assert torch.equal(mixed, clips) and mixed is not clips
    on, off = 1 - 0.2 + 0.02, 0.02
    assert torch.allclose(targets, F.one_hot(labels, 10).float() * (on - off) + off)
    _, targets = Mixup(10, prob=0.0, label_smoothing=0.0)(clips, labels, random.Random(0))
    assert torch.equal(targets, F.one_hot(labels, 10).float())


def test_mixup_without_correct_lam_keeps_the_beta_draw():
    clips, labels = batch(H=9, W=9)
    lams = []
    for seed in range(20):
        _, targets = Mixup(10, mixup_alpha=0, correct_lam=False)(clips, labels, random.Random(seed))
        rng = random.Random(seed)
        rng.random()  # the prob draw
        lams.append((lam_from_targets(targets, labels, 0.1, 10), rng.betavariate(1.0, 1.0)))
    assert all(a == pytest.approx(b, abs=1e-6) for a, b in lams)


def test_mixup_is_deterministic_and_checks_its_input():
    clips, labels = batch()
    mix = Mixup(10)
    a, b = mix(clips, labels, random.Random(4)), mix(clips, labels, random.Random(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="B must be >= 2"):
        mix(clips[:1], labels[:1], random.Random(0))
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        mix(clips, torch.tensor([0, 1, 2, 10]), random.Random(0))
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        mix(clips, torch.tensor([0, -1, 2, 3]), random.Random(0))
    with pytest.raises(TypeError, match="integer"):
        mix(clips, labels.float(), random.Random(0))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        mix(clips, labels[:3], random.Random(0))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        mix(clips[0], labels, random.Random(0))
    with pytest.raises(ValueError, match="switch_prob"):
        Mixup(10, switch_prob=-0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_target_cross_entropy_equals_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    _, targets = Mixup(10, prob=0.0, label_smoothing=smoothing)(torch.zeros(6, 1, 1, 2, 2), labels, random.Random(0))
    ref = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert torch.allclose(soft_target_cross_entropy(logits, targets), ref, atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        soft_target_cross_entropy(logits, targets[:, :5])


def test_augmentations_leave_global_rngs_alone():
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    rng = random.Random(0)
    x = coord_clip(3, 4, 30, 40)
    short_side_jitter_crop(random_resized_crop(x, 24, rng), 16, rng, (16, 20))
    horizontal_flip(x, rng)
    RandomErasing(prob=1.0)(x, rng)
    Mixup(10)(torch.stack([x, x + 1]), torch.tensor([1, 2]), rng)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
