"""The benchmark suite (pytest-benchmark): ``pytest benchmarks/ --benchmark-only``.

Four levels, each parametrised over backends and UniFormer-S/B stage shapes: depthwise conv
(``test_dwconv3d.py``), attention (``test_attention.py``), blocks (``test_blocks.py``) and the
whole model (``test_whole_model.py``). ``floors.py`` is the byte/FLOP model and roofline floor,
``harness.py`` the timing rule, ``report.py`` turns the JSON into a markdown table and a plot,
``gpu_run.sh`` is the one-command GPU run. A package so that ``tests/`` can import ``floors``.
"""
