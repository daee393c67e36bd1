"""CPU SWA kernels as ratios measured in one run (this machine is shared and noisy):

1. swa_fwd GFLOP/s on window-counted FLOPs (4 * T_eff * D per query head, T_eff = keys in
   each query's window) vs torch.matmul float32 GFLOP/s (2048^3), same threads.
2. forward+backward of rattention_ext.sliding_window_attention vs plain PyTorch
   (scaled_dot_product_attention with a band mask, GQA), T=2048.

    PYTHONPATH=python python benchmarks/swa_cpu_ratio.py [--threads 2] [--reps 5]

Timings are the minimum over --reps runs (after a warm-up), so a burst of load from other
processes does not count as kernel time.
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

import rattention_ext


def best_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ops = torch.ops.rattention_ext

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    B, T, Hq, Hkv, D, w = 1, args.T, 8, 2, 128, args.window
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    flops = 4 * sum(min(t, w) + 1 for t in range(T)) * D * Hq * B
    t_mm = best_time(lambda: a @ b, args.reps)
    t_swa = best_time(lambda: ops.swa_fwd(q, k, v, w, 1 / math.sqrt(D), None, None), args.reps)
    t_mm = min(t_mm, best_time(lambda: a @ b, args.reps))
    mm, swa = 2 * n**3 / t_mm / 1e9, flops / t_swa / 1e9
    print(f"threads={args.threads}  matmul f32 {n}^3: {mm:.1f} GFLOP/s")
    print(f"swa_fwd B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} w={w}: {t_swa * 1e3:.1f} ms, "
          f"{swa:.1f} GFLOP/s (window-counted) = {100 * swa / mm:.1f}% of matmul")

    T2 = 2048
    q, k, v = (torch.randn(B, T2, H, D, requires_grad=True) for H in (Hq, Hkv, Hkv))
    go = torch.randn(B, T2, Hq, D)
    t = torch.arange(T2)
    band = (t[:, None] - t[None, :] >= 0) & (t[:, None] - t[None, :] <= w)

    def ours():
        o = rattention_ext.sliding_window_attention(q, k, v, window_size=w)
        torch.autograd.grad(o, (q, k, v), go)

    def plain():
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=band, enable_gqa=True).transpose(1, 2)
        torch.autograd.grad(o, (q, k, v), go)

    t_ours, t_plain = best_time(ours, args.reps), best_time(plain, args.reps)
    print(f"fwd+bwd T={T2} w={w}: ours {t_ours * 1e3:.1f} ms, SDPA+band mask "
          f"{t_plain * 1e3:.1f} ms, speedup {t_plain / t_ours:.2f}x")


if __name__ == "__main__":
    main()
