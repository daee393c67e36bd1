"""Tests of the references themselves (the oracles every kernel is checked against).

1. The PyTorch reference (blockwise, ``reference.py``) and the JAX reference (dense masked
   SWA, token-by-token ``lax.scan`` RLA, ``jax_reference.py``) agree in float64 to 1e-10
   over a grid of edge cases. The two are written independently, so agreement means both
   compute SPEC.md (or both share a misreading of it, which (3) guards against).
2. ``torch.autograd.gradcheck`` of the PyTorch reference: forward wrt q, k, v, H0 and both
   norm weights; the RLA final state and the SWA lse as outputs as well.
3. A third, brute-force implementation written here (numpy, one token and one head at a
   time, the RLA sum recomputed from scratch per token) against the PyTorch reference.
4. JAX tests skip cleanly when jax is not installed.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from rattention_ext import reference as ref

TOL = 1e-10  # float64 agreement: max abs error <= TOL * max(1, max |ref|)


def _assert_close(got, want, name, tol=TOL):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want.detach().cpu().numpy() if torch.is_tensor(want) else want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    assert np.isfinite(want).all(), f"{name}: non-finite values in the expected result"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    bound = tol * max(1.0, float(np.abs(want).max()) if want.size else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def _rotary_tables(P, D, rng, base=10000.0):
    inv = base ** (-np.arange(0, D // 2) * 2.0 / D)
    ang = np.arange(P)[:, None] * inv[None, :]
    ang = ang + 0.1 * rng.standard_normal(ang.shape)  # not a pure table: catches index mixups
    return np.cos(ang), np.sin(ang)


def _make_inputs(seed, B, T, Hq, Hkv, D, *, h0=None, rotary=False, norm=False, dtype=np.float64):
    """Fresh random numpy inputs. h0: None, "b1" ([1, Hq, 2D, D]) or "per_batch"."""
    rng = np.random.default_rng(seed)
    x = dict(
        q=rng.standard_normal((B, T, Hq, D)),
        k=rng.standard_normal((B, T, Hkv, D)),
        v=rng.standard_normal((B, T, Hkv, D)),
    )
    if h0 is not None:
        x["initial_state"] = 0.5 * rng.standard_normal((1 if h0 == "b1" else B, Hq, 2 * D, D))
    if rotary:
        x["rotary_cos"], x["rotary_sin"] = _rotary_tables(T + 3, D, rng)  # P > T on purpose
    if norm:
        x["swa_norm_weight"] = 1.0 + 0.3 * rng.standard_normal((Hq, D))
        x["rla_norm_weight"] = 1.0 + 0.3 * rng.standard_normal((Hq, D))
    return {n: a.astype(dtype) for n, a in x.items()}


def _torch(x):
    return {n: torch.from_numpy(a) for n, a in x.items()}


def _pick(x, *names):
    return {n: x[n] for n in names if n in x}


# --------------------------------------------------------------------------------------
# 1. PyTorch reference vs JAX reference, float64
# --------------------------------------------------------------------------------------
# (B, T, Hq, Hkv, D, w, feature_map, h0, rotary, scale, norm)
GRID = [
    (1, 1, 2, 2, 8, 0, "softmax", None, False, None, False),        # T = 1, w = 0
    (2, 1, 8, 1, 4, 3, "relu", "b1", True, None, True),              # T = 1, w >= T, GQA 8
    (2, 17, 4, 4, 8, 0, "softmax", "per_batch", False, 0.37, False),  # w = 0, custom scale
    (1, 13, 2, 2, 8, 13, "relu", "b1", False, None, True),           # w = T
    (2, 13, 8, 1, 4, 40, "softmax", "per_batch", True, None, False),  # w >> T, GQA 8
    (2, 97, 16, 2, 8, 5, "softmax", None, True, 0.8, True),           # ragged, GQA 8
    (1, 97, 8, 1, 8, 96, "relu", None, False, None, False),           # w = T - 1: RLA empty
    (1, 97, 4, 2, 16, 95, "softmax", "b1", False, None, True),        # exactly one RLA key
    (1, 300, 2, 1, 8, 256, "relu", "per_batch", True, None, True),    # w = reference block
    (1, 1025, 2, 2, 8, 300, "softmax", None, True, None, True),       # windows across blocks
]


@pytest.fixture(scope="module")
def jref():
    pytest.importorskip("jax")
    from rattention_ext import jax_reference

    return jax_reference


@pytest.mark.parametrize("B,T,Hq,Hkv,D,w,fm,h0,rotary,scale,norm", GRID)
def test_torch_vs_jax_float64(jref, B, T, Hq, Hkv, D, w, fm, h0, rotary, scale, norm):
    x = _make_inputs(1000 + T * 7 + w, B, T, Hq, Hkv, D, h0=h0, rotary=rotary, norm=norm)
    xt = _torch(x)
    tag = f"B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} w{w} {fm}"

    # SWA with lse
    swa_kw = _pick(x, "rotary_cos", "rotary_sin")
    o_j, lse_j = jref.sliding_window_attention(
        x["q"], x["k"], x["v"], window_size=w, softmax_scale=scale, return_lse=True, **swa_kw)
    o_t, lse_t = ref.sliding_window_attention(
        xt["q"], xt["k"], xt["v"], window_size=w, softmax_scale=scale, return_lse=True,
        **_pick(xt, "rotary_cos", "rotary_sin"))
    assert str(o_j.dtype) == "float64" and str(lse_j.dtype) == "float64"
    _assert_close(o_j, o_t, f"swa out [{tag}]")
    _assert_close(lse_j, lse_t, f"swa lse [{tag}]")

    # RLA with final state
    o_j, s_j = jref.residual_linear_attention(
        x["q"], x["k"], x["v"], window_size=w, feature_map=fm, return_final_state=True,
        **_pick(x, "initial_state"))
    o_t, s_t = ref.residual_linear_attention(
        xt["q"], xt["k"], xt["v"], window_size=w, feature_map=fm, return_final_state=True,
        **_pick(xt, "initial_state"))
    assert tuple(s_j.shape) == (B, Hkv, 2 * D, D)
    _assert_close(o_j, o_t, f"rla out [{tag}]")
    _assert_close(s_j, s_t, f"rla final state [{tag}]")
    if h0 is None and w >= T - 1:
        assert not np.asarray(o_j).any(), "RLA without H0 must be zero when no key leaves the window"

    # the full forward
    fw = _pick(x, "initial_state", "rotary_cos", "rotary_sin", "swa_norm_weight", "rla_norm_weight")
    o_j = jref.forward(x["q"], x["k"], x["v"], window_size=w, feature_map=fm, softmax_scale=scale, **fw)
    o_t = ref.forward(xt["q"], xt["k"], xt["v"], window_size=w, feature_map=fm, softmax_scale=scale,
                      **{n: xt[n] for n in fw})
    _assert_close(o_j, o_t, f"forward [{tag}]")


def test_jax_accepts_jax_arrays_and_float32(jref):
    """jax-array inputs work, float32 stays float32 and meets the float32 accuracy rule."""
    import jax.numpy as jnp

    x = _make_inputs(7, 2, 97, 8, 1, 16, h0="b1", rotary=True, norm=True)
    want = ref.forward(**{n: t for n, t in _torch(x).items()}, window_size=9)
    x32 = {n: jnp.asarray(a.astype(np.float32)) for n, a in x.items()}
    got = jref.forward(**x32, window_size=9)
    assert got.dtype == jnp.float32
    got = np.asarray(got, dtype=np.float64)
    want = want.numpy()
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, f"float32 relative error {rel:.2e}"


def test_jax_bad_input_names_argument(jref):
    x = _make_inputs(3, 1, 5, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        jref.forward(x["q"], x["k"][:, :, :1].repeat(3, axis=2), x["v"][:, :, :1].repeat(3, axis=2),
                     window_size=1)
    with pytest.raises(ValueError, match="window_size"):
        jref.forward(x["q"], x["k"], x["v"], window_size=-1)
    with pytest.raises(ValueError, match="feature_map"):
        jref.residual_linear_attention(x["q"], x["k"], x["v"], window_size=1, feature_map="elu")
    with pytest.raises(ValueError, match="initial_state"):
        jref.forward(x["q"], x["k"], x["v"], window_size=1, initial_state=np.ones((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="rla_norm_weight"):
        jref.forward(x["q"], x["k"], x["v"], window_size=1, rla_norm_weight=np.ones((4, 7)))
    with pytest.raises(ValueError, match="rotary_cos"):
        jref.forward(x["q"], x["k"], x["v"], window_size=1,
                     rotary_cos=np.ones((4, 4)), rotary_sin=np.ones((4, 4)))


def test_jax_missing_gives_install_hint(monkeypatch):
    """Without jax the first call (not the import) fails with the install command."""
    import rattention_ext.jax_reference as jr

    monkeypatch.setattr(jr, "_jax", None)
    monkeypatch.setattr(jr, "_jnp", None)
    monkeypatch.setitem(sys.modules, "jax", None)  # makes `import jax` raise ImportError
    monkeypatch.setitem(sys.modules, "jax.numpy", None)
    x = _make_inputs(4, 1, 3, 2, 2, 4)
    with pytest.raises(ImportError, match=r"pip install rattention_ext\[jax\]"):
        jr.forward(x["q"], x["k"], x["v"], window_size=1)


# --------------------------------------------------------------------------------------
# 2. gradcheck of the PyTorch reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,w,fm,h0,rotary",
    [
        (1, 7, 2, 1, 4, 2, "softmax", "b1", True),
        (2, 6, 2, 2, 4, 1, "relu", "per_batch", False),
        (1, 4, 2, 1, 4, 5, "softmax", "b1", False),  # w >= T: RLA is H0 only
        (1, 7, 4, 2, 4, 2, "relu", None, True),      # no H0: o_rla == 0 for t <= w mixes as 0
    ],
)
def test_gradcheck_reference_forward(B, T, Hq, Hkv, D, w, fm, h0, rotary):
    x = _torch(_make_inputs(50 + T, B, T, Hq, Hkv, D, h0=h0, rotary=rotary, norm=True))
    names = [n for n in ("q", "k", "v", "swa_norm_weight", "rla_norm_weight", "initial_state")
             if n in x]
    leaves = [x[n].clone().requires_grad_(True) for n in names]
    tables = _pick(x, "rotary_cos", "rotary_sin")

    def f(*args):
        kw = dict(zip(names, args))
        return ref.forward(window_size=w, feature_map=fm, **kw, **tables)

    out = f(*leaves)
    assert torch.isfinite(out).all()
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_reference_branches():
    """The branch outputs that the kernels differentiate too: SWA lse and the RLA final state."""
    x = _torch(_make_inputs(77, 1, 6, 4, 2, 4, h0="b1", rotary=True))
    q, k, v, h = (x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "initial_state"))

    def swa(q, k, v):
        return ref.sliding_window_attention(q, k, v, window_size=2, softmax_scale=0.6,
                                            return_lse=True, rotary_cos=x["rotary_cos"],
                                            rotary_sin=x["rotary_sin"])

    def rla(q, k, v, h):
        return ref.residual_linear_attention(q, k, v, window_size=1, initial_state=h,
                                             return_final_state=True)

    assert torch.autograd.gradcheck(swa, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(rla, (q, k, v, h), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------
# 3. brute force, one token and one head at a time
# --------------------------------------------------------------------------------------
def _bf_phi(x, fm):
    if fm == "softmax":
        def sm(y):
            e = np.exp(y - y.max())
            return e / e.sum()
        return np.concatenate([sm(x), sm(-x)])
    return np.concatenate([np.maximum(x, 0.0), np.maximum(-x, 0.0)])


def _bf_rope(x, t, cos, sin):
    h = x.shape[0] // 2
    a, b = x[:h], x[h:]
    return np.concatenate([a * cos[t] - b * sin[t], b * cos[t] + a * sin[t]])


def _brute_force(x, w, fm, scale, eps=1e-8):
    """SPEC.md literally: returns (o_swa, lse, o_rla, final_state, forward)."""
    q, k, v = x["q"], x["k"], x["v"]
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cos, sin = x.get("rotary_cos"), x.get("rotary_sin")
    h0 = x.get("initial_state")
    gs = x.get("swa_norm_weight", np.ones((Hq, D)))
    gr = x.get("rla_norm_weight", np.ones((Hq, D)))
    o_swa = np.zeros((B, T, Hq, D))
    lse = np.zeros((B, Hq, T))
    o_rla = np.zeros((B, T, Hq, D))
    final = np.zeros((B, Hkv, 2 * D, D))
    out = np.zeros((B, T, Hq, D))
    for b in range(B):
        for h in range(Hq):
            kv = h // G
            for t in range(T):
                qt = q[b, t, h] if cos is None else _bf_rope(q[b, t, h], t, cos, sin)
                logits, vals = [], []
                for s in range(max(0, t - w), t + 1):
                    ks = k[b, s, kv] if cos is None else _bf_rope(k[b, s, kv], s, cos, sin)
                    logits.append(scale * float(qt @ ks))
                    vals.append(v[b, s, kv])
                m = max(logits)
                z = sum(math.exp(l - m) for l in logits)
                lse[b, h, t] = m + math.log(z)
                o_swa[b, t, h] = sum(math.exp(l - m) / z * vv for l, vv in zip(logits, vals))
                # RLA: the state S[t] rebuilt from scratch for every t
                S = np.zeros((2 * D, D)) if h0 is None else h0[min(b, h0.shape[0] - 1), h].copy()
                for s in range(0, t - w):  # s <= t - w - 1
                    S += np.outer(_bf_phi(k[b, s, kv], fm), v[b, s, kv])
                o_rla[b, t, h] = _bf_phi(q[b, t, h], fm) @ S
                ya = o_swa[b, t, h] / math.sqrt(np.mean(o_swa[b, t, h] ** 2) + eps)
                yb = o_rla[b, t, h] / math.sqrt(np.mean(o_rla[b, t, h] ** 2) + eps)
                out[b, t, h] = ya * gs[h] + yb * gr[h]
        for kv in range(Hkv):
            for s in range(0, T - w - 1):  # s <= T - w - 2
                final[b, kv] += np.outer(_bf_phi(k[b, s, kv], fm), v[b, s, kv])
    return o_swa, lse, o_rla, final, out


@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,w,fm,h0,rotary,scale",
    [
        (1, 1, 2, 2, 4, 0, "softmax", None, False, None),
        (2, 9, 4, 2, 4, 0, "relu", "per_batch", True, None),
        (1, 9, 4, 1, 4, 3, "softmax", "b1", True, 0.5),
        (2, 7, 2, 2, 6, 7, "relu", "b1", False, None),   # w >= T
        (1, 8, 8, 1, 4, 2, "softmax", None, False, 1.3),  # GQA 8
    ],
)
def test_reference_vs_brute_force(B, T, Hq, Hkv, D, w, fm, h0, rotary, scale):
    x = _make_inputs(300 + T + w, B, T, Hq, Hkv, D, h0=h0, rotary=rotary, norm=True)
    xt = _torch(x)
    bf_swa, bf_lse, bf_rla, bf_state, bf_out = _brute_force(x, w, fm, scale)
    rot = _pick(xt, "rotary_cos", "rotary_sin")
    o, lse = ref.sliding_window_attention(xt["q"], xt["k"], xt["v"], window_size=w,
                                          softmax_scale=scale, return_lse=True, **rot)
    _assert_close(o, bf_swa, "swa out")
    _assert_close(lse, bf_lse, "swa lse")
    o, st = ref.residual_linear_attention(xt["q"], xt["k"], xt["v"], window_size=w, feature_map=fm,
                                          return_final_state=True, **_pick(xt, "initial_state"))
    _assert_close(o, bf_rla, "rla out")
    _assert_close(st, bf_state, "rla final state")
    o = ref.forward(xt["q"], xt["k"], xt["v"], window_size=w, feature_map=fm, softmax_scale=scale,
                    **_pick(xt, "initial_state", "rotary_cos", "rotary_sin", "swa_norm_weight",
                            "rla_norm_weight"))
    _assert_close(o, bf_out, "forward")


def test_reference_zero_rla_mixes_as_zero():
    """t <= w without H0: o_rla is exactly zero and the forward is rms(o_swa) * g_swa, no NaN."""
    x = _torch(_make_inputs(11, 1, 6, 2, 2, 4, norm=True))
    o = ref.forward(x["q"], x["k"], x["v"], window_size=6, swa_norm_weight=x["swa_norm_weight"],
                    rla_norm_weight=x["rla_norm_weight"])
    swa = ref.sliding_window_attention(x["q"], x["k"], x["v"], window_size=6)
    want = swa / torch.sqrt(swa.pow(2).mean(-1, keepdim=True) + 1e-8) * x["swa_norm_weight"]
    assert torch.isfinite(o).all()
    _assert_close(o, want, "forward with empty RLA")
