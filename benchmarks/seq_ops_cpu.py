"""Packed batches at the op level (CPU), as ratios measured in one run: forward + backward of
both branches (swa_fwd + rla_fwd, then their backward ops through autograd) on

- packed:  the documents back to back, one call with cu_seqlens;
- padded:  every document padded to the longest one, a dense [N, T_max] batch;
- loop:    one dense call per document.

Document lengths are drawn from a long-tailed (log-normal) distribution, rescaled so that
padding to the longest document costs about --pad-factor x the tokens.

    PYTHONPATH=python python benchmarks/seq_ops_cpu.py [--total 4096] [--threads 2]

Timings are the minimum over --reps runs after a warm-up (the machine is shared).
"""
import argparse
import math
import time

import torch

import rattention_ext  # noqa: F401  (registers the ops)

ops = torch.ops.rattention_ext


def best_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def doc_lengths(total, pad_factor, seed):
    """Lengths summing to `total` whose padded size N * max is about pad_factor * total."""
    g = torch.Generator().manual_seed(seed)
    for sigma in torch.linspace(0.2, 2.5, 60).tolist():
        raw = torch.empty(64).log_normal_(0.0, sigma, generator=g)
        lens = (raw / raw.sum() * total).round().long().clamp_min(1)
        lens[-1] += total - lens.sum()
        if lens[-1] >= 1 and len(lens) * lens.max().item() >= pad_factor * total:
            return lens.tolist()
    return lens.tolist()


def fwd_bwd(q, k, v, w, cu=None):
    D = q.shape[-1]
    o_swa, _ = ops.swa_fwd(q, k, v, w, 1 / math.sqrt(D), None, None, cu)
    o_rla, _, _ = ops.rla_fwd(q, k, v, w, "softmax", None, 64, 4, cu, None)
    (o_swa.sum() + o_rla.sum()).backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--pad-factor", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Hq, Hkv, D, w = 8, 2, 128, args.window
    lens = doc_lengths(args.total, args.pad_factor, seed=0)
    N, T_max, total = len(lens), max(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(total, H, D, requires_grad=True) for H in (Hq, Hkv, Hkv))
    qp, kp, vp = (torch.randn(N, T_max, H, D, requires_grad=True) for H in (Hq, Hkv, Hkv))
    docs = [tuple(torch.randn(1, n, H, D, requires_grad=True) for H in (Hq, Hkv, Hkv))
            for n in lens]

    t_packed = best_time(lambda: fwd_bwd(q, k, v, w, cu), args.reps)
    t_padded = best_time(lambda: fwd_bwd(qp, kp, vp, w), args.reps)
    t_loop = best_time(lambda: [fwd_bwd(*d, w) for d in docs], args.reps)
    print(f"threads={args.threads} N={N} docs, total={total}, longest={T_max} "
          f"(padding: {N * T_max / total:.2f}x tokens), Hq={Hq} Hkv={Hkv} D={D} w={w}")
    print(f"fwd+bwd (swa + rla ops): packed {t_packed * 1e3:.0f} ms, padded "
          f"{t_padded * 1e3:.0f} ms, per-document loop {t_loop * 1e3:.0f} ms")
    print(f"padded / packed = {t_padded / t_packed:.2f}x, loop / packed = "
          f"{t_loop / t_packed:.2f}x")


if __name__ == "__main__":
    main()
