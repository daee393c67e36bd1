"""Coverage of the CUDA kernels by the emulated tests: which (kernel instantiation, path)
pairs ran, from the recorder in tools/emu/coverage.h (markers RATT_COVER / RATT_COVER_ANY
in csrc/cuda, see csrc/cuda/launch.cuh).

    python tools/emu/coverage.py [build/emu/coverage.json]    # print the table again

tests/test_cuda_emulated.py (last test) reads the recorder after the file's other tests,
writes build/emu/coverage.json, prints the table and fails on any required pair that never
ran: a RATT_COVER path in an instantiation, a RATT_COVER_ANY path in no instantiation, or a
`__global__` function of csrc/cuda that has no marker (so the recorder cannot see it).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
DEFAULT_JSON = ROOT / "build" / "emu" / "coverage.json"
TAG = "::RattCoverTag::function()"


def _strip_params(qualified: str) -> str:
    """'ns::f(a, g(b))' -> 'ns::f' (drops the trailing parameter list)."""
    if not qualified.endswith(")"):
        return qualified
    depth = 0
    for i in range(len(qualified) - 1, -1, -1):
        ch = qualified[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            depth -= 1
            if depth == 0:
                return qualified[:i]
    return qualified


def _split_top(s: str, sep: str) -> list[str]:
    out, depth, cur = [], 0, ""
    i = 0
    while i < len(s):
        ch = s[i]
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            out.append(cur)
            cur = ""
            i += len(sep)
            continue
        cur += ch
        i += 1
    out.append(cur)
    return out


def readable(name: str) -> str:
    """The same shortening as tools/cuda_check.py's kernel names."""
    s = re.sub(r"\b(rattention|cuda|cutlass|cute)::", "", name)
    s = s.replace("bfloat16_t", "bf16").replace("half_t", "fp16")
    s = re.sub(r"DynSmem<\d+>", "", s)
    s = re.sub(r",\s*>", ">", s).replace(" ", "")
    return s


def kernel_name(signature: str) -> str:
    """GCC's __PRETTY_FUNCTION__ of a marker's tag -> 'swa_fwd_kernel<SwaTraits<bf16,64>>'.

    The signature reads 'static const char* <function>(<params>)::RattCoverTag::function()
    [with A = x; int B = y]'; template arguments that are CuTe tensor / layout types (those of
    register-level helpers) are left out of the name."""
    head, _, with_part = signature.partition(" [with ")
    head = head.removeprefix("static const char* ")
    fn = _strip_params(head.split(TAG)[0]) if TAG in head else head
    args = []
    if with_part:
        for a in _split_top(with_part.rstrip("]"), "; "):
            value = a.split(" = ", 1)[-1].strip()
            if "cute::" in value:
                continue
            args.append(value)
    name = fn + (f"<{', '.join(args)}>" if args else "")
    return readable(name)


def base_name(kernel: str) -> str:
    """'mix_impl::mix_fwd_kernel<float>' -> 'mix_fwd_kernel'."""
    return kernel.split("<", 1)[0].rsplit("::", 1)[-1]


def global_functions(cuda_dir: Path = CUDA_DIR) -> dict[str, str]:
    """Names of the `__global__` functions in csrc/cuda -> the file that defines them."""
    out = {}
    for f in sorted(list(cuda_dir.glob("*.cu")) + list(cuda_dir.glob("*.cuh"))):
        text = f.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?"
                             r"(?:\n\s*)?(\w+)\s*\(", text):
            out[m.group(1)] = f.name
    return out


def collect(snapshot) -> list[dict]:
    """Rows {kernel, path, any, hits} from the module's coverage() (one per marker site;
    sites of the same (kernel, path), e.g. a marker reached through two call paths, merge)."""
    rows: dict[tuple[str, str], dict] = {}
    for signature, path, any_inst, hits in snapshot:
        key = (kernel_name(signature), path)
        r = rows.setdefault(key, {"kernel": key[0], "path": path, "any": bool(any_inst), "hits": 0})
        r["hits"] += int(hits)
    return sorted(rows.values(), key=lambda r: (base_name(r["kernel"]), r["kernel"], r["path"]))


def missing(rows: list[dict], globals_: dict[str, str] | None = None) -> list[str]:
    """Required pairs that never ran, and kernels the recorder does not see."""
    out = []
    for r in rows:
        if not r["any"] and r["hits"] == 0:
            out.append(f"{r['kernel']}: path '{r['path']}' never ran")
    any_paths: dict[tuple[str, str], int] = {}
    for r in rows:
        if r["any"]:
            k = (base_name(r["kernel"]), r["path"])
            any_paths[k] = any_paths.get(k, 0) + r["hits"]
    for (fn, path), hits in sorted(any_paths.items()):
        if hits == 0:
            out.append(f"{fn}: path '{path}' ran in no instantiation")
    seen = {base_name(r["kernel"]) for r in rows}
    for fn, src in sorted((globals_ if globals_ is not None else global_functions()).items()):
        if fn not in seen:
            out.append(f"{fn} ({src}): no RATT_COVER marker, so the emulator cannot tell that it ran")
    return out


def compare_cuda_check(rows: list[dict], report: Path) -> list[str]:
    """Kernels `make cuda-check` compiled (its report.json) that the emulated build lacks."""
    compiled = {r["kernel"] for r in json.loads(report.read_text())}
    emulated = {r["kernel"] for r in rows}
    return [f"{k}: compiled by make cuda-check, not in the emulated build" for k in sorted(compiled - emulated)]


def table(rows: list[dict]) -> str:
    w = max([len(r["kernel"]) for r in rows] + [6])
    pw = max([len(r["path"]) for r in rows] + [4])
    lines = [f"{'kernel':{w}s}  {'path':{pw}s}  {'hits':>9s}  note", "-" * (w + pw + 24)]
    for r in rows:
        note = "any instantiation" if r["any"] else ""
        if r["hits"] == 0:
            note = "NEVER RAN" + (" (another instantiation may cover it)" if r["any"] else "")
        lines.append(f"{r['kernel']:{w}s}  {r['path']:{pw}s}  {r['hits']:9d}  {note}")
    kernels = {r["kernel"] for r in rows}
    hit = sum(1 for r in rows if r["hits"] > 0)
    lines.append(f"{len(kernels)} instantiations (kernels and marked helpers), {len(rows)} "
                 f"(instantiation, path) pairs, {hit} ran")
    return "\n".join(lines)


def write(rows: list[dict], problems: list[str], path: Path = DEFAULT_JSON) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "missing": problems}, indent=1))
    return path


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else DEFAULT_JSON
    if not path.exists():
        print(f"{path}: no coverage recorded yet (run tests/test_cuda_emulated.py)", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    print(table(data["rows"]))
    for m in data["missing"]:
        print("MISSING:", m)
    return 1 if data["missing"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
