"""Packed documents vs padding vs a per-document loop (CPU, forward + backward).

One realistic training row: document lengths drawn from a long-tailed (log-normal)
distribution, packed to ``--total`` tokens. The same documents are run three ways through
``rattention_ext.forward`` with gradients into q, k, v:

- ``packed``: one call with ``cu_seqlens`` (q ``[total, Hq, D]``);
- ``padded``: right-padded to the longest document, ``[N, max_len, H, D]`` (what a user
  without varlen support does; the padding rows get zero output gradient);
- ``loop``: one dense call per document (``[1, L, H, D]`` each), outputs concatenated.

The mix is the first seeded draw whose padding factor ``N * max_len / total`` lies within
``--pad-tolerance`` of ``--pad-target`` (2.0 by default: padding doubles the tokens), so the
padded run does twice the packed run's work. Times are medians of alternating rounds (so a
burst of load from the other processes on a shared machine hits all three alike); peak memory
is the resident-set growth of one forward+backward, each variant measured in its own fresh
process. Ratios come from one run.

    PYTHONPATH=python python -m benchmarks.packed_cpu                  # the documented run
    PYTHONPATH=python python -m benchmarks.packed_cpu --tiny --out /tmp  # seconds (tests)

Writes ``packed_cpu_<date>.json`` and ``.md`` (and ``latest_packed_cpu.md``) under
``--out`` (default ``benchmarks/results``), stamped with machine, date and commit.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.report import metadata, stamp  # noqa: E402
from benchmarks.runner import _cpu_peak_mb  # noqa: E402
from benchmarks.timing import time_cpu_interleaved  # noqa: E402

VARIANTS = ("packed", "padded", "loop")


def draw_mix(total: int, median: float, sigma: float, seed: int) -> List[int]:
    """Log-normal document lengths (at least 1 token) drawn until they fill ``total``; the
    last one is cut to fit exactly."""
    g = torch.Generator().manual_seed(seed)
    lengths: List[int] = []
    while sum(lengths) < total:
        z = float(torch.randn((), generator=g, dtype=torch.float64))
        lengths.append(max(1, int(round(median * math.exp(sigma * z)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def padding_factor(lengths: List[int]) -> float:
    """Tokens after right-padding every document to the longest, over the real tokens."""
    return len(lengths) * max(lengths) / sum(lengths)


def pick_mix(total: int, median: float, sigma: float, target: float, tol: float,
             max_seeds: int = 10000):
    """The first seed whose mix pads by ``target`` within ``tol``: (seed, lengths)."""
    for seed in range(max_seeds):
        lengths = draw_mix(total, median, sigma, seed)
        if len(lengths) > 1 and abs(padding_factor(lengths) - target) <= tol:
            return seed, lengths
    raise RuntimeError(f"no mix with padding factor {target} +- {tol} in {max_seeds} seeds; "
                       f"change --median/--sigma")


def build(variant: str, lengths: List[int], Hq: int, Hkv: int, D: int, w: int, seed: int = 0):
    """``fn(i)``: one forward + backward of ``variant`` on fixed random inputs."""
    import rattention_ext

    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, H, D, generator=g) for H in (Hq, Hkv, Hkv))
    go = torch.randn(total, Hq, D, generator=g)
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    cu = torch.tensor(offs, dtype=torch.int32)
    kw = dict(window_size=w)

    if variant == "packed":
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def fn(_i):
            o = rattention_ext.forward(*leaves, cu_seqlens=cu, max_seqlen=max(lengths), **kw)
            return torch.autograd.grad(o, leaves, go)
    elif variant == "padded":
        N, L = len(lengths), max(lengths)

        def pad(x):
            out = x.new_zeros(N, L, *x.shape[1:])
            for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
                out[b, :e - s] = x[s:e]
            return out

        leaves = [pad(t).requires_grad_() for t in (q, k, v)]
        gop = pad(go)  # zero gradient on the padding rows: the loss ignores them

        def fn(_i):
            o = rattention_ext.forward(*leaves, **kw)
            return torch.autograd.grad(o, leaves, gop)
    elif variant == "loop":
        leaves = [t.requires_grad_() for t in (q, k, v)]
        docs = list(zip(offs[:-1], offs[1:]))

        def fn(_i):
            o = torch.cat([rattention_ext.forward(*(t[None, s:e] for t in leaves), **kw)[0]
                           for s, e in docs])
            return torch.autograd.grad(o, leaves, go)
    else:
        raise ValueError(variant)
    return fn


def _peak_in_child(variant: str, args, lengths: List[int]) -> float:
    """Peak resident-set growth (MB) of one forward+backward, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.packed_cpu", "--measure-memory", variant,
           "--lengths", ",".join(map(str, lengths)), "--Hq", str(args.Hq), "--Hkv", str(args.Hkv),
           "--D", str(args.D), "--w", str(args.w), "--threads", str(args.threads)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"memory child for {variant} failed:\n{r.stdout}\n{r.stderr}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"])


def run(args) -> Dict:
    torch.set_num_threads(args.threads)
    if args.lengths:
        seed, lengths = None, [int(x) for x in args.lengths.split(",")]
    else:
        seed, lengths = pick_mix(args.total, args.median, args.sigma, args.pad_target,
                                 args.pad_tolerance)
    fns = {v: build(v, lengths, args.Hq, args.Hkv, args.D, args.w) for v in VARIANTS}
    # the three compute the same thing: check before timing (float32, relative)
    ref = fns["loop"](0)
    for v in ("packed", "padded"):
        got = fns[v](0)
        for a, b in zip(got, ref):
            if v == "padded":
                a = torch.cat([a[i, :n] for i, n in enumerate(lengths)])
            err = ((a - b).norm() / b.norm()).item()
            if not err < 1e-4:
                raise RuntimeError(f"{v} gradients differ from the loop's: rel err {err:.3g}")
    times = time_cpu_interleaved(fns, warmup=0, min_reps=args.reps, max_reps=args.reps,
                                 budget_s=0.0)
    peaks = {v: _peak_in_child(v, args, lengths) for v in VARIANTS}
    meta = metadata()
    meta["date"] = _dt.date.today().isoformat()
    data = {
        "meta": meta,
        "config": {"total": sum(lengths), "Hq": args.Hq, "Hkv": args.Hkv, "D": args.D,
                   "window_size": args.w, "dtype": "float32", "threads": args.threads,
                   "mix": {"distribution": f"log-normal, median {args.median}, sigma "
                                           f"{args.sigma}", "seed": seed, "lengths": lengths,
                           "documents": len(lengths), "longest": max(lengths),
                           "padding_factor": padding_factor(lengths)}},
        "results": {v: {**times[v], "peak_mb": peaks[v]} for v in VARIANTS},
    }
    t, m = data["results"], peaks
    data["ratios"] = {
        "padded_time_over_packed": t["padded"]["median_s"] / t["packed"]["median_s"],
        "loop_time_over_packed": t["loop"]["median_s"] / t["packed"]["median_s"],
        "padded_peak_over_packed": m["padded"] / m["packed"] if m["packed"] else None,
        "loop_peak_over_packed": m["loop"] / m["packed"] if m["packed"] else None,
    }
    return data


def markdown(data: Dict) -> str:
    c, r, x = data["config"], data["results"], data["ratios"]
    mix = c["mix"]
    lines = [
        "# Packed vs padded vs per-document loop (CPU, forward + backward)",
        "",
        f"{stamp(data['meta'])}. Command: `PYTHONPATH=python python -m benchmarks.packed_cpu`",
        "",
        f"total {c['total']} tokens in {mix['documents']} documents ({mix['distribution']}, "
        f"seed {mix['seed']}); longest {mix['longest']}, **padding factor "
        f"{mix['padding_factor']:.2f}**; Hq={c['Hq']}, Hkv={c['Hkv']}, D={c['D']}, "
        f"w={c['window_size']}, {c['dtype']}, {c['threads']} threads.",
        "",
        f"Lengths: {', '.join(map(str, mix['lengths']))}",
        "",
        "| variant | median s | min s | reps | peak MB | time / packed | peak / packed |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        pk = r["packed"]["peak_mb"]
        lines.append(f"| {v} | {r[v]['median_s']:.3f} | {r[v]['min_s']:.3f} | {r[v]['reps']} | "
                     f"{r[v]['peak_mb']:.1f} | {r[v]['median_s'] / r['packed']['median_s']:.2f} | "
                     f"{(r[v]['peak_mb'] / pk) if pk else float('nan'):.2f} |")
    lines += ["", f"Packed is {x['padded_time_over_packed']:.2f}x faster than padding and "
              f"{x['loop_time_over_packed']:.2f}x faster than the per-document loop.", ""]
    return "\n".join(lines)


def write(data: Dict, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"packed_cpu_{data['meta']['date']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md",
             "latest": out / "latest_packed_cpu.md"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    md = markdown(data)
    paths["md"].write_text(md)
    paths["latest"].write_text(md)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total", type=int, default=16384)
    ap.add_argument("--Hq", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=2)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--w", type=int, default=512)
    ap.add_argument("--median", type=float, default=1024.0, help="median document length")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (tail weight)")
    ap.add_argument("--pad-target", type=float, default=2.0)
    ap.add_argument("--pad-tolerance", type=float, default=0.1)
    ap.add_argument("--lengths", default="", help="comma-separated lengths instead of a draw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tiny", action="store_true", help="small sizes (tests)")
    ap.add_argument("--measure-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.total, args.Hq, args.Hkv, args.D, args.w = 512, 4, 2, 16, 16
        args.median, args.reps = 40.0, 2
    if args.measure_memory:
        torch.set_num_threads(args.threads)
        lengths = [int(x) for x in args.lengths.split(",")]
        fn = build(args.measure_memory, lengths, args.Hq, args.Hkv, args.D, args.w)
        peak, _ = _cpu_peak_mb(fn)
        print(json.dumps({"peak_mb": peak}))
        return 0
    data = run(args)
    paths = write(data, Path(args.out))
    print(markdown(data))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
