"""``uniformer-fast demo``: a web page (Gradio) that classifies an uploaded video and shows where
the model looks.

    uniformer-fast demo --weights uniformer_small_k400_16x4.pth       # http://127.0.0.1:7860
    uniformer-fast demo                                               # random weights, said so

The page takes an upload or a generated sample clip and shows the top-5 classes with their
probabilities, the time the model took, and the Grad-CAM and attention-rollout heatmaps over the
sampled frames (:func:`~uniformer_fast.apps.explain.explain`). Everything a request can get wrong
(no file, not a video, too long, too large, a path that is not an upload) is a message in the page;
an unexpected error is too (with its traceback on the server's stderr), and the server goes on.

:class:`DemoApp` is the page's logic without Gradio (tested on its own); :func:`build_ui` lays it
out in Gradio, imported only there (``pip install 'uniformer_fast[demo]'``).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..data.video import VideoDecodeError, VideoReader, write_video
from .explain import explain

__all__ = ["DemoSettings", "DemoApp", "DemoResult", "build_ui", "launch", "serve", "write_sample_video",
           "DEMO_MAX_SECONDS", "DEMO_MAX_MB"]

DEMO_MAX_SECONDS = 600.0  # a 10-minute video: only 16 of its frames are decoded
DEMO_MAX_MB = 200.0


@dataclass(frozen=True)
class DemoSettings:
    """The clip the model sees (``num_frames`` every ``sample_rate``, ``size`` px), the limits on
    uploads, and where the weights came from (None: random weights)."""

    num_frames: int = 16
    sample_rate: int = 4
    size: int = 224
    max_seconds: float = DEMO_MAX_SECONDS
    max_mb: float = DEMO_MAX_MB
    weights: Optional[str] = None


@dataclass
class DemoResult:
    """One request's answer: ``rows`` of the top-5 table ``[rank, class, probability]``, the
    ``heatmap`` montage (uint8 (H, W, 3), or None), a Markdown ``message`` and whether it
    worked (``ok``)."""

    rows: List[list]
    heatmap: Optional[object]
    message: str
    ok: bool


class DemoApp:
    """The demo's logic: checks an upload, runs :func:`explain` on it, formats the answer. Requests
    run one at a time (a lock): the model is shared."""

    def __init__(self, model, settings: DemoSettings = DemoSettings(), *, upload_dirs: Sequence[str] = ()):
        self.model = model
        self.settings = settings
        # Where uploads may be read from: Gradio's upload cache, and our generated sample's folder.
        self.sample_dir = tempfile.mkdtemp(prefix="uniformer_fast_demo_")
        self.upload_dirs = [os.path.realpath(d) for d in (*upload_dirs, self.sample_dir)]
        self._lock = threading.Lock()
        self._sample = None
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")

    # -- the page's header ------------------------------------------------------------------
    def banner(self) -> str:
        s = self.settings
        clip = f"{s.num_frames} frames every {s.sample_rate}, {s.size}x{s.size} px"
        if s.weights is None:
            weights = ("**Random weights: no `--weights` or `--pretrained` was given, so these outputs come "
                       "from an untrained model and mean nothing.**")
        else:
            weights = f"Weights: `{os.path.basename(s.weights)}`."
        names = "class names: " + ("the dataset's, official order" if self.model.class_names else "none (indices)")
        return (f"### UniFormer video classification\n{weights}\n\n"
                f"Model: {self.model.num_classes} classes ({names}); clip: {clip}; on {self.device.type}. "
                f"Uploads up to {s.max_mb:g} MB and {s.max_seconds:g} s.")

    # -- one request -----------------------------------------------------------------------
    def analyse(self, upload) -> DemoResult:
        """The answer for an upload: a path (or Gradio's file object with ``.path`` / ``.name``),
        None when nothing was uploaded."""
        try:
            path = self._checked_path(upload)
            with self._lock:
                return self._run(path)
        except _Refused as e:
            return DemoResult([], None, f"**Cannot use this upload:** {e}", False)
        except Exception as e:  # a bug, or something no check foresaw: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            return DemoResult([], None, f"**Internal error:** {type(e).__name__}: {e}", False)

    def sample(self) -> str:
        """A generated clip (a ball crossing a textured background), written once."""
        if self._sample is None:
            self._sample = write_sample_video(os.path.join(self.sample_dir, "generated_sample.mp4"))
        return self._sample

    def analyse_sample(self):
        path = self.sample()
        return path, self.analyse(path)

    def _checked_path(self, upload) -> str:
        s = self.settings
        if upload is None or upload == "":
            raise _Refused("no video: upload one, or press *Generated sample*")
        path = upload if isinstance(upload, (str, os.PathLike)) else getattr(upload, "path", None) or \
            getattr(upload, "name", None)
        if not isinstance(path, (str, os.PathLike)):
            raise _Refused(f"expected an uploaded file; got {type(upload).__name__}")
        path = os.fspath(path)
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, d]) == d for d in self.upload_dirs):
            # Only files the page itself received are read; never a path a request names.
            raise _Refused(f"{os.path.basename(path) or path!r} is not an uploaded file (only uploads are read)")
        if not os.path.isfile(real):
            raise _Refused(f"{os.path.basename(path)!r}: the upload is gone or is not a file")
        size_mb = os.path.getsize(real) / 1e6
        if size_mb > s.max_mb:
            raise _Refused(f"{os.path.basename(path)!r} is too large: {size_mb:.1f} MB (the limit is {s.max_mb:g} MB)")
        try:
            with VideoReader(real, threads=1) as reader:
                frames, duration = len(reader), reader.duration
        except (VideoDecodeError, OSError) as e:
            raise _Refused(f"{os.path.basename(path)!r} is not a video this demo can decode ({_short(e)})") from None
        if frames < 1:
            raise _Refused(f"{os.path.basename(path)!r} has no frames")
        if duration is not None and duration > s.max_seconds:
            raise _Refused(f"{os.path.basename(path)!r} is too long: {duration:.0f} s (the limit is {s.max_seconds:g} s)")
        return real

    def _run(self, path) -> DemoResult:
        s = self.settings
        t0 = time.perf_counter()
        result = explain(self.model, path, num_frames=s.num_frames, sample_rate=s.sample_rate, size=s.size,
                         precision="auto")
        total_s = time.perf_counter() - t0
        rows = [[rank + 1, name if name is not None else f"class {i}", f"{p * 100:.2f}%"]
                for rank, (i, name, p) in enumerate(result.top)]
        best = rows[0][1]
        lines = [f"**Top-1: {best}** ({rows[0][2]}). Model: **{result.model_s * 1000:.0f} ms** on "
                 f"{self.device.type} (the whole request with decoding and heatmaps: {total_s:.2f} s)."]
        lines.append("Heatmaps, one column per sampled frame: Grad-CAM on the last stage (top row), "
                     "Global MHRA attention rollout (bottom row); red is where the model looks most.")
        if s.weights is None:
            lines.append("**Random weights: these classes and heatmaps mean nothing.**")
        lines += [f"*Note: {n}.*" for n in result.notes]
        return DemoResult(rows, result.montage().numpy(), "\n\n".join(lines), True)


class _Refused(Exception):
    """An upload the demo will not read; the message is shown in the page."""


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def write_sample_video(path, *, frames: int = 64, height: int = 240, width: int = 320, fps: int = 30) -> str:
    """A generated test clip: a bright ball crossing a gradient background with a checker pattern."""
    import numpy as np
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx // 16 + yy // 16) % 2) * 90 + 60],
                          -1).astype(np.uint8)
    clip = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        cx = int(width * (0.15 + 0.7 * t / max(1, frames - 1)))
        cy = int(height * (0.5 + 0.25 * math.sin(2 * math.pi * t / frames)))
        clip[t][(xx - cx) ** 2 + (yy - cy) ** 2 < (height // 8) ** 2] = (250, 240, 40)
    return write_video(path, clip, fps)


# ---------------------------------------------------------------------------------------------
# The page (Gradio).

def _gradio():
    # No usage reports to Gradio's servers from a demo, which may run where nothing is reachable.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # launch() checks its own local URL over HTTP; behind a proxy that check must not go through it.
    if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                       "all_proxy")):
        for var in ("NO_PROXY", "no_proxy"):
            hosts = [h for h in os.environ.get(var, "").split(",") if h]
            os.environ[var] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError("the demo needs Gradio: pip install 'uniformer_fast[demo]'") from e
    return gr


def build_ui(app: DemoApp):
    """The page: an upload (any file: the checks are :class:`DemoApp`'s, so a bad one gets our
    message rather than none), *Classify* and *Generated sample*; the status, the top-5 table and
    the heatmap montage. Stable element ids for tests and styling: ``upload``, ``classify``,
    ``sample``, ``status``, ``top5``, ``heatmap``."""
    gr = _gradio()
    headers = ["rank", "class", "probability"]

    def answer(result: DemoResult):
        table = result.rows if result.rows else [["", "", ""]]
        return result.message, table, result.heatmap

    def on_classify(upload):
        return answer(app.analyse(upload))

    def on_sample():
        path, result = app.analyse_sample()
        return (path, *answer(result))

    with gr.Blocks(title="UniFormer video classification") as page:
        gr.Markdown(app.banner(), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Video", file_count="single", type="filepath", elem_id="upload")
                with gr.Row():
                    classify = gr.Button("Classify", variant="primary", elem_id="classify")
                    sample = gr.Button("Generated sample", elem_id="sample")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload a video and press *Classify*, or press *Generated sample*.",
                                     elem_id="status")
                top5 = gr.Dataframe(headers=headers, value=[["", "", ""]], label="Top-5 classes",
                                    interactive=False, elem_id="top5")
        heatmap = gr.Image(label="Where the model looks: Grad-CAM (top), attention rollout (bottom)",
                           type="numpy", format="png", interactive=False, elem_id="heatmap")
        classify.click(on_classify, inputs=upload, outputs=[status, top5, heatmap], concurrency_limit=1)
        upload.upload(on_classify, inputs=upload, outputs=[status, top5, heatmap], concurrency_limit=1)
        sample.click(on_sample, inputs=None, outputs=[upload, status, top5, heatmap], concurrency_limit=1)
    return page


def launch(model, settings: DemoSettings = DemoSettings(), *, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True):
    """Serve the demo at ``http://host:port``; ``block=False`` returns ``(page, url)`` with the
    server running in a thread (``page.close()`` stops it)."""
    gr = _gradio()
    app = DemoApp(model, settings, upload_dirs=[_upload_folder(gr)])
    page = build_ui(app)
    page.queue(default_concurrency_limit=1)
    # allowed_paths: the generated sample is shown in the upload box, so Gradio may serve it.
    _, url, _ = page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                            max_file_size=int(settings.max_mb * 1e6), show_error=True, quiet=not block,
                            ssr_mode=False, allowed_paths=[app.sample_dir])
    return page, url


def serve(model, settings: DemoSettings = DemoSettings(), *, host: str = "127.0.0.1", port: int = 7860) -> None:
    """``uniformer-fast demo``: :func:`launch`, blocking until Ctrl-C."""
    print(f"serving the UniFormer demo on http://{host}:{port} (Ctrl-C stops it)"
          + ("; random weights" if settings.weights is None else ""), file=sys.stderr)
    launch(model, settings, host=host, port=port, block=True)


def _upload_folder(gr) -> str:
    """Where Gradio keeps uploads (``GRADIO_TEMP_DIR``, by default the temp dir's ``gradio``)."""
    try:
        from gradio.utils import get_upload_folder
        return get_upload_folder()
    except ImportError:  # older Gradio
        return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
