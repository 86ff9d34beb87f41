import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import uniformer_fast as uf
from uniformer_fast.train import SyntheticClips, cosine_schedule, main as train_main, param_groups

TINY = dict(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 64), head_dim=16, num_classes=3)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_for_grad_check():
    torch.manual_seed(0)
    model = uf.UniFormer(**TINY)
    # Without SyncBatchNorm (CUDA only) each process normalises with its own batch statistics, so
    # whole-batch equality holds for frozen BatchNorm: eval-mode norms, the rest in training mode.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eval()
    return model


def _grads(model, clips, labels):
    loss = F.cross_entropy(model(clips), labels)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _ddp_worker(rank, world, port, clips, labels, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model_for_grad_check())
        share = clips.shape[0] // world
        part = slice(rank * share, (rank + 1) * share)
        grads = _grads(model, clips[part], labels[part])
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_on_whole_batch(tmp_path, assert_close):
    torch.manual_seed(1)
    clips, labels = torch.randn(4, 3, 2, 32, 32), torch.tensor([0, 2, 1, 2])
    mp.spawn(_ddp_worker, args=(2, _free_port(), clips, labels, str(tmp_path)), nprocs=2, join=True)
    expected = _grads(_model_for_grad_check(), clips, labels)
    names = [n for n, _ in uf.UniFormer(**TINY).named_parameters()]
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for name, g, e in zip(names, got, expected):
            assert_close(g, e, rtol=1e-5, name=f"rank {rank} {name}")


def test_cosine_schedule_and_param_groups():
    f = cosine_schedule(total_steps=10, warmup_steps=2, min_ratio=0.0)
    assert [round(f(s), 4) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    assert f(6) == pytest.approx(0.5)
    groups = param_groups(uf.UniFormer(**TINY), 0.05)
    assert groups[0]["weight_decay"] == 0.05 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in groups[1]["params"])


def test_synthetic_clips_are_deterministic():
    a, b = SyntheticClips(4, 2, 32, 5, seed=3), SyntheticClips(4, 2, 32, 5, seed=3)
    assert torch.equal(a[1][0], b[1][0]) and a[1][1] == b[1][1]
    assert not torch.equal(a[0][0], a[1][0])


TRAIN_ARGS = ["--frames", "2", "--size", "32", "--synthetic-size", "4", "--batch-size", "2",
              "--num-classes", "3", "--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture
def tiny_small(monkeypatch):
    """--model uniformer_small builds the TINY configuration, so a training run takes a second."""
    monkeypatch.setattr(uf.model, "_CONFIGS", {**uf.model._CONFIGS, "uniformer_small": TINY | {"num_classes": 3}})


def test_train_save_and_resume(tmp_path, tiny_small):
    out = tmp_path / "run"
    train_main(TRAIN_ARGS + ["--epochs", "1", "--output", str(out)])
    first = torch.load(out / "last.pth", weights_only=True)
    assert first["epoch"] == 0 and first["scheduler"]["last_epoch"] == 2
    # Resuming runs the remaining epoch only, from the saved state.
    shutil.copy(out / "last.pth", tmp_path / "epoch0.pth")
    train_main(TRAIN_ARGS + ["--epochs", "2", "--output", str(out), "--resume", str(tmp_path / "epoch0.pth")])
    second = torch.load(out / "last.pth", weights_only=True)
    assert second["epoch"] == 1 and second["scheduler"]["last_epoch"] == 4
    assert not torch.equal(first["model"]["head.weight"], second["model"]["head.weight"])
    model = uf.UniFormer(**TINY)
    uf.load_checkpoint(model, out / "last.pth")  # the training checkpoint loads as a model checkpoint


def interrupted_save(obj, f, *args, **kwargs):
    """torch.save cut short by Ctrl-C: half of the bytes reach ``f`` (a path or a file object)."""
    import io
    buf = io.BytesIO()
    REAL_SAVE(obj, buf)
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(data)
    else:
        f.write(data)
    raise KeyboardInterrupt


REAL_SAVE = torch.save


def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, tiny_small, monkeypatch):
    out = tmp_path / "run"
    train_main(TRAIN_ARGS + ["--epochs", "1", "--output", str(out)])
    before = torch.load(out / "last.pth", weights_only=True)
    monkeypatch.setattr(torch, "save", interrupted_save)
    try:
        code = train_main(TRAIN_ARGS + ["--epochs", "1", "--output", str(out), "--seed", "1"])
    except KeyboardInterrupt:
        code = 130
    assert code == 130  # Ctrl-C's exit status, as the CLI
    after = torch.load(out / "last.pth", weights_only=True)  # still whole
    assert torch.equal(after["model"]["head.weight"], before["model"]["head.weight"])
    assert os.listdir(out) == ["last.pth"]  # no temporary file left behind


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes(tmp_path, mode):
    """The real entry point under torchrun: 2 CPU processes over gloo, one epoch, a checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "uniformer_fast.train", *TRAIN_ARGS, "--synthetic-size", "8",
           "--output", str(tmp_path), "--drop-path", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if mode == "fsdp":
        cmd.append("--fsdp")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 1 epoch(s)" in proc.stderr
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["model"]["head.weight"].shape == (3, 512)
