"""Benchmarks for rattention_ext: ``python -m benchmarks --help``.

Modules: timing (CUDA events / wall clock), flops (window-counted FLOPs and bytes),
ceilings (measured matmul FLOP/s and copy bandwidth), backends (ours and the peers),
runner (one case, isolated), report (JSON, markdown, plots), profiling (nsys/ncu).
"""
