"""Package layout: ``uniformer_fast/`` plus the Triton kernels in ``kernels/``, installed as the
subpackage ``uniformer_fast.kernels``. Metadata lives in pyproject.toml."""
from setuptools import setup

setup(
    packages=["uniformer_fast", "uniformer_fast.ops", "uniformer_fast.kernels"],
    package_dir={"uniformer_fast.kernels": "kernels"},
)
