import os
import pickle
import subprocess
import sys
import types

import pytest
import torch

import uniformer_fast as uf
from uniformer_fast.checkpoint import inflate_weight, read_state_dict

import helpers

TINY = dict(helpers.TINY, num_classes=5)


def tiny(**kw):
    return uf.UniFormer(**{**TINY, **kw})


def source_state_dict():
    torch.manual_seed(7)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in tiny().state_dict().items()}


def assert_loaded(model, sd):
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"model_state": sd, "optimizer_state": {"lr": 0.1}},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    lambda sd: {"state_dict": {"model": {"module.backbone." + k: v for k, v in sd.items()}}},
    lambda sd: {"backbone." + k: v for k, v in sd.items()},
])
def test_unwrapping_and_prefixes(wrap):
    sd = source_state_dict()
    model = tiny()
    assert uf.load_checkpoint(model, wrap(sd)) == ([], [])
    assert_loaded(model, sd)


def test_pth_and_safetensors_files(tmp_path):
    sd = source_state_dict()
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    model = tiny()
    uf.load_checkpoint(model, str(tmp_path / "ckpt.pth"))
    assert_loaded(model, sd)

    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(sd, str(tmp_path / "ckpt.safetensors"))
    model = tiny()
    uf.load_checkpoint(model, tmp_path / "ckpt.safetensors")
    assert_loaded(model, sd)


def image_checkpoint(sd, num_classes=1000):
    """What a 2-D ImageNet UniFormer checkpoint looks like: 4-D kernels, a 1000-class head."""
    out = {k: v[:, :, v.shape[2] // 2] if v.dim() == 5 else v for k, v in sd.items()}
    out["head.weight"] = torch.randn(num_classes, sd["head.weight"].shape[1])
    out["head.bias"] = torch.randn(num_classes)
    return out


@pytest.mark.parametrize("mode", ["average", "center"])
def test_inflation_from_2d(mode):
    sd2d = image_checkpoint(source_state_dict())
    model = tiny()
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match="dropped head.weight"):
        uf.load_checkpoint(model, {"model": sd2d}, inflate=mode)
    assert torch.equal(model.head.weight, head_before)  # the new head stays
    got = model.patch_embed1.proj.weight  # (16, 3, 3, 4, 4) from (16, 3, 4, 4)
    w2d = sd2d["patch_embed1.proj.weight"]
    if mode == "average":
        for t in range(3):
            assert torch.allclose(got[:, :, t], w2d / 3)
        assert torch.allclose(got.sum(2), w2d)  # a static clip gives the 2-D response
    else:
        assert torch.equal(got[:, :, 1], w2d) and not got[:, :, 0].any() and not got[:, :, 2].any()
    assert torch.equal(model.blocks1[0].conv1.weight[:, :, 0], sd2d["blocks1.0.conv1.weight"])
    attn = model.blocks1[0].attn.weight  # depthwise 5x5 -> 5x5x5
    assert torch.allclose(attn.sum(2) if mode == "average" else attn[:, :, 2],
                          sd2d["blocks1.0.attn.weight"], atol=1e-6)


def test_inflate_weight_helper():
    w = torch.randn(2, 1, 3, 3)
    assert inflate_weight(w, 5, "average").shape == (2, 1, 5, 3, 3)
    with pytest.raises(ValueError, match="inflate must be"):
        inflate_weight(w, 3, "tile")


def test_2d_kernels_rejected_without_inflation():
    sd2d = image_checkpoint(source_state_dict(), num_classes=5)
    with pytest.raises(ValueError, match="patch_embed1.proj.weight.*inflate="):
        uf.load_checkpoint(tiny(), sd2d, inflate=None)
    with pytest.raises(ValueError, match="inflate must be"):
        uf.load_checkpoint(tiny(), sd2d, inflate="tile")


def test_head_replacement_on_class_count():
    sd = source_state_dict()
    model = tiny(num_classes=3)
    with pytest.warns(UserWarning, match=r"3 classes; dropped head.weight \(5, 64\), head.bias \(5,\)"):
        assert uf.load_checkpoint(model, sd) == ([], [])
    assert torch.equal(model.blocks3[0].attn.qkv.weight, sd["blocks3.0.attn.qkv.weight"])


def test_missing_and_unexpected_keys_are_named():
    sd = source_state_dict()
    del sd["blocks2.0.norm1.running_mean"]
    sd["blocks9.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: blocks2\.0\.norm1\.running_mean; "
                                         r"unexpected keys: blocks9\.0\.extra"):
        uf.load_checkpoint(tiny(), sd)
    model = tiny()
    missing, unexpected = uf.load_checkpoint(model, sd, strict=False)
    assert missing == ["blocks2.0.norm1.running_mean"] and unexpected == ["blocks9.0.extra"]
    assert torch.equal(model.blocks2[0].conv1.weight, sd["blocks2.0.conv1.weight"])


def test_shape_mismatch_is_named():
    sd = source_state_dict()
    sd["blocks3.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'blocks3\.0\.attn\.qkv\.weight' has shape \(3, 3\) but the "
                                         r"model expects \(192, 64\)"):
        uf.load_checkpoint(tiny(), sd)


class NotAWeight:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        uf.load_checkpoint(tiny(), text)
    code = tmp_path / "code.pth"
    with open(code, "wb") as f:
        pickle.dump({"model": NotAWeight()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        uf.load_checkpoint(tiny(), code)
    torch.save({"model": {"a": 1}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a state dict: entry 'a' is a int"):
        uf.load_checkpoint(tiny(), tmp_path / "odd.pth")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        uf.load_checkpoint(tiny(), bad_st)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        uf.load_checkpoint(tiny(), tmp_path / "absent.pth")
    with pytest.raises(TypeError, match="source must be a path or a state dict"):
        uf.load_checkpoint(tiny(), 42)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_state_dict({})


def fake_hub(monkeypatch, download, reachable=True):
    """A stand-in huggingface_hub: ``download(repo_id, filename, **kwargs)``; the Hub answers the
    quick metadata request unless ``reachable`` is False."""
    def metadata(url, timeout):
        if not reachable:
            raise OSError("[Errno 111] Connection refused")

    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = download
    module.hf_hub_url = lambda repo_id, filename: f"https://hub.test/{repo_id}/resolve/main/{filename}"
    module.get_hf_file_metadata = metadata
    module.constants = types.SimpleNamespace(HF_HUB_OFFLINE=False, ENDPOINT="https://hub.test")
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_pretrained_local_path(tmp_path):
    sd = source_state_dict()
    torch.save(sd, tmp_path / "w.pth")
    model = uf.create_model("uniformer_small", pretrained=str(tmp_path / "w.pth"), **TINY)
    assert_loaded(model, sd)


def test_pretrained_name_resolves_through_the_hub(tmp_path, monkeypatch):
    sd = {k: v for k, v in source_state_dict().items() if not k.startswith("head.")}
    sd["head.weight"], sd["head.bias"] = torch.randn(600, 64), torch.randn(600)
    torch.save({"model": sd}, tmp_path / "uniformer_small_k600_16x4.pth")
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    fake_hub(monkeypatch, download)
    cfg = {k: v for k, v in TINY.items() if k != "num_classes"}
    model = uf.create_model("uniformer_small", pretrained="uniformer_small_k600_16x4", **cfg)
    assert calls == [("Sense-X/uniformer_video", "uniformer_small_k600_16x4.pth")]
    assert model.num_classes == 600 and torch.equal(model.head.weight, sd["head.weight"])


def test_pretrained_without_network_says_how(monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    fake_hub(monkeypatch, offline)
    with pytest.raises(RuntimeError, match=r"without network access, download uniformer_small_k400_16x8\.pth "
                                           r"from https://huggingface\.co/Sense-X/uniformer_video and pass "
                                           r"its local path"):
        uf.uniformer_small(pretrained="uniformer_small_k400_16x8")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(RuntimeError, match="pip install huggingface_hub"):
        uf.uniformer_small(pretrained="uniformer_small_k400_16x8")


def test_pretrained_unreachable_hub_uses_the_cache_or_says_how(monkeypatch, tmp_path):
    """Where the quick request fails, the full download (which retries for ~20 s) is not tried:
    a copy in the Hugging Face cache is used, or the error says how to get the file."""
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append(kwargs)
        if os.path.exists(tmp_path / filename):
            return str(tmp_path / filename)
        raise FileNotFoundError("not in the cache")

    fake_hub(monkeypatch, download, reachable=False)
    with pytest.raises(RuntimeError, match=r"cannot reach the Hugging Face Hub at https://hub\.test \(OSError: "
                                           r"\[Errno 111\] Connection refused\) and uniformer_small_k400_16x8\.pth "
                                           r"is not in its local cache; without network access, download"):
        uf.uniformer_small(pretrained="uniformer_small_k400_16x8")
    assert calls == [{"local_files_only": True}]
    torch.save(source_state_dict(), tmp_path / "uniformer_small_k400_16x8.pth")
    assert uf.checkpoint.resolve_pretrained("uniformer_small_k400_16x8", "uniformer_small") == \
        (str(tmp_path / "uniformer_small_k400_16x8.pth"), 400)


def test_pretrained_hub_answering_404_is_reported_by_the_download(monkeypatch):
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append(kwargs)
        raise OSError("404 Client Error: Entry Not Found")

    def metadata(url, timeout):
        error = OSError("404 Client Error")
        error.response = types.SimpleNamespace(status_code=404)
        raise error

    fake_hub(monkeypatch, download)
    sys.modules["huggingface_hub"].get_hf_file_metadata = metadata
    with pytest.raises(RuntimeError, match=r"could not fetch uniformer_small_k400_32x4\.pth from the Hugging Face "
                                           r"Hub \(OSError: 404 Client Error: Entry Not Found\)"):
        uf.uniformer_small(pretrained="uniformer_small_k400_32x4")
    assert calls == [{}]  # the ordinary download, not the cache-only one


NO_NETWORK = r"""
import time
from uniformer_fast.checkpoint import resolve_pretrained
start = time.perf_counter()
try:
    resolve_pretrained("uniformer_small_k400_16x8", "uniformer_small")
except RuntimeError as e:
    print(f"{time.perf_counter() - start:.2f}\n{e}")
"""


def test_pretrained_name_without_network_fails_within_seconds(tmp_path):
    """The real huggingface_hub, its endpoint a closed local port: an error in seconds (it used to
    retry for 23 s) that says how to get the file."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # 9: discard, never listening
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK], env=env, capture_output=True, text=True, timeout=120)
    seconds, message = proc.stdout.split("\n", 1)
    assert float(seconds) < 5, proc.stdout + proc.stderr
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in message
    assert "download uniformer_small_k400_16x8.pth from https://huggingface.co/Sense-X/uniformer_video" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_pretrained_bad_names():
    with pytest.raises(ValueError, match="holds uniformer_base weights; it does not fit uniformer_small"):
        uf.uniformer_small(pretrained="uniformer_base_k400_8x8")
    with pytest.raises(ValueError, match="neither an existing file nor an official name"):
        uf.uniformer_small(pretrained="no/such/file.pth")
    with pytest.raises(TypeError, match="pretrained must be a checkpoint path"):
        uf.uniformer_small(pretrained=3)
