"""Build `rattention_emu`: the CUDA kernels of csrc/cuda compiled for the host emulator
(tools/emu/emu.h), with the op layer's validation, as a Python module over CPU tensors.

    python tools/emu/build.py            # builds into build/emu/, prints the module path
    from tools.emu.build import load; emu = load()   # build if needed, import

Needs: g++ (C++17), the CUDA toolkit headers (found next to `nvcc`, or CUDA_HOME), CUTLASS
headers (CUTLASS_DIR, third_party/cutlass or the nvidia-cutlass package), torch. No GPU.
Each kernel source compiles as C++ with -DRATTENTION_EMU and -fsanitize=thread
instrumentation whose hooks are the emulator's memory checks (no TSan runtime); the first
build takes a few minutes on 2 cores, later ones reuse the objects (a generated build.ninja).
RATTENTION_EMU_ASAN=1 builds an AddressSanitizer variant into build/emu-asan instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class EmulatorUnavailable(RuntimeError):
    """A prerequisite (CUDA toolkit headers, CUTLASS, a C++ compiler) is missing here."""
OUT = ROOT / "build" / "emu"
KERNEL_SOURCES = ["swa_fwd.cu", "swa_bwd.cu", "rla_fwd.cu", "rla_bwd.cu", "mix.cu", "decode.cu"]


def cuda_include() -> Path:
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        cands.append(real.parent.parent / "include")
        # /usr/local/bin/nvcc may be a wrapper script that execs the real one
        try:
            text = real.read_text(errors="ignore")
            for tok in text.split():
                if tok.endswith("/bin/nvcc") and Path(tok).exists():
                    cands.append(Path(tok).parent.parent / "include")
        except OSError:
            pass
    cands += [Path("/usr/local/cuda/include")] + sorted(Path("/usr/local").glob("cuda-*/include"))
    for c in cands:
        if (c / "cuda_runtime.h").exists() and (c / "cccl" / "cuda" / "std").is_dir():
            return c
        if (c / "cuda_runtime.h").exists() and (c / "cuda" / "std").is_dir():
            return c
    raise EmulatorUnavailable("tools/emu: CUDA toolkit headers not found (set CUDA_HOME)")


def cutlass_include() -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    from cuda_check import find_cutlass
    try:
        return Path(find_cutlass())
    except SystemExit as e:  # find_cutlass exits with a message when there is none
        raise EmulatorUnavailable(f"tools/emu: CUTLASS headers not found ({e})") from None


def kernel_wrappers(out: Path) -> list[Path]:
    """The kernel .cu files as C++ translation units (one-line wrappers)."""
    wrap = out / "src"
    wrap.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in KERNEL_SOURCES:
        w = wrap / (Path(name).stem + "_emu.cpp")
        text = f'#include "cuda/{name}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        paths.append(w)
    return paths


# kernels with deliberate bugs, one per check (compiled like the kernels)
SELFTEST_SOURCES = [ROOT / "tools" / "emu" / "emu_selftest.cpp"]
HOST_SOURCES = [ROOT / "tools" / "emu" / "emu_runtime.cpp", ROOT / "tools" / "emu" / "emu_memory.cpp",
                ROOT / "tools" / "emu" / "emu_ops.cpp", ROOT / "tools" / "emu" / "emu_plan_ops.cpp",
                ROOT / "csrc" / "op_common.cpp"]
# host sources that include the kernels' CuTe traits (the launch plans): CUTLASS's headers name
# device intrinsics in templates, which g++ accepts only with -fpermissive (as for the kernels)
HOST_CUTE_SOURCES = {ROOT / "tools" / "emu" / "emu_plan_ops.cpp"}


def asan() -> bool:
    """RATTENTION_EMU_ASAN=1: the AddressSanitizer build (build/emu-asan). Python must then run
    with LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0."""
    return os.environ.get("RATTENTION_EMU_ASAN", "0") not in ("", "0")


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def ninja_file(out: Path, cutlass: Path, cuda: Path) -> str:
    import sysconfig

    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    common = ["-std=c++17", "-fPIC", "-w", "-DRATTENTION_EMU", f"-I{ROOT / 'csrc'}",
              f"-I{ROOT / 'tools' / 'emu'}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cuda_inc = [f"-I{out / 'include'}", f"-I{cutlass}", f"-I{cuda}"]
    if (cuda / "cccl").is_dir():
        cuda_inc.append(f"-I{cuda / 'cccl'}")
    if asan():
        check = ["-fsanitize=address", "-fno-sanitize-address-use-after-scope",
                 "-fno-omit-frame-pointer"]
        kernel_check = check
    else:
        # every load / store of kernel code calls the emulator's __tsan_* hooks (emu_memory.cpp);
        # no loop may turn into an (uninstrumented) memset / memcpy call
        check = []
        kernel_check = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0",
                        "-fno-tree-loop-distribute-patterns"]
    kernel_flags = common + cuda_inc + ["-O1", "-g1", "-fpermissive", "-include",
                                        str(ROOT / "tools" / "emu" / "emu.h")] + kernel_check
    torch_inc = [f"-isystem {p}" for p in include_paths()] + [
        f"-isystem {sysconfig.get_paths()['include']}"]
    host_flags = common + cuda_inc + torch_inc + [
        "-O2", "-g1", "-DTORCH_EXTENSION_NAME=rattention_emu", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-include", str(ROOT / "tools" / "emu" / "emu.h")] + check
    libs = " ".join(f"-L{p}" for p in library_paths()) + " -lc10 -ltorch_cpu -ltorch -ltorch_python"
    cxx = os.environ.get("CXX", "c++")
    lines = [
        "ninja_required_version = 1.3",
        f"rule kernel\n  command = {cxx} -MMD -MF $out.d {' '.join(kernel_flags)} -c $in -o $out\n"
        "  depfile = $out.d\n  deps = gcc\n  description = emu kernel $in",
        f"rule host\n  command = {cxx} -MMD -MF $out.d {' '.join(host_flags)} $extra -c $in -o $out\n"
        "  depfile = $out.d\n  deps = gcc\n  description = emu host $in",
        f"rule link\n  command = {cxx} -shared {' '.join(check)} $in {libs} -o $out\n"
        "  description = emu link $out",
    ]
    objs = []
    for src in kernel_wrappers(out):
        obj = f"obj/{src.stem}.o"
        lines.append(f"build {obj}: kernel {src}")
        objs.append(obj)
    for src in SELFTEST_SOURCES:
        obj = f"obj/{src.stem}.o"
        lines.append(f"build {obj}: kernel {src}")
        objs.append(obj)
    for src in HOST_SOURCES:
        obj = f"obj/{src.stem}.o"
        lines.append(f"build {obj}: host {src}")
        if src in HOST_CUTE_SOURCES:
            lines.append("  extra = -fpermissive")
        objs.append(obj)
    lines.append(f"build rattention_emu{sysconfig.get_config_var('EXT_SUFFIX')}: link {' '.join(objs)}")
    return "\n".join(lines) + "\n"


def load(verbose: bool = False):
    """Build (if needed) and import the module. Raises EmulatorUnavailable when a
    prerequisite is missing; a compile error in the kernels is a plain failure."""
    import importlib.util
    import sysconfig

    import torch  # noqa: F401  (its libraries must be loaded before the module)

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise EmulatorUnavailable(f"tools/emu: no C++ compiler ({cxx}) on PATH")
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_pkg
            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        except ImportError:
            raise EmulatorUnavailable("tools/emu: ninja not found") from None
    out = OUT.with_name("emu-asan") if asan() else OUT
    out.mkdir(parents=True, exist_ok=True)
    cutlass = cutlass_include()
    subprocess.run([sys.executable, str(ROOT / "tools" / "emu" / "patch_cute.py"), str(cutlass),
                    str(out / "include")], check=True, capture_output=not verbose)
    cuda = cuda_include()
    write_if_changed(out / "build.ninja", ninja_file(out, cutlass, cuda))
    jobs = os.environ.get("MAX_JOBS", str(min(2, os.cpu_count() or 1)))
    r = subprocess.run([ninja, "-C", str(out), "-j", jobs], capture_output=not verbose, text=True)
    if r.returncode != 0:
        raise RuntimeError("tools/emu: build failed\n" + (r.stdout or "")[-20000:] + (r.stderr or ""))
    so = out / f"rattention_emu{sysconfig.get_config_var('EXT_SUFFIX')}"
    spec = importlib.util.spec_from_file_location("rattention_emu", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    mod = load(verbose="-v" in sys.argv)
    print(mod.__file__)
