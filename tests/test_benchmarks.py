"""The benchmark driver's own correctness: the plain-PyTorch composition it times against
must compute SPEC.md's function, the FLOP count must count the window, and the CPU driver
must run end to end (tiny sizes) and write its JSON/markdown."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import backends, flops  # noqa: E402
import rattention_ext  # noqa: E402
from rattention_ext import reference  # noqa: E402


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _qkv(B, T, Hq, Hkv, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g, dtype=dtype) for h in (Hq, Hkv, Hkv)]


@pytest.mark.parametrize("T,w,Hq,Hkv", [(1, 0, 2, 2), (97, 5, 8, 1), (97, 200, 4, 2), (1025, 64, 8, 1)])
@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_plain_torch_forward_matches_reference(T, w, Hq, Hkv, fm):
    q, k, v = _qkv(2, T, Hq, Hkv, 16)
    g = torch.Generator().manual_seed(1)
    ga = torch.rand(Hq, 16, generator=g, dtype=torch.float64) + 0.5
    gb = torch.rand(Hq, 16, generator=g, dtype=torch.float64) + 0.5
    out = backends.torch_forward(q, k, v, w, fm, ga, gb, chunk=16)
    ref = reference.forward(q, k, v, window_size=w, feature_map=fm, swa_norm_weight=ga,
                            rla_norm_weight=gb)
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-10
    o_rla = backends.torch_rla(q, k, v, w, fm, chunk=16)
    r_rla = reference.residual_linear_attention(q, k, v, window_size=w, feature_map=fm)
    if T > w + 1:
        assert _rel(o_rla, r_rla) < 1e-10
    else:  # nothing outside the window: exactly zero
        assert o_rla.abs().max().item() == 0.0 and r_rla.abs().max().item() == 0.0


def test_plain_torch_decode_matches_forward():
    B, T, Hq, Hkv, D, w = 2, 23, 4, 2, 8, 5
    q, k, v = _qkv(B, T, Hq, Hkv, D)
    kc = torch.zeros(B, w + 1, Hkv, D, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    st = torch.zeros(B, Hkv, 2 * D, D, dtype=torch.float64)
    pos = torch.zeros(B, dtype=torch.long)
    ones = torch.ones(Hq, D, dtype=torch.float64)
    outs = [backends.torch_decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kc, vc, st, pos,
                                       "softmax", 1 / math.sqrt(D), ones, ones) for t in range(T)]
    ref = reference.forward(q, k, v, window_size=w)
    assert _rel(torch.cat(outs, dim=1), ref) < 1e-10


def test_window_flop_count():
    for T, w in [(1, 0), (5, 0), (97, 5), (100, 200), (1025, 512)]:
        brute = sum(min(t, w) + 1 for t in range(T))
        assert flops.window_keys(T, w) == brute
    assert flops.swa_bwd_flops(1, 97, 2, 16, 5) == 2.5 * flops.swa_fwd_flops(1, 97, 2, 16, 5)
    # window >= T counts the causal triangle, never T^2
    assert flops.window_keys(64, 1000) == 64 * 65 // 2


def test_cpu_driver_end_to_end(tmp_path):
    # The benchmarks package from the checkout; rattention_ext as the test session imports it
    # (installed, or the source tree when PYTHONPATH says so).
    pkg_parent = str(Path(rattention_ext.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), pkg_parent]))
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu-quick", "--smoke",
                        "--out", str(tmp_path), "--no-plot"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    js = list(tmp_path.glob("cpu_*.json"))
    assert len(js) == 1
    data = json.loads(js[0].read_text())
    rows = [x for x in data["results"] if x["backend"] == "torch" and x["status"] == "ok"]
    assert rows and all(x["median_s"] > 0 and x["gflops"] > 0 for x in rows)
    ours = [x for x in data["results"] if x["backend"] == "ours"]
    assert ours and all(x["status"] == "ok" for x in ours), ours
    assert data["ceilings"]["matmul"]["flops_per_s"] > 0
    assert (tmp_path / "latest_cpu.md").read_text().count("|") > 10


def test_gpu_check_goal_benchmark_runs_on_cpu():
    """tools/gpu_check.py's issue-goal rows run end to end at small sizes on CPU, so a GPU
    session's few minutes are not lost to a typo. Each timing is one real call."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    calls = []

    def once(fn):
        fn()
        calls.append(1)
        return 1.0

    def fwd_bwd(f, args, grad):
        leaves = [x.detach().float().requires_grad_() for x in args]
        return lambda: torch.autograd.grad(f(*leaves), leaves, grad.float())

    rows = gpu_check.bench_rla_goals(once, fwd_bwd, device="cpu", small=True)
    assert len(calls) >= 3  # rattention, swa, rla (+ fla where it is installed and runs)
    assert [r["goal"] for r in rows] == ["ratio <= 1.0", "peer_ms / ours_ms >= 2", "ratio >= 3"]
    assert rows[0]["ratio"] == 1.0
    # 512 tokens / 64 per chunk = 8 chunks, a checkpoint every 4: 4x less state memory.
    assert rows[2]["ratio"] == 4.0 and rows[2]["peer_ms"] == 4 * rows[2]["ours_ms"]


def test_packed_cpu_benchmark_runs_tiny(tmp_path):
    """benchmarks/packed_cpu.py end to end at tiny sizes: the mix pads by ~2x, the three
    variants agree (the driver checks their gradients before timing), JSON + markdown written."""
    pkg_parent = str(Path(rattention_ext.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), pkg_parent]))
    r = subprocess.run([sys.executable, "-m", "benchmarks.packed_cpu", "--tiny", "--out",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(next(tmp_path.glob("packed_cpu_*.json")).read_text())
    mix = data["config"]["mix"]
    assert sum(mix["lengths"]) == data["config"]["total"]
    assert abs(mix["padding_factor"] - 2.0) <= 0.1
    for v in ("packed", "padded", "loop"):
        assert data["results"][v]["median_s"] > 0 and data["results"][v]["peak_mb"] >= 0
    assert data["ratios"]["padded_time_over_packed"] > 0
    assert data["meta"]["commit"] and data["meta"]["cpu"]
    assert "padding factor" in (tmp_path / "latest_packed_cpu.md").read_text()


def _tool_env():
    pkg_parent = str(Path(rattention_ext.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=pkg_parent)


def test_gpu_sanitize_cases_run_on_cpu():
    """tools/gpu_sanitize_cases.py (what compute-sanitizer runs on a GPU machine) computes the
    right answers on the CPU backend: every case checks itself against the float64 reference."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_sanitize_cases.py"), "--device",
                        "cpu"], env=_tool_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    oks = [line for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) == 12, r.stdout  # 5 cases x 2 head dims, the relu case with two sequences
    assert "0 failed" in r.stdout


def test_gpu_profile_cases_run_on_cpu():
    """tools/gpu_profile_cases.py's S1 and D1 steps run (unprofiled) on the CPU backend."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_profile_cases.py"), "--device",
                        "cpu", "--only", "S1", "--only", "D1"], env=_tool_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "S1 ran" in r.stdout and "D1 ran" in r.stdout


def test_gpu_session_script_reports_phases(tmp_path):
    """tools/gpu_session.sh without a GPU: the build is tried once and fails, the GPU phases are
    skipped, an unknown phase is named, and what comes back is the summary and one log archive."""
    env = dict(_tool_env(), OUT=str(tmp_path), PYTHON=sys.executable, RATTENTION_COMMIT="abc123",
               RATTENTION_DEADLINE_S="120")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), "sanitize", "ncu", "bogus"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "commit abc123" in summary
    # the build is tried once (gpu_check.py finds no GPU), then every GPU phase is skipped
    assert summary.count("build: rc 2") == 1
    assert summary.count("no extension with CUDA kernels after the build") == 1
    assert "sanitize_" not in summary and "ncu:" not in summary
    assert "unknown phase 'bogus'" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.txt"]
