import os

# Triton's interpreter must be on before triton is imported, so CPU tensors run the kernels.
# A GPU run turns it off with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Relative tolerances by dtype (DEVELOPERS.md): float32 at 1e-5, or 2e-3 where tf32 matmuls run.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _assert_close(actual, expected, dtype=None, rtol=None, name="tensor"):
    """Compare with a reference computed in float64: max |a - e| <= rtol * max |e| (+ tiny atol).

    NaN or inf anywhere in ``actual`` fails, whatever the reference holds.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    rtol = rtol if rtol is not None else RTOL[dtype or actual.dtype]
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= rtol * scale + 1e-30 * (scale == 0) or err <= 1e-12, \
        f"{name}: max abs error {err:.3e} > rtol {rtol:g} x max |ref| {scale:.3e} (rel {err / max(scale, 1e-300):.2e})"


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def empty():
    """torch.empty that fills with NaN, so reading an unwritten element shows."""
    def make(*shape, **kwargs):
        return torch.empty(*shape, **kwargs).fill_(math.nan)
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
