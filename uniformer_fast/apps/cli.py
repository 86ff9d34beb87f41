"""``python -m uniformer_fast`` / ``uniformer-fast``: benchmark the backends, classify a video,
evaluate a labelled list of videos, extract clip features, export a model to ONNX, show where the
model looks, serve a web demo.

    uniformer-fast bench                          # UniFormer-S, random weights, a 16x224 clip
    uniformer-fast classify clip.mp4 --weights uniformer_small_k400_16x4.pth   # names: k400's
    uniformer-fast evaluate val.csv --weights uniformer_small_k400_16x4.pth --views 4 --out eval/
    uniformer-fast extract videos/ --weights uniformer_small_k400_16x4.pth --out features/
    uniformer-fast export --weights uniformer_small_k400_16x4.pth --out uniformer_small.onnx
    uniformer-fast explain clip.mp4 --weights uniformer_small_k400_16x4.pth --out heatmaps/
    uniformer-fast demo --weights uniformer_small_k400_16x4.pth --port 7860

Errors (bad arguments, a missing file, an undecodable video) print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from ..checkpoint import load_checkpoint, read_state_dict
from ..data.classes import DATASETS, class_names, dataset_of
from ..data.lists import find_videos, read_class_names, read_video_list
from ..data.video import load_clip
from ..export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx
from ..model import create_model, list_models
from .bench import DTYPES, ROWS, bench, format_bytes
from .demo import DEMO_MAX_MB, DEMO_MAX_SECONDS
from .evaluate import evaluate
from .explain import METHODS, VIDEO_FORMATS, explain
from .extract import extract
from .inference import PRECISIONS, default_workers

PROG = "uniformer-fast"


class CLIError(Exception):
    """A problem the user can fix; printed as one line."""

    exit_code = 1


class UsageError(CLIError):
    exit_code = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` (one line) instead of exiting."""

    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


# argparse ``type``s that check the range while parsing, so a bad value is a one-line usage error
# naming the option ("argument --iters: expected an integer >= 1; got 0") before any work starts.
def int_at_least(low: int):
    """An integer >= ``low``."""
    def parse(text):
        value = int(text)  # a ValueError here reads "invalid int value: 'x'"
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {value}")
        return value
    parse.__name__ = "int"
    return parse


def int_in(low: int, high: int):
    """An integer in [low, high]."""
    def parse(text):
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}]; got {value}")
        return value
    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """A finite float in [low, high] (``low_open``/``high_open``: that end excluded)."""
    if high == math.inf:
        want = f"{'>' if low_open else '>='} {low:g}"
    else:
        want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text):
        value = float(text)
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):  # NaN fails every comparison; inf is never meant
            raise argparse.ArgumentTypeError(f"expected a number {want}; got {text}")
        return value
    parse.__name__ = "float"
    return parse


# What a user can cause and fix (arguments, missing or unreadable files, a missing package):
# printed as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CLIError, FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError, OSError)


def report_errors(prog: str, run, errors=USER_ERRORS) -> int:
    """``run()``'s exit code; ``errors`` print ``<prog>: error: <first line>`` and exit 2 for bad
    arguments (:class:`UsageError`), 1 otherwise; Ctrl-C prints ``<prog>: interrupted``, exit 130."""
    try:
        return run()
    except SystemExit as e:  # --help
        return e.code or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except errors as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


def _one_line(e: BaseException) -> str:
    """The first line of ``e``'s message; for an error a DataLoader worker raised, whose message
    torch makes "Caught X in DataLoader worker process N." + the worker's traceback, the last line:
    the error itself (which names e.g. the undecodable video)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    if len(lines) > 1 and first.startswith("Caught ") and " in DataLoader worker " in first:
        where = first.split(" in ", 1)[1].rstrip(".")
        return f"{lines[-1].split(': ', 1)[-1]} (in {where})"
    return first


def _device(name: str) -> torch.device:
    """``--device``: ``"auto"`` is CUDA where available, else the CPU; a CLIError for ``"cuda"``
    where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def _bench(args):
    bench(args.model, _device(args.device), frames=args.frames, size=args.size, batch=args.batch,
          dtype=args.dtype, iters=args.iters, warmup=args.warmup, backends=args.backends)
    return 0


def _read_labels(labels):
    """``--labels``: a file of class names, or a dataset name (:func:`class_names`) when no file
    of that name exists."""
    if labels.strip().lower() in DATASETS and not os.path.exists(labels):
        return class_names(labels)
    return read_class_names(labels)


def _classify(args):
    model = _load_model(args, require_head=True)
    clip = load_clip(args.video, args.frames, args.sample_rate, args.size)
    device = _device(args.device)
    with torch.no_grad():
        probs = model(clip.unsqueeze(0).to(device)).float().softmax(-1)[0].cpu()
    top = probs.topk(min(args.top, model.num_classes))
    names = model.class_names
    if names is None:
        print(f"(no class names: {args.weights} is not named after a dataset ({', '.join(DATASETS)}) with its "
              f"{model.num_classes} classes; pass --labels FILE or a dataset name)", file=sys.stderr)
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{p * 100:6.2f}%  {names[i] if names else f'class {i}'}")
    return 0


def _load_model(args, *, require_head=False):
    """The model ``--model`` with ``--weights``, its class count from the checkpoint's head (0,
    pooled features only, when it has none). Its ``class_names``: ``--labels`` where the command
    has it and it is given, else the dataset the weights' file name says (with a head of its class
    count; see :func:`~uniformer_fast.data.classes.dataset_of`), else None."""
    sd = read_state_dict(args.weights)
    head = sd.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    if require_head and not num_classes:
        raise CLIError(f"{args.weights} has no classifier head (head.weight): {args.command} needs one")
    model = create_model(args.model, num_classes=num_classes)
    load_checkpoint(model, sd)
    dataset = dataset_of(args.weights, num_classes) if num_classes else None
    model.class_names = class_names(dataset) if dataset else None
    return _with_labels(model, args, args.weights).to(_device(args.device)).eval()


def _with_labels(model, args, source):
    """``model`` with ``--labels`` (where the command has it and it is given) as its class names;
    a CLIError unless it names the head's class count."""
    if getattr(args, "labels", None):
        names = _read_labels(args.labels)
        if len(names) != model.num_classes:
            raise CLIError(f"{source} classifies {model.num_classes} classes but {args.labels} names {len(names)}")
        model.class_names = names
    return model


def _workers(args):
    return default_workers(_device(args.device)) if args.workers is None else args.workers


def _evaluate(args):
    root = args.root if args.root is not None else (os.path.dirname(os.path.abspath(args.list)))
    videos = read_video_list(args.list, root)
    model = _load_model(args, require_head=True)
    names = model.class_names
    views = f"{args.views} view{'s' * (args.views > 1)} x {args.crops} crop{'s' * (args.crops > 1)}"
    print(f"evaluating {args.model} on {args.list}: {args.protocol} protocol, {views} of "
          f"{args.frames}x{args.size}" + (f" every {args.sample_rate} frames" if args.protocol == "kinetics" else "")
          + f", {_workers(args)} decoding workers", file=sys.stderr)
    result = evaluate(model, videos, num_frames=args.frames, sample_rate=args.sample_rate,
                      views=args.views, crops=args.crops, size=args.size, protocol=args.protocol,
                      short_side=args.short_side, ensemble=args.ensemble, batch_size=args.batch,
                      workers=args.workers, device=_device(args.device), precision=args.precision,
                      out_dir=args.out, class_names=names, top=args.top, progress=not args.quiet)
    print(result.summary())
    print(result.stats.summary(), file=sys.stderr)
    for key, error in result.failed[:10]:
        print(f"  unreadable: {key}: {error}", file=sys.stderr)
    if len(result.failed) > 10:
        print(f"  ... and {len(result.failed) - 10} more" + (f" (see {args.out}/failed.csv)" if args.out else ""),
              file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}/predictions.csv, failed.csv, metrics.json", file=sys.stderr)
    return 0


def _extract(args):
    videos = find_videos(args.source)
    model = _load_model(args)
    print(f"extracting {args.model} features of {args.source}: windows of {args.window} frames every "
          f"{args.sample_rate}, stride {args.stride}, {args.size} px, {_workers(args)} decoding workers", file=sys.stderr)
    result = extract(model, videos, args.out, window=args.window, stride=args.stride,
                     sample_rate=args.sample_rate, size=args.size, batch_size=args.batch, workers=args.workers,
                     device=_device(args.device), precision=args.precision, feature_map=args.feature_map,
                     progress=not args.quiet)
    print(f"{len(result.written)} videos written to {args.out}, {len(result.skipped)} done before, "
          f"{len(result.failed)} unreadable")
    print(result.stats.summary(), file=sys.stderr)
    for key, error in result.failed:
        print(f"  unreadable: {key}: {error}", file=sys.stderr)
    return 0


def _export(args):
    sd = read_state_dict(args.weights)
    head = sd.get("head.weight")
    num_classes = args.num_classes
    if num_classes is None:
        if head is None:
            raise CLIError(f"{args.weights} has no classifier head (head.weight): pass --num-classes "
                           f"(0 exports the pooled features)")
        num_classes = head.shape[0]
    elif head is not None and head.shape[0] != num_classes:  # load_checkpoint would keep a random head
        raise CLIError(f"{args.weights} classifies {head.shape[0]} classes but --num-classes is {num_classes}")
    model = create_model(args.model, num_classes=num_classes)
    load_checkpoint(model, sd)
    batch = "1" if args.static_batch else "batch"
    shape = f"({batch}, {model.in_chans}, {args.frames}, {args.size}, {args.size})"
    print(f"exporting {args.model} ({num_classes} classes) to {args.out}: video {shape}, opset {args.opset}",
          file=sys.stderr)
    t0 = time.perf_counter()
    path = export_onnx(model, args.out, frames=args.frames, size=args.size,
                       dynamic_batch=not args.static_batch, opset=args.opset)
    print(f"wrote {path} ({format_bytes(os.path.getsize(path))}) in {time.perf_counter() - t0:.1f} s: "
          f"video {shape} float32 -> logits ({batch}, {num_classes or model.num_features})")
    return 0


LABELS_HELP = (f"class names: a dataset ({', '.join(DATASETS)}: the official order), or a text file, one per "
               f"line, or a JSON list / {{name: index}} map (default: the dataset the weights' file name "
               f"says, as uniformer_small_k400_16x4.pth, when its head has that class count)")


def build_parser():
    parser = Parser(prog=PROG, description="UniFormer video model with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,classify,evaluate,extract,export,explain,demo}")
    bench = sub.add_parser("bench", help="time each backend on a synthetic clip (default command)")
    bench.add_argument("--model", choices=list_models(), default="uniformer_small")
    bench.add_argument("--frames", type=int_at_least(1), default=16)
    bench.add_argument("--size", type=int_at_least(32), default=224)
    bench.add_argument("--batch", type=int_at_least(1), default=1)
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="default: bfloat16 on CUDA, float32 on the CPU")
    bench.add_argument("--iters", type=int_at_least(1), default=None,
                       help="timed runs (default 20 on CUDA, 3 on the CPU)")
    bench.add_argument("--warmup", type=int_at_least(0), default=None,
                       help="untimed runs first (default 3 on CUDA, 1 on the CPU)")
    bench.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b],
                       default=["official", "reference", "auto"],
                       help="comma-separated rows: official, reference, auto, triton, cpp, sdpa, compile")
    classify = sub.add_parser("classify", help="top-5 classes of a video")
    classify.add_argument("video")
    classify.add_argument("--weights", required=True, help="checkpoint file (.pth or .safetensors)")
    classify.add_argument("--labels", default=None, help=LABELS_HELP)
    classify.add_argument("--model", choices=list_models(), default="uniformer_small")
    classify.add_argument("--frames", type=int_at_least(1), default=16)
    classify.add_argument("--sample-rate", type=int_at_least(1), default=4, help="frame stride (16x4 models: 4)")
    classify.add_argument("--size", type=int_at_least(32), default=224)
    classify.add_argument("--top", type=int_at_least(1), default=5)
    classify.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate = sub.add_parser("evaluate", help="accuracy on a labelled list of videos, the official multi-view test")
    evaluate.add_argument("list", help="the official list: 'path label' lines (comma or space separated), or "
                                       "'path num_frames label' (Something-Something)")
    evaluate.add_argument("--weights", required=True, help="checkpoint file (.pth or .safetensors)")
    evaluate.add_argument("--labels", default=None, help=LABELS_HELP + "; named in the output")
    evaluate.add_argument("--root", default=None, help="prefix of the list's relative paths (default: its directory)")
    evaluate.add_argument("--protocol", choices=("kinetics", "sth"), default="kinetics",
                          help="temporal sampling: kinetics (dense clips) or sth (Something-Something segments)")
    evaluate.add_argument("--views", type=int_at_least(1), default=4, help="temporal views per video")
    evaluate.add_argument("--crops", type=int, choices=(1, 3), default=1, help="spatial crops per view")
    evaluate.add_argument("--short-side", type=int_at_least(1), default=None,
                          help="resize the short side to this before cropping (default: --size)")
    evaluate.add_argument("--ensemble", choices=("softmax", "logits"), default="softmax",
                          help="average the views' softmax scores (default) or logits (the official loop)")
    evaluate.add_argument("--top", type=int_at_least(1), default=5, help="classes per video in predictions.csv")
    evaluate.add_argument("--out", default=None, help="directory for the results; a rerun resumes there")
    extract = sub.add_parser("extract", help="clip features of whole videos from a sliding window")
    extract.add_argument("source", help="a video, a directory of videos (recursive) or a list file")
    extract.add_argument("--weights", required=True, help="checkpoint file (.pth or .safetensors)")
    extract.add_argument("--out", required=True, help="directory for <video>.npy and .json; a rerun resumes")
    extract.add_argument("--window", type=int_at_least(1), default=16, help="frames per window")
    extract.add_argument("--stride", type=int_at_least(1), default=16,
                         help="window step, in sampled frames (default 16: windows side by side)")
    extract.add_argument("--feature-map", action="store_true",
                         help="also write each window's final feature map (<video>.map.npy)")
    for p, frames_flag in ((evaluate, True), (extract, False)):
        p.add_argument("--model", choices=list_models(), default="uniformer_small")
        if frames_flag:
            p.add_argument("--frames", type=int_at_least(1), default=16)
        p.add_argument("--sample-rate", type=int_at_least(1), default=4, help="frame stride (16x4 models: 4)")
        p.add_argument("--size", type=int_at_least(32), default=224)
        p.add_argument("--batch", type=int_at_least(1), default=8, help="clips per model call")
        p.add_argument("--workers", type=int_at_least(0), default=None,
                       help="decoding processes (0: in the main process; default: up to 8 on CUDA, 0 on the CPU, "
                            "where the model uses every core)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast on CUDA, float32 on the CPU")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    export = sub.add_parser("export", help="write the model as an ONNX file (plain ONNX ops, for ONNX Runtime etc.)")
    export.add_argument("--weights", required=True, help="checkpoint file (.pth or .safetensors)")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument("--model", choices=list_models(), default="uniformer_small")
    export.add_argument("--num-classes", type=int_at_least(0), default=None,
                        help="default: the weights' head; 0: output the pooled features")
    export.add_argument("--frames", type=int_at_least(1), default=16)
    export.add_argument("--size", type=int_at_least(32), default=224)
    export.add_argument("--static-batch", action="store_true", help="batch fixed at 1 (default: dynamic)")
    export.add_argument("--opset", type=int, choices=range(MIN_OPSET, MAX_OPSET + 1), default=DEFAULT_OPSET,
                        metavar=f"{{{MIN_OPSET}..{MAX_OPSET}}}", help=f"ONNX opset (default {DEFAULT_OPSET})")
    explain = sub.add_parser("explain", help="where the model looks: Grad-CAM and attention-rollout heatmaps of a clip")
    explain.add_argument("video")
    explain.add_argument("--out", required=True, help="directory for the heatmap videos, PNG frames, montage.png "
                                                      "and explanation.json")
    explain.add_argument("--format", choices=VIDEO_FORMATS, default="mp4", help="heatmap video format")
    explain.add_argument("--methods", type=_methods, default=list(METHODS),
                         help=f"comma-separated: {', '.join(METHODS)} (default both)")
    explain.add_argument("--target", default=None,
                         help="the class to explain: an index or a class name (default: the top-1)")
    explain.add_argument("--alpha", type=float_in(0.0, 1.0), default=0.5, help="heatmap opacity")
    explain.add_argument("--top", type=int_at_least(1), default=5)
    demo = sub.add_parser("demo", help="a web page: upload a video, see the top-5 classes and the heatmaps (Gradio)")
    demo.add_argument("--port", type=int_in(1, 65535), default=7860, help="port to listen on")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--max-seconds", type=float_in(0.0, low_open=True), default=DEMO_MAX_SECONDS,
                      help="longest video accepted, in seconds")
    demo.add_argument("--max-mb", type=float_in(0.0, low_open=True), default=DEMO_MAX_MB,
                      help="largest upload accepted, in MB")
    for p, weights_required in ((explain, True), (demo, False)):
        weights = p.add_mutually_exclusive_group(required=weights_required)
        weights.add_argument("--weights", default=None, help="checkpoint file (.pth or .safetensors)")
        weights.add_argument("--pretrained", default=None,
                             help="an official checkpoint name, as uniformer_small_k400_16x4 (fetched from the "
                                  "Hugging Face Hub)" + ("" if weights_required else "; with neither, random weights"))
        p.add_argument("--labels", default=None, help=LABELS_HELP)
        p.add_argument("--model", choices=list_models(), default="uniformer_small")
        p.add_argument("--frames", type=int_at_least(1), default=16)
        p.add_argument("--sample-rate", type=int_at_least(1), default=4, help="frame stride (16x4 models: 4)")
        p.add_argument("--size", type=int_at_least(32), default=224)
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


def _methods(text):
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(METHODS)}, comma-separated; "
                                         f"got {text!r}")
    return methods


def _model_for(args):
    """``--weights`` / ``--pretrained`` / neither (random weights) -> ``(model in eval mode on
    --device, what the weights are)``; class names as :func:`_load_model` gives them."""
    if args.weights is not None:
        return _load_model(args, require_head=True), args.weights
    if args.pretrained is not None:
        model = _with_labels(create_model(args.model, pretrained=args.pretrained), args, args.pretrained)
        return model.to(_device(args.device)).eval(), args.pretrained
    model = _with_labels(create_model(args.model), args, "the random weights' head")
    return model.to(_device(args.device)).eval(), None


def _explain(args):
    model, source = _model_for(args)
    target = args.target
    if target is not None and target.isdigit():
        target = int(target)
    result = explain(model, args.video, num_frames=args.frames, sample_rate=args.sample_rate, size=args.size,
                     target=target, methods=args.methods, top=args.top, device=_device(args.device))
    written = result.save(args.out, video_format=args.format, alpha=args.alpha)
    for i, name, p in result.top:
        print(f"{p * 100:6.2f}%  {name if name is not None else f'class {i}'}")
    what = result.target_name if result.target_name is not None else f"class {result.target}"
    print(f"explained {what} ({', '.join(args.methods)}) in {result.model_s:.2f} s: wrote "
          + ", ".join(os.path.relpath(written[m], args.out) for m in args.methods)
          + f", montage.png, explanation.json and PNG frames under {args.out}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _demo(args):
    from .demo import DemoSettings, serve
    model, source = _model_for(args)
    settings = DemoSettings(num_frames=args.frames, sample_rate=args.sample_rate, size=args.size,
                            max_seconds=args.max_seconds, max_mb=args.max_mb, weights=source)
    serve(model, settings, host=args.host, port=args.port)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["bench"] + argv
    return report_errors(PROG, lambda: _run(argv))


def _run(argv):
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        bad = [b for b in args.backends if b not in ROWS]
        if bad or not args.backends:
            raise UsageError(f"--backends: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(ROWS)}")
        return _bench(args)
    if args.command == "export":
        return _export(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "extract":
        return _extract(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "demo":
        return _demo(args)
    return _classify(args)
