"""Times of the raw CPU kernels (torch.ops.rattention_ext.*), for before / after comparisons
of kernel changes on this shared, noisy machine: run it once per build, interleaved, and
compare the minima.

    PYTHONPATH=<build A>/python python benchmarks/kernel_times.py --threads 2
    PYTHONPATH=<build B>/python python benchmarks/kernel_times.py --threads 2

Prints one JSON line: the minimum over --reps runs (after a warm-up) per kernel, in ms.
Inputs are finite (the common path); --poison puts one NaN in v to time the exact masked
fallback instead.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import rattention_ext  # noqa: F401  (registers the ops)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.timing import time_cpu  # noqa: E402

ops = torch.ops.rattention_ext


def best_ms(fn, reps):
    """Minimum of `reps` timed calls after one warm-up, in ms."""
    t = time_cpu(lambda _: fn(), warmup=1, min_reps=reps, max_reps=reps, budget_s=0.0)
    return round(1e3 * t["min_s"], 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--Hq", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=2)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--poison", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, w = args.B, args.T, args.Hq, args.Hkv, args.D, args.window
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    if args.poison:
        v[0, T // 2, 0, 0] = float("nan")
    scale = D ** -0.5
    with torch.no_grad():
        o, lse = ops.swa_fwd(q, k, v, w, scale, None, None)
        go = torch.randn(o.shape, generator=g)
        o_r, st, ck = ops.rla_fwd(q, k, v, w, "softmax", None, 64, 4)
        res = {
            "swa_fwd": best_ms(lambda: ops.swa_fwd(q, k, v, w, scale, None, None), args.reps),
            "swa_bwd": best_ms(lambda: ops.swa_bwd(go, None, q, k, v, o, lse, w, scale, None,
                                                   None, False), args.reps),
            "rla_fwd": best_ms(lambda: ops.rla_fwd(q, k, v, w, "softmax", None, 64, 4),
                               args.reps),
            "rla_bwd": best_ms(lambda: ops.rla_bwd(go, None, q, k, v, None, ck, w, "softmax", 64,
                                                   4), args.reps),
        }
    res["shape"] = dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, window=w, threads=args.threads,
                        poison=args.poison)
    res["package"] = rattention_ext.__file__
    print(json.dumps(res))


if __name__ == "__main__":
    main()
