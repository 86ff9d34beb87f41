"""benchmarks/serving_profile.py: its arguments, and one small profile of both engines."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
_threads = torch.get_num_threads()
from benchmarks import serving_profile  # noqa: E402
torch.set_num_threads(_threads)  # benchmarks.harness sets the benchmarks' thread count at import: not ours


@pytest.mark.parametrize("argv, message", [
    (["--clip", "1x8"], "--clip must be BATCHxFRAMESxSIZE"),
    (["--clip", "1x8x16"], "size >= 32"),
    (["--clip", "0x8x64"], "batch >= 1"),
    (["--threads", "0"], "--threads and --rounds must be >= 1"),
    (["--precision", "fp8"], "invalid choice"),
])
def test_bad_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serving_profile.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_profiles_both_engines(capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    threads = torch.get_num_threads()
    try:
        assert serving_profile.main(["--clip", "1x8x32", "--rounds", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "### uniformer_small 1x3x8x32x32 float32, 1 thread(s), 1 rounds alternated" in out
    ours, ov = out.split("**OpenVINO")
    for part in ("attention (960)", "mlp (64)", "linear (320)", "local_mhra_tail (64)", "the rest (norms, adds, layout, Python)"):
        assert f"| {part} |" in ours
    assert "| FullyConnected (" in ov and "its counters sum to" in ov
