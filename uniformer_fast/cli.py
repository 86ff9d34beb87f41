"""``python -m uniformer_fast`` / ``uniformer-fast``: benchmark the backends, classify a video,
evaluate a labelled list of videos, extract clip features, export a model to ONNX.

    uniformer-fast bench                          # UniFormer-S, random weights, a 16x224 clip
    uniformer-fast classify clip.mp4 --weights uniformer_small_k400_16x4.pth --labels k400.txt
    uniformer-fast evaluate val.csv --weights uniformer_small_k400_16x4.pth --views 4 --out eval/
    uniformer-fast extract videos/ --weights uniformer_small_k400_16x4.pth --out features/
    uniformer-fast export --weights uniformer_small_k400_16x4.pth --out uniformer_small.onnx

Errors (bad arguments, a missing file, an undecodable video) print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import threading
import time
import contextlib
from contextlib import nullcontext

import torch

from . import ops
from .checkpoint import load_checkpoint, read_state_dict
from .export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx
from .model import create_model, list_models

PROG = "uniformer-fast"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    return torch.device(name)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not taken back (glibc), or None where unknown."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


class _PeakMemory:
    """Peak memory over a block, above what was in use at its start: the CUDA allocator's
    high-water mark, or on the CPU the malloc heap in use sampled every millisecond (glibc)."""

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._read = _heap_in_use()
        if self._read is not None:
            self._base = self._top = self._read()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._top = max(self._top, self._read())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._read is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, self._read()) - self._base


def _fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB"


def _bench(args):
    from .official import OfficialUniFormer
    from .model import _CONFIGS

    device = _device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    model = create_model(args.model).to(device=device, dtype=dtype).eval()
    clip = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device, dtype=dtype)

    rows = []  # (label, callable)
    for name in args.backends:
        if name == "official":
            official = OfficialUniFormer(**_CONFIGS[args.model]).to(device=device, dtype=dtype).eval()
            official.load_state_dict(model.state_dict())
            rows.append(("official", official, nullcontext))
        elif name == "compile":
            compiled = torch.compile(model)
            rows.append(("compile (reference)", compiled, lambda: ops.use_backend("reference")))
        elif name in ("reference", "auto"):
            rows.append((f"{name} ({_picks(name, device, dtype)})", model, lambda n=name: ops.use_backend(n)))
        else:  # a fused backend for the ops that have one; the others stay on "auto", as labelled
            has = [op for op in OPS if name in ops.available_backends(op)]
            if not has:
                rows.append((name, None, f"no op has a {name!r} backend in this build"))
                continue
            rows.append((f"{name} ({_picks(name, device, dtype, has)})", model,
                         lambda has=tuple(has), n=name: _scoped(n, has)))

    print(f"{args.model}, random weights, clip {args.batch}x3x{args.frames}x{args.size}x{args.size}, "
          f"{str(dtype).replace('torch.', '')}, on {_device_name(device)}; median of {iters} after {warmup} warm-up",
          file=sys.stderr)
    results, outputs = [], {}
    bar = _progress(total=len(rows) * (iters + warmup))
    try:
        for label, fn, ctx in rows:
            times, done = [], 0
            if fn is None:  # ctx holds the reason
                results.append((label, None, None, ctx))
                bar.update(iters + warmup)
                continue
            try:
                with torch.no_grad(), ctx(), _PeakMemory(device) as mem:
                    for done in range(1, warmup + iters + 1):
                        t0 = time.perf_counter()
                        out = fn(clip)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        if done > warmup:
                            times.append(time.perf_counter() - t0)
                        bar.update(1)
                outputs[label] = out.float()
                median = statistics.median(times)
                results.append((label, median, mem.peak, None))
            except ops.BackendUnavailableError as e:
                bar.update(iters + warmup - max(done - 1, 0))
                results.append((label, None, None, str(e)))
    finally:
        bar.close()
    ref = next((out for label, out in outputs.items() if label.startswith("reference")), None)
    width = max(len(r[0]) for r in results) + 1
    print(f"{'backend':<{width}} {'latency':>10} {'clips/s':>9} {'peak mem':>10} {'max |diff| vs reference':>25}")
    for label, median, peak, error in results:
        if error is not None:
            print(f"{label:<{width}} skipped: {error}")
            continue
        diff = "-" if ref is None else f"{(outputs[label] - ref).abs().max().item():.2e}"
        print(f"{label:<{width}} {median * 1e3:>8.1f} ms {args.batch / median:>9.2f} {_fmt_bytes(peak):>10} {diff:>25}")
    return 0


OPS = ("dwconv3d", "attention")


@contextlib.contextmanager
def _scoped(name, op_names):
    with contextlib.ExitStack() as stack:
        for op in op_names:
            stack.enter_context(ops.use_backend(name, op=op))
        yield


def _picks(name, device, dtype, op_names=OPS):
    """"dwconv3d: cpp, attention: sdpa": what each op runs in a row (or why it cannot)."""
    out = []
    for op in OPS:
        try:
            out.append(f"{op}: {_pick(op, name if op in op_names else 'auto', device, dtype)}")
        except ops.BackendUnavailableError:
            out.append(f"{op}: {name} unavailable")
    return ", ".join(out)


def _pick(op, name, device, dtype):
    """The backend ``name`` resolves to for this op on the benchmark's tensors."""
    from .ops import backend as registry
    if op == "dwconv3d":
        x = torch.empty(1, 4, 2, 2, 2, device=device, dtype=dtype)
        args = (x, torch.empty(4, 1, 3, 3, 3, device=device, dtype=dtype), None, True)
    else:
        args = (torch.empty(1, 2, 3 * 64, device=device, dtype=dtype), 1, 0.125, 0.0)
    return registry.resolve(op, name, device, *args)[0]


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="bench", unit="it", file=sys.stderr, leave=False)
    except ImportError:
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k):
        self.n += k
        print(f"\rbench {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self):
        print(file=sys.stderr)


def _read_labels(path):
    """Class names from a text file (one per line) or a JSON list / {name: index} map; every error
    names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
        if isinstance(data, dict):  # {"class name": index}, the Kinetics label-map form
            labels = [None] * len(data)
            for name, idx in data.items():
                if type(idx) is not int or not 0 <= idx < len(data) or labels[idx] is not None:  # not bool
                    raise CLIError(f"{path}: a JSON label map must map each class name to a distinct index "
                                   f"0..{len(data) - 1}")
                labels[idx] = name
        elif isinstance(data, list) and all(isinstance(n, str) for n in data):
            labels = data
        else:
            raise CLIError(f"{path}: expected a JSON list of class names or a {{name: index}} map")
        if not labels:
            raise CLIError(f"{path}: no class names (an empty JSON {type(data).__name__})")
        return labels
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise CLIError(f"{path}: no class names (expected one per line)")
    return labels


def _classify(args):
    from .video import load_clip

    labels = _read_labels(args.labels)
    sd = read_state_dict(args.weights)
    head = sd.get("head.weight")
    if head is not None and head.shape[0] != len(labels):
        raise CLIError(f"{args.weights} classifies {head.shape[0]} classes but {args.labels} names {len(labels)}")
    clip = load_clip(args.video, args.frames, args.sample_rate, args.size)
    device = _device(args.device)
    model = create_model(args.model, num_classes=len(labels))
    load_checkpoint(model, sd)
    model = model.to(device).eval()
    with torch.no_grad():
        probs = model(clip.unsqueeze(0).to(device)).float().softmax(-1)[0].cpu()
    top = probs.topk(min(args.top, len(labels)))
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{p * 100:6.2f}%  {labels[i]}")
    return 0


def _load_model(args, num_classes=None):
    """The model ``--model`` with ``--weights``, its class count from the checkpoint's head (0,
    pooled features only, when it has none) unless given."""
    sd = read_state_dict(args.weights)
    head = sd.get("head.weight")
    if num_classes is None:
        num_classes = head.shape[0] if head is not None else 0
    elif head is not None and head.shape[0] != num_classes:
        raise CLIError(f"{args.weights} classifies {head.shape[0]} classes but {args.labels} names {num_classes}")
    model = create_model(args.model, num_classes=num_classes)
    load_checkpoint(model, sd)
    return model.to(_device(args.device)).eval()


def _workers(args):
    from .evaluation import default_workers
    return default_workers(_device(args.device)) if args.workers is None else args.workers


def _evaluate(args):
    from .evaluation import evaluate, read_video_list

    root = args.root if args.root is not None else (os.path.dirname(os.path.abspath(args.list)))
    videos = read_video_list(args.list, root)
    names = _read_labels(args.labels) if args.labels else None
    model = _load_model(args, None if names is None else len(names))
    if model.num_classes == 0:
        raise CLIError(f"{args.weights} has no classifier head (head.weight): evaluate needs one")
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
    from .evaluation import extract, find_videos

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
    print(f"wrote {path} ({_fmt_bytes(os.path.getsize(path))}) in {time.perf_counter() - t0:.1f} s: "
          f"video {shape} float32 -> logits ({batch}, {num_classes or model.num_features})")
    return 0


def build_parser():
    parser = Parser(prog=PROG, description="UniFormer video model with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,classify,evaluate,extract,export}")
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
    classify.add_argument("--labels", required=True,
                          help="class names: a text file, one per line, or a JSON list / {name: index} map")
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
    evaluate.add_argument("--labels", default=None,
                          help="class names (one per line, or a JSON list / {name: index} map), named in the output")
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
        p.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
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
    return parser


ROWS = ("official", "reference", "auto", "triton", "cpp", "sdpa", "compile")


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
    return _classify(args)
