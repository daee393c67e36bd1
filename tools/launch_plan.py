"""Launch plans of the CUDA kernels at the reference shapes -> build/cuda-check/launch.json.

The numbers come from the plan functions the launchers themselves call (csrc/cuda/*_plan.h),
compiled into a host program (tools/launch_plan_dump.cu); this file adds only what needs the
ptxas report: CTAs per SM on an H200 (registers and static shared memory from report.json),
waves, resident warps. No table of launch sizes lives here.

Used by tools/cuda_check.py (`make cuda-check`); after one, `python tools/cuda_check.py
--plan-only` rebuilds launch.json alone from build/cuda-check/report.json.
"""
import json
import math
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "cuda-check"

# The reference shapes (bf16): S1 / S2 = forward and backward of rattention_ext.forward,
# D1 / D2 = one decode_step with a full ring (the plan assumes w + 1 keys).
SHAPES = {
    "S1": dict(B=1, T=4096, Hq=16, Hkv=4, D=128, w=512),
    "S2": dict(B=8, T=8192, Hq=32, Hkv=8, D=128, w=512),
    "D1": dict(B=1, T=513, Hq=16, Hkv=4, D=128, w=512),
    "D2": dict(B=64, T=513, Hq=16, Hkv=4, D=128, w=512),
}
SHAPE_OPS = {"S1": ("forward", "backward"), "S2": ("forward", "backward"),
             "D1": ("decode_step",), "D2": ("decode_step",)}

# H200 (sm_90, 132 SMs): per SM 228 KiB shared memory (1 KiB of it reserved per CTA), 64K
# 32-bit registers (allocated per warp in units of 256), at most 32 CTAs and 64 warps.
H200 = dict(name="H200", arch="sm_90a", sms=132, smem_per_sm=228 * 1024, smem_reserved_per_cta=1024,
            smem_alloc_unit=128, regs_per_sm=65536, reg_alloc_unit=256, max_ctas_per_sm=32,
            max_warps_per_sm=64)

ROW_KEYS = ("shape", "op", "kernel", "grid", "threads", "smem_bytes", "ctas", "ctas_per_sm",
            "waves", "serial_steps", "workspace_bytes")


def spec_args(shapes=SHAPES, shape_ops=SHAPE_OPS, dtype="bf16"):
    """The dump program's arguments NAME:OP:B:T:HQ:HKV:D:W:DTYPE, one per (shape, op)."""
    out = []
    for name, s in shapes.items():
        for op in shape_ops[name]:
            out.append(f"{name}:{op}:{s['B']}:{s['T']}:{s['Hq']}:{s['Hkv']}:{s['D']}:{s['w']}:{dtype}")
    return out


def build_dump(nvcc, cutlass, out_dir=OUT):
    """Compiles tools/launch_plan_dump.cu for the host; returns (exe or None, log)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "launch_plan_dump"
    cmd = [nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-O1", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'tools'}", f"-I{cutlass}", str(ROOT / "tools" / "launch_plan_dump.cu"),
           "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return (exe if r.returncode == 0 else None), " ".join(cmd) + "\n" + r.stdout + r.stderr


def run_dump(exe, specs):
    r = subprocess.run([str(exe)] + list(specs), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"launch_plan_dump failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def base_name(report_kernel):
    """'decode_impl::decode_step_kernel<bf16,128>' -> 'decode_step_kernel'."""
    return re.sub(r"^(\w+::)+", "", report_kernel.split("<", 1)[0])


DTYPE_TOKENS = {"bf16": ("bf16", "__nv_bfloat16"), "fp16": ("fp16", "__half")}


def match_report(row, report, arch):
    """The report.json row of this launch's kernel instantiation (same base name, then the
    dtype and the head dim among the template arguments when several match)."""
    cands = [r for r in report if r["arch"] == arch and base_name(r["kernel"]) == row["kernel"]]
    if len(cands) > 1:
        toks = DTYPE_TOKENS[row["dtype"]]
        typed = [r for r in cands if any(re.search(rf"\b{t}\b", r["kernel"]) for t in toks)]
        cands = typed or cands
    if len(cands) > 1:
        d = str(row["head_dim"])
        cands = [r for r in cands if d in re.findall(r"\d+", r["kernel"].split("<", 1)[-1])]
    if len(cands) > 1:
        # RLA kernels come in two configurations (rla_plan.h: the default one and the one for
        # 99 KB per block); the launch's dynamic smem tells them apart, and the H200 of the plan
        # runs the default one (BV = 64 value columns, phi(q) whole) for the kernels with none
        sized = [r for r in cands if r.get("dynamic_smem_bytes") == row["smem_bytes"]]
        cands = sized or cands
    if len(cands) > 1:
        default = [r for r in cands if re.search(r"RlaTraits<\w+,\s*\d+,\s*64,\s*1>", r["kernel"])]
        cands = default or cands
    return cands[0] if len(cands) == 1 else None


def occupancy(threads, smem_dynamic, static_smem, registers, gpu=H200):
    """CTAs of one kernel resident per SM, and which resource limits it."""
    warps = math.ceil(threads / 32)
    smem = static_smem + smem_dynamic + gpu["smem_reserved_per_cta"]
    smem = math.ceil(smem / gpu["smem_alloc_unit"]) * gpu["smem_alloc_unit"]
    regs_per_warp = math.ceil(registers * 32 / gpu["reg_alloc_unit"]) * gpu["reg_alloc_unit"]
    limits = {
        "ctas": gpu["max_ctas_per_sm"],
        "warps": gpu["max_warps_per_sm"] // warps,
        "smem": gpu["smem_per_sm"] // smem,
        "registers": (gpu["regs_per_sm"] // regs_per_warp) // warps if registers else gpu["max_ctas_per_sm"],
    }
    n = min(limits.values())
    return n, min(limits, key=limits.get)


def enrich(rows, report, gpu=H200):
    """Adds ctas, ctas_per_sm, waves, ... from report.json; returns (rows, problems)."""
    problems = []
    out = []
    for r in rows:
        rep = match_report(r, report, gpu["arch"])
        if rep is None:
            problems.append(f"launch plan: no single {gpu['arch']} report.json row for kernel "
                            f"{r['kernel']} ({r['dtype']}, D={r['head_dim']})")
            continue
        ctas = r["grid"][0] * r["grid"][1] * r["grid"][2]
        per_sm, limit = occupancy(r["threads"], r["smem_bytes"], rep["static_smem_bytes"],
                                  rep["registers"], gpu)
        if per_sm < 1:
            problems.append(f"launch plan: {rep['kernel']} at {r['shape']} cannot be resident "
                            f"on an {gpu['name']} ({limit})")
        waves = ctas / (per_sm * gpu["sms"]) if per_sm else math.inf
        out.append({
            "shape": r["shape"], "op": r["op"], "kernel": rep["kernel"], "grid": r["grid"],
            "threads": r["threads"], "smem_bytes": r["smem_bytes"], "ctas": ctas,
            "ctas_per_sm": per_sm, "waves": round(waves, 3), "serial_steps": r["serial_steps"],
            "workspace_bytes": r["workspace_bytes"],
            # the RLA backward runs its launches once per sub-batch: row sub_batch of sub_batches
            "sub_batch": r["sub_batch"], "sub_batches": r["sub_batches"],
            # RLA calls: the forward's checkpoints + final state, live next to the workspace
            "saved_state_bytes": r["saved_state_bytes"],
            # beyond the schema: the op call, what limits ctas_per_sm, resident warps per SM
            # at that occupancy, SMs with work, registers and static smem from the report
            "call": r["call"], "occupancy_limit": limit,
            "warps_per_sm": per_sm * math.ceil(r["threads"] / 32),
            "sms_busy": min(gpu["sms"], ctas), "registers": rep["registers"],
            "static_smem_bytes": rep["static_smem_bytes"], "mma": rep.get("mma"),
        })
    return out, problems


def collapse_sub_batches(rows):
    """The rows with each run of sub-batches shown once: the rows of sub-batch 0 of a call,
    paired with its sub-batch count (the other sub-batches repeat them)."""
    return [(r, r.get("sub_batches", 1)) for r in rows if r.get("sub_batch", 0) == 0]


def format_table(rows):
    head = ("shape", "op", "kernel", "grid", "thr", "smem", "regs", "ctas", "cta/SM", "warp/SM",
            "waves", "serial", "workspace MiB", "runs")
    body = [(r["shape"], r["op"], r["kernel"], "x".join(map(str, r["grid"])), str(r["threads"]),
             str(r["smem_bytes"]), str(r["registers"]), str(r["ctas"]), str(r["ctas_per_sm"]),
             str(r["warps_per_sm"]), f"{r['waves']:.3f}", str(r["serial_steps"]),
             f"{r['workspace_bytes'] / 2**20:.1f}", f"x {n}" if n > 1 else "")
            for r, n in collapse_sub_batches(rows)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head)] + [fmt(b) for b in body])


def _tensor_core(r):
    return bool(r.get("mma"))


def _family(prefix):
    return lambda r: re.sub(r"^(\w+::)+", "", r["kernel"]).startswith(prefix)


# The structural goals of the GPU-performance issues, read from the plan rows: (what, shape,
# rows selected, the value over them, the bound). Reported by `make cuda-check`, not enforced.
TARGETS = [
    ("RLA tensor-core launches: CTAs", "S1", lambda r: _family("rla_")(r) and _tensor_core(r),
     lambda rows: min(r["ctas"] for r in rows), ">=", 132),
    ("RLA tensor-core launches: resident warps per SM", "S1",
     lambda r: _family("rla_")(r) and _tensor_core(r),
     lambda rows: min(r["warps_per_sm"] for r in rows), ">=", 8),
    ("RLA tensor-core launches: serial chunk steps", "S1",
     lambda r: _family("rla_")(r) and _tensor_core(r),
     lambda rows: max(r["serial_steps"] for r in rows), "<=", 16),
    # a launch's own workspace plus the checkpoints and final state the forward saved
    ("RLA temporaries MiB (workspace + checkpoints + final state)", "S2", _family("rla_"),
     lambda rows: max(r["workspace_bytes"] + r["saved_state_bytes"] for r in rows) / 2**20,
     "<=", 1024),
    ("SWA tensor-core launches: resident warps per SM", "S1",
     lambda r: _family("swa_")(r) and _tensor_core(r),
     lambda rows: min(r["warps_per_sm"] for r in rows), ">=", 8),
    ("SWA tensor-core launches: resident warps per SM", "S2",
     lambda r: _family("swa_")(r) and _tensor_core(r),
     lambda rows: min(r["warps_per_sm"] for r in rows), ">=", 8),
    ("decode step: CTAs of its largest launch", "D1", lambda r: r["op"] == "decode_step",
     lambda rows: max(r["ctas"] for r in rows), ">=", 32),
]


def targets(rows):
    """[(what, shape, value, op, bound, met)] for TARGETS over the launch.json rows."""
    out = []
    for what, shape, select, value, op, bound in TARGETS:
        sel = [r for r in rows if r["shape"] == shape and select(r)]
        v = value(sel) if sel else None
        met = v is not None and (v >= bound if op == ">=" else v <= bound)
        out.append((what, shape, v, op, bound, met))
    return out


def format_targets(rows):
    lines = []
    for what, shape, v, op, bound, met in targets(rows):
        got = "no rows" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append(f"  {'met   ' if met else 'MISSED'}  {shape}  {what}: {got} (goal {op} {bound})")
    return "\n".join(lines)


def write(exe, report, out_dir=OUT, gpu=H200):
    """Runs the dump at the reference shapes, writes launch.json; returns (rows, problems)."""
    rows, problems = enrich(run_dump(exe, spec_args()), report, gpu)
    (out_dir / "launch.json").write_text(json.dumps(rows, indent=1))
    return rows, problems
