"""Dataset-scale inference: ``evaluation.evaluate`` over generated 224p videos, videos per second
with 0, 1 and 2 decoding workers, and where the time goes (decoding vs the model).

Rows of one group (the same videos, model and protocol):

- ``decode-all``: the baseline, what reading a clip cost before streaming decoding: each video
  decoded whole into memory (:func:`uniformer_fast.data.video.read_frames`), its views sampled from
  that, the model run on them one video at a time.
- ``workers0``, ``workers1``, ``workers2``: :func:`uniformer_fast.apps.evaluate.evaluate` decoding
  only the frames of its clips, in this process or in 1 or 2 worker processes overlapped with
  the model.
- ``model-only``: the model alone on the same clips, already decoded: the time the pipeline would
  take if decoding were free: the pipeline's floor on this machine.

``extra_info`` of the evaluate rows: ``decode_s`` (decoding and preprocessing, summed over the
workers), ``model_s``, ``wait_s`` (the main process waiting for decoded clips), ``videos_per_s``.
The work is the model's FLOPs for every clip (``floors.model``).

Sizes: 3 videos of 48 frames, UniFormer-S on 4-frame 64 px clips, one view (the small preset, a
smoke test); with $UNIFORMER_FAST_BENCH_CPU=full (or on CUDA) 8 videos of 10 s (250 frames at 25
fps, 398x224), UniFormer-S 16x4 at 224 px, one view (and 4 views on CUDA), batch 4 clips.
"""
from __future__ import annotations

import pytest
import torch

from uniformer_fast import create_model
from uniformer_fast.apps.evaluate import evaluate
from uniformer_fast.data.video import dense_indices, read_frames, to_views

from . import floors
from .harness import CPU_PRESET, DEVICE, ON_CUDA, run, write_camera_video

av = pytest.importorskip("av")

VARIANT = "uniformer_small"
FULL = ON_CUDA or CPU_PRESET == "full"
NUM_VIDEOS, VIDEO_FRAMES, HEIGHT, WIDTH = (8, 250, 224, 398) if FULL else (3, 48, 224, 398)
FRAMES, SAMPLE_RATE, SIZE = (16, 4, 224) if FULL else (4, 4, 64)
VIEWS = (1, 4) if ON_CUDA else (1,)
BATCH = 4
ROWS = ["decode-all", "workers0", "workers1", "workers2", "model-only"]
PARAMS = [(v, r) for v in VIEWS for r in ROWS]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-videos")
    return [(write_camera_video(root / f"v{k}.mp4", VIDEO_FRAMES, HEIGHT, WIDTH), k % 400) for k in range(NUM_VIDEOS)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(VARIANT, num_classes=400).to(DEVICE).eval()


def _id(param):
    views, row = param
    return f"{VARIANT}-f{FRAMES}x{SAMPLE_RATE}-{SIZE}px-{views}view-{row}"


@pytest.mark.parametrize("param", PARAMS, ids=[_id(p) for p in PARAMS])
def test_evaluate_throughput(benchmark, param, videos, model):
    views, row = param
    threads = None if ON_CUDA else torch.get_num_threads()
    benchmark.group = (f"evaluate {VARIANT} | {NUM_VIDEOS} videos of {VIDEO_FRAMES} frames {WIDTH}x{HEIGHT}, "
                       f"{views} view(s) of {FRAMES}x{SAMPLE_RATE} at {SIZE}px" +
                       (f", {threads} thread(s)" if threads else ""))
    settings = dict(num_frames=FRAMES, sample_rate=SAMPLE_RATE, views=views, crops=1, size=SIZE)
    autocast = torch.autocast(DEVICE.type, torch.bfloat16, enabled=ON_CUDA)
    last = {}

    if row.startswith("workers"):
        workers = int(row[len("workers"):])

        def call():
            last["result"] = evaluate(model, videos, batch_size=BATCH, workers=workers, device=DEVICE,
                                      progress=False, **settings)
            return last["result"]
    elif row == "decode-all":
        def call():
            with torch.inference_mode(), autocast:
                for path, _ in videos:
                    frames = read_frames(path)
                    clips = torch.cat([to_views(frames[dense_indices(len(frames), FRAMES, SAMPLE_RATE, v, views)], SIZE)
                                       for v in range(views)])
                    model(clips.to(DEVICE)).float().softmax(-1).mean(0).cpu()
    else:  # model-only: the same clips, decoded beforehand
        from uniformer_fast.data.video import load_views
        clips = torch.cat([load_views(path, FRAMES, SAMPLE_RATE, views, 1, SIZE) for path, _ in videos]).to(DEVICE)

        def call():
            with torch.inference_mode(), autocast:
                for chunk in clips.split(BATCH):
                    model(chunk).float().softmax(-1).cpu()

    clips_total = NUM_VIDEOS * views
    info = {"level": "pipeline", "op": "evaluate", "pass": "infer", "stage": "all", "frames": FRAMES,
            "shape": [clips_total, 3, FRAMES, SIZE, SIZE], "backend": row, "baseline": row == "decode-all",
            "backend_used": row, "videos": NUM_VIDEOS, "views": views, "video_frames": VIDEO_FRAMES,
            "video_size": [HEIGHT, WIDTH]}
    work = floors.model(VARIANT, clips_total, FRAMES, SIZE, e=2 if ON_CUDA else 4)
    run(benchmark, [call], work=work, info=info)
    median = benchmark.extra_info.get("median_s")
    if median:
        benchmark.extra_info["videos_per_s"] = NUM_VIDEOS / median
    if "result" in last:
        stats = last["result"].stats
        assert last["result"].num_scored == NUM_VIDEOS and not last["result"].failed
        benchmark.extra_info.update(decode_s=stats.decode_s, model_s=stats.model_s, wait_s=stats.wait_s,
                                    wall_s=stats.wall_s)
