"""Empty and extreme sizes: every zero-size dimension gives correctly shaped (empty or zero)
outputs and gradients on every op and the layer; windows and chunk / checkpoint parameters
at the int64 limits are clamped (exact results) or refused with a clear error."""
import sys

import pytest
import torch

import rattention_ext
from helpers import make_qkv
from rattention_ext import RAttentionCache, reference as ref

F64 = torch.float64
# (B, T, Hq, Hkv): each has one zero dimension (Hq = 0 with Hkv >= 1 too: no query heads)
ZERO_DIMS = [(0, 5, 4, 2), (2, 0, 4, 2), (2, 5, 0, 0), (2, 5, 0, 1), (0, 0, 0, 0)]
FUNCS = ["forward", "swa", "rla", "rla_state_h0"]


def _call(name, q, k, v, w=2, **kw):
    if name == "forward":
        return rattention_ext.forward(q, k, v, window_size=w, **kw)
    if name == "swa":
        return rattention_ext.sliding_window_attention(q, k, v, window_size=w, return_lse=True,
                                                       **kw)
    if name == "rla":
        return rattention_ext.residual_linear_attention(q, k, v, window_size=w,
                                                        return_final_state=True, **kw)
    raise ValueError(name)


def _zeros_like_grads_ok(leaves):
    for x in leaves:
        assert x.grad is not None and x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dims", ZERO_DIMS, ids=[str(d) for d in ZERO_DIMS])
@pytest.mark.parametrize("fn", FUNCS)
def test_zero_size_dims_fwd_bwd(fn, dims):
    B, T, Hq, Hkv = dims
    D = 8
    q, k, v = [x.requires_grad_() for x in make_qkv(B, T, Hq, Hkv, D, F64, 0)]
    kw = {}
    leaves = [q, k, v]
    name = fn
    if fn == "rla_state_h0":
        h0 = torch.randn(1, Hq, 2 * D, D, dtype=F64, requires_grad=True)
        kw = dict(initial_state=h0)
        leaves.append(h0)
        name = "rla"
    out = _call(name, q, k, v, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    assert outs[0].shape == (B, T, Hq, D)
    if name == "swa":
        assert outs[1].shape == (B, Hq, T)
    if name == "rla":
        # The final state holds phi(k) v^T of the tokens that left the window (zero here
        # unless T > w + 1 with B, Hkv >= 1), whatever the number of query heads.
        _, want = ref.residual_linear_attention(q.detach(), k.detach(), v.detach(), window_size=2,
                                                return_final_state=True)
        assert outs[1].shape == (B, Hkv, 2 * D, D)
        assert torch.allclose(outs[1], want, atol=1e-12)
    sum(o.double().sum() for o in outs).backward()
    _zeros_like_grads_ok(leaves)
    if fn == "rla_state_h0" and T == 0:
        assert (leaves[-1].grad == 0).all()


def test_zero_heads_with_kv_heads_gives_kv_gradients_from_the_state():
    """Hq = 0, Hkv = 1: no outputs, but the final RLA state still depends on k and v."""
    q, k, v = [x.requires_grad_() for x in make_qkv(1, 9, 0, 1, 4, F64, 1)]
    _, st = _call("rla", q, k, v, w=1)
    g = torch.randn_like(st)
    (st * g).sum().backward()
    k2, v2 = k.detach().requires_grad_(), v.detach().requires_grad_()
    _, st2 = ref.residual_linear_attention(q.detach(), k2, v2, window_size=1,
                                           return_final_state=True)
    (st2 * g).sum().backward()
    assert (k.grad - k2.grad).abs().max() < 1e-12 and (v.grad - v2.grad).abs().max() < 1e-12


@pytest.mark.parametrize("B,T", [(0, 4), (2, 0), (0, 0)])
def test_zero_size_layer_forward_prefill_step(B, T):
    layer = rattention_ext.nn.RAttention(16, 4, 2, 3, learned_init_state=True, dtype=F64)
    x = torch.randn(B, T, 16, dtype=F64, requires_grad=True)
    y = layer(x)
    assert y.shape == (B, T, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with torch.no_grad():
        cache = layer.new_cache(B)
        assert layer.prefill(x.detach(), cache).shape == (B, T, 16)
        assert cache.positions.tolist() == [T] * B
        assert layer.step(torch.randn(B, 1, 16, dtype=F64), cache).shape == (B, 1, 16)
        assert cache.positions.tolist() == [T + 1] * B


def test_prefill_zero_length_then_decode_equals_decode_from_scratch():
    q, k, v = make_qkv(2, 4, 2, 1, 8, F64, 3)
    c0 = RAttentionCache.empty(2, 2, 1, 8, dtype=F64)
    out = rattention_ext.prefill(q[:, :0], k[:, :0], v[:, :0], c0)
    assert out.shape == (2, 0, 2, 8) and c0.positions.tolist() == [0, 0]
    c1 = RAttentionCache.empty(2, 2, 1, 8, dtype=F64)
    for t in range(4):
        a = rattention_ext.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], c0)
        b = rattention_ext.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], c1)
        assert torch.equal(a, b)
    # seq_lens of zero inside a batch (right padding)
    c2 = RAttentionCache.empty(2, 2, 1, 8, dtype=F64)
    rattention_ext.prefill(q, k, v, c2, seq_lens=torch.tensor([0, 4]))
    assert c2.positions.tolist() == [0, 4]


def test_zero_batch_decode_and_cache():
    cache = RAttentionCache.empty(0, 3, 2, 8, dtype=torch.float32)
    q, k, v = make_qkv(0, 1, 4, 2, 8, torch.float32, 0)
    assert rattention_ext.decode_step(q, k, v, cache).shape == (0, 1, 4, 8)


@pytest.mark.parametrize("what", ["forward", "swa", "rla"])
def test_zero_head_dim_raises_clearly(what):
    q, k, v = make_qkv(1, 4, 2, 1, 0, F64, 0)
    with pytest.raises(ValueError, match="rattention_ext.*head dim"):
        _call(what, q, k, v)


# ---- extreme windows, chunks and checkpoint intervals --------------------------------------
BIG_WINDOWS = [2**31, 2**62, sys.maxsize]


def _grads(fn, q, k, v, go):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad((out * go).sum(), leaves, allow_unused=True)
    return [out, *[torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]]


@pytest.mark.parametrize("w", BIG_WINDOWS)
@pytest.mark.parametrize("what", ["forward", "swa", "rla"])
def test_huge_window_equals_full_window(what, w):
    """Any window >= T - 1 is the full causal window (and no RLA): T = 150 spans tiles."""
    q, k, v = make_qkv(1, 150, 2, 1, 8, F64, 5)
    go = torch.randn_like(q)
    got = _grads(lambda q, k, v: _call(what, q, k, v, w=w), q, k, v, go)
    if what == "forward":
        rfn = lambda q, k, v: ref.forward(q, k, v, window_size=149)  # noqa: E731
    elif what == "swa":
        rfn = lambda q, k, v: ref.sliding_window_attention(q, k, v, window_size=149)  # noqa: E731
    else:
        rfn = lambda q, k, v: ref.residual_linear_attention(q, k, v, window_size=149)  # noqa: E731
    want = _grads(rfn, q, k, v, go)
    for g, r in zip(got, want):
        assert (g - r).abs().max().item() < 1e-10


def test_huge_window_layer_and_prefill():
    x = torch.randn(1, 70, 16, dtype=F64)
    big = rattention_ext.nn.RAttention(16, 2, 1, sys.maxsize, dtype=F64)
    full = rattention_ext.nn.RAttention(16, 2, 1, 69, dtype=F64)
    full.load_state_dict(big.state_dict())
    assert (big(x) - full(x)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="rattention_ext.*window_size"):
        big.new_cache(1)  # a ring of 2^63 slots cannot be allocated: refused by name


def test_window_above_int64_refused():
    q, k, v = make_qkv(1, 4, 2, 1, 8, F64, 0)
    with pytest.raises(ValueError, match="rattention_ext.*window_size"):
        rattention_ext.forward(q, k, v, window_size=2**63)


@pytest.mark.parametrize("every", [2**62, 2**63 - 1, 3])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_extreme_checkpoint_every_exact(chunk, every):
    q, k, v = make_qkv(1, 37, 2, 1, 8, F64, 6)
    h0 = torch.randn(1, 2, 16, 8, dtype=F64)
    go = torch.randn_like(q)

    def fn(q, k, v):
        return rattention_ext.forward(q, k, v, window_size=3, initial_state=h0, chunk_size=chunk,
                                      checkpoint_every=every)

    got = _grads(fn, q, k, v, go)
    want = _grads(lambda q, k, v: ref.forward(q, k, v, window_size=3, initial_state=h0), q, k, v,
                  go)
    for g, r in zip(got, want):
        assert (g - r).abs().max().item() < 1e-10


@pytest.mark.parametrize("bad", [dict(chunk_size=0), dict(chunk_size=1025), dict(chunk_size=True),
                                 dict(chunk_size=2.0), dict(checkpoint_every=0),
                                 dict(checkpoint_every=2**63), dict(checkpoint_every=None)])
def test_bad_tiling_refused_by_name(bad):
    q, k, v = make_qkv(1, 4, 2, 1, 8, F64, 0)
    name = next(iter(bad))
    with pytest.raises((TypeError, ValueError), match=f"rattention_ext.*{name}"):
        rattention_ext.forward(q, k, v, window_size=1, **bad)
    with pytest.raises((TypeError, ValueError), match=f"rattention_ext.*{name}"):
        rattention_ext.residual_linear_attention(q, k, v, window_size=1, **bad)


def test_raw_ops_with_extreme_arguments_do_not_crash():
    ops = torch.ops.rattention_ext
    q, k, v = make_qkv(1, 40, 2, 1, 8, torch.float32, 0)
    o, st, ck = ops.rla_fwd(q, k, v, sys.maxsize, "softmax", None, 1, sys.maxsize)
    assert ck.shape[2] == 2 * 8  # one checkpoint slot of [2D, D] rows
    o2, st2, _ = ops.rla_fwd(q, k, v, 39, "softmax", None, 1, 40)
    assert torch.equal(o, o2) and torch.equal(st, st2)
    o, lse = ops.swa_fwd(q, k, v, sys.maxsize, 0.3, None, None)
    g = ops.swa_bwd(torch.ones_like(o), None, q, k, v, o, lse, sys.maxsize, 0.3, None, None, False)
    g2 = ops.swa_bwd(torch.ones_like(o), None, q, k, v, o, lse, 39, 0.3, None, None, False)
    assert all(torch.equal(a, b) for a, b in zip(g, g2))
    q0, k0, v0 = make_qkv(0, 40, 2, 1, 8, torch.float32, 0)
    assert ops.swa_fwd(q0, k0, v0, 3, 0.3, None, None)[0].shape == (0, 40, 2, 8)
    assert ops.rla_fwd(q0, k0, v0, 3, "relu", None, 64, 4)[1].shape == (0, 1, 16, 8)
