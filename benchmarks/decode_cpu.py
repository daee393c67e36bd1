"""Decode-step latency on CPU: ``rattention_ext.decode_step`` vs recomputing with ``forward``.

One RAttention layer (default: the paper's 3B shape, Hq/Hkv = 16/4, D = 128, w = 512) with
``--context`` tokens already in the cache. For each batch size:

- ``decode``: one ``decode_step`` (one new token per sequence), median of repeats;
- ``recompute``: what a cache-less implementation pays for the same token:
  ``rattention_ext.forward`` over all ``context + 1`` tokens (last row kept);
- ``GB/s``: bytes a decode step must touch (ring keys/values, state read + write, q/k/v/out)
  over its time, next to the machine's measured copy bandwidth (``copy_`` of 256 MiB into a preallocated buffer),
  so the number reads as a fraction of this machine's ceiling.

Prints a table and writes ``benchmarks/results/decode_cpu_<host>_<date>.json`` with the
machine, date and git commit.

    PYTHONPATH=python python benchmarks/decode_cpu.py                 # batches 1..64
    PYTHONPATH=python python benchmarks/decode_cpu.py --quick         # smaller, seconds
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path

import torch

import rattention_ext
from rattention_ext import RAttentionCache, cache_bytes, decode_step

ROOT = Path(__file__).resolve().parent.parent


def _time(fn, min_reps: int, budget_s: float, with_min: bool = False):
    """Median seconds of fn() over at least min_reps runs (after one warm-up) or budget_s
    (and the fastest run, with_min: on a shared machine it shows what the code can do)."""
    fn()
    times, t_start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - t_start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1 and time.perf_counter() - t_start > 4 * budget_s:
            break
    return (statistics.median(times), min(times)) if with_min else statistics.median(times)


def _copy_bandwidth() -> float:
    # 256 MiB into a preallocated buffer (a fresh clone would time page faults instead)
    x = torch.empty(64 * 1024 * 1024, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), 3, 1.0)
    return 2 * x.numel() * 4 / t / 1e9  # read + write


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _available(fn) -> bool:
    x = torch.randn(1, 2, 1, 4)
    try:
        fn(x, x, x, window_size=0)
        return True
    except RuntimeError as e:
        if "not built yet" in str(e):
            return False
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--heads-q", type=int, default=16)
    ap.add_argument("--heads-kv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--context", type=int, default=1024, help="tokens already in the cache")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--no-recompute", action="store_true", help="skip the forward baseline")
    ap.add_argument("--max-recompute-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="batches 1,8 and context 256")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.context = "1,8", 256
    dtype = getattr(torch, args.dtype)
    Hq, Hkv, D, w, L = args.heads_q, args.heads_kv, args.head_dim, args.window, args.context
    batches = [int(b) for b in args.batches.split(",")]
    # Baseline: forward over the whole sequence; while the CPU RLA kernel is a placeholder,
    # the SWA branch alone (a lower bound on forward's cost), labelled as such.
    baseline = None
    if not args.no_recompute:
        if _available(rattention_ext.forward):
            baseline = ("forward", rattention_ext.forward)
        elif _available(rattention_ext.sliding_window_attention):
            baseline = ("swa_only_lower_bound", rattention_ext.sliding_window_attention)
    do_recompute = baseline is not None
    torch.manual_seed(0)

    bw = _copy_bandwidth()
    rows = []
    for B in batches:
        # A cache at position L: positions set directly and the ring/state filled with random
        # values (decode cost does not depend on the values; filling by prefill would time
        # the prefill too).
        cache = RAttentionCache.empty(B, w, Hkv, D, dtype=dtype)
        cache.keys.normal_()
        cache.values.normal_()
        cache.state.normal_()
        q1 = torch.randn(B, 1, Hq, D, dtype=dtype)
        k1 = torch.randn(B, 1, Hkv, D, dtype=dtype)
        v1 = torch.randn(B, 1, Hkv, D, dtype=dtype)

        def step():
            cache.positions.fill_(L)  # keep every repeat at the same position
            decode_step(q1, k1, v1, cache)

        t_dec, t_dec_min = _time(step, 5, 1.0, with_min=True)
        e = cache.keys.element_size()
        acc_e = cache.state.element_size()
        n_keys = min(L + 1, w + 1)
        bytes_step = B * (2 * n_keys * Hkv * D * e            # ring read
                          + 2 * Hkv * 2 * D * D * acc_e        # state read + write
                          + (2 * Hq + 4 * Hkv) * D * e)        # q, out, k/v in, ring write
        row = {"batch": B, "decode_ms": t_dec * 1e3, "decode_min_ms": t_dec_min * 1e3, "tokens_per_s": B / t_dec,
               "decode_GBps": bytes_step / t_dec / 1e9, "bytes_per_step": bytes_step}
        if do_recompute and B <= args.max_recompute_batch:
            q = torch.randn(B, L + 1, Hq, D, dtype=dtype)
            k = torch.randn(B, L + 1, Hkv, D, dtype=dtype)
            v = torch.randn(B, L + 1, Hkv, D, dtype=dtype)
            fn = baseline[1]
            t_fwd = _time(lambda: fn(q, k, v, window_size=w)[:, -1:], 1, 2.0)
            row.update(recompute_ms=t_fwd * 1e3, speedup=t_fwd / t_dec, recompute_with=baseline[0])
        rows.append(row)
        print(f"  B={B:3d}  decode {t_dec * 1e3:8.3f} ms" +
              (f"  recompute {row['recompute_ms']:9.2f} ms" if "recompute_ms" in row else ""),
              flush=True)

    nb = cache_bytes(Hkv, D, w, L + 1, dtype=dtype)
    head = (f"decode_step on CPU, {args.dtype}, Hq/Hkv={Hq}/{Hkv}, D={D}, w={w}, "
            f"context={L} tokens, one layer; torch threads={torch.get_num_threads()}; "
            f"copy bandwidth {bw:.1f} GB/s")
    lines = [head, "",
             "| batch | decode step (ms) | fastest (ms) | tokens/s | GB/s (% of copy) | "
             + ("recompute with forward (ms)" if baseline is None or baseline[0] == "forward"
                else "recompute, SWA branch only (ms)") + " | speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rec = f"{r['recompute_ms']:.2f}" if "recompute_ms" in r else "n/a"
        spd = f"{r['speedup']:.0f}x" if "speedup" in r else "n/a"
        lines.append(f"| {r['batch']} | {r['decode_ms']:.3f} | {r['decode_min_ms']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | "
                     f"{r['decode_GBps']:.1f} ({100 * r['decode_GBps'] / bw:.0f}%) | {rec} | {spd} |")
    if baseline is not None and baseline[0] != "forward":
        lines.append("")
        lines.append("recompute: the CPU RLA kernel is not built in this checkout, so the baseline "
                     "is the SWA branch alone over all tokens, a lower bound on forward's cost")
    if not do_recompute:
        lines.append("")
        lines.append("recompute: n/a (" + ("--no-recompute" if args.no_recompute else
                     "the CPU forward kernels are not built in this checkout") + ")")
    lines.append("")
    lines.append(f"cache per sequence and layer: {nb['rattention'] / 2**20:.2f} MiB "
                 f"(full KV cache at {L + 1} tokens: {nb['full_kv'] / 2**20:.2f} MiB)")
    table = "\n".join(lines)
    print()
    print(table)

    now = _dt.datetime.now(_dt.timezone.utc)
    machine = _machine()
    result = {
        "benchmark": "decode_cpu", "date": now.isoformat(timespec="seconds"),
        "git_commit": _git_commit(), "machine": machine, "copy_GBps": bw,
        "recompute_with": baseline[0] if baseline else None,
        "config": {"dtype": args.dtype, "heads_q": Hq, "heads_kv": Hkv, "head_dim": D,
                   "window": w, "context": L, "batches": batches},
        "rows": rows, "cache_bytes": nb, "table_markdown": table,
    }
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" /
        f"decode_cpu_{machine['host']}_{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
