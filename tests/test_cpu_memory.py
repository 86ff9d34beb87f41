"""uniformer_fast.cpu_memory: glibc keeps the memory a forward frees for the next one."""
import platform
import subprocess
import sys
import textwrap

import pytest

from uniformer_fast import create_model, cpu_memory

needs_glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="glibc's mallopt")

# Ten 8 MB blocks allocated, touched and freed per round: with glibc's defaults the dynamic mmap
# threshold rises to 8 MB, the 80 MB heap top then exceeds the 16 MB trim threshold and goes back
# to the kernel each round, so every round faults its pages in again.
_ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    from uniformer_fast import cpu_memory
    if sys.argv[1] == "keep":
        assert cpu_memory.keep_freed_memory()
    def round_():
        blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(10)]
        del blocks
    for _ in range(3):
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        round_()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@needs_glibc
def test_freed_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert default > 5 * 10 * (8 << 20) // 4096 // 2, default  # at least half the pages fault each round
    assert kept < default // 20, (kept, default)


def test_fuse_for_inference_keeps_freed_memory_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    tiny = dict(depth=(1, 1, 1, 1), embed_dim=(64, 64, 64, 64), head_dim=32, num_classes=3)
    create_model("uniformer_small", **tiny).eval().fuse_for_inference(keep_freed_memory=False)
    assert calls == []
    create_model("uniformer_small", **tiny).eval().fuse_for_inference()
    assert calls == [1]
    with pytest.raises(TypeError, match="keep_freed_memory must be a bool"):
        create_model("uniformer_small", **tiny).eval().fuse_for_inference(keep_freed_memory="no")
