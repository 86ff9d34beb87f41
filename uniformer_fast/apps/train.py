"""Train or fine-tune UniFormer with the official recipe: one process, or many with ``torchrun``.

    python -m uniformer_fast.train --data train.csv --val val.csv --pretrained uniformer_small_k400_16x4 \\
        --num-classes 10 --freeze-stages 2 --epochs 30 --warmup-epochs 5 --output runs/mine
    torchrun --nproc-per-node 8 -m uniformer_fast.train --data k400/train.csv --val k400/val.csv --amp bf16 ...

Data (``--data``, ``--val``): an official list (``path label``, comma or space separated, or
Something-Something's ``path num_frames label``; relative paths from ``--data-root``, by default
the list's folder) or a folder ``DIR/<class>/<video>``; ``--label-map`` names the classes (one per
line, or JSON) and orders the folders. Without ``--data``, synthetic clips exercise the loop.

The recipe, as the official runs (each part can be turned off): a random dense clip (Kinetics)
or a random frame per segment (``--protocol sth``); RandAugment ``rand-m7-n4-mstd0.5-inc1``, the
same on every frame; a random resized crop; a flip (not for Something-Something); random erasing
0.25; mixup 0.8 / cutmix 1.0 with label smoothing 0.1; AdamW with weight decay 0.05, none on
norms, biases and ``no_weight_decay()``; a linear warm-up from ``--warmup-lr`` then a cosine to
``--min-lr``, per step; drop path 0.1. Also: ``--accum-steps``, ``--clip-grad``, ``--ema-decay``,
``--amp bf16|fp16``, ``--pretrained`` (an official name or a file; 2-D ImageNet weights are
inflated; a head of another class count is replaced), ``--freeze-stages N``.

Validation every ``--eval-every`` epochs with the dataset-scale evaluator (one view, or the full
protocol with ``--eval-views 4 --eval-crops 3``), each process scoring its share. ``--output``
gets ``last.pth`` (the whole training state, written atomically after every epoch and every
``--save-every`` steps), ``best.pth`` (the weights with the best validation top-1),
``metrics.csv`` and, when TensorBoard is installed, ``tensorboard/``. ``--resume last.pth``
continues where it stopped, also within an epoch, to the same parameters bit for bit (in one
process; across processes, within float rounding): the data order, every clip's augmentation and
the random streams are functions of the seed, epoch and step, or saved.

Under ``torchrun``: DDP, ``--fsdp`` (FSDP2 per block), ``--sync-bn``; each process reads its own
share of the shuffled data; losses, accuracies and validation are reduced across processes.

Mistakes a user can fix (an argument out of range, a missing file, a label outside the classes)
print one line and exit non-zero before any training, as the ``uniformer-fast`` command does.
A video that cannot be read is reported, replaced by another and counted; the run goes on.
"""
from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import load_checkpoint, read_checkpoint_file, resolve_pretrained
from ..data.augment import Mixup, RandAugment, soft_target_cross_entropy
from ..data.lists import read_class_names
from ..data.training import EpochSampler, TrainClips, TrainRecipe, check_labels, collate_clips, find_training_videos
from ..data.video import PROTOCOLS
from ..files import atomic_save, atomic_write
from ..model import create_model, list_models
from .cli import CLIError, Parser, float_in, int_at_least, report_errors
from .evaluate import accuracy, evaluate
from .progress import progress_bar


class SyntheticClips(Dataset):
    """Deterministic random clips (3, T, S, S) and labels, the same in every process, as
    :class:`~uniformer_fast.data.training.TrainClips` items: ``(clips (1, 3, T, S, S), labels (1,), [])``."""

    def __init__(self, length, num_frames, size, num_classes, seed=0):
        self.length, self.shape, self.num_classes, self.seed = length, (3, num_frames, size, size), num_classes, seed

    def __len__(self):
        return self.length

    def set_epoch(self, epoch):
        pass

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key  # (epoch, index) from EpochSampler
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        clip = torch.randn(self.shape, generator=g)
        return clip[None], torch.randint(self.num_classes, (1,), generator=g), []


def warmup_cosine(total_steps, warmup_steps, base_lr, warmup_lr=1e-6, min_lr=1e-6):
    """Multiplier of ``base_lr`` at each step, as the official schedule (per step rather than per
    epoch): linear from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then a cosine from
    ``base_lr`` down to ``min_lr`` at ``total_steps``."""
    def factor(step):
        if step < warmup_steps:
            lr = warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr / base_lr
    return factor


def param_groups(model, weight_decay):
    """Weight decay on weight matrices and kernels only: none on norms, biases and other 1-D
    parameters, nor on what ``model.no_weight_decay()`` names, as the official recipe."""
    base = getattr(model, "module", model)  # DDP
    skip = set(base.no_weight_decay()) if hasattr(base, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in base.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def freeze_stages(model, num_stages: int) -> list:
    """Freeze the first ``num_stages`` stages (patch embedding and blocks): no gradients, and their
    BatchNorms kept on the pretrained statistics. Returns the frozen modules, which
    :func:`_train_mode` puts back in eval mode after every ``model.train()``."""
    frozen = [m for stage in model.stages()[:num_stages] for m in stage]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def _train_mode(model, frozen):
    model.train()
    for m in frozen:
        m.eval()


PROG = "python -m uniformer_fast.train"
# Errors a user can cause and fix; a RuntimeError (out of memory, a bug) keeps its traceback.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError)
_PATH_SUFFIXES = (".pth", ".pt", ".pyth", ".safetensors", ".bin", ".ckpt")


def parse_args(argv=None):
    """The options, each checked for its range (else a one-line
    :class:`~uniformer_fast.apps.cli.UsageError` naming it), and the paths checked to exist and be of the
    right kind (else a FileNotFoundError or NotADirectoryError naming the option)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list_models(), default="uniformer_small")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="training list file or <class>/<video> folder; synthetic clips if omitted")
    g.add_argument("--data-root", default=None, help="prefix of relative paths in the lists (default: the list's folder)")
    g.add_argument("--val", default=None, help="validation list file or <class>/<video> folder")
    g.add_argument("--label-map", default=None, help="class names: one per line, a JSON list or a JSON {name: index}")
    g.add_argument("--num-classes", type=int_at_least(1), default=None,
                   help="default: the label map's, the folders', or the largest label + 1 (400 for synthetic data)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="kinetics",
                   help="kinetics: dense clips, flips; sth: a frame per segment, no flip")
    g.add_argument("--synthetic-size", type=int_at_least(1), default=64, help="number of synthetic clips")
    g.add_argument("--frames", type=int_at_least(1), default=16)
    g.add_argument("--size", type=int_at_least(32), default=224)
    g.add_argument("--sample-rate", type=int_at_least(1), default=4)
    g.add_argument("--workers", type=int_at_least(0), default=4, help="decoding processes per training process")
    a = p.add_argument_group("augmentation")
    a.add_argument("--crop", choices=("resized", "jitter"), default="resized",
                   help="resized: area 8-100%%, aspect 3/4-4/3 (official); jitter: short side 256-320, random crop")
    a.add_argument("--rand-augment", default="rand-m7-n4-mstd0.5-inc1", help="a RandAugment spec, or 'none'")
    a.add_argument("--erase-prob", type=float_in(0, 1), default=0.25, help="random erasing probability")
    a.add_argument("--flip", choices=("auto", "on", "off"), default="auto", help="auto: on for kinetics, off for sth")
    a.add_argument("--num-sample", type=int_at_least(1), default=1,
                   help="augmented clips per decoded video (official: 2); the batch holds batch-size x this")
    a.add_argument("--mixup", type=float_in(0), default=0.8, help="mixup alpha (0: off)")
    a.add_argument("--cutmix", type=float_in(0), default=1.0, help="cutmix alpha (0: off)")
    a.add_argument("--mixup-prob", type=float_in(0, 1), default=1.0)
    a.add_argument("--mixup-switch-prob", type=float_in(0, 1), default=0.5, help="cutmix instead of mixup")
    a.add_argument("--label-smoothing", type=float_in(0, 1), default=0.1)
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int_at_least(1), default=8, help="videos per process and step")
    o.add_argument("--accum-steps", type=int_at_least(1), default=1, help="batches per optimizer step")
    o.add_argument("--epochs", type=int_at_least(1), default=1)
    o.add_argument("--lr", type=float_in(0, low_open=True), default=1e-4)
    o.add_argument("--min-lr", type=float_in(0), default=1e-6, help="the cosine's end")
    o.add_argument("--warmup-lr", type=float_in(0), default=1e-6, help="the warm-up's start")
    w = o.add_mutually_exclusive_group()
    w.add_argument("--warmup-epochs", type=float_in(0), default=0.0)
    w.add_argument("--warmup-steps", type=int_at_least(0), default=None)
    o.add_argument("--weight-decay", type=float_in(0), default=0.05)
    o.add_argument("--drop-path", type=float_in(0, 1, high_open=True), default=0.1)
    o.add_argument("--clip-grad", type=float_in(0, low_open=True), default=None, help="max gradient norm")
    o.add_argument("--ema-decay", type=float_in(0, 1, high_open=True), default=0.0,
                   help="keep an exponential moving average of the weights (e.g. 0.9998; 0: off); it is validated and saved as best")
    o.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    o.add_argument("--checkpoint-num", type=int_at_least(0), nargs=4, default=(0, 0, 0, 0), metavar="N",
                   help="blocks per stage recomputed in backward (saves activation memory)")
    o.add_argument("--pretrained", default=None,
                   help="a checkpoint file or an official name (uniformer_small_k400_16x4); 2-D ImageNet ones are inflated")
    o.add_argument("--freeze-stages", type=int, choices=range(5), default=0, metavar="{0..4}",
                   help="stages (patch embedding + blocks) kept frozen")
    v = p.add_argument_group("validation")
    v.add_argument("--eval-every", type=int_at_least(1), default=1, help="epochs between validations")
    v.add_argument("--eval-views", type=int_at_least(1), default=1)
    v.add_argument("--eval-crops", type=int, choices=(1, 3), default=1)
    v.add_argument("--eval-batch-size", type=int_at_least(1), default=None, help="default: --batch-size")
    r = p.add_argument_group("checkpoints and runs")
    r.add_argument("--output", default=None, help="directory for last.pth, best.pth, metrics.csv")
    r.add_argument("--resume", default=None, help="a last.pth to continue from")
    r.add_argument("--save-every", type=int_at_least(0), default=0, help="also save last.pth every N steps (0: per epoch)")
    r.add_argument("--keep-every", type=int_at_least(0), default=0, help="keep epochNNN.pth every N epochs (0: none)")
    r.add_argument("--fsdp", action="store_true")
    r.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.rand_augment.lower() == "none":
        args.rand_augment = None
    # Checked now rather than where they are used: after the data and the model are set up, or
    # after the first epoch for --output.
    pretrained = args.pretrained
    if pretrained is not None and not os.path.isfile(pretrained) and (
            os.sep in pretrained or pretrained.endswith(_PATH_SUFFIXES)):
        raise FileNotFoundError(f"--pretrained: file not found: {pretrained!r}")
    for option, path in (("--resume", args.resume), ("--label-map", args.label_map)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: file not found: {path!r}")
    for option, path in (("--data", args.data), ("--val", args.val)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{option}: no such list file or folder: {path!r}")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise FileNotFoundError(f"--data-root: not a directory: {args.data_root!r}")
    if args.output is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NotADirectoryError(f"--output: not a directory: {args.output!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    if args.ema_decay and args.fsdp:
        raise CLIError("--ema-decay with --fsdp: the average would need the sharded weights gathered at every "
                       "step; use DDP (no --fsdp) for EMA")
    if (args.mixup or args.cutmix) and args.mixup_prob > 0 and args.batch_size * args.num_sample < 2:
        raise CLIError("--mixup/--cutmix mix each clip with another of its batch: --batch-size x --num-sample must "
                       "be >= 2 (or --mixup 0 --cutmix 0)")
    return args


_RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch")


def _read_resume(path):
    """The training state in a ``last.pth`` this script wrote, read safely (tensors and plain
    containers only)."""
    ckpt = read_checkpoint_file(path)
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
    try:
        return _Run(args, resume, rank, world, device).run()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _all_gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class _Run:
    """One training run: the data, model, optimizer and loop that :func:`train` sets up."""

    def __init__(self, args, resume, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.show = rank == 0 and not args.no_progress
        self._setup_data()
        self._setup_model()
        self._setup_optimisation()
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.best = None  # {"epoch", "val_top1", ...} of best.pth
        self.unreadable = {}  # key -> reason, every video replaced so far
        self.replacements = 0
        self.partial = {}  # this process's totals so far in the epoch, saved with a mid-epoch last.pth
        if resume is not None:
            self._resume(resume)
        # Each process draws its own drop-path masks; the streams are saved in last.pth.
        if resume is None:
            torch.manual_seed(args.seed * 1_000_003 + rank)

    # ---------------------------------------------------------------------------------------------
    # Setup

    def _setup_data(self):
        args = self.args
        names = read_class_names(args.label_map) if args.label_map else None
        self.val_items = None
        if args.data:
            items, names = find_training_videos(args.data, args.data_root, names)
            if args.val:
                # Folders are classed by the training set's classes, so that both agree.
                self.val_items, _ = find_training_videos(args.val, args.data_root, names)
            labels = [i.label for i in items + (self.val_items or [])]
            self.num_classes = args.num_classes or (len(names) if names else max(labels) + 1)
            check_labels(items, self.num_classes, f"--data {args.data}")
            if self.val_items:
                check_labels(self.val_items, self.num_classes, f"--val {args.val}")
            flip = {"auto": None, "on": True, "off": False}[args.flip]
            recipe = TrainRecipe(args.frames, args.sample_rate, args.size, args.protocol, args.crop, flip=flip,
                                 rand_augment=args.rand_augment, erase_prob=args.erase_prob,
                                 num_sample=args.num_sample)
            if args.rand_augment:
                try:
                    RandAugment.from_string(args.rand_augment)  # a bad spec fails here, not in a worker
                except ValueError as e:
                    raise CLIError(f"--rand-augment: {e}") from None
            self.dataset = TrainClips(items, recipe, seed=args.seed)
        else:
            if args.val:
                raise CLIError("--val needs --data (synthetic clips have no videos to validate on)")
            self.num_classes = args.num_classes or (len(names) if names else 400)
            self.dataset = SyntheticClips(args.synthetic_size, args.frames, args.size, self.num_classes, args.seed)
        self.class_names = names if names is not None and len(names) == self.num_classes else None
        self.sampler = EpochSampler(len(self.dataset), world=self.world, rank=self.rank, seed=args.seed)
        self.loader = DataLoader(self.dataset, batch_size=args.batch_size, sampler=self.sampler,
                                 num_workers=args.workers, collate_fn=collate_clips, drop_last=True,
                                 pin_memory=self.device.type == "cuda", persistent_workers=args.workers > 0,
                                 # Its own generator: each epoch's iterator draws the workers' seeds,
                                 # which must not move the global stream that drop path draws from.
                                 generator=torch.Generator().manual_seed(args.seed))
        self.steps_per_epoch = (self.sampler.per_rank // args.batch_size) // args.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {args.batch_size} x --accum-steps {args.accum_steps} x {self.world} "
                             f"process(es) is more than the {len(self.dataset)} clips "
                             f"({'under --data' if args.data else '--synthetic-size'}): not one full step")

    def _setup_model(self):
        args = self.args
        torch.manual_seed(args.seed)  # the same initial weights in every process
        model = create_model(args.model, num_classes=self.num_classes, drop_path_rate=args.drop_path,
                             checkpoint_num=tuple(args.checkpoint_num))
        if args.pretrained:
            path, _ = resolve_pretrained(args.pretrained, args.model)
            load_checkpoint(model, path)
        self.frozen = freeze_stages(model, args.freeze_stages)
        if args.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.base = model.to(self.device)
        self.ema = None
        if args.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.base, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
        self.model = _wrap(self.base, args, self.world, self.device)
        self.eval_copy = None  # FSDP: a whole model to validate with

    def _setup_optimisation(self):
        args = self.args
        self.optimizer = torch.optim.AdamW(param_groups(self.base, args.weight_decay), lr=args.lr)
        total = args.epochs * self.steps_per_epoch
        warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, warmup, args.lr, args.warmup_lr, args.min_lr))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        mixing = (args.mixup > 0 or args.cutmix > 0) and args.mixup_prob > 0
        self.mixup = Mixup(self.num_classes, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob,
                           args.label_smoothing) if mixing else None

    def _resume(self, ckpt):
        args = self.args
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        try:
            set_state_dict(self.model, self.optimizer, model_state_dict=ckpt["model"],
                           optim_state_dict=ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None:
                if ckpt.get("ema") is None:
                    raise ValueError("it holds no EMA weights (it was written without --ema-decay)")
                self.ema.load_state_dict(ckpt["ema"])
        except (RuntimeError, KeyError, ValueError) as e:  # load_state_dict's size mismatches are RuntimeErrors
            reason = " ".join(str(e).split())
            raise ValueError(f"--resume {args.resume!r} does not fit this run (another --model, --num-classes "
                             f"or set of classes?): {reason}") from e
        saved_steps = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        if saved_steps != self.steps_per_epoch:
            raise ValueError(f"--resume {args.resume!r} was written with {saved_steps} steps per epoch; this run "
                             f"has {self.steps_per_epoch} (another --batch-size, --accum-steps, data or number "
                             f"of processes?)")
        epoch, step = ckpt["epoch"], ckpt.get("step", self.steps_per_epoch)
        self.start_epoch, self.start_step = (epoch + 1, 0) if step >= self.steps_per_epoch else (epoch, step)
        self.global_step = ckpt.get("global_step", self.start_epoch * self.steps_per_epoch + self.start_step)
        self.best = ckpt.get("best")
        self.unreadable = dict(ckpt.get("unreadable", {}))
        self.replacements = ckpt.get("replacements", 0)
        partial = ckpt.get("partial") or []
        self.partial = partial[self.rank] if len(partial) == self.world else {}
        states = ckpt.get("rng")
        if states and len(states) == self.world:
            torch.set_rng_state(states[self.rank]["torch"])
            if "cuda" in states[self.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
        else:
            torch.manual_seed(args.seed * 1_000_003 + self.rank + 7919 * self.global_step)
            if self.rank == 0:
                print(f"{PROG}: note: resumed with {self.world} process(es), saved with "
                      f"{len(states) if states else 'unknown'}: drop-path draws differ from an uninterrupted run",
                      file=sys.stderr)

    # ---------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> float:
        args = self.args
        self.writer = _MetricsWriter(args.output, self.start_epoch, self.rank == 0)
        last_loss = float("nan")
        try:
            for epoch in range(self.start_epoch, args.epochs):
                first = self.start_step if epoch == self.start_epoch else 0
                stats = self._train_epoch(epoch, first)
                last_loss = stats.pop("last_loss")
                if args.val and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                    stats.update(self._validate(epoch))
                self._end_epoch(epoch, stats)
        finally:
            self.writer.close()
        if self.rank == 0:
            parts = [f"done: {args.epochs - self.start_epoch} epoch(s), last loss {last_loss:.4f}"]
            if self.best is not None:
                parts.append(f"best val top-1 {self.best['val_top1']:.2%} (epoch {self.best['epoch'] + 1})")
            if self.unreadable:
                parts.append(f"{len(self.unreadable)} unreadable video(s) replaced {self.replacements} time(s)")
            print(", ".join(parts), file=sys.stderr)
        return last_loss

    def _train_epoch(self, epoch, first_step):
        args, accum = self.args, self.args.accum_steps
        _train_mode(self.model, self.frozen)
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=first_step * accum * args.batch_size)
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=self.show,
                           initial=first_step)
        # A run resumed within the epoch carries on the totals of its first part.
        part = self.partial if first_step else {}
        loss_sum = torch.tensor(part.get("loss_sum", 0.0), dtype=torch.float64, device=self.device)
        correct = torch.tensor(part.get("correct", 0), dtype=torch.int64, device=self.device)
        clips_seen, data_wait, last_loss = part.get("clips", 0), part.get("data_wait", 0.0), float("nan")
        started = time.perf_counter() - part.get("elapsed", 0.0)
        self.partial = {}
        batches = iter(self.loader)
        for step in range(first_step, self.steps_per_epoch):
            for micro in range(accum):
                t0 = time.perf_counter()
                clips, labels, failures = next(batches)
                data_wait += time.perf_counter() - t0
                self._note_failures(failures, bar)
                clips = clips.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                targets = labels
                if self.mixup is not None:
                    # A stream per (epoch, step, micro-batch, process): resuming anywhere draws the same.
                    rng = random.Random(f"uniformer_fast.mixup:{args.seed}:{epoch}:{step}:{micro}:{self.rank}")
                    clips, targets = self.mixup(clips, labels, rng)
                with self._sync(micro == accum - 1), self._autocast():
                    logits = self.model(clips)
                    loss = self._loss(logits, targets)
                self.scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().double() * labels.shape[0]
                correct += (logits.detach().argmax(-1) == labels).sum()
                clips_seen += labels.shape[0]
            if args.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.base)
            self.global_step += 1
            if step % 10 == 0 or step + 1 == self.steps_per_epoch:
                last_loss = loss.item()
                rate = clips_seen * self.world / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"loss {last_loss:.4f}, lr {self.scheduler.get_last_lr()[0]:.2e}, "
                                    f"{rate:.1f} clips/s, data wait {data_wait:.1f} s")
                self.writer.scalar("train/loss", last_loss, self.global_step)
                self.writer.scalar("train/lr", self.scheduler.get_last_lr()[0], self.global_step)
            bar.update(1)
            if args.save_every and self.global_step % args.save_every == 0 and step + 1 < self.steps_per_epoch:
                self.partial = {"loss_sum": loss_sum.item(), "correct": int(correct.item()), "clips": clips_seen,
                                "data_wait": data_wait, "elapsed": time.perf_counter() - started}
                self._save(epoch, step + 1)
                self.partial = {}
        bar.close()
        last_loss = loss.item()
        elapsed = time.perf_counter() - started
        totals = torch.tensor([loss_sum.item(), float(correct.item()), float(clips_seen), data_wait],
                              dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(totals)
        loss_total, correct_total, clips_total, wait_total = totals.tolist()
        return {"last_loss": last_loss, "lr": self.scheduler.get_last_lr()[0],
                "train_loss": loss_total / max(clips_total, 1), "train_top1": correct_total / max(clips_total, 1),
                "clips_per_s": clips_total / max(elapsed, 1e-9), "data_wait_s": wait_total / self.world,
                "epoch_s": elapsed}

    def _loss(self, logits, targets):
        if targets.ndim == 2:  # soft targets from mixup/cutmix, label smoothing included
            return soft_target_cross_entropy(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.args.label_smoothing)

    def _sync(self, last_micro):
        """Gradients are reduced across processes on the last micro-batch of a step only."""
        if self.world == 1 or last_micro:
            if self.args.fsdp and self.world > 1:
                self.model.set_requires_gradient_sync(True)
            return nullcontext()
        if self.args.fsdp:
            self.model.set_requires_gradient_sync(False)
            return nullcontext()
        return self.model.no_sync()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _note_failures(self, failures, bar):
        for key, reason in failures:
            self.replacements += 1
            if key not in self.unreadable:
                self.unreadable[key] = reason
                bar.write(f"{PROG}: unreadable video replaced by another: {key}: {reason}", file=sys.stderr)

    # ---------------------------------------------------------------------------------------------
    # Validation and checkpoints

    def _eval_model(self):
        if self.ema is not None:
            return self.ema.module
        if self.world > 1 and self.args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            if self.eval_copy is None:
                self.eval_copy = create_model(self.args.model, num_classes=self.num_classes).to(self.device)
            self.eval_copy.load_state_dict(state)
            return self.eval_copy
        return self.base

    def _validate(self, epoch):
        args = self.args
        model = self._eval_model()
        share = self.val_items[self.rank::self.world]
        precision = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.amp]
        result = None
        if share:
            result = evaluate(model, share, num_frames=args.frames, sample_rate=args.sample_rate,
                              views=args.eval_views, crops=args.eval_crops, size=args.size, protocol=args.protocol,
                              batch_size=args.eval_batch_size or args.batch_size, workers=args.workers,
                              device=self.device, precision=precision, progress=self.show)
        gathered = _all_gather(([] if result is None else result.predictions,
                                [] if result is None else result.failed), self.world)
        predictions = [p for preds, _ in gathered for p in preds]
        failed = [f for _, fails in gathered for f in fails]
        top1, top5, mean_class = accuracy(predictions)
        _train_mode(self.model, self.frozen)
        return {"val_top1": top1, "val_top5": top5, "val_mean_class": mean_class, "val_videos": len(predictions),
                "val_unreadable": len(failed)}

    def _end_epoch(self, epoch, stats):
        args = self.args
        improved = stats.get("val_top1") is not None and (self.best is None or stats["val_top1"] > self.best["val_top1"])
        if improved:
            self.best = {"epoch": epoch, **{k: stats[k] for k in ("val_top1", "val_top5", "val_mean_class")}}
        if args.output:
            if improved:
                self._save_best(epoch, stats)
            self._save(epoch, self.steps_per_epoch, keep=args.keep_every and (epoch + 1) % args.keep_every == 0)
        stats["unreadable"] = len(self.unreadable)
        self.writer.row(epoch, self.global_step, stats)
        if self.rank == 0:
            line = (f"epoch {epoch + 1}/{args.epochs}: loss {stats['train_loss']:.4f}, train top-1 "
                    f"{stats['train_top1']:.2%}, {stats['clips_per_s']:.1f} clips/s, data wait {stats['data_wait_s']:.1f} s")
            if stats.get("val_top1") is not None:
                line += (f"; val top-1 {stats['val_top1']:.2%}, top-5 {stats['val_top5']:.2%} "
                         f"({stats['val_videos']} videos)")
            print(line, file=sys.stderr)

    def _save(self, epoch, step, keep=False):
        """last.pth: everything a resumed run needs to continue exactly (written by process 0)."""
        model_sd, optim_sd = _state_dicts(self.model, self.optimizer)
        rng = _all_gather(_rng_state(self.device), self.world)
        partial = _all_gather(self.partial, self.world)
        if self.rank != 0:
            return
        os.makedirs(self.args.output, exist_ok=True)
        state = {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step,
                 "steps_per_epoch": self.steps_per_epoch, "global_step": self.global_step,
                 "ema": None if self.ema is None else self.ema.state_dict(), "rng": rng, "partial": partial, "best": self.best,
                 "unreadable": self.unreadable, "replacements": self.replacements,
                 "class_names": self.class_names, "args": vars(self.args)}
        # Atomically: a save cut short (Ctrl-C, a full disk) keeps the previous file.
        atomic_save(state, os.path.join(self.args.output, "last.pth"))
        if keep:
            atomic_save(state, os.path.join(self.args.output, f"epoch{epoch + 1:03d}.pth"))

    def _save_best(self, epoch, stats):
        if self.ema is not None:
            model_sd = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        else:
            model_sd, _ = _state_dicts(self.model, self.optimizer)
        if self.rank != 0:
            return
        os.makedirs(self.args.output, exist_ok=True)
        atomic_save({"model": model_sd, "epoch": epoch, "metrics": {k: v for k, v in stats.items()
                                                                     if k.startswith("val_")},
                     "class_names": self.class_names, "ema": self.ema is not None, "args": vars(self.args)},
                    os.path.join(self.args.output, "best.pth"))


METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_top1", "clips_per_s", "data_wait_s", "epoch_s",
                  "val_top1", "val_top5", "val_mean_class", "val_videos", "val_unreadable", "unreadable")


class _MetricsWriter:
    """metrics.csv (a row per epoch; a resumed run drops the rows of the epochs it redoes) and
    TensorBoard scalars when ``tensorboard`` is installed; process 0 only."""

    def __init__(self, output, start_epoch, active):
        self.path = os.path.join(output, "metrics.csv") if output and active else None
        self.tb = None
        if self.path is None:
            return
        os.makedirs(output, exist_ok=True)
        rows = []
        if os.path.isfile(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
        atomic_write(self.path, lambda f: self._write(f, rows), text=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print(f"{PROG}: note: tensorboard is not installed; metrics go to {self.path} only", file=sys.stderr)
        else:
            self.tb = SummaryWriter(os.path.join(output, "tensorboard"))

    @staticmethod
    def _write(f, rows):
        w = csv.DictWriter(f, METRIC_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)

    def scalar(self, tag, value, step):
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def row(self, epoch, step, stats):
        if self.path is None:
            return
        row = {"epoch": epoch + 1, "step": step, **stats}
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n").writerow(
                {k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                 for k in METRIC_COLUMNS})
        for k, v in stats.items():
            if isinstance(v, (int, float)):
                self.scalar(("val/" if k.startswith("val_") else "epoch/") + k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()

