"""Package layout: ``uniformer_fast/`` (the Triton kernels in its subpackage ``kernels/``) and the
C++ CPU kernels in ``csrc/``, compiled into
``uniformer_fast._C`` (pybind11, no torch headers, so the binary does not depend on the torch
version). Metadata lives in pyproject.toml.

Compiler flags: -O3 and OpenMP. The kernels carry their own AVX2 and AVX-512 variants, chosen at
run time, so the default build runs on any x86-64 CPU; ``UNIFORMER_FAST_NATIVE=1`` adds
``-march=native`` for a build that only has to run on the machine building it (never for a wheel).
``UNIFORMER_FAST_CPP=0`` builds no extension at all (a GPU machine that never runs the CPU kernels
installs in seconds; the "cpp" backend is then unavailable and says so).
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

compile_args = ["-O3", "-ffp-contract=fast", "-Wno-psabi"]
link_args = []
if sys.platform != "win32":
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if os.environ.get("UNIFORMER_FAST_NATIVE", "0") not in ("", "0"):
    compile_args.append("-march=native")

ext_modules = [] if os.environ.get("UNIFORMER_FAST_CPP", "1") == "0" else [
    Pybind11Extension(
        "uniformer_fast._C",
        ["csrc/module.cpp", "csrc/dwconv3d.cpp", "csrc/attention.cpp", "csrc/gelu.cpp"],
        depends=["csrc/isa.h", "csrc/per_isa.h", "csrc/dwconv3d.h", "csrc/dwconv3d_impl.h", "csrc/attention.h",
                 "csrc/gelu.h", "csrc/gelu_impl.h"],
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # A machine that cannot compile it still installs the package: "auto" then warns once and
        # runs the reference path, and backend="cpp" raises with the import error.
        optional=True,
    ),
]

setup(
    packages=find_packages(include=["uniformer_fast", "uniformer_fast.*"]),
    # The class-name lists (uniformer_fast.class_names) travel inside the package.
    package_data={"uniformer_fast.data": ["classes/*.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
