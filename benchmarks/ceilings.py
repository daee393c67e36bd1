"""The machine's own ceilings, measured in the same run as the kernels: dense matmul
FLOP/s in the benchmark dtype and copy bandwidth. Kernel throughput is reported as a
fraction of these (a ratio survives a noisy, shared machine better than an absolute)."""
from __future__ import annotations

from typing import Dict

import torch

from .timing import time_cpu, time_cuda


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 0) -> Dict[str, float]:
    """Median FLOP/s of an n x n x n matmul (CPU: n=2048, CUDA: n=8192).

    CPU n=2048: at 1024 the library's own overheads still show on 2-core machines and the
    "ceiling" comes out below what tiled kernels reach."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda i: torch.matmul(a, b, out=c)  # noqa: E731
    t = (time_cuda(fn, warmup=5, reps=20) if device.type == "cuda"
         else time_cpu(fn, warmup=2, min_reps=5, max_reps=30, budget_s=2.0))
    return {"n": n, "flops_per_s": 2.0 * n ** 3 / t["median_s"], "median_s": t["median_s"]}


def copy_bytes_per_s(device: torch.device, mbytes: int = 0) -> Dict[str, float]:
    """Median bytes/s of a device-to-device copy (bytes read + bytes written)."""
    mbytes = mbytes or (1024 if device.type == "cuda" else 256)
    n = mbytes * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda i: dst.copy_(src)  # noqa: E731
    t = (time_cuda(fn, warmup=3, reps=20) if device.type == "cuda"
         else time_cpu(fn, warmup=2, min_reps=5, max_reps=30, budget_s=2.0))
    return {"mbytes": mbytes, "bytes_per_s": 2.0 * n * 4 / t["median_s"], "median_s": t["median_s"]}


def measure(device: torch.device, dtype: torch.dtype) -> Dict[str, Dict[str, float]]:
    return {"matmul": matmul_flops_per_s(device, dtype), "copy": copy_bytes_per_s(device)}
