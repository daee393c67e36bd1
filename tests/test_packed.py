"""Packed variable-length batches (``cu_seqlens``, SPEC.md "Packed sequences").

Oracle: a loop over the documents on the dense API (each document a batch of one), and the
float64 reference (itself a loop over documents on the dense reference). Every document of a
packed batch must come out exactly as if it were alone: values, every gradient (q, k, v, H0,
both norm weights), the RLA final states. Mixes cover empty documents, length 1, exactly
``w`` and ``w + 1`` tokens, documents longer than a kernel tile (64), GQA 1 and 8, both
feature maps, shared and per-document H0, rotary.
"""
from __future__ import annotations

import math

import pytest
import torch

import rattention_ext
from rattention_ext import RAttentionCache, decode_step, prefill
from rattention_ext import reference as R
from rattention_ext.nn import RAttention

from conftest import rel_err, rotary_tables

F64_TOL = 1e-10
F32_TOL = 1e-5

W = 8
# Document-length mixes (window W): empty documents (first, middle, last), length 1,
# exactly W and W + 1, longer than a 64-token tile, a single document.
MIXES = [
    [5, 0, 1, 17],
    [0, W, W + 1, 1, 70],
    [130, 3, 0, 65, 0],
    [1],
    [W + 1, 200],
]


def _packed(lengths, Hq, Hkv, D, dtype=torch.float64, seed=0):
    """Fresh random packed q [total, Hq, D], k, v [total, Hkv, D] and int32 cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, H, D, generator=g, dtype=torch.float64).to(dtype)
               for H in (Hq, Hkv, Hkv))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu


def _extras(n_docs, Hq, D, dtype, *, h0=None, rotary_P=None, seed=1):
    """Non-default keywords: random norm weights, optional H0 (None, "shared" = [1, ...] or
    "per_doc" = [N, ...]) and rotary tables."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(
        swa_norm_weight=(1 + 0.3 * torch.randn(Hq, D, generator=g, dtype=torch.float64)).to(acc),
        rla_norm_weight=(1 + 0.3 * torch.randn(Hq, D, generator=g, dtype=torch.float64)).to(acc),
        softmax_scale=0.8 / math.sqrt(D),
        norm_eps=1e-6,
    )
    if h0 is not None:
        n = 1 if h0 == "shared" else n_docs
        kw["initial_state"] = (0.1 * torch.randn(n, Hq, 2 * D, D, generator=g,
                                                 dtype=torch.float64)).to(acc)
    if rotary_P is not None:
        kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(rotary_P, D, acc)
    return kw


def _doc_kw(kw, b):
    """The keywords of document b alone (its own H0 row when H0 is per document)."""
    h0 = kw.get("initial_state")
    if h0 is None or h0.shape[0] == 1:
        return kw
    return dict(kw, initial_state=h0[b:b + 1])


def _grad_leaves(q, k, v, kw):
    leaves = [q, k, v] + [kw[n] for n in ("initial_state", "swa_norm_weight", "rla_norm_weight")
                          if n in kw]
    return [t.detach().clone().requires_grad_(True) for t in leaves]


def _with_leaves(leaves, kw):
    q, k, v, *rest = leaves
    kw = dict(kw)
    for n in ("initial_state", "swa_norm_weight", "rla_norm_weight"):
        if n in kw:
            kw[n] = rest.pop(0)
    return q, k, v, kw


def _forward_loop(q, k, v, cu, kw, fn=rattention_ext.forward):
    """The oracle: the dense API on each document alone, concatenated."""
    offs = cu.tolist()
    outs = []
    for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
        if e > s:
            outs.append(fn(q[None, s:e], k[None, s:e], v[None, s:e], window_size=W,
                           **_doc_kw(kw, b))[0])
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _grads(out, leaves, seed=7):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, leaves, go, allow_unused=True)


def _assert_close(a, b, tol, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert not a.isnan().any(), what
    if b.numel() == 0 or b.norm() == 0:
        assert a.numel() == 0 or a.abs().max().item() == 0.0, what
    else:
        assert rel_err(a, b) < tol, f"{what}: rel err {rel_err(a, b):.3g}"


# ---- forward: packed == loop over documents ---------------------------------------------
@pytest.mark.parametrize("lengths", MIXES, ids=lambda m: "-".join(map(str, m)))
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 1)])
@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_forward_packed_matches_document_loop_f64(lengths, Hq, Hkv, fm):
    D = 16
    q, k, v, cu = _packed(lengths, Hq, Hkv, D)
    kw = dict(_extras(len(lengths), Hq, D, torch.float64, h0="per_doc", rotary_P=max(lengths)),
              feature_map=fm)
    leaves = _grad_leaves(q, k, v, kw)
    qa, ka, va, kwa = _with_leaves(leaves, kw)
    out = rattention_ext.forward(qa, ka, va, window_size=W, cu_seqlens=cu, **kwa)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = _grads(out, leaves)

    loop_leaves = _grad_leaves(q, k, v, kw)
    qb, kb, vb, kwb = _with_leaves(loop_leaves, kw)
    ref = _forward_loop(qb, kb, vb, cu, kwb)
    ref_grads = _grads(ref, loop_leaves)
    _assert_close(out, ref, F64_TOL, "output")
    for name, a, b in zip(("q", "k", "v", "H0", "g_swa", "g_rla"), grads, ref_grads):
        _assert_close(a, b, F64_TOL, f"grad {name}")
    # and the float64 reference's own packed form
    _assert_close(out, R.forward(q, k, v, window_size=W, cu_seqlens=cu, **kw), F64_TOL,
                  "output vs reference")


@pytest.mark.parametrize("h0", [None, "shared", "per_doc"])
@pytest.mark.parametrize("rotary", [False, True])
def test_forward_packed_h0_and_rotary_f64(h0, rotary):
    lengths, Hq, Hkv, D = [W, 0, 33, 1, W + 1, 66], 4, 2, 8
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=3)
    kw = _extras(len(lengths), Hq, D, torch.float64, h0=h0,
                 rotary_P=max(lengths) if rotary else None)
    leaves = _grad_leaves(q, k, v, kw)
    qa, ka, va, kwa = _with_leaves(leaves, kw)
    out = rattention_ext.forward(qa, ka, va, window_size=W, cu_seqlens=cu,
                                 max_seqlen=max(lengths), **kwa)
    grads = _grads(out, leaves)
    loop_leaves = _grad_leaves(q, k, v, kw)
    qb, kb, vb, kwb = _with_leaves(loop_leaves, kw)
    ref = _forward_loop(qb, kb, vb, cu, kwb)
    _assert_close(out, ref, F64_TOL, "output")
    for name, a, b in zip(("q", "k", "v", "H0|g", "g", "g"), grads, _grads(ref, loop_leaves)):
        _assert_close(a, b, F64_TOL, f"grad {name}")


def test_forward_packed_default_keywords():
    """No optional keyword at all (default norm weights, no H0, no rotary), values and grads."""
    lengths, Hq, Hkv, D = [3, 0, W + 1, 70], 4, 2, 16
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=13)
    leaves = _grad_leaves(q, k, v, {})
    out = rattention_ext.forward(*leaves, window_size=W, cu_seqlens=cu)
    loop_leaves = _grad_leaves(q, k, v, {})
    ref = _forward_loop(*loop_leaves, cu, {})
    _assert_close(out, ref, F64_TOL, "output")
    _assert_close(out, R.forward(q, k, v, window_size=W, cu_seqlens=cu), F64_TOL, "reference")
    for a, b in zip(_grads(out, leaves), _grads(ref, loop_leaves)):
        _assert_close(a, b, F64_TOL, "grad")


def test_rotary_restarts_in_every_document():
    """Two identical documents packed together give identical outputs (positions restart)."""
    Hq, Hkv, D, L = 4, 2, 8, 40
    q, k, v, _ = _packed([L], Hq, Hkv, D, seed=4)
    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
    kw = _extras(2, Hq, D, torch.float64, h0="shared", rotary_P=L)
    out = rattention_ext.forward(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]),
                                 window_size=W, cu_seqlens=cu, **kw)
    assert (out[:L] - out[L:]).abs().max().item() < F64_TOL


@pytest.mark.parametrize("seed", range(4))
def test_random_mixes_match_document_loop_f64(seed):
    """Random mixes (lengths 0 .. 150, w drawn too) against the loop, with every gradient."""
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    lengths = torch.randint(0, 150, (n,), generator=g).tolist()
    w = int(torch.randint(0, 40, (1,), generator=g))
    Hq, Hkv = [(4, 4), (8, 1), (4, 2), (2, 1)][seed]
    D = 16
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=seed)
    kw = _extras(n, Hq, D, torch.float64, h0="per_doc", rotary_P=max(max(lengths), 1))
    leaves = _grad_leaves(q, k, v, kw)
    qa, ka, va, kwa = _with_leaves(leaves, kw)
    out = rattention_ext.forward(qa, ka, va, window_size=w, cu_seqlens=cu, **kwa)
    loop_leaves = _grad_leaves(q, k, v, kw)
    qb, kb, vb, kwb = _with_leaves(loop_leaves, kw)
    offs = cu.tolist()
    ref = torch.cat([rattention_ext.forward(qb[None, s:e], kb[None, s:e], vb[None, s:e],
                                            window_size=w, **_doc_kw(kwb, b))[0]
                     for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])) if e > s]
                    or [q.new_empty(q.shape)])
    _assert_close(out, ref, F64_TOL, f"output lengths={lengths} w={w}")
    for a, b in zip(_grads(out, leaves), _grads(ref, loop_leaves)):
        _assert_close(a, b, F64_TOL, f"grad lengths={lengths} w={w}")


def test_forward_packed_float32():
    lengths, Hq, Hkv, D = [0, 1, W, W + 1, 97, 5], 8, 2, 32
    q, k, v, cu = _packed(lengths, Hq, Hkv, D)
    kw = _extras(len(lengths), Hq, D, torch.float64, h0="per_doc", rotary_P=97)
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    out = rattention_ext.forward(q.float(), k.float(), v.float(), window_size=W, cu_seqlens=cu,
                                 **kw32)
    assert out.dtype == torch.float32
    ref = R.forward(q, k, v, window_size=W, cu_seqlens=cu, **kw)
    assert rel_err(out, ref) < F32_TOL
    leaves = _grad_leaves(q.float(), k.float(), v.float(), kw32)
    qa, ka, va, kwa = _with_leaves(leaves, kw32)
    grads = _grads(rattention_ext.forward(qa, ka, va, window_size=W, cu_seqlens=cu, **kwa), leaves)
    ref_leaves = _grad_leaves(q, k, v, kw)
    qb, kb, vb, kwb = _with_leaves(ref_leaves, kw)
    ref_grads = _grads(R.forward(qb, kb, vb, window_size=W, cu_seqlens=cu, **kwb), ref_leaves)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < F32_TOL


# ---- the branches alone: lse and final states -------------------------------------------
@pytest.mark.parametrize("lengths", MIXES[:3], ids=lambda m: "-".join(map(str, m)))
@pytest.mark.parametrize("rotary", [False, True])
def test_swa_packed_with_lse(lengths, rotary):
    Hq, Hkv, D = 4, 1, 16
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=5)
    kw = {}
    if rotary:
        kw["rotary_cos"], kw["rotary_sin"] = rotary_tables(max(lengths), D)
    leaves = _grad_leaves(q, k, v, {})
    o, lse = rattention_ext.sliding_window_attention(*leaves, window_size=W, cu_seqlens=cu,
                                                     return_lse=True, **kw)
    assert o.shape == q.shape and lse.shape == (Hq, q.shape[0])
    ro, rlse = R.sliding_window_attention(q, k, v, window_size=W, cu_seqlens=cu,
                                          return_lse=True, **kw)
    _assert_close(o, ro, F64_TOL, "o")
    _assert_close(lse, rlse, F64_TOL, "lse")
    # gradients through both outputs, against the per-document loop on the dense API
    loop_leaves = _grad_leaves(q, k, v, {})
    offs = cu.tolist()
    lo, ll = [], []
    for s, e in zip(offs[:-1], offs[1:]):
        if e > s:
            a, b = rattention_ext.sliding_window_attention(
                *(t[None, s:e] for t in loop_leaves), window_size=W, return_lse=True, **kw)
            lo.append(a[0])
            ll.append(b[0])
    lo, ll = torch.cat(lo), torch.cat(ll, dim=-1)
    g = torch.Generator().manual_seed(2)
    go, gl = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(lse.shape, generator=g,
                                                                           dtype=lse.dtype)
    ga = torch.autograd.grad((o, lse), leaves, (go, gl))
    gb = torch.autograd.grad((lo, ll), loop_leaves, (go, gl))
    for a, b in zip(ga, gb):
        _assert_close(a, b, F64_TOL, "grad")


@pytest.mark.parametrize("lengths", MIXES, ids=lambda m: "-".join(map(str, m)))
@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_rla_packed_final_states(lengths, fm):
    Hq, Hkv, D = 8, 2, 16
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=6)
    kw = dict(_extras(len(lengths), Hq, D, torch.float64, h0="per_doc"), feature_map=fm)
    kw = {n: kw[n] for n in ("initial_state", "feature_map")}
    leaves = _grad_leaves(q, k, v, kw)
    qa, ka, va, kwa = _with_leaves(leaves, kw)
    o, st = rattention_ext.residual_linear_attention(qa, ka, va, window_size=W, cu_seqlens=cu,
                                                     return_final_state=True, **kwa)
    assert o.shape == q.shape and st.shape == (len(lengths), Hkv, 2 * D, D)
    ro, rst = R.residual_linear_attention(q, k, v, window_size=W, cu_seqlens=cu,
                                          return_final_state=True, **kw)
    _assert_close(o, ro, F64_TOL, "o")
    _assert_close(st, rst, F64_TOL, "final state")
    for b, n in enumerate(lengths):  # a document of at most w + 1 tokens has no state
        if n <= W + 1:
            assert st[b].abs().max().item() == 0.0
    # gradients through the output and the final states, against the dense API per document
    loop_leaves = _grad_leaves(q, k, v, kw)
    qb, kb, vb, kwb = _with_leaves(loop_leaves, kw)
    offs = cu.tolist()
    lo, ls = [], []
    for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
        if e > s:
            a, c = rattention_ext.residual_linear_attention(
                qb[None, s:e], kb[None, s:e], vb[None, s:e], window_size=W,
                return_final_state=True, **_doc_kw(kwb, b))
            lo.append(a[0])
            ls.append(c)
        else:
            ls.append(torch.zeros(1, Hkv, 2 * D, D, dtype=torch.float64))
    lo, ls = torch.cat(lo), torch.cat(ls)
    g = torch.Generator().manual_seed(3)
    go, gs = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(st.shape, generator=g,
                                                                           dtype=st.dtype)
    ga = torch.autograd.grad((o, st), leaves, (go, gs), allow_unused=True)
    gb = torch.autograd.grad((lo, ls), loop_leaves, (go, gs), allow_unused=True)
    for name, a, b in zip(("q", "k", "v", "H0"), ga, gb):
        _assert_close(a, b, F64_TOL, f"grad {name}")


def test_jax_reference_packed_matches_torch_reference():
    pytest.importorskip("jax")
    from rattention_ext import jax_reference as J
    import numpy as np

    lengths, Hq, Hkv, D = [7, 0, W + 1, 30], 4, 2, 8
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=8)
    kw = _extras(len(lengths), Hq, D, torch.float64, h0="per_doc", rotary_P=30)
    out = np.asarray(J.forward(q, k, v, window_size=W, cu_seqlens=cu, **kw))
    ref = R.forward(q, k, v, window_size=W, cu_seqlens=cu, **kw)
    assert rel_err(torch.from_numpy(out.copy()), ref) < F64_TOL
    o, st = J.residual_linear_attention(q, k, v, window_size=W, cu_seqlens=cu,
                                        initial_state=kw["initial_state"], return_final_state=True)
    ro, rst = R.residual_linear_attention(q, k, v, window_size=W, cu_seqlens=cu,
                                          initial_state=kw["initial_state"], return_final_state=True)
    assert rel_err(torch.from_numpy(np.array(o)), ro) < F64_TOL
    assert rel_err(torch.from_numpy(np.array(st)), rst) < F64_TOL
    o, lse = J.sliding_window_attention(q, k, v, window_size=W, cu_seqlens=cu, return_lse=True)
    ro, rlse = R.sliding_window_attention(q, k, v, window_size=W, cu_seqlens=cu, return_lse=True)
    assert rel_err(torch.from_numpy(np.array(o)), ro) < F64_TOL
    assert rel_err(torch.from_numpy(np.array(lse)), rlse) < F64_TOL


# ---- bad cu_seqlens ---------------------------------------------------------------------
_BAD_CU = [
    ("dtype", lambda cu: cu.long(), "int32"),
    ("2-d", lambda cu: cu[None], "1-d"),
    ("device", lambda cu: cu.to("meta"), "device"),
    ("decreasing", lambda cu: torch.tensor([0, 5, 3, 9], dtype=torch.int32), "non-decreasing"),
    ("last != total", lambda cu: torch.tensor([0, 4, 8], dtype=torch.int32), "total"),
    ("first != 0", lambda cu: torch.tensor([1, 4, 9], dtype=torch.int32), "cu_seqlens\\[0\\]"),
    ("no document", lambda cu: cu[:1], "N >= 1"),
    ("not a tensor", lambda cu: [0, 4, 9], "int32 tensor"),
]


@pytest.mark.parametrize("case", _BAD_CU, ids=[c[0] for c in _BAD_CU])
@pytest.mark.parametrize("fn", ["forward", "sliding_window_attention",
                                "residual_linear_attention", "reference", "prefill"])
def test_bad_cu_seqlens_named(case, fn):
    _, make, msg = case
    q, k, v, cu = _packed([4, 5], 2, 1, 8)
    bad = make(cu)
    with pytest.raises((ValueError, TypeError), match=msg) as e:
        if fn == "reference":
            R.forward(q, k, v, window_size=2, cu_seqlens=bad)
        elif fn == "prefill":
            prefill(q, k, v, RAttentionCache.empty(2, 2, 1, 8, dtype=torch.float64),
                    cu_seqlens=bad)
        else:
            getattr(rattention_ext, fn)(q, k, v, window_size=2, cu_seqlens=bad)
    assert "cu_seqlens" in str(e.value)


def test_bad_packed_shapes_and_state():
    q, k, v, cu = _packed([4, 5], 2, 1, 8)
    with pytest.raises(ValueError, match=r"q must be \[total, Hq, D\]"):
        rattention_ext.forward(q[None], k[None], v[None], window_size=2, cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state must be \\[N or 1"):
        rattention_ext.forward(q, k, v, window_size=2, cu_seqlens=cu,
                               initial_state=torch.zeros(3, 2, 16, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_seqlen"):
        rattention_ext.forward(q, k, v, window_size=2, cu_seqlens=cu, max_seqlen=4)
    with pytest.raises(ValueError, match="seq_lens.*cu_seqlens"):
        prefill(q, k, v, RAttentionCache.empty(2, 2, 1, 8, dtype=torch.float64), cu_seqlens=cu,
                seq_lens=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="cache batch size 3 .* 2 sequences of cu_seqlens"):
        prefill(q, k, v, RAttentionCache.empty(3, 2, 1, 8, dtype=torch.float64), cu_seqlens=cu)


# ---- prefill ----------------------------------------------------------------------------
def _decoded_cache(q, k, v, cu, w, kw):
    """Each sequence's cache built by decode_step alone (the SPEC's definition), stacked."""
    offs = cu.tolist()
    parts, outs = [], []
    for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
        c = RAttentionCache.empty(1, w, k.shape[1], k.shape[2], dtype=q.dtype)
        for t in range(s, e):
            outs.append(decode_step(q[None, t:t + 1], k[None, t:t + 1], v[None, t:t + 1], c,
                                    **_doc_kw(kw, b))[0])
        parts.append(c)
    cache = RAttentionCache(*(torch.cat([getattr(c, f) for c in parts])
                              for f in ("keys", "values", "state", "positions")))
    return cache, (torch.cat(outs) if outs else q.new_empty(q.shape))


@pytest.mark.parametrize("lengths,w", [([5, 0, 1, 17], 4), ([0, 6, 7, 1, 70], 6),
                                       ([30, 3], 0), ([2, 9], 20)])
@pytest.mark.parametrize("h0", [None, "per_doc"])
def test_prefill_packed_equals_decode_steps_and_per_sequence_prefill(lengths, w, h0):
    Hq, Hkv, D = 4, 2, 8
    q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=9)
    kw = _extras(len(lengths), Hq, D, torch.float64, h0=h0, rotary_P=max(lengths) + 4)
    cache = RAttentionCache.empty(len(lengths), w, Hkv, D, dtype=torch.float64)
    out = prefill(q, k, v, cache, cu_seqlens=cu, **kw)
    dec_cache, dec_out = _decoded_cache(q, k, v, cu, w, kw)
    assert (out - dec_out).abs().max().item() < F64_TOL if q.shape[0] else True
    assert torch.equal(cache.positions, dec_cache.positions)
    assert torch.equal(cache.keys, dec_cache.keys) and torch.equal(cache.values, dec_cache.values)
    assert (cache.state - dec_cache.state).abs().max().item() < F64_TOL
    # == a separate prefill of each sequence
    offs = cu.tolist()
    for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
        c = RAttentionCache.empty(1, w, Hkv, D, dtype=torch.float64)
        if e > s:
            o = prefill(q[None, s:e], k[None, s:e], v[None, s:e], c, **_doc_kw(kw, b))
            assert (o[0] - out[s:e]).abs().max().item() < F64_TOL
        assert torch.equal(c.keys[0], cache.keys[b]) and torch.equal(c.positions[0],
                                                                     cache.positions[b])
        assert (c.state[0] - cache.state[b]).abs().max().item() < F64_TOL
    # decoding continues every sequence as its own decode steps would
    nq, nk, nv, _ = _packed([1] * len(lengths), Hq, Hkv, D, seed=10)
    o1 = decode_step(nq[:, None], nk[:, None], nv[:, None], cache, **kw)
    o2 = decode_step(nq[:, None], nk[:, None], nv[:, None], dec_cache, **kw)
    assert (o1 - o2).abs().max().item() < F64_TOL


# ---- the layer --------------------------------------------------------------------------
def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = RAttention(32, 4, 2, W, head_dim=8, dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(1 + 0.3 * r if "norm_weight" in name else
                    0.3 * r if name == "initial_state" else r / math.sqrt(p.shape[-1]))
    return layer


@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_layer_packed_equals_layer_per_document(fm):
    lengths = [W + 1, 0, 3, 70, 1]
    layer = _layer(feature_map=fm, learned_init_state=True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(lengths), 32, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    y = layer(x[None], cu_seqlens=cu)  # [1, total, d], the Hugging Face packed form
    assert y.shape == (1, x.shape[0], 32)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    params = [p for p in layer.parameters()]
    ga = torch.autograd.grad(y, [x] + params, gy)
    offs = cu.tolist()
    ref = torch.cat([layer(x[None, s:e])[0] for s, e in zip(offs[:-1], offs[1:]) if e > s])
    gb = torch.autograd.grad(ref, [x] + params, gy[0])
    _assert_close(y[0], ref, F64_TOL, "layer output")
    for a, b in zip(ga, gb):
        _assert_close(a, b, F64_TOL, "layer grad")
    # [total, d] input and max_seqlen give the same
    y2 = layer(x, cu_seqlens=cu, max_seqlen=max(lengths))
    assert y2.shape == x.shape and (y2 - y[0]).abs().max().item() < F64_TOL


def test_layer_packed_prefill_then_step():
    lengths = [5, 12, 1]
    layer = _layer(learned_init_state=True)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(sum(lengths), 32, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 5, 17, 18], dtype=torch.int32)
    cache = layer.new_cache(3)
    y = layer.prefill(x, cache, cu_seqlens=cu)
    assert (y - layer(x, cu_seqlens=cu)).abs().max().item() < F64_TOL
    nxt = torch.randn(3, 1, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():  # decoding is inference only
        step = layer.step(nxt, cache)
    offs = cu.tolist()
    for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
        full = layer(torch.cat([x[s:e], nxt[b]])[None])[0, -1]
        assert (step[b, 0] - full).abs().max().item() < F64_TOL


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu = rattention_ext.cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10]
    assert rattention_ext.cu_seqlens_from_position_ids(pos[0]).tolist() == [0, 3, 5, 6, 10]
    with pytest.raises(ValueError, match="position_ids\\[0\\] must be 0"):
        rattention_ext.cu_seqlens_from_position_ids(torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="count up by 1"):
        rattention_ext.cu_seqlens_from_position_ids(torch.tensor([0, 1, 3, 0]))
    # the layer on a position_ids-packed batch equals the layer per document
    layer = _layer()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    y = layer(x, cu_seqlens=cu)
    for s, e in ((0, 3), (3, 5), (5, 6), (6, 10)):
        assert (y[0, s:e] - layer(x[:, s:e])[0]).abs().max().item() < F64_TOL


# ---- torch.compile ----------------------------------------------------------------------
def test_compile_fullgraph_no_recompile_when_lengths_change():
    """cu_seqlens is a tensor input of the compiled graph: one compilation (forward and
    backward) serves every mix of the same total and document count."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    Hq, Hkv, D, total = 4, 2, 16, 80
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    kw = _extras(4, Hq, D, torch.float64, h0="per_doc", rotary_P=total)

    def step(q, k, v, cu):
        return rattention_ext.forward(q, k, v, window_size=W, cu_seqlens=cu, **kw)

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
    for lengths in ([5, 0, 40, 35], [1, 1, W + 1, 80 - W - 3], [20, 20, 20, 20], [0, 0, 0, 80]):
        q, k, v, cu = _packed(lengths, Hq, Hkv, D, seed=sum(lengths[:2]))
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = compiled(*leaves, cu)
        grads = _grads(out, leaves)
        ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref = _forward_loop(*ref_leaves, cu, kw)
        _assert_close(out, ref, F64_TOL, f"compiled output {lengths}")
        for a, b in zip(grads, _grads(ref, ref_leaves)):
            _assert_close(a, b, F64_TOL, f"compiled grad {lengths}")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"
