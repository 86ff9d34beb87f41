"""uniformer_fast.data.video against the official UniFormer test rules.

The rules of Sense-X/UniFormer ``video_classification/slowfast/datasets`` (decoder.py, kinetics.py,
sth.py, utils.py, transform.py) are restated below as plain reference functions (``ref_*``), written
from the official code and not from the implementation; every expected value is built with them.
The videos are small (48x80) and made once per module; their frames carry their own index in the
pixels (``helpers.id_frame``), so which frame came back can be read off the picture.
"""
from __future__ import annotations

import math
import os
import random
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

av = pytest.importorskip("av")

from helpers import frame_ids, id_frame, matrix, write_id_video  # noqa: E402
from uniformer_fast.data.training import load_clip  # noqa: E402
from uniformer_fast.data.video import (  # noqa: E402
    VideoDecodeError, VideoReader, crop_positions, dense_indices, load_views, read_frames,
    resize_short_side, segment_indices, to_views, uniform_crop, view_indices, window_indices)

PROTOCOLS = ("kinetics", "sth")
GOP = 8  # keyframe interval of the test videos (libx264 with 2 B-frames)
H, W = 48, 80  # the test videos' frame size
SIZE = 32  # crop size of the end-to-end tests


# ---------------------------------------------------------------------------------------------
# The official rules, restated.

def ref_kinetics(total, num_frames, sample_rate, view, views):
    """decoder.py, decord backend with USE_OFFSET_SAMPLING: get_start_end_idx + temporal_sampling."""
    clip_size = sample_rate * num_frames
    delta = max(total - clip_size, 0)
    if views == 1:
        start = math.floor(delta / 2)
    else:
        start = view * math.floor(delta / (views - 1))
    end = start + clip_size - 1
    index = torch.linspace(start, end, num_frames)  # the default dtype, float32
    index = torch.clamp(index, 0, total - 1).long()
    return index.tolist()


def ref_sth(total, num_frames, view, views):
    """sth.py's test sampler; the official +1 (1-based frame files) left out: indices are 0-based."""
    seg_size = float(total - 1) / num_frames
    duration = seg_size / (views + 1)
    seq = []
    for i in range(num_frames):
        start = int(np.round(seg_size * i))
        frame_index = start + int(duration * (view + 1))
        seq.append(frame_index)
    return seq


def ref_indices(protocol, total, num_frames, sample_rate, view, views):
    if protocol == "kinetics":
        return ref_kinetics(total, num_frames, sample_rate, view, views)
    return ref_sth(total, num_frames, view, views)


def ref_short_side_scale(images, size):
    """transform.random_short_side_scale_jitter at test time (min = max = size): images C T H W."""
    height, width = images.shape[2], images.shape[3]
    if (width <= height and width == size) or (height <= width and height == size):
        return images
    new_width = size
    new_height = size
    if width < height:
        new_height = int(math.floor((float(height) / width) * size))
    else:
        new_width = int(math.floor((float(width) / height) * size))
    return F.interpolate(images, size=(new_height, new_width), mode="bilinear", align_corners=False)


def ref_uniform_crop(images, size, spatial_idx):
    """transform.uniform_crop: images (..., H, W)."""
    height, width = images.shape[-2], images.shape[-1]
    y_offset = int(math.ceil((height - size) / 2))
    x_offset = int(math.ceil((width - size) / 2))
    if height > width:
        if spatial_idx == 0:
            y_offset = 0
        elif spatial_idx == 2:
            y_offset = height - size
    else:
        if spatial_idx == 0:
            x_offset = 0
        elif spatial_idx == 2:
            x_offset = width - size
    return images[..., y_offset:y_offset + size, x_offset:x_offset + size]


def ref_spatial_indices(crops, protocol):
    """kinetics.py: one crop is the centre (1), three are 0, 1, 2; sth.py: view % crops."""
    if protocol == "kinetics":
        return [1] if crops == 1 else list(range(crops))
    return [c % crops for c in range(crops)]


def ref_views_of(frames, size, crops, protocol, short_side=None):
    """The official test transform of one temporal view, uint8 (T, H, W, 3) -> (crops, C, T, size, size):
    tensor_normalize, permute to C T H W, short side scale, uniform crop."""
    x = frames.float() / 255.0
    x = (x - torch.tensor([0.45, 0.45, 0.45])) / torch.tensor([0.225, 0.225, 0.225])
    x = x.permute(3, 0, 1, 2)
    x = ref_short_side_scale(x, size if short_side is None else short_side)
    return torch.stack([ref_uniform_crop(x, size, i) for i in ref_spatial_indices(crops, protocol)])


def ref_windows(total, window, stride, sample_rate):
    """Full windows of ``window`` frames ``sample_rate`` apart, every ``stride * sample_rate``
    frames; a video shorter than one window gives one window, clamped."""
    span = (window - 1) * sample_rate + 1
    out = []
    start = 0
    while start + span <= total:
        out.append([start + j * sample_rate for j in range(window)])
        start += stride * sample_rate
    if not out:
        out.append([min(j * sample_rate, total - 1) for j in range(window)])
    return out


def assert_near(got, expected, atol=1e-5):
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# Test videos, made once.

def marked_frame(i, h, w):
    """:func:`id_frame` with a grey block in the top-left corner, so that every rotation and flip
    of the picture differs."""
    img = id_frame(i, h, w)
    img[:h // 4, :w // 8 + 2] = 128
    return img


VFR_PTS = [0, 1, 2, 5, 6, 7, 12, 13, 14, 20, 21, 30, 31, 32, 33, 40]
LENGTHS = {"long": 300, "odd": 97, "short": 10, "one": 1}


def write_frame_folder(folder, n, h=H, w=W):
    """``n`` JPEGs 00001.jpg... (1-based, as the official frame folders) from PyAV's mjpeg encoder."""
    os.makedirs(folder)
    enc = av.CodecContext.create("mjpeg", "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuvj420p"
    enc.time_base = Fraction(1, 25)
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(id_frame(i, h, w).numpy(), format="rgb24").reformat(format="yuvj420p")
        packets = list(enc.encode(frame))
        assert packets, "the mjpeg encoder held a frame back"
        with open(os.path.join(folder, f"{i + 1:05d}.jpg"), "wb") as f:
            for p in packets:
                f.write(bytes(p))
    with open(os.path.join(folder, "notes.txt"), "w") as f:  # not an image: ignored
        f.write("x")
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    v = {name: write_id_video(d / f"{name}.mp4", n, gop=GOP, bframes=2) for name, n in LENGTHS.items()}
    v["avi"] = write_id_video(d / "mpeg4.avi", 30, codec="mpeg4", gop=GOP)
    v["webm"] = write_id_video(d / "vp8.webm", 30, codec="libvpx", gop=GOP)
    v["vfr"] = write_id_video(d / "vfr.mp4", len(VFR_PTS), pts=VFR_PTS, rate=10, gop=4)
    for rot in (0, 90, -90, 180):
        v[f"rot{rot}"] = write_id_video(d / f"rot{rot}.mp4", 20, rotation=rot or None, picture=marked_frame)
    v["folder"] = write_frame_folder(str(d / "frames"), 17)
    os.makedirs(d / "empty")
    v["empty"] = str(d / "empty")
    garbage = d / "garbage.mp4"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    v["garbage"] = str(garbage)
    return v


# ---------------------------------------------------------------------------------------------
# 1. The index samplers.

def test_reference_samplers_match_worked_examples():
    # 16x4 of a 64-frame video: linspace(0, 63, 16), 4.2 apart and truncated (63/15, not 4).
    assert ref_kinetics(64, 16, 4, 0, 1) == [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63]
    # 300 frames: delta 236, start 118, end 181.
    assert ref_kinetics(300, 16, 4, 0, 1) == [118, 122, 126, 130, 134, 139, 143, 147, 151, 155, 160, 164,
                                              168, 172, 176, 181]
    assert ref_kinetics(10, 16, 4, 0, 1)[-3:] == [9, 9, 9]
    # sth, 17 frames, 8 segments of 2: shift int(2 / 3 * (view + 1)).
    assert ref_sth(17, 8, 0, 2) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert ref_sth(17, 8, 1, 2) == [1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("views", [1, 2, 4, 5, 10])
@pytest.mark.parametrize("sample_rate", [1, 2, 4, 8])
@pytest.mark.parametrize("num_frames", [8, 16, 32])
@pytest.mark.parametrize("total", [1, 10, 63, 64, 65, 97, 127, 300])
def test_dense_indices(total, num_frames, sample_rate, views):
    for view in range(views):
        got = dense_indices(total, num_frames, sample_rate, view, views)
        assert got.dtype == torch.int64 and got.shape == (num_frames,)
        assert got.tolist() == ref_kinetics(total, num_frames, sample_rate, view, views), f"view {view}"
        assert view_indices(total, num_frames, sample_rate, view, views, "kinetics").tolist() == got.tolist()


@pytest.mark.parametrize("views", [1, 2, 4, 5, 10])
@pytest.mark.parametrize("num_frames", [8, 16, 32])
@pytest.mark.parametrize("total", [1, 2, 17, 48, 121, 300])
def test_segment_indices(total, num_frames, views):
    for view in range(views):
        got = segment_indices(total, num_frames, view, views)
        assert got.dtype == torch.int64 and got.shape == (num_frames,)
        expected = ref_sth(total, num_frames, view, views)
        assert got.tolist() == expected, f"view {view}"
        assert all(0 <= i < total for i in expected)
        # sth has no sample rate: any given is ignored.
        assert view_indices(total, num_frames, 7, view, views, "sth").tolist() == expected


def test_view_indices_defaults_to_kinetics():
    assert view_indices(300, 16, 4, 2, 4).tolist() == ref_kinetics(300, 16, 4, 2, 4)
    assert dense_indices(300, 16, 4).tolist() == ref_kinetics(300, 16, 4, 0, 1)
    assert segment_indices(300, 16).tolist() == ref_sth(300, 16, 0, 1)


@pytest.mark.parametrize("kwargs,name", [
    (dict(protocol="ssv2"), "protocol"),
    (dict(protocol="Kinetics"), "protocol"),
    (dict(view=4, views=4), "view"),
    (dict(view=-1), "view"),
    (dict(view=1.0, views=2), "view"),
    (dict(views=0), "views"),
    (dict(total=0), "total"),
    (dict(num_frames=0), "num_frames"),
    (dict(sample_rate=0), "sample_rate"),
    (dict(protocol="sth", view=3, views=3), "view"),
    (dict(protocol="sth", total=0), "total"),
])
def test_view_indices_bad_arguments(kwargs, name):
    args = dict(total=100, num_frames=8, sample_rate=2, view=0, views=4, protocol="kinetics")
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name}:") as e:
        view_indices(**args)
    assert repr(args[name]) in str(e.value)


# ---------------------------------------------------------------------------------------------
# 2. End to end: load_views on id videos.

E2E_CONFIGS = [  # num_frames, sample_rate, views, crops, short_side
    (16, 4, 4, 3, None),
    (8, 2, 5, 1, None),
    (8, 8, 1, 3, 40),
    (4, 1, 2, 1, 36),
]


@matrix(cover="pairs", video=("long", "odd", "short", "one"), protocol=PROTOCOLS,
        config=[pytest.param(c, id="{}x{}_v{}_c{}_s{}".format(*c)) for c in E2E_CONFIGS])
def test_load_views_follows_official_rules(videos, video, protocol, config):
    num_frames, sample_rate, views, crops, short_side = config
    path = videos[video]
    out = load_views(path, num_frames, sample_rate, views, crops, SIZE, protocol=protocol, short_side=short_side)
    assert out.dtype == torch.float32 and out.shape == (views * crops, 3, num_frames, SIZE, SIZE)
    with VideoReader(path) as reader:
        total = len(reader)
        assert total == LENGTHS[video]
        for v in range(views):
            idx = ref_indices(protocol, total, num_frames, sample_rate, v, views)
            frames = reader.get_frames(idx)
            assert frame_ids(frames) == idx, f"view {v}"
            expected = ref_views_of(frames, SIZE, crops, protocol, short_side)
            for c in range(crops):
                assert_near(out[v * crops + c], expected[c])  # view-major


def test_load_views_accepts_an_open_reader(videos):
    with VideoReader(videos["long"]) as reader:
        out = load_views(None, 8, 2, 1, 1, SIZE, reader=reader)
        # Reads only about the clip (8 frames 2 apart) and leaves the reader open.
        assert reader.frames_decoded <= 15 + GOP + 4
        idx = ref_kinetics(300, 8, 2, 0, 1)
        assert frame_ids(reader.get_frames(idx)) == idx
    assert torch.equal(out, load_views(videos["long"], 8, 2, 1, 1, SIZE))


@pytest.mark.parametrize("video", ["long", "short", "one"])
def test_load_clip_eval_is_the_single_official_view(videos, video):
    clip = load_clip(videos[video], 8, 4, SIZE, train=False)
    assert clip.shape == (3, 8, SIZE, SIZE)
    assert torch.equal(clip, load_views(videos[video], 8, 4, 1, 1, SIZE)[0])


# ---------------------------------------------------------------------------------------------
# 3. Space: resize, crop positions, the whole test transform.

SHAPES = [(37, 50), (50, 37), (40, 40), (32, 45), (45, 32), (32, 32), (33, 97), (97, 33)]


def position_frames(h, w, t=3):
    """uint8 (t, h, w, 3): red is the row, green the column, blue the time and the sum."""
    rows = torch.arange(h).view(1, h, 1).expand(t, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(t, h, w)
    times = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    return torch.stack([rows * 2, cols * 2, (rows + cols + 50 * times) % 256], -1).to(torch.uint8)


def position_tensor(h, w, t=2):
    """float (2, t, h, w): channel 0 the row, channel 1 the column of each pixel."""
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(t, h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(t, h, w)
    return torch.stack([rows, cols])


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_uniform_crop_positions(shape, position, size):
    h, w = shape
    x = position_tensor(h, w)
    got = uniform_crop(x, size, position)
    expected = ref_uniform_crop(x, size, position)
    assert torch.equal(got, expected)
    # The offsets, read off the pixels: the long side's start, centre (ceil) or end; the short
    # side's centre.
    top, left = int(got[0, 0, 0, 0]), int(got[1, 0, 0, 0])
    centre = (math.ceil((h - size) / 2), math.ceil((w - size) / 2))
    if h > w:
        assert left == centre[1] and top == {0: 0, 1: centre[0], 2: h - size}[position]
    else:
        assert top == centre[0] and left == {0: 0, 1: centre[1], 2: w - size}[position]


@pytest.mark.parametrize("size", [32, 40, 45])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_resize_short_side(shape, size):
    h, w = shape
    x = position_tensor(h, w) * 3.0 + torch.rand(2, 2, h, w)
    got = resize_short_side(x, size)
    expected = ref_short_side_scale(x, size)
    assert got.shape == expected.shape and min(got.shape[-2:]) == size
    assert_near(got, expected)
    # Any leading dimensions: (T, C, H, W) and (C, H, W) give the same pictures.
    assert_near(resize_short_side(x.transpose(0, 1), size), expected.transpose(0, 1))
    assert_near(resize_short_side(x[:, 0], size), expected[:, 0])


def test_resize_short_side_has_no_antialias():
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    got = resize_short_side(x, 32)
    assert got.shape == (1, 3, 32, 53)
    plain = F.interpolate(x, size=(32, 53), mode="bilinear", align_corners=False, antialias=False)
    smooth = F.interpolate(x, size=(32, 53), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(got, plain)
    assert (got - smooth).abs().max() > 0.05  # the check can tell the two apart


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("crops", [1, 3])
@pytest.mark.parametrize("short_side", [None, 32, 40])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_to_views_is_the_official_transform(shape, short_side, crops, protocol):
    frames = position_frames(*shape)
    got = to_views(frames, 32, crops, short_side=short_side, protocol=protocol)
    expected = ref_views_of(frames, 32, crops, protocol, short_side)
    assert got.dtype == torch.float32 and got.shape == (crops, 3, 3, 32, 32)
    assert_near(got, expected)


@pytest.mark.parametrize("crops,protocol,positions", [
    (1, "kinetics", [1]), (1, "sth", [0]), (3, "kinetics", [0, 1, 2]), (3, "sth", [0, 1, 2])])
def test_crop_positions(crops, protocol, positions):
    assert crop_positions(crops, protocol) == positions == ref_spatial_indices(crops, protocol)


@pytest.mark.parametrize("call,match", [
    (lambda: crop_positions(2), "^crops:"),
    (lambda: crop_positions(1, "ucf"), "^protocol:"),
    (lambda: uniform_crop(torch.zeros(3, 40, 50), 32, 3), "^position:"),
    (lambda: uniform_crop(torch.zeros(3, 30, 50), 32, 1), "30x50"),
    (lambda: to_views(position_frames(40, 50), 32, short_side=30), "^short_side:"),
    (lambda: to_views(position_frames(40, 50).float(), 32), "^frames:"),
    (lambda: to_views(position_frames(40, 50), 32, 2), "^crops:"),
])
def test_spatial_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# 4. VideoReader.

def test_test_video_has_b_frames(videos):
    """The long video's packets come in decoding order, not presentation order: B-frames."""
    with av.open(videos["long"]) as c:
        pts = [p.pts for p in c.demux(video=0) if p.size]
    assert len(pts) == 300 and pts != sorted(pts)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("video", ["long", "odd", "avi", "webm", "vfr", "folder"])
def test_random_frame_lists(videos, video, seed):
    rng = random.Random(seed)
    with VideoReader(videos[video]) as reader:
        n = len(reader)
        for _ in range(3):  # reads on the same reader, forwards and backwards
            idx = [rng.randrange(n) for _ in range(rng.randrange(1, 24))]
            idx += [0, n - 1, idx[0]]  # first and last frames, a repeat
            rng.shuffle(idx)
            frames = reader.get_frames(idx)
            assert frames.dtype == torch.uint8 and frames.shape == (len(idx), H, W, 3)
            assert frame_ids(frames) == idx
        # A tensor of indices reads the same.
        t = torch.tensor(idx)
        assert torch.equal(reader.get_frames(t), frames)


@pytest.mark.parametrize("idx,bound", [
    (list(range(142, 158)), 16 + GOP + 4),  # 16 frames from the middle
    (list(range(0, 16)), 16 + 4),
    (list(range(284, 300)), 16 + GOP + 4),
    (list(range(100, 164, 4)), 61 + GOP + 4),  # 16 frames 4 apart
    ([5, 150, 290], 3 * (GOP + 4)),  # far apart: a seek for each
], ids=["middle", "start", "end", "strided", "sparse"])
def test_reads_decode_about_the_request(videos, idx, bound):
    """Memory and time follow the clip: the decoder produces the frames from the keyframe before
    the request to its end, far fewer than the video's 300."""
    with VideoReader(videos["long"]) as reader:
        assert frame_ids(reader.get_frames(idx)) == idx
        assert 0 < reader.frames_decoded <= bound < 300 // 2, reader.frames_decoded


@pytest.mark.parametrize("video", ["avi", "webm"])
def test_other_codecs_and_containers(videos, video):
    with VideoReader(videos[video]) as reader:
        assert len(reader) == 30
        assert reader.fps == pytest.approx(25)
        idx = [29, 0, 15, 15, 7, 22]
        assert frame_ids(reader.get_frames(idx)) == idx
    assert frame_ids(read_frames(videos[video])) == list(range(30))


def test_variable_frame_rate(videos):
    n = len(VFR_PTS)
    with VideoReader(videos["vfr"]) as reader:
        assert len(reader) == n
        assert reader.frame_times == pytest.approx([p / 10 for p in VFR_PTS], abs=1e-6)
        assert frame_ids(reader.get_frames(range(n))) == list(range(n))  # presentation order
        idx = [15, 3, 9, 0, 9, 12]
        assert frame_ids(reader.get_frames(idx)) == idx
        assert reader.fps > 0
        assert reader.duration >= reader.frame_times[-1]


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation(videos, rotation):
    idx = [0, 19, 7, 3, 3, 12]
    with VideoReader(videos["rot0"]) as plain, VideoReader(videos[f"rot{rotation}"]) as rotated:
        base = plain.get_frames(idx)
        got = rotated.get_frames(idx)
        assert len(rotated) == 20
    k = rotation // 90
    assert got.shape == ((len(idx), W, H, 3) if rotation % 180 else (len(idx), H, W, 3))
    # Counter-clockwise by the rotation; undoing it gives the frames asked for.
    assert torch.equal(got, torch.rot90(base, k, dims=(1, 2)))
    assert not torch.equal(got, torch.rot90(base, -k, dims=(1, 2))) or rotation == 180
    assert frame_ids(torch.rot90(got, -k, dims=(1, 2))) == idx
    assert torch.equal(read_frames(videos[f"rot{rotation}"])[idx], got)


def test_stream_properties(videos):
    with VideoReader(videos["long"]) as reader:
        assert len(reader) == 300
        assert reader.fps == pytest.approx(25)
        assert reader.duration == pytest.approx(12, abs=1 / 25)
        assert reader.frame_times == pytest.approx([i / 25 for i in range(300)], abs=1e-6)
        assert "300" in repr(reader)
    with VideoReader(videos["one"]) as reader:
        assert len(reader) == 1 and reader.frame_times == [0]
        assert frame_ids(reader.get_frames([0, 0])) == [0, 0]


def test_frame_folder_reads_as_a_video(videos):
    folder = videos["folder"]
    with VideoReader(folder) as reader:
        assert len(reader) == 17
        assert reader.fps is None and reader.duration is None
        idx = [16, 0, 8, 8, 3]
        frames = reader.get_frames(idx)
        assert frames.shape == (5, H, W, 3) and frame_ids(frames) == idx
    with VideoReader(folder, fps=10) as reader:
        assert reader.fps == 10 and reader.duration == pytest.approx(1.7)
        assert reader.frame_times == pytest.approx([i / 10 for i in range(17)])
    assert frame_ids(read_frames(folder)) == list(range(17))
    # The official Something-Something lists are frame folders: its test views of one.
    out = load_views(folder, 4, 1, 3, 3, SIZE, protocol="sth")
    with VideoReader(folder) as reader:
        for v in range(3):
            idx = ref_sth(17, 4, v, 3)
            frames = reader.get_frames(idx)
            assert frame_ids(frames) == idx
            expected = ref_views_of(frames, SIZE, 3, "sth")
            for c in range(3):
                assert_near(out[v * 3 + c], expected[c])


def test_read_frames_returns_every_frame(videos):
    frames = read_frames(videos["long"])
    assert frames.dtype == torch.uint8 and frames.shape == (300, H, W, 3)
    assert frame_ids(frames) == list(range(300))
    assert frame_ids(read_frames(videos["one"])) == [0]


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.mp4")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        VideoReader(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_views(path, 8, 2)


def test_undecodable_file(videos):
    with pytest.raises(VideoDecodeError, match=re.escape(videos["garbage"])) as e:
        VideoReader(videos["garbage"])
    assert isinstance(e.value, ValueError)


def test_empty_directory(videos):
    with pytest.raises(VideoDecodeError, match=re.escape(videos["empty"])):
        VideoReader(videos["empty"])


@pytest.mark.parametrize("video", ["long", "folder"])
@pytest.mark.parametrize("idx,error", [
    ([], ValueError), ([300], IndexError), ([-1], IndexError), ([0, 5, 10_000], IndexError)])
def test_bad_indices(videos, video, idx, error):
    with VideoReader(videos[video]) as reader:
        if video == "folder" and idx == [300]:
            idx = [17]
        with pytest.raises(error):
            reader.get_frames(idx)
        assert reader.frames_decoded == 0  # checked before decoding anything
        assert frame_ids(reader.get_frames([2])) == [2]  # and the reader still works


def test_bad_threads(videos):
    with pytest.raises(ValueError, match="^threads:"):
        VideoReader(videos["long"], threads=-1)


# ---------------------------------------------------------------------------------------------
# 5. Sliding windows.

@pytest.mark.parametrize("sample_rate", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2, 4, 8])
@pytest.mark.parametrize("window", [1, 8, 16])
@pytest.mark.parametrize("total", [1, 5, 16, 17, 31, 64, 100, 301])
def test_window_indices(total, window, stride, sample_rate):
    got = window_indices(total, window, stride, sample_rate)
    expected = ref_windows(total, window, stride, sample_rate)
    assert got.dtype == torch.int64 and got.shape == (len(expected), window)
    assert got.tolist() == expected


@pytest.mark.parametrize("name", ["total", "window", "stride", "sample_rate"])
def test_window_indices_bad_arguments(name):
    args = dict(total=100, window=8, stride=2, sample_rate=2)
    args[name] = 0
    with pytest.raises(ValueError, match=rf"^{name}:"):
        window_indices(**args)


def test_write_video_round_trip(tmp_path):
    from uniformer_fast.data.video import write_video
    pytest.importorskip("av")
    frames = torch.zeros(6, 33, 47, 3, dtype=torch.uint8)
    frames[:, :, :20] = torch.tensor([200, 40, 90], dtype=torch.uint8)
    path = write_video(tmp_path / "v.mp4", frames, fps=12.5)
    with VideoReader(path) as r:
        assert len(r) == 6 and r.fps == pytest.approx(12.5)
        back = r.get_frames(range(6))
    assert back.shape == (6, 34, 48, 3)  # odd sides padded to even with the edge pixels
    assert (back[:, :33, :18].float() - frames[:, :, :18].float()).abs().mean() < 8  # lossy, but the same picture
    with pytest.raises(ValueError, match="frames: expected uint8"):
        write_video(tmp_path / "x.mp4", frames.float())
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "x.mp4", frames, fps=0)
