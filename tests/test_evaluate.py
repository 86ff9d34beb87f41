"""Dataset-scale inference: ``evaluation.evaluate`` / ``extract`` and their CLI commands, on
generated videos whose frames carry their own index, against the model run by hand."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.apps.evaluate import evaluate
from uniformer_fast.apps.extract import extract
from uniformer_fast.data.lists import VideoItem, find_videos, read_video_list
from uniformer_fast.data.video import VideoReader, load_views, to_views, window_indices

pytest.importorskip("av")
import helpers  # noqa: E402
from helpers import run_cli, write_id_video  # noqa: E402

TINY = dict(helpers.TINY, num_classes=5)
CLIP = dict(num_frames=4, sample_rate=2, size=32)
LENGTHS = (3, 9, 17, 30, 41, 64)  # shorter than a clip, about one, several


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six labelled videos, a damaged one and a missing one, in a space-separated list."""
    root = tmp_path_factory.mktemp("videos")
    lines = []
    for k, n in enumerate(LENGTHS):
        write_id_video(root / f"v{k}.mp4", n, h=40, w=56)
        lines.append(f"v{k}.mp4 {k % 3}")
    (root / "damaged.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    lines += ["damaged.mp4 1", "missing.mp4 2"]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return uf.UniFormer(**TINY).eval()


def by_hand(model, root, views, crops, ensemble="softmax", protocol="kinetics"):
    """Per readable video: the mean over its views of the model's softmax (or logits)."""
    out = []
    with torch.no_grad():
        for k in range(len(LENGTHS)):
            x = load_views(root / f"v{k}.mp4", CLIP["num_frames"], CLIP["sample_rate"], views, crops,
                           CLIP["size"], protocol=protocol)
            assert x.shape == (views * crops, 3, CLIP["num_frames"], CLIP["size"], CLIP["size"])
            logits = model(x)
            out.append((logits.softmax(-1) if ensemble == "softmax" else logits).mean(0))
    return torch.stack(out)


def accuracies(scores, labels):
    top5 = scores.topk(5).indices
    hit1 = top5[:, 0] == labels
    per_class = [hit1[labels == c].float().mean().item() for c in labels.unique()]
    return hit1.float().mean().item(), (top5 == labels[:, None]).any(1).float().mean().item(), sum(per_class) / len(per_class)


@pytest.mark.parametrize("views,crops,ensemble,workers,batch", [
    (2, 1, "softmax", 0, 3),   # a video's clips split across batches
    (3, 3, "logits", 0, 4),
    (1, 3, "softmax", 2, 8),   # decoding in two worker processes
])
def test_evaluate_equals_the_model_by_hand(dataset, model, views, crops, ensemble, workers, batch, capsys):
    result = evaluate(model, dataset / "list.txt", root=str(dataset), views=views, crops=crops, ensemble=ensemble,
                      batch_size=batch, workers=workers, progress=False, **CLIP)
    expected = by_hand(model, dataset, views, crops, ensemble)
    labels = torch.tensor([k % 3 for k in range(len(LENGTHS))])
    assert [p.video for p in result.predictions] == [f"v{k}.mp4" for k in range(len(LENGTHS))]
    for p, e in zip(result.predictions, expected):
        values, classes = e.topk(5)
        assert p.classes == classes.tolist()
        torch.testing.assert_close(torch.tensor(p.scores), values, rtol=1e-5, atol=1e-6)
    top1, top5, mean_class = accuracies(expected, labels)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)
    assert result.mean_class_accuracy == pytest.approx(mean_class)
    # The damaged and the missing file are reported, named, and skipped; the rest is scored.
    assert [k for k, _ in result.failed] == ["damaged.mp4", "missing.mp4"] or \
        sorted(k for k, _ in result.failed) == ["damaged.mp4", "missing.mp4"]
    errors = dict(result.failed)
    assert "VideoDecodeError" in errors["damaged.mp4"] and "damaged.mp4" in errors["damaged.mp4"]
    assert "FileNotFoundError" in errors["missing.mp4"]
    assert result.stats.videos == len(LENGTHS) and result.stats.clips == len(LENGTHS) * views * crops
    err = capsys.readouterr().err
    assert "skipped damaged.mp4" in err and "skipped missing.mp4" in err


def test_evaluate_writes_and_resumes(dataset, model, tmp_path):
    out = tmp_path / "eval"
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = evaluate(model, dataset / "list.txt", root=str(dataset), views=2, batch_size=2, out_dir=out,
                        progress=False, **CLIP)
        assert len(calls) == len(LENGTHS)  # 2 clips per video, 2 per batch
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        assert [r["video"] for r in rows] == [f"v{k}.mp4" for k in range(len(LENGTHS))]
        assert [int(r["class1"]) for r in rows] == [p.classes[0] for p in full.predictions]
        assert [r["video"] for r in csv.DictReader(open(out / "failed.csv"))] == ["damaged.mp4", "missing.mp4"]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["top1"] == full.top1 and metrics["scored"] == len(LENGTHS) and metrics["failed"] == 2

        # An interrupted run: a model that stops after two batches (KeyboardInterrupt, as Ctrl-C).
        out2 = tmp_path / "eval2"
        stop = model.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) > 2 else None)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, dataset / "list.txt", root=str(dataset), views=2, batch_size=2, out_dir=out2,
                     progress=False, **CLIP)
        stop.remove()
        kept = [r["video"] for r in csv.DictReader(open(out2 / "predictions.csv"))]
        assert kept == ["v0.mp4", "v1.mp4"]
        with open(out2 / "predictions.csv", "a") as f:
            f.write("v2.mp4,2,1,0.5")  # a line torn by the interruption
        calls.clear()
        resumed = evaluate(model, dataset / "list.txt", root=str(dataset), views=2, batch_size=2, out_dir=out2,
                           progress=False, **CLIP)
        assert len(calls) == len(LENGTHS) - 2  # the finished videos are not redone
        assert resumed.stats.videos == len(LENGTHS) - 2
        assert [(p.video, p.classes) for p in resumed.predictions] == [(p.video, p.classes) for p in full.predictions]
        assert resumed.top1 == full.top1 and resumed.top5 == full.top5
        assert (out2 / "predictions.csv").read_text() == (out / "predictions.csv").read_text()
    finally:
        handle.remove()
    # Other settings in the same directory: refused, naming what changed.
    with pytest.raises(ValueError, match=r"other settings \(views 2 -> 3\)"):
        evaluate(model, dataset / "list.txt", root=str(dataset), views=3, out_dir=out, progress=False, **CLIP)


def test_evaluate_something_something(dataset, model, tmp_path):
    # 'path num_frames label' lines and the segment sampler; one crop is the first one there.
    lst = tmp_path / "sth.txt"
    lst.write_text("".join(f"{dataset / f'v{k}.mp4'} {n} {k % 3}\n" for k, n in enumerate(LENGTHS)))
    result = evaluate(model, lst, views=2, crops=1, protocol="sth", progress=False, **CLIP)
    expected = by_hand(model, dataset, 2, 1, protocol="sth")
    assert [p.classes for p in result.predictions] == expected.topk(5).indices.tolist()
    assert not result.failed


def test_evaluate_rejects_bad_input(dataset, model, tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("v0.mp4 7\n")
    with pytest.raises(ValueError, match="label 7 outside the model's 5 classes"):
        evaluate(model, lst, root=str(dataset), progress=False, **CLIP)
    for kwargs, match in [(dict(crops=2), "crops: expected 1 or 3"), (dict(views=0), "views: expected an integer >= 1"),
                          (dict(protocol="ucf"), "protocol: expected one of"), (dict(ensemble="max"), "ensemble"),
                          (dict(precision="fp8"), "precision: expected one of"), (dict(workers=-1), "workers")]:
        with pytest.raises(ValueError, match=match):
            evaluate(model, [("v0.mp4", 0)], root=str(dataset), progress=False, **{**CLIP, **kwargs})
    with pytest.raises(ValueError, match="listed twice"):
        evaluate(model, [("v0.mp4", 0), ("v0.mp4", 1)], root=str(dataset), progress=False, **CLIP)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        evaluate("model", [("v0.mp4", 0)], progress=False)
    with pytest.raises(ValueError, match="no classifier head"):
        evaluate(uf.UniFormer(**{**TINY, "num_classes": 0}), [("v0.mp4", 0)], root=str(dataset), progress=False)


@pytest.mark.parametrize("text,expected", [
    ("a/b.mp4 3\n", [("a/b.mp4", 3, None)]),
    ("a/b.mp4,3\n\nc.mp4,0\n", [("a/b.mp4", 3, None), ("c.mp4", 0, None)]),   # the official ',' separator
    ("my clip.mp4 2\n", [("my clip.mp4", 2, None)]),                          # a space in the path
    ("12345 48 17\n", [("12345", 17, 48)]),                                   # Something-Something
])
def test_read_video_list(tmp_path, text, expected):
    lst = tmp_path / "list.csv"
    lst.write_text(text)
    items = read_video_list(lst, root="/data")
    assert [(i.key, i.label, i.num_frames) for i in items] == expected
    assert all(i.path == os.path.join("/data", i.key) for i in items)


@pytest.mark.parametrize("text,match", [("a.mp4 x\n", r"list.txt:1: expected 'path label'"),
                                        ("a.mp4 1\nb.mp4 -2\n", r"list.txt:2: a label must be >= 0"),
                                        ("\n", "no videos listed")])
def test_read_video_list_errors(tmp_path, text, match):
    lst = tmp_path / "list.txt"
    lst.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_video_list(lst)
    with pytest.raises(FileNotFoundError, match="video list not found"):
        read_video_list(tmp_path / "none.txt")


def windows_by_hand(model, path, window, stride, sample_rate, size):
    with VideoReader(path) as reader:
        idx = window_indices(len(reader), window, stride, sample_rate)
        clips = torch.stack([to_views(reader.get_frames(w), size, 1)[0] for w in idx])
    with torch.no_grad():
        fmap = model.forward_features(clips)
    return idx, fmap, fmap.flatten(2).mean(-1)


@pytest.mark.parametrize("workers,batch", [(0, 3), (2, 2)])
def test_extract_equals_forward_features_pooled(dataset, model, tmp_path, workers, batch):
    out = tmp_path / "features"
    result = extract(model, dataset, out, window=4, stride=2, sample_rate=2, size=32, batch_size=batch,
                     workers=workers, feature_map=True, progress=False)
    assert sorted(result.written) == [f"v{k}.mp4" for k in range(len(LENGTHS))]
    assert [k for k, _ in result.failed] == ["damaged.mp4"]
    for k, n in enumerate(LENGTHS):
        idx, fmap, pooled = windows_by_hand(model, dataset / f"v{k}.mp4", 4, 2, 2, 32)
        got = np.load(out / f"v{k}.npy")
        assert got.dtype == np.float32 and got.shape == (idx.shape[0], 64)
        torch.testing.assert_close(torch.from_numpy(got), pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(np.load(out / f"v{k}.map.npy")), fmap, rtol=1e-5, atol=1e-6)
        info = json.loads((out / f"v{k}.json").read_text())
        assert info["start_frames"] == idx[:, 0].tolist() and info["num_frames"] == n
        assert info["start_times"] == pytest.approx([s / 25 for s in info["start_frames"]])
    assert not list(out.glob("*.tmp"))
    # A rerun skips what is done; a removed result is redone.
    (out / "v2.json").unlink()
    again = extract(model, dataset, out, window=4, stride=2, sample_rate=2, size=32, progress=False)
    assert list(again.written) == ["v2.mp4"] and len(again.skipped) == len(LENGTHS) - 1


def test_find_videos(dataset, tmp_path):
    items = find_videos(dataset)
    assert [i.key for i in items] == ["damaged.mp4"] + [f"v{k}.mp4" for k in range(len(LENGTHS))]
    assert find_videos(dataset / "v1.mp4") == [VideoItem("v1.mp4", str(dataset / "v1.mp4"))]
    assert [i.key for i in find_videos(dataset / "list.txt")][:2] == ["v0.mp4", "v1.mp4"]
    with pytest.raises(ValueError, match="no videos"):
        find_videos(tmp_path)
    with pytest.raises(FileNotFoundError):
        find_videos(tmp_path / "nothing")


def test_cli_evaluate_and_extract(dataset, model, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    big = uf.uniformer_small(num_classes=5)
    torch.save({"model": big.state_dict()}, weights)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "eval"
    code, stdout, err = run_cli(["evaluate", str(dataset / "list.txt"), "--weights", str(weights), "--labels", str(names),
                                 "--frames", "4", "--sample-rate", "2", "--views", "2", "--size", "32", "--workers", "0",
                                 "--device", "cpu", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    result = evaluate(big, dataset / "list.txt", root=str(dataset), views=2, progress=False, **CLIP)
    assert f"top-1 {result.top1 * 100:.2f}%" in stdout and "2 unreadable" in stdout
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["name1"] for r in rows] == ["abcde"[p.classes[0]] for p in result.predictions]
    assert "unreadable: damaged.mp4" in err
    code, stdout, err = run_cli(["extract", str(dataset / "v3.mp4"), "--weights", str(weights), "--window", "4",
                                 "--stride", "4", "--sample-rate", "2", "--size", "32", "--workers", "0", "--device",
                                 "cpu", "--out", str(tmp_path / "f"), "--quiet"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "f" / "v3.npy").shape == (window_indices(LENGTHS[3], 4, 4, 2).shape[0], 512)
    # Errors: one line, non-zero.
    for args, match in [(["evaluate", str(tmp_path / "none.txt"), "--weights", str(weights)], "video list not found"),
                        (["evaluate", str(dataset / "list.txt"), "--weights", str(weights), "--crops", "2"], "invalid choice"),
                        (["extract", str(dataset), "--weights", str(weights)], "required: --out")]:
        code, stdout, err = run_cli(args + ["--quiet"] if args[0] == "evaluate" else args, capsys)
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err


def test_extract_drops_a_video_that_fails_midway(dataset, model, tmp_path, monkeypatch):
    # The longest video's third read fails (damaged data surfacing mid-decode): its chunks already
    # queued for the model are dropped, nothing of it is written, the others are complete.
    real = VideoReader.get_frames
    reads = {}

    def flaky(self, indices):
        if self.path.endswith("v5.mp4"):
            reads["n"] = reads.get("n", 0) + 1
            if reads["n"] == 3:
                from uniformer_fast.data.video import VideoDecodeError
                raise VideoDecodeError(f"{self.path!r}: frame 40 could not be decoded")
        return real(self, indices)

    monkeypatch.setattr(VideoReader, "get_frames", flaky)
    out = tmp_path / "features"
    result = extract(model, dataset, out, window=4, stride=1, sample_rate=2, size=32, batch_size=5, workers=0,
                     feature_map=True, progress=False)
    assert dict(result.failed).keys() == {"damaged.mp4", "v5.mp4"}
    assert "frame 40 could not be decoded" in dict(result.failed)["v5.mp4"]
    assert sorted(result.written) == [f"v{k}.mp4" for k in range(len(LENGTHS) - 1)]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("v5")) == []
    idx, _, pooled = windows_by_hand(model, dataset / "v4.mp4", 4, 1, 2, 32)
    torch.testing.assert_close(torch.from_numpy(np.load(out / "v4.npy")), pooled, rtol=1e-5, atol=1e-6)
