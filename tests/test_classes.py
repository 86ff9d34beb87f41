"""Class names in the official checkpoints' order: the shipped lists, where the package uses them."""
import csv
import os

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.data.classes import dataset_of

from helpers import run_cli
from test_cli import write_video


@pytest.mark.parametrize("dataset, count, first, last", [
    ("k400", 400, "riding a bike", "playing badminton"),
    ("k600", 600, "feeding fish", "playing organ"),
    ("sthv2", 174, "Approaching something with your camera", "Wiping something off of something"),
    ("ssv2", 174, "Approaching something with your camera", "Wiping something off of something"),
    (" K400 ", 400, "riding a bike", "playing badminton"),
])
def test_counts_ends_and_uniqueness(dataset, count, first, last):
    names = uf.class_names(dataset)
    assert len(names) == count == len(set(names))
    assert (names[0], names[-1]) == (first, last)
    assert all(n == n.strip() and n for n in names)


def test_kinetics_order_is_the_official_one_not_alphabetical():
    k400 = uf.class_names("k400")
    # The official data_list/k400/kinetics_400_categroies.txt: an A-Z list scores near chance.
    assert k400[:4] == ["riding a bike", "marching", "dodgeball", "playing cymbals"]
    assert k400 != sorted(k400) and {"abseiling", "zumba"} <= set(k400)
    k600 = uf.class_names("k600")
    assert k600[:3] == ["feeding fish", "poking bellybutton", "sword swallowing"]
    # Spelled as the Kinetics annotations spell them, not as the official lists' folder names.
    assert "petting animal (not cat)" in k600 and "massaging person's head" in k600
    assert set(k400) - set(k600) and len(set(k400) & set(k600)) > 350  # K600 renamed a few K400 classes


def test_something_something_v2_follows_the_labels_json_index():
    names = uf.class_names("sthv2")
    # The official split files' labels: validation videos 74225 and 116154 (their templates below).
    assert names[140] == "Spinning something that quickly stops spinning"
    assert names[127] == "Showing something on top of something"
    assert names == sorted(names)  # the labels file's keys, A-Z, brackets removed
    assert not any("[" in n for n in names)


def test_a_fresh_list_each_call():
    names = uf.class_names("k400")
    names[0] = "changed"
    assert uf.class_names("k400")[0] == "riding a bike"


@pytest.mark.parametrize("bad, error, match", [
    ("k700", ValueError, "known: k400, k600, sthv2, ssv2"),
    ("", ValueError, "unknown ''"),
    ("kinetics", ValueError, "unknown 'kinetics'"),
    (400, TypeError, "expected a dataset name"),
    (None, TypeError, "got NoneType"),
])
def test_unknown_dataset(bad, error, match):
    with pytest.raises(error, match=match):
        uf.class_names(bad)


@pytest.mark.parametrize("name, classes, expected", [
    ("uniformer_small_k400_16x8.pth", 400, "k400"),
    ("/ckpt/uniformer_base_k600_32x4.safetensors", 600, "k600"),
    ("uniformer_small_sthv2_prek400.pth", 174, "sthv2"),
    ("uniformer_small_ssv2_16x1.pth", None, "ssv2"),
    ("uniformer_small_k400_16x8.pth", 10, None),  # a fine-tuned head: its names are not k400's
    ("my_k400x.pth", 400, None),  # only between separators
    ("weights.pth", 400, None),
    (None, 400, None),
])
def test_dataset_of_a_file_name(name, classes, expected):
    assert dataset_of(name, classes) == expected


def _tiny(num_classes=400, **kw):
    return uf.create_model("uniformer_small", depth=(1, 1, 1, 1), num_classes=num_classes, **kw)


def test_load_checkpoint_and_create_model_set_the_names(tmp_path):
    sd = _tiny().state_dict()
    named = tmp_path / "uniformer_small_k400_16x8.pth"
    torch.save(sd, named)
    model = _tiny()
    assert model.class_names is None
    uf.load_checkpoint(model, str(named))
    assert model.class_names == uf.class_names("k400")
    built = uf.create_model("uniformer_small", depth=(1, 1, 1, 1), pretrained=str(named))
    assert built.class_names == uf.class_names("k400")
    # Another file name, or a state dict, leaves the names as they were.
    plain = tmp_path / "weights.pth"
    torch.save(sd, plain)
    other = _tiny()
    uf.load_checkpoint(other, str(plain))
    assert other.class_names is None
    uf.load_checkpoint(model, sd)
    assert model.class_names == uf.class_names("k400")
    # A head dropped (another class count) or replaced takes its names away.
    with pytest.warns(UserWarning, match="head does not match"):
        uf.load_checkpoint(model, _tiny(num_classes=7).state_dict())
    assert model.class_names is None
    model.class_names = uf.class_names("k400")
    model.reset_classifier(3)
    assert model.class_names is None


def test_evaluate_names_predictions_by_default(tmp_path):
    torch.manual_seed(0)
    video = tmp_path / "a.mp4"
    write_video(video, frames=8, h=48, w=64)
    model = _tiny(num_classes=174)
    model.class_names = uf.class_names("sthv2")
    result = uf.evaluate(model, [(str(video), 3)], num_frames=4, sample_rate=1, views=1, size=32,
                         out_dir=tmp_path / "eval", progress=False, workers=0)
    assert len(result.predictions) == 1
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    names = uf.class_names("sthv2")
    top = result.predictions[0].classes
    assert [row[f"name{k + 1}"] for k in range(5)] == [names[c] for c in top]


def test_classify_names_classes_from_the_weights_file_name(tmp_path, capsys):
    torch.manual_seed(0)
    video = tmp_path / "clip.mp4"
    write_video(video)
    model = uf.uniformer_small(num_classes=600)
    weights = tmp_path / "uniformer_small_k600_16x4.pth"
    torch.save({"model": model.state_dict()}, weights)
    args = ["classify", str(video), "--weights", str(weights), "--frames", "4", "--size", "64",
            "--sample-rate", "2", "--device", "cpu"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    k600 = set(uf.class_names("k600"))
    lines = out.strip().splitlines()
    assert len(lines) == 5 and all(line.split(None, 1)[1] in k600 for line in lines), out
    # --labels by dataset name gives the same; a file without a dataset name gives indices and says why.
    code, out2, err = run_cli(args + ["--labels", "k600"], capsys)
    assert code == 0 and out2 == out, err
    os.rename(weights, tmp_path / "finetuned.pth")
    args[3] = str(tmp_path / "finetuned.pth")
    code, out3, err = run_cli(args, capsys)
    assert code == 0 and "no class names" in err and "--labels" in err
    assert [line.split(None, 1)[1] for line in out3.strip().splitlines()][0].startswith("class ")
    code, _, err = run_cli(args + ["--labels", "k400"], capsys)
    assert code == 1 and "classifies 600 classes but k400 names 400" in err
