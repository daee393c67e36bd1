#!/usr/bin/env python3
"""make gpu-check: one prepared command for a machine with one GPU, torch (CUDA) and nvcc,
no network. Steps: build the extension for this GPU's arch only, run the GPU tests
(tests/test_*_cuda.py), benchmark SWA forward (and forward+backward when a CUDA swa_bwd
is registered) vs FlexAttention with a sliding-window block mask, print a compact table
last, write benchmarks/results/gpu-check-<date>.json (GPU, date, commit).

    python tools/gpu_check.py [--dry-run] [--skip-build] [--skip-tests]
Budget: under 8 minutes on a 16-core H200 machine (build ~4-5 min for one arch).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = dict(B=1, T=8192, Hq=16, Hkv=4, D=128, w=512, dtype="bfloat16")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def arch_of(cap):
    major, minor = cap
    return f"{major}{minor}a" if major == 9 and minor == 0 else f"{major}{minor}"


def plan(arch):
    env = {"RATTENTION_CUDA_ARCHS": arch, "RATTENTION_BUILD_DIR": "build/gpu-check",
           "MAX_JOBS": str(os.cpu_count() or 4)}
    tests = sorted(p.name for p in (ROOT / "tests").glob("test_*_cuda.py"))
    return env, tests


def bench_ms(fn, warmup=5, iters=20):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def run_bench():
    import torch
    sys.path.insert(0, str(ROOT / "python"))
    import rattention_ext  # noqa: F401

    c = BENCH
    dt = getattr(torch, c["dtype"])
    B, T, Hq, Hkv, D, w = c["B"], c["T"], c["Hq"], c["Hkv"], c["D"], c["w"]
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
    scale = D ** -0.5
    # FLOPs with the window applied: keys actually visible per query.
    keys = sum(min(t, w) + 1 for t in range(T))
    fwd_flops = 4 * B * Hq * D * keys
    rows = []

    def ours_fwd():
        return torch.ops.rattention_ext.swa_fwd(q, k, v, w, scale, None, None)

    ms = bench_ms(ours_fwd)
    rows.append({"impl": "rattention swa_fwd", "pass": "fwd", "ms": ms,
                 "tflops": fwd_flops / ms / 1e9})
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def swa_mask(b, h, qi, ki):
            return (qi >= ki) & (qi - ki <= w)

        bm = create_block_mask(swa_mask, None, None, T, T, device="cuda")
        flex = torch.compile(flex_attention)
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

        def flex_fwd():
            return flex(qt, kt, vt, block_mask=bm, scale=scale, enable_gqa=True)

        ms = bench_ms(flex_fwd)
        rows.append({"impl": "flex_attention", "pass": "fwd", "ms": ms,
                     "tflops": fwd_flops / ms / 1e9})

        def flex_fwd_bwd():
            flex_fwd().sum().backward()

        ms = bench_ms(flex_fwd_bwd)
        rows.append({"impl": "flex_attention", "pass": "fwd+bwd", "ms": ms,
                     "tflops": 3.5 * fwd_flops / ms / 1e9})
    except Exception as e:  # FlexAttention missing or failing: say so, keep our numbers
        rows.append({"impl": "flex_attention", "pass": "fwd", "error": repr(e)[:200]})
    has_bwd = torch._C._dispatch_has_kernel_for_dispatch_key("rattention_ext::swa_bwd", "CUDA")
    if has_bwd:
        def ours_fwd_bwd():
            out, lse = ours_fwd()
            torch.ops.rattention_ext.swa_bwd(torch.ones_like(out), None, q, k, v, out, lse, w,
                                             scale, None, None, False)

        ms = bench_ms(ours_fwd_bwd)
        rows.append({"impl": "rattention swa_fwd+swa_bwd", "pass": "fwd+bwd", "ms": ms,
                     "tflops": 3.5 * fwd_flops / ms / 1e9})
    else:
        rows.append({"impl": "rattention swa_bwd", "pass": "fwd+bwd",
                     "error": "no CUDA swa_bwd kernel registered"})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    t0 = time.time()

    if args.dry_run:
        try:
            import torch
            cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        except Exception:
            cap = (9, 0)
        env, tests = plan(arch_of(cap))
        print("gpu-check plan (dry run):")
        print(f"  1. build: {' '.join(f'{k}={v}' for k, v in env.items())} "
              f"{sys.executable} setup.py build_ext --inplace")
        print(f"  2. tests: {sys.executable} -m pytest -q {' '.join(tests) or '(none found)'}")
        print(f"  3. bench: swa fwd (+bwd if registered) vs FlexAttention, {BENCH}")
        print(f"  4. write benchmarks/results/gpu-check-<date>.json (commit {git_commit()})")
        return 0

    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    arch = arch_of(torch.cuda.get_device_capability())
    env, tests = plan(arch)
    result = {"gpu": name, "arch": arch, "date": datetime.datetime.utcnow().isoformat() + "Z",
              "commit": git_commit(), "torch": torch.__version__, "steps": {}}
    if not args.skip_build:
        t = time.time()
        rc = subprocess.call([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                             env={**os.environ, **env})
        result["steps"]["build"] = {"rc": rc, "seconds": round(time.time() - t, 1)}
        if rc:
            print("gpu-check: build failed", file=sys.stderr)
            return rc
    if not args.skip_tests:
        t = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT / "tests",
                             env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
        result["steps"]["tests"] = {"rc": rc, "seconds": round(time.time() - t, 1)}
    rows = run_bench()
    result["bench"] = {"config": BENCH, "rows": rows}
    out = ROOT / "benchmarks" / "results" / f"gpu-check-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\ngpu-check on {name} (sm_{arch}), commit {result['commit']}, "
          f"{time.time() - t0:.0f}s; {out.relative_to(ROOT)}")
    for step, r in result["steps"].items():
        print(f"  {step:6s} rc={r['rc']} {r['seconds']}s")
    print(f"  {'impl':30s} {'pass':8s} {'ms':>8s} {'TFLOP/s':>8s}")
    for r in rows:
        if "error" in r:
            print(f"  {r['impl']:30s} {r['pass']:8s} {r['error']}")
        else:
            print(f"  {r['impl']:30s} {r['pass']:8s} {r['ms']:8.3f} {r['tflops']:8.1f}")
    return max([r["rc"] for r in result["steps"].values()] + [0])


if __name__ == "__main__":
    sys.exit(main())
