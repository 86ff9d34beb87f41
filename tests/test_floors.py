"""The byte and FLOP model of the benchmarks (benchmarks/floors.py) against hand-computed values
for UniFormer-S at batch 8, 16 frames, 224 px, bf16 (../shared/notes/floors.md)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from benchmarks import floors  # noqa: E402

H100 = floors.CEILINGS["H100"]
E = 2  # bf16


def test_stage_shapes():
    assert floors.stage_shapes(8, 16, 224) == [(8, 64, 8, 56, 56), (8, 128, 8, 28, 28),
                                               (8, 320, 8, 14, 14), (8, 512, 8, 7, 7)]
    assert floors.stage_shapes(8, 32, 224)[2] == (8, 320, 16, 14, 14)


def test_dpe_stage1_bytes_flops_floor():
    # 8 * 64 * 8 * 56 * 56 = 12,845,056 elements; forward reads x and writes y (bf16), plus the
    # 64 x 27 weights and 64 biases.
    elems = 8 * 64 * 8 * 56 * 56
    assert elems == 12_845_056
    fwd = floors.dwconv3d(8, 64, 8, 56, 56, 3, e=E)
    assert fwd.bytes == 2 * elems * 2 + (64 * 27 + 64) * 2 == 51_383_808
    assert fwd.cuda_flops == 2 * 27 * elems == 693_633_024 and fwd.tc_flops == 0
    # Memory-bound: 51.38 MB / 3.0 TB/s = 17.1 us (floors.md: 17 us); compute 10.4 us.
    assert fwd.floor(H100) == pytest.approx(51_383_808 / 3.0e12)
    assert fwd.floor(H100) * 1e6 == pytest.approx(17.13, abs=0.01)

    both = floors.dwconv3d(8, 64, 8, 56, 56, 3, e=E, backward=True)
    bwd = both.passes[1]
    assert bwd.bytes == 3 * elems * 2 + 2 * (64 * 27 + 64) * 2  # read x, dy; write dx; w in, dw + db out
    assert bwd.cuda_flops == 4 * 27 * elems  # dx and dw, 2 FLOPs per multiply-add each
    assert bwd.floor(H100) * 1e6 == pytest.approx(25.7, abs=0.05)  # floors.md: 26 us
    assert both.floor(H100) == pytest.approx(fwd.floor(H100) + bwd.floor(H100))


def test_dwconv5_stage1_is_compute_bound():
    w = floors.dwconv3d(8, 64, 8, 56, 56, 5, e=E, backward=True)
    elems = 12_845_056
    assert w.passes[0].cuda_flops == 250 * elems == 3_211_264_000
    assert w.passes[0].floor(H100) == pytest.approx(3_211_264_000 / 66.9e12)  # 48 us
    assert w.passes[1].floor(H100) * 1e6 == pytest.approx(96.0, abs=0.1)


def test_attention_stage3_and_stage4():
    # Stage 3: N = 8 * 14 * 14 = 1568 tokens, 5 heads of 64, batch 8.
    w = floors.attention(8, 1568, 5, 64, e=E)
    assert w.tc_flops == 4 * 8 * 5 * 1568 ** 2 * 64 == 25_176_309_760
    assert w.bytes == 8 * 1568 * (3 * 320 + 320) * 2 == 32_112_640
    assert w.floor(H100) * 1e6 == pytest.approx(31.87, abs=0.01)  # tensor-core bound (floors.md: 32 us)
    both = floors.attention(8, 1568, 5, 64, e=E, backward=True)
    assert both.passes[1].tc_flops == 2.5 * 25_176_309_760
    assert both.passes[1].floor(H100) * 1e6 == pytest.approx(79.7, abs=0.1)  # floors.md: 80 us
    # lse: 8 x 5 x 1568 float32 written by the forward, read by the backward.
    assert both.passes[0].bytes == 32_112_640 + 8 * 5 * 1568 * 4
    # Stage 4: N = 392, 8 heads: bytes-bound, 12.85 MB -> 4.3 us.
    s4 = floors.attention(8, 392, 8, 64, e=E)
    assert s4.bytes == 8 * 392 * 4 * 512 * 2 == 12_845_056
    assert s4.floor(H100) * 1e6 == pytest.approx(4.28, abs=0.01)


def test_linear_mlp_halves_stage1_and_stage4():
    # Stage 1 fc1 + GELU: M = 8 * 8 * 56 * 56 = 200,704 tokens, K = 64, N = 256, bf16.
    M = 200_704
    w = floors.linear(M, 64, 256, e=E)
    assert w.tc_flops == 2 * M * 256 * 64 == 6_576_668_672
    assert w.bytes == (M * 64 + 256 * 64 + M * 256) * 2 + 256 * 2 == 128_483_840
    assert w.floor(H100) * 1e6 == pytest.approx(42.83, abs=0.01)  # bytes-bound (compute: 8.3 us)
    both = floors.linear(M, 64, 256, e=E, backward=True)
    # Backward: read x, dy, W; write dx, dW, db; dx and dW are 2 M N K FLOPs each.
    assert both.passes[1].bytes == (2 * M * 64 + M * 256 + 2 * 256 * 64) * 2 + 256 * 2 == 154_206_720
    assert both.passes[1].tc_flops == 2 * 6_576_668_672
    assert floors.linear(M, 64, 256, e=E, bias=False).bytes == 128_483_328
    # Stage 4 fc2: M = 8 * 8 * 7 * 7 = 3136, K = 2048, N = 512: the same FLOPs, tensor-core bound.
    s4 = floors.linear(3136, 2048, 512, e=E)
    assert s4.tc_flops == 6_576_668_672 and s4.bytes == 18_154_496
    assert s4.floor(H100) == pytest.approx(6_576_668_672 / 790e12)  # 8.3 us > 6.1 us of bytes


def test_cblock_stage1_counts():
    B, C, T, H, W = 8, 64, 8, 56, 56
    M = B * T * H * W
    w = floors.block("CBlock", B, C, T, H, W, 1, e=E)
    # Matmuls: conv1, conv2 (C x C), fc1 (C x 4C), fc2 (4C x C): 2 M (2 C^2 + 8 C^2) FLOPs.
    assert w.tc_flops == 2 * M * 10 * C * C == 16_441_671_680  # 16.4 GFLOP
    assert w.cuda_flops == 2 * (27 + 125) * M * C
    weights = 2 * C * C + 2 * C * 256 + C * 125 + C * 27 + 10 * C + 256
    assert w.bytes == (2 * M * C + weights) * E


def test_param_count_and_model_floor():
    assert floors.count_params("uniformer_small") == 21_400_400
    assert floors.count_params("uniformer_base") == 49_813_200
    fwd = floors.model("uniformer_small", 8, 16, 224, e=E)
    train = floors.model("uniformer_small", 8, 16, 224, e=E, train=True)
    # floors.md: ~1.3 ms forward and ~4.3 ms per training step, idealised; this model counts only
    # matmuls and depthwise convs, so it sits a little lower.
    assert 1.0e-3 < fwd.floor(H100) < 1.4e-3
    assert 3.3e-3 < train.floor(H100) < 4.5e-3
    assert train.passes[-1].name == "adamw" and train.passes[-1].bytes == 7 * 21_400_400 * E


def test_achieved_and_ceilings():
    w = floors.attention(8, 392, 8, 64, e=E)
    a = floors.achieved(w, 8.56e-6, H100)
    assert a["gbps"] == pytest.approx(12_845_056 / 8.56e-6 / 1e9)
    assert a["frac_floor"] == pytest.approx(w.floor(H100) / 8.56e-6)
    assert floors.achieved(w, 1e-3, None)["frac_floor"] is None
    assert floors.ceilings_for("NVIDIA H100 80GB HBM3")["copy_bw"] == 3.0e12
    assert floors.ceilings_for("NVIDIA H200")["copy_bw"] == 4.3e12
    assert floors.ceilings_for("cpu") is None


def test_block_traffic_by_hand():
    # Stage 1 of UniFormer-S, batch 8, 16x224, bf16: one activation A = 8*8*56*56 tokens x 64 x 2 B.
    A = 8 * 8 * 56 * 56 * 64 * 2
    args = ("CBlock", 8, 64, 8, 56, 56, 1)
    # Eager: conv 2 + add 3 + BN 1+2 + conv1 2 + dw5 2 + conv2 2 + add 3 + BN 1+2
    #        + fc1 (1+4) + gelu (4+4) + fc2 (4+1) + add 3 = 41 activations.
    assert floors.block_traffic(*args, e=2, path="reference").bytes == 41 * A
    # Fused: DPE with residual, emitting bn1's statistics, 2 (no statistics pass: -1); bn1 folded
    # into conv1 (no normalisation pass: -2), conv1 2; MHRA tail reads conv1's output and x,
    # writes x, emitting bn2's statistics (3; no statistics pass: -1); bn2 folded into fc1 (no
    # normalisation pass: -2), fc1 (1+4) + gelu (4+4) + fc2 (4+1) + add 3: 28.
    assert floors.block_traffic(*args, e=2, path="fused").bytes == 28 * A
    assert floors.block_traffic(*args, e=2, path="floor").bytes == 2 * A
    # SABlock stage 3 (N = 8*14*14 = 1568, 5 heads): the fused attention reads qkv, writes o and lse.
    B, C, N, h = 8, 320, 1568, 5
    A3 = B * N * C * 2
    fused = floors.block_traffic("SABlock", B, C, 8, 14, 14, h, e=2, path="fused").bytes
    # DPE+norm1 (1+2) + qkv (1+3) + proj 2 + add 3 + norm2 2 + MLP 18 + add 3 = 35, + attention.
    assert fused == 35 * A3 + 4 * A3 + B * h * N * 4
    table = floors.block_traffic_table()
    assert table.count("\n") == 5 and "| CBlock | 1 | 8x64x8x56x56 | 1053.3 | 719.3 | 51.4 |" in table
