"""Decoding path: RAttentionCache, prefill, decode_step, cache_bytes (SPEC.md, "Decoding").

Oracles: ``rattention_ext.reference.forward`` in float64 (token-by-token decoding must
reproduce it row by row), and a cache built by ``decode_step`` alone (prefill must leave
exactly that cache). Tests that need the compiled forward kernels (prefill, comparison
with ``rattention_ext.forward``) skip, saying why, while those kernels are placeholders.
"""
from __future__ import annotations

import math

import pytest
import torch

import rattention_ext
from rattention_ext import RAttentionCache, cache_bytes, decode_step, prefill
from rattention_ext import reference as R

F64_TOL = 1e-10


def _forward_kernels_built() -> bool:
    q = torch.randn(1, 2, 1, 4)
    try:
        rattention_ext.forward(q, q, q, window_size=0)
        return True
    except RuntimeError as e:
        if "not built yet" in str(e):
            return False
        raise


needs_forward = pytest.mark.skipif(
    not _forward_kernels_built(),
    reason="needs the CPU SWA and RLA forward kernels (branches cpu-swa, cpu-rla); "
    "they are still placeholders in this build")


def _inputs(B, T, Hq, Hkv, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _rotary(P, D, dtype=torch.float64):
    inv = 1.0 / (10000 ** (torch.arange(0, D // 2, dtype=torch.float64) / (D // 2)))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return ang.cos().to(acc), ang.sin().to(acc)


def _extras(B, Hq, D, dtype, seed=1, h0_batch=None, rotary_P=None):
    """Non-default keywords: random norm weights, optional H0 and rotary tables."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(
        swa_norm_weight=(1 + 0.3 * torch.randn(Hq, D, generator=g, dtype=torch.float64)).to(acc),
        rla_norm_weight=(1 + 0.3 * torch.randn(Hq, D, generator=g, dtype=torch.float64)).to(acc),
        softmax_scale=0.7 / math.sqrt(D),
        norm_eps=1e-6,
    )
    if h0_batch is not None:
        kw["initial_state"] = (0.1 * torch.randn(h0_batch, Hq, 2 * D, D, generator=g,
                                                 dtype=torch.float64)).to(acc)
    if rotary_P is not None:
        kw["rotary_cos"], kw["rotary_sin"] = _rotary(rotary_P, D, dtype)
    return kw


def _decode_all(q, k, v, cache, **kw):
    outs = [decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, **kw)
            for t in range(q.shape[1])]
    return torch.cat(outs, dim=1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- token-by-token decoding equals the float64 reference --------------------------------
@pytest.mark.parametrize("T,w", [(1, 0), (1, 4), (37, 0), (37, 5), (37, 36), (37, 64), (97, 16),
                                 (200, 130)])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 1)])
def test_decode_matches_reference_f64(T, w, Hq, Hkv):
    B, D = 2, 16
    q, k, v = _inputs(B, T, Hq, Hkv, D)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    out = _decode_all(q, k, v, cache)
    ref = R.forward(q, k, v, window_size=w)
    assert not out.isnan().any()
    assert (out - ref).abs().max().item() < F64_TOL
    assert cache.positions.tolist() == [T] * B


@pytest.mark.parametrize("feature_map", ["softmax", "relu"])
@pytest.mark.parametrize("h0_batch", [None, 1, 3])
@pytest.mark.parametrize("rotary", [False, True])
def test_decode_options_match_reference_f64(feature_map, h0_batch, rotary):
    B, T, Hq, Hkv, D, w = 3, 29, 4, 2, 8, 6
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=3)
    kw = _extras(B, Hq, D, torch.float64, h0_batch=h0_batch, rotary_P=T + 5 if rotary else None)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    out = _decode_all(q, k, v, cache, feature_map=feature_map, **kw)
    ref = R.forward(q, k, v, window_size=w, feature_map=feature_map, **kw)
    assert (out - ref).abs().max().item() < F64_TOL


def test_decode_window_ge_length_gives_h0_only():
    """w >= T: nothing leaves the window, the state stays zero and RLA is H0 alone."""
    B, T, Hq, Hkv, D, w = 2, 12, 4, 4, 8, 20
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=4)
    kw = _extras(B, Hq, D, torch.float64, h0_batch=B)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    out = _decode_all(q, k, v, cache, **kw)
    assert (out - R.forward(q, k, v, window_size=w, **kw)).abs().max().item() < F64_TOL
    assert cache.state.abs().max().item() == 0.0


def test_decode_state_and_ring_contents():
    """After T steps: ring slot s % (w+1) holds raw token s for the last w+1 tokens, and the
    state is sum_{s <= T-w-2} phi(k_s) v_s^T (the reference's final state)."""
    B, T, Hq, Hkv, D, w = 2, 23, 4, 2, 8, 4
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=5)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    _decode_all(q, k, v, cache, rotary_cos=_rotary(T, D)[0], rotary_sin=_rotary(T, D)[1])
    for s in range(T - w - 1, T):
        assert torch.equal(cache.keys[:, s % (w + 1)], k[:, s])
        assert torch.equal(cache.values[:, s % (w + 1)], v[:, s])
    _, ref_state = R.residual_linear_attention(q, k, v, window_size=w, return_final_state=True)
    assert (cache.state - ref_state).abs().max().item() < F64_TOL


def test_decode_sequences_at_different_positions():
    """A batch whose sequences sit at different positions (caches decoded separately, then
    stacked) decodes each sequence as if alone."""
    Hq, Hkv, D, w = 4, 2, 8, 5
    lens = [0, 3, 6, 11]  # before / inside / at / past the window
    n_new = 9
    T = max(lens) + n_new
    q, k, v = _inputs(len(lens), T, Hq, Hkv, D, seed=6)
    kw = _extras(len(lens), Hq, D, torch.float64, h0_batch=len(lens), rotary_P=T)
    parts = []
    for b, L in enumerate(lens):
        c = RAttentionCache.empty(1, w, Hkv, D, dtype=torch.float64)
        kwb = dict(kw, initial_state=kw["initial_state"][b:b + 1])
        if L:
            _decode_all(q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], c, **kwb)
        parts.append(c)
    cache = RAttentionCache(*(torch.cat([getattr(c, f) for c in parts])
                              for f in ("keys", "values", "state", "positions")))
    assert cache.positions.tolist() == lens
    for i in range(n_new):
        idx = torch.tensor(lens) + i
        ar = torch.arange(len(lens))
        o = decode_step(q[ar, idx][:, None], k[ar, idx][:, None], v[ar, idx][:, None], cache, **kw)
        for b, L in enumerate(lens):
            kwb = dict(kw, initial_state=kw["initial_state"][b:b + 1])
            ref = R.forward(q[b:b + 1, :L + i + 1], k[b:b + 1, :L + i + 1],
                            v[b:b + 1, :L + i + 1], window_size=w, **kwb)[:, -1]
            assert (o[b, 0] - ref[0]).abs().max().item() < F64_TOL


def test_decode_noncontiguous_inputs():
    B, T, Hq, Hkv, D, w = 2, 15, 4, 2, 8, 3
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=7)
    # Head-major storage: [B, H, T, D] viewed as [B, T, H, D] (strided, rows still contiguous),
    # and a sliced head dim (rows not contiguous).
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    kb = torch.cat([k, torch.randn_like(k)], dim=-1)[..., :D]
    assert not qs.is_contiguous() and kb.stride(-1) == 1 and not kb.is_contiguous()
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    out = _decode_all(qs, kb, v, cache)
    assert (out - R.forward(q, k, v, window_size=w)).abs().max().item() < F64_TOL


# ---- reduced precision -------------------------------------------------------------------
def test_decode_float32():
    B, T, Hq, Hkv, D, w = 2, 97, 8, 1, 32, 16
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=8)
    kw = _extras(B, Hq, D, torch.float64, h0_batch=1, rotary_P=T)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float32)
    kw32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    out = _decode_all(q.float(), k.float(), v.float(), cache, **kw32)
    assert out.dtype == torch.float32 and not out.isnan().any()
    assert cache.state.dtype == torch.float32
    assert _rel(out, R.forward(q, k, v, window_size=w, **kw)) < 1e-5


def test_decode_bfloat16():
    B, T, Hq, Hkv, D, w = 2, 97, 4, 2, 32, 16
    q, k, v = _inputs(B, T, Hq, Hkv, D, dtype=torch.bfloat16, seed=9)
    kw = _extras(B, Hq, D, torch.float32, h0_batch=1, rotary_P=T)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.bfloat16)
    out = _decode_all(q, k, v, cache, **kw)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    kw64 = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    ref = R.forward(q.double(), k.double(), v.double(), window_size=w, **kw64)
    # Plain PyTorch in bf16: the same function with every op's result rounded to bf16.
    plain = _plain_bf16_forward(q, k, v, w, **kw)
    err, err_plain = _rel(out, ref), _rel(plain, ref)
    assert err <= 2 * err_plain + 1e-3, (err, err_plain)


def _plain_bf16_forward(q, k, v, w, *, swa_norm_weight, rla_norm_weight, softmax_scale,
                        norm_eps, initial_state, rotary_cos, rotary_sin):
    bf = torch.bfloat16
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    qr = R.apply_rotary(q, rotary_cos.to(bf), rotary_sin.to(bf))
    kr = R.apply_rotary(k, rotary_cos.to(bf), rotary_sin.to(bf))
    kr, ve = kr.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", qr, kr) * softmax_scale
    t_, s_ = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s = s.masked_fill(~((t_ - s_ >= 0) & (t_ - s_ <= w)), float("-inf"))
    o_swa = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), ve)
    pq = torch.cat([torch.softmax(q, -1), torch.softmax(-q, -1)], -1)
    ke = k.repeat_interleave(G, 2)
    pk = torch.cat([torch.softmax(ke, -1), torch.softmax(-ke, -1)], -1)
    a = torch.einsum("bthi,bshi->bhts", pq, pk)
    a = a * (t_ - s_ >= w + 1).to(bf)
    o_rla = torch.einsum("bhts,bshd->bthd", a, ve) + torch.einsum(
        "bthi,hid->bthd", pq, initial_state[0].to(bf))

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)

    return rms(o_swa) * swa_norm_weight.to(bf) + rms(o_rla) * rla_norm_weight.to(bf)


# ---- cache_bytes ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cache_bytes_matches_allocated_cache(dtype):
    Hkv, D, w, B = 3, 16, 9, 2
    c = RAttentionCache.empty(B, w, Hkv, D, dtype=dtype)
    nb = cache_bytes(Hkv, D, w, 1000, dtype=dtype)
    pos_bytes = c.positions.numel() * c.positions.element_size()
    assert nb["rattention"] * B == c.nbytes - pos_bytes
    assert nb["rattention"] == nb["rattention_ring"] + nb["rattention_state"]
    assert nb["rattention_state"] * B == c.state.numel() * c.state.element_size()
    full = torch.empty(2, 1000, Hkv, D, dtype=dtype)
    assert nb["full_kv"] == full.numel() * full.element_size()
    assert nb["sliding_window"] * B == 2 * c.keys.numel() * c.keys.element_size()
    nb3 = cache_bytes(Hkv, D, w, 1000, dtype=dtype, num_layers=3)
    assert all(nb3[key] == 3 * nb[key] for key in nb)
    # the RAttention cache does not grow with the sequence; a full KV cache does
    assert cache_bytes(Hkv, D, w, 10**6, dtype=dtype)["rattention"] == nb["rattention"]
    assert cache_bytes(Hkv, D, w, 2000, dtype=dtype)["full_kv"] == 2 * nb["full_kv"]


def test_cache_bytes_bad_args():
    with pytest.raises(ValueError, match="window_size"):
        cache_bytes(4, 128, -1, 10)
    with pytest.raises(ValueError, match="dtype"):
        cache_bytes(4, 128, 512, 10, dtype=torch.int8)


# ---- bad input -----------------------------------------------------------------------------
def _step_args(B=2, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    q, k, v = _inputs(B, 1, Hq, Hkv, D, dtype=dtype)
    return q, k, v


def test_bad_cache_errors():
    q, k, v = _step_args()
    with pytest.raises(ValueError, match="cache batch size 3 does not match q's batch size 2"):
        decode_step(q, k, v, RAttentionCache.empty(3, 4, 2, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="cache has 1 kv heads but k has 2"):
        decode_step(q, k, v, RAttentionCache.empty(2, 4, 1, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="cache head dim 16 does not match"):
        decode_step(q, k, v, RAttentionCache.empty(2, 4, 2, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="cache dtype torch.bfloat16 does not match q's dtype"):
        decode_step(q, k, v, RAttentionCache.empty(2, 4, 2, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="cache must be a RAttentionCache"):
        decode_step(q, k, v, (1, 2))
    cache = RAttentionCache.empty(2, 4, 2, 8, dtype=torch.float32)
    q2, k2, v2 = _inputs(2, 2, 4, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="one token per sequence"):
        decode_step(q2, k2, v2, cache)
    with pytest.raises(ValueError, match="window_size=3 but the cache was made for window_size=4"):
        decode_step(q, k, v, cache, window_size=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        decode_step(q, k, v, cache, windw_size=4)
    # the op's own checks: state of the wrong dtype, rotary table too short, bad feature map
    bad = RAttentionCache(cache.keys, cache.values, cache.state.double(), cache.positions)
    with pytest.raises(RuntimeError, match="cache state must have dtype"):
        decode_step(q, k, v, bad)
    cos, sin = _rotary(3, 8, torch.float32)
    cache.positions.fill_(3)
    with pytest.raises(ValueError, match="rotary_cos has 3 positions and rotary_sin 3, so 3 "
                       "positions have both, but a sequence is at position 3"):
        decode_step(q, k, v, cache, rotary_cos=cos, rotary_sin=sin)
    # tables of different lengths: a position past the shorter one is refused, not read
    cos9, sin9 = _rotary(9, 8, torch.float32)
    with pytest.raises(ValueError, match="rotary_cos has 9 positions and rotary_sin 3, so 3 "):
        decode_step(q, k, v, cache, rotary_cos=cos9, rotary_sin=sin)
    with pytest.raises(ValueError, match="rotary_cos has 3 positions and rotary_sin 9, so 3 "):
        decode_step(q, k, v, cache, rotary_cos=cos, rotary_sin=sin9)
    with pytest.raises(ValueError, match="feature_map must be"):
        decode_step(q, k, v, cache, feature_map="elu")
    # a failed step leaves the cache untouched
    assert cache.positions.tolist() == [3, 3] and cache.keys.abs().max().item() == 0


def test_empty_cache_bad_args():
    with pytest.raises(ValueError, match="window_size"):
        RAttentionCache.empty(2, -1, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch_size"):
        RAttentionCache.empty(-1, 4, 2, 8, dtype=torch.float32)


def test_cache_properties():
    c = RAttentionCache.empty(3, 7, 2, 16, dtype=torch.bfloat16)
    assert (c.batch_size, c.window_size, c.num_kv_heads, c.head_dim) == (3, 7, 2, 16)
    assert c.dtype == torch.bfloat16 and c.state.dtype == torch.float32
    assert c.keys.shape == (3, 8, 2, 16) and c.state.shape == (3, 2, 32, 16)
    c.positions.fill_(5)
    c.reset()
    assert c.positions.tolist() == [0, 0, 0]


def test_prefill_rejects_bad_seq_lens():
    q, k, v = _inputs(2, 5, 4, 2, 8, dtype=torch.float32)
    cache = RAttentionCache.empty(2, 3, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        prefill(q, k, v, cache, seq_lens=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="seq_lens must be an integer tensor"):
        prefill(q, k, v, cache, seq_lens=torch.tensor([5.0, 4.0]))


def test_decode_step_opcheck():
    B, Hq, Hkv, D, w = 2, 4, 2, 8, 3
    q, k, v = _step_args(B, Hq, Hkv, D)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float32)
    cache.positions.copy_(torch.tensor([2, 7]))
    cache.keys.normal_()
    cache.values.normal_()
    cache.state.normal_()
    ones = torch.ones(Hq, D)
    cos, sin = _rotary(16, D, torch.float32)
    torch.library.opcheck(
        torch.ops.rattention_ext.decode_step.default,
        (q, k, v, cache.keys, cache.values, cache.state, cache.positions, "softmax",
         D ** -0.5, None, cos, sin, ones, ones, 1e-8),
        test_utils=("test_schema", "test_faketensor"))


# ---- prefill (needs the forward kernels) ---------------------------------------------------
def _assert_same_cache(a: RAttentionCache, b: RAttentionCache, tol):
    assert torch.equal(a.positions, b.positions)
    assert (a.keys.double() - b.keys.double()).abs().max().item() <= tol
    assert (a.values.double() - b.values.double()).abs().max().item() <= tol
    assert (a.state.double() - b.state.double()).abs().max().item() <= tol * max(
        1.0, b.state.abs().max().item())


@needs_forward
@pytest.mark.parametrize("T,w", [(1, 0), (37, 0), (37, 5), (37, 36), (37, 64), (97, 16)])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 1)])
def test_prefill_then_decode_matches_reference(T, w, Hq, Hkv):
    B, D, n_new = 2, 16, 7
    q, k, v = _inputs(B, T + n_new, Hq, Hkv, D, seed=11)
    kw = _extras(B, Hq, D, torch.float64, h0_batch=1, rotary_P=T + n_new)
    ref = R.forward(q, k, v, window_size=w, **kw)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    o_pre = prefill(q[:, :T], k[:, :T], v[:, :T], cache, **kw)
    assert (o_pre - ref[:, :T]).abs().max().item() < F64_TOL
    # prefill leaves exactly the cache T decode steps leave
    cache_dec = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    _decode_all(q[:, :T], k[:, :T], v[:, :T], cache_dec, **kw)
    _assert_same_cache(cache, cache_dec, 1e-12)
    o_dec = _decode_all(q[:, T:], k[:, T:], v[:, T:], cache, **kw)
    assert (o_dec - ref[:, T:]).abs().max().item() < F64_TOL


@needs_forward
@pytest.mark.parametrize("seq_lens", [[37, 37, 37], [37, 1, 20], [0, 5, 37]])
def test_prefill_ragged_seq_lens(seq_lens):
    B, T, Hq, Hkv, D, w, n_new = 3, 37, 4, 2, 8, 6, 5
    q, k, v = _inputs(B, T + n_new, Hq, Hkv, D, seed=12)
    kw = _extras(B, Hq, D, torch.float64, h0_batch=B, rotary_P=T + n_new)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    lens = torch.tensor(seq_lens)
    o_pre = prefill(q[:, :T], k[:, :T], v[:, :T], cache, seq_lens=lens, **kw)
    assert cache.positions.tolist() == seq_lens
    ar = torch.arange(B)
    outs = []
    for i in range(n_new):  # continue each sequence right after its own prompt
        idx = lens + i
        outs.append(decode_step(q[ar, idx][:, None], k[ar, idx][:, None], v[ar, idx][:, None],
                                cache, **kw))
    for b, L in enumerate(seq_lens):
        kwb = dict(kw, initial_state=kw["initial_state"][b:b + 1])
        ref = R.forward(q[b:b + 1, :L + n_new], k[b:b + 1, :L + n_new], v[b:b + 1, :L + n_new],
                        window_size=w, **kwb)[0]
        if L:
            assert (o_pre[b, :L] - ref[:L]).abs().max().item() < F64_TOL
        for i in range(n_new):
            assert (outs[i][b, 0] - ref[L + i]).abs().max().item() < F64_TOL
        # the cache of sequence b equals L decode steps of b alone
        cb = RAttentionCache.empty(1, w, Hkv, D, dtype=torch.float64)
        if L:
            _decode_all(q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], cb, **kwb)
        pre_b = RAttentionCache.empty(1, w, Hkv, D, dtype=torch.float64)
        prefill(q[b:b + 1, :T], k[b:b + 1, :T], v[b:b + 1, :T], pre_b,
                seq_lens=torch.tensor([L]), **kwb)
        _assert_same_cache(pre_b, cb, 1e-12)


@needs_forward
@pytest.mark.parametrize("T,w", [(1, 0), (97, 16), (1025, 64)])
def test_decode_matches_compiled_forward_f32(T, w):
    B, Hq, Hkv, D = 1, 8, 1, 32
    q, k, v = _inputs(B, T, Hq, Hkv, D, dtype=torch.float32, seed=13)
    kw = _extras(B, Hq, D, torch.float32, h0_batch=1, rotary_P=T)
    n_pre = max(0, T - 40)  # decode the tail token by token
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float32)
    ref = R.forward(q.double(), k.double(), v.double(), window_size=w,
                    **{n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()})
    fwd = rattention_ext.forward(q, k, v, window_size=w, **kw)
    outs = []
    if n_pre:
        outs.append(prefill(q[:, :n_pre], k[:, :n_pre], v[:, :n_pre], cache, **kw))
    outs.append(_decode_all(q[:, n_pre:], k[:, n_pre:], v[:, n_pre:], cache, **kw))
    out = torch.cat(outs, dim=1)
    assert _rel(out, ref) < 1e-5 and _rel(fwd, ref) < 1e-5
    assert _rel(out[:, n_pre:], fwd[:, n_pre:]) < 1e-5


@needs_forward
def test_prefill_bfloat16_then_decode():
    B, T, Hq, Hkv, D, w, n_new = 2, 97, 4, 2, 32, 16, 8
    q, k, v = _inputs(B, T + n_new, Hq, Hkv, D, dtype=torch.bfloat16, seed=14)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.bfloat16)
    prefill(q[:, :T], k[:, :T], v[:, :T], cache)
    out = _decode_all(q[:, T:], k[:, T:], v[:, T:], cache)
    ref = R.forward(q.double(), k.double(), v.double(), window_size=w)[:, T:]
    ref_bf16 = R.forward(q, k, v, window_size=w)[:, T:]  # float32 inside, bf16 out
    assert not out.isnan().any()
    assert _rel(out, ref) <= 2 * _rel(ref_bf16, ref) + 1e-3


def test_decode_step_torch_compile_fullgraph():
    """decode_step traces as one graph (in-place cache update through the op's schema) and
    gives the same outputs and cache as eager."""
    B, T, Hq, Hkv, D, w = 2, 6, 4, 2, 8, 3
    q, k, v = _inputs(B, T, Hq, Hkv, D, dtype=torch.float32, seed=15)
    eager = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float32)
    compiled = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float32)
    step = torch.compile(lambda q, k, v, c: decode_step(q, k, v, c), fullgraph=True)
    for t in range(T):
        a = decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], eager)
        b = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], compiled)
        assert torch.equal(a, b)
    for f in ("keys", "values", "state", "positions"):
        assert torch.equal(getattr(eager, f), getattr(compiled, f))


def test_decode_long_float32_state_accuracy():
    """16K decode steps in float32: the state is a sequential float32 sum of rank-1 terms;
    outputs (the last tokens included) and the final state stay within 1e-5 of float64."""
    B, T, Hq, Hkv, D, w = 1, 16384, 2, 1, 16, 8
    q, k, v = _inputs(B, T, Hq, Hkv, D, seed=16)
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float32)
    out = _decode_all(q.float(), k.float(), v.float(), cache)
    ref = R.forward(q, k, v, window_size=w)
    _, ref_state = R.residual_linear_attention(q, k, v, window_size=w, return_final_state=True)
    assert _rel(out, ref) < 1e-5
    assert _rel(out[:, -256:], ref[:, -256:]) < 1e-5
    assert _rel(cache.state, ref_state) < 1e-5


# ---- prefill's cache bookkeeping, independent of the forward kernels ------------------------
class _ReferenceBranchOps:
    """torch.ops.rattention_ext with swa_fwd / swa_mix_fwd / rla_fwd answered by the float64
    reference (the mixing by the mix_fwd op), so
    that prefill's own logic (ring fill, per-sequence state, positions) is tested even in a
    build whose forward kernels are placeholders. The kernels are tested by the
    ``needs_forward`` tests above and by their own test files."""

    def __getattr__(self, name):
        return getattr(torch.ops.rattention_ext, name)

    @staticmethod
    def swa_fwd(q, k, v, w, scale, cos, sin, cu_seqlens=None):
        assert cu_seqlens is None, "this stub answers dense batches only"
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return R.sliding_window_attention(q.to(acc), k.to(acc), v.to(acc), window_size=w,
                                          softmax_scale=scale, return_lse=True, rotary_cos=cos,
                                          rotary_sin=sin)

    @classmethod
    def swa_mix_fwd(cls, q, k, v, w, scale, cos, sin, o_rla, g_swa, g_rla, eps, out_dtype, save,
                    cu_seqlens=None):
        assert cu_seqlens is None, "this stub answers dense batches only"
        o_swa, lse = cls.swa_fwd(q, k, v, w, scale, cos, sin)
        out = torch.ops.rattention_ext.mix_fwd(o_swa, o_rla, g_swa, g_rla, eps, out_dtype)
        return out, o_swa, lse

    @staticmethod
    def rla_fwd(q, k, v, w, fm, h0, chunk_size, checkpoint_every, cu_seqlens=None,
                carried_state=None):
        assert cu_seqlens is None and carried_state is None, "dense batches only"
        out, state = R._rla(q, k, v, w, fm, h0)
        return out, state, None


@pytest.mark.parametrize("seq_lens", [None, [23, 23, 23], [23, 1, 9], [0, 6, 23]])
@pytest.mark.parametrize("w", [0, 5, 30])
def test_prefill_cache_logic_reference_branches(monkeypatch, seq_lens, w):
    import rattention_ext.decode as dec
    import rattention_ext.api as api
    ref_ops = _ReferenceBranchOps()
    monkeypatch.setattr(dec, "call", lambda name, *args: getattr(ref_ops, name)(*args))
    monkeypatch.setattr(api, "call", lambda name, *args: getattr(ref_ops, name)(*args))
    B, T, Hq, Hkv, D, n_new = 3, 23, 4, 2, 8, 4
    q, k, v = _inputs(B, T + n_new, Hq, Hkv, D, seed=17)
    kw = _extras(B, Hq, D, torch.float64, h0_batch=B, rotary_P=T + n_new)
    lens = [T] * B if seq_lens is None else seq_lens
    cache = RAttentionCache.empty(B, w, Hkv, D, dtype=torch.float64)
    o_pre = prefill(q[:, :T], k[:, :T], v[:, :T], cache,
                    seq_lens=None if seq_lens is None else torch.tensor(seq_lens), **kw)
    assert cache.positions.tolist() == lens
    for b, L in enumerate(lens):
        kwb = dict(kw, initial_state=kw["initial_state"][b:b + 1])
        cb = RAttentionCache.empty(1, w, Hkv, D, dtype=torch.float64)
        if L:
            _decode_all(q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], cb, **kwb)
        one = RAttentionCache(cache.keys[b:b + 1], cache.values[b:b + 1], cache.state[b:b + 1],
                              cache.positions[b:b + 1])
        _assert_same_cache(one, cb, 1e-12)
        ref = R.forward(q[b:b + 1, :L + n_new], k[b:b + 1, :L + n_new], v[b:b + 1, :L + n_new],
                        window_size=w, **kwb)[0]
        if L:
            assert (o_pre[b, :L] - ref[:L]).abs().max().item() < F64_TOL
    ar, idx0 = torch.arange(B), torch.tensor(lens)
    for i in range(n_new):
        idx = idx0 + i
        o = decode_step(q[ar, idx][:, None], k[ar, idx][:, None], v[ar, idx][:, None], cache, **kw)
        for b, L in enumerate(lens):
            kwb = dict(kw, initial_state=kw["initial_state"][b:b + 1])
            ref = R.forward(q[b:b + 1, :L + i + 1], k[b:b + 1, :L + i + 1],
                            v[b:b + 1, :L + i + 1], window_size=w, **kwb)[0, -1]
            assert (o[b, 0] - ref).abs().max().item() < F64_TOL
