"""Build `rattention_emu`: the CUDA kernels of csrc/cuda compiled for the host emulator
(tools/emu/emu.h), with the op layer's validation, as a Python module over CPU tensors.

    python tools/emu/build.py            # builds into build/emu/, prints the module path
    from tools.emu.build import load; emu = load()   # build if needed, import

Needs: g++ (C++17), the CUDA toolkit headers (found next to `nvcc`, or CUDA_HOME), CUTLASS
headers (CUTLASS_DIR, third_party/cutlass or the nvidia-cutlass package), torch. No GPU.
Each kernel source compiles as C++ with -DRATTENTION_EMU; the first build takes a few
minutes on 2 cores, later ones reuse the objects (torch.utils.cpp_extension + ninja).
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


def sources() -> list[str]:
    """The kernel .cu files as C++ translation units (one-line wrappers), the runtime, the
    op layer and the bindings."""
    wrap = OUT / "src"
    wrap.mkdir(parents=True, exist_ok=True)
    out = []
    for name in KERNEL_SOURCES:
        w = wrap / (Path(name).stem + "_emu.cpp")
        text = f'#include "cuda/{name}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        out.append(str(w))
    return out + [str(ROOT / "tools" / "emu" / "emu_runtime.cpp"),
                  str(ROOT / "tools" / "emu" / "emu_ops.cpp"),
                  str(ROOT / "tools" / "emu" / "emu_plan_ops.cpp"),
                  str(ROOT / "csrc" / "op_common.cpp")]


def load(verbose: bool = False):
    """Build (if needed) and import the module. Raises EmulatorUnavailable when a
    prerequisite is missing; a compile error in the kernels is a plain failure."""
    from torch.utils.cpp_extension import load as torch_load

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise EmulatorUnavailable("tools/emu: no C++ compiler (c++ / $CXX) on PATH")

    cutlass = cutlass_include()
    subprocess.run([sys.executable, str(ROOT / "tools" / "emu" / "patch_cute.py"), str(cutlass),
                    str(OUT / "include")], check=True, capture_output=not verbose)
    cuda = cuda_include()
    cccl = cuda / "cccl"
    flags = ["-std=c++17", "-O1", "-fpermissive", "-w", "-DRATTENTION_EMU",
             "-include", str(ROOT / "tools" / "emu" / "emu.h"),
             f"-I{OUT / 'include'}", f"-I{ROOT / 'csrc'}", f"-I{cutlass}", f"-I{cuda}"]
    if cccl.is_dir():
        flags.append(f"-I{cccl}")
    (OUT / "torch").mkdir(parents=True, exist_ok=True)
    return torch_load(name="rattention_emu", sources=sources(), extra_cflags=flags,
                      build_directory=str(OUT / "torch"), verbose=verbose)


if __name__ == "__main__":
    mod = load(verbose="-v" in sys.argv)
    print(mod.__file__)
