"""Byte and FLOP model of every benchmarked piece, and its roofline floor.

A piece of work is a list of :class:`Pass` es, each one kernel's worth of traffic (or one ideally
fused kernel): the bytes it must move through HBM (read its inputs and weights once, write its
outputs once), the FLOPs it must do on tensor cores (matmuls) and on CUDA cores (FP32 FMAs of the
depthwise convolutions). The floor of a pass follows ../shared/notes/floors.md::

    floor = max(bytes / copy_bandwidth, tc_flops / matmul_rate + cuda_flops / fp32_rate)

and the floor of a piece is the sum over its passes (the passes of a forward+backward or of a
model run one after another). Only matmul FLOPs and depthwise-conv FMAs are counted (2 FLOPs per
multiply-add); norms, GELU, softmax and the bias/residual adds of fused kernels are not, so the
floor is a lower bound.

What a pass must move, with e bytes per element and M tokens of C channels:

* depthwise conv k^3, forward: read x, write y (2 M C e) + weight and bias; backward (dx, dw, db in
  one pass): read x and dy, write dx (3 M C e) + read w, write dw and db.
* attention over packed qkv (B, N, 3C), forward: read qkv, write o: B N 4C e (+ write the fp32
  log-sum-exp when a backward follows); 4 B heads N^2 d tensor-core FLOPs.
  Backward: read qkv, o, do and the lse, write dqkv: B N 8C e; 2.5x the forward FLOPs
  (S recomputed, dV, dP, dQ, dK).
* a block, ideally fused (the floor of issue 6): forward reads x and the weights and writes y;
  backward reads x, dy and the weights, writes dx and the weight gradients; intermediates are
  recomputed. Matmuls on tensor cores (CBlock: conv1, conv2, fc1, fc2 = 2 M 10 C^2 FLOPs;
  SABlock: qkv, proj, fc1, fc2 = 2 M 12 C^2, plus attention), depthwise convs on CUDA cores.
* a whole model: the stem and patch embeddings (strided Conv3d as matmuls), every block as above,
  the head; a training step adds AdamW (read param, grad, two moments; write param and moments).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

# Ceilings (../shared/notes/floors.md): measured copy bandwidth (read + write counted), measured
# dense bf16 matmul rate, FP32 CUDA-core rate, L2 size, one launch.
CEILINGS = {
    "H100": {"copy_bw": 3.0e12, "copy_bw_spec": 3.35e12, "matmul_bf16": 790e12,
             "matmul_bf16_spec": 989e12, "fp32": 66.9e12, "l2_bytes": 50e6, "launch_s": 2.5e-6},
    "H200": {"copy_bw": 4.3e12, "copy_bw_spec": 4.8e12, "matmul_bf16": 790e12,
             "matmul_bf16_spec": 989e12, "fp32": 66.9e12, "l2_bytes": 60e6, "launch_s": 2.5e-6},
}


def ceilings_for(device_name: str) -> Optional[dict]:
    """The ceilings for a device: measured ones from ``$UNIFORMER_FAST_CEILINGS`` (a JSON file
    written by ``benchmarks/ceilings.py``, keys as in :data:`CEILINGS`) over the table's, else
    the table's entry whose key the device name contains, else None (a CPU: no floor)."""
    base = next((dict(v, source="floors.md") for k, v in CEILINGS.items() if k in device_name), None)
    path = os.environ.get("UNIFORMER_FAST_CEILINGS")
    if path and os.path.exists(path):
        with open(path) as f:
            measured = json.load(f)
        if measured.get("device") == device_name:
            base = {**(base or {}), **{k: v for k, v in measured.items() if v is not None},
                    "source": "measured"}
    if base is None or not all(base.get(k) for k in ("copy_bw", "matmul_bf16", "fp32")):
        return None
    return base


@dataclass
class Pass:
    """One kernel's (or one ideally fused kernel's) bytes and FLOPs."""
    name: str
    bytes: float
    tc_flops: float = 0.0  # on tensor cores (matmuls)
    cuda_flops: float = 0.0  # on CUDA cores, FP32 (depthwise-conv FMAs)

    def floor(self, ceil: dict) -> float:
        return max(self.bytes / ceil["copy_bw"],
                   self.tc_flops / ceil["matmul_bf16"] + self.cuda_flops / ceil["fp32"])


@dataclass
class Work:
    passes: list = field(default_factory=list)

    def __add__(self, other: "Work") -> "Work":
        return Work(self.passes + other.passes)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.passes)

    @property
    def tc_flops(self) -> float:
        return sum(p.tc_flops for p in self.passes)

    @property
    def cuda_flops(self) -> float:
        return sum(p.cuda_flops for p in self.passes)

    @property
    def flops(self) -> float:
        return self.tc_flops + self.cuda_flops

    def floor(self, ceil: Optional[dict]) -> Optional[float]:
        """Seconds; None without ceilings."""
        return None if ceil is None else sum(p.floor(ceil) for p in self.passes)


def _scale(work: Work, factor: float, suffix: str) -> Work:
    return Work([Pass(p.name + suffix, p.bytes * factor, p.tc_flops * factor, p.cuda_flops * factor)
                 for p in work.passes])


# ---------------------------------------------------------------------------------------------
# Ops


def dwconv3d(B, C, T, H, W, k, *, e, backward=False, bias=True) -> Work:
    """Depthwise k x k x k convolution (stride 1, same padding) over (B, C, T, H, W)."""
    M = B * T * H * W
    wbytes = C * k ** 3 * e + (C * e if bias else 0)
    fwd = Pass(f"dwconv{k}_fwd", 2 * M * C * e + wbytes, cuda_flops=2 * k ** 3 * M * C)
    if not backward:
        return Work([fwd])
    # dx = conv_transposed(dy) and dw = sum x * dy: 2 k^3 FLOPs each per element.
    bwd = Pass(f"dwconv{k}_bwd", 3 * M * C * e + 2 * wbytes, cuda_flops=4 * k ** 3 * M * C)
    return Work([fwd, bwd])


def attention(B, N, heads, head_dim, *, e, backward=False) -> Work:
    """Softmax attention on packed qkv (B, N, 3 * heads * head_dim) -> (B, N, heads * head_dim)."""
    C = heads * head_dim
    mm = 4 * B * heads * N * N * head_dim  # S = QK^T and O = PV, 2 N^2 d each
    lse = B * heads * N * 4 if backward else 0  # float32 statistics saved for the backward
    fwd = Pass("attention_fwd", B * N * 4 * C * e + lse, tc_flops=mm)
    if not backward:
        return Work([fwd])
    bwd = Pass("attention_bwd", B * N * 8 * C * e + lse, tc_flops=2.5 * mm)
    return Work([fwd, bwd])


def linear(M, K, N, *, e, backward=False, bias=True) -> Work:
    """``act(x @ W^T + b)`` over M tokens, x (M, K), W (N, K), activation fused (not counted).

    Forward: read x and W (+ b), write y; 2 M N K tensor-core FLOPs. Backward, ideally fused:
    read x, dy and W, write dx, dW (+ db); 4 M N K FLOPs (dx and dW). A GELU's derivative needs
    the pre-activation, read back or recomputed; neither is counted, so the floor is a lower bound.
    """
    b = N * e if bias else 0
    mm = 2 * M * N * K
    fwd = Pass("linear_fwd", (M * K + N * K + M * N) * e + b, tc_flops=mm)
    if not backward:
        return Work([fwd])
    bwd = Pass("linear_bwd", (2 * M * K + M * N + 2 * N * K) * e + b, tc_flops=2 * mm)
    return Work([fwd, bwd])


# ---------------------------------------------------------------------------------------------
# Blocks (ideally fused: one pass forward, one backward)


def _block_counts(kind, B, C, T, H, W, heads, mlp_ratio):
    M = B * T * H * W
    hidden = int(C * mlp_ratio)
    cuda = 2 * 27 * M * C  # the DPE 3x3x3
    if kind == "CBlock":
        weights = 2 * C * C + 2 * C * hidden + C * 125 + C * 27 + 10 * C + hidden  # + biases, BN
        tc = 2 * M * (2 * C * C + 2 * C * hidden)
        cuda += 2 * 125 * M * C  # Local MHRA 5x5x5
        attn = 0
    elif kind == "SABlock":
        weights = 4 * C * C + 2 * C * hidden + C * 27 + 10 * C + hidden
        tc = 2 * M * (4 * C * C + 2 * C * hidden)
        N = T * H * W
        attn = 4 * B * N * N * C  # 4 B heads N^2 head_dim
    else:
        raise ValueError(f"kind must be 'CBlock' or 'SABlock'; got {kind!r}")
    return M, weights, tc, attn, cuda


def block(kind, B, C, T, H, W, heads, *, e, backward=False, mlp_ratio=4.0) -> Work:
    """A CBlock or SABlock on (B, C, T, H, W): the floor of a fully fused block."""
    M, weights, tc, attn, cuda = _block_counts(kind, B, C, T, H, W, heads, mlp_ratio)
    fwd = Pass(f"{kind}_fwd", 2 * M * C * e + weights * e, tc_flops=tc + attn, cuda_flops=cuda)
    if not backward:
        return Work([fwd])
    bwd = Pass(f"{kind}_bwd", 3 * M * C * e + 2 * weights * e, tc_flops=2 * tc + 2.5 * attn,
               cuda_flops=2 * cuda)
    return Work([fwd, bwd])


# ---------------------------------------------------------------------------------------------
# Whole model

VARIANTS = {
    "uniformer_small": {"depth": (3, 4, 8, 3), "embed_dim": (64, 128, 320, 512), "head_dim": 64},
    "uniformer_base": {"depth": (5, 8, 20, 7), "embed_dim": (64, 128, 320, 512), "head_dim": 64},
}


def stage_shapes(B, frames, size, embed_dim=(64, 128, 320, 512)):
    """(B, C, T, H, W) of the activations of stages 1-4 (stem: T/2, H/4; then H/2 per stage)."""
    T = (frames + 2 - 3) // 2 + 1  # stem: kernel 3, stride 2, padding 1 in time
    return [(B, C, T, size // (4 * 2 ** i), size // (4 * 2 ** i)) for i, C in enumerate(embed_dim)]


def _conv_pass(name, B, cin, cout, t_in, s_in, t_out, s_out, kvol, e):
    m_out = B * t_out * s_out * s_out
    return Pass(name, (B * cin * t_in * s_in * s_in + m_out * cout + cin * cout * kvol + cout) * e,
                tc_flops=2 * m_out * cin * cout * kvol)


def model(variant, B, frames, size, *, e, train=False, num_classes=400, in_chans=3) -> Work:
    """One inference pass, or one training step (forward, backward, AdamW), of a UniFormer."""
    cfg = VARIANTS[variant]
    shapes = stage_shapes(B, frames, size, cfg["embed_dim"])
    fwd = []
    prev = (in_chans, frames, size)
    kvols = (3 * 4 * 4, 4, 4, 4)
    for i, ((_, C, T, H, W), n) in enumerate(zip(shapes, cfg["depth"])):
        cin, t_in, s_in = prev
        fwd.append(_conv_pass(f"embed{i + 1}", B, cin, C, t_in, s_in, T, H, kvols[i], e))
        kind = "CBlock" if i < 2 else "SABlock"
        for _ in range(n):
            fwd += block(kind, B, C, T, H, W, C // cfg["head_dim"], e=e).passes
        prev = (C, T, H)
    _, C, T, H, W = shapes[-1]
    fwd.append(Pass("head", B * C * T * H * W * e + C * num_classes * e, tc_flops=2 * B * C * num_classes))
    work = Work(fwd)
    if not train:
        return work
    # Backward: each pass reads what its forward read plus the output gradient and writes the
    # input and weight gradients (~1.5x the bytes), with 2x the matmul and conv FLOPs (2.5x for
    # attention); use the block model for blocks, the conv rule for the rest.
    bwd = []
    prev = (in_chans, frames, size)
    for i, ((_, C, T, H, W), n) in enumerate(zip(shapes, cfg["depth"])):
        cin, t_in, s_in = prev
        p = _conv_pass(f"embed{i + 1}", B, cin, C, t_in, s_in, T, H, kvols[i], e)
        bwd.append(Pass(p.name + "_bwd", 1.5 * p.bytes, 2 * p.tc_flops))
        kind = "CBlock" if i < 2 else "SABlock"
        for _ in range(n):
            bwd.append(block(kind, B, C, T, H, W, C // cfg["head_dim"], e=e, backward=True).passes[1])
        prev = (C, T, H)
    params = count_params(variant, num_classes=num_classes, in_chans=in_chans)
    # AdamW: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq.
    adamw = Pass("adamw", 7 * params * e)
    return Work(fwd + bwd + [adamw])


def count_params(variant, *, num_classes=400, in_chans=3, mlp_ratio=4.0) -> int:
    """Parameters of a UniFormer variant (UniFormer-S: 21,400,400 with 400 classes)."""
    cfg = VARIANTS[variant]
    total, cin = 0, in_chans
    kvols = (3 * 4 * 4, 4, 4, 4)
    for i, (C, n) in enumerate(zip(cfg["embed_dim"], cfg["depth"])):
        total += cin * C * kvols[i] + C + 2 * C  # patch conv + bias, LayerNorm
        hidden = int(C * mlp_ratio)
        mlp = C * hidden + hidden + hidden * C + C
        if i < 2:  # CBlock: DPE, BN, conv1, conv2, dw5, BN, MLP
            per = (27 * C + C) + 2 * C + 2 * (C * C + C) + (125 * C + C) + 2 * C + mlp
        else:  # SABlock: DPE, LN, qkv, proj, LN, MLP
            per = (27 * C + C) + 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + mlp
        total += n * per
        cin = C
    C = cfg["embed_dim"][-1]
    return total + 2 * C + C * num_classes + num_classes  # final BN, head


def achieved(work: Work, seconds: float, ceil: Optional[dict]) -> dict:
    """extra_info fields for a measured time: GB/s, TFLOP/s, floor and fraction of it."""
    floor = work.floor(ceil)
    return {
        "bytes": work.bytes, "flops": work.flops, "tc_flops": work.tc_flops,
        "cuda_flops": work.cuda_flops, "passes": [p.name for p in work.passes],
        "floor_s": floor,
        "gbps": work.bytes / seconds / 1e9 if seconds else None,
        "tflops": work.flops / seconds / 1e12 if seconds else None,
        # floor / measured: 1.0 means at the hardware limit.
        "frac_floor": floor / seconds if (floor and seconds) else None,
    }


# ---------------------------------------------------------------------------------------------
# Block traffic: what each implementation of a block moves, pass by pass (issue 6's byte model)
#
# Units: one "activation" is M x C elements (M = B*T*H*W tokens); the MLP hidden tensor is
# mlp_ratio activations wide. Each entry is (pass, activations read, activations written),
# forward, training mode (BatchNorm computes batch statistics: one extra read of its input).
# Weights are not counted here (they are small next to stage 1-2 activations); attention's
# own traffic is added separately for the SABlock, from its N x N terms.

BLOCK_PASSES = {
    # The eager reference: every PyTorch op reads its inputs and writes its output.
    ("CBlock", "reference"): [
        ("dpe conv3x3x3", 1, 1), ("dpe + x", 2, 1), ("bn1 statistics", 1, 0), ("bn1 normalise", 1, 1),
        ("conv1", 1, 1), ("dwconv5x5x5", 1, 1), ("conv2", 1, 1), ("+ residual", 2, 1),
        ("bn2 statistics", 1, 0), ("bn2 normalise", 1, 1), ("fc1", 1, "R"), ("gelu", "R", "R"),
        ("fc2", "R", 1), ("+ residual", 2, 1)],
    # This project's fused path: residual fused into the DPE kernel, which also emits bn1's
    # batch statistics (ops.dpe_bn_stats: no statistics pass), bn1 applied on load into conv1
    # (folded into conv1's weights for the step: no normalisation pass), the Local MHRA tail
    # (dwconv5 -> conv2 -> + x) one kernel reading the conv1 output and the residual stream and
    # emitting bn2's batch statistics (ops.local_mhra_tail_bn_stats: no statistics pass), bn2
    # folded into fc1's weights the same way (no normalisation pass).
    # Not counted, like the weights: the statistics' float32 partials (3 x C per 64-position
    # tile, ~9% of a bf16 activation, written once and read once by the merge), for each BN.
    ("CBlock", "fused"): [
        ("dpe conv3x3x3 + x, bn1 statistics", 1, 1), ("conv1, bn1 folded into its weights", 1, 1),
        ("dwconv5 + conv2 + x, bn2 statistics", 2, 1),
        ("fc1, bn2 folded into its weights", 1, "R"), ("gelu", "R", "R"),
        ("fc2", "R", 1), ("+ residual", 2, 1)],
    ("SABlock", "reference"): [
        ("dpe conv3x3x3", 1, 1), ("dpe + x", 2, 1), ("norm1", 1, 1), ("qkv", 1, 3),
        ("proj", 1, 1), ("+ residual", 2, 1), ("norm2", 1, 1), ("fc1", 1, "R"), ("gelu", "R", "R"),
        ("fc2", "R", 1), ("+ residual", 2, 1)],
    # DPE kernel writes the residual stream and the LayerNorm output in one pass.
    ("SABlock", "fused"): [
        ("dpe conv3x3x3 + x, norm1", 1, 2), ("qkv", 1, 3),
        ("proj", 1, 1), ("+ residual", 2, 1), ("norm2", 1, 1), ("fc1", 1, "R"), ("gelu", "R", "R"),
        ("fc2", "R", 1), ("+ residual", 2, 1)],
}


def _attention_traffic(B, N, heads, C, e, path):
    """Bytes of the attention core on packed qkv, forward."""
    if path == "fused":  # flash-style: read qkv, write o and the float32 log-sum-exp
        return B * N * 4 * C * e + B * heads * N * 4
    # Explicit softmax: S = q k^T written, softmax reads S and writes P, P v reads P, and the
    # head-merging transpose copies o once more.
    nn = B * heads * N * N * e
    return B * N * 3 * C * e + nn + 2 * nn + nn + B * N * C * e + 2 * B * N * C * e


def block_traffic(kind, B, C, T, H, W, heads, *, e, path, mlp_ratio=4.0) -> Work:
    """Forward bytes of one block as ``path`` ("reference", "fused") runs it, pass by pass."""
    if path == "floor":
        return Work([Pass(f"{kind} floor", 2 * B * C * T * H * W * e)])
    M = B * T * H * W
    wide = {"R": mlp_ratio}
    passes = [Pass(name, (wide.get(r, r) + wide.get(w, w)) * M * C * e)
              for name, r, w in BLOCK_PASSES[kind, path]]
    if kind == "SABlock":
        passes.append(Pass("attention", _attention_traffic(B, T * H * W, heads, C, e, path)))
    return Work(passes)


def block_traffic_table(B=8, frames=16, size=224, e=2, variant="uniformer_small") -> str:
    """Markdown: per block kind and stage shape, forward bytes of the reference and the fused
    path against the floor (read the block's input once, write its output once)."""
    cfg = VARIANTS[variant]
    rows = ["| block | stage | shape | reference MB | fused MB | floor MB | fused / reference | fused / floor |",
            "|---|---|---|---|---|---|---|---|"]
    for i, (b, C, T, H, W) in enumerate(stage_shapes(B, frames, size, cfg["embed_dim"])):
        kind = "CBlock" if i < 2 else "SABlock"
        heads = C // cfg["head_dim"]
        ref, fused, floor = (block_traffic(kind, b, C, T, H, W, heads, e=e, path=p).bytes
                             for p in ("reference", "fused", "floor"))
        rows.append(f"| {kind} | {i + 1} | {b}x{C}x{T}x{H}x{W} | {ref / 1e6:.1f} | {fused / 1e6:.1f} | "
                    f"{floor / 1e6:.1f} | {fused / ref:.2f} | {fused / floor:.1f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(block_traffic_table())
