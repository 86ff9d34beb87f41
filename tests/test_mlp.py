"""ops.mlp (``residual + fc2(gelu(fc1(x)))``): the "onednn" CPU inference path, chunked or not, against
a float64 reference; the reference backend's gradients; bad input named."""

import pytest
import torch

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError
from uniformer_fast.ops import feed_forward as mlp_mod

from helpers import needs_onednn


def _weights(C, hidden, out, dtype=torch.float32, bias=True):
    w1, w2 = torch.randn(hidden, C) / C ** 0.5, torch.randn(out, hidden) / hidden ** 0.5
    b1, b2 = (torch.randn(hidden), torch.randn(out)) if bias else (None, None)
    return [None if t is None else t.to(dtype) for t in (w1, b1, w2, b2)]


def _reference64(x, weights, residual):
    w1, b1, w2, b2 = [None if t is None else t.double() for t in weights]
    return ops.mlp_reference(x.double(), w1, b1, w2, b2, None if residual is None else residual.double())


@needs_onednn
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("shape,hidden,out,residual,bias", [
    ((7, 16), 64, 16, True, True), ((2, 3, 5, 4, 24), 96, 24, True, False), ((1, 1, 8), 32, 12, False, True),
    ((3, 300, 32), 128, 32, True, True)])
def test_onednn_matches_reference(shape, hidden, out, residual, bias, chunked, monkeypatch, assert_close):
    if chunked:  # chunks of 256 rows (the floor), the last one short
        monkeypatch.setattr(mlp_mod, "CHUNK_ABOVE_BYTES", 0)
        monkeypatch.setattr(mlp_mod, "HIDDEN_CHUNK_BYTES", 1)
    x = torch.randn(shape)
    weights = _weights(shape[-1], hidden, out, bias=bias)
    res = torch.randn(*shape[:-1], out) if residual else None
    with torch.no_grad():
        y = ops.mlp(x, *weights, residual=res, backend="onednn")
    assert y.shape == (*shape[:-1], out) and y.is_contiguous()
    assert_close(y, _reference64(x, weights, res))


@needs_onednn
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_onednn_reads_channels_last_views_and_autocast(chunked, monkeypatch, assert_close):
    """The model's call: a channels-last (B, T, H, W, C) view and its residual, bfloat16 autocast
    (native oneDNN where the CPU has it, float32 compute otherwise)."""
    if chunked:
        monkeypatch.setattr(mlp_mod, "CHUNK_ABOVE_BYTES", 0)
        monkeypatch.setattr(mlp_mod, "HIDDEN_CHUNK_BYTES", 1)
    x5 = torch.randn(2, 24, 3, 9, 11).contiguous(memory_format=torch.channels_last_3d)
    x = x5.permute(0, 2, 3, 4, 1)
    weights = _weights(24, 96, 24)
    with torch.no_grad():
        assert_close(ops.mlp(x, *weights, residual=x, backend="onednn"), _reference64(x, weights, x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ops.backend_for(ops.mlp, x, *weights, residual=x) == "onednn"
            y = ops.mlp(x, *weights, residual=x)
    assert y.dtype == torch.bfloat16
    assert_close(y, _reference64(x.bfloat16(), [t.bfloat16() for t in weights], x.bfloat16()), dtype=torch.bfloat16)


def test_reference_gradients_and_auto_for_training(assert_close):
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weights = [t.double().requires_grad_() for t in _weights(8, 32, 8)]
    res = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert ops.backend_for(ops.mlp, x, *weights, residual=res) == "reference"  # a gradient is wanted
    assert torch.autograd.gradcheck(lambda *a: ops.mlp(a[0], *a[1:5], residual=a[5]), (x, *weights, res))


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(3, 8), *_weights(7, 16, 8)), {}, ValueError, "in_features 7"),
    ((torch.randn(3, 8), *_weights(8, 16, 8)[:2], torch.randn(8, 15), None), {}, ValueError,
     r"fc2_weight must have shape \(out_features, 16\)"),
    ((torch.randn(3, 8), *_weights(8, 16, 8)), {"residual": torch.randn(3, 9)}, ValueError,
     r"residual must have the output's shape \(3, 8\)"),
    ((torch.randn(3, 8), *_weights(8, 16, 8)), {"residual": torch.randn(3, 8).double()}, TypeError,
     "residual must have the dtype of x"),
    ((torch.randn(3, 8), torch.randn(16, 8), torch.randn(15), *_weights(8, 16, 8)[2:]), {}, ValueError,
     r"fc1_bias must have shape \(16,\)"),
    (([1.0], *_weights(8, 16, 8)), {}, TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_named(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.mlp(*args, **kwargs)


@needs_onednn
def test_onednn_refuses_training_by_name():
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(BackendUnavailableError, match="backend 'onednn' cannot run this call: inference only"):
        ops.mlp(x, *_weights(8, 16, 8), backend="onednn")
