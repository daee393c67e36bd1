"""The NaN / Inf rule (SPEC.md): a non-finite input makes exactly the outputs (and gradients)
that depend on it non-finite; outputs it cannot influence (earlier tokens, tokens outside
the window, other documents, padding) are unchanged, bit for bit where the kernel path is
the same. Kernels (SWA fwd/bwd, RLA fwd/bwd, decode), the float64 reference and the padded
prefill all follow it."""
import math

import pytest
import torch

import rattention_ext
from helpers import make_qkv, nan_at, unchanged_positions
from rattention_ext import RAttentionCache, reference as ref

NAN, INF = float("nan"), float("inf")
# (T, w): one tile, window edges inside a tile, several tiles, w >= T
SHAPES = [(9, 3), (70, 5), (150, 64), (130, 200)]
DTYPES = [torch.float32, torch.float64]


def _fn(name, w, **kw):
    if name == "forward":
        return lambda q, k, v: rattention_ext.forward(q, k, v, window_size=w, **kw)
    if name == "swa":
        return lambda q, k, v: rattention_ext.sliding_window_attention(q, k, v, window_size=w,
                                                                       **kw)
    if name == "rla":
        return lambda q, k, v: rattention_ext.residual_linear_attention(q, k, v, window_size=w,
                                                                        **kw)
    if name == "ref_forward":
        return lambda q, k, v: ref.forward(q, k, v, window_size=w, **kw)
    raise ValueError(name)


def _fwd_bwd(fn, q, k, v, go):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * go).sum(), leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _maxdiff(a, b):
    """max |a - b| relative to max(1, max |b|) (0 for empty selections)."""
    if not a.numel():
        return 0.0
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.mark.parametrize("fm", ["softmax", "relu"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("name", ["forward", "swa", "rla", "ref_forward"])
@pytest.mark.parametrize("T,w", SHAPES)
def test_nonfinite_token_reaches_only_what_depends_on_it(T, w, name, which, value, fm):
    if name == "swa" and fm == "relu":
        pytest.skip("the feature map does not apply to SWA")
    dtype = torch.float64 if name == "ref_forward" else torch.float32
    q, k, v = make_qkv(1, T, 4, 2, 8, dtype, seed=T + w)
    s = T // 2 + 1  # the poisoned token
    x = dict(q=q, k=k, v=v)
    x[which] = nan_at(x[which], (0, s, 0 if which == "q" else 1, 3), value)
    kw = {} if name == "swa" else dict(feature_map=fm)
    fn = _fn(name, w, **kw)
    go = torch.randn(1, T, 4, 8, dtype=dtype)
    out0, g0 = _fwd_bwd(fn, q, k, v, go)
    out1, g1 = _fwd_bwd(fn, x["q"], x["k"], x["v"], go)
    rows, q_rows, kv_rows = unchanged_positions(name.replace("ref_", ""), T, w, s, which)
    # the kernels: unchanged bit for bit; the reference: to rounding (its exact masked
    # product is another summation order than its matmul)
    same = torch.equal if name != "ref_forward" else (lambda a, b: _maxdiff(a, b) < 1e-12)
    assert torch.isfinite(out1[:, rows]).all()
    assert same(out1[:, rows], out0[:, rows])
    if value != value and (~rows).any():  # NaN: the dependent rows do see it
        assert not torch.isfinite(out1[:, ~rows]).all()
    for g, g_ok, keep in zip(g1, g0, (q_rows, kv_rows, kv_rows)):
        assert torch.isfinite(g[:, keep]).all()
        assert same(g[:, keep], g_ok[:, keep])


@pytest.mark.parametrize("name", ["forward", "swa", "rla"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_padding_keeps_real_tokens_bit_identical(name, dtype):
    """Right padding filled with NaN (e.g. torch.empty) changes nothing for the real tokens'
    outputs, bit for bit, nor any gradient of the other sequence."""
    T, L, w = 100, 61, 7
    q, k, v = make_qkv(2, T, 4, 2, 8, dtype, seed=3)
    qn, kn, vn = [x.clone() for x in (q, k, v)]
    for x in (qn, kn, vn):
        x[0, L:] = NAN
    fn = _fn(name, w)
    go = torch.randn(2, T, 4, 8, dtype=dtype)
    out0, g0 = _fwd_bwd(fn, q, k, v, go)
    out1, g1 = _fwd_bwd(fn, qn, kn, vn, go)
    assert torch.isfinite(out1[0, :L]).all()
    assert torch.equal(out1[0, :L], out0[0, :L])
    assert torch.equal(out1[1], out0[1])
    for a, b in zip(g0, g1):
        assert torch.equal(b[1], a[1])


def test_prefill_with_nan_padding_then_decode():
    B, T, w = 2, 40, 5
    lens = torch.tensor([23, 40])
    q, k, v = make_qkv(B, T + 3, 4, 2, 8, torch.float32, seed=4)
    qp, kp, vp = [x[:, :T].clone() for x in (q, k, v)]
    for x in (qp, kp, vp):
        x[0, 23:] = NAN  # torch.empty-like garbage in the padding
    cache = RAttentionCache.empty(B, w, 2, 8, dtype=torch.float32)
    out = rattention_ext.prefill(qp, kp, vp, cache, seq_lens=lens)
    assert torch.isfinite(out[0, :23]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(cache.state).all() and torch.isfinite(cache.keys).all()
    ar = torch.arange(B)
    for i in range(3):
        idx = lens + i
        idx = idx.clamp(max=T + 2)
        with torch.no_grad():
            o = rattention_ext.decode_step(q[ar, idx][:, None], k[ar, idx][:, None],
                                           v[ar, idx][:, None], cache)
        full = rattention_ext.forward(q[:1, :24 + i], k[:1, :24 + i], v[:1, :24 + i],
                                      window_size=w)
        assert torch.isfinite(o).all()
        assert (o[0, 0] - full[0, 23 + i]).abs().max() < 1e-5


@pytest.mark.parametrize("how", ["q", "k", "scale"])
@pytest.mark.parametrize("name", ["swa_kernel", "swa_ref", "decode"])
def test_all_nan_scores_give_nan_not_zero(name, how):
    """A query row whose visible scores are all NaN has a NaN softmax: output and lse NaN."""
    T, w = 12, 3
    dtype = torch.float64
    q, k, v = make_qkv(1, T, 2, 1, 8, dtype, seed=5)
    t = 6
    if how == "q":
        q = nan_at(q, (0, t, 0, 2))
    elif how == "k":
        for s in range(t - w, t + 1):
            k = nan_at(k, (0, s, 0, 1))
    if how == "scale":
        pytest.skip("a NaN softmax_scale is refused at the boundary (test_validation)")
    if name == "decode":
        cache = RAttentionCache.empty(1, w, 1, 8, dtype=dtype)
        outs = []
        with torch.no_grad():
            for i in range(T):
                outs.append(rattention_ext.decode_step(
                    q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache))
        o = torch.cat(outs, 1)
        assert torch.isnan(o[0, t, 0]).all()
        assert torch.isfinite(o[0, :t - w if how == "k" else t]).all()
        return
    if name == "swa_kernel":
        o, lse = rattention_ext.sliding_window_attention(q, k, v, window_size=w, return_lse=True)
    else:
        o, lse = ref.sliding_window_attention(q, k, v, window_size=w, return_lse=True)
    assert torch.isnan(o[0, t, 0]).all() and torch.isnan(lse[0, 0, t])
    first = t - w if how == "k" else t  # rows before the poisoned keys never see them
    assert torch.isfinite(o[0, :first]).all() and torch.isfinite(lse[0, :, :first]).all()
    if how == "q":
        assert torch.isfinite(o[0, t, 1]).all()  # the other head of that token is clean


def test_nan_key_in_first_tile_then_finite_tiles_stays_nan():
    """The running max is -inf while only a NaN score has been seen; later finite tiles must
    not wash the NaN out (the NaN stays sticky through the online softmax)."""
    T, w = 140, 70
    q, k, v = make_qkv(1, T, 2, 1, 8, torch.float32, seed=6)
    k = nan_at(k, (0, 63, 0, 0))  # last key of tile 0: the only tile-0 key row 133 sees
    o = rattention_ext.sliding_window_attention(q, k, v, window_size=w)
    r = ref.sliding_window_attention(q.double(), k.double(), v.double(), window_size=w)
    t = torch.arange(T)
    sees = (t >= 63) & (t <= 63 + w)
    assert torch.isnan(o[0, sees]).all() and torch.isnan(r[0, sees]).all()
    assert torch.isfinite(o[0, ~sees]).all()
    assert (o[0, ~sees].double() - r[0, ~sees]).abs().max() < 1e-5


def test_relu_feature_map_maps_nan_to_nan():
    q, k, v = make_qkv(1, 8, 2, 1, 4, torch.float64, seed=7)
    q = nan_at(q, (0, 5, 0, 1))
    o = rattention_ext.residual_linear_attention(q, k, v, window_size=1, feature_map="relu")
    r = ref.residual_linear_attention(q, k, v, window_size=1, feature_map="relu")
    assert torch.isnan(o[0, 5, 0]).all() and torch.isnan(r[0, 5, 0]).all()
    mask = torch.ones_like(o, dtype=torch.bool)
    mask[0, 5, 0] = False
    assert torch.isfinite(o[mask]).all()
    assert (o[mask] - r[mask]).abs().max() < 1e-12
    phi = ref.feature_map(torch.tensor([[math.nan, 1.0]]), "relu")
    assert torch.isnan(phi[0, 0]) and torch.isnan(phi[0, 2])


@pytest.mark.parametrize("fm", ["softmax", "relu"])
def test_decode_and_forward_agree_on_nan(fm):
    T, w = 20, 4
    q, k, v = make_qkv(1, T, 2, 1, 8, torch.float64, seed=8)
    v = nan_at(v, (0, 9, 0, 0))
    full = rattention_ext.forward(q, k, v, window_size=w, feature_map=fm)
    cache = RAttentionCache.empty(1, w, 1, 8, dtype=torch.float64)
    with torch.no_grad():
        dec = torch.cat([rattention_ext.decode_step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                                                    cache, feature_map=fm)
                         for i in range(T)], 1)
    assert torch.equal(torch.isnan(full), torch.isnan(dec))
    fin = torch.isfinite(full)
    assert (full[fin] - dec[fin]).abs().max() < 1e-10
    assert torch.isfinite(full[0, :9]).all() and torch.isnan(full[0, 9:]).all()


def test_reference_gradients_follow_the_rule():
    T, w = 30, 4
    q, k, v = make_qkv(1, T, 2, 1, 4, torch.float64, seed=9)
    k = nan_at(k, (0, 20, 0, 0))
    go = torch.randn(1, T, 2, 4, dtype=torch.float64)
    out, grads = _fwd_bwd(_fn("ref_forward", w), q, k, v, go)
    out_k, grads_k = _fwd_bwd(_fn("forward", w), q, k, v, go)
    assert torch.isfinite(out[0, :20]).all()
    assert torch.equal(torch.isfinite(out), torch.isfinite(out_k))
    for g, gk in zip(grads, grads_k):
        assert torch.equal(torch.isfinite(g), torch.isfinite(gk))
        fin = torch.isfinite(g)
        assert _maxdiff(gk[fin], g[fin]) < 1e-10


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("name", ["forward", "swa", "rla"])
def test_nan_in_one_packed_document_leaves_the_others_unchanged(name, which):
    """Packed batch: a non-finite token of document 1 reaches only document 1's rows at or
    after it (within its window for SWA); documents 0 and 2 and every gradient of theirs are
    bit-identical to the clean run, and the poisoned document's earlier rows stay finite."""
    lens = [70, 90, 0, 33]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total, w = int(cu[-1]), 6
    g = torch.Generator().manual_seed(11)
    q = torch.randn(total, 4, 8, generator=g)
    k = torch.randn(total, 2, 8, generator=g)
    v = torch.randn(total, 2, 8, generator=g)
    go = torch.randn(total, 4, 8, generator=g)
    s = int(cu[1]) + 40  # token 40 of document 1
    x = dict(q=q.clone(), k=k.clone(), v=v.clone())
    x[which][s, 1 if which != "q" else 0, 2] = NAN
    fn = _fn(name, w, cu_seqlens=cu)
    out0, g0 = _fwd_bwd(fn, q, k, v, go)
    out1, g1 = _fwd_bwd(fn, x["q"], x["k"], x["v"], go)
    others = torch.ones(total, dtype=torch.bool)
    others[int(cu[1]):int(cu[2])] = False
    assert torch.equal(out1[others], out0[others])
    for a, b in zip(g0, g1):
        assert torch.equal(b[others], a[others])
    earlier = slice(int(cu[1]), s)  # rows of document 1 before the poisoned token
    assert torch.isfinite(out1[earlier]).all()
    assert torch.equal(out1[earlier], out0[earlier])
    if name != "rla":  # SWA sees token s at row s itself (RLA only w + 1 rows later)
        assert not torch.isfinite(out1[s]).all()


@pytest.mark.parametrize("which", ["k", "v"])
def test_nan_in_halo_reaches_only_rows_that_see_it(which):
    """A continued sequence (k/v longer than q: a halo of w + 1 rows, then the carried state):
    a NaN in the halo row reaches only the query rows whose window covers it."""
    B, T, Hq, Hkv, D, w = 1, 20, 2, 1, 8, 4
    q, k, v = make_qkv(B, T, Hq, Hkv, D, torch.float64, seed=12)
    kk, vv = make_qkv(B, w + 1, Hq, Hkv, D, torch.float64, seed=13)[1:]
    k_full, v_full = torch.cat([kk, k], 1), torch.cat([vv, v], 1)
    x = dict(k=k_full.clone(), v=v_full.clone())
    x[which] = nan_at(x[which], (0, w, 0, 1))  # the halo row just before q's first row
    swa = rattention_ext.continuation.swa_continued
    out0 = swa(q, k_full, v_full, halo=w + 1, window_size=w)
    out1 = swa(q, x["k"], x["v"], halo=w + 1, window_size=w)
    sees = torch.arange(T) <= w - 1  # query t (position w+1+t) sees positions t+1 .. t+w+1
    assert not torch.isfinite(out1[0, sees]).all(dim=(-1, -2)).any()
    assert torch.equal(out1[0, ~sees], out0[0, ~sees])


@pytest.mark.parametrize("fm", ["softmax", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_later_nonfinite_value_in_the_same_tile_leaves_earlier_rows_bit_identical(fm, dtype):
    """Token 40 of a 64-token tile: rows 0..39 (and, for the other head, every row) are the
    same bits as with a finite value there, in every output of the ops."""
    q, k, v = make_qkv(1, 64, 2, 1, 8, torch.float32, seed=14)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for value in (NAN, INF):
        v2 = nan_at(v, (0, 40, 0, 5), value)
        for fn in (_fn("forward", 5, feature_map=fm), _fn("rla", 5, feature_map=fm),
                   _fn("swa", 5)):
            assert torch.equal(fn(q, k, v2)[0, :40], fn(q, k, v)[0, :40])


def test_thread_count_does_not_change_rla_gradients():
    """With B * Hkv below the thread count the RLA backward takes its segment-parallel path;
    it adds in the same order as the one-task-per-head path, so dq, dk, dv (with both an
    output and a final-state gradient, and with H0) are bit-identical for 1 and 2 threads."""
    n0 = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 300, h, 16, generator=g) for h in (2, 1, 1)]
    h0 = 0.1 * torch.randn(1, 2, 32, 16, generator=g)
    res = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            leaves = [a.clone().requires_grad_() for a in x] + [h0.clone().requires_grad_()]
            o, st = rattention_ext.residual_linear_attention(
                *leaves[:3], window_size=20, initial_state=leaves[3], return_final_state=True)
            res.append(torch.autograd.grad(o.sum() + st.sum(), leaves))
    finally:
        torch.set_num_threads(n0)
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fm", ["softmax", "relu"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_inf_makes_whole_mixed_rows_nonfinite_as_in_the_reference(fm, which):
    """An Inf reaches the mixed output as whole non-finite rows (token, head): every entry of
    rms(x) depends on each x_i. So the kernels, whose RLA state form turns 0 * Inf into NaN,
    and the reference, whose quadratic form keeps the Inf, give the same non-finite entries,
    and the same values everywhere else; so do the decode steps."""
    T, w, s = 70, 5, 40
    q, k, v = make_qkv(1, T, 4, 2, 16, torch.float64, seed=T + s)
    x = dict(q=q, k=k, v=v)
    x[which] = nan_at(x[which], (0, s, 0, 3), INF)
    out = rattention_ext.forward(x["q"], x["k"], x["v"], window_size=w, feature_map=fm)
    want = ref.forward(x["q"], x["k"], x["v"], window_size=w, feature_map=fm)
    bad = ~torch.isfinite(out)
    assert bad[0, s:].any() and not bad[0, :s].any()
    assert torch.equal(bad.any(-1), bad.all(-1))  # whole rows
    assert torch.equal(bad, ~torch.isfinite(want))
    assert _maxdiff(out[~bad], want[~bad]) < 1e-10
    cache = RAttentionCache.empty(1, w, 2, 16, dtype=torch.float64)
    rattention_ext.prefill(x["q"][:, :s - 2], x["k"][:, :s - 2], x["v"][:, :s - 2], cache,
                           feature_map=fm)
    with torch.no_grad():
        for t in range(s - 2, T):
            o = rattention_ext.decode_step(x["q"][:, t:t + 1], x["k"][:, t:t + 1],
                                           x["v"][:, t:t + 1], cache, feature_map=fm)
            assert torch.equal(~torch.isfinite(o[0, 0]), bad[0, t]), t
            fin = ~bad[0, t]
            assert _maxdiff(o[0, 0][fin], out[0, t][fin]) < 1e-10, t
