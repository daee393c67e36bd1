"""The CUDA kernels of csrc/cuda, run on the CPU by the host emulator (tools/emu), against
the float64 reference: every kernel, forward and backward, bf16 and fp16.

The emulator compiles the real kernel and launcher sources as C++ and runs each CTA's
threads as user-level contexts, with mma.sync / ldmatrix replayed by their PTX semantics,
deferred cp.async, and its checks on (racecheck, initcheck, memcheck, synccheck, the launch
model; tools/emu/README.md): any report fails the op with a RuntimeError. Every case runs
under several warp schedules (SCHEDULES; RATTENTION_EMU_SCHEDULES overrides, e.g.
"asc,desc,random:1,random:7") and the results must be bit-identical across them, except
those of float atomics. Accuracy rule as in the GPU tests (SPEC.md): the kernel's error at
most 2x that of the same computation in plain PyTorch in that dtype, plus a small floor.

Skipped when a prerequisite of the emulator is missing here (a C++ compiler, the CUDA
toolkit headers or CUTLASS); a compile error in the kernels fails.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_qkv, rotary_tables
from test_rla_cuda import plain_rla
from test_swa_cuda import _plain as plain_swa

from rattention_ext import reference as ref

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 2e-3


def _schedules():
    spec = os.environ.get("RATTENTION_EMU_SCHEDULES", "asc,desc,random:1")
    out = []
    for item in spec.split(","):
        order, _, seed = item.strip().partition(":")
        out.append((order, int(seed or 0)))
    return out


SCHEDULES = _schedules()


@pytest.fixture(scope="module")
def emu():
    sys.path.insert(0, str(ROOT / "tools" / "emu"))
    import build
    try:
        mod = build.load()
    except build.EmulatorUnavailable as e:  # a compile error is not a skip: it fails
        pytest.skip(f"CUDA emulator not buildable here: {e}")
    mod.set_arch(int(os.environ.get("RATTENTION_EMU_ARCH", "80")))
    return mod


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _flat(e)]
    return []


def under_schedules(emu, fn, atomic=()):
    """fn() (emulated launches on fresh inputs) under every schedule of SCHEDULES; returns the
    first run's result. All tensors of the results must be bit-identical across schedules,
    except those at the flat positions in `atomic` (float atomics: summation order differs),
    which must agree to 1e-5 relative."""
    results = []
    for order, seed in SCHEDULES:
        emu.set_schedule(order, seed)
        try:
            results.append(fn())
        finally:
            emu.set_schedule("asc", 0)
    first = _flat(results[0])
    for (order, seed), res in zip(SCHEDULES[1:], results[1:]):
        for i, (a, b) in enumerate(zip(first, _flat(res))):
            if i in atomic:
                scale = a.double().norm().clamp_min(1e-30)
                assert ((a.double() - b.double()).norm() / scale).item() < 1e-5, (order, seed, i)
            else:
                assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan())
                                             and torch.equal(a.nan_to_num(), b.nan_to_num())), \
                    f"result {i} differs between schedule {SCHEDULES[0]} and {(order, seed)}"
    return results[0]


def rel_err(x, r):
    x, r = x.double(), r.double()
    assert torch.isfinite(x).all(), "non-finite values in kernel output"
    return ((x - r).norm() / r.norm().clamp_min(1e-30)).item()


def check(name, x, r64, plain):
    e, eb = rel_err(x, r64), rel_err(plain, r64)
    assert e <= 2 * eb + FLOOR, f"{name}: kernel err {e:.3e} > 2 x plain {eb:.3e} + {FLOOR}"


def inputs(B, T, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
                 for H in (Hq, Hkv, Hkv))


def grads(out, leaves, go):
    return torch.autograd.grad(out, leaves, go, allow_unused=True)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,rot,dtype,layout", [
    (1, 97, 4, 1, 64, 0, True, torch.bfloat16, "perm"),
    (1, 130, 2, 2, 128, 63, False, torch.bfloat16, "contiguous"),
    (2, 65, 2, 1, 64, 200, True, torch.float16, "contiguous"),
    (1, 1, 2, 1, 64, 3, False, torch.bfloat16, "contiguous"),
])
def test_swa_emulated(emu, B, T, Hq, Hkv, D, w, rot, dtype, layout):
    # "perm": memory [B, H, T, D], rows read in place with their strides
    q, k, v = make_qkv(B, T, Hq, Hkv, D, dtype, seed=T + w, layout=layout)
    scale = 1 / math.sqrt(D)
    cos, sin = rotary_tables(T + 2, D, torch.float32) if rot else (None, None)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(B, T, Hq, D, generator=g)
    gl = torch.randn(B, Hq, T, generator=g)

    def run():
        o, lse = emu.swa_fwd(q, k, v, w, scale, cos, sin)
        return o, lse, emu.swa_bwd(go, gl, q, k, v, o, lse, w, scale, cos, sin)

    o, lse, (dq, dk, dv) = under_schedules(emu, run)

    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    c64 = None if cos is None else cos.double()
    s64 = None if sin is None else sin.double()
    r, rl = ref.sliding_window_attention(*l64, window_size=w, softmax_scale=scale,
                                         return_lse=True, rotary_cos=c64, rotary_sin=s64)
    want = torch.autograd.grad((r * go.double()).sum() + (rl * gl.double()).sum(), l64)
    lp = [x.detach().requires_grad_() for x in (q, k, v)]
    po, pl = plain_swa(*lp, w, scale, cos, sin)
    plain = torch.autograd.grad((po.double() * go.double()).sum() + (pl.double() * gl.double()).sum(), lp)
    check("out", o, r, po)
    check("lse", lse, rl, pl)
    for name, x, rr, pp in zip(("dq", "dk", "dv"), (dq, dk, dv), want, plain):
        assert x.dtype == dtype
        check(name, x, rr, pp)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,every,dtype", [
    (1, 100, 2, 1, 64, 5, "softmax", "broadcast", 1, torch.bfloat16),
    (1, 130, 2, 2, 128, 0, "relu", None, 2, torch.bfloat16),
    (2, 70, 2, 1, 64, 100, "softmax", "batch", 3, torch.float16),
    (1, 200, 4, 1, 64, 63, "softmax", None, 100, torch.bfloat16),
    (1, 1, 2, 1, 64, 0, "softmax", "broadcast", 1, torch.bfloat16),
])
def test_rla_emulated(emu, B, T, Hq, Hkv, D, w, fm, h0, every, dtype):
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=T + D)
    g = torch.Generator().manual_seed(2)
    H0 = None
    if h0 is not None:
        H0 = 0.1 * torch.randn(B if h0 == "batch" else 1, Hq, 2 * D, D, generator=g)
    go = torch.randn(B, T, Hq, D, generator=g)

    gfs = torch.randn(B, Hkv, 2 * D, D, generator=g)

    def run():
        o, fs, ck = emu.rla_fwd(q, k, v, w, fm, H0, every)
        return o, fs, ck, emu.rla_bwd(go, gfs, q, k, v, H0, ck, w, fm, every)

    # dq accumulates across CTAs with float atomics (flat position 3)
    o, fs, ck, (dq, dk, dv, dh0) = under_schedules(emu, run, atomic=(3,))

    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    h64 = None if H0 is None else H0.double().requires_grad_()
    r, rs = ref.residual_linear_attention(*l64, window_size=w, feature_map=fm,
                                          initial_state=h64, return_final_state=True)
    leaves = l64 + ([h64] if h64 is not None else [])
    want = torch.autograd.grad((r * go.double()).sum() + (rs * gfs.double()).sum(), leaves,
                               allow_unused=True)
    want = [torch.zeros_like(l) if x is None else x for x, l in zip(want, leaves)]
    lp = [x.detach().requires_grad_() for x in (q, k, v)]
    po, ps = plain_rla(*lp, w, fm, H0)
    plain = torch.autograd.grad((po.double() * go.double()).sum() + (ps.double() * gfs.double()).sum(),
                                lp, allow_unused=True)
    plain = [torch.zeros_like(l) if x is None else x for x, l in zip(plain, lp)]
    check("out", o, r, po)
    if T > w + 1:
        check("final_state", fs, rs, ps)
    else:
        assert torch.equal(fs, torch.zeros_like(fs))
    for name, x, rr, pp in zip(("dq", "dk", "dv"), (dq, dk, dv), want, plain):
        if rr.norm() == 0:  # no key ever leaves the window: exact zeros
            assert torch.equal(x.float(), torch.zeros_like(x.float())), name
        else:
            check(name, x, rr, pp)
    if H0 is not None:
        assert dh0.shape == H0.shape
        # phi(q)^T dO with both rounded to the input dtype for the MMA, fp32 accumulation
        assert rel_err(dh0, want[3]) < 1e-2


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fused_mix_and_mix_bwd_emulated(emu, out_dtype):
    B, T, Hq, Hkv, D, w = 2, 77, 4, 2, 64, 9
    q, k, v = inputs(B, T, Hq, Hkv, D, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(3)
    ga = 1 + 0.5 * torch.randn(Hq, D, generator=g)
    gb = 1 + 0.5 * torch.randn(Hq, D, generator=g)
    o_rla = under_schedules(emu, lambda: emu.rla_fwd(q, k, v, w, "softmax", None, 2))[0]
    o_swa, lse = under_schedules(emu, lambda: emu.swa_fwd(q, k, v, w, 0.125, None, None))
    want = ref.rms_mix(o_swa.double(), o_rla.double(), ga.double(), gb.double(), 1e-8)
    for save in (True, False):
        out, o2, l2 = under_schedules(emu, lambda: emu.swa_mix_fwd(
            q, k, v, w, 0.125, None, None, o_rla, ga, gb, 1e-8, out_dtype, save))
        assert out.dtype == out_dtype
        # float32 math on the same branch outputs: only the output rounding differs
        assert rel_err(out, want) < (5e-3 if out_dtype == torch.bfloat16 else 1e-5)
        if save:
            assert torch.equal(o2, o_swa) and torch.equal(l2, lse)
        else:
            assert o2.numel() == 0 and l2.numel() == 0

    gout = torch.randn(B, T, Hq, D, generator=g).to(out_dtype)
    da, db, dga, dgb = under_schedules(emu, lambda: emu.mix_bwd(gout, o_swa, o_rla, ga, gb, 1e-8))
    l64 = [x.double().requires_grad_() for x in (o_swa, o_rla, ga, gb)]
    r = ref.rms_mix(*l64, 1e-8)
    want = torch.autograd.grad((r * gout.double()).sum(), l64)
    for name, x, rr in zip(("d_swa", "d_rla", "d_gswa", "d_grla"), (da, db, dga, dgb), want):
        assert rel_err(x, rr) < 1e-5, name


@pytest.mark.parametrize("fm,rot,D,w", [("softmax", True, 64, 5), ("relu", False, 128, 0)])
def test_decode_emulated_matches_forward(emu, fm, rot, D, w):
    from rattention_ext.decode import RAttentionCache

    B, T, Hq, Hkv = 2, 24, 4, 2
    dtype = torch.bfloat16
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=11)
    g = torch.Generator().manual_seed(4)
    H0 = 0.1 * torch.randn(1, Hq, 2 * D, D, generator=g)
    ga = 1 + 0.5 * torch.randn(Hq, D, generator=g)
    gb = 1 + 0.5 * torch.randn(Hq, D, generator=g)
    cos, sin = rotary_tables(T, D, torch.float32) if rot else (None, None)
    scale = 1 / math.sqrt(D)

    def run():
        cache = RAttentionCache.empty(B, w, Hkv, D, dtype=dtype)
        rows = []
        for t in range(T):
            rows.append(emu.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache.keys,
                                        cache.values, cache.state, cache.positions, fm, scale,
                                        H0, cos, sin, ga, gb, 1e-8))
        return torch.cat(rows, dim=1), cache.state, cache

    got, _, cache = under_schedules(emu, run)
    assert cache.positions.tolist() == [T] * B
    kw = dict(window_size=w, feature_map=fm, softmax_scale=scale, initial_state=H0.double(),
              swa_norm_weight=ga.double(), rla_norm_weight=gb.double())
    if rot:
        kw.update(rotary_cos=cos.double(), rotary_sin=sin.double())
    want = ref.forward(q.double(), k.double(), v.double(), **kw)
    assert got.dtype == dtype
    assert rel_err(got, want) < 2e-2  # bf16 inputs, cache and output; fp32 math inside
    _, state = ref.residual_linear_attention(q.double(), k.double(), v.double(), window_size=w,
                                             feature_map=fm, return_final_state=True)
    assert rel_err(cache.state, state) < 1e-2


# The emulator's own checks, on tools/emu/emu_selftest.cpp: small kernels with one deliberate
# bug each (same order as its Bug enum) and the check that must report it.
SELFTEST = [
    ("clean", None), ("no_sync", "racecheck"), ("write_after_read", "racecheck"),
    ("uninit", "initcheck"), ("smem_oob", "memcheck"), ("global_oob", "memcheck"),
    ("write_input", "memcheck"), ("no_wait", "initcheck"), ("short_wait", "initcheck"),
    ("own_read", "initcheck"), ("wait_no_sync", "racecheck"), ("partial_barrier", "synccheck"),
    ("split_barrier", "synccheck"), ("shuffle_exited", "synccheck"),
    ("static_persist", "initcheck"), ("launch_bounds", "launch"), ("no_optin", "launch"),
    ("arch_limit", "launch"),
]
# bugs whose wrong values (poison) also show in the output under at least one schedule
VISIBLE = {"no_sync", "uninit", "no_wait", "short_wait", "wait_no_sync", "static_persist"}


@pytest.mark.parametrize("index,bug,check", [(i, b, c) for i, (b, c) in enumerate(SELFTEST)])
def test_emulator_checks_report_their_bug(emu, index, bug, check):
    wrong_values = False
    for order, seed in SCHEDULES:
        emu.set_schedule(order, seed)
        try:
            reports, out, want = emu._selftest(index)
        finally:
            emu.set_schedule("asc", 0)
        if check is None:
            assert reports == [] and out == want, (order, reports)
        else:
            assert any(r.startswith(f"emu {check}:") for r in reports), (order, seed, reports)
            wrong_values |= out != want
    if bug in VISIBLE:
        assert wrong_values, f"{bug}: no schedule showed wrong values"


def test_emulated_arch_limit_fails_like_the_gpu(emu):
    # RLA at D = 128 needs more opt-in shared memory than sm_86 / sm_89 have (99 KiB)
    q, k, v = inputs(1, 16, 2, 1, 128, torch.bfloat16, seed=1)
    emu.set_arch(86)
    try:
        with pytest.raises(RuntimeError, match="opt-in limit"):
            emu.rla_fwd(q, k, v, 0, "softmax", None, 1)
    finally:
        emu.set_arch(int(os.environ.get("RATTENTION_EMU_ARCH", "80")))
    emu.rla_fwd(q, k, v, 0, "softmax", None, 1)  # fits on sm_80
