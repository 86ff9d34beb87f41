import importlib

import pytest
import torch
import torch.nn.functional as F

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError

linear_mod = importlib.import_module("uniformer_fast.ops.linear")
needs_onednn = pytest.mark.skipif(linear_mod._ONEDNN_LINEAR is None, reason="no oneDNN linear in this torch")


def reference64(x, w, b, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return F.gelu(y) if activation == "gelu" else y


@pytest.fixture(params=[True, False], ids=["gelu-in-epilogue", "gelu-after"])
def gelu_placement(request, monkeypatch):
    """Both places the "cpp" backend puts GELU (oneDNN's epilogue at AVX-512, ATen's in-place GELU
    right after the matmul below), whichever this CPU takes."""
    monkeypatch.setattr(linear_mod, "_GELU_IN_EPILOGUE", request.param)
    return request.param


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 5, 4, 64), (1, 1, 32)])
@pytest.mark.parametrize("out_features", [256, 17])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpp_matches_reference(shape, out_features, activation, with_bias, gelu_placement, assert_close):
    x = torch.randn(shape)
    w, b = torch.randn(out_features, shape[-1]), torch.randn(out_features) if with_bias else None
    with torch.no_grad():
        y = ops.linear(x, w, b, activation=activation, backend="cpp")
    assert y.shape == shape[:-1] + (out_features,)
    assert_close(y, reference64(x, w, b, activation))


@needs_onednn
def test_cpp_reads_channels_last_views(assert_close):
    # The model's 1x1x1 convs: the (B, T, H, W, C) view of a channels_last_3d tensor, and a slice.
    x = torch.randn(2, 16, 3, 4, 5).to(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)
    w, b = torch.randn(8, 16), torch.randn(8)
    with torch.no_grad():
        assert_close(ops.linear(x, w, b, backend="cpp"), reference64(x, w, b, None))
        assert_close(ops.linear(x[:, 1:, :, ::2], w, b, backend="cpp"), reference64(x[:, 1:, :, ::2], w, b, None))


@needs_onednn
def test_auto_uses_cpp_for_inference_and_reference_for_training(assert_close):
    x, w, b = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)
    registry = ops.backend
    with torch.no_grad():
        assert registry.resolve("linear", "auto", x.device, x, w, b, "gelu")[0] == "cpp"
    assert registry.resolve("linear", "auto", x.device, x, w, b, "gelu")[0] == "reference"
    y = ops.linear(x, w, b, activation="gelu")  # training: differentiable
    y.sum().backward()
    w64 = w.detach().double().requires_grad_()
    reference64(x, w64, b.detach(), "gelu").sum().backward()
    assert_close(w.grad, w64.grad)
    with pytest.raises(BackendUnavailableError, match="inference only"):
        ops.linear(x, w, b, backend="cpp")
    with pytest.raises(BackendUnavailableError, match="float32, bfloat16 and float16; got torch.float64"), \
            torch.no_grad():
        ops.linear(x.double(), w.double(), backend="cpp")


# Each half-precision dtype on both of the "cpp" backend's paths: oneDNN in that dtype (only where
# this CPU runs it natively) and float32 compute rounded once (what CPUs without bf16/fp16 get).
_HALF_PATHS = [pytest.param(dtype, native, id=f"{str(dtype)[6:]}-{'native' if native else 'via-float32'}",
                            marks=pytest.mark.skipif(native and dtype not in linear_mod.ONEDNN_NATIVE_DTYPES,
                                                     reason=f"this CPU has no native oneDNN {dtype}"))
               for dtype in (torch.bfloat16, torch.float16) for native in (True, False)]


@needs_onednn
@pytest.mark.parametrize("dtype,native", _HALF_PATHS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_cpp_half_precision(dtype, native, activation, gelu_placement, monkeypatch, assert_close):
    natives = linear_mod.ONEDNN_NATIVE_DTYPES | {dtype} if native else linear_mod.ONEDNN_NATIVE_DTYPES - {dtype}
    monkeypatch.setattr(linear_mod, "ONEDNN_NATIVE_DTYPES", natives)
    x = torch.randn(2, 3, 5, 4, 72).to(memory_format=torch.channels_last_3d)[:, 1:]  # strided rows
    w, b = torch.randn(37, 72), torch.randn(37)
    with torch.no_grad():
        y = ops.linear(x.to(dtype), w.to(dtype), b.to(dtype), activation=activation, backend="cpp")
        with torch.autocast("cpu", dtype=dtype):  # the model's route: auto takes "cpp" in any dtype
            assert ops.backend_for(ops.linear, x, w, b, activation=activation) == "cpp"
            y_auto = ops.linear(x, w, b, activation=activation)
    ref = reference64(x.to(dtype), w.to(dtype), b.to(dtype), activation)
    for got in (y, y_auto):
        assert got.dtype == dtype and got.shape == (2, 2, 5, 4, 37)
        assert_close(got, ref, dtype=dtype)


def test_reference_and_autocast(assert_close):
    x, w, b = torch.randn(3, 5, 8), torch.randn(4, 8), torch.randn(4)
    assert_close(ops.linear(x.double(), w.double(), b.double(), activation="gelu", backend="reference"),
                 reference64(x, w, b, "gelu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference64(x, w, b, None), dtype=torch.bfloat16)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(3, 8), torch.randn(4, 7)), {}, ValueError, "in_features 7"),
    ((torch.randn(3, 8), torch.randn(4, 8, 1)), {}, ValueError, r"weight must be 2-D .*\(out_features, in_features\)"),
    ((torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)), {}, ValueError, r"bias must have shape \(4,\)"),
    ((torch.randn(3, 8), torch.randn(4, 8).double()), {}, TypeError, "weight must have the dtype of x"),
    ((torch.ones(3, 8, dtype=torch.int64), torch.randn(4, 8)), {}, TypeError, "x must be float"),
    (([1.0], torch.randn(4, 8)), {}, TypeError, "x must be a torch.Tensor"),
    ((torch.randn(3, 8), torch.randn(4, 8)), {"activation": "relu"}, ValueError, "activation must be None or 'gelu'"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.linear(*args, **kwargs)


@needs_onednn
@pytest.mark.skipif(linear_mod._REORDER is None, reason="no oneDNN weight reorder in this torch")
def test_cpp_packs_each_parameter_once_and_repacks_after_a_write(assert_close):
    conv = torch.nn.Conv3d(24, 40, 1)  # the model's 1x1x1 convs pass a view of the parameter
    x = torch.randn(2, 3, 33, 24)
    with torch.no_grad():
        y = ops.linear(x, conv.weight.flatten(1), conv.bias, backend="cpp")
        (packed,) = linear_mod._PACKED[conv.weight].values()
        y_again = ops.linear(x[:, :1], conv.weight.flatten(1), conv.bias, backend="cpp")  # other rows: same pack
        assert linear_mod._PACKED[conv.weight][next(iter(linear_mod._PACKED[conv.weight]))] is packed
        assert_close(y, reference64(x, conv.weight.flatten(1), conv.bias, None))
        assert_close(y_again, reference64(x[:, :1], conv.weight.flatten(1), conv.bias, None))
        conv.weight.mul_(-2.0)  # an in-place write (as load_state_dict makes): the pack is stale
        y_new = ops.linear(x, conv.weight.flatten(1), conv.bias, backend="cpp")
        assert_close(y_new, reference64(x, conv.weight.flatten(1), conv.bias, None))
        # A plain tensor (not a parameter) is never cached: it may be a temporary.
        w = torch.randn(40, 24)
        assert_close(ops.linear(x, w, None, backend="cpp"), reference64(x, w, None, None))
        assert w not in linear_mod._PACKED
    ref = torch.utils.weak.WeakIdRef(conv.weight)
    del conv
    assert ref() is None  # the cache holds no reference to the parameter


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_onednn), "reference"])
def test_autocast_casts_each_parameter_once_and_again_after_a_write(backend, assert_close):
    """Under autocast with no gradient wanted, a parameter's weight (views included) is cast once
    and the cast reused (and, on "cpp", packed once); a write to the parameter recasts it; with a
    gradient wanted the cast stays differentiable and nothing is cached."""
    conv = torch.nn.Conv3d(24, 40, 1)
    x = torch.randn(2, 3, 33, 24)
    dtype = torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y = ops.linear(x, conv.weight.flatten(1), conv.bias, backend=backend)
        (cached,) = linear_mod._CASTS[conv.weight].values()
        ops.linear(x, conv.weight.flatten(1), conv.bias, backend=backend)
        assert next(iter(linear_mod._CASTS[conv.weight].values())) is cached
        assert_close(y, reference64(x, conv.weight.flatten(1), conv.bias, None), dtype=dtype)
        conv.weight.mul_(-2.0)
        y_new = ops.linear(x, conv.weight.flatten(1), conv.bias, backend=backend)
        assert_close(y_new, reference64(x, conv.weight.flatten(1), conv.bias, None), dtype=dtype)
        assert next(iter(linear_mod._CASTS[conv.weight].values())) is not cached
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):  # the serving route
        assert_close(ops.linear(x, conv.weight.flatten(1), conv.bias, backend=backend),
                     reference64(x, conv.weight.flatten(1), conv.bias, None), dtype=dtype)
    lin = torch.nn.Linear(24, 40)
    with torch.autocast("cpu", dtype=dtype):
        ops.linear(x, lin.weight, lin.bias, backend="reference").float().sum().backward()
    assert lin.weight.grad is not None and lin.weight not in linear_mod._CASTS
    ref = torch.utils.weak.WeakIdRef(conv.weight)
    del conv
    assert ref() is None  # the cache holds no reference to the parameter
