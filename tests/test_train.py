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
from uniformer_fast.apps.train import SyntheticClips, main as train_main, param_groups, warmup_cosine

import helpers
from helpers import free_port

TINY = dict(helpers.TINY, num_classes=3)


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
    model = torch.nn.parallel.DistributedDataParallel(_model_for_grad_check())
    share = clips.shape[0] // world
    part = slice(rank * share, (rank + 1) * share)
    grads = _grads(model, clips[part], labels[part])
    torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    dist.barrier()  # both ranks' gradients are on disk
    # Leave without running destructors: freeing DDP's Reducer (the gloo group's last reference)
    # runs ~ProcessGroupGloo with the GIL held, which joins a gloo worker thread that may be
    # waiting for the GIL to free a finished allreduce's state: a deadlock (seen here once, a
    # spawned rank idle in ~ProcessGroupGloo for 20 minutes).
    os._exit(0)


def test_ddp_gradients_equal_one_process_on_whole_batch(tmp_path, assert_close):
    torch.manual_seed(1)
    clips, labels = torch.randn(4, 3, 2, 32, 32), torch.tensor([0, 2, 1, 2])
    mp.spawn(_ddp_worker, args=(2, free_port(), clips, labels, str(tmp_path)), nprocs=2, join=True)
    expected = _grads(_model_for_grad_check(), clips, labels)
    names = [n for n, _ in uf.UniFormer(**TINY).named_parameters()]
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for name, g, e in zip(names, got, expected):
            assert_close(g, e, rtol=1e-5, name=f"rank {rank} {name}")


def test_warmup_cosine_schedule_and_param_groups():
    f = warmup_cosine(total_steps=10, warmup_steps=2, base_lr=1.0, warmup_lr=0.0, min_lr=0.0)
    assert [round(f(s), 4) for s in (0, 1, 2, 10)] == [0.0, 0.5, 1.0, 0.0]
    assert f(6) == pytest.approx(0.5)
    groups = param_groups(uf.UniFormer(**TINY), 0.05)
    assert groups[0]["weight_decay"] == 0.05 and all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in groups[1]["params"])


def test_synthetic_clips_are_deterministic():
    a, b = SyntheticClips(4, 2, 32, 5, seed=3), SyntheticClips(4, 2, 32, 5, seed=3)
    assert torch.equal(a[1][0], b[(0, 1)][0]) and a[1][1] == b[1][1] and a[1][0].shape == (1, 3, 2, 32, 32)
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
    assert sorted(set(os.listdir(out)) - {"tensorboard"}) == ["last.pth", "metrics.csv"]  # no temporary file


# The full tier: in the fast tier DDP's gradients are checked in-process (above) and the entry point
# once in one process; this launch costs two more interpreter start-ups and a gloo rendezvous.
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp"])  # FSDP: tests/test_finetune.py, on videos
def test_torchrun_two_processes(tmp_path, mode):
    """The real entry point under torchrun: 2 CPU processes over gloo, one epoch, a checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "uniformer_fast.train", *TRAIN_ARGS, "--synthetic-size", "8",
           "--output", str(tmp_path), "--drop-path", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if mode == "fsdp":
        cmd.append("--fsdp")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 1 epoch(s)" in proc.stderr
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["model"]["head.weight"].shape == (3, 512)


@pytest.mark.parametrize("args,code,match", [
    (["--frames", "0"], 2, "argument --frames: expected an integer >= 1; got 0"),
    (["--batch-size", "0"], 2, "argument --batch-size: expected an integer >= 1; got 0"),
    (["--epochs", "0"], 2, "argument --epochs: expected an integer >= 1; got 0"),
    (["--epochs", "-2"], 2, "argument --epochs: expected an integer >= 1; got -2"),
    (["--size", "16"], 2, "argument --size: expected an integer >= 32; got 16"),
    (["--sample-rate", "0"], 2, "argument --sample-rate: expected an integer >= 1; got 0"),
    (["--num-classes", "0"], 2, "argument --num-classes: expected an integer >= 1; got 0"),
    (["--synthetic-size", "0"], 2, "argument --synthetic-size: expected an integer >= 1; got 0"),
    (["--workers", "-1"], 2, "argument --workers: expected an integer >= 0; got -1"),
    (["--warmup-steps", "-1"], 2, "argument --warmup-steps: expected an integer >= 0; got -1"),
    (["--checkpoint-num", "0", "0", "0", "-1"], 2, "argument --checkpoint-num: expected an integer >= 0; got -1"),
    (["--lr", "0"], 2, "argument --lr: expected a number > 0; got 0"),
    (["--lr", "nan"], 2, "argument --lr: expected a number > 0; got nan"),
    (["--weight-decay", "-0.1"], 2, "argument --weight-decay: expected a number >= 0; got -0.1"),
    (["--drop-path", "1"], 2, "argument --drop-path: expected a number in [0, 1); got 1"),
    (["--label-smoothing", "1.5"], 2, "argument --label-smoothing: expected a number in [0, 1]; got 1.5"),
    (["--frames", "x"], 2, "argument --frames: invalid int value: 'x'"),
    (["--model", "uniformer_huge"], 2, "invalid choice: 'uniformer_huge'"),
    (["--resume", "{tmp}/missing/last.pth"], 1, "--resume: file not found: '{tmp}/missing/last.pth'"),
    (["--resume", "{tmp}/plain.pth"], 1, "--resume '{tmp}/plain.pth' is not a checkpoint written by this "
                                         "script: it lacks optimizer, scheduler, scaler, epoch"),
    (["--resume", "{tmp}/notes.txt"], 1, "'{tmp}/notes.txt' is not a checkpoint"),
    (["--pretrained", "{tmp}/missing.pth"], 1, "--pretrained: file not found: '{tmp}/missing.pth'"),
    (["--data", "{tmp}/missing"], 1, "--data: no such list file or folder: '{tmp}/missing'"),
    (["--data", "{tmp}/empty"], 1, "{tmp}/empty: no videos (.mp4, "),
    (["--output", "{tmp}/notes.txt"], 1, "--output: not a directory: '{tmp}/notes.txt'"),
    (["--synthetic-size", "1"], 1, "--batch-size 2 x --accum-steps 1 x 1 process(es) is more than the 1 clips"),
    (["--freeze-stages", "5"], 2, "argument --freeze-stages: invalid choice: 5"),
    (["--accum-steps", "0"], 2, "argument --accum-steps: expected an integer >= 1; got 0"),
    (["--ema-decay", "1"], 2, "argument --ema-decay: expected a number in [0, 1); got 1"),
    (["--warmup-steps", "1", "--warmup-epochs", "1"], 2, "not allowed with argument"),
])
def test_bad_arguments_get_one_line(args, code, match, tmp_path, tiny_small, capsys):
    """Mistakes a user can fix print one line naming the option and exit 2 (arguments) or 1
    (files), before any training, as the uniformer-fast CLI does."""
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "plain.pth")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert train_main(TRAIN_ARGS + args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m uniformer_fast.train: error: ")
    assert match.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "notes.txt").is_dir() and os.listdir(tmp_path / "empty") == ["class_a"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_device_cuda_without_cuda(tiny_small, capsys):
    assert train_main(TRAIN_ARGS + ["--device", "cuda"]) == 1
    assert capsys.readouterr().err.strip() == \
        "python -m uniformer_fast.train: error: --device cuda: no CUDA device is available here"


def test_resume_into_another_model_is_one_line(tmp_path, tiny_small, capsys):
    train_main(TRAIN_ARGS + ["--epochs", "1", "--output", str(tmp_path)])
    capsys.readouterr()
    code = train_main(TRAIN_ARGS + ["--num-classes", "4", "--epochs", "2", "--resume", str(tmp_path / "last.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"--resume '{tmp_path / 'last.pth'}' does not fit this run" in err and "head.weight" in err, err


def test_no_readable_video_at_all_is_one_line(tmp_path, tiny_small, capsys):
    """Unreadable videos are replaced by others; when none can be read the error, raised in a
    DataLoader worker, arrives as one line naming a file, not "Caught ValueError in DataLoader
    worker" with a traceback."""
    pytest.importorskip("av")
    (tmp_path / "a").mkdir()
    for name in ("x.mp4", "y.mp4"):
        (tmp_path / "a" / name).write_bytes(b"not a video" * 10)
    code = train_main(TRAIN_ARGS + ["--data", str(tmp_path), "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "11 videos in a row could not be read" in err and str(tmp_path / "a") in err, err


def test_entry_point_exit_status_and_one_line():
    """The real ``python -m uniformer_fast.train``: exit status 2, one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "uniformer_fast.train", "--frames", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "python -m uniformer_fast.train: error: argument --frames: expected an integer >= 1; got 0 "
        "(see python -m uniformer_fast.train --help)"]
