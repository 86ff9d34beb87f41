"""torch.compile(fullgraph=True) of the model over the fused ops. (Each custom op's opcheck and
full-graph compile: tests/test_op_contracts.py.)"""

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast import ops
from uniformer_fast.kernels import INTERPRET
from uniformer_fast.ops import depthwise_conv as dwconv_mod, extension

from helpers import TINY_HEAD32, needs_cpp, needs_triton

# head_dim 32: a size the triton attention supports; tiny so the interpreter stays quick.
TINY = dict(TINY_HEAD32, num_classes=5)


def _compare_compiled(model, x, compile_backend, assert_close):
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    y = compiled(x)
    y.logsumexp(-1).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.logsumexp(-1).sum().backward()
    assert_close(y, expected, rtol=1e-5, name="logits")
    # Inductor reorders float32 reductions, and some gradients are sums that nearly cancel
    # (e.g. a stage-4 DPE bias: ~1e-6 against ~1e-1 elsewhere), so each gradient is held to
    # float32 noise relative to the largest gradient of the model, not to its own size.
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), g in zip(model.named_parameters(), grads):
        assert torch.isfinite(g).all(), name
        err = (g - p.grad).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max abs error {err:.2e} > 1e-5 x {scale:.2e}"


@pytest.mark.slow  # inductor's CPU code generation: about a minute
@needs_cpp
def test_compile_fullgraph_cpu_fast_path(assert_close):
    """Inductor on the CPU with what "auto" runs there (cpp depthwise conv, sdpa attention)."""
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY)
    x = torch.randn(2, 3, 4, 64, 64)
    picked = {op: ops.backend.resolve(op, "auto", x.device, *args)[0] for op, args in (
        ("dwconv3d", (x[:, :1], torch.empty(1, 1, 3, 3, 3), None, True)),
        ("attention", (torch.empty(1, 2, 96, requires_grad=True), 1, 0.1, 0.0)))}  # a training step
    assert picked == {"dwconv3d": "cpp", "attention": "sdpa"}
    _compare_compiled(model, x, "inductor", assert_close)


@pytest.mark.slow  # forward and backward of the model under the interpreter: about a minute
@needs_triton
def test_compile_fullgraph_triton(device, assert_close):
    """The Triton kernels as opaque ops in a full graph, forward and backward: interpreted on the
    CPU (AOT autograd only: inductor adds nothing to opaque ops), compiled by inductor on CUDA."""
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY).to(device)
    with ops.use_backend("triton"):
        _compare_compiled(model, torch.randn(2, 3, 2, 32, 32, device=device),
                          "aot_eager" if device.type == "cpu" else "inductor", assert_close)


def test_compile_recompiles_when_the_backend_changes():
    calls = []
    real = dwconv_mod.dwconv3d_reference

    def spy(*args):
        calls.append(1)
        return real(*args)

    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 1, 3, 3, 3)
    compiled = torch.compile(lambda x, w: ops.dwconv3d(x, w), fullgraph=True, backend="eager")
    ops.backend._OPS["dwconv3d"].impls["reference"] = ops.backend._Impl(spy, lambda *a: None)
    try:
        with ops.use_backend("reference"):
            compiled(x, w)
        n = len(calls)
        assert n > 0
        with ops.use_backend("cpp" if extension.C is not None else "reference"):
            compiled(x, w)
        assert (len(calls) == n) == (extension.C is not None)
    finally:
        ops.backend._OPS["dwconv3d"].impls["reference"] = ops.backend._Impl(real, lambda *a: None)


@pytest.mark.slow  # inductor's CPU code generation: 20-30 s each
@pytest.mark.parametrize("mode", (torch.no_grad, torch.inference_mode), ids=("no_grad", "inference_mode"))
def test_compile_fullgraph_cpu_inference(mode, assert_close):
    """Inference graph on the CPU under the default compiler (inductor): cpp depthwise conv, sdpa
    and the oneDNN linear + GELU (an opaque op: inductor's own lowering of it rejects an unpacked
    weight), no break, equal to eager."""
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY).eval()
    x = torch.randn(2, 3, 4, 64, 64)
    with mode():
        assert ops.backend.resolve("linear", "auto", x.device, x[0, 0], torch.empty(3, 64), None, "gelu")[0] == "onednn"
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    assert_close(got, expected, rtol=1e-5)
