"""Run one case on several backends: build inputs, measure peak memory, time them.

On CPU each run happens in a fresh subprocess (``python -m benchmarks.runner JSON``) so
that the peak resident-set growth (``getrusage`` maxrss) belongs to that case alone and an
out-of-memory kill loses one row, not the run. On CUDA it runs in-process and the peak is
``torch.cuda.max_memory_allocated`` above what was allocated before the call.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import flops as fl
from .backends import BACKENDS, Case, Unsupported, bytes_per_set, make_inputs
from .timing import num_input_sets, time_cpu_interleaved, time_cuda

RESULT_TAG = "BENCH_RESULT "


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _cpu_peak_mb(fn):
    """(peak resident-set growth during one call of fn(1) after a warm-up call fn(0) in MB,
    the wall time of that call: it counts as the first timed sample).

    Linux: reset the high-water mark (/proc/self/clear_refs "5"), then VmHWM - VmRSS. The
    warm-up call keeps one-time allocations (thread pools, library init) out of the number.
    Elsewhere: ru_maxrss growth over both calls (an upper bound)."""
    try:
        fn(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        fn(1)
        t = time.perf_counter() - t0
        return max(0, _status_kb("VmHWM") - base) / 1024, t
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(0)
        t0 = time.perf_counter()
        fn(1)
        t = time.perf_counter() - t0
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, t


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _base_row(case: Case, backend: str) -> Dict:
    es = torch.empty(0, dtype=case.torch_dtype).element_size()
    return {**case.as_dict(), "backend": backend, "status": "ok",
            "flops": fl.op_flops(case.op, case.B, case.T, case.Hq, case.Hkv, case.D, case.w, case.chunk),
            "bytes": fl.op_bytes(case.op, case.B, case.T, case.Hq, case.Hkv, case.D, case.w, es)}


def _error(e: Exception) -> str:
    if os.environ.get("RATTENTION_BENCH_TRACEBACK"):
        traceback.print_exc()
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"error: {msg[:200]}"


def _finish(row: Dict, t: Dict) -> Dict:
    row.update(t)
    row["gflops"] = row["flops"] / t["median_s"] / 1e9
    row["gbytes_per_s"] = row["bytes"] / t["median_s"] / 1e9
    return row


def run_group(case: Case, backends: List[str], timing: Dict) -> List[Dict]:
    """One row per backend for one case: status ('ok' / 'skipped: ...' / 'error: ...'), the
    median time, window-counted FLOP/s, bytes/s and peak memory.

    CPU: each backend's peak memory is measured on its own, then all backends are timed in
    alternating rounds (their ratio is what a noisy machine cannot spoil). CUDA: each
    backend in turn, CUDA events, inputs rotated past L2."""
    dev = torch.device(case.device)
    rows = {be: _base_row(case, be) for be in backends}
    fns, first = {}, {}
    for be in backends:
        b = BACKENDS[be]
        why = b.available(case.device)
        if why:
            rows[be]["status"] = f"skipped: {why}"
            continue
        try:
            sets = make_inputs(case, num_input_sets(bytes_per_set(case), dev))
            fn = b.build(case, sets)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(0)
                torch.cuda.synchronize()
                rows[be]["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                _finish(rows[be], time_cuda(fn, warmup=timing.get("warmup", 5),
                                            reps=timing.get("reps", 50),
                                            profile_range=timing.get("profile_range", False)))
            else:
                rows[be]["peak_mb"], first[be] = _cpu_peak_mb(fn)  # warm-up + first sample
                fns[be] = fn
        except Unsupported as e:
            rows[be]["status"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - a failing backend is a row, not a crash
            rows[be]["status"] = _error(e)
    if fns:
        try:
            ts = time_cpu_interleaved(fns, warmup=max(0, timing.get("warmup", 1) - 2),
                                      min_reps=timing.get("min_reps", 3),
                                      max_reps=timing.get("max_reps", 20),
                                      budget_s=timing.get("budget_s", 3.0),
                                      initial={be: [first[be]] for be in fns})
            for be, t in ts.items():
                _finish(rows[be], t)
        except Exception as e:  # noqa: BLE001
            for be in fns:
                rows[be]["status"] = _error(e)
    return [rows[be] for be in backends]


def run_isolated(case: Case, backends: List[str], timing: Dict, timeout_s: float = 1200) -> List[Dict]:
    """run_group in a fresh Python process (CPU: per-case peak RSS, OOM isolation)."""
    payload = json.dumps({"case": case.as_dict(), "backends": backends, "timing": timing})
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(root), env.get("PYTHONPATH", "")] if p)

    def fail(msg):
        return [{**_base_row(case, be), "status": f"error: {msg}"} for be in backends]
    try:
        r = subprocess.run([sys.executable, "-m", "benchmarks.runner", payload], cwd=root, env=env,
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return fail(f"timed out after {timeout_s:.0f} s")
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if r.returncode < 0:
        return fail(f"killed by signal {-r.returncode} (out of memory?)")
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]
    return fail(tail[0][:200])


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    rows = run_group(Case(**spec["case"]), spec["backends"], spec["timing"])
    print(RESULT_TAG + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
