"""What is inside a rattention_ext wheel: GPU architectures (SASS and PTX), sizes, build info.

    python -m rattention_ext.inspect_wheel dist/rattention_ext-0.1.0-cp311-cp311-linux_x86_64.whl
    python python/rattention_ext/inspect_wheel.py WHEEL [--json]     # without installing

Unzips the wheel, finds the compiled modules (``*.so``), and for each:
  * its size, and whether it carries CUDA device code at all (an ELF ``.nv_fatbin`` section;
    read directly, so a CPU-only wheel is recognised without any CUDA tool);
  * ``cuobjdump --list-elf`` / ``--list-ptx``: the SASS (``sm_XX``) and PTX (``compute_XX``)
    architectures. cuobjdump comes from $CUOBJDUMP, PATH, $CUDA_HOME/bin, the pip package
    ``nvidia-cuda-cuobjdump``, or triton's bundled copy, in that order;
  * ``rattention_ext.build_info()`` from the unzipped wheel, when it imports here.

This file imports nothing from the package, so it runs before the package is built.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

_ARCH = re.compile(r"sm_(\d+[a-z]?)")


def elf_section_names(path: Path) -> List[str]:
    """Section names of a 64-bit little-endian ELF file ([] if it is not one)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return []
        e_shoff, = struct.unpack_from("<Q", head, 0x28)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        if e_shoff == 0 or e_shnum == 0:
            return []
        f.seek(e_shoff)
        table = f.read(e_shentsize * e_shnum)
        secs = [struct.unpack_from("<IIQQQQ", table, i * e_shentsize) for i in range(e_shnum)]
        _, _, _, _, str_off, str_size = secs[e_shstrndx]
        f.seek(str_off)
        strtab = f.read(str_size)
    names = []
    for name_off, *_ in secs:
        end = strtab.find(b"\0", name_off)
        names.append(strtab[name_off:end].decode(errors="replace"))
    return names


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from $CUOBJDUMP, PATH, $CUDA_HOME/bin, nvidia-cuda-cuobjdump, or triton."""
    cands = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    try:  # pip package nvidia-cuda-cuobjdump: nvidia/<cu13|cuda_cuobjdump>/bin/cuobjdump
        import nvidia  # namespace package
        for root in getattr(nvidia, "__path__", []):
            cands += sorted(str(p) for p in Path(root).glob("*/bin/cuobjdump"))
    except ImportError:
        pass
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                cands.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    except (ImportError, ValueError):
        pass
    cands.append("/usr/local/cuda/bin/cuobjdump")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _list(cuobjdump: str, flag: str, so: Path) -> List[str]:
    r = subprocess.run([cuobjdump, flag, str(so)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        err = (r.stderr or r.stdout).strip()
        if "does not contain" in err:  # e.g. "does not contain device code"/"...PTX"
            return []
        raise RuntimeError(f"{cuobjdump} {flag} failed: {err}")
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]


def _archs(lines: List[str]) -> List[str]:
    return sorted({m.group(1) for ln in lines for m in [_ARCH.search(ln)] if m},
                  key=lambda a: (int(re.match(r"\d+", a).group()), a))


def build_info(unzipped: Path) -> Dict:
    """build_info() of the unzipped package, imported in a fresh interpreter (so a CUDA
    wheel on a CPU-only torch fails there, not here)."""
    code = "import json, rattention_ext as r; print(json.dumps(r.build_info()))"
    env = dict(os.environ, PYTHONPATH=str(unzipped))
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=unzipped, env=env, capture_output=True,
                           text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "import timed out"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"not importable with {sys.executable}: {tail}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def inspect(wheel: Path, with_build_info: bool = True) -> Dict:
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FileNotFoundError(f"wheel not found: {wheel}")
    if not zipfile.is_zipfile(wheel):
        raise ValueError(f"not a wheel (zip) file: {wheel}")
    out: Dict = {"wheel": str(wheel), "wheel_bytes": wheel.stat().st_size, "modules": []}
    cuobjdump = find_cuobjdump()
    out["cuobjdump"] = cuobjdump
    with tempfile.TemporaryDirectory(prefix="inspect_wheel_") as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        sos = sorted(Path(tmp).rglob("*.so"))
        if not sos:
            out["error"] = "no compiled module (*.so) in the wheel"
        for so in sos:
            m = {"path": str(so.relative_to(tmp)), "bytes": so.stat().st_size}
            sections = elf_section_names(so)
            m["has_cuda_code"] = any(s in (".nv_fatbin", "__nv_relfatbin") for s in sections)
            m["sass_archs"], m["ptx_archs"] = [], []
            if m["has_cuda_code"]:
                if cuobjdump is None:
                    m["error"] = ("the module carries CUDA device code, but no cuobjdump was found: "
                                  "pip install nvidia-cuda-cuobjdump, put the CUDA toolkit's bin/ on "
                                  "PATH, or set CUOBJDUMP=/path/to/cuobjdump")
                else:
                    elf, ptx = _list(cuobjdump, "--list-elf", so), _list(cuobjdump, "--list-ptx", so)
                    m["sass_archs"], m["ptx_archs"] = _archs(elf), _archs(ptx)
                    m["elf_entries"], m["ptx_entries"] = elf, ptx
            out["modules"].append(m)
        if with_build_info and sos:
            out["build_info"] = build_info(Path(tmp))
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n} bytes)"


def format_report(info: Dict) -> str:
    lines = [f"wheel: {info['wheel']}", f"  wheel size: {_mb(info['wheel_bytes'])}"]
    for m in info["modules"]:
        lines.append(f"  module: {m['path']}  size {_mb(m['bytes'])}")
        if not m["has_cuda_code"]:
            lines.append("    CUDA: none (CPU-only module: no .nv_fatbin section, no SASS, no PTX)")
        elif m.get("error"):
            lines.append(f"    CUDA: device code present; {m['error']}")
        else:
            sass = ", ".join(f"sm_{a}" for a in m["sass_archs"]) or "none"
            ptx = ", ".join(f"compute_{a}" for a in m["ptx_archs"]) or "none"
            lines.append(f"    SASS architectures: {sass}  ({len(m['elf_entries'])} cubins)")
            lines.append(f"    PTX architectures:  {ptx}  ({len(m['ptx_entries'])} PTX files)")
    if info.get("error"):
        lines.append(f"  error: {info['error']}")
    if info.get("cuobjdump"):
        lines.append(f"  cuobjdump: {info['cuobjdump']}")
    bi = info.get("build_info")
    if bi is not None:
        lines.append("  build_info: " + (bi["error"] if "error" in bi else json.dumps(bi, sort_keys=True)))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rattention_ext.inspect_wheel",
                                description="List the CUDA architectures, sizes and build info of a wheel.")
    p.add_argument("wheel", nargs="+", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-build-info", action="store_true", help="do not import the wheel's module")
    a = p.parse_args(argv)
    rc = 0
    for w in a.wheel:
        try:
            info = inspect(w, with_build_info=not a.no_build_info)
        except (FileNotFoundError, ValueError) as e:
            print(f"inspect_wheel: {e}", file=sys.stderr)
            rc = 2
            continue
        print(json.dumps(info, indent=1) if a.json else format_report(info))
        if any(m.get("error") for m in info["modules"]) or info.get("error"):
            rc = max(rc, 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
