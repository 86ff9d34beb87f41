"""Input makers shared by the kernel tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import itertools
import os
import socket
from fractions import Fraction

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import extension, fully_connected

CL = torch.channels_last_3d


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


MAX_WORKERS = 8  # each worker holds about 1.2 GB at its peak


def default_workers(config) -> int:
    """The pytest-xdist workers a run gets that asks for none: plain ``pytest`` (the tests
    ``testpaths`` names, with or without ``-m``/``-k``) runs on ``min(usable CPUs, MAX_WORKERS)``,
    or ``$PYTEST_XDIST_AUTO_NUM_WORKERS``. 0, to run in this process: named files or tests,
    ``-n`` given (``-n 0`` included), xdist absent (``-p no:xdist``), a debugger (``--pdb``,
    ``--trace``), ``-s``, a command that runs no tests (``--collect-only``, ``--fixtures``), or
    an xdist worker itself."""
    option = config.option
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return 0
    if getattr(option, "numprocesses", 0) is not None:
        return 0
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return 0
    one_process = ("usepdb", "trace", "collectonly", "showfixtures", "show_fixtures_per_test", "help", "version")
    if any(getattr(option, name, False) for name in one_process) or getattr(option, "capture", "fd") == "no":
        return 0
    requested = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    workers = int(requested) if requested else min(usable_cpus(), MAX_WORKERS)
    return workers if workers > 1 else 0

LAYOUTS = ("contiguous", "channels_last", "sliced_channels_last", "sliced_contiguous")


def make_x(shape, dtype, layout, device) -> torch.Tensor:
    """x (B, C, T, H, W) in the given layout; the "sliced_*" ones are views of a larger tensor (a
    channel window, a T window and every other W column), so their strides are not dense and
    their data pointer is offset."""
    B, C, T, H, W = shape
    if layout.startswith("sliced"):
        big = torch.randn(B, C + 3, T + 1, H, 2 * W + 1, device=device).to(dtype)
        if layout == "sliced_channels_last":
            big = big.to(memory_format=CL)
        x = big[:, 1:C + 1, 1:, :, 1::2]
        assert x.shape == shape and not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
        return x
    x = torch.randn(shape, device=device).to(dtype)
    return x.to(memory_format=CL) if layout == "channels_last" else x


def run_dwconv3d(x, w, b, residual, backend, grad_y):
    """``ops.dwconv3d`` forward and backward on fresh leaves: (y, dx, dweight, dbias or None)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = ops.dwconv3d(x, w, b, residual=residual, backend=backend)
    y.backward(grad_y.to(y.dtype))
    return y, x.grad, w.grad, None if b is None else b.grad


def assert_untouched(inputs, before):
    """Every tensor of ``inputs`` still equals its clone in ``before`` (an op must not write its inputs)."""
    for i, (t, b) in enumerate(zip(inputs, before)):
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b), f"input {i} was modified"


def clones(inputs):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]


def assert_all_close(names, got, ref, dtype, assert_close, what, rtol=lambda name: None):
    """``got`` against the float64 ``ref``, item by item: None where the reference has None, the
    gradients (names starting with "d") in ``dtype``, each within ``rtol(name)`` (None: dtype's)."""
    for name, a, e in zip(names, got, ref):
        if e is None:
            assert a is None, name
            continue
        if name.startswith("d"):
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, e, dtype=dtype, rtol=rtol(name), name=f"{name} {what}")


def assert_stats_of_stored_y(y, mean, var, assert_close):
    """The per-channel mean and biased variance of a large-mean y (|mean| / std ~ 1e4) equal the
    exact (float64) statistics of the y the kernel stored, and the naive float32 formula
    E[y^2] - E[y]^2 misses them by far more than the tolerance (so the check can fail)."""
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3, 4), correction=0)
    assert_close(mean, mean64, name="mean")
    assert_close(var, var64, name="var")
    yf = y.float().permute(0, 2, 3, 4, 1).reshape(-1, y.shape[1])
    naive = (yf * yf).mean(0) - yf.mean(0) ** 2
    assert (naive.double() - var64).abs().max() > 1e3 * 1e-5 * var64.abs().max()


def cpp_attention_why_not(dtype=torch.float32):
    """None where the "cpp" attention kernel runs ``dtype`` with the kernels' instruction set in force
    (AVX-512 or AVX2 for float32; AVX512-BF16 for bfloat16), else why not."""
    try:
        with torch.no_grad():
            ops.backend_for(ops.attention, torch.empty(1, 1, 3 * 32, dtype=dtype), 1, backend="cpp")
    except ops.BackendUnavailableError as e:
        return str(e)
    return None


def attention_rtol(dtype):
    """The attention kernels' tolerance: float32 at 1e-5 (2e-3 where its dots run in tf32)."""
    if dtype == torch.float32:
        from uniformer_fast.kernels.attention import fp32_input_precision
        return 1e-5 if fp32_input_precision() == "ieee" else 2e-3
    return {torch.bfloat16: 2.5e-2, torch.float16: 5e-3}[dtype]


def assert_no_spills(r, what):
    """An ahead-of-time compile (conftest's compile_for_gpu) used no local memory or stack: no
    register spills. Prints the resource use (pytest -s shows it)."""
    print(f"{what}: regs {r['regs']} stack {r['stack']} local {r['local']} shared {r['shared']} "
          f"LDG.E.128 {'LDG.E.128' in r['sass']} wgmma {'wgmma' in r['ptx']} mma.sync {'mma.sync' in r['ptx']}")
    assert r["local"] == 0 and r["stack"] == 0, \
        f"{what}: register spills ({r['regs']} regs, stack {r['stack']} B, local {r['local']} B)"


# Videos whose frames carry their own index: bit b of the index is the b-th of ID_BITS vertical
# stripes, white or black, which survives lossy coding and resizing.
ID_BITS = 10


def id_frame(i, h, w):
    """uint8 (h, w, 3): the picture of frame ``i``."""
    img = torch.zeros(h, w, 3, dtype=torch.uint8)
    for b in range(ID_BITS):
        if i >> b & 1:
            img[:, b * w // ID_BITS:(b + 1) * w // ID_BITS] = 255
    return img


def frame_ids(frames):
    """The indices drawn into uint8 (N, H, W, 3) frames by :func:`id_frame` (any size, upright)."""
    w = frames.shape[2]
    out = []
    for f in frames:
        out.append(sum(1 << b for b in range(ID_BITS)
                       if f[:, b * w // ID_BITS:(b + 1) * w // ID_BITS].float().mean() > 127))
    return out


def write_id_video(path, num_frames, h=48, w=80, *, codec="libx264", gop=8, bframes=2, rate=25, pts=None,
                   rotation=None, picture=id_frame):
    """An ``num_frames`` video of :func:`id_frame` pictures (or ``picture(i, h, w)``). libx264 with
    keyframes every ``gop`` frames and up to ``bframes`` B-frames (presentation order differs from
    decoding order); ``pts``: per-frame timestamps in 1/``rate`` units (variable frame rate);
    ``rotation``: a display rotation in degrees, counter-clockwise."""
    import av
    path = str(path)
    options = {"g": str(gop), "bf": str(bframes), "crf": "12"} if codec == "libx264" else {"g": str(gop)}
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(picture(i, h, w).numpy(), format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- Shared configs, skips and runners --------------------------------------------------------------

# The smallest model with every stage and block kind (architecture only: tests give the class count).
TINY = dict(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64), head_dim=16)
# The same with head_dim 32, the smallest the Triton attention kernels take.
TINY_HEAD32 = dict(TINY, embed_dim=(32, 32, 64, 64), head_dim=32)
# Two blocks in stage 3, so that split=True and checkpoint_num have a block to act on beside another.
TINY_STAGE3_X2 = dict(TINY, depth=(1, 1, 2, 1))

# Tests that run Triton kernels carry the "triton" marker; conftest skips them where triton is
# not installed, and CI's Triton 3.6 environment selects them with `-m triton`.
needs_triton = pytest.mark.triton


_no_cpp_attention = cpp_attention_why_not()

needs_cpp = pytest.mark.skipif(extension.C is None, reason="the C++ extension is not built")
needs_onednn = pytest.mark.skipif(fully_connected.ONEDNN_LINEAR is None, reason="no oneDNN linear in this torch")
needs_cpp_attention = pytest.mark.skipif(_no_cpp_attention is not None, reason=str(_no_cpp_attention))


def run_cli(args, capsys):
    """``uniformer-fast ARGS`` in this process: (exit code, stdout, stderr)."""
    from uniformer_fast.apps.cli import main
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Tiered parameter matrices ----------------------------------------------------------------------

def _value_id(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return str(value)


def _covering(cases, strength, preferred=()):
    """Indices of a subset of ``cases`` (tuples of hashable keys) in which every combination of
    ``strength`` axes' keys that occurs in ``cases`` occurs: strength 0, one case; 1, each value of
    each axis once; 2, each pair of values of any two axes (pairwise). Greedy: the case covering
    most of what is left, among equals a ``preferred`` index, then the first."""
    def tuples(case):
        return {(axes, tuple(case[a] for a in axes))
                for axes in itertools.combinations(range(len(case)), min(strength, len(case)))}

    todo = set().union(*(tuples(c) for c in cases))
    chosen = []
    while todo:
        best = max(range(len(cases)), key=lambda i: (len(tuples(cases[i]) & todo), i in preferred, -i))
        chosen.append(best)
        todo -= tuples(cases[best])
    return sorted(chosen)


def matrix(*, cover="pairs", where=None, fast=None, prefer=None, ids=None, **axes):
    """``@pytest.mark.parametrize`` over the product of ``axes`` (name -> values, in the order the
    ids list them; a value may be a ``pytest.param`` with its id and marks): the full tier runs
    every case, the fast tier a covering subset, and the rest carry the ``slow`` marker.

    An axis named "a,b" takes tuples (or ``pytest.param(a, b, id=...)``) of values for both.
    ``cover``: "one" (a single fast case: for ahead-of-time compiles, one per kernel in the fast
    tier), "each" (every value of every axis in some fast case) or "pairs" (every pair of values
    of any two axes). ``where(**case)``: keep only the cases it accepts; ``fast(**case)``: only the
    cases it accepts may be fast (they cover what occurs among them); ``prefer(**case)``: the
    cases to take first among equals (e.g. sm_90 and bfloat16, what the GPU runs). ``ids``: name
    -> function giving a value's id (default: dtypes without "torch.", int tuples as "3x3x3").
    """
    strength = {"one": 0, "each": 1, "pairs": 2}[cover]
    names = list(axes)
    options = []  # per axis: (value, id, marks)
    for name in names:
        opts = []
        for v in axes[name]:
            if isinstance(v, type(pytest.param(None))):
                value = v.values if "," in name else v.values[0]
                vid, marks = v.id, tuple(v.marks)
            else:
                value, vid, marks = v, None, ()
            if vid is None:
                vid = (ids or {}).get(name, _value_id)(value)
            opts.append((value, vid, marks))
        options.append(opts)

    def args(c):  # argname -> value, an axis named "a,b" giving two
        out = {}
        for name, (value, _, _) in zip(names, c):
            out.update(zip(name.split(","), value) if "," in name else {name: value})
        return out

    combos = [c for c in itertools.product(*options) if where is None or where(**args(c))]
    candidates = [i for i, c in enumerate(combos) if fast is None or fast(**args(c))]
    preferred = {j for j, i in enumerate(candidates) if prefer is not None and prefer(**args(combos[i]))}
    chosen = _covering([tuple(o[1] for o in combos[i]) for i in candidates], strength, preferred)
    fast = {candidates[j] for j in chosen}
    argnames = [a for name in names for a in name.split(",")]
    params = [pytest.param(*args(c).values(), id="-".join(o[1] for o in c),
                           marks=[m for o in c for m in o[2]] + ([] if i in fast else [pytest.mark.slow]))
              for i, c in enumerate(combos)]
    return pytest.mark.parametrize(argnames, params)
