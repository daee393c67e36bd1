"""Build driver: setuptools hands the one CMake build graph (CMakeLists.txt) the paths it needs.

    pip install --no-build-isolation .          # build against the installed torch
    RATTENTION_CPU_ONLY=1 pip install ...       # skip the CUDA kernels
    RATTENTION_CUDA_ARCHS="80;90a" ...          # choose GPU architectures
    RATTENTION_BUILD_DIR=build/xyz ...          # CMake build tree (kept; incremental)
    RATTENTION_JAX=OFF|ON ...                   # JAX FFI module (default: when jax imports)
    MAX_JOBS=N                                  # parallel compile jobs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Built by the same CMake graph next to _C, loaded with ctypes (no Python extension module).
EXTRA_MODULES = ["_jax_ffi.so"]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("RATTENTION_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DRATTENTION_OUTPUT_DIR={out_dir}",
            f"-DRATTENTION_CPU_ONLY={'ON' if os.environ.get('RATTENTION_CPU_ONLY', '0') == '1' else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('RATTENTION_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("RATTENTION_CUDA_ARCHS"):
            cfg.append(f"-DRATTENTION_CUDA_ARCHS={os.environ['RATTENTION_CUDA_ARCHS']}")
        if os.environ.get("RATTENTION_JAX"):
            cfg.append(f"-DRATTENTION_JAX={os.environ['RATTENTION_JAX']}")
        if os.environ.get("CUTLASS_DIR"):
            cfg.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        subprocess.check_call(cfg)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        self._rattention_out_dir = out_dir

    def copy_extensions_to_source(self):
        # build_ext --inplace copies the declared extension (_C) only; the JAX FFI module
        # (_jax_ffi.so, built when jax is installed) lands next to it and goes along.
        super().copy_extensions_to_source()
        out_dir = getattr(self, "_rattention_out_dir", None)
        for name in EXTRA_MODULES:
            if out_dir is not None and (out_dir / name).exists():
                self.copy_file(str(out_dir / name), str(ROOT / "python" / "rattention_ext" / name))


setup(ext_modules=[CMakeExtension("rattention_ext._C")], cmdclass={"build_ext": CMakeBuild})
