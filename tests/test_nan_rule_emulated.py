"""The NaN / Inf rule (SPEC.md) for the CUDA kernels, run on the CPU by the host emulator
(tools/emu; the real csrc/cuda sources, every memory and synchronisation check on).

A NaN or +Inf goes into one element of a later token's q, k or v, inside a 64-token tile
(so the MMA tiles hold it together with earlier, finite tokens). Every output and gradient
the poisoned token cannot influence mathematically must be bit-identical to the run without
the poison (and, through that run, close to the float64 reference); for NaN, the outputs
that do depend on it must not be finite. Covered: the SWA forward (plain and with the fused
mixing) and backward, packed documents with NaN in one document's tail, the RLA forward and
backward (both feature maps; the final state and dH0 too), the standalone mixing and decode.

Small shapes (a few seconds each); one warp schedule per run: the schedules themselves are
tested in test_cuda_emulated.py, here the question is which values a poison reaches.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import (emu_arch, emu_kernel, load_emulator, nan_at, rel_err,
                     rla_unchanged_positions, rotary_tables, unchanged_positions)

from rattention_ext import reference as ref

NAN, INF = float("nan"), float("inf")
# tools/emu/mutants.py runs the cases marked `mutants` whose emu_kernel marker names the
# mutated file: the barriers of the kernels' non-finite-tile paths run only with a poison.
MUTANTS = pytest.mark.mutants


RLA_SOURCES = ("rla_fwd_kernel.cuh", "rla_bwd_kernel.cuh", "rla_bwd_state_kernel.cuh",
               "rla_traits.cuh", "nan_tiles.cuh")
BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def emu():
    return load_emulator()


def inputs(B, T, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)
            for H in (Hq, Hkv, Hkv)]


def poisoned(qkv, which, s, value, head=0, d=3):
    """A copy of [q, k, v] with element (0, s, head, d) of input `which` set to value."""
    out = list(qkv)
    i = "qkv".index(which)
    out[i] = nan_at(out[i], (0, s, head, d), value)
    return out


def assert_same(a, b, what):
    """Bit-identical where the poison cannot reach (NaN-free: those positions are finite)."""
    n_bad = int((~torch.isfinite(a)).sum())
    assert n_bad == 0, f"{what}: {n_bad} non-finite values where the poison cannot reach"
    if not torch.equal(a, b):
        diff = (a.double() - b.double()).abs().max().item()
        raise AssertionError(f"{what}: changed where the poison cannot reach (max {diff:.3e})")


def assert_reached(x, what):
    assert not bool(torch.isfinite(x).all()), f"{what}: finite although it depends on a NaN"


def assert_whole_rows(x, rows, what):
    """Exactly the (token, head) rows ``rows`` of a mixed output are non-finite, each as a
    whole: every entry of rms(x) depends on each x_i (an Inf entry included)."""
    bad = ~torch.isfinite(x.float())
    assert torch.equal(bad.all(-1), rows) and torch.equal(bad.any(-1), rows), what


# ---- SWA forward / backward -----------------------------------------------------------------
# T = 128, w = 50: at D = 64 one 128-row forward query tile (two at D = 128: 64 rows), two
# 64-row backward tiles; token s = 40 sits inside key tile 0 with rows 0..39 before it and
# rows 91.. past its window; the diagonal tiles are masked, (1, 0) is a window-edge tile.
SWA_T, SWA_W, SWA_S = 128, 50, 40


def swa_run(emu, qkv, D, dtype, rot, mix):
    B, T, Hq = qkv[0].shape[:3]
    scale = 1 / math.sqrt(D)
    cos, sin = rotary_tables(T, D, torch.float32) if rot else (None, None)
    g = torch.Generator().manual_seed(7)
    go = torch.randn(B, T, Hq, D, generator=g)
    gl = torch.randn(B, Hq, T, generator=g)
    mixed = None
    if mix:
        ga = 1 + 0.5 * torch.randn(Hq, D, generator=g)
        gb = 1 + 0.5 * torch.randn(Hq, D, generator=g)
        o_rla = torch.randn(B, T, Hq, D, generator=g)
        mixed, o, lse = emu.swa_mix_fwd(*qkv, SWA_W, scale, cos, sin, o_rla, ga, gb, 1e-8,
                                        dtype, True)
    else:
        o, lse = emu.swa_fwd(*qkv, SWA_W, scale, cos, sin)
    dq, dk, dv = emu.swa_bwd(go, gl, *qkv, o, lse, SWA_W, scale, cos, sin)
    return dict(mixed=mixed, o=o, lse=lse, dq=dq, dk=dk, dv=dv, cos=cos, sin=sin)


SWA_CASES = [
    # D, dtype, rotary, fused mixing
    pytest.param(64, BF16, False, False, id="d64-bf16",
                 marks=[MUTANTS, emu_kernel("swa_fwd_kernel.cuh", "swa_bwd_kernel.cuh",
                                            "nan_tiles.cuh")]),
    pytest.param(64, FP16, True, True, id="d64-fp16-rot-mix",
                 marks=[MUTANTS, emu_kernel("swa_mix_epilogue.cuh")]),
    pytest.param(128, BF16, True, False, id="d128-bf16-rot", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("D,dtype,rot,mix", SWA_CASES)
def test_swa_poisoned_token_reaches_only_its_dependents(emu, D, dtype, rot, mix, which):
    qkv = inputs(1, SWA_T, 2, 1, D, dtype, seed=D + rot)
    clean = swa_run(emu, qkv, D, dtype, rot, mix)
    rows, q_rows, kv_rows = unchanged_positions("swa", SWA_T, SWA_W, SWA_S, which)
    for value in (NAN, INF):
        bad = swa_run(emu, poisoned(qkv, which, SWA_S, value), D, dtype, rot, mix)
        tag = f"{which}={value}"
        assert_same(bad["o"][:, rows], clean["o"][:, rows], f"o ({tag})")
        assert_same(bad["lse"][:, :, rows], clean["lse"][:, :, rows], f"lse ({tag})")
        if mix:
            assert_same(bad["mixed"][:, rows], clean["mixed"][:, rows], f"mixed ({tag})")
        for name, keep in (("dq", q_rows), ("dk", kv_rows), ("dv", kv_rows)):
            assert_same(bad[name][:, keep], clean[name][:, keep], f"{name} ({tag})")
        if value != value:
            assert_reached(bad["o"][0, ~rows, 0], f"o ({tag})")  # head 0 holds the poison
            if which == "q":  # a NaN query: every score of its row is NaN, lse too
                assert torch.isnan(bad["lse"][0, 0, SWA_S])
            if mix:
                assert_reached(bad["mixed"][0, ~rows, 0], f"mixed ({tag})")
        if mix:  # a row of o with an Inf or NaN mixes into a row non-finite as a whole
            o_bad = (~torch.isfinite(bad["o"])).any(-1)
            assert_whole_rows(bad["mixed"], o_bad, f"mixed ({tag})")
    # the clean run itself against the float64 reference (rows and gradients are the same
    # bits as the poisoned runs' where those cannot be reached)
    l64 = [x.double().requires_grad_() for x in qkv]
    c64 = None if clean["cos"] is None else clean["cos"].double()
    s64 = None if clean["sin"] is None else clean["sin"].double()
    r, rl = ref.sliding_window_attention(*l64, window_size=SWA_W, softmax_scale=D ** -0.5,
                                         return_lse=True, rotary_cos=c64, rotary_sin=s64)
    assert rel_err(clean["o"], r) < 2e-2 and rel_err(clean["lse"], rl) < 2e-2


def test_swa_all_nan_scores_give_nan_output_and_lse(emu):
    """A query row whose visible keys all carry NaN: NaN output and NaN lse (not 0 / -inf);
    the rows before those keys stay finite and unchanged."""
    T, w, t, D = 70, 3, 40, 64
    qkv = inputs(1, T, 2, 1, D, BF16, seed=5)
    k = qkv[1].clone()
    k[0, t - w:t + 1, 0, 1] = NAN
    o0, lse0 = emu.swa_fwd(*qkv, w, D ** -0.5, None, None)
    o, lse = emu.swa_fwd(qkv[0], k, qkv[2], w, D ** -0.5, None, None)
    assert torch.isnan(o[0, t]).all() and torch.isnan(lse[0, :, t]).all()
    assert_same(o[0, :t - w], o0[0, :t - w], "o")
    assert_same(lse[0, :, :t - w], lse0[0, :, :t - w], "lse")


def test_swa_packed_nan_tail_leaves_other_documents_unchanged(emu):
    """Packed documents (cu_seqlens), document 1's tail (its last 20 tokens, as in padding
    from torch.empty) all NaN in q, k and v: documents 0 and 2 (outputs and gradients) and
    document 1's earlier rows (outputs, dq; dk / dv of the keys no NaN row sees) are the same
    bits as with finite values."""
    lens, Hq, Hkv, D, w = [30, 70, 20], 2, 1, 64, 9
    cu = torch.tensor([0, 30, 100, 120], dtype=torch.int32)
    total, scale = 120, D ** -0.5
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, H, D, generator=g).to(BF16) for H in (Hq, Hkv, Hkv))
    go = torch.randn(total, Hq, D, generator=g)
    gl = torch.randn(Hq, total, generator=g)

    def run(q, k, v):
        o, lse = emu.swa_fwd(q, k, v, w, scale, None, None, cu_seqlens=cu)
        return (o, lse) + tuple(emu.swa_bwd(go, gl, q, k, v, o, lse, w, scale, None, None,
                                            cu_seqlens=cu))

    clean = run(q, k, v)
    qn, kn, vn = (x.clone() for x in (q, k, v))
    for x in (qn, kn, vn):
        x[80:100] = NAN
    bad = run(qn, kn, vn)
    keep = torch.ones(total, dtype=torch.bool)
    keep[80:100] = False
    keep_kv = keep.clone()  # the NaN rows' lse and Di reach the keys in their windows
    keep_kv[80 - w:100] = False
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), bad, clean):
        rows = keep_kv if name in ("dk", "dv") else keep
        if name == "lse":
            assert_same(a[:, rows], b[:, rows], name)
        else:
            assert_same(a[rows], b[rows], name)
    assert torch.isnan(bad[0][80:100]).all()


# ---- RLA forward / backward -----------------------------------------------------------------
# T = 100, w = 5 (chunks of 64 with keys, a carried state), s = 40 inside chunk 0: rows up to
# s + w of chunk 0 (and row s's neighbours for q) share the intra-chunk products with it.
RLA_T, RLA_W, RLA_S = 100, 5, 40


def rla_run(emu, qkv, fm, H0, gfs, go, backward, num_sms):
    o, fs, ck = emu.rla_fwd(*qkv, RLA_W, fm, H0, 2, num_sms=num_sms)
    if not backward:
        return dict(o=o, fs=fs)
    dq, dk, dv, dh0 = emu.rla_bwd(go, gfs, *qkv, H0, ck, RLA_W, fm, 2, num_sms=num_sms)
    return dict(o=o, fs=fs, dq=dq, dk=dk, dv=dv, dh0=dh0)


RLA_CASES = [
    # D, dtype, feature map, H0
    pytest.param(64, BF16, "softmax", True, id="d64-bf16-softmax-h0",
                 marks=[MUTANTS, emu_kernel(*RLA_SOURCES)]),
    pytest.param(64, FP16, "relu", False, id="d64-fp16-relu"),
    pytest.param(128, BF16, "relu", True, id="d128-bf16-relu-h0", marks=pytest.mark.slow),
]


# The SM count the segments are planned for: 132 splits the two chunks into one part each;
# with 1 a CTA walks both, so the poisoned chunk's tiles are restored for the state update
# that the next chunk reads.
RLA_SMS = [pytest.param(132, id="parts"), pytest.param(1, id="one-cta")]


@pytest.mark.parametrize("backward", [pytest.param(False, id="forward"),
                                      pytest.param(True, id="backward")])
@pytest.mark.parametrize("num_sms", RLA_SMS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("D,dtype,fm,h0", RLA_CASES)
def test_rla_poisoned_token_reaches_only_its_dependents(emu, D, dtype, fm, h0, which, num_sms,
                                                        backward):
    check_rla(emu, D, dtype, fm, h0, which, backward=backward, num_sms=num_sms)


# The configuration for 99 KiB of shared memory per block (sm_86 / sm_89; rla_plan.h): at
# D = 128 phi(q) enters the backward in four 64-feature parts, and a NaN query poisons every
# part (softmax spreads it over the row), so the barriers of the later parts' non-finite
# path run. The emulated sm_86 fails any launch above its limit, as the GPU does.
@pytest.mark.parametrize("which", [pytest.param("q", marks=[MUTANTS, emu_kernel(*RLA_SOURCES)]),
                                   "k"])
def test_rla_small_smem_poisoned_token_reaches_only_its_dependents(emu, which):
    emu.set_arch(86)
    try:
        emu.take_launch_records()
        check_rla(emu, 128, BF16, "softmax", True, which, backward=True, num_sms=132)
        records = emu.take_launch_records()
    finally:
        emu.set_arch(emu_arch())
    assert records and max(r["smem_bytes"] for r in records) <= 99 * 1024


def check_rla(emu, D, dtype, fm, h0, which, backward, num_sms):
    """Forward (output, final state) or backward (dq, dk, dv, dH0) with token RLA_S of
    `which` poisoned by NaN and by +Inf, against the clean run, the segments planned for
    `num_sms` SMs."""
    Hq, Hkv = 2, 1
    qkv = inputs(1, RLA_T, Hq, Hkv, D, dtype, seed=D + 11)
    g = torch.Generator().manual_seed(2)
    H0 = 0.1 * torch.randn(1, Hq, 2 * D, D, generator=g) if h0 else None
    go = torch.randn(1, RLA_T, Hq, D, generator=g)
    gfs = torch.randn(1, Hkv, 2 * D, D, generator=g)
    clean = rla_run(emu, qkv, fm, H0, gfs, go, backward, num_sms)
    rows, q_rows, kv_rows = rla_unchanged_positions(RLA_T, RLA_W, RLA_S, which)
    for value in (NAN, INF):
        bad = rla_run(emu, poisoned(qkv, which, RLA_S, value), fm, H0, gfs, go, backward,
                      num_sms)
        tag = f"{which}={value}"
        if not backward:
            assert_same(bad["o"][:, rows], clean["o"][:, rows], f"o ({tag})")
            if which == "q":  # the state never sees a query
                assert_same(bad["fs"], clean["fs"], f"final state ({tag})")
            if value != value:
                assert_reached(bad["o"][0, ~rows, 0], f"o ({tag})")
                if which != "q":
                    assert_reached(bad["fs"], f"final state ({tag})")
            continue
        assert_same(bad["dq"][:, q_rows], clean["dq"][:, q_rows], f"dq ({tag})")
        assert_same(bad["dk"][:, kv_rows], clean["dk"][:, kv_rows], f"dk ({tag})")
        assert_same(bad["dv"][:, kv_rows], clean["dv"][:, kv_rows], f"dv ({tag})")
        if which != "q" and h0:  # dH0 = sum phi(q) dO^T never sees a key or value
            assert_same(bad["dh0"], clean["dh0"], f"dH0 ({tag})")
        # relu and a poisoned query: dphi(q) never sees q, and the feature map's derivative
        # at NaN is 0 (torch.relu's, and the CPU kernels'), so dq of that row stays finite
        if value != value and not (which == "q" and fm == "relu"):
            assert_reached(bad["dq"][0, ~q_rows], f"dq ({tag})")
    if not backward:
        r = ref.residual_linear_attention(*(x.double() for x in qkv), window_size=RLA_W,
                                          feature_map=fm,
                                          initial_state=None if H0 is None else H0.double())
        assert rel_err(clean["o"], r) < 2e-2


# ---- mixing ---------------------------------------------------------------------------------
def test_mix_poisoned_row_reaches_only_that_row(emu):
    """out = rms(a) g_a + rms(b) g_b per (token, head) row: a NaN / Inf in one row of o_swa
    or o_rla reaches that row's output and input gradients only (the weight gradients sum
    over every row, so they may be reached)."""
    B, T, Hq, D = 1, 70, 2, 64
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(B, T, Hq, D, generator=g), torch.randn(B, T, Hq, D, generator=g)
    ga, gb = 1 + 0.5 * torch.randn(Hq, D, generator=g), 1 + 0.5 * torch.randn(Hq, D, generator=g)
    gout = torch.randn(B, T, Hq, D, generator=g).to(BF16)
    out0 = emu.mix_fwd(a, b, ga, gb, 1e-8, BF16)
    da0, db0, _, _ = emu.mix_bwd(gout, a, b, ga, gb, 1e-8)
    keep = torch.ones(B, T, Hq, dtype=torch.bool)
    keep[0, 40, 1] = False
    for which in ("a", "b"):
        for value in (NAN, INF):
            x = dict(a=a, b=b)
            x[which] = nan_at(x[which], (0, 40, 1, 5), value)
            out = emu.mix_fwd(x["a"], x["b"], ga, gb, 1e-8, BF16)
            da, db, _, _ = emu.mix_bwd(gout, x["a"], x["b"], ga, gb, 1e-8)
            assert_same(out[keep], out0[keep], f"out ({which}={value})")
            assert_same(da[keep], da0[keep], f"d_swa ({which}={value})")
            assert_same(db[keep], db0[keep], f"d_rla ({which}={value})")
            assert_whole_rows(out, ~keep, f"out ({which}={value})")


# ---- decode ---------------------------------------------------------------------------------
def decode_all(emu, q, k, v, w, fm, H0, cos, sin, ga, gb):
    from rattention_ext.decode import RAttentionCache

    B, T, Hkv, D = k.shape
    ring = lambda: torch.zeros(B, w + 1, Hkv, D, dtype=q.dtype)  # noqa: E731
    cache = RAttentionCache(ring(), ring(), torch.zeros(B, Hkv, 2 * D, D),
                            torch.zeros(B, dtype=torch.int64))
    rows = [emu.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache.keys,
                            cache.values, cache.state, cache.positions, fm, D ** -0.5, H0, cos,
                            sin, ga, gb, 1e-8)
            for t in range(T)]
    return torch.cat(rows, dim=1), cache


@pytest.mark.parametrize("fm", ["softmax", "relu"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_decode_poisoned_token_reaches_only_later_steps(emu, which, fm):
    """Token s poisoned: every step before it is the same bits; with NaN, the steps that
    depend on it (s alone for q; s and every later step for k / v: its window, then the
    state, through either feature map) are not finite, exactly where the float64 forward
    is not finite."""
    T, w, s, Hq, Hkv, D = 12, 3, 4, 2, 1, 64
    qkv = inputs(1, T, Hq, Hkv, D, BF16, seed=31)
    g = torch.Generator().manual_seed(4)
    ga, gb = 1 + 0.5 * torch.randn(Hq, D, generator=g), 1 + 0.5 * torch.randn(Hq, D, generator=g)
    cos, sin = rotary_tables(T, D, torch.float32)
    clean, _ = decode_all(emu, *qkv, w, fm, None, cos, sin, ga, gb)
    for value in (NAN, INF):
        x = poisoned(qkv, which, s, value)
        out, cache = decode_all(emu, *x, w, fm, None, cos, sin, ga, gb)
        keep = torch.arange(T) != s if which == "q" else torch.arange(T) < s
        assert_same(out[:, keep], clean[:, keep], f"decode out ({which}={value})")
        # the non-finite rows, whole, where the float64 forward has them (Inf too: with
        # whole rows it does not matter whether a branch made the Inf into a NaN)
        full = ref.forward(*(t.double() for t in x), window_size=w, feature_map=fm,
                           softmax_scale=D ** -0.5, rotary_cos=cos.double(),
                           rotary_sin=sin.double(), swa_norm_weight=ga.double(),
                           rla_norm_weight=gb.double(), norm_eps=1e-8)
        fin = torch.isfinite(full).all(-1)
        assert_whole_rows(out, ~fin, f"decode ({which}={value})")
        if value != value:
            assert not fin[0, s:, 0].any() if which != "q" else not fin[0, s, 0]
