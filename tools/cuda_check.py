#!/usr/bin/env python3
"""Compile gate for the CUDA kernels, for machines without a GPU (`make cuda-check`).

Compiles every csrc/cuda/*.cu (torch-free by design) to a cubin for each architecture
with ptxas's resource report, disassembles the SASS with cuobjdump and counts the
tensor-core instructions (HMMA on sm_80, HMMA/HGMMA on sm_90a) per kernel. Writes
build/cuda-check/report.json, one row per kernel and arch:
    {"kernel", "arch", "registers", "spill_bytes", "smem_bytes", "mma"}
(`smem_bytes` is the static shared memory ptxas reports; kernels that size their shared
memory at launch report it in their traits, see csrc/cuda/README*.md), prints a table,
and exits non-zero when a kernel spills, or when a main attention kernel (name contains
`swa` or `rla`, and `fwd` or `bwd`, and not a helper pass listed in NO_MMA_OK) has no
tensor-core instruction.

Needs only nvcc, the CUTLASS/CuTe headers and cuobjdump; no torch, no GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "cuda-check"
# Passes that are memory-bound by design (reductions, prefix sums, conversions).
NO_MMA_OK = ("preprocess", "prefix", "convert", "reduce", "mix", "decode", "zero", "finalize")


def find_cutlass() -> Path:
    cands = []
    if os.environ.get("CUTLASS_DIR"):
        cands.append(Path(os.environ["CUTLASS_DIR"]) / "include")
    cands.append(ROOT / "third_party" / "cutlass" / "include")
    try:
        import cutlass_library  # noqa: PLC0415

        cands.append(Path(cutlass_library.__file__).parent / "source" / "include")
    except ImportError:
        pass
    for c in cands:
        if (c / "cute" / "tensor.hpp").exists() and (c / "cutlass" / "version.h").exists():
            return c
    sys.exit("cuda-check: CUTLASS/CuTe headers not found (pip install nvidia-cutlass, "
             "make cutlass, or set CUTLASS_DIR); looked in: " + ", ".join(map(str, cands)))


def find_cuobjdump() -> str:
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    for c in sorted(Path("/usr/local").glob("cuda*/bin/cuobjdump")):
        return str(c)
    for base in map(Path, sys.path):
        for c in base.glob("nvidia/cu*/bin/cuobjdump"):
            return str(c)
    try:
        import triton  # noqa: PLC0415

        for c in Path(triton.__file__).parent.rglob("cuobjdump"):
            return str(c)
    except ImportError:
        pass
    sys.exit("cuda-check: cuobjdump not found (pip install nvidia-cuda-cuobjdump "
             "nvidia-cuda-nvdisasm)")


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def short_name(demangled: str) -> str:
    # "void rattention::cuda::swa_fwd_kernel<Traits<...>>(Params)" -> "swa_fwd_kernel<...>"
    s = re.sub(r"^void\s+", "", demangled)
    s = s.split("(")[0]
    s = re.sub(r"\brattention::(cuda::)?", "", s)
    return s


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per mangled function: registers, spill bytes, static smem."""
    res: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1)
            res.setdefault(cur, {"registers": 0, "spill_bytes": 0, "smem_bytes": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            res[cur]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[cur]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            res[cur]["smem_bytes"] = int(s.group(1)) if s else 0
    return res


def count_mma(sass: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            counts[cur] = 0
            continue
        if cur and re.search(r"\b(HMMA|HGMMA)\b", line):
            counts[cur] += 1
    return counts


def compile_one(src: Path, arch: str, inc: Path, cuobjdump: str) -> tuple[list[dict], str]:
    cubin = OUT / f"{src.stem}.{arch}.cubin"
    cmd = ["nvcc", "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
           "--use_fast_math", "-Xptxas", "-v", "-I", str(ROOT / "csrc"), "-I", str(inc),
           "-o", str(cubin), str(src)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return [], f"FAILED {src.name} sm_{arch}\n{p.stderr[-6000:]}"
    res = parse_ptxas(p.stderr)
    # cuobjdump runs nvdisasm, which the pip packages put beside it.
    env = dict(os.environ, PATH=f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    d = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if d.returncode != 0 or "fatal" in d.stderr:
        return [], f"FAILED cuobjdump on {cubin.name}: {d.stderr.strip()[-2000:]}"
    sass = d.stdout
    (OUT / f"{src.stem}.{arch}.sass").write_text(sass)
    mma = count_mma(sass)
    names = demangle(list(res))
    rows = [{"kernel": short_name(names[k]), "arch": f"sm_{arch}", "registers": v["registers"],
             "spill_bytes": v["spill_bytes"], "smem_bytes": v["smem_bytes"], "mma": mma.get(k, 0),
             "source": src.name, "mangled": k} for k, v in res.items()]
    return rows, f"compiled {src.name} for sm_{arch} in {time.time() - t0:.0f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90a", help="comma-separated, e.g. 80,90a")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("files", nargs="*", help="subset of csrc/cuda/*.cu (default: all)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    inc, cuobjdump = find_cutlass(), find_cuobjdump()
    srcs = [Path(f).resolve() for f in args.files] or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not srcs:
        print("cuda-check: no CUDA sources")
        return 1
    jobs = [(s, a) for s in srcs for a in args.archs.split(",")]
    print(f"cuda-check: {len(jobs)} compiles ({len(srcs)} files x {args.archs}), CUTLASS {inc}",
          flush=True)
    rows, failed = [], False
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = [ex.submit(compile_one, s, a, inc, cuobjdump) for s, a in jobs]
        for i, f in enumerate(cf.as_completed(futs), 1):
            r, msg = f.result()
            print(f"[{i}/{len(jobs)}] {msg}", flush=True)
            failed |= msg.startswith("FAILED")
            rows += r
    rows.sort(key=lambda r: (r["kernel"], r["arch"]))
    (OUT / "report.json").write_text(json.dumps(rows, indent=1))
    problems = []
    w = max([len(r["kernel"][:90]) for r in rows] + [6])
    print(f"\n{'kernel':<{w}} {'arch':<7} {'regs':>5} {'spill':>6} {'smem':>7} {'mma':>6}")
    for r in rows:
        print(f"{r['kernel'][:90]:<{w}} {r['arch']:<7} {r['registers']:>5} {r['spill_bytes']:>6} "
              f"{r['smem_bytes']:>7} {r['mma']:>6}")
        n = r["kernel"].split("<")[0]
        if r["spill_bytes"] > 0:
            problems.append(f"{r['kernel']} ({r['arch']}) spills {r['spill_bytes']} bytes")
        main_kernel = (("swa" in n or "rla" in n) and ("fwd" in n or "bwd" in n)
                       and not any(x in n for x in NO_MMA_OK))
        if main_kernel and r["mma"] == 0:
            problems.append(f"{r['kernel']} ({r['arch']}) has no tensor-core instruction")
    print(f"\nreport: {OUT / 'report.json'} ({len(rows)} rows)")
    for p in problems:
        print("PROBLEM:", p)
    if failed or problems:
        print("cuda-check: FAILED")
        return 1
    print("cuda-check: OK (no spills; attention kernels on tensor cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
