"""The fused CBlock in real training: stochastic depth inside the Local MHRA tail kernel.

The official runs train with drop_path_rate 0.1 (UniFormer-S) and 0.3 (-B), rising linearly over
the blocks, so every CBlock but the first has ``drop_path.p > 0``. Checked here:

- the op: ``ops.local_mhra_tail`` / ``ops.local_mhra_tail_bn_stats`` with ``branch_scale`` on
  "triton" against the float64 reference, forward and every gradient, with dropped (0) and kept
  (1 / keep) samples, fp32 and bf16, odd shapes; its argument checks;
- the mask: ``drop_path_scale`` is the one draw, so the fused path and ``DropPath`` drop the same
  samples under a seed;
- a CBlock in training at drop-path rates 0.1 and 0.3: "triton" in float32 against "reference"
  in float64 under the same seed, the output, every gradient, the BatchNorm running statistics
  and the drawn masks (UniFormer-S at both rates: tests/test_model_triton.py);
- every CBlock of the full UniFormer-S takes the fused tail in training (calls counted).
"""
import copy

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast import model as model_mod
from uniformer_fast import ops
from uniformer_fast.kernels import HAS_TRITON, INTERPRET
from uniformer_fast.model import CBlock, DropPath, drop_path, drop_path_scale
from uniformer_fast.ops import BackendUnavailableError

from helpers import make_x, matrix, needs_triton


def _skip_without_kernels(device):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if device.type == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")


def _tail_inputs(shape, kernel, dtype, device, layout="channels_last"):
    B, C = shape[:2]
    u = make_x(shape, dtype, layout, device).requires_grad_()
    residual = make_x(shape, dtype, layout, device).requires_grad_()
    params = [torch.randn(C, 1, *kernel, dtype=dtype, device=device) * 0.2, torch.randn(C, dtype=dtype, device=device),
              torch.randn(C, C, 1, 1, 1, dtype=dtype, device=device) * C ** -0.5,
              torch.randn(C, dtype=dtype, device=device)]
    params = [p.requires_grad_() for p in params]
    return [u, *params, residual]


def _scale(B, keep, dtype, device):
    """Each sample's scale, dropped and kept alternating (the first dropped)."""
    mask = (torch.arange(B) % 2 == 1).to(dtype)
    return (mask / keep).to(device)


# --- the op ---------------------------------------------------------------------------------------

# One bfloat16 shape is enough under the interpreter.
@matrix(cover="each", shape=[pytest.param(s, id=str(s)) for s in ((3, 20, 2, 3, 5), (2, 16, 1, 4, 3))],
        dtype=[pytest.param(d, id=str(d)) for d in (torch.float32, torch.bfloat16)],
        stats=[pytest.param(False, id="tail"), pytest.param(True, id="tail_bn_stats")],
        where=lambda shape, dtype, stats: not (dtype == torch.bfloat16 and shape[0] == 2),
        prefer=lambda shape, dtype, stats: shape[0] == 2)
def test_branch_scale_matches_reference(shape, dtype, stats, device, assert_close):
    """Forward (and the statistics) and every gradient against the float64 reference, with a
    dropped and a kept sample."""
    _skip_without_kernels(device)
    args = _tail_inputs(shape, (3, 3, 3), dtype, device)
    scale = _scale(shape[0], 0.7, dtype, device)
    op = ops.local_mhra_tail_bn_stats if stats else ops.local_mhra_tail
    out = op(*args, branch_scale=scale, backend="triton")
    args64 = [a.detach().double().requires_grad_() for a in args]
    ref = ops.local_mhra_tail_reference(*args64, branch_scale=scale.double())
    outs = out if stats else (out,)
    refs = (ref, *ops.batch_stats(ref)) if stats else (ref,)
    assert_close(outs[0], ref, dtype=dtype, name="y")
    if stats:  # the statistics of y as stored (rounded to its dtype), float32-exact
        for name, o, r in zip(("mean", "var"), outs[1:], ops.batch_stats(outs[0].detach().double())):
            assert_close(o, r, dtype=torch.float32, name=name)
    # The dropped sample is exactly the residual.
    assert torch.equal(outs[0][0], args[5][0].detach())
    weights = [torch.randn_like(r) for r in refs]
    sum(((o.float() if o.dtype != torch.float32 else o) * w.float()).sum() for o, w in zip(outs, weights)).backward()
    sum((r * w).sum() for r, w in zip(refs, weights)).backward()
    for name, a, a64 in zip(("u", "attn_weight", "attn_bias", "conv2_weight", "conv2_bias", "residual"),
                            args, args64):
        assert_close(a.grad, a64.grad, dtype=dtype, name=f"grad {name}")


def test_branch_scale_reference_is_drop_path(assert_close):
    """On "reference", the scaled tail is exactly what DropPath on the unscaled branch gives."""
    args = [a.detach() for a in _tail_inputs((4, 6, 2, 3, 3), (3, 3, 3), torch.float64, torch.device("cpu"))]
    scale = _scale(4, 0.8, torch.float64, "cpu")
    y = ops.local_mhra_tail(*args, branch_scale=scale, backend="reference")
    branch = ops.local_mhra_tail(*args[:5], None, backend="reference")
    assert torch.equal(y, args[5] + branch * scale.view(-1, 1, 1, 1, 1))


@pytest.mark.parametrize("bad,err,match", [
    (lambda B, u: [1.0] * B, TypeError, "branch_scale must be a torch.Tensor"),
    (lambda B, u: torch.ones(B, 1, dtype=u.dtype), ValueError, r"branch_scale must be 1-D of shape \(3,\)"),
    (lambda B, u: torch.ones(B + 1, dtype=u.dtype), ValueError, r"branch_scale must have shape \(3,\)"),
    (lambda B, u: torch.ones(B, dtype=torch.float64), TypeError, "branch_scale must have the dtype of u"),
    (lambda B, u: torch.ones(B, dtype=torch.int64), TypeError, "branch_scale must be float16"),
    (lambda B, u: torch.ones(B, dtype=u.dtype, requires_grad=True), ValueError, "must not require grad"),
])
@pytest.mark.parametrize("op", ("local_mhra_tail", "local_mhra_tail_bn_stats"))
def test_branch_scale_bad_input(op, bad, err, match):
    args = [a.detach() for a in _tail_inputs((3, 4, 1, 2, 2), (3, 3, 3), torch.float32, torch.device("cpu"))]
    with pytest.raises(err, match=match):
        getattr(ops, op)(*args, branch_scale=bad(3, args[0]))
    with pytest.raises(err, match=match):
        ops.backend_for(op, *args, branch_scale=bad(3, args[0]))


@needs_triton
def test_branch_scale_on_triton_by_name_checks_the_device():
    """A CUDA-less CPU run without the interpreter refuses the kernel by name, saying why, also
    when only the scale is given."""
    if INTERPRET:
        pytest.skip("the interpreter runs CPU tensors")
    args = [a.detach() for a in _tail_inputs((2, 4, 1, 2, 2), (3, 3, 3), torch.float32, torch.device("cpu"))]
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.local_mhra_tail(*args, branch_scale=torch.ones(2), backend="triton")


# --- the mask -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_drop_path_scale_is_drop_paths_mask(dtype):
    """Under one seed, drop_path_scale and DropPath drop the same samples and scale the rest by
    1 / keep, in the branch's dtype; nothing is drawn when inactive."""
    x = torch.randn(64, 3, 2, 2, 2, dtype=dtype)
    torch.manual_seed(5)
    scale = drop_path_scale(x, 0.3, True)
    torch.manual_seed(5)
    y = drop_path(x, 0.3, True)
    assert scale.shape == (64,) and scale.dtype == dtype
    assert set(scale.tolist()) == {0.0, torch.tensor(1 / 0.7, dtype=dtype).item()}
    assert torch.equal(y, x * scale.view(-1, 1, 1, 1, 1))
    state = torch.get_rng_state()
    assert drop_path_scale(x, 0.0, True) is None and drop_path_scale(x, 0.3, False) is None
    assert torch.equal(DropPath(0.3).eval()(x), x)
    assert torch.equal(torch.get_rng_state(), state)


# --- a CBlock and UniFormer-S in training ---------------------------------------------------------

class _Recorder:
    """Records each drawn drop-path scale and counts the tail kernel's launches (by variant)."""

    def __init__(self, monkeypatch):
        self.scales, self.launches = [], {"plain": 0, "stats": 0, "scaled": 0}
        draw = model_mod.drop_path_scale

        def record_draw(*args):
            s = draw(*args)
            self.scales.append(None if s is None else s.detach().double().clone())
            return s

        monkeypatch.setattr(model_mod, "drop_path_scale", record_draw)
        if HAS_TRITON:
            from uniformer_fast.kernels import local_mhra as K
            launch = K.local_mhra_tail_fwd

            def count_launch(u, taps, ab, w2t, b2, branch_scale, residual, kernel_size, stats=False):
                self.launches["stats" if stats else "plain"] += 1
                self.launches["scaled"] += branch_scale is not None
                return launch(u, taps, ab, w2t, b2, branch_scale, residual, kernel_size, stats)

            monkeypatch.setattr(K, "local_mhra_tail_fwd", count_launch)


def _same_draw(a, b):
    """Two recorded scales (float32 and float64 runs) drop the same samples and keep the others
    at the same 1 / keep (to float32 rounding), or are both None."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a > 0, b > 0) and torch.allclose(a, b, rtol=1e-7, atol=0)


def _train_step(module, x, backend, seed):
    """Forward and backward of a scalar loss under ``seed``; returns the output, the input's and
    every parameter's gradient and every buffer."""
    x = x.detach().requires_grad_()
    with ops.use_backend(backend):
        torch.manual_seed(seed)
        y = module(x)
        (y.square().mean() if y.dim() == 5 else y.logsumexp(-1).sum()).backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    return y.detach(), grads, {n: b.clone() for n, b in module.named_buffers()}


def _check_step(got, ref, assert_close, rtol):
    (y, grads, buffers), (y64, grads64, buffers64) = got, ref
    assert_close(y, y64, rtol=rtol, name="output")
    gscale = max(g.abs().max().item() for g in grads64.values())
    for name, g64 in grads64.items():
        g = grads[name]
        assert g is not None and torch.isfinite(g).all(), name
        err = (g.double() - g64).abs().max().item()
        assert err <= rtol * gscale, f"grad {name}: max abs error {err:.2e} > {rtol} x {gscale:.2e}"
    for name, b64 in buffers64.items():
        if b64.is_floating_point():
            assert_close(buffers[name], b64, rtol=rtol, name=name)
        else:
            assert torch.equal(buffers[name], b64), name


@pytest.mark.slow  # ~25 s each under the interpreter; the fast tier has the op's branch scale above
@pytest.mark.parametrize("p", (0.1, 0.3))
def test_cblock_training_with_drop_path(p, device, assert_close, monkeypatch):
    """One CBlock in training, drop path p: the fused path ("triton", float32) against the plain
    modules ("reference", float64) under the same seed: output, every gradient, running statistics,
    the same drawn mask, at least one sample dropped and one kept."""
    _skip_without_kernels(device)
    torch.manual_seed(0)
    blk = CBlock(16, drop_path=p).to(device).train()
    blk64 = copy.deepcopy(blk).double()
    x = make_x((8, 16, 2, 3, 4), torch.float32, "channels_last", device)
    seed = 2  # draws a mask with dropped and kept samples at both rates (asserted below)
    rec = _Recorder(monkeypatch)
    got = _train_step(blk, x, "triton", seed)
    assert rec.launches == {"plain": 0, "stats": 1, "scaled": 1}, rec.launches
    ref = _train_step(blk64, x.double(), "reference", seed)
    assert rec.launches["stats"] == 1, "the reference ran the kernel"
    fused_tail, _, ref_tail, _ = rec.scales  # the tail's and the MLP's draw, per run
    assert _same_draw(fused_tail, ref_tail), (fused_tail, ref_tail)
    assert 0.0 in fused_tail.tolist() and (fused_tail > 0).any(), fused_tail
    _check_step(got, ref, assert_close, rtol=1e-5)


@pytest.mark.slow  # UniFormer-S's training forward under the interpreter: ~40 s
def test_every_cblock_takes_the_fused_tail_in_training(device, monkeypatch):
    """The full UniFormer-S at the official rate 0.1, a training forward: each of its 7 CBlocks
    launches the tail kernel with the statistics epilogue; the 6 with drop_path > 0 pass their
    scale to it; no CBlock runs a separate depthwise convolution."""
    _skip_without_kernels(device)
    net = uf.create_model("uniformer_small", num_classes=7, drop_path_rate=0.1).to(device).train()
    rec = _Recorder(monkeypatch)
    dwconv_calls = []
    dwconv = ops.dwconv3d

    def count_dwconv(*args, **kwargs):
        dwconv_calls.append(args[0].shape)
        return dwconv(*args, **kwargs)

    monkeypatch.setattr(model_mod.ops, "dwconv3d", count_dwconv)
    with ops.use_backend("triton"):
        net(torch.randn(2, 3, 2, 32, 32, device=device))
    n_cblocks = len(net.blocks1) + len(net.blocks2)
    assert n_cblocks == 7
    assert rec.launches == {"plain": 0, "stats": n_cblocks, "scaled": n_cblocks - 1}, rec.launches
    assert dwconv_calls == [], dwconv_calls
