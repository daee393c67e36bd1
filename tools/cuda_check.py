#!/usr/bin/env python3
"""Compile-only check of the CUDA kernels (no GPU, no torch needed).

For every csrc/cuda/*.cu and every arch (sm_80, sm_90a):
  nvcc -cubin -Xptxas -v  ->  per-kernel registers, spill stores/loads, static smem
  cuobjdump -sass         ->  HMMA / HGMMA instruction count per kernel
and, once, tools/ldsm_check.cu on the host: every ldmatrix copy of the kernels replayed with
its PTX semantics against the MMA's element-wise partition (no GPU needed), and the JAX
binding's CUDA handlers (csrc/jax/ffi_cuda.cpp) against jax's FFI headers when jax imports.
Dynamic shared memory is not visible to ptxas; kernels that use it carry a
`rattention::cuda::DynSmem<N>` template argument (see csrc/cuda/swa_traits.cuh), which the
demangled name shows, and smem_bytes = static + N.

Writes build/cuda-check/report.json (a list of rows {kernel, arch, registers, spill_bytes,
smem_bytes, mma, and the static SASS counts ldsm, hmma, ldg, lds, sts, stg, ldgsts, ...}),
prints a table, exits non-zero on any spill, any compile error, a main swa/rla fwd/bwd kernel
without tensor-core MMA, or a layout-check mismatch.

It also writes build/cuda-check/launch.json (tools/launch_plan.py): every kernel launch of
forward / backward / decode_step at the reference shapes, from the launch-plan functions the
launchers call (csrc/cuda/*_plan.h, compiled into tools/launch_plan_dump.cu), with CTAs per SM
on an H200 from the registers above; and prints it as a table.

    python tools/cuda_check.py [--jobs 2] [--archs 80,90a] [--files swa_fwd.cu ...] [--plan-only]
"""
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
sys.path.insert(0, str(ROOT / "tools"))
import launch_plan  # noqa: E402


def default_nvcc():
    return shutil.which("nvcc") or "nvcc"


def find_cutlass():
    cands = []
    if os.environ.get("CUTLASS_DIR"):
        cands.append(Path(os.environ["CUTLASS_DIR"]) / "include")
    cands.append(ROOT / "third_party" / "cutlass" / "include")
    try:
        import cutlass_library  # noqa: F401  (pip package nvidia-cutlass)

        cands.append(Path(cutlass_library.__file__).parent / "source" / "include")
    except Exception:
        pass
    for c in cands:
        if (c / "cutlass" / "version.h").exists() and (c / "cute" / "tensor.hpp").exists():
            return c
    sys.exit(f"cuda_check: CUTLASS/CuTe headers not found (looked in {[str(c) for c in cands]}); "
             "pip install nvidia-cutlass, run `make cutlass`, or set CUTLASS_DIR")


def find_cuobjdump():
    cands = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME"):
        cands.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent / "cuobjdump"))
    # pip package nvidia-cuda-cuobjdump (in this interpreter's site-packages or the tool dir)
    for base in [Path(p) for p in sys.path if p] + [OUT / "tools"]:
        for sub in ("nvidia/cu13/bin/cuobjdump", "nvidia/cuda_cuobjdump/bin/cuobjdump",
                    "triton/backends/nvidia/bin/cuobjdump"):
            cands.append(str(base / sub))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    if not names:
        return {}
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except Exception:
        return {n: n for n in names}


def readable(full):
    """Short kernel name: drop namespaces, the parameter list and verbose cute types."""
    s = re.sub(r"^void\s+", "", full)
    # cut the function parameter list (last top-level parenthesis group)
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"\b(rattention|cuda|cutlass|cute)::", "", s)
    s = s.replace("bfloat16_t", "bf16").replace("half_t", "fp16")
    s = re.sub(r"DynSmem<\d+>", "", s)
    s = re.sub(r",\s*>", ">", s).replace(" ", "")
    return s


PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text):
    kernels = {}
    cur = None
    for line in text.splitlines():
        m = PTXAS_ENTRY.search(line)
        if m:
            cur = m.group(1)
            kernels.setdefault(cur, {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                     "stack": 0, "static_smem": 0})
            continue
        m = PTXAS_PROPS.search(line)
        if m:
            cur = m.group(1)
            kernels.setdefault(cur, {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                     "stack": 0, "static_smem": 0})
            continue
        if cur is None:
            continue
        m = PTXAS_SPILL.search(line)
        if m:
            k = kernels[cur]
            k["stack"], k["spill_stores"], k["spill_loads"] = map(int, m.groups())
        m = PTXAS_USED.search(line)
        if m:
            kernels[cur]["registers"] = int(m.group(1))
            ms = PTXAS_SMEM.search(line)
            if ms:
                kernels[cur]["static_smem"] = int(ms.group(1))
    return kernels


# Static SASS instruction counts per kernel (instructions in the code, not executed ones):
# tensor-core MMAs, shared -> register matrix loads, and the plain global / shared memory
# traffic, so the shared-memory-per-MMA balance of a kernel is visible without a GPU.
SASS_OPS = ("HMMA", "HGMMA", "LDSM", "LDG", "LDS", "STS", "STG", "LDGSTS")
SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.\s;]")


def count_sass(sass):
    """{function: {op: count}} for the opcodes in SASS_OPS (LDS does not count LDSM/LDGSTS:
    opcodes are compared whole, before the first '.')."""
    counts, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            counts.setdefault(cur, {op: 0 for op in SASS_OPS})
            continue
        if cur is None:
            continue
        m = SASS_INSN.search(line)
        if m and m.group(1) in counts[cur]:
            counts[cur][m.group(1)] += 1
    return counts


def compile_one(src, arch, cutlass, nvcc, cuobjdump, extra):
    OUT.mkdir(parents=True, exist_ok=True)
    cubin = OUT / f"{src.stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
           "--use_fast_math", "-Xptxas", "-v", "-lineinfo", f"-I{ROOT / 'csrc'}", f"-I{cutlass}",
           "-DNDEBUG", "-o", str(cubin), str(src)] + extra
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.time() - t0
    log = p.stdout + p.stderr
    (OUT / f"{src.stem}.sm_{arch}.log").write_text(" ".join(cmd) + "\n" + log)
    if p.returncode != 0:
        return {"src": src.name, "arch": f"sm_{arch}", "ok": False, "log": log, "seconds": dt}
    kernels = parse_ptxas(log)
    mma = {}
    if cuobjdump:
        # cuobjdump -sass runs nvdisasm, which the pip packages install beside cuobjdump.
        env = dict(os.environ, PATH=f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        s = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
        if s.returncode != 0 or "fatal" in s.stderr:
            return {"src": src.name, "arch": f"sm_{arch}", "ok": False, "seconds": dt,
                    "log": f"cuobjdump failed (pip install nvidia-cuda-nvdisasm?): {s.stderr}"}
        (OUT / f"{src.stem}.sm_{arch}.sass").write_text(s.stdout)
        mma = count_sass(s.stdout)
    return {"src": src.name, "arch": f"sm_{arch}", "ok": True, "kernels": kernels, "mma": mma,
            "seconds": dt}


def expects_mma(name):
    """Main attention kernels (swa/rla, fwd/bwd, not the small pre/post-processing ones)."""
    n = name.lower()
    if not (("swa" in n or "rla" in n) and ("fwd" in n or "bwd" in n)):
        return False
    return not any(w in n for w in ("preprocess", "convert", "postprocess", "zero", "state_pass",
                                    "reduce"))


def run_layout_check(cutlass, nvcc):
    """Build and run tools/ldsm_check.cu on the host: replays every ldmatrix copy of the
    SWA / RLA kernels with the PTX semantics and checks the fragments against the MMA
    partitions (and the register re-layouts). Returns (ok, seconds, output)."""
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    exe = OUT / "ldsm_check"
    cmd = [nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-O1", f"-I{ROOT / 'csrc'}",
           f"-I{cutlass}", str(ROOT / "tools" / "ldsm_check.cu"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return False, time.time() - t0, r.stdout + r.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    return r.returncode == 0, time.time() - t0, r.stdout + r.stderr


def compile_jax_handlers(nvcc):
    """The JAX binding's CUDA handlers (csrc/jax/ffi_cuda.cpp: host code calling the kernels'
    launch headers with XLA's stream) compiled by nvcc against jax's FFI headers. Returns
    (ok, seconds, log); None when jax is not importable here (nothing to check against)."""
    try:
        import jax.ffi  # noqa: F401

        include = jax.ffi.include_dir()
    except Exception:  # noqa: BLE001  (no jax in this interpreter)
        return None
    out = OUT / "ffi_cuda.o"
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-c", "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", "-isystem", include,
           "-Xcompiler", "-Wall,-Werror", str(ROOT / "csrc" / "jax" / "ffi_cuda.cpp"), "-o", str(out)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, time.time() - t0, " ".join(cmd) + "\n" + p.stdout + p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("CUDA_CHECK_JOBS", "2")))
    ap.add_argument("--archs", default="80,90a")
    ap.add_argument("--files", nargs="*", help="only these csrc/cuda/*.cu files")
    ap.add_argument("--nvcc", default=default_nvcc())
    ap.add_argument("--plan-only", action="store_true",
                    help="only rebuild launch.json from the existing build/cuda-check/report.json")
    ap.add_argument("--skip-layout-check", action="store_true",
                    help="skip tools/ldsm_check.cu (the host replay of the ldmatrix copies)")
    args = ap.parse_args()

    cutlass = find_cutlass()
    if args.plan_only:
        return write_launch_plan(json.loads((OUT / "report.json").read_text()),
                                 launch_plan.build_dump(args.nvcc, cutlass), [])
    cuobjdump = find_cuobjdump()
    srcs = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if args.files:
        srcs = [s for s in srcs if s.name in args.files]
    if not srcs:
        sys.exit("cuda_check: no csrc/cuda/*.cu files")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    print(f"cuda_check: {len(srcs)} files x {archs}, jobs={args.jobs}, CUTLASS {cutlass}, "
          f"cuobjdump {cuobjdump or 'NOT FOUND (mma counts unavailable)'}", flush=True)

    t0 = time.time()
    results = []
    # biggest files first so the two workers finish together
    jobs = sorted([(s, a) for s in srcs for a in archs], key=lambda x: -x[0].stat().st_size)
    layout = None
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        if not args.skip_layout_check:
            layout = ex.submit(run_layout_check, cutlass, args.nvcc)
        plan_dump = ex.submit(launch_plan.build_dump, args.nvcc, cutlass)
        jax_handlers = ex.submit(compile_jax_handlers, args.nvcc)
        futs = {ex.submit(compile_one, s, a, cutlass, args.nvcc, cuobjdump, []): (s, a)
                for s, a in jobs}
        for f in cf.as_completed(futs):
            r = f.result()
            print(f"  {r['src']:24s} {r['arch']:7s} {'ok' if r['ok'] else 'FAILED':6s} "
                  f"{r['seconds']:6.1f}s", flush=True)
            results.append(r)

    rows, failures = [], []
    all_names = [k for r in results if r["ok"] for k in r["kernels"]]
    dem = demangle(sorted(set(all_names)))
    for r in sorted(results, key=lambda r: (r["src"], r["arch"])):
        if not r["ok"]:
            failures.append(f"{r['src']} {r['arch']}: compile failed")
            print(r["log"][-4000:], file=sys.stderr)
            continue
        for mangled, k in sorted(r["kernels"].items(), key=lambda kv: dem.get(kv[0], kv[0])):
            full = dem.get(mangled, mangled)
            dyn = re.search(r"DynSmem<(\d+)", full)
            dyn_bytes = int(dyn.group(1)) if dyn else 0
            spill = k["spill_stores"] + k["spill_loads"]
            sass = r["mma"].get(mangled, {op: 0 for op in SASS_OPS}) if cuobjdump else None
            row = {
                "kernel": readable(full),
                "arch": r["arch"],
                "registers": k["registers"],
                "spill_bytes": spill,
                "smem_bytes": k["static_smem"] + dyn_bytes,
                "mma": sass["HMMA"] + sass["HGMMA"] if sass else None,
                **{op.lower(): (sass[op] if sass else None) for op in SASS_OPS if op != "HGMMA"},
                "hgmma": sass["HGMMA"] if sass else None,
                "stack_bytes": k["stack"],
                "static_smem_bytes": k["static_smem"],
                "dynamic_smem_bytes": dyn_bytes,
                "source": r["src"],
                "mangled": mangled,
            }
            rows.append(row)
            if spill:
                failures.append(f"{row['kernel']} {row['arch']}: {spill} bytes spilled")
            if cuobjdump and expects_mma(row["kernel"]) and not row["mma"]:
                failures.append(f"{row['kernel']} {row['arch']}: no HMMA/HGMMA instruction")
    if layout is not None:
        ok, secs, out = layout.result()
        print(f"\nldsm_check (host replay of the ldmatrix copies, {secs:.0f}s):")
        print("\n".join("  " + line for line in out.strip().splitlines()[-40:]))
        (OUT / "ldsm_check.txt").write_text(out)
        if not ok:
            failures.append("ldsm_check: fragments do not match the MMA partition (see above)")
    jax_result = jax_handlers.result()
    if jax_result is None:
        print("\nJAX FFI CUDA handlers: skipped (jax is not importable by this interpreter)")
    else:
        ok, secs, out = jax_result
        print(f"\nJAX FFI CUDA handlers (csrc/jax/ffi_cuda.cpp): {'ok' if ok else 'FAILED'} "
              f"({secs:.0f}s)")
        if not ok:
            print(out[-4000:], file=sys.stderr)
            failures.append("csrc/jax/ffi_cuda.cpp: compile failed")
    if not cuobjdump:
        failures.append("cuobjdump not found: cannot count MMA instructions "
                        "(pip install nvidia-cuda-cuobjdump or set CUOBJDUMP)")

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(rows, indent=1))
    w = max([len(r["kernel"]) for r in rows] + [6])
    counts = ("mma", "ldsm", "hmma", "ldg", "lds", "sts", "stg", "ldgsts")
    print(f"\n{'kernel':{w}s}  arch    regs  spill   smem " + " ".join(f"{c:>6s}" for c in counts))
    for r in rows:
        print(f"{r['kernel']:{w}s}  {r['arch']:6s} {r['registers']:5d} {r['spill_bytes']:6d} "
              f"{r['smem_bytes']:6d} " + " ".join(f"{r[c] if r[c] is not None else '-':>6}"
                                                 for c in counts))
    print(f"\n{len(rows)} kernel builds, {time.time() - t0:.0f}s; report: "
          f"{(OUT / 'report.json').relative_to(ROOT)} (SASS counts: static instructions)")
    if args.files:  # a partial report cannot serve every launch of the plan
        print("launch plan skipped (--files: not every kernel was compiled)")
    else:
        write_launch_plan(rows, plan_dump.result(), failures)
    if failures:
        print("cuda_check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("cuda_check OK: no spills, every main kernel uses tensor-core MMA, launch plan written")
    return 0


def write_launch_plan(report_rows, dump, failures):
    """launch.json + its table from the plan dump program; problems go to `failures`.
    Returns 0 / 1 (for --plan-only)."""
    exe, log = dump
    if exe is None:
        print(log[-4000:], file=sys.stderr)
        failures.append("launch plan: tools/launch_plan_dump.cu did not build (see above)")
    else:
        plan_rows, problems = launch_plan.write(exe, report_rows)
        failures.extend(problems)
        print(f"\nlaunch plan on an {launch_plan.H200['name']} "
              f"({launch_plan.H200['arch']} registers; {(OUT / 'launch.json').relative_to(ROOT)}):")
        print(launch_plan.format_table(plan_rows))
        print("\nstructural goals of the GPU-performance issues (read from the plan, not enforced):")
        print(launch_plan.format_targets(plan_rows))
    if failures:
        print("launch plan FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
