import subprocess
import sys

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.data.video import preprocess, sample_indices

from helpers import needs_triton, run_cli

FAST = ["--frames", "2", "--size", "32", "--iters", "1", "--warmup", "0", "--device", "cpu"]


def _bench_rows(capsys):
    code, out, err = run_cli(["bench", *FAST, "--backends", "official,reference,auto,triton"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["backend", "latency"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"official", "reference", "auto", "triton"}
    for name in ("official", "reference", "auto"):
        assert " ms " in rows[name] and "MiB" in rows[name]
    assert rows["reference"].rstrip().endswith("0.00e+00")
    assert float(rows["official"].split()[-1]) < 1e-4  # the official computation, same weights
    return rows


def test_bench_prints_every_row(capsys, monkeypatch):
    """Without the interpreter the triton row cannot run on CPU tensors: it says why, and the
    other rows are measured."""
    import uniformer_fast.kernels as kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
    rows = _bench_rows(capsys)
    assert "skipped" in rows["triton"] and "TRITON_INTERPRET" in rows["triton"], rows["triton"]


@pytest.mark.slow  # UniFormer-S under Triton's interpreter: about a minute
@needs_triton
def test_bench_runs_the_triton_row(capsys):
    rows = _bench_rows(capsys)
    assert " ms " in rows["triton"] and float(rows["triton"].split()[-1]) < 1e-4, rows["triton"]


def test_bench_is_the_default_command(capsys):
    code, out, _ = run_cli([*FAST, "--backends", "reference"], capsys)
    assert code == 0 and out.splitlines()[1].startswith("reference")


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "uniformer_fast", "bench", *FAST, "--backends", "reference"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "reference" in proc.stdout


@pytest.mark.parametrize("args,code,match", [
    (["bench", "--backends", "fast"], 2, "--backends: unknown fast"),
    (["bench", "--frames", "x"], 2, "invalid int value: 'x'"),
    (["bench", "--model", "uniformer_huge"], 2, "invalid choice: 'uniformer_huge'"),
    (["bench", "--size", "8"], 2, "argument --size: expected an integer >= 32; got 8"),
    # Each numeric option is checked while parsing, before any work: 0 iterations is an error,
    # not the default count.
    (["bench", "--iters", "0"], 2, "argument --iters: expected an integer >= 1; got 0"),
    (["bench", "--warmup", "-1"], 2, "argument --warmup: expected an integer >= 0; got -1"),
    (["bench", "--frames", "0"], 2, "argument --frames: expected an integer >= 1; got 0"),
    (["bench", "--batch", "-2"], 2, "argument --batch: expected an integer >= 1; got -2"),
    (["bench", "--iters", "1.5"], 2, "argument --iters: invalid int value: '1.5'"),
    (["classify", "v.mp4", "--weights", "w.pth", "--labels", "l.txt", "--top", "0"], 2,
     "argument --top: expected an integer >= 1; got 0"),
    (["classify", "v.mp4", "--weights", "w.pth", "--labels", "l.txt", "--frames", "0"], 2,
     "argument --frames: expected an integer >= 1; got 0"),
    (["classify", "v.mp4", "--weights", "w.pth", "--labels", "l.txt", "--sample-rate", "0"], 2,
     "argument --sample-rate: expected an integer >= 1; got 0"),
    (["classify", "v.mp4", "--weights", "w.pth", "--labels", "l.txt", "--size", "31"], 2,
     "argument --size: expected an integer >= 32; got 31"),
    (["classify", "clip.mp4"], 2, "required: --weights"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_get_one_line(args, code, match, capsys):
    got, out, err = run_cli(args, capsys)
    assert got == code
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err


def write_video(path, frames=12, h=48, w=64):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = torch.zeros(h, w, 3, dtype=torch.uint8)
            img[:, : (i + 1) * w // frames] = torch.tensor([200, 30, 90], dtype=torch.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.numpy(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def classify_files(tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(6)) + "\n")
    torch.manual_seed(0)
    model = uf.uniformer_small(num_classes=6)
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    return video, tmp_path / "w.pth", labels, model


def test_classify_prints_top5(classify_files, capsys):
    video, weights, labels, model = classify_files
    code, out, err = run_cli(["classify", str(video), "--weights", str(weights), "--labels", str(labels),
                              "--frames", "4", "--size", "64", "--sample-rate", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 5
    probs = [float(line.split("%")[0]) for line in lines]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    # The same numbers as running the model by hand on the same preprocessed clip.
    from uniformer_fast.data.video import load_clip
    with torch.no_grad():
        expected = model.eval()(load_clip(str(video), 4, 2, 64)[None]).softmax(-1)[0]
    top = expected.topk(5)
    assert [line.split(None, 1)[1] for line in lines] == [f"class {i}" for i in top.indices.tolist()]
    assert probs == pytest.approx([round(p * 100, 2) for p in top.values.tolist()], abs=0.01)


def test_classify_error_paths(classify_files, tmp_path, capsys):
    video, weights, labels, _ = classify_files
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    five = tmp_path / "five.txt"
    five.write_text("a\nb\nc\nd\ne\n")
    cases = [
        ([str(tmp_path / "missing.mp4"), "--weights", str(weights), "--labels", str(labels)], "video file not found"),
        ([str(garbage), "--weights", str(weights), "--labels", str(labels)], "cannot decode"),
        ([str(video), "--weights", str(tmp_path / "nope.pth"), "--labels", str(labels)], "checkpoint file not found"),
        ([str(video), "--weights", str(labels), "--labels", str(labels)], "not a checkpoint"),
        ([str(video), "--weights", str(weights), "--labels", str(five)], "classifies 6 classes but"),
        ([str(video), "--weights", str(weights), "--labels", str(tmp_path / "x.txt")], "labels file not found"),
    ]
    for args, match in cases:
        code, out, err = run_cli(["classify", *args, "--frames", "4", "--size", "64"], capsys)
        assert code == 1, (args, err)
        assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err, err


@pytest.mark.parametrize("name,content,match", [
    ("labels.txt", b"\xff\xfeclass 0\n", "not UTF-8 text"),
    ("labels.json", b'["a", "b",', "not valid JSON"),
    ("labels.json", b"", "not valid JSON"),
    ("labels.json", b"[]", "no class names"),
    ("labels.json", b'{"a": 0, "b": true}', "distinct index 0..1"),
    ("labels.json", b'["a", 2]', "expected a JSON list of class names"),
    ("labels.txt", b"\n  \n", "no class names"),
    ("labels.txt", b"a\nb\n", "names 2"),  # 6 classes in the weights
])
def test_every_labels_file_error_names_it(name, content, match, classify_files, tmp_path, capsys):
    video, weights, _, _ = classify_files
    labels = tmp_path / "bad" / name
    labels.parent.mkdir()
    labels.write_bytes(content)
    code, out, err = run_cli(["classify", str(video), "--weights", str(weights), "--labels", str(labels),
                              "--frames", "4", "--size", "64"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(labels) in err and match in err, err


def test_json_label_maps(tmp_path, classify_files, capsys):
    video, weights, _, _ = classify_files
    mapping = tmp_path / "map.json"
    mapping.write_text('{"c": 2, "a": 0, "b": 1, "f": 5, "e": 4, "d": 3}')
    code, out, err = run_cli(["classify", str(video), "--weights", str(weights), "--labels", str(mapping),
                              "--frames", "4", "--size", "64", "--top", "6"], capsys)
    assert code == 0, err
    assert sorted(line.split()[-1] for line in out.splitlines()) == list("abcdef")


def test_sampling_and_preprocessing():
    assert sample_indices(100, 4, 8).tolist() == [37, 45, 53, 61]  # centred: (100 - 25) // 2 = 37
    assert sample_indices(5, 4, 4).tolist() == [0, 4, 4, 4]  # clamped on short videos
    frames = torch.full((3, 60, 80, 3), 255, dtype=torch.uint8)
    clip = preprocess(frames, 32)
    assert clip.shape == (3, 3, 32, 32)
    assert torch.allclose(clip, torch.full_like(clip, (1 - 0.45) / 0.225), atol=1e-5)
