"""Files the package writes survive interruptions; files it reads fail with an error naming them."""
import io
import os

import pytest
import torch

from uniformer_fast.files import atomic_save, atomic_write

REAL_SAVE = torch.save


def cut_short(error):
    """A torch.save that writes half of its bytes to ``f`` and then raises ``error``."""
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        REAL_SAVE(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise error
    return save


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device"),
                                   RuntimeError("a bug")], ids=lambda e: type(e).__name__)
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pth"
    old = {"w": torch.randn(64, 64), "epoch": 3}
    atomic_save(old, path)
    monkeypatch.setattr(torch, "save", cut_short(error))
    with pytest.raises(type(error)):
        atomic_save({"w": torch.zeros(64, 64), "epoch": 4}, path)
    got = torch.load(path, weights_only=True)
    assert got["epoch"] == 3 and torch.equal(got["w"], old["w"])
    assert os.listdir(tmp_path) == ["last.pth"]  # the temporary file is gone


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", cut_short(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.ones(3)}, tmp_path / "new.pth")
    assert os.listdir(tmp_path) == []


def test_atomic_save_round_trip_and_permissions(tmp_path):
    atomic_save({"w": torch.arange(5)}, tmp_path / "a.pth")
    atomic_save({"w": torch.arange(6)}, str(tmp_path / "a.pth"))  # replaces; str or PathLike
    assert torch.equal(torch.load(tmp_path / "a.pth", weights_only=True)["w"], torch.arange(6))
    (tmp_path / "plain").write_bytes(b"")
    # What open() gives a new file under this umask, not mkstemp's private 0o600.
    assert os.stat(tmp_path / "a.pth").st_mode == os.stat(tmp_path / "plain").st_mode
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "plain"]


def test_atomic_write_text_and_bytes(tmp_path):
    path = tmp_path / "results.json"
    atomic_write(path, lambda f: f.write('{"top1": "é"}\n'), text=True)
    assert path.read_text(encoding="utf-8") == '{"top1": "é"}\n'

    def fail(f):
        f.write("{\"top1\": ")
        raise ValueError("cannot serialise")

    with pytest.raises(ValueError, match="cannot serialise"):
        atomic_write(path, fail, text=True)
    assert path.read_text(encoding="utf-8") == '{"top1": "é"}\n'
    atomic_write(path, lambda f: f.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01" and os.listdir(tmp_path) == ["results.json"]


def test_atomic_write_onto_a_directory_fails_cleanly(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        atomic_save({"w": torch.ones(1)}, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []
