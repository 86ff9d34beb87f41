"""uniformer_fast.cpu_memory: glibc keeps the memory a forward frees for the next one."""
import platform
import subprocess
import sys
import textwrap

import pytest

from uniformer_fast import create_model, cpu_memory

from helpers import TINY_HEAD32

needs_glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="glibc's mallopt")

# Page faults per UniFormer-S forward (1x4x160x160, one thread) after two warm-up calls, in a fresh
# process each (the setting is process-wide): glibc's defaults hand the freed heap top back to the
# kernel and serve large blocks from fresh mmaps, so every call faults its temporaries in again
# (1,500-3,500 here); kept, none.
_FORWARDS = textwrap.dedent("""
    import resource, sys, torch
    from uniformer_fast import create_model
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("uniformer_small", num_classes=10).eval()
    model.fuse_for_inference(keep_freed_memory=sys.argv[1] == "keep")
    x = torch.randn(1, 3, 4, 160, 160)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            model(x)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
""")


def _faults_per_forward(*modes):
    """Page faults per forward for each mode, the processes side by side (one thread each; the
    counts are per process, so running them together changes none)."""
    procs = [subprocess.Popen([sys.executable, "-c", _FORWARDS, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for mode in modes]
    faults = []
    for mode, proc in zip(modes, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{mode}: {err[-3000:]}"
        faults.append(float(out.strip()))
    return faults


@needs_glibc
def test_forwards_reuse_freed_memory_without_page_faults():
    default, kept = _faults_per_forward("default", "keep")
    assert default > 500, default
    assert kept < 20, kept


def test_fuse_for_inference_keeps_freed_memory_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    tiny = dict(TINY_HEAD32, embed_dim=(64, 64, 64, 64), num_classes=3)
    create_model("uniformer_small", **tiny).eval().fuse_for_inference(keep_freed_memory=False)
    assert calls == []
    create_model("uniformer_small", **tiny).eval().fuse_for_inference()
    assert calls == [1]
    with pytest.raises(TypeError, match="keep_freed_memory must be a bool"):
        create_model("uniformer_small", **tiny).eval().fuse_for_inference(keep_freed_memory="no")
