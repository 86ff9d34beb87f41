"""ONNX export (uniformer_fast.export_onnx, `uniformer-fast export`): the file runs in ONNX Runtime
(and OpenVINO where installed) with the PyTorch model's outputs, holds plain ONNX ops only, and
every bad argument is refused before anything is written.

Each export of even the tiny model below takes seconds (torch.export, decompositions, the ONNX
translation and optimizer), so the module shares its exports through module-scoped fixtures.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import uniformer_fast as uf
from uniformer_fast import model as model_module
from uniformer_fast import ops

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from helpers import TINY, run_cli  # noqa: E402  (TINY: every block type and op of the model, in seconds)

CLASSES, FRAMES, SIZE = 7, 4, 32  # size 32: the smallest the model takes (4 * 2**3)


def tiny_model(num_classes=CLASSES):
    """A tiny UniFormer with non-trivial BatchNorm statistics and affine parameters (fresh ones are
    the identity in eval mode, which would hide a fold or a wrong mode)."""
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def clip(batch):
    return torch.randn(batch, 3, FRAMES, SIZE, SIZE)


def session(path):
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def assert_runs_like(sess, model, x):
    """ONNX Runtime's logits for x equal the PyTorch model's (an eval-mode model, float32)."""
    assert not model.training
    with torch.no_grad():
        want = model(x).numpy()
    got = sess.run(["logits"], {"video": x.numpy()})[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """The tiny model, in training mode but for a frozen final BatchNorm, exported with a dynamic
    batch while the backend in force is "auto" (the C++/SDPA ops on the CPU, which no ONNX
    exporter can translate). Returns (model in eval mode, path, what export_onnx returned, whether
    each submodule's training mode after the export was the one before)."""
    model = tiny_model()
    model.norm.eval()
    before = [m.training for m in model.modules()]
    path = tmp_path_factory.mktemp("dynamic") / "tiny.onnx"
    with ops.use_backend("auto"):
        written = uf.export_onnx(model, path, frames=FRAMES, size=SIZE)
    restored = [m.training for m in model.modules()] == before
    return model.eval(), path, written, restored


@pytest.fixture(scope="module")
def static_fused_export(tmp_path_factory):
    """The tiny model fused for inference (eval mode), exported with a static batch."""
    model = tiny_model().eval().fuse_for_inference()
    path = tmp_path_factory.mktemp("static") / "tiny_fused.onnx"
    uf.export_onnx(model, str(path), frames=FRAMES, size=SIZE, dynamic_batch=False)
    return model, path


def test_returns_the_path_and_restores_training_mode(dynamic_export):
    _, path, written, restored = dynamic_export
    assert written == os.fspath(path) and os.path.isfile(written)
    assert restored
    assert os.listdir(path.parent) == [path.name]  # no temporary file left beside it


def test_onnxruntime_matches_pytorch_at_batch_1_and_3(dynamic_export):
    model, path, _, _ = dynamic_export
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("video", "tensor(float)", [3, FRAMES, SIZE, SIZE])
    assert isinstance(inp.shape[0], str)  # a named, dynamic batch dimension
    assert (out.name, out.shape) == ("logits", [inp.shape[0], CLASSES])
    for batch in (1, 3):
        assert_runs_like(sess, model, clip(batch))


def test_graph_is_plain_onnx(dynamic_export):
    _, path, _, _ = dynamic_export
    graph = onnx.load(os.fspath(path))
    onnx.checker.check_model(graph)
    assert {op.domain for op in graph.opset_import} <= {"", "ai.onnx"}
    assert [op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")] == [18]
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert not graph.functions  # no local functions standing in for custom ops
    assert {"Conv", "Softmax", "MatMul"} <= {node.op_type for node in graph.graph.node}
    # No trace of the exporting machine: the exporter's per-node Python stacks are dropped.
    assert not any(node.metadata_props for node in graph.graph.node)
    assert os.path.dirname(uf.__file__).encode() not in path.read_bytes()


def test_static_batch_runs_batch_1_and_rejects_batch_3(static_fused_export):
    model, path = static_fused_export
    sess = session(path)
    assert sess.get_inputs()[0].shape == [1, 3, FRAMES, SIZE, SIZE]
    assert_runs_like(sess, model, clip(1))
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
        sess.run(["logits"], {"video": clip(3).numpy()})


def test_fused_model_exports_and_stays_in_eval_mode(static_fused_export):
    model, path = static_fused_export
    assert not model.training and model.fused_for_inference
    # Stage 1-2's BatchNorms are folded away; only the final norm is left.
    assert [n.op_type for n in onnx.load(os.fspath(path)).graph.node].count("BatchNormalization") == 1
    unfused = tiny_model().eval()
    x = clip(1)
    with torch.no_grad():
        want = unfused(x).numpy()
    np.testing.assert_allclose(session(path).run(["logits"], {"video": x.numpy()})[0], want, rtol=1e-4, atol=1e-5)


def test_openvino_reads_the_file(dynamic_export):
    ov = pytest.importorskip("openvino")
    model, path, _, _ = dynamic_export
    compiled = ov.Core().compile_model(os.fspath(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = clip(3)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(compiled(x.numpy())[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(model=nn.Linear(2, 2)), TypeError, "model must be a uniformer_fast.UniFormer"),
    (dict(model="bfloat16"), TypeError, "model must be float32 to export .* bfloat16"),
    (dict(path=123), TypeError, "path must be a str or os.PathLike"),
    (dict(path=b"tiny.onnx"), TypeError, "path must be a str or os.PathLike"),
    (dict(path="missing/tiny.onnx"), FileNotFoundError, "path .*missing/tiny.onnx.*: its directory .* does not exist"),
    (dict(path="."), ValueError, "path .* is a directory"),
    (dict(frames=0), ValueError, "frames must be a positive int"),
    (dict(frames=4.0), ValueError, "frames must be a positive int"),
    (dict(frames=True), ValueError, "frames must be a positive int"),
    (dict(size=31), ValueError, "size must be an int >= 32"),
    (dict(size="64"), ValueError, "size must be an int >= 32"),
    (dict(dynamic_batch=1), TypeError, "dynamic_batch must be True or False"),
    (dict(opset=17), ValueError, "opset must be an int from 18 to 23; got 17"),
    (dict(opset=24), ValueError, "opset must be an int from 18 to 23; got 24"),
])
def test_bad_arguments_name_themselves(change, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = dict(model=tiny_model(), path="tiny.onnx", frames=FRAMES, size=SIZE)
    kwargs.update(change)
    if kwargs["model"] == "bfloat16":
        kwargs["model"] = tiny_model().to(torch.bfloat16)
    with pytest.raises(error, match=match):
        uf.export_onnx(**kwargs)
    assert os.listdir(tmp_path) == []


def test_missing_exporter_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript fails
    with pytest.raises(ImportError, match=r'onnxscript package .*pip install "uniformer_fast\[export\]"'):
        uf.export_onnx(tiny_model(), tmp_path / "tiny.onnx", frames=FRAMES, size=SIZE)
    assert os.listdir(tmp_path) == []


# --- the CLI ---------------------------------------------------------------------------------

@pytest.fixture
def tiny_weights(tmp_path, monkeypatch):
    """A plain state dict of the tiny model, and the model, under the model name "tiny" (which
    the CLI's --model takes for this test only)."""
    monkeypatch.setitem(model_module._CONFIGS, "tiny", TINY)
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    return tmp_path / "tiny.pth", model


def test_cli_export_writes_a_loadable_file(tiny_weights, tmp_path, capsys):
    weights, model = tiny_weights
    out = tmp_path / "tiny.onnx"
    # --static-batch: a static export takes about half the time of a dynamic one.
    code, stdout, err = run_cli(["export", "--model", "tiny", "--weights", str(weights), "--out", str(out),
                                 "--frames", str(FRAMES), "--size", str(SIZE), "--opset", "19", "--static-batch"],
                                capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout and f"(1, 3, {FRAMES}, {SIZE}, {SIZE})" in stdout
    graph = onnx.load(os.fspath(out))
    onnx.checker.check_model(graph)
    assert [op.version for op in graph.opset_import] == [19]
    sess = session(out)
    assert sess.get_inputs()[0].shape == [1, 3, FRAMES, SIZE, SIZE]
    assert_runs_like(sess, model.eval(), clip(1))  # the weights' 7 classes, from the weights' head


def test_cli_export_errors(tiny_weights, tmp_path, capsys):
    weights, _ = tiny_weights
    out = str(tmp_path / "tiny.onnx")
    cases = [
        (["--weights", str(tmp_path / "nope.pth"), "--out", out], 1, "checkpoint file not found"),
        (["--weights", str(weights), "--out", out, "--num-classes", "5"], 1, "classifies 7 classes but --num-classes is 5"),
        (["--weights", str(weights), "--out", str(tmp_path / "no" / "tiny.onnx")], 1, "does not exist"),
        (["--weights", str(weights), "--out", out, "--opset", "17"], 2, "argument --opset: invalid choice: 17"),
        (["--weights", str(weights), "--out", out, "--size", "16"], 2, "argument --size: expected an integer >= 32"),
        (["--weights", str(weights)], 2, "required: --out"),
    ]
    for args, want_code, match in cases:
        code, _, err = run_cli(["export", "--model", "tiny", *args], capsys)
        assert code == want_code, (args, err)
        assert match in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("uniformer-fast: error:")]) == 1, err
    assert not os.path.exists(out)
