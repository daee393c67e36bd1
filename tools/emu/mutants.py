"""Mutation check of the CUDA kernels' synchronisation against the emulated tests.

For every `__syncthreads()`, `__syncthreads_or(p)` and every `cp_async_wait<N>()` in
csrc/cuda, one mutation at a time: the barrier deleted (`__syncthreads_or(p)` then gives each
thread its own p); the wait shortened to `cp_async_wait<N+1>()` and deleted. Each
mutation must make the matching emulated tests fail (tests/test_cuda_emulated.py and
tests/test_nan_rule_emulated.py, whose poisoned inputs run the non-finite-tile paths; the cases
marked `mutants` whose `emu_kernel(...)` marker names the mutated file). Prints caught /
missed per site with the test (and its message) that caught it.

    python tools/emu/mutants.py [--jobs 2] [--only swa_fwd_kernel.cuh[:131]] [--list]
    make emu-mutants

The checkout is never touched: the sources are copied to build/emu-mutants/tree, where every
site becomes a switch on the environment variable RATTENTION_EMU_MUTANT (mutant schemata),
so the mutated emulator is built once (incrementally after a change) and each mutation is a
pytest process with RATTENTION_EMU_MUTANT=<id> over that one module
(RATTENTION_EMU_MODULE). The unmutated build must pass the same tests first.

A site that is truly redundant is marked in the source, on its line or the line above:
    // emu-mutants: redundant because <which warps write / read what between the barriers>
Its mutations still run and are reported, but a miss there does not fail. The exit status
is non-zero when a mutation of an unmarked site is missed (or the baseline fails).
Results: build/emu-mutants/report.json.
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
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
OUT = ROOT / "build" / "emu-mutants"
TREE = OUT / "tree"
MARK = "emu-mutants: redundant"
SWITCH_HEADER = "emu_mutant_switch.h"
SITE_RE = re.compile(r"__syncthreads\(\)|cp_async_wait<(\d+)>\(\)|__syncthreads_or(?=\()")


@dataclass
class Mutation:
    id: int
    file: str
    line: int
    site: str          # the original text, e.g. "cp_async_wait<0>()"
    kind: str          # "delete" | "wait<N+1>"
    redundant: str     # the reason from an `emu-mutants: redundant` comment, or ""
    result: str = ""   # "caught" | "missed" | "error"
    caught_by: str = ""
    seconds: float = 0.0
    tests: list = field(default_factory=list)

    @property
    def where(self):
        return f"{self.file}:{self.line}"

    def label(self):
        return f"{self.site} -> {'deleted' if self.kind == 'delete' else self.kind}"


def code_part(line: str) -> str:
    """The line without its // comment."""
    i = line.find("//")
    return line if i < 0 else line[:i]


def redundancy_reason(lines: list[str], i: int) -> str:
    """The reason of an `emu-mutants: redundant ...` mark on line i or in the comment block
    right above it ("" when the site is not marked)."""
    block = [lines[i]]
    j = i - 1
    while j >= 0 and lines[j].strip().startswith("//"):
        block.insert(0, lines[j])
        j -= 1
    text = " ".join(ln.strip().lstrip("/").strip() if ln.strip().startswith("//") else
                    (ln[ln.find("//") + 2:].strip() if "//" in ln else "") for ln in block)
    k = text.find(MARK)
    if k < 0:
        return ""
    return text[k + len(MARK):].strip(" :") or "(no reason given)"


def find_sites(cuda_dir: Path = CUDA_DIR) -> list[Mutation]:
    """Every mutation of every site. Ids are stable per file (a hash of its name, then the
    order in the file), so an edit of one file rebuilds only that file's objects."""
    muts: list[Mutation] = []
    for f in sorted(list(cuda_dir.glob("*.cu")) + list(cuda_dir.glob("*.cuh"))):
        lines = f.read_text().splitlines()
        base = (zlib.crc32(f.name.encode()) % 100000) * 1000
        n_file = 0
        for i, line in enumerate(lines):
            for m in SITE_RE.finditer(code_part(line)):
                reason = redundancy_reason(lines, i)
                kinds = ["delete"] if m.group(1) is None else [f"wait<{int(m.group(1)) + 1}>", "delete"]
                for kind in kinds:
                    muts.append(Mutation(base + n_file, f.name, i + 1, m.group(0), kind, reason))
                    n_file += 1
    return muts


def schema_line(line: str, muts_here: list[Mutation]) -> str:
    """Replace the sites on one source line by switches on ratt_emu_mutant(). find_sites
    made the mutations of a line in the order of its matches (1 per barrier, 2 per wait)."""
    i = line.find("//")
    code, comment = (line, "") if i < 0 else (line[:i], line[i:])
    pending = sorted(muts_here, key=lambda x: x.id)
    out, last = [], 0
    for m in SITE_RE.finditer(code):
        n = 1 if m.group(1) is None else 2
        mine, pending = pending[:n], pending[n:]
        expr = m.group(0)
        for x in mine:
            if x.kind != "delete":
                alt = f"cp_async_wait<{int(m.group(1)) + 1}>()"
            elif m.group(0) == "__syncthreads_or":  # the call's (predicate) follows
                alt = "::emu::no_barrier_or"
            else:
                alt = "(void)0"
            expr = f"(ratt_emu_mutant() == {x.id} ? {alt} : {expr})"
        out.append(code[last:m.start()] + expr)
        last = m.end()
    out.append(code[last:])
    return "".join(out) + comment


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def make_tree(muts: list[Mutation]) -> None:
    """build/emu-mutants/tree: csrc (kernels with every site switched) and tools (the
    emulator). Files are rewritten only when their content changes (incremental builds)."""
    for sub in ("csrc", "tools"):
        for src in (ROOT / sub).rglob("*"):
            if src.is_dir() or "__pycache__" in src.parts:
                continue
            rel = src.relative_to(ROOT)
            dst = TREE / rel
            text = src.read_bytes()
            if src.parent == CUDA_DIR and src.suffix in (".cu", ".cuh"):
                here = [m for m in muts if m.file == src.name]
                if here:
                    lines = src.read_text().splitlines(keepends=True)
                    for ln in sorted({m.line for m in here}):
                        nl = "\n" if lines[ln - 1].endswith("\n") else ""
                        lines[ln - 1] = schema_line(lines[ln - 1].rstrip("\n"),
                                                    [m for m in here if m.line == ln]) + nl
                    body = "".join(lines)
                    inc = f'#include "{SWITCH_HEADER}"  // emu-mutants schemata\n'
                    if "#pragma once\n" in body:
                        body = body.replace("#pragma once\n", "#pragma once\n" + inc, 1)
                    else:
                        body = inc + body
                    text = body.encode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists() or dst.read_bytes() != text:
                dst.write_bytes(text)
    write_if_changed(TREE / "csrc" / "cuda" / SWITCH_HEADER, (
        "// emu-mutants: which mutation of the synchronisation sites is active (-1: none).\n"
        "// Not instrumented and never inlined into the kernels: its function-local static is\n"
        "// module data, which the emulator's checks would take for static __shared__.\n"
        "#pragma once\n#include <cstdlib>\n"
        "__attribute__((noinline, no_sanitize_thread)) inline int ratt_emu_mutant() {\n"
        "  static const int id = [] {\n"
        "    const char* s = std::getenv(\"RATTENTION_EMU_MUTANT\");\n"
        "    return s ? std::atoi(s) : -1;\n"
        "  }();\n"
        "  return id;\n"
        "}\n"))


def build_tree(python: str) -> Path:
    t0 = time.time()
    print(f"emu-mutants: building the switched emulator in {TREE.relative_to(ROOT)} "
          "(incremental; the first build takes minutes)", flush=True)
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", "2")
    r = subprocess.run([python, str(TREE / "tools" / "emu" / "build.py")], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-6000:] + r.stderr[-6000:])
        raise SystemExit("emu-mutants: the switched emulator does not build")
    so = Path(r.stdout.strip().splitlines()[-1])
    print(f"emu-mutants: built {so.name} in {time.time() - t0:.0f}s", flush=True)
    return so


FAILED_RE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)


def run_tests(python: str, module: Path, file: str, mutant: int, timeout: int):
    """pytest over the `mutants` cases of `file` with one mutation on. Returns
    (passed, caught_by, tests, seconds)."""
    env = dict(os.environ, RATTENTION_EMU_MODULE=str(module), RATTENTION_EMU_MUTANT=str(mutant),
               RATTENTION_EMU_MUTANT_FILE=file)
    # the checkout's package when it is built in place (make dev), else the installed one
    in_place = list((ROOT / "python" / "rattention_ext").glob("_C*.so"))
    env["PYTHONPATH"] = os.pathsep.join(
        ([str(ROOT / "python")] if in_place else []) + [str(ROOT / "tools" / "emu")] +
        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [python, "-m", "pytest", "-q", "-x", "-rfE", "-p", "mutants_plugin", "-m", "mutants",
           "-p", "no:cacheprovider", "test_cuda_emulated.py", "test_nan_rule_emulated.py"]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT / "tests", env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout}s (a hang)", [], time.time() - t0
    dt = time.time() - t0
    out = r.stdout + r.stderr
    tests = re.findall(r"^RAN (\S+)$", out, re.M)
    if r.returncode == 0:
        return True, "", tests, dt
    if r.returncode == 5:
        return False, "ERROR: no test selected for this file", tests, dt
    m = FAILED_RE.search(out)
    if m:
        msg = (m.group(3) or "").strip()
        return False, f"{m.group(2).split('::')[-1]}: {msg[:160]}", tests, dt
    # the process died (e.g. an emulator check aborted): its last line says why
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
    why = " | ".join(tail)[-200:]
    return False, f"process exit {r.returncode}: {why}", tests, dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="parallel pytest processes")
    ap.add_argument("--only", action="append", default=[],
                    help="FILE or FILE:LINE (repeatable): only these sites")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation run")
    ap.add_argument("--list", action="store_true", help="list the sites and exit")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)

    muts = find_sites()
    if args.list:
        for m in muts:
            print(f"{m.id:9d}  {m.where:28s} {m.label():42s} {('redundant: ' + m.redundant) if m.redundant else ''}")
        return 0
    run = muts
    if args.only:
        def wanted(m):
            return any(m.file == o or m.where == o for o in args.only)
        run = [m for m in muts if wanted(m)]
    t_start = time.time()
    make_tree(muts)
    module = build_tree(args.python)

    files = sorted({m.file for m in run})
    print(f"emu-mutants: baseline (no mutation) for {', '.join(files)}", flush=True)
    bad = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futs = {ex.submit(run_tests, args.python, module, f, -1, args.timeout): f for f in files}
        for fut in cf.as_completed(futs):
            ok, why, tests, dt = fut.result()
            f = futs[fut]
            print(f"  baseline {f:24s} {'ok' if ok else 'FAILED'} {dt:5.0f}s  {len(tests)} tests", flush=True)
            if not ok or not tests:
                bad.append(f"{f}: {why or 'no test ran'}")
    if bad:
        print("emu-mutants: the unmutated emulator fails its own tests:\n  " + "\n  ".join(bad),
              file=sys.stderr)
        return 2

    print(f"emu-mutants: {len(run)} mutations, {args.jobs} at a time", flush=True)
    done = 0
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futs = {ex.submit(run_tests, args.python, module, m.file, m.id, args.timeout): m for m in run}
        for fut in cf.as_completed(futs):
            m = futs[fut]
            ok, why, tests, dt = fut.result()
            m.seconds, m.tests = dt, tests
            if why.startswith("ERROR"):
                m.result, m.caught_by = "error", why
            else:
                m.result = "missed" if ok else "caught"
                m.caught_by = why
            done += 1
            tag = m.result.upper() if m.result != "caught" else "caught"
            print(f"  [{done:2d}/{len(run)}] {m.where:28s} {m.label():38s} {tag:7s} {dt:5.0f}s  "
                  f"{m.caught_by}", flush=True)

    run.sort(key=lambda m: (m.file, m.line, m.kind))
    print(f"\n{'site':28s} {'mutation':38s} {'result':8s} caught by / note")
    for m in run:
        note = m.caught_by
        if m.result == "missed" and m.redundant:
            note = f"marked redundant: {m.redundant}"
        print(f"{m.where:28s} {m.label():38s} {m.result:8s} {note}")
    unmarked_missed = [m for m in run if m.result != "caught" and not m.redundant]
    n_caught = sum(m.result == "caught" for m in run)
    elapsed = time.time() - t_start
    print(f"\n{n_caught}/{len(run)} mutations caught; {len(unmarked_missed)} missed at unmarked "
          f"sites; {sum(bool(m.redundant) for m in run)} at sites marked redundant; "
          f"{elapsed:.0f}s with --jobs {args.jobs}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(
        {"seconds": elapsed, "jobs": args.jobs, "mutations": [asdict(m) for m in run]}, indent=1))
    return 1 if unmarked_missed else 0


if __name__ == "__main__":
    sys.exit(main())
