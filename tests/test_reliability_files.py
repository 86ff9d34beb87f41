"""Files the package writes survive interruptions; files it reads fail with an error naming them."""
import io
import os
import pickle
import random

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.checkpoint import load_checkpoint, read_state_dict
from uniformer_fast.files import atomic_save, atomic_write

import helpers

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


# Reading: every bad checkpoint file is a ValueError (FileNotFoundError when absent) naming it.

TINY = dict(helpers.TINY, num_classes=5)


class Payload:
    """Unpickling this calls ``action(*args)``: what a malicious checkpoint does."""

    def __init__(self, action, *args):
        self.action, self.args = action, args

    def __reduce__(self):
        return self.action, self.args


def truncated_pth(path):
    buf = io.BytesIO()
    REAL_SAVE({"model": {"w": torch.randn(256, 256)}}, buf)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def truncated_safetensors(path):
    safetensors = pytest.importorskip("safetensors.torch")
    data = safetensors.save({"w": torch.randn(64, 64)})
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {  # name: (make(path), what the message says after naming the file)
    "truncated.pth": (truncated_pth, "is not a checkpoint, or a truncated or corrupt one: torch.load failed"),
    # Garbage may read as forbidden pickle opcodes ("cannot be loaded safely") or as none at all.
    "random.pth": (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "is not a checkpoint"),
    "empty.pth": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "text.pth": (lambda p: p.write_text("hello\n"), "is not a checkpoint"),
    "truncated.safetensors": (truncated_safetensors, "is not a readable safetensors file"),
    "random.safetensors": (lambda p: p.write_bytes(random.Random(1).randbytes(4096)),
                           "is not a readable safetensors file"),
    "empty.safetensors": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "directory.pth": (lambda p: p.mkdir(), "is a directory, not a checkpoint file"),
    "epoch.pth": (lambda p: REAL_SAVE({"w": torch.ones(1), "epoch": 3}, p),
                  "is not a state dict: entry 'epoch' is a int, not a tensor"),
    "int_keys.pth": (lambda p: REAL_SAVE({0: torch.ones(1)}, p), "is not a state dict: key 0 is a int"),
    "list.pth": (lambda p: REAL_SAVE([torch.ones(1)], p), "holds a list, not a state dict"),
    "tensor.pth": (lambda p: REAL_SAVE(torch.ones(3), p), "holds a Tensor, not a state dict"),
    "nothing.pth": (lambda p: REAL_SAVE({"model": {}}, p), "is not a state dict: it holds no tensors"),
}


@pytest.fixture(scope="module")
def tiny_model():
    return uf.UniFormer(**TINY)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("loader", ["read_state_dict", "load_checkpoint"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_checkpoint_files_are_named(name, loader, tmp_path, tiny_model):
    make, says = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path) if loader == "read_state_dict" else load_checkpoint(tiny_model, str(path))
    message = str(info.value)
    assert type(info.value) is ValueError  # not a subclass that leaks the reader (UnpicklingError...)
    assert message.startswith(f"{str(path)!r} {says}"), message
    # One line, and not torch's advice to retry with weights_only set to False.
    assert "\n" not in message and "False" not in message, message


@pytest.mark.parametrize("action", ["os.system", "open"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_code_in_a_checkpoint_is_refused_not_run(action, writer, tmp_path, tiny_model):
    marker = tmp_path / "ran"
    payload = (Payload(os.system, f"touch '{marker}'") if action == "os.system"
               else Payload(open, str(marker), "w"))
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": payload}}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        REAL_SAVE(obj, path)
    for load in (read_state_dict, lambda p: load_checkpoint(tiny_model, p)):
        with pytest.raises(ValueError, match=f"^{str(path)!r} is not a checkpoint that can be loaded safely"):
            load(path)
    assert not marker.exists()
    if action == "open" and writer == "pickle":  # the payload is live: a plain unpickler runs it
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_missing_checkpoint_file(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: {str(tmp_path / 'no.pth')!r}"):
        load_checkpoint(tiny_model, tmp_path / "no.pth")
