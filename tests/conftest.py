import os

# Triton's interpreter must be on before triton is imported, so CPU tensors run the kernels.
# A GPU run turns it off with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import default_workers, usable_cpus  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # A worker takes its share of the cores: two workers on two cores each running two OpenMP
    # threads spin against each other (the fast tier took 192 s so, 140 s with one thread each).
    torch.set_num_threads(max(1, usable_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Plain ``pytest`` spreads the tests over the machine's cores (``helpers.default_workers``
    says when and how many). Runs before xdist's own hook: a conftest's ``tryfirst`` hook is
    called before those of the plugins registered earlier."""
    workers = default_workers(config)
    if workers:
        config.option.numprocesses = workers
        if config.option.dist == "no":
            # Idle workers take tests from busy ones: the durations are uneven (seconds for an
            # ahead-of-time compile, milliseconds for most), and stealing evens out the end.
            config.option.dist = "worksteal"


# The project's relative tolerances by dtype, against a float64 reference: float32 1e-5 (2e-3 where
# tf32 matmuls run), bfloat16 2e-2, float16 3e-3; NaN never passes.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _assert_close(actual, expected, dtype=None, rtol=None, name="tensor"):
    """Compare with a reference computed in float64: max |a - e| <= rtol * max |e| (+ tiny atol).

    NaN or inf anywhere in ``actual`` fails, whatever the reference holds.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    rtol = rtol if rtol is not None else RTOL[dtype or actual.dtype]
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= rtol * scale + 1e-30 * (scale == 0) or err <= 1e-12, \
        f"{name}: max abs error {err:.3e} > rtol {rtol:g} x max |ref| {scale:.3e} (rel {err / max(scale, 1e-300):.2e})"


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def empty():
    """torch.empty that fills with NaN, so reading an unwritten element shows."""
    def make(*shape, **kwargs):
        return torch.empty(*shape, **kwargs).fill_(math.nan)
    return make


@pytest.fixture
def cpu_native_dtypes(monkeypatch):
    """``set(*dtypes)``: make ``ops.cpu_native_dtypes()`` report float32 and ``dtypes``, so a model
    under CPU autocast takes the path of a CPU with (or, with none given, without) instructions
    for its dtype, whatever this CPU has."""
    from uniformer_fast import ops
    from uniformer_fast.ops import cpu_inference

    def set_(*dtypes):
        native = lambda: frozenset({torch.float32, *dtypes})  # noqa: E731
        monkeypatch.setattr(ops, "cpu_native_dtypes", native)
        monkeypatch.setattr(cpu_inference, "cpu_native_dtypes", native)  # the model's policy asks here
    return set_


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Forget what torch.compile compiled once the test ends. A code object compiled again at a new
    input shape (UniFormer.forward in two tests) is recompiled with dynamic shapes, which sent
    inductor's CPU code generation into minutes of symbolic simplification."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _runs_triton(item) -> bool:
    """A test runs Triton kernels if it says so (``@needs_triton``, ``pytestmark``), compiles them
    ahead of time (the ``compile_for_gpu`` / ``gpu_kernels`` fixtures), or is the "triton" case of
    a parametrised backend."""
    if item.get_closest_marker("triton") is not None:
        return True
    if {"compile_for_gpu", "gpu_kernels"} & set(getattr(item, "fixturenames", ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any("backend" in name and value == "triton" for name, value in params.items())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the tests that run Triton kernels ``triton`` (CI's Triton 3.6 environment selects them
    with ``-m triton``; deselection by ``-m`` runs after this hook), and skip them where triton is
    not installed."""
    from uniformer_fast.kernels import HAS_TRITON
    skip = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if _runs_triton(item):
            item.add_marker(pytest.mark.triton)
            if not HAS_TRITON:
                item.add_marker(skip)


# Kernel tests take their tensors' device from the `device` fixture: "cpu" (the default; Triton
# kernels then run under the interpreter) or, in the GPU run (benchmarks/gpu_run.sh), "cuda" with
# TRITON_INTERPRET=0 so the compiled kernels are tested.
TEST_DEVICE = os.environ.get("UNIFORMER_FAST_TEST_DEVICE", "cpu")


@pytest.fixture
def gpu_kernels(monkeypatch):
    """``gpu_kernels(name)``: the module ``uniformer_fast.kernels.<name>`` with its launchers making
    their GPU choices (block sizes, warps), also when the tests run under the interpreter: what
    the ahead-of-time compile tests compile."""
    import importlib

    def load(name):
        module = importlib.import_module(f"uniformer_fast.kernels.{name}")
        monkeypatch.setattr(module, "INTERPRET", False)
        return module
    return load


@pytest.fixture
def device():
    """The device kernel tests run on: ``$UNIFORMER_FAST_TEST_DEVICE`` (``cpu`` unless set)."""
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"UNIFORMER_FAST_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
    return torch.device(TEST_DEVICE)


def _compile_for_gpu(kernel, signature, constexprs, arch, num_warps=4, num_stages=3, aligned=()):
    """Compile a Triton kernel ahead of time for ``sm_<arch>`` on the CPU; no GPU needed.

    ``constexprs`` may give a pointer argument as None (a launch without that tensor). A
    ``@triton.heuristics`` kernel derives its flags from the arguments, as a launch does: do not
    pass them.

    ``aligned`` names the arguments the launcher guarantees divisible by 16 (pointers 16-byte
    aligned, strides multiples of 16), as Triton's specialisation does at run time; without it
    the compiler cannot emit 16-byte vector loads.

    Returns a dict: ``regs``, ``stack`` and ``local`` bytes per thread (``local`` > 0 or ``stack``
    > 0 means register spills), ``shared`` bytes per program, ``ptx`` and ``sass`` text.
    """
    import re
    import subprocess
    import tempfile

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Heuristics

    constexprs = dict(constexprs)
    while isinstance(kernel, Heuristics):
        # A @triton.heuristics kernel: derive its flags as a launch would, from the arguments
        # (a pointer named in the signature is given; one passed as a None constexpr is not).
        args = {**{name: name for name in signature}, **constexprs}
        for name, rule in kernel.values.items():
            assert name not in constexprs, f"{name} is derived by the kernel's heuristics; do not pass it"
            constexprs[name] = rule(args)
        kernel = kernel.fn
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        # Under TRITON_INTERPRET=1, @triton.jit yields an interpreted function; compile its source.
        kernel = triton.runtime.jit.JITFunction(kernel.fn)
    # In the kernel's argument order (attrs index into it); constexprs include None pointers.
    names = list(kernel.arg_names)
    assert set(names) == set(signature) | set(constexprs), \
        f"signature and constexprs must name every argument once: {sorted(set(names) ^ (set(signature) | set(constexprs)))}"
    sig = {name: signature.get(name, "constexpr") for name in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared": compiled.metadata.shared, "ptx": compiled.asm["ptx"], "sass": sass}


def _jit_modules(fn):
    """The globals of fn's module and of every module whose @triton.jit helpers it calls, transitively
    (a kernel in kernels/dpe.py calls conv_tile, which calls depthwise_tile in kernels/dwconv3d.py)."""
    seen, todo = {}, [fn.__globals__]
    while todo:
        ns = todo.pop()
        if id(ns) in seen:
            continue
        seen[id(ns)] = ns
        for obj in list(ns.values()):
            inner = getattr(obj, "fn", None)
            if callable(inner) and getattr(inner, "__globals__", None) is not None and obj is not fn:
                if getattr(inner, "__module__", "").startswith("uniformer_fast"):
                    todo.append(inner.__globals__)
    return list(seen.values())


def _make_compilable(monkeypatch, namespaces):
    """Undo what Triton's interpreter did to these namespaces, for the test's duration.

    Under TRITON_INTERPRET=1, @triton.jit functions (ours and triton.language's own, e.g. tl.sum's
    combine) are interpreted functions the compiler cannot call: swap in JITFunctions of the same
    source. And an interpreted kernel that called a triton.language @jit function leaves the
    builtins of triton.language wrapped for the interpreter (triton 3.9: nothing restores them),
    after which every compile in the process fails: unwrap them.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    for ns in namespaces:
        for name, obj in list(ns.items()):
            if isinstance(obj, interpreter.InterpretedFunction):
                monkeypatch.setitem(ns, name, JITFunction(obj.fn))
                continue
            orig = obj
            while (getattr(orig, "__code__", None) is not None
                   and orig.__code__.co_filename == interpreter.__file__
                   and "member" in (orig.__kwdefaults__ or {})):
                orig = orig.__kwdefaults__["member"]
            if orig is not obj:
                monkeypatch.setitem(ns, name, orig)


@pytest.fixture
def compile_for_gpu(monkeypatch):
    """``compile_for_gpu(kernel, signature, constexprs, arch, num_warps=4, num_stages=3, aligned=())``, see
    :func:`_compile_for_gpu`. Signature maps each runtime argument to a Triton type ("*bf16", "i32").
    Works whatever interpreted kernels ran earlier in the process."""
    pytest.importorskip("triton")
    import triton.language as tl

    tl_namespaces = [vars(m) for m in (tl, tl.core, tl.math, tl.standard, tl.tensor,
                                       tl.core.tensor_descriptor_base)]
    _make_compilable(monkeypatch, tl_namespaces)

    def compile_(kernel, *args, **kwargs):
        fn = kernel
        while not inspect.isfunction(fn):  # through @triton.heuristics and the jit wrapper
            fn = fn.fn
        _make_compilable(monkeypatch, _jit_modules(fn))
        return _compile_for_gpu(kernel, *args, **kwargs)

    return compile_
