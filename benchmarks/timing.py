"""Timing: CUDA events (warm-up, median over many, input sets rotated so that the working
set exceeds L2) and CPU wall-clock medians.

`fn(i)` runs one call on input set `i % n_sets`; the caller builds the sets.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def l2_bytes(device: torch.device) -> int:
    """L2 size of the GPU (CPU: 0, the CPU path does not rotate inputs for cache reasons)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20))
    return 0


def num_input_sets(bytes_per_set: int, device: torch.device, max_sets: int = 16) -> int:
    """Enough input sets that rotating through them streams more than 2x L2 from memory."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_set <= 0:
        return 1
    return max(1, min(max_sets, -(-2 * l2 // bytes_per_set)))


def _summary(times: List[float]) -> Dict[str, float]:
    times = sorted(times)
    q1 = times[len(times) // 4]
    q3 = times[(3 * len(times)) // 4]
    return {"median_s": statistics.median(times), "min_s": times[0], "iqr_s": q3 - q1,
            "reps": len(times)}


def time_cpu(fn: Callable[[int], object], *, warmup: int = 1, min_reps: int = 3,
             max_reps: int = 20, budget_s: float = 5.0) -> Dict[str, float]:
    """Wall-clock median: warm-up calls, then at least `min_reps` timed calls and more while
    the total stays within `budget_s` (at most `max_reps`)."""
    for i in range(warmup):
        fn(i)
    times: List[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return _summary(times)


def time_cuda(fn: Callable[[int], object], *, warmup: int = 5, reps: int = 50,
              profile_range: bool = False) -> Dict[str, float]:
    """CUDA-event median of `reps` calls after `warmup` calls. With `profile_range`, the
    timed calls sit inside cudaProfilerStart/Stop (nsys --capture-range=cudaProfilerApi)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    if profile_range:
        torch.cuda.cudart().cudaProfilerStart()
    for i in range(reps):
        starts[i].record()
        fn(warmup + i)
        ends[i].record()
    torch.cuda.synchronize()
    if profile_range:
        torch.cuda.cudart().cudaProfilerStop()
    return _summary([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def time_cpu_interleaved(fns: Dict[str, Callable[[int], object]], *, warmup: int = 0,
                         min_reps: int = 3, max_reps: int = 20,
                         budget_s: float = 5.0,
                         initial: Optional[Dict[str, List[float]]] = None) -> Dict[str, Dict[str, float]]:
    """Wall-clock medians of several implementations timed in alternating rounds (ABBA...),
    so that load from other processes on a shared machine hits all of them alike and their
    ratio stays meaningful. `initial`: samples already taken (after warm-up) per name."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            fns[n](i)
    times: Dict[str, List[float]] = {n: list((initial or {}).get(n, [])) for n in names}
    start = time.perf_counter()
    done = min(len(t) for t in times.values())
    for i in range(done, max_reps):
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n](i)
            times[n].append(time.perf_counter() - t0)
        if i + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return {n: _summary(t) for n, t in times.items()}
