import pytest
import torch
import torch.nn.functional as F

from uniformer_fast import ops
from uniformer_fast.ops import BackendUnavailableError
from uniformer_fast.ops import extension, fully_connected as linear_mod

from helpers import needs_onednn


def reference64(x, w, b, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return F.gelu(y) if activation == "gelu" else y


ISAS = ("avx512", "avx2", "generic")


def _isa_param(isa, id_prefix=""):
    """A C++ kernel instruction set, skipped where this CPU or build cannot run it."""
    ok = isa in extension.supported_isas()  # empty without the extension
    return pytest.param(isa, id=id_prefix + isa,
                        marks=pytest.mark.skipif(not ok, reason=f"needs the C++ extension on a CPU with {isa}"))


@pytest.fixture(params=[pytest.param("epilogue", id="gelu-in-epilogue"),
                        *(_isa_param(isa, "gelu-after-") for isa in ISAS)])
def gelu_placement(request, monkeypatch):
    """Both places the "onednn" backend puts GELU, whichever this CPU takes: oneDNN's epilogue (at
    AVX-512) or our C++ GELU in place right after the matmul (below), with each of its kernels."""
    monkeypatch.setattr(linear_mod, "_GELU_IN_EPILOGUE", request.param == "epilogue")
    if request.param == "epilogue":
        yield request.param
        return
    with extension.use_isa(request.param):
        yield request.param


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 5, 4, 64), (1, 1, 32)])
@pytest.mark.parametrize("out_features", [256, 17])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_matches_reference(shape, out_features, activation, with_bias, gelu_placement, assert_close):
    x = torch.randn(shape)
    w, b = torch.randn(out_features, shape[-1]), torch.randn(out_features) if with_bias else None
    with torch.no_grad():
        y = ops.linear(x, w, b, activation=activation, backend="onednn")
    assert y.shape == shape[:-1] + (out_features,)
    assert_close(y, reference64(x, w, b, activation))


def _gelu_cpp(x, isa, threads):
    y = x.clone()
    with extension.use_isa(isa):  # the kernels run with the extension's instruction set
        extension.C.gelu_inplace(y.data_ptr(), y.numel(), threads)
    return y


# Lengths: empty, one element, below / at / past a vector of 4, 8 and 16 floats, past one 16K-float
# chunk, and enough chunks for several threads.
@pytest.mark.parametrize("isa", [_isa_param(isa) for isa in ISAS])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 17, 16385, 300007])
def test_cpp_gelu_kernel_matches_float64(isa, n):
    """The C++ GELU (a rational erf) against F.gelu in float64: |error| <= 2.4e-7 max(|x|, 1), the
    bound its fit gives, over the whole range where erf is not yet +-1 and past it."""
    x = torch.randn(n) * 3
    x[: n // 3] = torch.linspace(-9, 9, n // 3)
    y, ref = _gelu_cpp(x, isa, 2), F.gelu(x.double())
    assert not torch.isnan(y).any()
    err = ((y.double() - ref).abs() / x.double().abs().clamp_min(1)).max().item() if n else 0.0
    assert err <= 2.4e-7, f"{isa}: max |error| / max(|x|, 1) = {err:.2e}"


@pytest.mark.parametrize("isa", [_isa_param(isa) for isa in ISAS])
def test_cpp_gelu_kernel_special_values(isa):
    """NaN stays NaN, +inf gives +inf and -inf NaN (as ATen), huge negatives 0 (the erf fit's
    overshoot past 1 clamped), huge positives themselves, in the vector body and the scalar tail."""
    special = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, -1e30, 1e-30, 0.0, -0.0, -12.0]
    for offset in (0, 5):  # offset 5: in a vector of 8 and in the tail of a 23-element span
        x = torch.zeros(23)
        x[offset:offset + len(special)] = torch.tensor(special)
        y = _gelu_cpp(x, isa, 1)[offset:offset + len(special)]
        expected = F.gelu(torch.tensor(special, dtype=torch.float64)).float()
        torch.testing.assert_close(y, expected, equal_nan=True, atol=1e-30, rtol=1e-6)


@pytest.mark.parametrize("isa", [_isa_param(isa) for isa in ISAS])
def test_cpp_gelu_kernel_same_bits_for_any_thread_count(isa):
    x = torch.randn(200003)
    one = _gelu_cpp(x, isa, 1)
    for threads in (2, 3, 16):
        assert torch.equal(_gelu_cpp(x, isa, threads), one)


def test_cpp_gelu_kernel_rejects_an_unknown_or_unsupported_isa():
    """The GELU runs with the extension's instruction set: selecting an unknown one, or one this
    build and CPU do not run, is refused and leaves the choice (and the GELU) as it was."""
    if extension.C is None:
        pytest.skip("needs the C++ extension")
    before = extension.isa()
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        with extension.use_isa("sse9"):
            pass
    for isa in ISAS:
        if isa not in extension.supported_isas():
            with pytest.raises(ValueError, match=isa):
                with extension.use_isa(isa):
                    pass
    assert extension.isa() == before
    x = torch.randn(8)
    torch.testing.assert_close(_gelu_cpp(x, before, 1), F.gelu(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_gelu_after_the_matmul_leaves_other_dtypes_to_aten(dtype, assert_close):
    """_gelu_inplace takes float32 to the C++ kernel; other dtypes (and strided views) to ATen's."""
    y = torch.randn(5, 12, dtype=dtype)
    expected = F.gelu(y.double())
    assert_close(linear_mod._gelu_inplace(y.clone()), expected, dtype=dtype)
    strided = torch.randn(12, 5).t()  # clone() keeps these strides
    assert not strided.clone().is_contiguous()
    assert_close(linear_mod._gelu_inplace(strided.clone()), F.gelu(strided.double()))


@needs_onednn
def test_onednn_reads_channels_last_views(assert_close):
    # The model's 1x1x1 convs: the (B, T, H, W, C) view of a channels_last_3d tensor, and a slice.
    x = torch.randn(2, 16, 3, 4, 5).to(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)
    w, b = torch.randn(8, 16), torch.randn(8)
    with torch.no_grad():
        assert_close(ops.linear(x, w, b, backend="onednn"), reference64(x, w, b, None))
        assert_close(ops.linear(x[:, 1:, :, ::2], w, b, backend="onednn"), reference64(x[:, 1:, :, ::2], w, b, None))


@needs_onednn
def test_auto_uses_onednn_for_inference_and_reference_for_training(assert_close):
    x, w, b = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)
    registry = ops.backend
    with torch.no_grad():
        assert registry.resolve("linear", "auto", x.device, x, w, b, "gelu")[0] == "onednn"
    assert registry.resolve("linear", "auto", x.device, x, w, b, "gelu")[0] == "reference"
    y = ops.linear(x, w, b, activation="gelu")  # training: differentiable
    y.sum().backward()
    w64 = w.detach().double().requires_grad_()
    reference64(x, w64, b.detach(), "gelu").sum().backward()
    assert_close(w.grad, w64.grad)
    with pytest.raises(BackendUnavailableError, match="inference only"):
        ops.linear(x, w, b, backend="onednn")
    with pytest.raises(BackendUnavailableError, match="float32, bfloat16 and float16; got torch.float64"), \
            torch.no_grad():
        ops.linear(x.double(), w.double(), backend="onednn")


# Each half-precision dtype on both of the "onednn" backend's paths: oneDNN in that dtype (only where
# this CPU runs it natively) and float32 compute rounded once (what CPUs without bf16/fp16 get).
_HALF_PATHS = [pytest.param(dtype, native, id=f"{str(dtype)[6:]}-{'native' if native else 'via-float32'}",
                            marks=pytest.mark.skipif(native and dtype not in linear_mod.ONEDNN_NATIVE_DTYPES,
                                                     reason=f"this CPU has no native oneDNN {dtype}"))
               for dtype in (torch.bfloat16, torch.float16) for native in (True, False)]


@needs_onednn
@pytest.mark.parametrize("dtype,native", _HALF_PATHS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_onednn_half_precision(dtype, native, activation, gelu_placement, monkeypatch, assert_close):
    natives = linear_mod.ONEDNN_NATIVE_DTYPES | {dtype} if native else linear_mod.ONEDNN_NATIVE_DTYPES - {dtype}
    monkeypatch.setattr(linear_mod, "ONEDNN_NATIVE_DTYPES", natives)
    x = torch.randn(2, 3, 5, 4, 72).to(memory_format=torch.channels_last_3d)[:, 1:]  # strided rows
    w, b = torch.randn(37, 72), torch.randn(37)
    with torch.no_grad():
        y = ops.linear(x.to(dtype), w.to(dtype), b.to(dtype), activation=activation, backend="onednn")
        with torch.autocast("cpu", dtype=dtype):  # the model's route: auto takes "onednn" in any dtype
            assert ops.backend_for(ops.linear, x, w, b, activation=activation) == "onednn"
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
def test_onednn_packs_each_parameter_once_and_repacks_after_a_write(assert_close):
    conv = torch.nn.Conv3d(24, 40, 1)  # the model's 1x1x1 convs pass a view of the parameter
    x = torch.randn(2, 3, 33, 24)
    with torch.no_grad():
        y = ops.linear(x, conv.weight.flatten(1), conv.bias, backend="onednn")
        (packed,) = linear_mod._PACKED[conv.weight].values()
        y_again = ops.linear(x[:, :1], conv.weight.flatten(1), conv.bias, backend="onednn")  # other rows: same pack
        assert linear_mod._PACKED[conv.weight][next(iter(linear_mod._PACKED[conv.weight]))] is packed
        assert_close(y, reference64(x, conv.weight.flatten(1), conv.bias, None))
        assert_close(y_again, reference64(x[:, :1], conv.weight.flatten(1), conv.bias, None))
        conv.weight.mul_(-2.0)  # an in-place write (as load_state_dict makes): the pack is stale
        y_new = ops.linear(x, conv.weight.flatten(1), conv.bias, backend="onednn")
        assert_close(y_new, reference64(x, conv.weight.flatten(1), conv.bias, None))
        # A plain tensor (not a parameter) is never cached: it may be a temporary.
        w = torch.randn(40, 24)
        assert_close(ops.linear(x, w, None, backend="onednn"), reference64(x, w, None, None))
        assert w not in linear_mod._PACKED
    ref = torch.utils.weak.WeakIdRef(conv.weight)
    del conv
    assert ref() is None  # the cache holds no reference to the parameter


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=needs_onednn), "reference"])
def test_autocast_casts_each_parameter_once_and_again_after_a_write(backend, assert_close):
    """Under autocast with no gradient wanted, a parameter's weight (views included) is cast once
    and the cast reused (and, on "onednn", packed once); a write to the parameter recasts it; with a
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
