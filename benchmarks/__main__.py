"""python -m benchmarks: time rattention_ext against its peers and the machine's ceilings.

    python -m benchmarks --cpu-quick                 # issue 3's CPU table (a few minutes, 2 cores)
    python -m benchmarks --device cuda               # all ops, all installed peers, bf16
    python -m benchmarks --device cuda --ops swa_fwd --T 4096 16384 --D 128
    python -m benchmarks --profile nsys [--run]      # print (and run) the Nsight command line

Results go to benchmarks/results/<cpu|cuda>_<date>.{json,md,png} and latest_<cpu|cuda>.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import ceilings, profiling, report
from .backends import BACKENDS, OPS, Case
from .runner import run_group, run_isolated

RESULTS = Path(__file__).resolve().parent / "results"


def _progress(items, desc):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return _SimpleProgress(items, desc)


class _SimpleProgress:
    def __init__(self, items, desc):
        self.items, self.desc = list(items), desc

    def __iter__(self):
        n, t0 = len(self.items), time.time()
        for i, x in enumerate(self.items):
            print(f"[{self.desc}] {i + 1}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            yield x

    def set_postfix_str(self, s):
        print(f"    {s}", file=sys.stderr, flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-quick", action="store_true",
                   help="issue 3's CPU table: fwd+bwd and SWA fwd, T in 2048/8192/32768, D in 64/128")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests of the driver itself)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--ops", nargs="+", choices=OPS, default=None)
    p.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=None)
    p.add_argument("--T", nargs="+", type=int, default=None)
    p.add_argument("--D", nargs="+", type=int, default=None)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--Hq", type=int, default=8)
    p.add_argument("--Hkv", type=int, default=2)
    p.add_argument("--w", type=int, default=512)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--feature-map", default="softmax", choices=["softmax", "relu"])
    p.add_argument("--reps", type=int, default=None, help="timed calls (CUDA) / max timed calls (CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget", type=float, default=3.0, help="CPU: seconds of timed calls per case")
    p.add_argument("--torch-max-T", type=int, default=None,
                   help="skip the plain-PyTorch composition above this T (SDPA with a band mask "
                        "computes all T^2 scores); default 8192 on CPU, none on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--profile", choices=["nsys", "ncu"], default=None,
                   help="print the Nsight command line for our kernels (with --run: run it)")
    p.add_argument("--run", action="store_true", help="with --profile: run the command")
    p.add_argument("--profile-range", action="store_true",
                   help="wrap the timed CUDA calls in cudaProfilerStart/Stop (used by --profile)")
    p.add_argument("--in-process", action="store_true", help="CPU: run cases in this process")
    args = p.parse_args(argv)
    if args.cpu_quick:
        args.device = "cpu"
    if args.device is None:
        args.device = "cuda" if (args.profile or torch.cuda.is_available()) else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def plan(args):
    """The (case, backend) list."""
    if args.smoke:
        Ts, Ds, w = args.T or [256, 512], args.D or [16], min(args.w, 64)
    elif args.cpu_quick:
        Ts, Ds, w = args.T or [2048, 8192, 32768], args.D or [64, 128], args.w
    else:
        Ts = args.T or ([2048, 8192, 32768, 65536] if args.device == "cuda" else [2048, 8192])
        Ds, w = args.D or [64, 128], args.w
    if args.cpu_quick or args.smoke:
        ops = args.ops or ["fwd_bwd", "swa_fwd"]
        per_op = {"fwd_bwd": ["ours", "torch"], "swa_fwd": ["ours", "torch"]}
    else:
        ops = args.ops or list(OPS)
        # the peers other than plain PyTorch are CUDA-only: leave them out of CPU runs
        default = list(BACKENDS) if args.device == "cuda" else ["ours", "torch"]
        per_op = {op: default for op in OPS}
    jobs = []
    for D in Ds:
        for op in ops:
            for T in Ts:
                case = Case(op=op, B=args.B, T=T, Hq=args.Hq, Hkv=args.Hkv, D=D, w=w, dtype=args.dtype,
                            device=args.device, feature_map=args.feature_map)
                jobs.append((case, list(args.backends or per_op.get(op) or BACKENDS)))
    return jobs, w


def main(argv=None) -> int:
    args = parse(argv)
    if args.profile:
        return profiling.main(args.profile, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[bench] --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch_max_T = args.torch_max_T if args.torch_max_T is not None else (
        8192 if args.device == "cpu" else 1 << 30)
    timing = {"warmup": args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 5),
              "reps": args.reps or 50, "min_reps": 3, "max_reps": args.reps or 20,
              "budget_s": args.budget, "profile_range": args.profile_range}
    jobs, w = plan(args)
    meta = report.metadata()
    print(f"[bench] {report.stamp(meta)}", file=sys.stderr)
    print("[bench] measuring ceilings (matmul, copy) ...", file=sys.stderr)
    ceil = ceilings.measure(dev, dtype)
    print(f"[bench] matmul {ceil['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s, copy "
          f"{ceil['copy']['bytes_per_s'] / 1e9:.1f} GB/s; {len(jobs)} cases", file=sys.stderr)
    rows = []
    bar = _progress(jobs, "bench")
    for case, names in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{case.op} T={case.T} D={case.D} {'/'.join(names)}")
        skipped = []
        if "torch" in names and case.T > torch_max_T and case.op in ("swa_fwd", "fwd", "fwd_bwd"):
            names = [n for n in names if n != "torch"]
            skipped.append({**case.as_dict(), "backend": "torch",
                            "status": f"skipped: T > {torch_max_T} (SDPA with a band mask computes "
                                      "all T^2 scores" + _extrapolate(rows, case) + ")"})
        if names and args.device == "cpu" and not args.in_process:
            rows += run_isolated(case, names, timing)
        elif names:
            rows += run_group(case, names, timing)
        rows += skipped
    data = {"meta": meta, "ceilings": ceil, "results": rows,
            "config": {"B": args.B, "Hq": args.Hq, "Hkv": args.Hkv, "w": w, "dtype": args.dtype,
                       "feature_map": args.feature_map, "device": args.device,
                       "mode": "cpu-quick" if args.cpu_quick else ("smoke" if args.smoke else "full"),
                       "argv": sys.argv[1:] if argv is None else list(argv)}}
    quick = args.cpu_quick or args.smoke
    report.speedups(rows)
    if args.no_save:
        print(report.quick_table(data) if quick else report.full_table(data))
        return 0
    paths = report.write(data, args.out, args.device, quick=quick, make_plot=not args.no_plot)
    print(paths["md"].read_text())
    print("[bench] wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    bad = [r for r in rows if r["status"].startswith("error") and r["backend"] == "torch"]
    return 1 if bad and args.smoke else 0


def _extrapolate(rows, case) -> str:
    """'; est. N s per call' from the largest measured T of the same op and D (T^2 scaling)."""
    prev = [r for r in rows if r["backend"] == "torch" and r["op"] == case.op and r["D"] == case.D
            and r.get("status") == "ok"]
    if not prev:
        return ""
    r = max(prev, key=lambda r: r["T"])
    est = r["median_s"] * (case.T / r["T"]) ** 2
    return f"; est. {est:.0f} s per call from T={r['T']}"


if __name__ == "__main__":
    sys.exit(main())
