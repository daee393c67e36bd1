"""Plain-PyTorch reference of RAttention (SPEC.md), exact in float64.

Every function here is the oracle the kernels are tested against. They are written
for clarity, not speed, but never materialise a ``T x T`` matrix or a per-token
state: both branches walk the sequence in query blocks, so the reference also runs
at ``T = 65536`` (the long-sequence accuracy tests need that).

Precision: the feature map, the RLA state and the mixing are computed in float32
(float64 when the inputs are float64), as SPEC.md asks. The SWA branch is computed in
the input dtype promoted to at least float32.

All functions are differentiable with plain autograd (``gradcheck`` runs on them).

NaN and Inf (SPEC.md): a masked score never multiplies anything. When a block holds a
non-finite q, k or v, its products are evaluated with the mask applied to both operands
(``_masked_products``), so a NaN in a later token or outside the window reaches neither the
outputs nor the gradients of the tokens that cannot see it; finite blocks take the matmul.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "forward",
    "sliding_window_attention",
    "residual_linear_attention",
    "feature_map",
    "apply_rotary",
    "rms_mix",
]

_BLOCK = 256  # query block of the blockwise evaluation; any value gives the same result


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, offset: int = 0) -> Tensor:
    """Half-split (GPT-NeoX) rotary embedding of ``x [B, T, H, D]``.

    ``cos``/``sin`` are ``[positions, D/2]``; row ``offset + t`` rotates token ``t``.
    """
    T, D = x.shape[1], x.shape[-1]
    d2 = D // 2
    c = cos[offset : offset + T].to(x.dtype)[None, :, None, :]
    s = sin[offset : offset + T].to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :d2], x[..., d2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def feature_map(x: Tensor, kind: str = "softmax") -> Tensor:
    """``phi: R^D -> R^2D`` in float32 (float64 for float64 input)."""
    x = x.to(_acc_dtype(x.dtype))
    if kind == "softmax":
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)
    if kind == "relu":
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
    raise ValueError(f"feature_map must be 'softmax' or 'relu', got {kind!r}")


_SUB = 8  # query rows per step of the exact masked evaluation


def _all_finite(*ts: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _masked_matmul_qk(a: Tensor, b: Tensor, visible: Tensor) -> Tensor:
    """``(a @ b^T)`` at visible entries, 0 elsewhere, without a masked pair ever meeting:
    a [..., bq, F], b [..., bk, F], visible [bq, bk] -> [..., bq, bk]. Both operands are
    masked before the product, so neither value nor gradient carries a non-finite entry
    across the mask."""
    outs = []
    zero = a.new_zeros(())
    for i0 in range(0, a.shape[-2], _SUB):
        vis = visible[i0:i0 + _SUB][..., None]  # [sq, bk, 1]
        am = torch.where(vis, a[..., i0:i0 + _SUB, None, :], zero)  # [..., sq, bk, F]
        bm = torch.where(vis, b[..., None, :, :], zero)
        outs.append((am * bm).sum(-1))
    return torch.cat(outs, dim=-2) if outs else a.new_zeros(*a.shape[:-1], b.shape[-2])


def _masked_matmul_pv(p: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """``p @ v`` summing only visible pairs: p [..., bq, bk], v [..., bk, D] -> [..., bq, D]."""
    outs = []
    zero = p.new_zeros(())
    for i0 in range(0, p.shape[-2], _SUB):
        vis = visible[i0:i0 + _SUB]  # [sq, bk]
        pm = torch.where(vis, p[..., i0:i0 + _SUB, :], zero)[..., None]  # [..., sq, bk, 1]
        vm = torch.where(vis[..., None], v[..., None, :, :], zero)  # [..., sq, bk, D]
        outs.append((pm * vm).sum(-2))
    return torch.cat(outs, dim=-2) if outs else p.new_zeros(*p.shape[:-1], v.shape[-1])


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # [B, T, Hkv, D] -> [B, T, Hkv * G, D]; query head h reads kv head h // G.
    return x.repeat_interleave(groups, dim=2) if groups > 1 else x


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """Sliding-window softmax attention: query ``t`` sees keys ``t-w .. t``.

    Returns ``o [B, T, Hq, D]`` (dtype of ``q``), and with ``return_lse`` also
    ``lse [B, Hq, T]`` (float32, float64 for float64 input).

    Packed batch (``cu_seqlens`` int32 ``[N+1]``): ``q [total, Hq, D]``, ``k, v
    [total, Hkv, D]``; each document is evaluated alone (rotary rows restart at 0), ``o``
    is ``[total, Hq, D]`` and ``lse`` ``[Hq, total]``. ``max_seqlen`` is only checked.
    """
    if cu_seqlens is not None:
        return _packed_swa(q, k, v, cu_seqlens, max_seqlen, return_lse, dict(
            window_size=window_size, softmax_scale=softmax_scale, rotary_cos=rotary_cos,
            rotary_sin=rotary_sin))
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2] if k.shape[2] else 1  # Hq = Hkv = 0: empty
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if rotary_cos is not None:
        qf = apply_rotary(qf, rotary_cos, rotary_sin)
        kf = apply_rotary(kf, rotary_cos, rotary_sin)
    kf, vf = _expand_kv(kf, G), _expand_kv(vf, G)
    outs, lses = [], []
    for t0 in range(0, T, _BLOCK):
        t1 = min(T, t0 + _BLOCK)
        s0 = max(0, t0 - window_size)
        qb = qf[:, t0:t1].transpose(1, 2)  # [B, Hq, bq, D]
        kb = kf[:, s0:t1].transpose(1, 2)
        vb = vf[:, s0:t1].transpose(1, 2)
        tq = torch.arange(t0, t1, device=q.device)[:, None]
        sk = torch.arange(s0, t1, device=q.device)[None, :]
        visible = (tq - sk >= 0) & (tq - sk <= window_size)
        exact = not _all_finite(qb, kb, vb)  # keep non-finite values off masked pairs
        if exact:
            scores = _masked_matmul_qk(qb, kb, visible) * scale
        else:
            scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # [B, Hq, bq, bk]
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, bq]
        p = torch.exp(scores - lse[..., None])
        if exact:
            p = p.masked_fill(~visible, 0.0)  # exp(-inf - NaN) would be NaN
            outs.append(_masked_matmul_pv(p, vb, visible).transpose(1, 2))
        else:
            outs.append(torch.matmul(p, vb).transpose(1, 2))
        lses.append(lse)
    if T == 0:  # empty sequence: empty outputs
        outs, lses = [qf.new_zeros(B, 0, Hq, v.shape[-1])], [qf.new_zeros(B, Hq, 0)]
    o = torch.cat(outs, dim=1).to(q.dtype)
    if return_lse:
        return o, torch.cat(lses, dim=-1)
    return o


def residual_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    feature_map: str = "softmax",
    initial_state: Optional[Tensor] = None,
    return_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
):
    """Linear attention over exactly the keys outside the window (``t - s >= w + 1``).

    ``o[t] = phi(q[t])^T (H0[h] + sum_{s <= t-w-1} phi(k[s]) v[s]^T)``, no normaliser,
    raw ``q``/``k`` (no rotary, no scale). ``initial_state`` is ``[B or 1, Hq, 2D, D]``.
    Returns ``o [B, T, Hq, D]`` in the dtype of ``q``; with ``return_final_state`` also the
    state ``[B, Hkv, 2D, D]`` after all ``T`` tokens (tokens ``s <= T - w - 2``).

    Packed batch (``cu_seqlens`` int32 ``[N+1]``): ``q [total, Hq, D]``, ``k, v
    [total, Hkv, D]``, ``initial_state [N or 1, Hq, 2D, D]``; the state of each document
    starts from its own ``H0`` and the shift never crosses a boundary. ``o`` is
    ``[total, Hq, D]``, the final state ``[N, Hkv, 2D, D]`` (zero for an empty document).
    """
    if cu_seqlens is not None:
        o, state = _packed_rla(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map,
                               initial_state)
        return (o.to(q.dtype), state) if return_final_state else o.to(q.dtype)
    o, state = _rla(q, k, v, window_size, feature_map, initial_state)
    if return_final_state:
        return o.to(q.dtype), state
    return o.to(q.dtype)


def _rla(q, k, v, window_size, fm, initial_state):
    """RLA output in float32 (float64) and the final state."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv if Hkv else 1  # Hq = Hkv = 0: empty
    acc = _acc_dtype(q.dtype)
    shift = window_size + 1
    phi_q = feature_map(q, fm)  # [B, T, Hq, 2D]
    phi_k = feature_map(k, fm)  # [B, T, Hkv, 2D]
    vf = v.to(acc)
    state = q.new_zeros(B, Hkv, 2 * D, D, dtype=acc)  # S over shifted keys seen so far
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(acc).expand(B, Hq, 2 * D, D)
    outs = []
    for t0 in range(0, T, _BLOCK):
        t1 = min(T, t0 + _BLOCK)
        pq = phi_q[:, t0:t1].transpose(1, 2)  # [B, Hq, bq, 2D]
        # inter-block: state holds keys s <= t0 - shift - 1 ... (keys s < t0 - shift)
        st = state.repeat_interleave(G, dim=1) if G > 1 else state
        ob = torch.matmul(pq, st)
        if h0 is not None:
            ob = ob + torch.matmul(pq, h0)
        # intra-block: keys s in [t0 - shift, t1 - shift) with s >= 0, visible iff s <= t - shift
        s0, s1 = max(0, t0 - shift), max(0, t1 - shift)
        if s1 > s0:
            pk = _expand_kv(phi_k[:, s0:s1], G).transpose(1, 2)  # [B, Hq, bk, 2D]
            vb = _expand_kv(vf[:, s0:s1], G).transpose(1, 2)
            tq = torch.arange(t0, t1, device=q.device)[:, None]
            sk = torch.arange(s0, s1, device=q.device)[None, :]
            visible = (tq - sk) >= shift
            if _all_finite(pq, pk, vb):
                a = torch.matmul(pq, pk.transpose(-1, -2))  # [B, Hq, bq, bk]
                a = a * visible.to(acc)
                ob = ob + torch.matmul(a, vb)
            else:  # a masked pair never meets a non-finite operand
                a = _masked_matmul_qk(pq, pk, visible)
                ob = ob + _masked_matmul_pv(a, vb, visible)
            state = state + torch.matmul(
                phi_k[:, s0:s1].transpose(1, 2).transpose(-1, -2), vf[:, s0:s1].transpose(1, 2)
            )
        outs.append(ob.transpose(1, 2))
    # Final state S[T-1]: keys s <= T - shift - 1; the loop added exactly keys s < T - shift.
    if T == 0:
        outs = [q.new_zeros(B, 0, Hq, D, dtype=acc)]
    return torch.cat(outs, dim=1), state


def _rms_factor(x: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` per row, NaN for a row with a non-finite mean: every entry
    of ``rms(x)`` depends on each ``x_i``, so a row holding an Inf is non-finite as a whole (as
    a NaN row is), not finite zeros beside one NaN (SPEC.md, NaN and Inf)."""
    ms = x.pow(2).mean(-1, keepdim=True)
    return torch.where(torch.isfinite(ms), torch.rsqrt(ms + eps), torch.nan)


def rms_mix(
    o_swa: Tensor,
    o_rla: Tensor,
    swa_norm_weight: Optional[Tensor],
    rla_norm_weight: Optional[Tensor],
    eps: float = 1e-8,
) -> Tensor:
    """``rms(o_swa) * g_swa + rms(o_rla) * g_rla`` over the head dim, in float32."""
    acc = _acc_dtype(o_swa.dtype)
    a, b = o_swa.to(acc), o_rla.to(acc)
    ya = a * _rms_factor(a, eps)
    yb = b * _rms_factor(b, eps)
    if swa_norm_weight is not None:
        ya = ya * swa_norm_weight.to(acc)
    if rla_norm_weight is not None:
        yb = yb * rla_norm_weight.to(acc)
    return ya + yb


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    feature_map: str = "softmax",
    softmax_scale: Optional[float] = None,
    swa_norm_weight: Optional[Tensor] = None,
    rla_norm_weight: Optional[Tensor] = None,
    norm_eps: float = 1e-8,
    initial_state: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> Tensor:
    """RAttention: ``rms(SWA) * g_swa + rms(RLA) * g_rla``; returns ``[B, T, Hq, D]`` in q's dtype.

    The SWA and RLA intermediates are kept in float32 (float64) before mixing. With
    ``cu_seqlens`` (packed batch, see ``sliding_window_attention``): ``[total, Hq, D]``,
    each document on its own, ``initial_state [N or 1, Hq, 2D, D]``.
    """
    acc = _acc_dtype(q.dtype)
    if cu_seqlens is not None:
        o_swa = _packed_swa(q.to(acc), k.to(acc), v.to(acc), cu_seqlens, max_seqlen, False, dict(
            window_size=window_size, softmax_scale=softmax_scale, rotary_cos=rotary_cos,
            rotary_sin=rotary_sin))
        o_rla, _ = _packed_rla(q, k, v, cu_seqlens, max_seqlen, window_size, feature_map,
                               initial_state)
        return rms_mix(o_swa, o_rla, swa_norm_weight, rla_norm_weight, norm_eps).to(q.dtype)
    o_swa = sliding_window_attention(
        q.to(acc), k.to(acc), v.to(acc), window_size=window_size, softmax_scale=softmax_scale,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin,
    )
    o_rla, _ = _rla(q, k, v, window_size, feature_map, initial_state)
    return rms_mix(o_swa, o_rla, swa_norm_weight, rla_norm_weight, norm_eps).to(q.dtype)


# ---- packed batches: one document at a time ---------------------------------------------
def _packed_docs(q, k, v, cu_seqlens, max_seqlen, what):
    """Check a packed batch and return its documents' ``(start, end)`` bounds."""
    from .varlen import bounds, check_cu_seqlens, check_packed_qkv

    check_packed_qkv(q, k, v, what)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, max_seqlen=max_seqlen, what=what)
    return bounds(cu_seqlens)


def _packed_swa(q, k, v, cu_seqlens, max_seqlen, return_lse, kw):
    docs = _packed_docs(q, k, v, cu_seqlens, max_seqlen, "reference.sliding_window_attention")
    outs, lses = [], []
    for s, e in docs:
        o, lse = sliding_window_attention(q[None, s:e], k[None, s:e], v[None, s:e],
                                          return_lse=True, **kw)
        outs.append(o[0])
        lses.append(lse[0])
    o = torch.cat(outs, dim=0)
    return (o, torch.cat(lses, dim=-1)) if return_lse else o


def _packed_rla(q, k, v, cu_seqlens, max_seqlen, window_size, fm, initial_state):
    """Packed RLA output (accumulation dtype) and the per-document final states."""
    from .varlen import check_packed_state

    docs = _packed_docs(q, k, v, cu_seqlens, max_seqlen, "reference.residual_linear_attention")
    check_packed_state(initial_state, len(docs), "reference.residual_linear_attention")
    outs, states = [], []
    for b, (s, e) in enumerate(docs):
        h0 = None
        if initial_state is not None:
            h0 = initial_state[b:b + 1] if initial_state.shape[0] > 1 else initial_state
        o, state = _rla(q[None, s:e], k[None, s:e], v[None, s:e], window_size, fm, h0)
        outs.append(o[0])
        states.append(state)
    return torch.cat(outs, dim=0), torch.cat(states, dim=0)
