"""Sequences at the op level (CPU): packed batches (cu_seqlens) and continued chunks (halo +
carried state), see SPEC.md "Packed sequences" and "Continuing a sequence".

- packed == a loop over the documents on the dense ops: SWA out + lse, RLA out + final
  state, every gradient (q, k, v, H0), float64 to 1e-10 and float32 to 1e-5; mixes with empty
  documents, length 1, exactly w and w + 1, documents longer than a tile / many RLA chunks,
  GQA 1 and 8, both feature maps, H0 per document or shared, rotary.
- halo + carried == the matching rows of one dense run on the whole sequence: values, final
  state and every gradient, including the carried state's (checked through the chain rule
  into the early keys/values it summarises) and the halo keys/values'.
- opcheck of the varlen and halo forms; bad cu_seqlens / halo / carried_state messages.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err, rotary_tables

import rattention_ext  # noqa: F401  (registers the ops)
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext
CHUNK, EVERY = 16, 2  # several RLA chunks and checkpoint segments per document
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _randn(g, *shape, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def _seq_ops(q, k, v, w, fm, h0, cos, sin, cu=None, carried=None):
    """Both branches of one (packed, continued or plain) call: o_swa, lse, o_rla, final."""
    scale = 1 / math.sqrt(q.shape[-1])
    o_swa, lse = ops.swa_fwd(q, k, v, w, scale, cos, sin, cu)
    o_rla, fs, _ = ops.rla_fwd(q, k, v, w, fm, h0, CHUNK, EVERY, cu, carried)
    return o_swa, lse, o_rla, fs


def _check(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0 or want.abs().max() == 0:
        assert torch.equal(got, want), f"{name}: expected exact zeros"
        return
    e = rel_err(got, want)
    assert e < TOL[dtype], f"{name}: rel err {e:.3e}"


# ---- packed == loop over documents -------------------------------------------------------
def _packed_case(lens, Hq, Hkv, D, w, fm, h0_mode, rot, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N, total = len(lens), sum(lens)
    cu = _cu(lens)
    q = _randn(g, total, Hq, D, dtype=dtype).requires_grad_()
    k = _randn(g, total, Hkv, D, dtype=dtype).requires_grad_()
    v = _randn(g, total, Hkv, D, dtype=dtype).requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = None
    if h0_mode != "none":
        h0 = (0.3 * _randn(g, N if h0_mode == "per_doc" else 1, Hq, 2 * D, D,
                           dtype=acc)).requires_grad_()
    cos, sin = rotary_tables(max(lens + [1]) + 3, D, acc) if rot else (None, None)
    # Upstream gradients for every output (fresh, never zeros).
    g_swa = _randn(g, total, Hq, D, dtype=acc)
    g_lse = _randn(g, Hq, total, dtype=acc)
    g_rla = _randn(g, total, Hq, D, dtype=acc)
    g_fs = _randn(g, N, Hkv, 2 * D, D, dtype=acc)
    leaves = [q, k, v] + ([h0] if h0 is not None else [])

    outs = _seq_ops(q, k, v, w, fm, h0, cos, sin, cu)
    loss = sum((o * go).sum() for o, go in zip(outs, (g_swa, g_lse, g_rla, g_fs)))
    grads = torch.autograd.grad(loss, leaves)

    # The same documents one by one through the dense ops.
    want = [[], [], [], []]
    loss_loop = 0
    for b in range(N):
        s, e = int(cu[b]), int(cu[b + 1])
        h0_b = None if h0 is None else (h0[b:b + 1] if h0_mode == "per_doc" else h0)
        o_swa, lse, o_rla, fs = _seq_ops(q[None, s:e], k[None, s:e], v[None, s:e], w, fm, h0_b,
                                         cos, sin)
        want[0].append(o_swa[0])
        want[1].append(lse[0])
        want[2].append(o_rla[0])
        want[3].append(fs[0])
        loss_loop = loss_loop + (o_swa[0] * g_swa[s:e]).sum() + (lse[0] * g_lse[:, s:e]).sum() \
            + (o_rla[0] * g_rla[s:e]).sum() + (fs[0] * g_fs[b]).sum()
    want = [torch.cat(want[0]), torch.cat(want[1], dim=1), torch.cat(want[2]),
            torch.stack(want[3])]
    grads_loop = torch.autograd.grad(loss_loop, leaves, allow_unused=True)
    for name, a, b in zip(["o_swa", "lse", "o_rla", "final_state"], outs, want):
        _check(name, a.detach(), b.detach(), dtype)
    for name, a, b in zip(["dq", "dk", "dv", "dh0"], grads, grads_loop):
        _check(name, a, torch.zeros_like(a) if b is None else b, dtype)


# w = 5: lengths 5 and 6 are exactly w and w + 1; 150 and 97 are longer than a 64-row tile
# and span many 16-row RLA chunks and 2-chunk checkpoint segments.
MIXES = [
    [7, 0, 1, 5, 6, 150, 0],
    [0, 97, 1],
    [1],
    [64, 65, 5, 0, 0, 6],
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lens", MIXES)
def test_packed_matches_loop(lens, dtype):
    _packed_case(lens, 4, 2, 16, 5, "softmax", "per_doc", True, dtype, seed=len(lens))


@pytest.mark.parametrize("Hq,Hkv,D,w,fm,h0_mode,rot", [
    (1, 1, 8, 0, "relu", "none", False),        # GQA 1, w = 0
    (8, 1, 16, 5, "softmax", "shared", True),   # GQA 8, shared H0
    (2, 2, 32, 70, "relu", "per_doc", True),    # window wider than a tile and than documents
    (8, 1, 8, 200, "softmax", "per_doc", False),  # w >= every document: RLA gives H0 only
])
def test_packed_variants(Hq, Hkv, D, w, fm, h0_mode, rot):
    _packed_case([7, 0, 1, 5, 6, 150, 0], Hq, Hkv, D, w, fm, h0_mode, rot, torch.float64,
                 seed=Hq * 7 + w)


@pytest.mark.parametrize("threads", [1, 4])
def test_packed_thread_counts(threads):
    # Few (document x kv head) tasks: the RLA kernels switch to their segment-parallel passes.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _packed_case([0, 130], 2, 1, 16, 3, "softmax", "per_doc", True, torch.float64, seed=5)
    finally:
        torch.set_num_threads(old)


def test_packed_mix_fused_op():
    # swa_mix_fwd (SWA + mixing in one op) on a packed batch == swa_fwd then mix_fwd.
    g = torch.Generator().manual_seed(3)
    lens = [3, 0, 70]
    cu, total = _cu(lens), sum(lens)
    q = _randn(g, total, 4, 16, dtype=torch.float64).requires_grad_()
    k = _randn(g, total, 2, 16, dtype=torch.float64).requires_grad_()
    v = _randn(g, total, 2, 16, dtype=torch.float64).requires_grad_()
    o_rla = _randn(g, total, 4, 16, dtype=torch.float64).requires_grad_()
    ga, gb = (1 + 0.1 * _randn(g, 4, 16, dtype=torch.float64) for _ in range(2))
    out, o_swa, lse = ops.swa_mix_fwd(q, k, v, 4, 0.25, None, None, o_rla, ga, gb, 1e-8,
                                      torch.float64, True, cu)
    o_swa2, lse2 = ops.swa_fwd(q, k, v, 4, 0.25, None, None, cu)
    out2 = ops.mix_fwd(o_swa2, o_rla, ga, gb, 1e-8, torch.float64)
    _check("out", out, out2, torch.float64)
    _check("lse", lse, lse2, torch.float64)
    go = _randn(g, total, 4, 16, dtype=torch.float64)
    g1 = torch.autograd.grad((out * go).sum(), (q, k, v, o_rla))
    g2 = torch.autograd.grad((out2 * go).sum(), (q, k, v, o_rla))
    for name, a, b in zip(["dq", "dk", "dv", "do_rla"], g1, g2):
        _check(name, a, b, torch.float64)


def test_packed_matches_reference():
    # One anchor straight against the float64 reference (not only the dense ops).
    g = torch.Generator().manual_seed(11)
    lens = [9, 0, 40]
    cu, total, D = _cu(lens), sum(lens), 16
    q = _randn(g, total, 4, D, dtype=torch.float64)
    k = _randn(g, total, 2, D, dtype=torch.float64)
    v = _randn(g, total, 2, D, dtype=torch.float64)
    cos, sin = rotary_tables(64, D)
    o_swa, _, o_rla, _ = _seq_ops(q, k, v, 6, "softmax", None, cos, sin, cu)
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        r_swa = ref.sliding_window_attention(q[None, s:e], k[None, s:e], v[None, s:e],
                                             window_size=6, rotary_cos=cos, rotary_sin=sin)
        r_rla = ref.residual_linear_attention(q[None, s:e], k[None, s:e], v[None, s:e],
                                              window_size=6)
        if e > s:
            assert rel_err(o_swa[s:e], r_swa[0]) < 1e-10
            assert rel_err(o_rla[s:e], r_rla[0]) < 1e-10


# ---- halo + carried state == one dense run ------------------------------------------------
def _carried_from(k_early, v_early, fm):
    """S = sum_s phi(k[s]) v[s]^T per (batch, kv head): [B, Hkv, 2D, D], differentiable."""
    return torch.einsum("bshf,bshd->bhfd", ref.feature_map(k_early, fm), v_early.to(
        torch.float64 if k_early.dtype == torch.float64 else torch.float32))


def _halo_case(a, T, w, B, Hq, Hkv, D, fm, with_h0, rot, dtype, seed):
    """Chunk = tokens [a, a + T) of a sequence of a + T tokens, with halo h = min(w + 1, a)."""
    g = torch.Generator().manual_seed(seed)
    L = a + T
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = _randn(g, B, L, Hq, D, dtype=dtype)
    k = _randn(g, B, L, Hkv, D, dtype=dtype)
    v = _randn(g, B, L, Hkv, D, dtype=dtype)
    h0 = (0.3 * _randn(g, 1, Hq, 2 * D, D, dtype=acc)) if with_h0 else None
    cos, sin = rotary_tables(L + 2, D, acc) if rot else (None, None)
    g_swa = _randn(g, B, T, Hq, D, dtype=acc)
    g_lse = _randn(g, B, Hq, T, dtype=acc)
    g_rla = _randn(g, B, T, Hq, D, dtype=acc)
    g_fs = _randn(g, B, Hkv, 2 * D, D, dtype=acc)

    # One dense run over the whole sequence; the loss reads only the chunk's rows.
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    h0f = h0.clone().requires_grad_() if with_h0 else None
    o_swa, lse, o_rla, fs = _seq_ops(qf, kf, vf, w, fm, h0f, cos, sin)
    want = [o_swa[:, a:], lse[..., a:], o_rla[:, a:], fs]
    loss = sum((o * go).sum() for o, go in zip(want, (g_swa, g_lse, g_rla, g_fs)))
    leaves_f = [qf, kf, vf] + ([h0f] if with_h0 else [])
    gq, gk, gv, *gh = torch.autograd.grad(loss, leaves_f)

    # The chunk: q rows [a, a+T), halo k/v rows [a-h, a), carried = state of rows [0, a-h).
    h = min(w + 1, a)
    e = a - h
    qc = q[:, a:].clone().requires_grad_()
    kc, vc = (x[:, e:].clone().requires_grad_() for x in (k, v))
    ke, ve = (x[:, :e].clone().requires_grad_() for x in (k, v))
    carried = _carried_from(ke, ve, fm) if e > 0 else None
    h0c = h0.clone().requires_grad_() if with_h0 else None
    cc, sc = (cos[e:], sin[e:]) if rot else (None, None)  # row i = position of k/v row i
    got = _seq_ops(qc, kc, vc, w, fm, h0c, cc, sc, carried=carried)
    loss_c = sum((o * go).sum() for o, go in zip(got, (g_swa, g_lse, g_rla, g_fs)))
    leaves_c = [qc, kc, vc] + ([ke, ve] if e > 0 else []) + ([h0c] if with_h0 else [])
    gr = torch.autograd.grad(loss_c, leaves_c)

    for name, x, y in zip(["o_swa", "lse", "o_rla", "final_state"], got, want):
        _check(name, x.detach(), y.detach(), dtype)
    _check("dq", gr[0], gq[:, a:], dtype)
    _check("dk (halo + chunk rows)", gr[1], gk[:, e:], dtype)
    _check("dv (halo + chunk rows)", gr[2], gv[:, e:], dtype)
    if e > 0:  # the carried state's gradient, chained into the rows it summarises
        _check("dk (through carried_state)", gr[3], gk[:, :e], dtype)
        _check("dv (through carried_state)", gr[4], gv[:, :e], dtype)
    if with_h0:
        _check("dh0", gr[-1], gh[0], dtype)


@pytest.mark.parametrize("a,T,w", [
    (40, 77, 5),    # full halo (w + 1 rows) and a carried state
    (3, 50, 5),     # sequence start: halo shorter than w + 1, nothing carried
    (30, 20, 0),    # w = 0: one halo row
    (12, 9, 40),    # w >= T: halo = every earlier token, no carried state
    (100, 1, 7),    # T = 1
    (0, 33, 4),     # no halo at all (plain call)
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_halo_carried_matches_whole_sequence(a, T, w, dtype):
    _halo_case(a, T, w, 2, 4, 2, 16, "softmax", True, True, dtype, seed=a + T + w)


@pytest.mark.parametrize("Hq,Hkv,fm,with_h0,rot", [
    (8, 1, "relu", False, True),
    (2, 2, "softmax", True, False),
])
def test_halo_variants(Hq, Hkv, fm, with_h0, rot):
    _halo_case(70, 90, 20, 1, Hq, Hkv, 16, fm, with_h0, rot, torch.float64, seed=Hq)


def test_carried_state_gradient_directly():
    # d final_state / d carried_state = identity; d o_rla[t] / d carried = phi(q[t]) per head.
    g = torch.Generator().manual_seed(2)
    B, T, Hq, Hkv, D, w = 1, 20, 2, 1, 8, 3
    q, k, v = (_randn(g, B, T, H, D, dtype=torch.float64) for H in (Hq, Hkv, Hkv))
    C = _randn(g, B, Hkv, 2 * D, D, dtype=torch.float64).requires_grad_()
    go = _randn(g, B, T, Hq, D, dtype=torch.float64)
    gf = _randn(g, B, Hkv, 2 * D, D, dtype=torch.float64)
    o, fs, _ = ops.rla_fwd(q, k, v, w, "softmax", None, CHUNK, EVERY, None, C)
    (dC,) = torch.autograd.grad((o * go).sum() + (fs * gf).sum(), (C,))
    phi_q = ref.feature_map(q, "softmax")  # [B, T, Hq, 2D]
    want = gf + torch.einsum("bthf,bthd->bfd", phi_q, go)[:, None]  # Hkv = 1: all heads
    assert rel_err(dC, want) < 1e-10


# ---- opcheck (fake kernels, schemas, autograd registration) ------------------------------
def _opcheck_inputs(packed):
    g = torch.Generator().manual_seed(4)
    D = 8
    if packed:
        lens = [5, 0, 20]
        cu = _cu(lens)
        shp_q, shp_k = (sum(lens), 4, D), (sum(lens), 2, D)
    else:
        cu = None
        shp_q, shp_k = (2, 20, 4, D), (2, 23, 2, D)  # halo of 3 rows (w = 4)
    q = _randn(g, *shp_q, dtype=torch.float64).requires_grad_()
    k = _randn(g, *shp_k, dtype=torch.float64).requires_grad_()
    v = _randn(g, *shp_k, dtype=torch.float64).requires_grad_()
    return q, k, v, cu


@pytest.mark.parametrize("packed", [True, False])
def test_opcheck(packed):
    q, k, v, cu = _opcheck_inputs(packed)
    D, N = q.shape[-1], (cu.numel() - 1 if packed else q.shape[0])
    cos, sin = rotary_tables(30, D)
    h0 = torch.randn(N, 4, 2 * D, D, dtype=torch.float64, requires_grad=True)
    carried = torch.randn(N, 2, 2 * D, D, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.swa_fwd, (q, k, v, 4, 0.3, cos, sin, cu))
    out, lse = ops.swa_fwd(q, k, v, 4, 0.3, cos, sin, cu)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(ops.swa_bwd, (go, gl, q.detach(), k.detach(), v.detach(), out.detach(),
                                        lse.detach(), 4, 0.3, cos, sin, False, cu))
    torch.library.opcheck(ops.rla_fwd, (q, k, v, 4, "softmax", h0, 8, 2, cu, carried))
    o, fs, ck = ops.rla_fwd(q, k, v, 4, "softmax", h0, 8, 2, cu, carried)
    torch.library.opcheck(ops.rla_bwd, (torch.randn_like(o), torch.randn_like(fs), q.detach(),
                                        k.detach(), v.detach(), h0.detach(), ck, 4, "softmax",
                                        8, 2, cu, carried.detach()))
    o_rla = torch.randn_like(out, requires_grad=True)
    ga = torch.ones(4, D, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.swa_mix_fwd, (q, k, v, 4, 0.3, cos, sin, o_rla, ga, ga.detach(),
                                            1e-8, torch.float64, True, cu))


def test_compile_packed_no_recompile():
    # cu_seqlens is a tensor input: new document lengths at the same total reuse the graph.
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter, dynamic=True)
    def f(q, k, v, cu):
        o, lse = ops.swa_fwd(q, k, v, 3, 0.3, None, None, cu)
        o2, fs, _ = ops.rla_fwd(q, k, v, 3, "softmax", None, 16, 2, cu, None)
        return o + o2, fs

    g = torch.Generator().manual_seed(0)
    q = _randn(g, 40, 2, 8, dtype=torch.float64)
    k = _randn(g, 40, 1, 8, dtype=torch.float64)
    v = _randn(g, 40, 1, 8, dtype=torch.float64)
    for lens in ([10, 30, 0], [1, 1, 38], [40, 0, 0]):
        cu = _cu(lens)
        o, fs = f(q, k, v, cu)
        o_e, _ = ops.swa_fwd(q, k, v, 3, 0.3, None, None, cu)
        o2_e, fs_e, _ = ops.rla_fwd(q, k, v, 3, "softmax", None, 16, 2, cu, None)
        assert rel_err(o, o_e + o2_e) < 1e-12 and rel_err(fs, fs_e) < 1e-12
    assert counter.frame_count == 1


# ---- bad input ---------------------------------------------------------------------------
def _packed_inputs():
    g = torch.Generator().manual_seed(0)
    return (_randn(g, 10, 2, 8, dtype=torch.float32), _randn(g, 10, 1, 8, dtype=torch.float32),
            _randn(g, 10, 1, 8, dtype=torch.float32))


@pytest.mark.parametrize("cu,msg", [
    (torch.tensor([0, 4, 10], dtype=torch.int64), "cu_seqlens must be an int32 tensor"),
    (torch.tensor([[0, 4, 10]], dtype=torch.int32), "cu_seqlens must be 1-D"),
    (torch.tensor([1, 4, 10], dtype=torch.int32), "cu_seqlens must start at 0"),
    (torch.tensor([0, 6, 4, 10], dtype=torch.int32), "cu_seqlens must be non-decreasing"),
    (torch.tensor([0, 4, 9], dtype=torch.int32), "cu_seqlens must end at the total"),
])
def test_bad_cu_seqlens(cu, msg):
    q, k, v = _packed_inputs()
    with pytest.raises((RuntimeError, ValueError), match=msg):
        ops.swa_fwd(q, k, v, 2, 0.3, None, None, cu)
    with pytest.raises((RuntimeError, ValueError), match=msg):
        ops.rla_fwd(q, k, v, 2, "softmax", None, 16, 2, cu, None)


def test_bad_sequence_shapes():
    q, k, v = _packed_inputs()
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match="q must be 3-D"):
        ops.swa_fwd(q[None], k[None], v[None], 2, 0.3, None, None, cu)
    with pytest.raises(ValueError, match="packed batches take no halo"):
        ops.swa_fwd(q[:8], k, v, 2, 0.3, None, None, _cu([4, 4]))
    qd, kd, vd = q[None], k[None], v[None]
    with pytest.raises(ValueError, match=r"T \+ window_size \+ 1"):
        ops.swa_fwd(qd[:, :5], kd, vd, 2, 0.3, None, None)  # halo 5 > w + 1 = 3
    with pytest.raises(ValueError, match=r"T \+ window_size \+ 1"):
        ops.rla_fwd(qd, kd[:, :5], vd[:, :5], 2, "softmax", None, 16, 2)  # k shorter than q
    with pytest.raises(ValueError, match=r"carried_state must be \[B, Hkv, 2D, D\]"):
        ops.rla_fwd(qd, kd, vd, 2, "softmax", None, 16, 2, None, torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match=r"rotary_cos has 6 positions but 10"):
        cos, sin = rotary_tables(6, 8, torch.float32)
        ops.swa_fwd(q, k, v, 2, 0.3, cos, sin, _cu([10]))
