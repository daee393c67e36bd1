"""The CUDA kernels of csrc/cuda, run on the CPU by the host emulator (tools/emu), against
the float64 reference: every kernel instantiation, forward and backward, bf16 and fp16,
D = 64 and 128.

The emulator compiles the real kernel and launcher sources as C++ and runs each CTA's
threads as user-level contexts, with mma.sync / ldmatrix replayed by their PTX semantics,
deferred cp.async, and its checks on (racecheck, initcheck, memcheck, synccheck, the launch
model; tools/emu/README.md): any report fails the op with a RuntimeError. Every case runs
under several warp schedules (SCHEDULES; RATTENTION_EMU_SCHEDULES overrides, e.g.
"asc,desc,random:1,random:7") and the results must be bit-identical across them, except
those of float atomics. Accuracy rule as in the GPU tests (SPEC.md): the kernel's error at
most 2x that of the same computation in plain PyTorch in that dtype, plus a small floor.

Coverage: the kernels mark their code paths (RATT_COVER in csrc/cuda); the last test fails
when a compiled instantiation or a marked path never ran in this file, and writes the
(kernel, path) table to build/emu/coverage.json. The cases are chosen for that, at the
smallest sizes that reach each path (tile 64: T = 128 with w >= 127 has an unmasked
interior tile pair; RLA chunk 64: T = 100, w = 5 has chunks with keys and a carried state).

Cases marked `mutants` are the small subset `make emu-mutants` runs per kernel
(tools/emu/mutants.py); `emu_kernel(...)` names the kernel sources a test exercises.

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
from helpers import (emu_arch, emu_kernel, load_emulator, make_qkv, plain_rla, plain_swa,
                     rotary_tables)

from rattention_ext import reference as ref

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 2e-3
BF16, FP16 = torch.bfloat16, torch.float16
mutants = pytest.mark.mutants


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
    mod = load_emulator()
    mod.coverage_reset()
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


def mix_weights(Hq, D, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(1 + 0.5 * torch.randn(Hq, D, generator=g) for _ in range(2))


def rla_like(B, T, Hq, D, seed):
    """A float32 stand-in for the RLA output (the mixing only needs its values): random
    rows, the first one all zero (o_rla before the window without H0)."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(B, T, Hq, D, generator=g)
    o[:, 0] = 0
    return o


# ---- SWA forward (plain and fused mixing) and backward ------------------------------------
# The forward's query tiles are 128 rows (SwaFwdTraits), the backward's 64. T = 2 forward
# query tiles, w = T - 1: the last query tile sees key tile 0 whole (the
# unmasked interior pair), the diagonal pairs are masked; rotary and the fused mixing (out in
# the input dtype) on. The others: ragged T (every pair masked; at D = 64 a ragged second
# forward tile), w = 0, w >= T, T = 1, no rotary, no grad_lse.
SWA_CASES = [
    # B, T, Hq, Hkv, D, w, rot, mix, grad_lse, dtype, layout
    pytest.param(1, 256, 2, 1, 64, 255, True, True, True, BF16, "perm", marks=mutants),
    pytest.param(1, 256, 2, 1, 128, 255, True, True, True, BF16, "contiguous"),
    pytest.param(1, 256, 2, 1, 64, 255, True, True, True, FP16, "contiguous"),
    pytest.param(1, 256, 2, 1, 128, 255, True, True, True, FP16, "perm"),
    pytest.param(1, 197, 4, 1, 64, 0, False, False, True, BF16, "perm"),
    pytest.param(1, 70, 2, 2, 128, 63, False, False, True, BF16, "contiguous"),
    pytest.param(2, 65, 2, 1, 64, 200, False, False, False, FP16, "contiguous"),
    pytest.param(1, 1, 2, 1, 128, 3, False, False, True, FP16, "contiguous"),
]


@emu_kernel("swa_fwd_kernel.cuh", "swa_mix_epilogue.cuh", "swa_bwd_kernel.cuh")
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,rot,mix,grad_lse,dtype,layout", SWA_CASES)
def test_swa_emulated(emu, B, T, Hq, Hkv, D, w, rot, mix, grad_lse, dtype, layout):
    # "perm": memory [B, H, T, D], rows read in place with their strides
    q, k, v = make_qkv(B, T, Hq, Hkv, D, dtype, seed=T + w + D, layout=layout)
    scale = 1 / math.sqrt(D)
    cos, sin = rotary_tables(T + 2, D, torch.float32) if rot else (None, None)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(B, T, Hq, D, generator=g)
    gl = torch.randn(B, Hq, T, generator=g) if grad_lse else None

    ga, gb = mix_weights(Hq, D, seed=T)
    o_rla = rla_like(B, T, Hq, D, seed=T)

    def run():
        if mix:
            mixed, o, lse = emu.swa_mix_fwd(q, k, v, w, scale, cos, sin, o_rla, ga, gb, 1e-8,
                                            dtype, True)
        else:
            mixed, (o, lse) = None, emu.swa_fwd(q, k, v, w, scale, cos, sin)
        return mixed, o, lse, emu.swa_bwd(go, gl, q, k, v, o, lse, w, scale, cos, sin)

    mixed, o, lse, (dq, dk, dv) = under_schedules(emu, run)
    if mix:
        assert mixed.dtype == dtype
        want = ref.rms_mix(o.double(), o_rla.double(), ga.double(), gb.double(), 1e-8)
        # float32 math on the branch outputs in registers: only the output rounding differs
        assert rel_err(mixed, want) < 5e-3

    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    c64 = None if cos is None else cos.double()
    s64 = None if sin is None else sin.double()
    r, rl = ref.sliding_window_attention(*l64, window_size=w, softmax_scale=scale,
                                         return_lse=True, rotary_cos=c64, rotary_sin=s64)
    loss = (r * go.double()).sum() + ((rl * gl.double()).sum() if grad_lse else 0)
    want = torch.autograd.grad(loss, l64)
    lp = [x.detach().requires_grad_() for x in (q, k, v)]
    po, pl = plain_swa(*lp, w, scale, cos, sin)
    ploss = (po.double() * go.double()).sum() + ((pl.double() * gl.double()).sum() if grad_lse else 0)
    plain = torch.autograd.grad(ploss, lp)
    check("out", o, r, po)
    check("lse", lse, rl, pl)
    for name, x, rr, pp in zip(("dq", "dk", "dv"), (dq, dk, dv), want, plain):
        assert x.dtype == dtype
        check(name, x, rr, pp)


@emu_kernel("swa_fwd_kernel.cuh", "swa_bwd_kernel.cuh")
@pytest.mark.parametrize("D", [64, 128])
def test_rotary_tables_off_16_byte_alignment_emulated(emu, D):
    """Rotary tables at a one-float offset (a view into a larger buffer: contiguous, so the op
    passes the pointer on as it is) cannot take the 16-byte vector loads of the rotation; the
    kernels take the scalar loop, with the same results as the vectorised one."""
    B, T, Hq, Hkv, w = 1, 70, 2, 1, 20
    q, k, v = inputs(B, T, Hq, Hkv, D, BF16, seed=11)
    cos, sin = rotary_tables(T, D, torch.float32)

    def off_alignment(t):
        buf = torch.empty(t.numel() + 1)
        view = buf[1:].view_as(t)
        view.copy_(t)
        return view

    cos_u, sin_u = off_alignment(cos), off_alignment(sin)
    assert cos_u.data_ptr() % 16 != 0 and sin_u.data_ptr() % 16 != 0
    scale = D ** -0.5
    go = torch.randn(B, T, Hq, D, generator=torch.Generator().manual_seed(2))
    o, lse = emu.swa_fwd(q, k, v, w, scale, cos, sin)
    o_u, lse_u = under_schedules(emu, lambda: emu.swa_fwd(q, k, v, w, scale, cos_u, sin_u))
    assert torch.equal(o, o_u) and torch.equal(lse, lse_u)
    grads = emu.swa_bwd(go, None, q, k, v, o, lse, w, scale, cos, sin)
    grads_u = emu.swa_bwd(go, None, q, k, v, o, lse, w, scale, cos_u, sin_u)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_u):
        assert torch.equal(a, b), name


# ---- mixing: fused epilogue into float32 (out not saved), standalone mix_fwd / mix_bwd -----
@emu_kernel("swa_fwd_kernel.cuh", "swa_mix_epilogue.cuh")
@pytest.mark.parametrize("D,dtype", [(64, BF16), (128, FP16)])
def test_fused_mix_float32_out_emulated(emu, D, dtype):
    B, T, Hq, Hkv, w = 1, 64, 1, 1, 9
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=5)
    scale = 1 / math.sqrt(D)
    ga, gb = mix_weights(Hq, D, seed=3)
    o_rla = rla_like(B, T, Hq, D, seed=4)
    o_swa, _ = under_schedules(emu, lambda: emu.swa_fwd(q, k, v, w, scale, None, None))
    out, o2, l2 = under_schedules(emu, lambda: emu.swa_mix_fwd(
        q, k, v, w, scale, None, None, o_rla, ga, gb, 1e-8, torch.float32, False))
    assert out.dtype == torch.float32 and o2.numel() == 0 and l2.numel() == 0
    want = ref.rms_mix(o_swa.double(), o_rla.double(), ga.double(), gb.double(), 1e-8)
    assert rel_err(out, want) < 1e-5  # same float32 math on the same branch outputs


@emu_kernel("mix.cu")
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float32), pytest.param(BF16, marks=mutants), pytest.param(FP16)])
def test_mix_fwd_bwd_emulated(emu, dtype):
    # 130 rows per head: mix_bwd splits them over CTAs (64 rows each), reduced in order
    B, T, Hq, D = 2, 65, 2, 96
    ga, gb = mix_weights(Hq, D, seed=6)
    o_swa = torch.randn(B, T, Hq, D, generator=torch.Generator().manual_seed(7))
    o_rla = rla_like(B, T, Hq, D, seed=8)
    out = under_schedules(emu, lambda: emu.mix_fwd(o_swa, o_rla, ga, gb, 1e-8, dtype))
    assert out.dtype == dtype
    l64 = [x.double().requires_grad_() for x in (o_swa, o_rla, ga, gb)]
    r = ref.rms_mix(*l64, 1e-8)
    tol = {torch.float32: 1e-6, BF16: 5e-3, FP16: 1e-3}[dtype]  # output rounding only
    assert rel_err(out, r) < tol

    gout = torch.randn(B, T, Hq, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    da, db, dga, dgb = under_schedules(emu, lambda: emu.mix_bwd(gout, o_swa, o_rla, ga, gb, 1e-8))
    want = torch.autograd.grad((r * gout.double()).sum(), l64)
    for name, x, rr in zip(("d_swa", "d_rla", "d_gswa", "d_grla"), (da, db, dga, dgb), want):
        assert rel_err(x, rr) < 1e-5, name


# ---- packed batches (cu_seqlens) -----------------------------------------------------------
# Document mixes with an empty document, length 1, exactly w and w + 1 rows, and one longer
# than a tile (64): every document must come out as if it were alone. The packed kernels
# run over the documents' tile slots (QkvParams::tile_slot0), so these mixes also have idle
# slots (empty documents, short ones) and documents whose tiles straddle a tile boundary of
# the packed rows.
def packed_inputs(lens, Hq, Hkv, D, dtype, seed):
    """Fresh packed q [total, Hq, D], k, v [total, Hkv, D] and int32 cu_seqlens [N + 1]."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q, k, v = (torch.randn(total, H, D, generator=g, dtype=torch.float64).to(dtype)
               for H in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    return q, k, v, cu


def documents(cu):
    """Row slices of the non-empty documents, in order."""
    c = cu.tolist()
    return [slice(a, b) for a, b in zip(c[:-1], c[1:]) if b > a]


def swa_by_document(fn, q, k, v, cu):
    """fn(q_doc, k_doc, v_doc) -> (o [1, L, Hq, D], lse [1, Hq, L]) per document, packed back
    into o [total, Hq, D] and lse [Hq, total]."""
    outs, lses = [], []
    for sl in documents(cu):
        o, lse = fn(q[sl][None], k[sl][None], v[sl][None])
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


PACKED_SWA_CASES = [
    # lens, Hq, Hkv, D, w, rot, mix, dtype
    pytest.param([3, 0, 1, 5, 6, 70], 8, 1, 64, 5, True, True, BF16),
    pytest.param([70, 1, 0, 9, 10], 2, 2, 128, 9, False, False, FP16),
    pytest.param([0, 6, 65, 1, 5], 2, 2, 64, 5, False, True, FP16),
    pytest.param([1, 12, 0, 66, 11], 2, 1, 128, 11, True, False, BF16),
]


@emu_kernel("swa_fwd_kernel.cuh", "swa_mix_epilogue.cuh", "swa_bwd_kernel.cuh")
@pytest.mark.parametrize("lens,Hq,Hkv,D,w,rot,mix,dtype", PACKED_SWA_CASES)
def test_swa_packed_emulated(emu, lens, Hq, Hkv, D, w, rot, mix, dtype):
    q, k, v, cu = packed_inputs(lens, Hq, Hkv, D, dtype, seed=sum(lens) + D)
    total, scale = q.shape[0], 1 / math.sqrt(D)
    cos, sin = rotary_tables(max(lens) + 1, D, torch.float32) if rot else (None, None)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(total, Hq, D, generator=g)
    gl = torch.randn(Hq, total, generator=g)
    ga, gb = mix_weights(Hq, D, seed=total)
    o_rla = torch.randn(total, Hq, D, generator=g)

    def run():
        if mix:
            mixed, o, lse = emu.swa_mix_fwd(q, k, v, w, scale, cos, sin, o_rla, ga, gb, 1e-8,
                                            dtype, True, cu_seqlens=cu)
        else:
            mixed, (o, lse) = None, emu.swa_fwd(q, k, v, w, scale, cos, sin, cu_seqlens=cu)
        return mixed, o, lse, emu.swa_bwd(go, gl, q, k, v, o, lse, w, scale, cos, sin,
                                          cu_seqlens=cu)

    mixed, o, lse, (dq, dk, dv) = under_schedules(emu, run)
    assert o.shape == (total, Hq, D) and lse.shape == (Hq, total)
    if mix:
        want = ref.rms_mix(o.double(), o_rla.double(), ga.double(), gb.double(), 1e-8)
        assert mixed.dtype == dtype and rel_err(mixed, want) < 5e-3  # output rounding only

    c64 = None if cos is None else cos.double()
    s64 = None if sin is None else sin.double()
    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    r, rl = swa_by_document(lambda a, b, c: ref.sliding_window_attention(
        a, b, c, window_size=w, softmax_scale=scale, return_lse=True, rotary_cos=c64,
        rotary_sin=s64), *l64, cu)
    want = torch.autograd.grad((r * go.double()).sum() + (rl * gl.double()).sum(), l64)
    lp = [x.detach().requires_grad_() for x in (q, k, v)]
    po, pl = swa_by_document(lambda a, b, c: plain_swa(a, b, c, w, scale, cos, sin), *lp, cu)
    plain = torch.autograd.grad((po.double() * go.double()).sum()
                                + (pl.double() * gl.double()).sum(), lp)
    check("out", o, r, po)
    check("lse", lse, rl, pl)
    for name, x, rr, pp in zip(("dq", "dk", "dv"), (dq, dk, dv), want, plain):
        assert x.dtype == dtype and x.shape == rr.shape
        check(name, x, rr, pp)


@emu_kernel("mix.cu")
def test_mix_packed_rows_emulated(emu):
    """mix_fwd / mix_bwd on packed [total, Hq, D] branch outputs (rows are rows)."""
    total, Hq, D = 77, 2, 64
    ga, gb = mix_weights(Hq, D, seed=21)
    g = torch.Generator().manual_seed(22)
    o_swa, o_rla = torch.randn(total, Hq, D, generator=g), torch.randn(total, Hq, D, generator=g)
    out = under_schedules(emu, lambda: emu.mix_fwd(o_swa, o_rla, ga, gb, 1e-8, BF16))
    l64 = [x.double().requires_grad_() for x in (o_swa, o_rla, ga, gb)]
    r = ref.rms_mix(*l64, 1e-8)
    assert out.shape == (total, Hq, D) and rel_err(out, r) < 5e-3
    gout = torch.randn(total, Hq, D, generator=g).to(BF16)
    grads = under_schedules(emu, lambda: emu.mix_bwd(gout, o_swa, o_rla, ga, gb, 1e-8))
    want = torch.autograd.grad((r * gout.double()).sum(), l64)
    for name, x, rr in zip(("d_swa", "d_rla", "d_gswa", "d_grla"), grads, want):
        assert rel_err(x, rr) < 1e-5, name


# ---- RLA forward and backward --------------------------------------------------------------
# Per (dtype, D) three cases:
#   "state": T = 100, w = 5, G = 2, H0, every = 2: chunks with keys, the carried state, the
#            in-segment state update, every query head of the group, dH0; at D = 128 the
#            second value slice owns the second dk slot;
#   "edge":  T = 65, w = 63, G = 1, H0 per batch, every = 1: a chunk without keys whose
#            queries still matter (H0), a chunk with keys, two segments (checkpoints), the
#            shared dk slot of G = 1;
#   "one":   T = 1, no H0, no final-state gradient: every chunk skipped.
# The feature map alternates so that each instantiation runs relu and softmax, relu with
# GQA and H0 included.
RLA_CASES = [
    # B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype
    pytest.param(1, 100, 2, 1, 64, 5, "relu", "broadcast", 2, True, BF16, marks=mutants),
    pytest.param(1, 65, 1, 1, 64, 63, "softmax", "batch", 1, True, BF16),
    pytest.param(1, 1, 2, 1, 64, 0, "softmax", None, 1, False, BF16),
    pytest.param(1, 100, 2, 1, 128, 5, "softmax", "batch", 2, True, BF16),
    pytest.param(1, 65, 1, 1, 128, 63, "relu", "batch", 1, True, BF16),
    pytest.param(1, 1, 2, 1, 128, 0, "relu", None, 1, False, BF16),
    pytest.param(1, 100, 2, 1, 64, 5, "softmax", "batch", 2, True, FP16),
    pytest.param(1, 65, 1, 1, 64, 63, "relu", "broadcast", 1, True, FP16),
    pytest.param(1, 1, 2, 1, 64, 0, "softmax", None, 1, False, FP16),
    pytest.param(1, 100, 2, 1, 128, 5, "relu", "broadcast", 2, True, FP16),
    pytest.param(1, 65, 1, 1, 128, 63, "softmax", "batch", 1, True, FP16),
    pytest.param(1, 1, 2, 1, 128, 0, "softmax", None, 1, False, FP16),
]


RLA_SOURCES = ("rla_fwd_kernel.cuh", "rla_bwd_kernel.cuh", "rla_bwd_state_kernel.cuh",
               "rla_traits.cuh")


@emu_kernel(*RLA_SOURCES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,every,grad_final,dtype", RLA_CASES)
def test_rla_emulated(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype):
    check_rla(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype)


# The dk/dv pass in segments planned from the SM count (rla_bwd_plan): a small num_sms gives
# segments of several chunks, and a segment count that differs from the checkpoint count.
# The forward and the dq pass split checkpoint segments into parts from the SM count
# (rla_segment_parts): the 132-SM cases above run as many parts as a segment has chunks.
# Segment chunks = clamp(n_chunks * D/64 * B*Hkv // num_sms, 1, 16); n_chunks = ceil(T / 64).
# dq CTAs per checkpoint segment = clamp(ceil(num_sms / (D/64 * B*Hkv * n_ckpt)), 1, every)
# (the 132-SM cases above with every = 2 run two per segment).
RLA_SEGMENT_CASES = [
    # B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms -> segments x chunks
    # 5 chunks, G = 4: segments of 2, 2, 1 chunks (3 segments, 3 checkpoints); per-batch H0
    pytest.param(1, 300, 4, 1, 64, 5, "relu", "batch", 2, True, BF16, 2, marks=mutants),
    # B = 2, G = 4, w = 0, broadcast H0, D = 128: one segment of both chunks, 2 checkpoints
    pytest.param(2, 100, 4, 1, 128, 0, "softmax", "broadcast", 1, True, FP16, 4),
    # w >= T: no key ever enters a state; 2 segments of 2 chunks
    pytest.param(1, 200, 2, 2, 64, 250, "softmax", None, 3, True, BF16, 4),
    # G = 1, ragged T, no H0, no final-state gradient: segments of 3 + 2 chunks, 5 checkpoints
    pytest.param(1, 260, 4, 4, 64, 17, "softmax", None, 1, False, FP16, 6),
    # one segment of all 4 chunks (num_sms = 1), D = 128, relu, H0 per batch
    pytest.param(1, 230, 2, 1, 128, 40, "relu", "batch", 2, True, BF16, 1),
    # dq in parts: checkpoint segments of 4 + 1 chunks, 2 CTAs each (the second part of the
    # first advances the state over 2 chunks; that of the second has no chunk)
    pytest.param(1, 260, 2, 1, 64, 20, "softmax", "batch", 4, True, BF16, 4),
]


@emu_kernel(*RLA_SOURCES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,every,grad_final,dtype,num_sms", RLA_SEGMENT_CASES)
def test_rla_segments_emulated(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms):
    check_rla(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms)


def check_rla(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms=132,
              bwd_cap=None):
    """RLA forward and backward (both planned for num_sms SMs; the backward's sub-batches
    sized to bwd_cap bytes of temporaries, None: the default) under every schedule against
    the float64 reference; the checkpoints against those of a forward planned for other SMs.
    Returns the inputs and the checkpoints the backward ran on."""
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=T + D + w)
    g = torch.Generator().manual_seed(2)
    H0 = None
    if h0 is not None:
        H0 = 0.1 * torch.randn(B if h0 == "batch" else 1, Hq, 2 * D, D, generator=g)
    go = torch.randn(B, T, Hq, D, generator=g)

    gfs = torch.randn(B, Hkv, 2 * D, D, generator=g) if grad_final else None

    cap = {} if bwd_cap is None else dict(temporaries_cap_bytes=bwd_cap)

    def run():
        o, fs, ck = emu.rla_fwd(q, k, v, w, fm, H0, every, num_sms=num_sms)
        return o, fs, ck, emu.rla_bwd(go, gfs, q, k, v, H0, ck, w, fm, every, num_sms=num_sms,
                                      **cap)

    # dq accumulates across CTAs with float atomics (flat position 3)
    o, fs, ck, (dq, dk, dv, dh0) = under_schedules(emu, run, atomic=(3,))
    # The checkpoints do not depend on how the segments are split into parts (132 SMs: as
    # many parts as chunks per segment here; 1 SM: none), up to the order of the fp32 sums.
    _, fs_other, ck_other = emu.rla_fwd(q, k, v, w, fm, H0, every, num_sms=1 if num_sms > 1 else 132)
    for name, x, y in (("checkpoints", ck, ck_other), ("final_state", fs, fs_other)):
        assert (x - y).abs().max() <= 1e-5 * (y.abs().max() + 1e-30), name

    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    h64 = None if H0 is None else H0.double().requires_grad_()
    r, rs = ref.residual_linear_attention(*l64, window_size=w, feature_map=fm,
                                          initial_state=h64, return_final_state=True)
    leaves = l64 + ([h64] if h64 is not None else [])
    loss = (r * go.double()).sum() + ((rs * gfs.double()).sum() if grad_final else 0)
    want = torch.autograd.grad(loss, leaves, allow_unused=True)
    want = [torch.zeros_like(l) if x is None else x for x, l in zip(want, leaves)]
    lp = [x.detach().requires_grad_() for x in (q, k, v)]
    po, ps = plain_rla(*lp, w, fm, H0)
    ploss = (po.double() * go.double()).sum() + ((ps.double() * gfs.double()).sum() if grad_final else 0)
    plain = torch.autograd.grad(ploss, lp, allow_unused=True)
    plain = [torch.zeros_like(l) if x is None else x for x, l in zip(plain, lp)]
    if r.norm() == 0:  # nothing leaves the window and no H0: exact zeros
        assert torch.equal(o, torch.zeros_like(o))
    else:
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
    return dict(q=q, k=k, v=v, H0=H0, go=go, gfs=gfs, ck=ck, grads=(dq, dk, dv, dh0))


# GPUs with 99 KiB of shared memory per block (sm_86 / sm_89: A10, L4, L40S, RTX 4090): the op
# passes the device's opt-in limit and at D = 128 the launchers pick the configuration with
# 32-column value slices and phi(q) in 64-feature parts (rla_plan.h with_rla_traits). Run on
# the emulated sm_86, whose launches fail above 99 KiB as on the GPU: every launch fits, the
# results meet the reference rule (check_rla, every schedule), and the columns each CTA owns
# (out, the states, dv, dH0) are bit for bit the default configuration's: the parts add the
# same MMAs in the same order. dq and dk sum the value slices' shares (two per workspace
# slot, the slots in order), so only their last bits may differ.
RLA_SMALL_SMEM_CASES = [
    # B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms. Per dtype the two cases
    # reach every marked path of that configuration's kernels (test_zz_every_kernel_path_emulated).
    # GQA 4 (a dk slot per value slice), w >= 64 (a first chunk without keys), planned for
    # 1 SM (segments of several chunks: the state updates of forward and dk/dv pass)
    pytest.param(1, 200, 4, 1, 128, 70, "softmax", None, 2, True, BF16, 1, marks=mutants),
    # G = 1 (two slices per dq / dk slot), two sequences, several dk/dv segments
    pytest.param(2, 150, 2, 2, 128, 5, "relu", "batch", 3, False, BF16, 132),
    pytest.param(1, 200, 4, 1, 128, 70, "relu", None, 2, True, FP16, 1),
    pytest.param(2, 150, 2, 2, 128, 5, "softmax", "broadcast", 3, True, FP16, 132),
]


def _on_arch(emu, arch, fn):
    """fn() with the emulator modelling GPU `arch`, then the default one again."""
    emu.set_arch(arch)
    try:
        return fn()
    finally:
        emu.set_arch(emu_arch())


@emu_kernel(*RLA_SOURCES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,every,grad_final,dtype,num_sms",
                         RLA_SMALL_SMEM_CASES)
def test_rla_small_smem_emulated(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype,
                                 num_sms):
    name = "bf16" if dtype == BF16 else "fp16"
    limit = 99 * 1024
    for op in ("rla_fwd", "rla_bwd"):
        rows = emu.plan_rows(op, B, T, Hq, Hkv, D, w, name, every, max_smem_per_block=limit)
        assert max(r["smem_bytes"] for r in rows) <= limit, op
        default = emu.plan_rows(op, B, T, Hq, Hkv, D, w, name, every)
        assert max(r["smem_bytes"] for r in default) > limit, op  # so the limit chose
    def small_run():
        emu.take_launch_records()
        x = check_rla(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms)
        records = emu.take_launch_records()
        assert records and max(r["smem_bytes"] for r in records) <= limit
        return x, emu.rla_fwd(x["q"], x["k"], x["v"], w, fm, x["H0"], every, num_sms=num_sms)

    x, small = _on_arch(emu, 86, small_run)
    big = emu.rla_fwd(x["q"], x["k"], x["v"], w, fm, x["H0"], every, num_sms=num_sms)
    for what, a, b in zip(("out", "final_state", "checkpoints"), small, big):
        assert torch.equal(a, b), what
    dq, dk, dv, dh0 = emu.rla_bwd(x["go"], x["gfs"], x["q"], x["k"], x["v"], x["H0"], x["ck"], w,
                                  fm, every, num_sms=num_sms)
    assert torch.equal(dv, x["grads"][2]), "dv"
    if x["H0"] is not None:
        assert torch.equal(dh0, x["grads"][3]), "dh0"
    for what, a, b in (("dq", x["grads"][0], dq), ("dk", x["grads"][1], dk)):
        assert rel_err(a, b) < 1e-2, what


# Where the device has the room (rla_plan.h rla_state_halves_fit: an H100 / H200 at D = 128,
# also an A100 at D = 64) the forward and the dq pass keep the state's hi and lo halves in
# shared memory, written by every state update, and feed them to the MMA by ldmatrix; H0 then
# joins S once per segment (G = 1) or is a product of its own per head (G > 1). The default
# emulated A100 runs D = 64 with the halves (the cases above) and D = 128 without. These run
# the other two: D = 128 with the halves on the emulated sm_90, D = 64 without on sm_86 (99
# KiB), under every schedule against the reference (check_rla); then the same inputs on the
# other GPU: the launches differ in the kernels' shared memory, and without H0 the results
# are bit for bit the same (the same MMAs in the same order); with H0 out and dq agree to
# fp32 rounding (S + H0 is summed in another order). Per (D, dtype) the cases reach every
# marked path of those kernels (test_zz_every_kernel_path_emulated).
RLA_HALVES_CASES = [
    # B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms
    # G = 1 with H0 (added into S), several parts per segment (4 SMs)
    pytest.param(1, 200, 2, 2, 128, 5, "softmax", "batch", 2, True, BF16, 4, marks=mutants),
    pytest.param(1, 200, 2, 2, 128, 5, "relu", "broadcast", 2, False, FP16, 4),
    # G = 4 with H0 (a product per head), two sequences
    pytest.param(2, 150, 4, 1, 128, 40, "relu", "broadcast", 2, False, FP16, 132),
    pytest.param(2, 150, 4, 1, 128, 40, "softmax", "batch", 2, True, BF16, 132),
    # no H0, segments of several chunks (1 SM), w >= 64 (chunks without keys)
    pytest.param(1, 260, 4, 2, 128, 70, "softmax", None, 3, True, FP16, 1),
    pytest.param(1, 230, 2, 1, 128, 70, "relu", None, 2, False, BF16, 1),
    # D = 64 on sm_86: G = 4, no H0, w >= 64, 1 SM; then G = 1 with H0, two sequences
    pytest.param(1, 200, 4, 1, 64, 70, "softmax", None, 2, True, BF16, 1),
    pytest.param(2, 150, 2, 2, 64, 5, "relu", "batch", 3, False, BF16, 132),
    pytest.param(1, 200, 4, 1, 64, 70, "relu", None, 2, False, FP16, 1),
    pytest.param(2, 150, 2, 2, 64, 5, "softmax", "broadcast", 3, True, FP16, 132),
]


@emu_kernel(*RLA_SOURCES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,every,grad_final,dtype,num_sms",
                         RLA_HALVES_CASES)
def test_rla_state_halves_emulated(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype,
                                   num_sms):
    name = "bf16" if dtype == BF16 else "fp16"
    halves_arch, plain_arch = (90, 80) if D == 128 else (80, 86)
    checked = halves_arch if D == 128 else plain_arch  # the kernels only these cases run

    def checked_run():
        emu.take_launch_records()
        x = check_rla(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms)
        out = emu.rla_fwd(x["q"], x["k"], x["v"], w, fm, x["H0"], every, num_sms=num_sms)
        return x, out, emu.take_launch_records(), emu.max_smem_per_block()

    x, checked_out, records, checked_limit = _on_arch(emu, checked, checked_run)

    def other_run():
        out = emu.rla_fwd(x["q"], x["k"], x["v"], w, fm, x["H0"], every, num_sms=num_sms)
        grads = emu.rla_bwd(x["go"], x["gfs"], x["q"], x["k"], x["v"], x["H0"], x["ck"], w, fm,
                            every, num_sms=num_sms)
        return out, grads, emu.max_smem_per_block()

    other_out, other_grads, other_limit = _on_arch(emu, plain_arch if checked == halves_arch
                                                   else halves_arch, other_run)
    limits = {checked: checked_limit, plain_arch if checked == halves_arch else halves_arch: other_limit}

    def smem(op, kernel, arch):
        rows = emu.plan_rows(op, B, T, Hq, Hkv, D, w, name, every, num_sms=num_sms,
                             max_smem_per_block=limits[arch])
        return [r["smem_bytes"] for r in rows if r["kernel"] == kernel][0]

    for op, kernel in (("rla_fwd", "rla_fwd_kernel"), ("rla_bwd", "rla_bwd_dq_kernel")):
        # the halves need more than the other GPU allows, and ran where they fit
        assert smem(op, kernel, halves_arch) > limits[plain_arch] >= smem(op, kernel, plain_arch)
        assert smem(op, kernel, checked) in [r["smem_bytes"] for r in records], kernel
    # the halves change only out and dq (passes 1 and 2, the dk/dv and state kernels are the same)
    for what, a, b in zip(("out", "final_state", "checkpoints", "dq", "dk", "dv", "dh0"),
                          (*checked_out, *x["grads"]), (*other_out, *other_grads)):
        if a is None:
            assert b is None, what
        elif x["H0"] is None or what not in ("out", "dq"):
            assert torch.equal(a, b), what
        else:
            assert rel_err(a, b) < 1e-3, what


# The CUDA kernels move q, k, v (and the RLA backward's fp32 grad_out) in 16-byte pieces:
# RLA by vector loads, SWA by cp.async. A view that is not 16-byte aligned or whose strides
# are not whole pieces is copied by the op layer first (op_common.cpp rows_16byte_aligned);
# the emulator fails a misaligned 16-byte access as the GPU faults on it (self-test
# "misaligned"), so these views run only because of the copy, and give the contiguous
# inputs' results bit for bit.
def _odd_view(x):
    """x's values in a view 2 bytes past a 16-byte boundary, with odd row strides."""
    big = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
    big[..., 1:] = x
    view = big[..., 1:]
    assert view.data_ptr() % 16 != 0 and view.stride(-2) % 8 != 0
    return view


@emu_kernel(*RLA_SOURCES)
def test_rla_misaligned_views_are_copied_for_the_kernels(emu):
    q, k, v = inputs(1, 70, 2, 1, 64, BF16, seed=3)
    w, fm, every = 5, "softmax", 1
    out, fs, ck = emu.rla_fwd(q, k, v, w, fm, None, every)
    out_o, fs_o, ck_o = emu.rla_fwd(_odd_view(q), _odd_view(k), _odd_view(v), w, fm, None, every)
    for what, a, b in (("out", out, out_o), ("final_state", fs, fs_o), ("checkpoints", ck, ck_o)):
        assert torch.equal(a, b), what
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = emu.rla_bwd(go, None, q, k, v, None, ck, w, fm, every)
    grads_o = emu.rla_bwd(_odd_view(go), None, _odd_view(q), _odd_view(k), _odd_view(v), None,
                          ck, w, fm, every)
    for what, a, b in zip(("dq", "dk", "dv"), grads, grads_o):
        assert torch.equal(a, b), what


@emu_kernel("swa_fwd_kernel.cuh")
def test_swa_misaligned_views_are_copied_for_the_kernels(emu):
    q, k, v = inputs(1, 70, 2, 1, 64, BF16, seed=5)
    o, lse = emu.swa_fwd(q, k, v, 9, 0.125, None, None)
    o_o, lse_o = emu.swa_fwd(_odd_view(q), _odd_view(k), _odd_view(v), 9, 0.125, None, None)
    assert torch.equal(o, o_o) and torch.equal(lse, lse_o)


# The backward in sub-batches (rla_bwd_plan): a small cap on the temporaries makes it run its
# five launches once per sub-batch, in one workspace sized for a sub-batch, with the pointers
# offset to it. Each case is checked against the reference (check_rla) and bit for bit
# against one launch over the whole batch planned the same way: its segments and dq parts
# follow B * Hkv / num_sms, so a single launch for num_sms * sub_batches SMs has the
# sub-batches' plan. cap 1: a sequence per sub-batch; "half": two sub-batches.
RLA_SUB_BATCH_CASES = [
    # B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms, cap -> sub-batches
    # GQA 2, broadcast H0 (its gradient summed over the sub-batches), ragged T: 2 x 1
    # sequence, dk/dv segments of 2, 2, 1 chunks
    pytest.param(2, 300, 4, 2, 64, 5, "relu", "broadcast", 1, True, BF16, 4, 1, 2),
    # D = 128 (two value slices), per-batch H0, fp16: 2 x 1 sequence, 4 one-chunk segments,
    # dq in 2 parts per checkpoint segment
    pytest.param(2, 200, 2, 1, 128, 40, "softmax", "batch", 2, True, FP16, 8, 1, 2),
    # GQA 4, no H0, no final-state gradient, 132 SMs: 2 x 2 sequences
    pytest.param(4, 70, 4, 1, 64, 9, "softmax", None, 1, False, BF16, 132, "half", 2),
]


@emu_kernel(*RLA_SOURCES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,every,grad_final,dtype,num_sms,cap,runs",
                         RLA_SUB_BATCH_CASES)
def test_rla_sub_batches_emulated(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype,
                                  num_sms, cap, runs):
    name = "bf16" if dtype == BF16 else "fp16"
    plan = lambda batch, **kw: emu.plan_rows("rla_bwd", batch, T, Hq, Hkv, D, w, name, every,  # noqa: E731
                                             num_sms=num_sms, **kw)
    if cap == "half":  # the workspace of B / 2 sequences (no H0 here) + all saved states
        cap = plan(B // 2)[0]["workspace_bytes"] + plan(B)[0]["saved_state_bytes"]
    rows = plan(B, temporaries_cap_bytes=cap)
    assert {r["sub_batches"] for r in rows} == {runs} and len(rows) == 5 * runs
    x = check_rla(emu, B, T, Hq, Hkv, D, w, fm, h0, every, grad_final, dtype, num_sms, cap)

    emu.take_launch_records()
    sub = emu.rla_bwd(x["go"], x["gfs"], x["q"], x["k"], x["v"], x["H0"], x["ck"], w, fm, every,
                      num_sms=num_sms, temporaries_cap_bytes=cap)
    assert len(emu.take_launch_records()) == 5 * runs  # the five launches per sub-batch
    whole = emu.rla_bwd(x["go"], x["gfs"], x["q"], x["k"], x["v"], x["H0"], x["ck"], w, fm,
                        every, num_sms=num_sms * runs, temporaries_cap_bytes=2**62)
    assert len(emu.take_launch_records()) == 5
    for what, a, b in zip(("dq", "dk", "dv", "dh0"), sub, whole):
        assert torch.equal(a, b), what


# Packed RLA: the same document mixes; each document starts from its own H0 (per document,
# or one broadcast), its shift never reaches into the previous document, its final state is
# its own (zero for the empty one). every = 1 gives a document longer than a chunk (64)
# two segments of its own checkpoint slots.
PACKED_RLA_CASES = [
    # lens, Hq, Hkv, D, w, fm, h0, every, dtype, num_sms (dk/dv segments: rla_bwd_plan)
    # num_sms = 1: dk/dv segments of 2 chunks (the 70-row document is one segment)
    pytest.param([3, 0, 1, 5, 6, 70], 8, 1, 64, 5, "relu", "batch", 1, BF16, 1),
    pytest.param([70, 1, 0, 9, 10], 2, 2, 128, 9, "softmax", "broadcast", 1, FP16, 132),
    pytest.param([0, 6, 66, 1, 5], 2, 2, 64, 5, "softmax", None, 2, FP16, 132),
    # segments of 3 chunks: the 200-row document has two (3 + 1 chunks), 4 checkpoints
    pytest.param([130, 3, 200], 4, 2, 64, 20, "relu", "batch", 1, BF16, 4),
]


@emu_kernel(*RLA_SOURCES)
@pytest.mark.parametrize("lens,Hq,Hkv,D,w,fm,h0,every,dtype,num_sms", PACKED_RLA_CASES)
def test_rla_packed_emulated(emu, lens, Hq, Hkv, D, w, fm, h0, every, dtype, num_sms):
    q, k, v, cu = packed_inputs(lens, Hq, Hkv, D, dtype, seed=sum(lens) + D + 1)
    total, N = q.shape[0], len(lens)
    g = torch.Generator().manual_seed(4)
    H0 = None
    if h0 is not None:
        H0 = 0.1 * torch.randn(N if h0 == "batch" else 1, Hq, 2 * D, D, generator=g)
    go = torch.randn(total, Hq, D, generator=g)
    gfs = torch.randn(N, Hkv, 2 * D, D, generator=g)

    def run():
        o, fs, ck = emu.rla_fwd(q, k, v, w, fm, H0, every, cu_seqlens=cu)
        return o, fs, ck, emu.rla_bwd(go, gfs, q, k, v, H0, ck, w, fm, every, cu_seqlens=cu,
                                      num_sms=num_sms)

    # dq accumulates across CTAs with float atomics (flat position 3)
    o, fs, ck, (dq, dk, dv, dh0) = under_schedules(emu, run, atomic=(3,))
    assert o.shape == (total, Hq, D) and fs.shape == (N, Hkv, 2 * D, D)

    def by_document(fn, q, k, v, h):
        """fn(q_doc, k_doc, v_doc, h0_doc) -> (o [1, L, Hq, D], state [1, Hkv, 2D, D]) per
        document, packed back; an empty document has no rows and a zero final state."""
        outs, states = [], []
        c = cu.tolist()
        for b in range(N):
            sl = slice(c[b], c[b + 1])
            if sl.stop == sl.start:
                states.append(torch.zeros(1, Hkv, 2 * D, D, dtype=torch.float64))
                continue
            hb = None if h is None else h[b:b + 1] if h.shape[0] > 1 else h
            o_b, st_b = fn(q[sl][None], k[sl][None], v[sl][None], hb)
            outs.append(o_b[0])
            states.append(st_b.double())
        return torch.cat(outs, 0), torch.cat(states, 0)

    l64 = [x.double().requires_grad_() for x in (q, k, v)]
    h64 = None if H0 is None else H0.double().requires_grad_()
    r, rs = by_document(lambda a, b, c, h: ref.residual_linear_attention(
        a, b, c, window_size=w, feature_map=fm, initial_state=h, return_final_state=True),
        *l64, h64)
    leaves = l64 + ([h64] if h64 is not None else [])
    want = torch.autograd.grad((r * go.double()).sum() + (rs * gfs.double()).sum(), leaves)
    lp = [x.detach().requires_grad_() for x in (q, k, v)]
    po, ps = by_document(lambda a, b, c, h: plain_rla(a, b, c, w, fm, h), *lp, H0)
    plain = torch.autograd.grad((po.double() * go.double()).sum()
                                + (ps.double() * gfs.double()).sum(), lp)
    check("out", o, r, po)
    check("final_state", fs, rs, ps)
    for b in range(N):  # documents whose keys never leave the window: exactly zero
        if rs[b].norm() == 0:
            assert torch.equal(fs[b], torch.zeros_like(fs[b])), b
    for name, x, rr, pp in zip(("dq", "dk", "dv"), (dq, dk, dv), want, plain):
        assert x.dtype == dtype and x.shape == rr.shape
        check(name, x, rr, pp)
    if H0 is not None:
        assert dh0.shape == H0.shape
        # phi(q)^T dO with both rounded to the input dtype for the MMA, fp32 accumulation
        assert rel_err(dh0, want[3]) < 1e-2


# ---- decode ---------------------------------------------------------------------------------
# Per (dtype, D): rotary + H0, and neither; groups of 8 (a full head block of the state
# sweep) and 1 query heads per kv head. w = 3 over 8 steps: tokens leave the window; a ring of
# 4 keys is one split (decode_plan.h: at least 8 keys per split).
DECODE_CASES = [
    # dtype, D, fm, rot, h0, Hq, Hkv
    pytest.param(BF16, 64, "softmax", True, True, 8, 1, marks=mutants),
    pytest.param(BF16, 64, "relu", False, False, 2, 2),
    # a mutation case too: at D=128 the rotation of sQ is spread over other warps than the
    # feature map that reads it (at D=64 each warp rotates the groups it mapped)
    pytest.param(BF16, 128, "relu", True, True, 2, 2, marks=mutants),
    pytest.param(BF16, 128, "softmax", False, False, 8, 1),
    pytest.param(FP16, 64, "relu", True, True, 2, 1),
    pytest.param(FP16, 64, "softmax", False, False, 2, 2),
    pytest.param(FP16, 128, "softmax", True, True, 8, 1),
    pytest.param(FP16, 128, "relu", False, False, 2, 2),
]


def emu_cache(B, w, Hkv, D, dtype):
    """An empty decode cache of the CUDA kernels' dtype on the CPU (the emulated kernels take
    CPU tensors; RAttentionCache.empty refuses float16 on CPU, whose CPU kernels lack it)."""
    from rattention_ext.decode import RAttentionCache

    ring = lambda: torch.zeros(B, w + 1, Hkv, D, dtype=dtype)  # noqa: E731
    return RAttentionCache(ring(), ring(), torch.zeros(B, Hkv, 2 * D, D),
                           torch.zeros(B, dtype=torch.int64))


def decode_tokens(emu, q, k, v, w, fm, scale, H0, cos, sin, ga, gb, lead=0, target_ctas=0):
    """Decodes q, k, v [B, T, H, D] token by token from an empty cache; with lead > 0 the last
    sequence first runs `lead` tokens alone, then every sequence b < B - 1 feeds token t while
    it feeds t + lead (positions differ across the batch). Returns (out rows per sequence
    [B, T or T - lead, Hq, D], cache, the split counts launched)."""
    B, T, Hkv, D = k.shape
    cache = emu_cache(B, w, Hkv, D, q.dtype)
    rows, splits = [[] for _ in range(B)], set()

    def step(sel, tok):
        bs = slice(sel[0], sel[-1] + 1)
        qq, kk, vv = (torch.stack([x[b, t] for b, t in zip(sel, tok)])[:, None] for x in (q, k, v))
        out = emu.decode_step(qq, kk, vv, cache.keys[bs], cache.values[bs], cache.state[bs],
                              cache.positions[bs], fm, scale, H0, cos, sin, ga, gb, 1e-8,
                              target_ctas=target_ctas)
        launches = emu.take_launch_records()
        splits.add(launches[0]["grid"][1])  # decode_split_kernel: (B * Hkv, splits)
        for i, b in enumerate(sel):
            rows[b].append(out[i])

    emu.take_launch_records()
    for t in range(lead):
        step([B - 1], [t])
    for t in range(T - lead):
        step(list(range(B)), [t] * (B - 1) + [t + lead])
    return [torch.cat(r, dim=0) for r in rows], cache, splits


def check_decode(got, cache, q, k, v, w, fm, scale, H0, cos, sin, ga, gb, lead=0):
    """Rows against the float64 forward by the 2x-plain-dtype rule (the plain forward in the
    input dtype), the state against the RLA final state, the ring against the raw keys."""
    B, T = q.shape[:2]
    kw = dict(window_size=w, feature_map=fm, softmax_scale=scale, swa_norm_weight=ga,
              rla_norm_weight=gb, norm_eps=1e-8)
    r64 = ref.forward(q.double(), k.double(), v.double(),
                      initial_state=None if H0 is None else H0.double(),
                      rotary_cos=None if cos is None else cos.double(),
                      rotary_sin=None if sin is None else sin.double(), **kw)
    plain = ref.forward(q, k, v, initial_state=H0, rotary_cos=cos, rotary_sin=sin, **kw)
    for b in range(B):
        n = T if b == B - 1 else T - lead
        assert got[b].dtype == q.dtype and got[b].shape == (n,) + q.shape[2:]
        check(f"decode out, sequence {b}", got[b], r64[b, :n], plain[b, :n])
    assert cache.positions.tolist() == [T - lead] * (B - 1) + [T]
    for b in range(B):
        n = T if b == B - 1 else T - lead
        _, s64 = ref.residual_linear_attention(q[b:b + 1, :n].double(), k[b:b + 1, :n].double(),
                                               v[b:b + 1, :n].double(), window_size=w,
                                               feature_map=fm, return_final_state=True)
        if n > w + 1:
            assert rel_err(cache.state[b:b + 1], s64) < 1e-2, b
        else:
            assert torch.count_nonzero(cache.state[b]) == 0, b
        for s in range(max(0, n - w - 1), n):  # the ring holds the last w + 1 raw keys
            assert torch.equal(cache.keys[b, s % (w + 1)], k[b, s]), (b, s)
            assert torch.equal(cache.values[b, s % (w + 1)], v[b, s]), (b, s)


@emu_kernel("decode.cu")
@pytest.mark.parametrize("dtype,D,fm,rot,h0,Hq,Hkv", DECODE_CASES)
def test_decode_emulated_matches_forward(emu, dtype, D, fm, rot, h0, Hq, Hkv):
    B, T, w = 2, 8, 3
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=11 + D + Hq)
    g = torch.Generator().manual_seed(4)
    H0 = 0.1 * torch.randn(1, Hq, 2 * D, D, generator=g) if h0 else None
    ga, gb = mix_weights(Hq, D, seed=12)
    cos, sin = rotary_tables(T, D, torch.float32) if rot else (None, None)
    scale = 1 / math.sqrt(D)
    got, cache, splits = under_schedules(
        emu, lambda: decode_tokens(emu, q, k, v, w, fm, scale, H0, cos, sin, ga, gb))
    assert splits == {1}
    check_decode(got, cache, q, k, v, w, fm, scale, H0, cos, sin, ga, gb)


# Flash-decoding: one (sequence, kv head) split across CTAs (ring positions and state
# columns), merged by the combine kernel. target = the CTA count the plan aims at (the SM
# count on a GPU), which sets the split count here; `splits` is what the plan must choose.
SPLIT_CASES = [
    # B, T, Hq, Hkv, D, w, target, splits, dtype, fm, rot, h0, lead
    # one split of 41 keys: two key tiles (the barrier that ends a tile), G = 16: two head
    # blocks in the state sweep (the barrier between them)
    pytest.param(1, 44, 16, 1, 64, 40, 1, 1, BF16, "softmax", True, True, 0, marks=mutants),
    # 4 splits of 11 keys over a ring of 41 (not divisible), GQA 4
    pytest.param(1, 44, 4, 1, 128, 40, 4, 4, FP16, "relu", True, False, 0, marks=mutants),
    # w >= steps: the later splits hold no key yet; ragged positions across the batch
    pytest.param(2, 12, 8, 1, 128, 50, 16, 4, BF16, "softmax", False, True, 5),
    # GQA 1, a small ring (10 keys: 2 splits of 5), tokens leave the window, ragged
    pytest.param(2, 14, 2, 2, 64, 9, 8, 2, FP16, "softmax", True, True, 3),
    # GQA 8 at D 64, 2 splits of 9
    pytest.param(1, 24, 8, 1, 64, 16, 8, 2, BF16, "relu", False, False, 0),
    # the most splits at D 128 (32, one float4 of state columns each), most of them empty
    pytest.param(1, 4, 2, 1, 128, 255, 132, 32, BF16, "softmax", True, True, 0),
]


@emu_kernel("decode.cu")
@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,target,splits,dtype,fm,rot,h0,lead", SPLIT_CASES)
def test_decode_emulated_split(emu, B, T, Hq, Hkv, D, w, target, splits, dtype, fm, rot, h0,
                               lead):
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=T + w + Hq)
    g = torch.Generator().manual_seed(5)
    H0 = 0.1 * torch.randn(1, Hq, 2 * D, D, generator=g) if h0 else None
    ga, gb = mix_weights(Hq, D, seed=13)
    cos, sin = rotary_tables(T, D, torch.float32) if rot else (None, None)
    scale = 1 / math.sqrt(D)
    got, cache, launched = under_schedules(
        emu, lambda: decode_tokens(emu, q, k, v, w, fm, scale, H0, cos, sin, ga, gb, lead=lead,
                                   target_ctas=target))
    assert launched == {splits}
    check_decode(got, cache, q, k, v, w, fm, scale, H0, cos, sin, ga, gb, lead=lead)


def _unaligned(shape, dtype, fill=0.0):
    """A contiguous tensor whose data starts 2 elements into its storage: rows that are not
    16-byte aligned (the kernels then copy element by element)."""
    n = math.prod(shape)
    return torch.full((n + 2,), fill, dtype=dtype)[2:].view(shape)


@emu_kernel("decode.cu")
def test_decode_emulated_unaligned_rows(emu):
    """New k / v rows, the ring and the state not 16-byte aligned, over two splits."""
    from rattention_ext.decode import RAttentionCache

    B, T, Hq, Hkv, D, w, dtype = 1, 12, 4, 1, 64, 9, BF16
    q, k, v = inputs(B, T, Hq, Hkv, D, dtype, seed=21)
    k2, v2 = _unaligned(k.shape, dtype), _unaligned(v.shape, dtype)
    k2.copy_(k)
    v2.copy_(v)
    ga, gb = mix_weights(Hq, D, seed=22)
    cos, sin = rotary_tables(T, D, torch.float32)
    scale = 1 / math.sqrt(D)

    def run():
        cache = RAttentionCache(_unaligned((B, w + 1, Hkv, D), dtype),
                                _unaligned((B, w + 1, Hkv, D), dtype),
                                _unaligned((B, Hkv, 2 * D, D), torch.float32),
                                torch.zeros(B, dtype=torch.int64))
        rows = []
        for t in range(T):
            rows.append(emu.decode_step(q[:, t:t + 1], k2[:, t:t + 1], v2[:, t:t + 1], cache.keys,
                                        cache.values, cache.state, cache.positions, "softmax",
                                        scale, None, cos, sin, ga, gb, 1e-8, target_ctas=2))
        grids = {r["grid"] for r in emu.take_launch_records()}
        return [torch.cat(rows, dim=1)[0]], cache, grids

    emu.take_launch_records()
    got, cache, grids = under_schedules(emu, run)
    assert (1, 2, 1) in grids  # the split kernel: 2 splits
    check_decode(got, cache, q, k, v, w, "softmax", scale, None, cos, sin, ga, gb)


@emu_kernel("decode.cu")
def test_decode_emulated_bad_positions(emu):
    """A negative position (sequence 0) or one past the rotary table (sequence 1) gives NaN
    outputs for that sequence; the negative one leaves its cache untouched."""
    B, Hq, Hkv, D, w = 2, 2, 1, 64, 3
    q, k, v = inputs(B, 1, Hq, Hkv, D, BF16, seed=13)
    ga, gb = mix_weights(Hq, D, seed=14)
    cos, sin = rotary_tables(4, D, torch.float32)

    def run():
        cache = emu_cache(B, w, Hkv, D, BF16)
        cache.positions.copy_(torch.tensor([-1, 4]))
        out = emu.decode_step(q, k, v, cache.keys, cache.values, cache.state, cache.positions,
                              "softmax", 0.125, None, cos, sin, ga, gb, 1e-8)
        return out, cache.keys, cache

    out, keys, cache = under_schedules(emu, run)
    assert torch.isnan(out.float()).all()
    assert torch.equal(keys[0], torch.zeros_like(keys[0]))  # the empty cache, untouched
    assert cache.positions.tolist() == [-1, 5]


# ---- coverage (keep last: it judges the tests above) ----------------------------------------
def test_zz_every_kernel_path_emulated(emu, request, capsys):
    """Every compiled kernel instantiation and every marked path ran in this file."""
    sys.path.insert(0, str(ROOT / "tools" / "emu"))
    import coverage

    rows = coverage.collect(emu.coverage())
    problems = coverage.missing(rows)
    report = ROOT / "build" / "cuda-check" / "report.json"
    cuda_dir = ROOT / "csrc" / "cuda"
    if report.exists() and report.stat().st_mtime >= max(f.stat().st_mtime for f in cuda_dir.iterdir()):
        problems += coverage.compare_cuda_check(rows, report)
    path = coverage.write(rows, problems)
    cfg = request.config
    partial = bool(cfg.getoption("keyword") or cfg.getoption("markexpr")
                   or any("::" in a for a in cfg.args))
    if partial or request.session.testsfailed:
        pytest.skip(f"coverage is judged on a full passing run of this file ({path} written)")
    with capsys.disabled():
        print("\n" + coverage.table(rows) + f"\n(written to {path})")
    assert not problems, "not emulated:\n  " + "\n  ".join(problems)


# The emulator's own checks, on tools/emu/emu_selftest.cpp: small kernels with one deliberate
# bug each (same order as its Bug enum) and the check that must report it.
SELFTEST = [
    ("clean", None), ("no_sync", "racecheck"), ("write_after_read", "racecheck"),
    ("uninit", "initcheck"), ("smem_oob", "memcheck"), ("global_oob", "memcheck"),
    ("write_input", "memcheck"), ("no_wait", "initcheck"), ("short_wait", "initcheck"),
    ("own_read", "initcheck"), ("wait_no_sync", "racecheck"), ("partial_barrier", "synccheck"),
    ("split_barrier", "synccheck"), ("shuffle_exited", "synccheck"),
    ("static_persist", "initcheck"), ("launch_bounds", "launch"), ("no_optin", "launch"),
    ("arch_limit", "launch"), ("misaligned", "memcheck"),
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
    # A launch above the modelled GPU's opt-in limit fails as on the GPU: launched without the
    # device's limit in its params, the RLA forward at D = 128 plans its largest configuration
    # (the state's halves in shared memory, 215 KiB), which fails on sm_86 (99 KiB) and sm_80
    # (163 KiB) and runs on sm_90 (227 KiB). With the limit (the op and the emulator pass it)
    # each runs the configuration that fits (test_rla_small_smem_emulated,
    # test_rla_state_halves_emulated).
    q, k, v = inputs(1, 16, 2, 1, 128, torch.bfloat16, seed=1)
    for arch, fits in ((86, False), (80, False), (90, True)):
        emu.set_arch(arch)
        try:
            if fits:
                emu.rla_fwd(q, k, v, 0, "softmax", None, 1, ignore_smem_limit=True)
            else:
                with pytest.raises(RuntimeError, match="opt-in limit"):
                    emu.rla_fwd(q, k, v, 0, "softmax", None, 1, ignore_smem_limit=True)
            emu.rla_fwd(q, k, v, 0, "softmax", None, 1)  # the configuration for the limit
        finally:
            emu.set_arch(emu_arch())
