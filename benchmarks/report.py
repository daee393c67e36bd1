"""Results: JSON (everything), a markdown table, PNG plots (time vs T, speed-up of ours vs
each peer), all stamped with the machine, CPU model, GPU, torch version, date and commit."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

OP_TITLES = {"swa_fwd": "SWA forward", "rla_fwd": "RLA forward", "fwd": "RAttention forward",
             "fwd_bwd": "RAttention forward+backward", "decode": "decode step"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata() -> Dict:
    root = Path(__file__).resolve().parents[1]
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git_commit(root),
    }
    try:
        import rattention_ext
        meta["rattention_build"] = rattention_ext.build_info()
    except Exception as e:  # noqa: BLE001
        meta["rattention_build"] = f"not importable: {e}"
    try:
        with open("/proc/loadavg") as f:
            meta["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    return meta


def stamp(meta: Dict) -> str:
    gpu = meta["gpu"] or "no GPU"
    return (f"{meta['date_utc']}, commit {meta['commit']}, {meta['cpu']} "
            f"({meta['torch_threads']} torch threads of {meta['cpu_count']} CPUs), {gpu}, "
            f"torch {meta['torch']}")


def _fmt(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ms(r: Optional[Dict]) -> str:
    return f"{r['median_s'] * 1e3:.1f}" if r and r.get("status") == "ok" else "-"


def _ok(r: Optional[Dict]) -> bool:
    return bool(r) and r.get("status") == "ok"


def _key(r: Dict):
    return (r["op"], r["B"], r["Hq"], r["Hkv"], r["D"], r["w"], r["dtype"], r["T"])


def index(rows: List[Dict]) -> Dict:
    idx = {}
    for r in rows:
        idx[_key(r) + (r["backend"],)] = r
    return idx


def speedups(rows: List[Dict]) -> None:
    """Adds `speedup_vs_ours` (peer time / our time; > 1 means ours is faster) to peer rows."""
    idx = index(rows)
    for r in rows:
        ours = idx.get(_key(r) + ("ours",))
        if r["backend"] != "ours" and _ok(r) and _ok(ours):
            r["speedup_vs_ours"] = r["median_s"] / ours["median_s"]


def quick_table(data: Dict) -> str:
    """Issue 3's CPU table: RAttention forward+backward, ours vs the plain-PyTorch composition."""
    rows, meta, ceil = data["results"], data["meta"], data["ceilings"]
    mm = ceil["matmul"]["flops_per_s"] / 1e9
    idx = index(rows)
    c = data["config"]
    lines = [
        f"RAttention forward+backward (and SWA forward alone) on CPU, B={c['B']}, Hq={c['Hq']}, Hkv={c['Hkv']}, "
        f"w={c['w']}, {c['dtype']}, feature map {c['feature_map']}.  ",
        f"Machine: {stamp(meta)}.  ",
        f"Ceilings measured in this run: matmul {mm:.1f} GFLOP/s ({c['dtype']}, "
        f"n={ceil['matmul']['n']}), copy {ceil['copy']['bytes_per_s'] / 1e9:.1f} GB/s.  ",
        "Times are wall-clock medians; ratios are taken within this one run (the machine is "
        "shared and noisy: compare ratios, not absolute times across runs). GFLOP/s count only "
        "the keys inside the window (SWA) and the chunked RLA work, backward = 2.5x forward "
        "for SWA (benchmarks/flops.py). Peak MB: resident-set growth during one call, measured "
        "in a fresh process per case.",
        "",
        "| D | T | ours fwd+bwd ms | PyTorch fwd+bwd ms | speed-up | ours GFLOP/s | PyTorch GFLOP/s "
        "| ours peak MB | PyTorch peak MB | ours SWA fwd GFLOP/s (% of matmul) "
        "| SWA fwd speed-up vs PyTorch SDPA | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["D"], r["T"]) for r in rows if r["op"] == "fwd_bwd"})
    for D, T in keys:
        k = ("fwd_bwd", c["B"], c["Hq"], c["Hkv"], D, c["w"], c["dtype"], T)
        o, p = idx.get(k + ("ours",)), idx.get(k + ("torch",))
        s = idx.get(("swa_fwd",) + k[1:] + ("ours",))
        sp_ = idx.get(("swa_fwd",) + k[1:] + ("torch",))
        sp = f"{p['median_s'] / o['median_s']:.2f}x" if _ok(o) and _ok(p) else "-"
        swa_sp = f"{sp_['median_s'] / s['median_s']:.2f}x" if _ok(s) and _ok(sp_) else "-"
        swa = (f"{s['gflops']:.1f} ({100 * s['gflops'] / mm:.0f}%)" if _ok(s) else "-")
        notes = []
        for name, r in (("ours", o), ("PyTorch", p), ("ours SWA", s), ("PyTorch SWA", sp_)):
            if r and not _ok(r):
                notes.append(f"{name}: {r['status']}")
        lines.append(
            f"| {D} | {T} | {_ms(o)} | {_ms(p)} | {sp} | {_fmt(o.get('gflops') if _ok(o) else None)} "
            f"| {_fmt(p.get('gflops') if _ok(p) else None)} "
            f"| {_fmt(o.get('peak_mb') if _ok(o) else None, 0)} "
            f"| {_fmt(p.get('peak_mb') if _ok(p) else None, 0)} | {swa} | {swa_sp} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def full_table(data: Dict) -> str:
    """Every row: time, window-counted FLOP/s and bytes/s against the measured ceilings."""
    rows, ceil = data["results"], data["ceilings"]
    mm, bw = ceil["matmul"]["flops_per_s"] / 1e9, ceil["copy"]["bytes_per_s"] / 1e9
    lines = [f"Machine: {stamp(data['meta'])}. Ceilings: matmul {mm:.1f} GFLOP/s, copy {bw:.1f} GB/s.",
             "",
             "| op | B | T | Hq | Hkv | D | w | dtype | backend | ms | GFLOP/s | % matmul | GB/s "
             "| % copy | peak MB | peer time / ours | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: _key(r) + (r["backend"] != "ours", r["backend"])):
        ok = _ok(r)
        g = r.get("gflops") if ok else None
        gb = r.get("gbytes_per_s") if ok else None
        lines.append(
            f"| {r['op']} | {r['B']} | {r['T']} | {r['Hq']} | {r['Hkv']} | {r['D']} | {r['w']} "
            f"| {r['dtype']} | {r['backend']} | {_ms(r)} | {_fmt(g)} "
            f"| {_fmt(100 * g / mm if g else None, 0)} | {_fmt(gb)} "
            f"| {_fmt(100 * gb / bw if gb else None, 0)} | {_fmt(r.get('peak_mb') if ok else None, 0)} "
            f"| {_fmt(r.get('speedup_vs_ours'), 2)} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(data: Dict, path: Path) -> Optional[Path]:
    """Per op: time vs T (log-log, one line per backend and D) and ours' speed-up vs each peer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"[bench] no plot: matplotlib not importable ({e})")
        return None
    rows = [r for r in data["results"] if _ok(r)]
    ops = [op for op in OP_TITLES if any(r["op"] == op for r in rows)]
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        ax_t, ax_s = axes[i]
        series = defaultdict(list)
        for r in rows:
            if r["op"] == op:
                series[(r["backend"], r["D"])].append((r["T"], r["median_s"] * 1e3, r))
        for (be, D), pts in sorted(series.items()):
            pts.sort()
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{be} D={D}")
        ax_t.set_xscale("log", base=2)
        ax_t.set_yscale("log")
        ax_t.set_xlabel("T")
        ax_t.set_ylabel("ms (median)")
        ax_t.set_title(f"{OP_TITLES[op]}: time vs T")
        ax_t.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        sp = defaultdict(list)
        for r in rows:
            if r["op"] == op and "speedup_vs_ours" in r:
                sp[(r["backend"], r["D"])].append((r["T"], r["speedup_vs_ours"]))
        for (be, D), pts in sorted(sp.items()):
            pts.sort()
            ax_s.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs {be} D={D}")
        ax_s.axhline(1.0, color="gray", lw=0.8)
        ax_s.set_xscale("log", base=2)
        ax_s.set_xlabel("T")
        ax_s.set_ylabel("peer time / our time")
        ax_s.set_title(f"{OP_TITLES[op]}: speed-up of rattention_ext")
        ax_s.grid(True, which="both", alpha=0.3)
        if sp:
            ax_s.legend(fontsize=8)
        else:
            ax_s.set_xscale("linear")
            ax_s.set_xticks([])
            ax_s.text(0.5, 0.5, "no peer measured", ha="center", va="center", transform=ax_s.transAxes)
    fig.suptitle(stamp(data["meta"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(data: Dict, out_dir: Path, prefix: str, quick: bool, make_plot: bool = True) -> Dict[str, Path]:
    """Writes <prefix>_<date>.json/.md/.png and latest_<prefix>.md into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    speedups(data["results"])
    day = data["meta"]["date_utc"].split()[0]
    base = out_dir / f"{prefix}_{day}"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md")}
    paths["json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = (quick_table(data) + "\n<details><summary>all rows</summary>\n\n" + full_table(data)
          + "\n</details>\n") if quick else full_table(data)
    if make_plot:
        png = plot(data, base.with_suffix(".png"))
        if png:
            paths["png"] = png
            md += f"\n![{prefix} benchmark]({png.name})\n"
    paths["md"].write_text(md)
    latest = out_dir / f"latest_{prefix}.md"
    latest.write_text(md)
    paths["latest"] = latest
    return paths
