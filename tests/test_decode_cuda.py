"""CUDA decode_step: token-by-token decoding reproduces the float64 forward (SPEC.md Decoding).

Starting from an empty cache (pos = 0), T decode steps give, at every step t, output row t
of the full forward; the state left in the cache equals the RLA final state of the T tokens.
Skipped without a GPU or without CUDA kernels in the build.
"""
from __future__ import annotations

import math

import pytest
import torch

import rattention_ext
from rattention_ext import reference as ref

ops = torch.ops.rattention_ext

_HAS_CUDA = torch.cuda.is_available() and bool(rattention_ext.build_info().get("cuda", False))
pytestmark = pytest.mark.skipif(
    not _HAS_CUDA, reason="needs a CUDA device and a build with the CUDA kernels"
)

FLOOR = 5e-4


def poison():
    blocks = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(8)]
    del blocks


def rel_err(x, r):
    x, r = x.double(), r.double()
    assert not torch.isnan(x).any(), "NaN in kernel output"
    return ((x - r).norm() / r.norm().clamp_min(1e-30)).item()


def rotary_tables(P, D, device):
    inv = 1.0 / (10000 ** (torch.arange(0, D // 2, device=device, dtype=torch.float64) / (D // 2)))
    ang = torch.arange(P, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def empty_cache(B, w, Hkv, D, dtype):
    kc = torch.zeros(B, w + 1, Hkv, D, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    st = torch.zeros(B, Hkv, 2 * D, D, device="cuda", dtype=torch.float32)
    pos = torch.zeros(B, device="cuda", dtype=torch.int64)
    return kc, vc, st, pos


@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,w,fm,rotary,h0",
    [
        (2, 40, 8, 1, 64, 5, "softmax", True, True),
        (1, 23, 2, 2, 128, 0, "relu", False, False),
        (2, 30, 4, 2, 128, 50, "softmax", True, False),  # w >= T
        (1, 70, 24, 2, 64, 9, "softmax", False, True),  # G = 12: two head blocks in the state sweep
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_forward(B, T, Hq, Hkv, D, w, fm, rotary, h0, dtype):
    g = torch.Generator(device="cuda").manual_seed(T * D + w)
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    H0 = 0.1 * torch.randn(1, Hq, 2 * D, D, device="cuda", generator=g) if h0 else None
    ga = 1 + 0.1 * torch.randn(Hq, D, device="cuda", generator=g)
    gb = 1 + 0.1 * torch.randn(Hq, D, device="cuda", generator=g)
    cos, sin = rotary_tables(T + 4, D, "cuda") if rotary else (None, None)
    scale = 1.0 / math.sqrt(D)

    kc, vc, st, pos = empty_cache(B, w, Hkv, D, dtype)
    outs = []
    for t in range(T):
        poison()
        o = ops.decode_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], kc, vc, st, pos, fm,
                            scale, H0, cos, sin, ga, gb, 1e-8)
        outs.append(o)
    torch.cuda.synchronize()
    got = torch.cat(outs, dim=1)
    assert torch.equal(pos.cpu(), torch.full((B,), T, dtype=torch.int64))

    kw = dict(window_size=w, feature_map=fm, softmax_scale=scale, swa_norm_weight=ga,
              rla_norm_weight=gb, norm_eps=1e-8)
    r64 = ref.forward(q.double(), k.double(), v.double(),
                      initial_state=H0.double() if h0 else None,
                      rotary_cos=cos.double() if rotary else None,
                      rotary_sin=sin.double() if rotary else None, **kw)
    # baseline: the same forward in plain PyTorch at float32 accumulation, rounded to dtype
    base = ref.forward(q, k, v, initial_state=H0, rotary_cos=cos, rotary_sin=sin, **kw)
    e, eb = rel_err(got, r64), rel_err(base, r64)
    assert e <= 2 * eb + FLOOR, f"decode rel err {e:.3e} vs baseline {eb:.3e}"

    _, s64 = ref._rla(q.double(), k.double(), v.double(), w, fm, None)
    if T - w - 1 > 0:
        assert rel_err(st, s64) < 1e-4
    else:
        assert torch.count_nonzero(st) == 0
    # ring holds the last w + 1 raw keys at slot s mod (w + 1)
    for s in range(max(0, T - w - 1), T):
        assert torch.equal(kc[:, s % (w + 1)], k[:, s]) and torch.equal(vc[:, s % (w + 1)], v[:, s])


def test_decode_per_sequence_positions_and_stream():
    """Sequences at different positions in one batch, on a non-default stream."""
    B, Hq, Hkv, D, w = 2, 4, 2, 64, 3
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    T = 12
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    ones = torch.ones(Hq, D, device="cuda")
    kc, vc, st, pos = empty_cache(B, w, Hkv, D, dtype)
    # advance sequence 1 alone by 5 tokens (cache views of batch row 1 are contiguous)
    for t in range(5):
        ops.decode_step(q[1:2, t : t + 1], k[1:2, t : t + 1], v[1:2, t : t + 1], kc[1:2], vc[1:2],
                        st[1:2], pos[1:2], "softmax", 0.125, None, None, None, ones, ones, 1e-8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    outs = []
    with torch.cuda.stream(s):
        for t in range(T - 5):
            # sequence 0 feeds token t, sequence 1 token t + 5
            qq = torch.stack([q[0, t], q[1, t + 5]])[:, None]
            kk = torch.stack([k[0, t], k[1, t + 5]])[:, None]
            vv = torch.stack([v[0, t], v[1, t + 5]])[:, None]
            outs.append(ops.decode_step(qq, kk, vv, kc, vc, st, pos, "softmax", 0.125, None, None,
                                        None, ones, ones, 1e-8))
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    got = torch.cat(outs, dim=1)
    kw = dict(window_size=w, feature_map="softmax", softmax_scale=0.125)
    r0 = ref.forward(q[:1, : T - 5].double(), k[:1, : T - 5].double(), v[:1, : T - 5].double(), **kw)
    r1 = ref.forward(q[1:].double(), k[1:].double(), v[1:].double(), **kw)[:, 5:]
    b0 = ref.forward(q[:1, : T - 5], k[:1, : T - 5], v[:1, : T - 5], **kw)
    b1 = ref.forward(q[1:], k[1:], v[1:], **kw)[:, 5:]
    for x, r, b in [(got[:1], r0, b0), (got[1:], r1, b1)]:
        assert rel_err(x, r) <= 2 * rel_err(b, r) + FLOOR
    assert pos.tolist() == [T - 5, T]


def test_decode_past_rotary_table_writes_nan():
    B, Hq, Hkv, D, w = 1, 2, 1, 64, 2
    dtype = torch.bfloat16
    kc, vc, st, pos = empty_cache(B, w, Hkv, D, dtype)
    cos, sin = rotary_tables(2, D, "cuda")
    ones = torch.ones(Hq, D, device="cuda")
    x = torch.randn(B, 1, Hq, D, device="cuda").to(dtype)
    kv = torch.randn(B, 1, Hkv, D, device="cuda").to(dtype)
    for _ in range(2):
        o = ops.decode_step(x, kv, kv, kc, vc, st, pos, "softmax", 0.125, None, cos, sin, ones, ones,
                            1e-8)
        assert not torch.isnan(o).any()
    o = ops.decode_step(x, kv, kv, kc, vc, st, pos, "softmax", 0.125, None, cos, sin, ones, ones, 1e-8)
    torch.cuda.synchronize()
    assert torch.isnan(o).all()


def test_decode_split_captured_in_a_cuda_graph():
    """Batch 1 with a long ring: the step is split across CTAs (flash-decoding) with a
    workspace from the caching allocator; captured once in a CUDA graph and replayed, it gives
    bit for bit what eager steps give, and both match the forward."""
    B, T, Hq, Hkv, D, w, dtype = 1, 80, 8, 2, 128, 63, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    ones = torch.ones(Hq, D, device="cuda")
    cos, sin = rotary_tables(T, D, "cuda")
    args = ("softmax", 0.125, None, cos, sin, ones, ones, 1e-8)

    eager = empty_cache(B, w, Hkv, D, dtype)
    want = [ops.decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], *eager, *args)
            for t in range(T)]

    cache = empty_cache(B, w, Hkv, D, dtype)
    sq, sk, sv = (torch.empty_like(x[:, :1]) for x in (q, k, v))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as graph capture wants
        ops.decode_step(sq, sk, sv, *empty_cache(B, w, Hkv, D, dtype), *args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.decode_step(sq, sk, sv, *cache, *args)
    got = []
    for t in range(T):
        sq.copy_(q[:, t:t + 1])
        sk.copy_(k[:, t:t + 1])
        sv.copy_(v[:, t:t + 1])
        graph.replay()
        got.append(out.clone())
    torch.cuda.synchronize()
    assert cache[3].tolist() == [T] and eager[3].tolist() == [T]
    for t in range(T):
        assert torch.equal(got[t], want[t]), t
    r64 = ref.forward(q.double(), k.double(), v.double(), window_size=w, softmax_scale=0.125,
                      rotary_cos=cos.double(), rotary_sin=sin.double())
    base = ref.forward(q, k, v, window_size=w, softmax_scale=0.125, rotary_cos=cos, rotary_sin=sin)
    e, eb = rel_err(torch.cat(got, dim=1), r64), rel_err(base, r64)
    assert e <= 2 * eb + FLOOR, f"decode rel err {e:.3e} vs baseline {eb:.3e}"
