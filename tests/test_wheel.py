"""The wheel a user installs: build a CPU-only wheel from a clean copy of the source tree
(``pip wheel --no-build-isolation --no-deps``, RATTENTION_CPU_ONLY=1, a fresh build tree),
install it into a fresh virtual environment that reuses this interpreter's torch, import
it there, run an op against the reference, and check that inspect_wheel finds no CUDA code.

A clean build on purpose (no reused build directory): it is what `make wheel` does. About
one to three minutes on 2 cores.
"""
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python" / "rattention_ext"))
import inspect_wheel  # noqa: E402  (the module file itself: no compiled package needed)

pytestmark = pytest.mark.slow

_TOOLS = ("setuptools", "wheel", "pybind11", "cmake", "ninja", "torch")


def _missing_tools():
    return [m for m in _TOOLS if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def cpu_wheel(tmp_path_factory):
    missing = _missing_tools()
    if missing:
        pytest.skip(f"building a wheel needs {', '.join(missing)} in {sys.executable}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # A clean copy of the sources: no build trees, venvs, compiled modules or results.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
        "results", "examples"))
    env = dict(os.environ, RATTENTION_CPU_ONLY="1", MAX_JOBS=str(os.cpu_count() or 2))
    env.pop("RATTENTION_BUILD_DIR", None)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                        "--no-cache-dir", "-w", str(tmp / "dist"), str(src)],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list((tmp / "dist").glob("rattention_ext-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_into_fresh_venv_and_runs(cpu_wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip())
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps",
                        "--no-index", str(cpu_wheel)], capture_output=True, text=True, timeout=300,
                       env=clean_env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(vsite.glob("rattention_ext/_C*.so")), r.stdout
    # Then reuse this interpreter's torch/numpy: its site-packages go after the venv's own.
    (vsite / "_parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    script = textwrap.dedent("""
        import json, torch, rattention_ext
        from rattention_ext import reference
        g = torch.Generator().manual_seed(0)
        B, T, H, D = 2, 97, 4, 16
        a = torch.randn(B, T, H, D, generator=g)
        b = torch.randn(B, T, H, D, generator=g)
        ga = torch.rand(H, D, generator=g) + 0.5
        gb = torch.rand(H, D, generator=g) + 0.5
        out = torch.ops.rattention_ext.mix_fwd(a, b, ga, gb, 1e-8, torch.float32)
        ref = reference.rms_mix(a.double(), b.double(), ga.double(), gb.double(), 1e-8)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(json.dumps({"file": rattention_ext.__file__, "err": err,
                          "finite": bool(out.isfinite().all()), "info": rattention_ext.build_info()}))
    """)
    r = subprocess.run([str(vpy), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=clean_env)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(res["file"]).resolve().is_relative_to(venv.resolve()), res["file"]
    assert res["finite"] and res["err"] < 1e-5, res
    assert res["info"]["cuda"] is False and res["info"]["version"] == "0.1.0"


def test_inspect_wheel_reports_no_cuda(cpu_wheel, capsys):
    info = inspect_wheel.inspect(cpu_wheel, with_build_info=False)
    assert info["wheel_bytes"] == cpu_wheel.stat().st_size
    # _C, plus the JAX FFI module when the building interpreter has jax (both CPU-only here).
    mods = info["modules"]
    paths = sorted(m["path"] for m in mods)
    assert paths[0].startswith("rattention_ext/_C") and paths[1:] in (
        [], ["rattention_ext/_jax_ffi.so"]), paths
    for m in mods:
        assert m["bytes"] > 0
        assert m["has_cuda_code"] is False
        assert m["sass_archs"] == [] and m["ptx_archs"] == []
    assert inspect_wheel.main([str(cpu_wheel), "--no-build-info"]) == 0
    assert "CUDA: none" in capsys.readouterr().out


def test_inspect_wheel_bad_input(tmp_path, capsys):
    assert inspect_wheel.main([str(tmp_path / "missing.whl")]) == 2
    bad = tmp_path / "bad.whl"
    bad.write_text("not a zip")
    assert inspect_wheel.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "wheel not found" in err and "not a wheel" in err


def test_elf_sections_of_a_real_shared_object():
    # The interpreter's own shared libraries are ELF; none carries CUDA device code.
    import _ctypes
    names = inspect_wheel.elf_section_names(Path(_ctypes.__file__))
    assert ".text" in names and ".nv_fatbin" not in names
