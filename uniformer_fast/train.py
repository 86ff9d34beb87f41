"""Train or fine-tune UniFormer: one process, or many with ``torchrun``.

    python -m uniformer_fast.train --epochs 1                          # synthetic clips, one process
    torchrun --nproc-per-node 8 -m uniformer_fast.train --data DIR --amp bf16 --output runs/k400

``--data DIR`` reads ``DIR/<class name>/*.mp4`` (any video PyAV decodes); without it, synthetic
clips with random labels exercise the whole loop. AdamW with a linear warm-up and a cosine
decay per step; ``--amp bf16|fp16`` (fp16 with a gradient scaler); DDP by default, ``--fsdp`` to
shard parameters (FSDP2 ``fully_shard`` per block); ``--sync-bn`` for cross-GPU BatchNorm
statistics. A checkpoint (model, optimizer, schedule, scaler, epoch) is written to
``--output/last.pth`` after every epoch, atomically (an interrupted save keeps the previous one);
``--resume`` continues from one.

Mistakes a user can fix (an argument out of range, a missing or unreadable file) print one line
and exit non-zero before any training, as the ``uniformer-fast`` command does.
"""
from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import _read_file, load_checkpoint
from .cli import CLIError, Parser, float_in, int_at_least, report_errors
from .files import atomic_save
from .model import create_model, list_models


class SyntheticClips(Dataset):
    """Deterministic random clips (3, T, S, S) and labels, the same in every process."""

    def __init__(self, length, num_frames, size, num_classes, seed=0):
        self.length, self.shape, self.num_classes, self.seed = length, (3, num_frames, size, size), num_classes, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.shape, generator=g), int(torch.randint(self.num_classes, (), generator=g))


class VideoFolder(Dataset):
    """``root/<class>/<video>``: clips sampled and augmented as in :mod:`uniformer_fast.video`."""

    def __init__(self, root, num_frames, size, sample_rate, train=True, seed=0):
        from .video import VIDEO_EXTENSIONS
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data: not a directory: {root!r}")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.items = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(VIDEO_EXTENSIONS)]
        if not self.items:
            raise ValueError(f"--data: no videos ({', '.join(VIDEO_EXTENSIONS)}) under {root!r}/<class>/")
        self.num_classes = len(self.classes)
        self.num_frames, self.size, self.sample_rate, self.train, self.seed = num_frames, size, sample_rate, train, seed
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from .video import load_clip
        path, label = self.items[i]
        rng = random.Random(hash((self.seed, self.epoch, i)))
        return load_clip(path, self.num_frames, self.sample_rate, self.size, train=self.train, rng=rng), label


def cosine_schedule(total_steps, warmup_steps, min_ratio=0.01):
    """Multiplier of the base learning rate at each step: linear warm-up, then cosine decay."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model, weight_decay):
    """No weight decay on norms, biases and other 1-D parameters, as the official recipe."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


PROG = "python -m uniformer_fast.train"
# Errors a user can cause and fix; a RuntimeError (out of memory, a bug) keeps its traceback.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError)


def parse_args(argv=None):
    """The options, each checked for its range (else a one-line
    :class:`~uniformer_fast.cli.UsageError` naming it), and the paths checked to exist and be of the
    right kind (else a FileNotFoundError or NotADirectoryError naming the option)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list_models(), default="uniformer_small")
    p.add_argument("--data", default=None, help="folder of <class>/<video> files; synthetic clips if omitted")
    p.add_argument("--num-classes", type=int_at_least(1), default=400, help="for synthetic data")
    p.add_argument("--synthetic-size", type=int_at_least(1), default=64, help="number of synthetic clips")
    p.add_argument("--frames", type=int_at_least(1), default=16)
    p.add_argument("--size", type=int_at_least(32), default=224)
    p.add_argument("--sample-rate", type=int_at_least(1), default=4)
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="per process")
    p.add_argument("--epochs", type=int_at_least(1), default=1)
    p.add_argument("--lr", type=float_in(0, low_open=True), default=1e-4)
    p.add_argument("--weight-decay", type=float_in(0), default=0.05)
    p.add_argument("--warmup-steps", type=int_at_least(0), default=0)
    p.add_argument("--drop-path", type=float_in(0, 1, high_open=True), default=0.1)
    p.add_argument("--label-smoothing", type=float_in(0, 1), default=0.0)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--checkpoint-num", type=int_at_least(0), nargs=4, default=(0, 0, 0, 0), metavar="N",
                   help="blocks per stage recomputed in backward (saves activation memory)")
    p.add_argument("--pretrained", default=None, help="checkpoint to start from (2-D ImageNet ones are inflated)")
    p.add_argument("--output", default=None, help="directory for last.pth")
    p.add_argument("--resume", default=None, help="a last.pth to continue from")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--workers", type=int_at_least(0), default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # Checked now rather than where they are used: after the data and the model are set up, or
    # after the first epoch for --output.
    for option, path in (("--resume", args.resume), ("--pretrained", args.pretrained)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: file not found: {path!r}")
    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data: not a directory: {args.data!r}")
    if args.output is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NotADirectoryError(f"--output: not a directory: {args.output!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    return args


_RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch")


def _read_resume(path):
    """The training state in a ``last.pth`` this script wrote, read safely (tensors and plain
    containers only)."""
    ckpt = _read_file(path)
    missing = [k for k in _RESUME_KEYS if k not in ckpt] if isinstance(ckpt, Mapping) else list(_RESUME_KEYS)
    if missing:
        raise ValueError(f"--resume {path!r} is not a checkpoint written by this script: it lacks "
                         f"{', '.join(missing)} (expected the last.pth of an --output folder)")
    return ckpt


def _setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def _wrap(model, args, world, device):
    if world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for stage in (model.blocks1, model.blocks2, model.blocks3, model.blocks4):
            for blk in stage:
                fully_shard(blk)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _state_dicts(model, optimizer):
    """Full (unsharded) model and optimizer state, the same whether DDP or FSDP wraps the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(argv=None) -> int:
    """The entry point; returns the exit status: 0, 2 for bad arguments, 1 for other errors a user
    can fix (each printed as one line), 130 on Ctrl-C."""
    def run():
        train(parse_args(argv))
        return 0
    return report_errors(PROG, run, USER_ERRORS)


def train(args) -> float:
    """Train as ``args`` (from :func:`parse_args`) say; returns the last step's loss."""
    resume = _read_resume(args.resume) if args.resume else None  # a bad file fails before any work
    rank, world, device = _setup_distributed(args.device)
    torch.manual_seed(args.seed)
    if args.data:
        dataset = VideoFolder(args.data, args.frames, args.size, args.sample_rate, seed=args.seed)
        num_classes = dataset.num_classes
    else:
        dataset = SyntheticClips(args.synthetic_size, args.frames, args.size, args.num_classes, args.seed)
        num_classes = args.num_classes
    model = create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path,
                         checkpoint_num=tuple(args.checkpoint_num))
    if args.pretrained:
        load_checkpoint(model, args.pretrained)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = _wrap(model.to(device), args, world, device)

    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                        num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} x {world} process(es) is more than the {len(dataset)} "
                         f"clips ({'under --data' if args.data else '--synthetic-size'}): not one full batch")
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(args.epochs * steps_per_epoch, args.warmup_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch = 0
    if resume is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        try:
            set_state_dict(model, optimizer, model_state_dict=resume["model"], optim_state_dict=resume["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
            scheduler.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:  # load_state_dict's size mismatches are RuntimeErrors
            reason = " ".join(str(e).split())
            raise ValueError(f"--resume {args.resume!r} does not fit this run (another --model, --num-classes "
                             f"or set of classes?): {reason}") from e
        start_epoch = resume["epoch"] + 1

    show = rank == 0 and not args.no_progress
    last_loss = float("nan")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        if isinstance(dataset, VideoFolder):
            dataset.epoch = epoch
        bar = _bar(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", show)
        for clips, labels in loader:
            clips, labels = clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            with autocast:
                loss = F.cross_entropy(model(clips), labels, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            last_loss = loss.item()
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
        bar.close()
        if args.output:
            model_sd, optim_sd = _state_dicts(model, optimizer)
            if rank == 0:
                os.makedirs(args.output, exist_ok=True)
                # Atomically: a save cut short (Ctrl-C, a full disk) keeps the previous epoch's file.
                atomic_save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch, "args": vars(args)},
                            os.path.join(args.output, "last.pth"))
    if rank == 0:
        print(f"done: {args.epochs - start_epoch} epoch(s), last loss {last_loss:.4f}", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return last_loss


def _bar(total, desc, show):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=not show, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        class _Quiet:
            def update(self, k): pass
            def set_postfix(self, **kw): pass
            def close(self): pass
        return _Quiet()


if __name__ == "__main__":
    sys.exit(main())
