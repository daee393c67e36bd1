"""Nsight Systems / Nsight Compute command lines for our kernels (see benchmarks/README.md).

The profiled program is this driver on CUDA with only our backend, and the timed calls
inside cudaProfilerStart/Stop, so nsys captures exactly the timed region (no warm-up, no
autotuning) and ncu can be told to skip the warm-up launches.
Our kernels' names contain swa/rla/decode and fwd/bwd; the public API wraps each call in
an NVTX range (rattention.forward, rattention.sliding_window_attention, ...).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from typing import List

KERNEL_REGEX = "regex:(swa|rla|decode|mix).*(fwd|bwd|step)|(fwd|bwd|step).*(swa|rla|decode|mix)"


def target(args) -> List[str]:
    t = args.T[0] if args.T else 8192
    d = args.D[0] if args.D else 128
    ops = args.ops or ["fwd_bwd"]
    return [sys.executable, "-m", "benchmarks", "--device", "cuda", "--backends", "ours",
            "--ops", *ops, "--T", str(t), "--D", str(d), "--B", str(args.B), "--Hq", str(args.Hq),
            "--Hkv", str(args.Hkv), "--w", str(args.w), "--dtype", args.dtype,
            "--reps", str(args.reps or 10), "--warmup", "3", "--profile-range", "--no-save"]


def command(tool: str, args) -> List[str]:
    out = f"{args.out}/{tool}_rattention"
    if tool == "nsys":
        return ["nsys", "profile", "--trace=cuda,nvtx,osrt", "--capture-range=cudaProfilerApi",
                "--capture-range-end=stop", "--cuda-memory-usage=true", "--force-overwrite=true",
                "-o", out, *target(args)]
    if tool == "ncu":
        # --launch-skip/-count: a few launches of each of our kernels after the warm-up.
        return ["ncu", "--profile-from-start", "off", "--kernel-name", KERNEL_REGEX,
                "--launch-skip", "0", "--launch-count", "12", "--set", "full",
                "--import-source", "yes", "--nvtx", "-f", "-o", out, *target(args)]
    raise ValueError(tool)


def main(tool: str, args) -> int:
    cmd = command(tool, args)
    print(shlex.join(cmd))
    if tool == "nsys":
        print(f"# then: nsys stats --report cuda_gpu_kern_sum,nvtx_sum {args.out}/nsys_rattention.nsys-rep")
    else:
        print(f"# then: ncu --import {args.out}/ncu_rattention.ncu-rep --page details "
              "--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy")
    if not args.run:
        return 0
    if shutil.which(tool) is None:
        print(f"[bench] {tool} is not on PATH: install Nsight {'Systems' if tool == 'nsys' else 'Compute'} "
              "(it ships with the CUDA toolkit) and rerun", file=sys.stderr)
        return 2
    return subprocess.call(cmd)
