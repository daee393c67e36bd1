"""The launch-plan shapes, once each, between cudaProfilerStart / Stop, for Nsight Compute.

    ncu --profile-from-start off ... python tools/gpu_profile_cases.py [--only S1|D1|D2]

S1: forward + backward of rattention_ext.forward at B=1, T=4096, Hq=16, Hkv=4, D=128, w=512,
bf16; D1 / D2: one decode_step at batch 1 / 64 with a full ring (the cache prefilled with
4096 tokens). Each shape runs once unprofiled first (allocations, module load), then once
profiled. tools/gpu_session.sh runs it under ncu.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_PKG = Path(__file__).resolve().parent.parent / "python"
if any((_PKG / "rattention_ext").glob("_C*")):  # the in-place build (make dev, gpu_check)
    sys.path.insert(0, str(_PKG))
import rattention_ext  # noqa: E402

Hq, Hkv, D, W, T = 16, 4, 128, 512, 4096
DT = torch.bfloat16


DEV = "cuda"


def randn(*shape, g):
    return torch.randn(*shape, device=DEV, dtype=DT, generator=g)


def s1(g):
    q = randn(1, T, Hq, D, g=g).requires_grad_(True)
    k = randn(1, T, Hkv, D, g=g).requires_grad_(True)
    v = randn(1, T, Hkv, D, g=g).requires_grad_(True)
    go = randn(1, T, Hq, D, g=g)

    def step():
        out = rattention_ext.forward(q, k, v, window_size=W)
        torch.autograd.grad(out, (q, k, v), go)
    return step


def decode(batch, g):
    q = randn(batch, T, Hq, D, g=g)
    k = randn(batch, T, Hkv, D, g=g)
    v = randn(batch, T, Hkv, D, g=g)
    cache = rattention_ext.RAttentionCache.empty(batch, W, Hkv, D, device=DEV, dtype=DT)
    rattention_ext.prefill(q, k, v, cache, window_size=W)
    q1, k1, v1 = randn(batch, 1, Hq, D, g=g), randn(batch, 1, Hkv, D, g=g), randn(batch, 1, Hkv, D, g=g)

    def step():  # the ring stays full: every step is the same work
        rattention_ext.decode_step(q1, k1, v1, cache, window_size=W)
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("S1", "D1", "D2"), action="append")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: the same steps, unprofiled (a check of this script)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    cuda = DEV == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_profile_cases: no CUDA device visible to torch", file=sys.stderr)
        return 2
    g = torch.Generator(device=DEV).manual_seed(0)
    makers = {"S1": lambda: s1(g), "D1": lambda: decode(1, g), "D2": lambda: decode(64, g)}
    for name in args.only or makers:
        step = makers[name]()
        step()  # unprofiled: allocations, module load
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"gpu_profile_cases: {name} {'profiled' if cuda else 'ran (unprofiled)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
