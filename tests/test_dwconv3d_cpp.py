"""The "cpp" backend of ops.dwconv3d (csrc/, built into uniformer_fast._C): parity with the float64
reference for the output and every gradient, edge shapes, layouts, thread-count determinism, and
the fallback when the extension is missing."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

# Not importorskip: `pip install .` must build it, so a missing extension fails these tests.
from uniformer_fast import _C, ops
from uniformer_fast.ops import BackendUnavailableError, extension

from helpers import run_dwconv3d


CL = torch.channels_last_3d


def _inputs(shape, kernel, with_bias, layout="channels_last"):
    """float64 originals and float32 copies; x in the given layout (a slice for "sliced")."""
    B, C, T, H, W = shape
    if layout == "sliced":  # every other W column and a channel window of a larger channels-last tensor
        big = torch.randn(B, C + 3, T, H, 2 * W + 1, dtype=torch.float64).to(memory_format=CL)
        x64 = big[:, 1:C + 1, :, :, 1::2]
        assert x64.stride(1) == 1 and not x64.is_contiguous(memory_format=CL)
    else:
        x64 = torch.randn(shape, dtype=torch.float64)
        if layout == "channels_last":
            x64 = x64.to(memory_format=CL)
    w64 = torch.randn((C, 1) + kernel, dtype=torch.float64)
    b64 = torch.randn(C, dtype=torch.float64) if with_bias else None
    # .float() would compact a slice: slice a float32 copy of the base instead
    x32 = big.float()[:, 1:C + 1, :, :, 1::2] if layout == "sliced" else x64.float()
    return x64, w64, b64, x32, w64.float(), None if b64 is None else b64.float()


def _check_parity(shape, kernel, residual, with_bias, layout, assert_close):
    x64, w64, b64, x32, w32, b32 = _inputs(shape, kernel, with_bias, layout)
    gy = torch.randn(shape, dtype=torch.float64)
    ref = run_dwconv3d(x64, w64, b64, residual, "reference", gy)
    out = run_dwconv3d(x32, w32, b32, residual, "cpp", gy)
    assert out[0].dtype == torch.float32
    assert out[0].is_contiguous(memory_format=CL)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), out, ref):
        if e is None:
            assert a is None, name
        else:
            assert_close(a, e, dtype=torch.float32, name=name)


@pytest.mark.parametrize("shape", [
    (1, 64, 4, 9, 19),   # C a multiple of every vector width; W with interior and edge blocks
    (2, 19, 3, 5, 11),   # C odd: vector part plus leftover channels
    (1, 7, 1, 6, 5),     # T = 1, C below the narrowest vector
    (1, 33, 3, 1, 1),    # H = W = 1: every spatial tap but the centre is padding
    (1, 24, 5, 3, 23),   # non-square H x W, W past two 8-column blocks
])
@pytest.mark.parametrize("kernel", [(3, 3, 3), (5, 5, 5), (1, 3, 3), (3, 1, 1), (7, 7, 7), (1, 5, 7)])
def test_dwconv3d_cpp_matches_reference(shape, kernel, assert_close):
    _check_parity(shape, kernel, residual=True, with_bias=True, layout="channels_last", assert_close=assert_close)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_dwconv3d_cpp_options_and_layouts(residual, with_bias, layout, assert_close):
    _check_parity((2, 21, 3, 6, 10), (3, 5, 3), residual, with_bias, layout, assert_close)


@pytest.mark.parametrize("shape,kernel", [((1, 64, 8, 14, 14), (5, 5, 5)), ((1, 40, 4, 7, 7), (3, 3, 3)),
                                          ((2, 130, 3, 5, 9), (3, 3, 3)),  # weight grad: 3 channel blocks
                                          ((2, 1, 3, 4, 5), (3, 3, 5))])  # C = 1
def test_dwconv3d_cpp_stage_like_shapes(shape, kernel, assert_close):
    _check_parity(shape, kernel, residual=True, with_bias=True, layout="channels_last", assert_close=assert_close)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_dwconv3d_cpp_every_instruction_set(isa, assert_close):
    """Each compiled variant (the default picks the best one this CPU has) against the reference."""
    if isa not in extension.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    with extension.use_isa(isa):
        _check_parity((2, 37, 3, 5, 17), (3, 5, 5), True, True, "channels_last", assert_close)


def test_dwconv3d_cpp_same_result_for_1_and_2_threads():
    shape, kernel = (2, 131, 6, 9, 20), (3, 5, 5)  # several row chunks and channel blocks
    x = torch.randn(shape).to(memory_format=CL)
    w, b = torch.randn((131, 1) + kernel), torch.randn(131)
    gy = torch.randn(shape)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_dwconv3d(x, w, b, True, "cpp", gy))
    finally:
        torch.set_num_threads(before)
    for name, one, two in zip(("y", "dx", "dweight", "dbias"), *results):
        assert torch.equal(one, two), f"{name} differs between 1 and 2 threads"


def test_dwconv3d_cpp_grads_only_where_asked(assert_close):
    x = torch.randn(1, 8, 3, 4, 5).to(memory_format=CL)
    w = torch.randn(8, 1, 3, 3, 3, requires_grad=True)
    b = torch.randn(8)  # no grad wanted for x or b
    ops.dwconv3d(x, w, b, backend="cpp").sum().backward()
    assert x.grad is None and b.grad is None and w.grad is not None
    w64 = w.detach().double().requires_grad_()
    ops.dwconv3d(x.double(), w64, b.double(), backend="reference").sum().backward()
    assert_close(w.grad, w64.grad, dtype=torch.float32, name="dweight")


def test_dwconv3d_cpp_auto_picks_cpp_for_cpu_float32():
    x = torch.randn(1, 4, 2, 3, 3)
    w = torch.randn(4, 1, 3, 3, 3)
    name, _ = ops.backend.resolve("dwconv3d", "auto", x.device, x, w, None, False)
    assert name == "cpp"
    name, _ = ops.backend.resolve("dwconv3d", "auto", x.device, x.double(), w.double(), None, False)
    assert name == "reference"  # float64 is not a cpp dtype: auto moves on, silently and correctly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dwconv3d_cpp_half_precision(dtype, layout, assert_close):
    # Autocast's dtypes: computed in float32 by the kernels, rounded once; gradients flow to the
    # half-precision leaves through the conversions.
    x64, w64, b64, x32, _, _ = _inputs((2, 12, 3, 5, 7), (3, 3, 3), True, layout)
    x, w, b = (t.detach().to(dtype).requires_grad_() for t in (x32, w64, b64))
    y = ops.dwconv3d(x, w, b, residual=True, backend="cpp")
    assert y.dtype == dtype and y.shape == x.shape
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy.to(dtype))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = ops.dwconv3d(xr, wr, br, residual=True, backend="reference")
    yr.backward(gy.to(dtype).double())
    for name, got, ref in (("y", y, yr), ("dx", x.grad, xr.grad), ("dweight", w.grad, wr.grad),
                           ("dbias", b.grad, br.grad)):
        assert got.dtype == dtype, name
        assert_close(got, ref, dtype=dtype, name=name)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert ops.backend_for(ops.dwconv3d, x32, w64.float(), b64.float(), residual=True) == "cpp"


def test_dwconv3d_cpp_by_name_rejects_other_dtypes():
    x = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float32, bfloat16 and float16; got torch.float64"):
        ops.dwconv3d(x, torch.randn(4, 1, 3, 3, 3, dtype=torch.float64), backend="cpp")


def test_dwconv3d_cpp_fallback_when_extension_missing(monkeypatch, assert_close):
    """A failed import: "auto" runs the reference with one warning; "cpp" by name says why."""
    message = "the C++ extension uniformer_fast._C failed to import (ImportError: simulated)"
    monkeypatch.setattr(extension, "C", None)
    monkeypatch.setattr(extension, "IMPORT_ERROR", message)
    monkeypatch.setattr(extension, "_warned", set())  # as in a fresh process
    x = torch.randn(1, 4, 2, 3, 3)
    w = torch.randn(4, 1, 3, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = ops.dwconv3d(x, w)
        y2 = ops.dwconv3d(x, w)
    relevant = [c for c in caught if "uniformer_fast._C" in str(c.message)]
    assert len(relevant) == 1 and "simulated" in str(relevant[0].message)
    assert issubclass(relevant[0].category, RuntimeWarning)
    expected = ops.dwconv3d(x.double(), w.double(), backend="reference")
    assert_close(y1, expected)
    assert torch.equal(y1, y2)
    with pytest.raises(BackendUnavailableError, match="simulated"):
        ops.dwconv3d(x, w, backend="cpp")


def test_dwconv3d_cpp_real_import_failure():
    """A process where ``import uniformer_fast._C`` fails: auto warns once and falls back, and the
    named backend's error carries the ImportError's text."""
    code = """
import sys, warnings
sys.modules["uniformer_fast._C"] = None  # any import of it now raises ImportError
import torch
from uniformer_fast import ops
x, w = torch.randn(1, 4, 2, 3, 3), torch.randn(4, 1, 3, 3, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = ops.dwconv3d(x, w); ops.dwconv3d(x, w)
print(sum("uniformer_fast._C" in str(c.message) for c in caught))
print(torch.equal(y, ops.dwconv3d(x, w, backend="reference")))
try:
    ops.dwconv3d(x, w, backend="cpp")
except ops.BackendUnavailableError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "1" and lines[1] == "True", out.stdout + out.stderr
    assert "backend 'cpp' cannot run this call" in lines[2]
    assert "uniformer_fast._C failed to import (ModuleNotFoundError: import of uniformer_fast._C halted" in lines[2]


def test_extension_imports_from_installed_package():
    """_C is importable from outside the source tree, exposes its kernels, and was built with OpenMP."""
    code = ("import uniformer_fast._C as C; print(C.__file__); print(C.isa()); print(C.has_openmp());"
            "print(hasattr(C, 'dwconv3d_fwd') and hasattr(C, 'dwconv3d_bwd'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/")
    lines = out.stdout.split()
    assert lines[1] in _C.supported_isas()
    assert lines[2:] == ["True", "True"]


@pytest.mark.parametrize("grad", [False, True])
def test_dwconv3d_cpp_strided_weight_and_bias(grad, assert_close):
    """Weight and bias are read through their strides (inference skips autograd entirely)."""
    C, kernel = 13, (3, 5, 3)
    w = torch.randn((C, 1) + kernel[:2] + (2 * kernel[2],))[..., ::2]
    b = torch.randn(2 * C)[::2]
    assert not w.is_contiguous() and b.stride(0) == 2
    x = torch.randn(2, C, 4, 5, 9).to(memory_format=CL)
    with torch.set_grad_enabled(grad):
        y = ops.dwconv3d(x, w, b, residual=True, backend="cpp")
    assert y.requires_grad is False and y.is_contiguous(memory_format=CL)
    assert_close(y, ops.dwconv3d(x.double(), w.double(), b.double(), residual=True, backend="reference"))
