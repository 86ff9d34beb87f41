"""benchmarks/report.py on a small hand-made pytest-benchmark JSON: speedups over each group's
baseline, fraction of floor, JSON-lines input cut off mid-line, the plot."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from benchmarks import report  # noqa: E402


def _rec(group, backend, median, *, baseline=False, calls=1, level="op", floor=None, **info):
    extra = {"level": level, "backend": backend, "baseline": baseline, "calls_per_round": calls,
             "floor_s": floor, "frac_floor": None if floor is None else floor / (median / calls),
             "gbps": 100.0, "tflops": 1.5, "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
             "backend_used": backend, **info}
    return {"group": group, "name": f"test[{group}-{backend}]", "fullname": f"b.py::test[{group}-{backend}]",
            "stats": {"median": median, "min": median, "max": median, "mean": median, "stddev": 0.0,
                      "rounds": 5}, "extra_info": extra}


G1 = "dwconv3d DPE fwd | stage 1, f16: 8x64x8x56x56 bfloat16"
G2 = "attention fwd | stage 3, f16: B=8 N=1568 bfloat16"
RECORDS = [
    _rec(G1, "nn.Conv3d-contiguous", 400e-6, baseline=True, floor=17e-6),
    _rec(G1, "triton", 40e-6 * 4, calls=4, floor=17e-6),  # 4 calls per round: 40 us per call
    _rec(G2, "sdpa", 50e-6, floor=32e-6, kernels=["aten::_scaled_dot_product_flash_attention"]),
    _rec(G2, "reference", 500e-6, baseline=True, floor=32e-6, peak_mem_bytes=3 * 2 ** 30),
]


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": RECORDS}))
    return path


def test_speedups_and_per_call_time():
    groups = report.groups(RECORDS)
    assert list(groups) == sorted([G1, G2])
    assert [r["extra_info"]["backend"] for r in groups[G2]] == ["reference", "sdpa"]  # baseline first
    assert report.per_call(RECORDS[1]) == pytest.approx(40e-6)
    sp = report.speedups(groups[G1])
    assert sp == {"nn.Conv3d-contiguous": pytest.approx(1.0), "triton": pytest.approx(10.0)}
    assert report.speedups(groups[G2])["sdpa"] == pytest.approx(10.0)
    assert report.speedups([RECORDS[2]]) == {"sdpa": None}  # no baseline row: no speedup


def test_markdown_and_summary():
    md = report.markdown(RECORDS, ceilings={"copy_bw": 3.0e12, "matmul_bf16": 790e12, "source": "measured"})
    assert "| copy bandwidth (read + write) | 3 TB/s |" in md
    assert f"### {G1}" in md
    assert "| triton | 40.0 us | 10.00x | 100.0 | 1.50 | 17.0 us | 42% |" in md
    assert "| reference* | 500.0 us | 1.00x |" in md and "3.00 GiB" in md
    assert "_scaled_dot_product_flash_attention" in md
    s = report.summary(RECORDS)
    assert "| triton | 40.0 us | 10.00x | 42% |" in s
    assert "| sdpa | 50.0 us | 10.00x | 64% |" in s


def test_jsonl_partial_and_dedup(tmp_path, results):
    part = tmp_path / "part.jsonl"
    lines = [json.dumps(r) for r in RECORDS[:2]] + [json.dumps(RECORDS[2])[:40]]  # killed mid-write
    part.write_text("\n".join(lines))
    recs = report.load([str(part)])
    assert len(recs) == 2
    assert len(report.load([str(results), str(part)])) == 4  # same fullnames counted once


def test_main_writes_md_and_png(tmp_path, results, capsys):
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert report.main([str(results), "--md", str(md), "--png", str(png), "--summary"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![speedups per stage](r.png)" in md.read_text()
    assert "| group | baseline | best |" in capsys.readouterr().out
    assert report.main([str(tmp_path / "missing.json")]) == 1


GP = "cpu serving uniformer_small | 1x3x8x224x224 float32 2 thread(s)"


def _paired_record():
    rows = [
        {"backend": "official", "baseline": True, "median_s": 0.400, "time": {"median": 0.400, "min": 0.39, "max": 0.45},
         "vs_rival": {"median": 0.5, "min": 0.45, "max": 0.55}, "logits_rel_err": 0.0, "backend_used": "official eager"},
        {"backend": "auto+fused", "baseline": False, "median_s": 0.200, "time": {"median": 0.200, "min": 0.19, "max": 0.21},
         "vs_baseline": {"median": 2.05, "min": 1.9, "max": 2.2}, "vs_rival": {"median": 0.95, "min": 0.9, "max": 1.02},
         "logits_rel_err": 3.8e-7, "backend_used": "auto+fused", "frac_floor": 0.79},
        {"backend": "openvino", "baseline": False, "median_s": 0.190, "time": {"median": 0.190, "min": 0.18, "max": 0.2},
         "vs_baseline": {"median": 2.1, "min": 2.0, "max": 2.3}, "logits_rel_err": 7.7e-7,
         "backend_used": "openvino 2026.4.1 CPU, official export, LATENCY | static"},
        {"backend": "onnxruntime", "baseline": False, "skipped": "onnxruntime is not installed"},
    ]
    return {"group": GP, "name": "test_cpu_serving[b1-f8-224px-float32]",
            "fullname": "benchmarks/test_cpu_serving.py::test_cpu_serving[b1-f8-224px-float32]",
            "stats": {"median": 1.0, "min": 1.0, "max": 1.0, "mean": 1.0, "stddev": 0.0, "rounds": 7},
            "extra_info": {"level": "serving", "device": "cpu", "dtype": "float32", "rival_row": "openvino",
                           "baseline_row": "official", "l2": "7 rounds, 1 untimed call(s) of a row before each timed one",
                           "paired_rows": rows}}


def test_paired_group_becomes_one_row_per_engine(tmp_path):
    part = tmp_path / "serving.jsonl"
    part.write_text(json.dumps(_paired_record()) + "\n")  # one line: still JSON lines
    recs = report.load([str(part)])
    assert [r["extra_info"]["backend"] for r in recs] == ["official", "auto+fused", "openvino", "onnxruntime"]
    assert len({r["fullname"] for r in recs}) == 4
    assert all(r["extra_info"]["rival_row"] == "openvino" for r in recs)  # the group's fields on every row
    # speedup is the per-round ratio's median, not the ratio of medians (0.400 / 0.200 = 2.0)
    assert report.speedups(recs)["auto+fused"] == pytest.approx(2.05)
    md = report.markdown(recs)
    assert "| backend | time | range | speedup | vs openvino | logits err |" in md
    assert ("| auto+fused | 200.00 ms | 190.00 ms - 210.00 ms | 2.05x (1.90-2.20) | 0.95x (0.90-1.02) | 3.8e-07 |"
            in md)
    assert "| official* | 400.00 ms | 390.00 ms - 450.00 ms | 1.00x | 0.50x (0.45-0.55) |" in md
    assert "| openvino | 190.00 ms | 180.00 ms - 200.00 ms | 2.10x (2.00-2.30) | 1.00x |" in md
    assert "official export, LATENCY / static |" in md  # a '|' in what ran cannot break the table
    assert "| onnxruntime | - |" in md and "skipped: onnxruntime is not installed |" in md
    assert "79% |" in md
    s = report.summary(recs)
    assert "| openvino | 190.00 ms | 2.10x | - |" in s  # the fastest row; a skipped row is never "best"


class _FakeBenchmark:
    """What run_paired uses of pytest-benchmark's fixture."""

    def __init__(self, disabled=False):
        self.group, self.name, self.fullname, self.params = GP, "test_x", "b.py::test_x", None
        self.extra_info, self.disabled, self.stats = {}, disabled, None

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        for _ in range(rounds):
            target()


@pytest.mark.parametrize("disabled", [False, True])
def test_run_paired_alternates_rows_and_takes_per_round_ratios(monkeypatch, disabled):
    import torch
    threads = torch.get_num_threads()
    from benchmarks import floors, harness
    torch.set_num_threads(threads)  # harness sets the benchmarks' thread count at import: not ours

    cost = {"official": 4.0, "fast": 1.0, "ov-a": 2.0, "ov-b": 1.2}
    n_rounds, per_round = (1, 4) if disabled else (5, 8)  # timed: one warm call before each timed one
    clock, calls = {"t": 0.0}, []
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["t"])

    def row(name):
        def call():
            r = len(calls) // per_round
            calls.append(name)
            clock["t"] += cost[name] * (1.5 if r % 2 else 1.0)  # a machine that drifts round by round
            if name == "ov-b" and r == 2:
                clock["t"] += 10.0  # one slow round: the median ignores it, the range shows it
        return call

    rows = {k: row(k) for k in cost}
    work = floors.model("uniformer_small", 1, 8, 64, e=4)
    ceil = {"copy_bw": 1e10, "matmul_bf16": 1e11, "fp32": 1e11, "source": "test"}
    bench = _FakeBenchmark(disabled)
    harness.run_paired(bench, rows, baseline="official", rivals=["ov-a", "ov-b"], info={"level": "serving"},
                       work_by_row={k: work for k in rows}, info_by_row={k: {"backend_used": k} for k in rows},
                       skipped={"onnxruntime": "not installed"}, rounds=5, warm=1, ceilings=ceil)
    assert len(calls) == n_rounds * per_round
    out = {r["backend"]: r for r in bench.extra_info["paired_rows"]}
    assert out["onnxruntime"] == {"backend": "onnxruntime", "baseline": False, "skipped": "not installed"}
    assert out["official"]["baseline"] and "vs_baseline" not in out["official"]
    assert len(out["fast"]["times_s"]) == out["fast"]["rounds"] == n_rounds
    assert out["fast"]["frac_floor"] == pytest.approx(work.floor(ceil) / out["fast"]["median_s"])
    if disabled:
        assert calls == list(cost)
        return
    assert [calls[r * per_round] for r in range(n_rounds)] == ["official", "fast", "ov-a", "ov-b", "official"]
    assert calls[:2] == ["official", "official"]  # the warm call, then the timed one
    assert bench.extra_info["rival_row"] == "ov-b"  # the faster of the rivals, by median
    # the drift moves every time by 1.5x on odd rounds; the ratios within a round do not move
    assert out["fast"]["vs_baseline"] == {"median": 4.0, "min": 4.0, "max": 4.0, "q1": 4.0, "q3": 4.0}
    assert out["fast"]["vs_rival"]["median"] == pytest.approx(1.2)
    assert out["fast"]["vs_rival"]["max"] == pytest.approx(11.2)  # ov-b's slow round
    assert out["ov-b"]["time"]["median"] == pytest.approx(1.2 * 1.5)  # rounds 0, 4 / 1, 3 drift / 2 slow
    recs = report.expand({"group": GP, "name": "t", "extra_info": bench.extra_info})
    assert [r["extra_info"]["backend"] for r in recs] == ["official", "fast", "ov-a", "ov-b", "onnxruntime"]
