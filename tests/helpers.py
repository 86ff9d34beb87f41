"""Input makers shared by the kernel tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from fractions import Fraction

import torch

from uniformer_fast import ops

CL = torch.channels_last_3d
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
    from uniformer_fast.ops.attention import _cpp_why_not
    with torch.no_grad():
        return _cpp_why_not(torch.empty(1, 1, 3 * 32, dtype=dtype), 1, 1.0, 0.0)


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
