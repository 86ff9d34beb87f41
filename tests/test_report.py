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
