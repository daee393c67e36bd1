"""JAX reference of RAttention (SPEC.md), written independently of ``reference.py``.

A second oracle: the same three functions as :mod:`rattention_ext.reference` with the
same keyword signatures, computed in ``jax.numpy`` by a different route, so that a bug in
one reference does not hide in the other:

- ``sliding_window_attention``: one dense ``T x T`` masked softmax per head (no query
  blocks). Memory grows as ``B * Hq * T^2``: meant for tests, not for long sequences.
- ``residual_linear_attention``: a ``jax.lax.scan`` over tokens carrying the state
  ``S [B, Hkv, 2D, D]``. At step ``t`` the token ``t - w - 1`` (when ``>= 0``) leaves the
  window and is added, ``S += phi(k[t-w-1]) v[t-w-1]^T`` (index arithmetic, no shifted
  copies), then ``o[t] = phi(q[t])^T (H0[h] + S)``. The final state is ``S`` after the
  last step, i.e. tokens ``s <= T - w - 2``.
- ``forward``: ``rms(o_swa) * g_swa + rms(o_rla) * g_rla`` over the head dim (a row
  holding an Inf or NaN mixes into a NaN row, as in SPEC.md's NaN rule).

Non-finite inputs: the dense SWA product multiplies every value by its probability, masked
ones by 0, so an Inf or NaN value reaches every query row of its head (0 * Inf is NaN);
SPEC.md's NaN rule is kept by :mod:`rattention_ext.reference` and the kernels, not here.
This module is the oracle for finite inputs.

Conventions follow the paper's JAX reference model: GQA by head grouping (query head
``h = kv * G + g`` reads kv head ``kv``; the ``G`` query heads of a group share one
state), feature maps ``[softmax(x), softmax(-x)]`` / ``[relu(x), relu(-x)]`` computed in
float32 (float64 for float64 inputs), RLA on raw ``q``/``k`` (no rotary, no scale, no
normaliser), RMS mixing with learned ``[Hq, D]`` scales. Branch outputs and the mixing
are computed in float32 (float64 for float64 inputs); matmuls use
``Precision.HIGHEST`` so accelerators do not silently drop to TF32/bf16 passes.

Inputs may be numpy arrays or jax arrays (anything ``jnp.asarray`` takes; CPU/CUDA torch
tensors are accepted too, copied through numpy); outputs are
jax arrays with the same dtypes as ``reference.py`` returns (``o`` in q's dtype, ``lse``
and the final state in the accumulation dtype).

float64: JAX truncates float64 to float32 unless ``jax_enable_x64`` is on. When any input
is float64 this module calls ``jax.config.update("jax_enable_x64", True)`` before
converting it. That switch is process-wide (it changes JAX's default dtypes for the rest
of the process); it is only flipped when float64 inputs are actually passed, never at
import. jax itself is imported lazily, on the first call.
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["forward", "sliding_window_attention", "residual_linear_attention"]

_jax = None
_jnp = None


def _import_jax():
    """Import jax on first use, with an install hint when it is missing."""
    global _jax, _jnp
    if _jax is None:
        try:
            import jax
            import jax.numpy as jnp
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "rattention_ext.jax_reference needs JAX: pip install rattention_ext[jax] "
                "(or pip install 'jax[cpu]')"
            ) from e
        _jax, _jnp = jax, jnp
    return _jax, _jnp


def _is_float64(x: Any) -> bool:
    if x is None:
        return False
    dt = getattr(x, "dtype", None)
    if dt is None:
        import numpy as np

        dt = np.asarray(x).dtype
    return str(dt) in ("float64", "torch.float64")


def _to_jax(x):
    """numpy / jax arrays as they are; torch tensors (a convenience) through numpy."""
    _, jnp = _import_jax()
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16: exact through float32
            return jnp.asarray(x.float().numpy()).astype(jnp.bfloat16)
        x = x.numpy()
    return jnp.asarray(x)


def _prepare(*xs):
    """Enable x64 when a float64 input is present, then convert everything to jax arrays."""
    jax, _ = _import_jax()
    if any(_is_float64(x) for x in xs) and not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)
    return [None if x is None else _to_jax(x) for x in xs]


def _acc_dtype(dtype):
    _, jnp = _import_jax()
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _einsum(spec, *ops):
    jax, jnp = _import_jax()
    return jnp.einsum(spec, *ops, precision=jax.lax.Precision.HIGHEST)


def _check_qkv(q, k, v, window_size):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got shape {tuple(q.shape)}")
    B, T, Hq, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, T={T}, Hkv, D={D}], got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Hq % k.shape[2] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({k.shape[2]})")
    if int(window_size) != window_size or window_size < 0:
        raise ValueError(f"window_size must be an integer >= 0, got {window_size!r}")


def _phi(x, kind: str):
    """Feature map ``R^D -> R^2D`` in float32 (float64 for float64 input)."""
    jax, jnp = _import_jax()
    x = x.astype(_acc_dtype(x.dtype))
    if kind == "softmax":
        return jnp.concatenate([jax.nn.softmax(x, axis=-1), jax.nn.softmax(-x, axis=-1)], axis=-1)
    if kind == "relu":
        return jnp.concatenate([jnp.maximum(x, 0), jnp.maximum(-x, 0)], axis=-1)
    raise ValueError(f"feature_map must be 'softmax' or 'relu', got {kind!r}")


def _rope(x, cos, sin):
    """Half-split (NeoX) rotary on ``x [B, T, H, D]`` with tables ``[P >= T, D/2]``."""
    _, jnp = _import_jax()
    T, D = x.shape[1], x.shape[3]
    half = D // 2
    c = cos[:T].astype(x.dtype)[None, :, None, :]
    s = sin[:T].astype(x.dtype)[None, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def sliding_window_attention(
    q,
    k,
    v,
    *,
    window_size: int,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    rotary_cos=None,
    rotary_sin=None,
    cu_seqlens=None,
    max_seqlen=None,
):
    """Sliding-window softmax attention as one dense masked softmax per head.

    Query ``t`` sees keys ``s`` with ``0 <= t - s <= w``. Returns ``o [B, T, Hq, D]`` in
    q's dtype, and with ``return_lse`` also ``lse [B, Hq, T]`` in float32 (float64).
    With ``cu_seqlens`` (``[N+1]`` offsets of a packed batch ``q [total, Hq, D]``): each
    document alone, ``o [total, Hq, D]``, ``lse [Hq, total]``.
    """
    if cu_seqlens is not None:
        return _packed(lambda a, b, c, h0: sliding_window_attention(
            a, b, c, window_size=window_size, softmax_scale=softmax_scale, return_lse=True,
            rotary_cos=rotary_cos, rotary_sin=rotary_sin), q, k, v, cu_seqlens, None,
            lambda o, lse: (o, lse) if return_lse else o, second="lse")
    q, k, v, rotary_cos, rotary_sin = _prepare(q, k, v, rotary_cos, rotary_sin)
    _check_qkv(q, k, v, window_size)
    o, lse = _swa(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin)
    o = o.astype(q.dtype)
    return (o, lse) if return_lse else o


def _swa(q, k, v, w, softmax_scale, rotary_cos, rotary_sin):
    """SWA output and lse in the accumulation dtype."""
    jax, jnp = _import_jax()
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    qa, ka, va = q.astype(acc), k.astype(acc), v.astype(acc)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if rotary_cos.ndim != 2 or rotary_cos.shape[0] < T or rotary_cos.shape[1] != D // 2:
            raise ValueError(f"rotary_cos must be [P >= {T}, {D // 2}], got {tuple(rotary_cos.shape)}")
        if tuple(rotary_sin.shape) != tuple(rotary_cos.shape):
            raise ValueError(f"rotary_sin must match rotary_cos {tuple(rotary_cos.shape)}")
        qa, ka = _rope(qa, rotary_cos, rotary_sin), _rope(ka, rotary_cos, rotary_sin)
    qg = qa.reshape(B, T, Hkv, G, D)  # head h = kv * G + g
    scores = _einsum("btngd,bsnd->bngts", qg, ka) * scale  # [B, Hkv, G, T, T]
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    visible = (t >= s) & (t - s <= w)  # the diagonal is always visible: rows are never empty
    scores = jnp.where(visible, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, Hkv, G, T]
    p = jnp.exp(scores - lse[..., None])
    o = _einsum("bngts,bsnd->btngd", p, va).reshape(B, T, Hq, D)
    return o, lse.reshape(B, Hq, T)


def residual_linear_attention(
    q,
    k,
    v,
    *,
    window_size: int,
    feature_map: str = "softmax",
    initial_state=None,
    return_final_state: bool = False,
    cu_seqlens=None,
    max_seqlen=None,
):
    """Residual linear attention by a token-by-token ``lax.scan`` of the state recurrence.

    ``o[t] = phi(q[t])^T (H0[h] + sum_{s <= t-w-1} phi(k[s]) v[s]^T)``. ``initial_state``
    is ``H0 [B or 1, Hq, 2D, D]``. Returns ``o [B, T, Hq, D]`` in q's dtype, and with
    ``return_final_state`` also the state ``[B, Hkv, 2D, D]`` (float32; float64).
    With ``cu_seqlens`` (packed batch): each document alone from its own ``H0``
    (``initial_state [N or 1, Hq, 2D, D]``), ``o [total, Hq, D]``, state ``[N, Hkv, 2D, D]``.
    """
    if cu_seqlens is not None:
        return _packed(lambda a, b, c, h0: residual_linear_attention(
            a, b, c, window_size=window_size, feature_map=feature_map, initial_state=h0,
            return_final_state=True), q, k, v, cu_seqlens, initial_state,
            lambda o, st: (o, st) if return_final_state else o, second="state")
    q, k, v, initial_state = _prepare(q, k, v, initial_state)
    _check_qkv(q, k, v, window_size)
    o, state = _rla(q, k, v, window_size, feature_map, initial_state)
    o = o.astype(q.dtype)
    return (o, state) if return_final_state else o


def _rla(q, k, v, w, fm, h0):
    """RLA output (accumulation dtype) and final state via a scan over tokens."""
    jax, jnp = _import_jax()
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q.dtype)
    phi_q = _phi(q, fm).reshape(B, T, Hkv, G, 2 * D)
    phi_k = _phi(k, fm)  # [B, T, Hkv, 2D]
    va = v.astype(acc)
    if h0 is not None:
        if h0.ndim != 4 or h0.shape[0] not in (1, B) or tuple(h0.shape[1:]) != (Hq, 2 * D, D):
            raise ValueError(
                f"initial_state must be [{B} or 1, {Hq}, {2 * D}, {D}], got {tuple(h0.shape)}"
            )
        h0g = jnp.broadcast_to(h0.astype(acc).reshape(h0.shape[0], Hkv, G, 2 * D, D),
                               (B, Hkv, G, 2 * D, D))
    shift = w + 1

    def step(S, t):
        # Token t - w - 1 leaves the window at step t: add it to the state when it exists.
        s = t - shift
        si = jnp.maximum(s, 0)
        pk = jax.lax.dynamic_index_in_dim(phi_k, si, axis=1, keepdims=False)  # [B, Hkv, 2D]
        vs = jax.lax.dynamic_index_in_dim(va, si, axis=1, keepdims=False)  # [B, Hkv, D]
        upd = pk[..., :, None] * vs[..., None, :]  # [B, Hkv, 2D, D]
        S = jnp.where(s >= 0, S + upd, S)
        pq = jax.lax.dynamic_index_in_dim(phi_q, t, axis=1, keepdims=False)  # [B, Hkv, G, 2D]
        o = _einsum("bngf,bnfd->bngd", pq, S)
        if h0 is not None:
            o = o + _einsum("bngf,bngfd->bngd", pq, h0g)
        return S, o.reshape(B, Hq, D)

    S0 = jnp.zeros((B, Hkv, 2 * D, D), dtype=acc)
    S, o = jax.lax.scan(step, S0, jnp.arange(T))  # o: [T, B, Hq, D]
    return jnp.transpose(o, (1, 0, 2, 3)), S


def _rms(x, eps):
    _, jnp = _import_jax()
    ms = jnp.mean(x * x, axis=-1, keepdims=True)
    # a row holding an Inf is non-finite as a whole, as a NaN row is (reference._rms_factor)
    return x / jnp.where(jnp.isfinite(ms), jnp.sqrt(ms + eps), jnp.nan)


def forward(
    q,
    k,
    v,
    *,
    window_size: int,
    feature_map: str = "softmax",
    softmax_scale: Optional[float] = None,
    swa_norm_weight=None,
    rla_norm_weight=None,
    norm_eps: float = 1e-8,
    initial_state=None,
    rotary_cos=None,
    rotary_sin=None,
    cu_seqlens=None,
    max_seqlen=None,
):
    """RAttention: ``rms(SWA) * g_swa + rms(RLA) * g_rla``; ``[B, T, Hq, D]`` in q's dtype.

    Both branches and the mixing run in float32 (float64 for float64 inputs); an all-zero
    RLA output (``t <= w`` without ``H0``) mixes in as zero. With ``cu_seqlens`` (packed
    batch): each document alone, ``[total, Hq, D]``.
    """
    if cu_seqlens is not None:
        kw = dict(window_size=window_size, feature_map=feature_map, softmax_scale=softmax_scale,
                  swa_norm_weight=swa_norm_weight, rla_norm_weight=rla_norm_weight,
                  norm_eps=norm_eps, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
        return _packed(lambda a, b, c, h0: (forward(a, b, c, initial_state=h0, **kw), None),
                       q, k, v, cu_seqlens, initial_state, lambda o, _: o, second=None)
    q, k, v, swa_norm_weight, rla_norm_weight, initial_state, rotary_cos, rotary_sin = _prepare(
        q, k, v, swa_norm_weight, rla_norm_weight, initial_state, rotary_cos, rotary_sin)
    _check_qkv(q, k, v, window_size)
    Hq, D = q.shape[2], q.shape[3]
    acc = _acc_dtype(q.dtype)
    for name, g in (("swa_norm_weight", swa_norm_weight), ("rla_norm_weight", rla_norm_weight)):
        if g is not None and tuple(g.shape) != (Hq, D):
            raise ValueError(f"{name} must be [{Hq}, {D}], got {tuple(g.shape)}")
    o_swa, _ = _swa(q, k, v, window_size, softmax_scale, rotary_cos, rotary_sin)
    o_rla, _ = _rla(q, k, v, window_size, feature_map, initial_state)
    y_swa, y_rla = _rms(o_swa.astype(acc), norm_eps), _rms(o_rla.astype(acc), norm_eps)
    if swa_norm_weight is not None:
        y_swa = y_swa * swa_norm_weight.astype(acc)
    if rla_norm_weight is not None:
        y_rla = y_rla * rla_norm_weight.astype(acc)
    return (y_swa + y_rla).astype(q.dtype)


def _packed(fn, q, k, v, cu_seqlens, initial_state, finish, *, second: Optional[str]):
    """Run ``fn`` (a dense function returning a pair) on every document of a packed batch
    (``q [total, Hq, D]``, offsets ``cu_seqlens [N+1]``) and concatenate: outputs along the
    tokens, the second result (``"lse"``: ``[1, Hq, T]`` along the tokens; ``"state"``: the
    final state, along the documents, zero for an empty document; None: nothing)."""
    import numpy as np

    _, jnp = _import_jax()
    if type(cu_seqlens).__module__.startswith("torch"):
        cu_seqlens = cu_seqlens.detach().cpu().numpy()
    offs = [int(x) for x in np.asarray(cu_seqlens).reshape(-1)]
    if len(offs) < 2 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])) \
            or offs[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must be [N+1] offsets: 0, non-decreasing, last = total "
                         f"{q.shape[0]}; got {offs}")
    q, k, v, initial_state = _prepare(q, k, v, initial_state)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    outs, seconds = [jnp.zeros((0, Hq, D), dtype=q.dtype)], []
    for b, (s, e) in enumerate(zip(offs[:-1], offs[1:])):
        if e == s:  # the dense functions need T >= 1; an empty document has no rows
            if second == "state":
                seconds.append(jnp.zeros((1, Hkv, 2 * D, D), dtype=_acc_dtype(q.dtype)))
            continue
        h0 = None
        if initial_state is not None:
            h0 = initial_state[b:b + 1] if initial_state.shape[0] > 1 else initial_state
        o, sec = fn(q[None, s:e], k[None, s:e], v[None, s:e], h0)
        outs.append(o[0])
        if second is not None:
            seconds.append(sec[0] if second == "lse" else sec)
    o = jnp.concatenate(outs, axis=0)
    if second is None:
        return finish(o, None)
    if second == "lse":
        seconds.insert(0, jnp.zeros((Hq, 0), dtype=_acc_dtype(q.dtype)))
    return finish(o, jnp.concatenate(seconds, axis=-1 if second == "lse" else 0))
